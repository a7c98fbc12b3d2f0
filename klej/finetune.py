"""Fine-tuning one KLEJ task, Curie's way: LoRA again, a head on the last token, early stopping on dev.

The recipe (section 4 of the paper):

    LoRA            r=2, alpha=16, dropout 0.1, on wq and wv only (a task needs far less than a language did)
    head            Linear(dim -> classes) on the last token (klej/head.py), trained in full
    loss            cross-entropy weighted by inverse class frequency, w_c = N / (K * n_c), so that a rare class
                    (CBD's cyberbullying, PolEmo's ambivalent reviews) weighs as much in total as a common one
    optimiser       AdamW, learning rate 1e-4, constant after a linear warm-up over the first 10% of the steps
    clipping        gradient norm 0.3
    epochs          1 for AR, CBD, CDSC-E and CDSC-R, 5 for the others (the task registry says which)
    early stopping  the dev score is measured a few times per epoch (`evals_per_epoch`); after `patience`=3
                    measurements without a new best, training stops. The best weights are kept and used.

Regression tasks (CDSC-R's relatedness 0-5, AR's 1-5 stars) have a one-unit head that predicts the target scaled
to [0, 1], trained with mean squared error. AR is scored by a per-rating mean absolute error, so its squared
errors are weighted by the inverse frequency of the rating, the same balancing as the classes get elsewhere.

A LAPT adapter (the language-adapted model of the paper's first part) is merged into the base weights before the
task's own LoRA is injected: the task then starts from the Polish-adapted model, and only the small r=2 adapter
and the head are trained, exactly what the paper stacks.

Checkpoints, resume and the metrics log are those of train.py (training.py): one checkpoint per dev evaluation
holds the trainable weights, optimiser, scheduler, every RNG, the data position and the early-stopping state, so an
interrupted run resumed with `--resume` continues as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import training
from training import DTYPES
from klej.head import SequenceHead, pad_batch
from klej.metrics import METRICS
from klej.tasks import Split, Task, TaskData
from klej.templates import encode_example
from lora import LoRAConfig, inject_lora, load_adapter, remove_lora, save_adapter
from model import load
from model.safetensors import load_file, save_file

RUN_FILE = "run.json"          # what was trained: task, base model, recipe
RESULT_FILE = "result.json"    # the finished run's dev score
BEST_DIR = "best"              # the best weights so far: the task LoRA (adapter files) + the head
HEAD_FILE = "score.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"


@dataclass
class FinetuneConfig:
    lr: float = 1e-4
    warmup: float = 0.1                # share of all steps spent warming up
    grad_clip: float = 0.3
    lora_r: int = 2
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("wq", "wv")
    batch_size: int = 8
    max_len: int = 512                 # tokens per example, [BOS] included
    epochs: int | None = None          # None: the task's own (1 or 5)
    patience: int = 3                  # dev evaluations without a new best before stopping
    evals_per_epoch: int = 4
    seed: int = 0

    def __post_init__(self):
        # Checked here, not where they bite: batch_size=0 divides by zero when the steps are counted, and
        # evals_per_epoch=0 trains to the end without ever saving best weights, then fails to load them.
        least = {"batch_size": 1, "evals_per_epoch": 1, "patience": 1, "max_len": 2}   # max_len: [BOS] + a token
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ValueError(f"FinetuneConfig: {name}={getattr(self, name)}, must be at least {low}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"FinetuneConfig: epochs={self.epochs}, must be at least 1 (None: the task's own)")
        if not self.lr > 0:
            raise ValueError(f"FinetuneConfig: lr={self.lr}, must be positive")

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)


# ---------------------------------------------------------------------------------------------------- the model

def prepare_classifier(model: nn.Module, task: Task, cfg: FinetuneConfig,
                       lapt_adapter: str | Path | None = None) -> SequenceHead:
    """Base model (+ merged LAPT adapter) -> task LoRA injected, everything else frozen, a fresh trainable head."""
    if lapt_adapter is not None:
        load_adapter(model, lapt_adapter)
        remove_lora(model, merge=True)   # W <- W + scale * B @ A, then plain nn.Linear layers again
    torch.manual_seed(cfg.seed)          # LoRA's A and the head are initialised at random: reproducibly
    inject_lora(model, cfg.lora)
    head = SequenceHead(model, task.n_outputs)
    head.score.weight.requires_grad_(True)
    return head


def save_best(head: SequenceHead, cfg: FinetuneConfig, folder: Path) -> None:
    save_adapter(head.model, cfg.lora, folder)
    save_file({"score.weight": head.score.weight.detach().cpu().contiguous()}, folder / HEAD_FILE)


def load_best(head: SequenceHead, folder: Path) -> None:
    load_adapter(head.model, folder)
    path = folder / HEAD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the task head's weights are missing")
    weight = load_file(path).get("score.weight")
    if weight is None or weight.shape != head.score.weight.shape:
        raise ValueError(f"{path}: expected a tensor 'score.weight' of shape {tuple(head.score.weight.shape)}, "
                         f"found {None if weight is None else tuple(weight.shape)}")
    with torch.no_grad():
        head.score.weight.copy_(weight)



def load_base(source: str | Path, device: str = "cpu", dtype: str = "float32", quantize: str | None = None):
    """-> (Transformer, tokenizer) of a checkpoint folder, .gguf or named source; quantize="nf4" holds the frozen
    base in 4-bit NormalFloat (QLoRA), quantised tensor by tensor as it loads."""
    return load(source, device=device, dtype=DTYPES[dtype], quantize=quantize)   # load() refuses other values


def open_run(run_dir: Path, device: str = "cpu") -> tuple[SequenceHead, object, Task, FinetuneConfig]:
    """Rebuild a finished (or interrupted) run from its folder: base model as recorded in run.json, the LAPT
    adapter merged, the task LoRA and head with the best weights. -> (head, tokenizer, task, config)."""
    path = Path(run_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no run here (run `python -m klej finetune` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    task = Task(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["task"].items()})
    cfg = FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
    base = info["base"]
    model, tokenizer = load_base(base["model"], device, base["dtype"], base["quantize"])
    head = prepare_classifier(model, task, cfg, base["adapter"])
    load_best(head, Path(run_dir) / BEST_DIR)
    return head, tokenizer, task, cfg


# ---------------------------------------------------------------------------------------------------- data, loss

def encode_split(task: Task, split: Split, tokenizer, max_len: int) -> list[list[int]]:
    return [encode_example(task.inputs, fields, tokenizer, max_len) for fields in split.fields]


def target_weights(task: Task, y: np.ndarray) -> np.ndarray:
    """Loss weight per class (per whole-number target for a regression task) from the training targets:
    w_k = N / (K * n_k) over the K classes present; all ones for a task that is not weighted (CDSC-R)."""
    strata = _strata(task, torch.as_tensor(y)).numpy()
    size = len(task.labels) if not task.is_regression else int(task.value_range[1]) + 1
    if not task.weighted:
        return np.ones(size)
    counts = np.bincount(strata, minlength=size).astype(np.float64)
    present = counts > 0
    return np.where(present, len(y) / (present.sum() * np.maximum(counts, 1)), 0.0)


def _strata(task: Task, y: torch.Tensor) -> torch.Tensor:
    """The class of each target, for weighting: the label index, or a regression target rounded (AR's stars)."""
    return torch.round(y).long() if task.is_regression else y


def loss_terms(task: Task, out: torch.Tensor, y: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of weighted per-example losses, sum of their weights); the loss is their ratio, so a weighted mean
    over any set of batches (a training batch, the whole dev set) is computed the same way."""
    if task.is_regression:
        low, high = task.value_range
        scaled = (y.to(out.dtype) - low) / (high - low)                 # [B] in [0, 1]
        per_example = (out[:, 0] - scaled) ** 2
    else:
        per_example = F.cross_entropy(out, y, reduction="none")         # out: logits [B, classes]
    w = weights[_strata(task, y)]
    return (w * per_example).sum(), w.sum()


def decode_outputs(task: Task, out: torch.Tensor) -> np.ndarray:
    """Head outputs [N, n_outputs] -> predicted class indices, or values back on the task's scale (clipped)."""
    if task.is_regression:
        low, high = task.value_range
        return (out[:, 0].clamp(0, 1) * (high - low) + low).double().cpu().numpy()
    return out.argmax(dim=1).cpu().numpy()


@torch.no_grad()
def forward_all(head: SequenceHead, ids: list[list[int]], pad_id: int, batch_size: int,
                progress: bool = False, desc: str = "") -> torch.Tensor:
    """Head outputs [N, n_outputs] for every example, in order. Batches group examples of similar length."""
    was_training = head.training
    head.eval()
    device = head.score.weight.device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), head.score.out_features)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        tokens, mask = pad_batch([ids[i] for i in rows], pad_id, device=device)
        out[rows] = head(tokens, mask).cpu()
    head.train(was_training)
    return out


