"""The pieces of a training loop that train.py (LAPT) and klej/ (task fine-tuning) share.

No framework: the precision flags (dtype names, autocast), a learning-rate schedule, atomic checkpoints that hold
everything a bit-exact resume needs (trainable weights, optimiser, scheduler, data position, every RNG), a JSONL
metrics log that survives a resume, a loss-curve picture drawn as plain SVG, the NEFTune embedding noise, and the
torchrun side of train.py (DDP / FSDP wrapping, gradient sync, sharded checkpoints, float16 loss scaling).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

SCHEDULES = ("cosine", "linear", "constant")
# The --dtype / --autocast names of every command (train.py, eval_ppl.py, generate.py, python -m klej).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_CHOICES = ("auto", "bfloat16", "float16", "none")


# ------------------------------------------------------------------------------------------------------- precision

def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU flags that mean native bf16 products (avx512_bf16, amx_bf16) this CPU has; `cpuinfo` stands in for
    /proc/cpuinfo's text (tests). Without them, oneDNN emulates bf16 products in float32 and converts on every load
    and store, which makes bf16 autocast several times slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, so the safe answer (float32 is never emulated)
            return []
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX)."""
    return bool(cpu_bf16_flags())


def resolve_autocast(choice: str, device: str) -> str | None:
    """--autocast auto -> "bfloat16" where the device has native bf16 products (a CUDA GPU that supports bf16, a CPU
    with avx512_bf16 or amx_bf16), else None (float32: the base's dtype). Any other choice is kept, "none" -> None."""
    if choice == "auto":
        if torch.device(device).type == "cuda":
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            native = cpu_has_bf16()
        return "bfloat16" if native else None
    return None if choice == "none" else choice


def autocast_context(device: str, autocast: str | None):
    """torch.autocast in `autocast`'s dtype on `device`, or nothing."""
    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[autocast])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then the schedule's decay."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_factor + (1 - min_factor) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int,
                   min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup, total, min_factor))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (the LoRA tensors, a task head): a 7B checkpoint stays a few hundred MB."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array travels as a tensor: torch.load(weights_only=True) admits no ndarray.
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill at any moment leaves either the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, step: int, data_state: dict,
                    extra: dict | None = None, *, trainable: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """`trainable` / `optimizer_state` override what is read off model / optimizer (a sharded model passes its
    gathered full state)."""
    atomic_torch_save({
        "step": step,
        "trainable": trainable_state_dict(model) if trainable is None else trainable,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": rng_state(),
        "extra": extra or {},
    }, path)


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, ckpt: dict | None = None) -> dict:
    """Restore a checkpoint written by save_checkpoint; returns it (step, data position, extra). `ckpt`: the
    checkpoint already read from `path` by read_checkpoint (not read twice)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    params = dict(model.named_parameters())
    for name, value in ckpt["trainable"].items():
        if name not in params:
            raise ValueError(f"{path}: checkpoint tensor {name!r} is not a parameter of this model")
        if params[name].shape != value.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt


class MetricsLog:
    """Append-only JSONL, one record per line. On resume, records past the resumed step are dropped first, so the
    file tells the run's story once, as if it had never been interrupted."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    r = json.loads(line)
                    if r.get("step", 0) <= resume_step:
                        self.records.append(r)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def loss_curve_svg(records: list[dict], path: Path, title: str = "training loss") -> None:
    """A small dependency-free SVG: training loss per step, and evaluation points if any."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    pts = train + evals
    if not pts:
        return
    w, h, pad = 640, 360, 48
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def xy(s, v):
        return pad + (s - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in train))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#d62728"/>'
                   for x, y in (xy(s, v) for s, v in evals))
    ticks = "".join(
        f'<text x="{pad - 6}" y="{xy(x0, v)[1] + 4:.1f}" text-anchor="end" font-size="11">{v:.2f}</text>'
        for v in np.linspace(y0, y1, 5))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
           f'<rect width="{w}" height="{h}" fill="white"/>'
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>'
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>{ticks}'
           f'<text x="{pad}" y="{h - pad + 16}" font-size="11">step {x0}</text>'
           f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end" font-size="11">step {x1}</text>'
           f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>{dots}'
           f'<text x="{w - pad}" y="{pad - 8}" text-anchor="end" font-size="11" fill="#1f77b4">train loss'
           f'{" (red: eval)" if evals else ""}</text></svg>')
    atomic_write_text(path, svg)


def neftune_hook(alpha: float) -> Callable:
    """NEFTune (Jain et al. 2023): in training, add uniform noise of scale alpha / sqrt(T * dim) to the embeddings.

    Register with `model.tok_embeddings.register_forward_hook(neftune_hook(alpha))`.
    """
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)
    return hook


class NonFiniteLoss(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------- one step

def loss_scaler(device: str, autocast: str | None) -> torch.amp.GradScaler:
    """float16 has 5 exponent bits: small gradients underflow to zero and large ones overflow. Dynamic loss scaling
    multiplies the loss before the backward and divides the gradients after it, skipping a step whose gradients
    overflowed (and halving the scale). bfloat16 has float32's range and needs none: the scaler is then a no-op."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=autocast == "float16")