def pad_id_of(tokenizer) -> int:
    """Any id will do (the causal model never lets a real token see right padding): the tokenizer's own, else EOS."""
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None and pad >= 0 else tokenizer.eos_id


def evaluate(head: SequenceHead, tokenizer, task: Task, split: Split, cfg: FinetuneConfig,
             weights: np.ndarray | None = None, progress: bool = False) -> dict:
    """-> {metric name: score, "loss": weighted dev loss (when weights are given), "n": examples}."""
    if split.y is None:
        raise ValueError(f"{split.path}: has no {task.target} column to score against")
    out = forward_all(head, encode_split(task, split, tokenizer, cfg.max_len), pad_id_of(tokenizer),
                      cfg.batch_size, progress, desc=f"{task.name} dev")
    result = {task.metric: METRICS[task.metric](split.y, decode_outputs(task, out)), "n": len(split)}
    if weights is not None:
        y = torch.as_tensor(split.y)
        total, weight = loss_terms(task, out, y, torch.as_tensor(weights, dtype=out.dtype))
        result["loss"] = (total / weight).item()
    return result


def predict(head: SequenceHead, tokenizer, task: Task, split: Split, cfg: FinetuneConfig,
            progress: bool = False) -> np.ndarray:
    out = forward_all(head, encode_split(task, split, tokenizer, cfg.max_len), pad_id_of(tokenizer),
                      cfg.batch_size, progress, desc=f"{task.name} predict")
    return decode_outputs(task, out)