def optimizer_step(optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor], grad_clip: float,
                   step: int, loss: float, checkpoint: Path) -> tuple[float, float | None]:
    """Unscale, clip and apply the accumulated gradients of step `step` (1-based; `loss` its mean loss), then zero
    them. -> (gradient norm, the loss scale this step used or None). Raises NonFiniteLoss before the adapters are
    touched when the loss or the gradients are not finite (an overflow under float16 loss scaling is skipped instead,
    unless the scale is already below 1); `checkpoint` is named in the message as the last good state."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at step {step}; stopping. The last good checkpoint is kept in "
                            f"{checkpoint} (try a lower --lr or --grad-clip)")
    scaler.unscale_(optimizer)
    # The norm is measured even when clipping is off (max_norm inf): a finite loss can still have gradients
    # that are not finite, and one AdamW step on them would turn every adapter weight into NaN.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        raise NonFiniteLoss(f"gradient norm is {grad_norm} at step {step} (loss {loss:.4f}); stopping before the "
                            f"update. The last good checkpoint is kept in {checkpoint} (try a lower --lr)")
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # = optimizer.step(), unless float16 gradients overflowed: then the step is skipped
    scaler.update()
    if scaler.is_enabled() and not math.isfinite(grad_norm) and scaler.get_scale() < 1:
        raise NonFiniteLoss(
            f"gradient norm is {grad_norm} at step {step} (loss {loss:.4f}), and float16 loss scaling has skipped "
            f"so many steps that its scale is down to {scaler.get_scale()}: gradients that are not finite at a scale "
            f"below 1 are not an overflow. The last good checkpoint is kept in {checkpoint} (try a lower --lr, or "
            f"--autocast bfloat16)")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, scale


# ------------------------------------------------------------------------------------------------------- torchrun

def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) — torchrun sets WORLD_SIZE; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def wrap_distributed(model: nn.Module, fsdp: bool, world: int, device: str) -> nn.Module:
    """DDP (every rank holds the model, gradients are averaged) or FSDP2 (each layer's weights sharded across the
    ranks) over `world` processes; the model itself in one process."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def gradient_sync(model: nn.Module, last: bool, world: int, fsdp: bool):
    """Gradient accumulation across processes: average the gradients only in the last micro-batch's backward."""
    if world == 1:
        return contextlib.nullcontext()
    if fsdp:  # FSDP2: reduce-scatter the gradients only after the last micro-batch
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def on_rank_0_first(make: Callable, rank: int, world: int):
    """make() on rank 0 first, then on the other ranks: the first call writes a cache file (token files) that the
    others then read, instead of every process writing and renaming the same file at once."""
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        return make()
    finally:  # also when make() raised: the others then try, and raise the same error instead of waiting forever
        if world > 1 and rank == 0:
            dist.barrier()


def gather_full_state(model: nn.Module, optimizer) -> dict:
    """FSDP: whole (unsharded) trainable tensors and optimizer state, gathered with a collective every rank joins."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"trainable": model_state, "optimizer_state": optim_state}


def gather_rng_states() -> list:
    """Every rank's RNG state (its dropout and noise stream), gathered with a collective every rank joins."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def load_sharded_checkpoint(ckpt: dict, model: nn.Module, optimizer, scheduler) -> None:
    """The FSDP counterpart of load_checkpoint: whole tensors scattered into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=ckpt["trainable"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