# ---------------------------------------------------------------------------------------------------- the loop

def _better(score: float, best: float | None) -> bool:
    """Higher is better for every KLEJ metric; an undefined score (nan) never beats a defined one."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _run_info(task: Task, cfg: FinetuneConfig, base: dict) -> dict:
    # Through JSON and back, so that it compares equal to what run.json holds (tuples become lists).
    return json.loads(json.dumps({"task": dataclasses.asdict(task), "base": base, "config": dataclasses.asdict(cfg)}))


def write_run_info(run_dir: Path, task: Task, cfg: FinetuneConfig, base: dict) -> None:
    training.atomic_write_text(run_dir / RUN_FILE, json.dumps(_run_info(task, cfg, base), indent=2) + "\n")


def _check_same_run(run_dir: Path, task: Task, cfg: FinetuneConfig, base: dict) -> None:
    """A checkpoint resumes only the run that wrote it: same task, base model and recipe."""
    path = run_dir / RUN_FILE
    recorded = json.loads(path.read_text()) if path.exists() else {}
    wanted = _run_info(task, cfg, base)
    changed = [k for k in wanted if recorded.get(k) != wanted[k]]
    if changed:
        raise ValueError(f"{path}: the checkpoint in {run_dir} belongs to a run with another "
                         f"{' and '.join(changed)}; resume with the same settings or start in another folder")


def finetune(head: SequenceHead, tokenizer, task: Task, data: TaskData, run_dir: Path, cfg: FinetuneConfig,
             base: dict, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train `head` (from prepare_classifier) on data.train, keeping the best dev score's weights in run_dir/best.

    `base` records how the base was built ({"model", "adapter", "dtype", "quantize"}, see open_run) in run.json.
    Returns the result written to run_dir/result.json: the dev score of the best weights, which `head` holds on
    return. run_dir must not hold another run's checkpoint unless resume=True.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path}: a run is already here; resume it (--resume) or choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_path.exists():
        _check_same_run(run_dir, task, cfg, base)
    write_run_info(run_dir, task, cfg, base)
    device = head.score.weight.device
    pad = pad_id_of(tokenizer)

    train_ids = encode_split(task, data.train, tokenizer, cfg.max_len)
    y_train = torch.as_tensor(data.train.y)
    weights_np = target_weights(task, data.train.y)
    weights = torch.as_tensor(weights_np, dtype=torch.float32, device=device)
    epochs = cfg.epochs or task.epochs
    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup * total)
    # Dev evaluations spread evenly over each epoch, the last one at its end: e.g. after steps 12 and 23 of 23.
    eval_points = {math.ceil(k * steps_per_epoch / cfg.evals_per_epoch) for k in range(1, cfg.evals_per_epoch + 1)}

    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = training.make_scheduler(optimizer, "constant", warmup, total)
    step, epoch, batch = 0, 0, 0
    state = {"best": None, "best_step": None, "bad_evals": 0, "stopped": False, "seconds": 0.0}
    if resume and ckpt_path.exists():
        ckpt = training.load_checkpoint(ckpt_path, head, optimizer, scheduler)
        step, epoch, batch, state = ckpt["step"], ckpt["data"]["epoch"], ckpt["data"]["batch"], ckpt["extra"]
        log(f"{task.name}: resumed at step {step}/{total} (best dev {task.metric} so far {state['best']})")
    else:
        training.set_seed(cfg.seed)
    metrics = training.MetricsLog(run_dir / METRICS_LOG, resume_step=step if step else None)

    n_train = sum(p.numel() for p in params)
    log(f"{task.name}: {len(train_ids)} train / {len(data.dev)} dev examples, {epochs} epoch(s) of "
        f"{steps_per_epoch} steps, warm-up {warmup}, {len(eval_points)} dev evaluation(s) per epoch; "
        f"{n_train:,} trainable parameters")
    head.train()
    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=total, initial=step, desc=task.name, unit="step", disable=not progress)
    while step < total and not state["stopped"]:
        rows = epoch_order(len(train_ids), cfg.seed, epoch)[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
        tokens, mask = pad_batch([train_ids[i] for i in rows], pad, device=device)
        loss_sum, weight_sum = loss_terms(task, head(tokens, mask), y_train[rows].to(device), weights)
        loss = loss_sum / weight_sum
        if not torch.isfinite(loss):
            raise training.NonFiniteLoss(f"{task.name}: loss {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        if not torch.isfinite(grad_norm):   # a finite loss can still have NaN/inf gradients: never step on them
            raise training.NonFiniteLoss(f"{task.name}: gradient norm {grad_norm.item()} at step {step + 1} (loss "
                                         f"{loss.item():.4f}); the last checkpoint is kept")
        optimizer.step()
        scheduler.step()
        step, batch = step + 1, batch + 1
        if batch == steps_per_epoch:
            epoch, batch = epoch + 1, 0
        metrics.log({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                     "grad_norm": grad_norm.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", best=state["best"])

        if (batch or steps_per_epoch) in eval_points:         # batch == 0: an epoch has just ended
            dev = evaluate(head, tokenizer, task, data.dev, cfg, weights_np)
            score = dev[task.metric]
            if _better(score, state["best"]):
                save_best(head, cfg, run_dir / BEST_DIR)
                state.update(best=score, best_step=step, bad_evals=0)
            else:
                state["bad_evals"] += 1
                state["stopped"] = state["bad_evals"] >= cfg.patience
            state["seconds"] = time.perf_counter() - started
            metrics.log({"step": step, "eval_loss": dev["loss"], f"dev_{task.metric}": score})
            training.save_checkpoint(ckpt_path, head, optimizer, scheduler, step,
                                     {"epoch": epoch, "batch": batch}, state)
    bar.close()
    training.loss_curve_svg(metrics.records, run_dir / "loss.svg", title=f"KLEJ {task.name}")

    load_best(head, run_dir / BEST_DIR)
    result = {"task": task.name, "metric": task.metric, "dev": state["best"], "best_step": state["best_step"],
              "steps": step, "total_steps": total, "stopped_early": state["stopped"],
              "train_examples": len(train_ids), "dev_examples": len(data.dev), "seconds": round(state["seconds"], 1)}
    training.atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    log(f"{task.name}: dev {task.metric} {state['best']:.4f} (best at step {state['best_step']} of {step})")
    return result
