"""The paper's claims, reproduced small on the CPU and carried further: one command runs the experiments (caching
every finished run) and writes docs/results.md with its SVG figures in docs/results/.

    python -m experiments.lapt_report            # the full report (sized for 90 minutes on 2 AVX-512 cores)
    python -m experiments.lapt_report --quick    # a smaller page, docs/quick/, in <= 15 minutes on 2 AVX2 cores
    python -m experiments.lapt_report --toy --out /tmp/x   # the machinery at toy scale (the test runs this)

All runs are SmolLM2-135M (the real GGUF, named source smollm2-135m) with Curie's adapter (LoRA r 32, alpha 64,
dropout 0.05 on every projection and the head) and train.py's cpu-smollm2 recipe unless a row says otherwise:

  1. LAPT curve: perplexity and bits per byte against tokens trained, on in-domain Polish (the corpus's test split)
     and on a second Polish domain held out of training entirely (fortunes-pl; experiments/datasets.py), and its
     seed spread: the same recipe with more training seeds at one budget, to read single-seed differences against;
  2. forgetting: English perplexity at every point of the curve, on English that never entered training;
  3. downstream transfer: the fortunes classification task of klej/demo.py, fine-tuned with the demo's recipe and
     the same seeds from (a) the base model and (b) the base with the LAPT adapter merged; accuracy with a paired
     bootstrap confidence interval over test examples, averaged over seeds;
  4. NF4 vs full-precision base at two budgets, and LoRA rank 8 / 32 / 128 at one budget.

The curve is one run, evaluated as it goes: train.py is stopped at each point (--max-steps-this-run) and resumed
for the next, which reproduces the uninterrupted run exactly. Its cosine schedule is planned for the last point, so
an earlier point is a run in progress, not a run planned for that budget. The NF4 and rank runs share that schedule
and are stopped at the same steps, so each of their points has a full-precision, rank-32 twin on the curve.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train
import training
from eval_ppl import evaluate_perplexity
from experiments import datasets
from experiments.runner import Cache, digest, file_digest, machine
from experiments.svg import Series, bar_chart, line_chart
from klej.demo import TASK as DEMO_TASK

MODEL = "smollm2-135m"
# Part of every cache key. The commit is not (a change elsewhere must not throw away an hour of runs), so bump this
# when a change alters the numbers of runs with the same settings (v2: SmolLM2 trains and is scored without BOS, as
# its GGUF says, since the tokenizers follow each checkpoint's add-BOS).
MEASURE_VERSION = 2
ROOT = Path(__file__).resolve().parent.parent


# train.py's recipe trains under bf16 autocast, which doubles the matmul throughput of a CPU with AVX-512 bf16; on
# one without (AVX2 only), bf16 products are emulated and run ~5x slower than float32, so we train in float32 there.
AUTOCAST = "bfloat16" if training.cpu_has_bf16() else "none"
SEED = 1234  # the training seed of every LAPT run but the seed spread's
SETS = {"pl-test": "Polish, in-domain (test split)", "pl-fortunes": "Polish, held-out domain (fortunes-pl)",
        "en-gnome": "English (gnome-user-docs)"}
SETS_SHORT = {"pl-test": "Polish test", "pl-fortunes": "Polish fortunes", "en-gnome": "English"}


@dataclass(frozen=True)
class Mode:
    name: str
    steps: int                  # the curve's last point; its cosine schedule spans these steps
    points: tuple[int, ...]     # steps at which the curve is evaluated (0: the base model)
    nf4_points: tuple[int, ...]  # the budgets of the NF4 comparison (two; one in the toy, to test the machinery)
    rank_point: int             # the budget of the rank comparison (and of the seed spread)
    ranks: tuple[int, ...] = (8, 32, 128)
    # More training seeds (the curve's run is seed 1234) for the curve's recipe at rank_point: how far another seed
    # moves a perplexity, so that a difference between two runs of one seed can be read against it.
    spread_seeds: tuple[int, ...] = (1, 2)
    seq_len: int = 256
    micro_batch: int = 4
    grad_accum: int = 2
    warmup: int = 10
    lr: float = 2e-3
    eval_tokens: int = 12000    # tokens scored per evaluation set
    eval_ctx: int = 512
    eval_stride: int = 256
    eval_chars: int | None = None  # toy only: each set is its first document, cut at a space near this many characters
    seeds: tuple[int, ...] = (0, 1, 2)
    ft_epochs: int | None = None   # None: the demo's (klej/demo.py's TASK.epochs)
    ft_train_per_class: int | None = None  # None: the task's 60 per class
    ft_test_examples: int | None = None     # None: all 210
    ft_dev_per_class: int | None = None     # None: the task's 15 per class (scored at every dev evaluation)
    train_documents: int | None = None     # None: the whole LAPT training file
    bootstrap: int = 10000

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum


# The default train.py run is 60 steps of 2048 tokens; the full curve goes to 4x that. The full mode is sized for the
# machine of docs/benchmarks.md (AVX-512 bf16: the default run in 4 minutes); the quick one for 2 AVX2-only cores
# (float32 products, ~10x slower per token), where it trains 24 steps of 512 tokens.
MODES = {
    "full": Mode("full", steps=240, points=(0, 15, 30, 60, 120, 240), nf4_points=(30, 120), rank_point=60),
    "quick": Mode("quick", steps=24, points=(0, 3, 6, 12, 24), nf4_points=(6, 12), rank_point=6, seq_len=128,
                  micro_batch=4, grad_accum=1, warmup=2, eval_tokens=800, eval_ctx=256, eval_stride=128, seeds=(0,),
                  ft_epochs=1),
    # toy: the test's run. Its 24 perplexity evaluations (8 points x 3 sets) and the fine-tunings' dev evaluations
    # were most of its time: it scores one window of at most 128 tokens per set, the first 300 characters of the set's
    # first document (whole documents alone would score the first one whole, up to 600 tokens; overlapping windows
    # are tested in tests/test_eval_ppl.py), and a dev set of 3 examples per class.
    "toy": Mode("toy", steps=4, points=(0, 2, 4), nf4_points=(2,), rank_point=2, seq_len=64, micro_batch=2,
                grad_accum=1, warmup=1, eval_tokens=128, eval_ctx=128, eval_stride=128, eval_chars=300, seeds=(0,),
                ft_epochs=1, ft_train_per_class=4, ft_test_examples=30, ft_dev_per_class=3, train_documents=300,
                bootstrap=200, spread_seeds=(1,)),
}

# Where each mode's page goes unless --out says: a smaller page never overwrites the full one.
DEFAULT_OUT = {"full": ROOT / "docs", "quick": ROOT / "docs" / "quick", "toy": ROOT / "runs" / "lapt-report" / "toy-page"}


class Report:
    """Runs (or takes from the cache) every experiment of one mode; write_page() turns the results into the page."""

    def __init__(self, mode: Mode, root: Path, log=print):
        self.mode, self.root, self.log = mode, Path(root), log
        self.cache = Cache(self.root, log)
        paths = datasets.build(log)
        self.train_file = (datasets.subset(paths["lapt-train"], mode.train_documents) if mode.train_documents
                           else paths["lapt-train"])
        self.set_files = {name: paths[name] for name in SETS}
        from data.documents import read_documents
        self.texts = {name: read_documents(path) for name, path in self.set_files.items()}
        if mode.eval_chars:  # the text itself is cut, so tokens and bytes still describe the same text
            self.texts = {name: [first_words(texts[0], mode.eval_chars)] for name, texts in self.texts.items()}
        self.eval_settings = {"version": MEASURE_VERSION, "ctx": mode.eval_ctx, "stride": mode.eval_stride,
                              "max_tokens": mode.eval_tokens,
                              "sets": {name: file_digest(p) for name, p in self.set_files.items()},
                              # (only where set: the cached runs of the other modes keep their keys)
                              **({"chars": mode.eval_chars} if mode.eval_chars else {})}

    # ------------------------------------------------------------------------------------------------- LAPT

    def lapt_settings(self, quantize: str | None = None, r: int = 32, seed: int = SEED) -> dict:
        m = self.mode
        return {"version": MEASURE_VERSION, "model": MODEL, "data": file_digest(self.train_file), "seq_len": m.seq_len,
                "micro_batch": m.micro_batch, "grad_accum": m.grad_accum, "lr": m.lr, "warmup": m.warmup,
                "steps": m.steps, "lora_r": r, "lora_alpha": 2 * r, "quantize": quantize, "seed": seed,
                "autocast": AUTOCAST}

    def run_dir(self, settings: dict) -> Path:
        return self.root / "runs" / f"lapt-{digest(settings)}"

    def train_argv(self, settings: dict) -> list[str]:
        s = settings
        argv = ["--model", s["model"], "--data", str(self.train_file), "--seq-len", str(s["seq_len"]),
                "--micro-batch", str(s["micro_batch"]), "--grad-accum", str(s["grad_accum"]), "--lr", str(s["lr"]),
                "--warmup", str(s["warmup"]), "--steps", str(s["steps"]), "--lora-r", str(s["lora_r"]),
                "--lora-alpha", str(s["lora_alpha"]), "--seed", str(s["seed"]),
                "--autocast", s["autocast"], "--no-eval",
                "--save-interval", str(10 ** 6), "--device", "cpu", "--out", str(self.run_dir(s))]
        return argv + (["--quantize", s["quantize"]] if s["quantize"] else [])

    def _train_to(self, settings: dict, step: int) -> float:
        """Train (or resume) the run of `settings` up to `step`; -> seconds spent training now."""
        out = self.run_dir(settings)
        ckpt = out / "checkpoint.pt"
        done = training.read_checkpoint(ckpt)["step"] if ckpt.exists() else 0
        argv = self.train_argv(settings)
        if done > step:  # the run is past this point (its result was deleted): train it again from the start
            argv, done = argv + ["--overwrite"], 0
        else:
            argv += ["--resume"]
        started = time.perf_counter()
        train.main(argv + ["--max-steps-this-run", str(step - done)])
        return time.perf_counter() - started

    def lapt_point(self, settings: dict, step: int) -> dict:
        """Perplexity on every evaluation set after `step` steps of the run `settings` (0: the base model)."""
        def work() -> dict:
            from lora import count_parameters
            from model import load
            seconds = 0.0
            if step == 0:
                model, tokenizer = load(MODEL, dtype=torch.float32, quantize=settings["quantize"])
                trainable = 0
            else:
                seconds = self._train_to(settings, step)
                args = train.parse_args(self.train_argv(settings))
                model, tokenizer, _, _ = train.build_model(args, "cpu")
                ckpt = training.read_checkpoint(self.run_dir(settings) / "checkpoint.pt")
                if ckpt["step"] != step:
                    raise RuntimeError(f"{self.run_dir(settings)}: checkpoint at step {ckpt['step']}, expected {step}")
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for name, value in ckpt["trainable"].items():
                        params[name].copy_(value)
                trainable = count_parameters(model)[0]
            evals = {}
            for name, texts in self.texts.items():
                r = evaluate_perplexity(model, tokenizer, texts, ctx=self.mode.eval_ctx, stride=self.mode.eval_stride,
                                        max_tokens=self.mode.eval_tokens, progress=False, desc=name)
                evals[name] = dataclasses.asdict(r)
                self.log(f"  step {step:>4} {name:<12} perplexity {r.perplexity:8.3f}  {r.bits_per_byte:.4f} bits/byte")
            return {"step": step, "tokens": step * self.mode.tokens_per_step, "train_seconds": round(seconds, 1),
                    "trainable": trainable, "eval": evals}
        return self.cache.run("lapt", {**settings, "point": step, "eval": self.eval_settings}, work)

    def curve(self, settings: dict, points) -> list[dict]:
        results = [self.lapt_point(settings, s) for s in sorted(points)]
        total = 0.0
        for r in results:  # training time up to each point (segments were timed one by one)
            total += r["train_seconds"]
            r["train_seconds_total"] = round(total, 1)
        return results

    # ------------------------------------------------------------------------------------------- downstream

    def task_folder(self) -> Path:
        from experiments.klej_task import build_task
        return build_task(datasets.data_dir() / "klej", log=self.log)

    def finetune(self, init: str, seed: int) -> dict:
        """The fortunes task fine-tuned from the base (init 'base') or the base + merged LAPT adapter ('lapt')."""
        from klej import finetune as ft
        from klej.demo import DEMO_CONFIG, TASK
        from klej.tasks import load_task, read_split
        folder = self.task_folder()
        # The epochs spelled out (not None, "the task's"), so that the cache key changes with the demo's recipe.
        cfg = dataclasses.replace(DEMO_CONFIG, seed=seed, epochs=self.mode.ft_epochs or TASK.epochs)
        lapt = self.lapt_settings()
        adapter = self.run_dir(lapt) / "adapter" if init == "lapt" else None
        settings = {"task": {f.name: file_digest(f) for f in sorted(folder.glob("*.tsv"))}, "init": init,
                    "lapt": {**lapt, "point": self.mode.steps} if adapter else None,
                    "config": dataclasses.asdict(cfg), "version": MEASURE_VERSION,
                    "train_per_class": self.mode.ft_train_per_class,
                    "test_examples": self.mode.ft_test_examples,
                    # (only where set: the cached runs of the other modes keep their keys)
                    **({"dev_per_class": self.mode.ft_dev_per_class} if self.mode.ft_dev_per_class else {})}

        def work() -> dict:
            if adapter is not None and not (adapter / "adapter_config.json").exists():
                raise FileNotFoundError(f"{adapter}: the LAPT adapter of the curve's last point is missing; delete "
                                        f"{self.root} and run again")
            data = load_task(TASK, folder, seed=cfg.seed)
            for split, per_class in (("train", self.mode.ft_train_per_class), ("dev", self.mode.ft_dev_per_class)):
                if per_class:   # the first few of each class, so the classes stay balanced
                    part = getattr(data, split)
                    keep = np.sort(np.concatenate([np.flatnonzero(part.y == c)[:per_class]
                                                   for c in range(len(TASK.labels))]))
                    data = dataclasses.replace(data, **{split: part.subset(keep)})
            test = read_split(TASK, folder / "test.tsv")
            if self.mode.ft_test_examples:
                test = test.subset(np.arange(self.mode.ft_test_examples))
            model, tokenizer = ft.load_base(MODEL)
            head = ft.prepare_classifier(model, TASK, cfg, adapter)
            run_dir = self.root / "runs" / f"klej-{digest(settings)}"
            if run_dir.exists():  # an interrupted fine-tuning: start it again rather than mix two processes' state
                shutil.rmtree(run_dir)
            base = {"model": MODEL, "adapter": str(adapter) if adapter else None, "dtype": "float32",
                    "quantize": None}
            result = ft.finetune(head, tokenizer, TASK, data, run_dir, cfg, base, progress=False,
                                 log=lambda *a: None)
            predictions = ft.predict(head, tokenizer, TASK, test, cfg)
            correct = (predictions == test.y).astype(int)
            self.log(f"  fine-tuned from {init}, seed {seed}: test accuracy {correct.mean():.3f} "
                     f"(dev {result['dev']:.3f})")
            return {"init": init, "seed": seed, "dev_accuracy": result["dev"], "test_accuracy": float(correct.mean()),
                    "correct": correct.tolist(), "steps": result["steps"], "train_examples": len(data.train),
                    "test_examples": len(test),
                    "majority": float(np.mean(test.y == np.bincount(data.train.y).argmax()))}
        return self.cache.run("klej", settings, work)

    # ------------------------------------------------------------------------------------------------- all

    def run(self) -> dict:
        m = self.mode
        fp = self.lapt_settings()
        self.log(f"[1/4] LAPT curve: {m.steps} steps of {m.tokens_per_step} tokens, evaluated at {m.points}")
        curve = self.curve(fp, m.points)
        self.log(f"[2/4] downstream: seeds {m.seeds}, from the base and from the LAPT-merged model")
        downstream = {init: [self.finetune(init, s) for s in m.seeds] for init in ("base", "lapt")}
        self.log(f"[3/4] NF4 base at steps {m.nf4_points}")
        nf4 = self.curve(self.lapt_settings(quantize="nf4"), (0, *m.nf4_points))
        self.log(f"[4/4] LoRA ranks {m.ranks} at step {m.rank_point}")
        on_curve = {p["step"]: p for p in curve}
        ranks = {r: on_curve[m.rank_point] if r == 32 and m.rank_point in on_curve else  # the same run, trained once
                 self.curve(self.lapt_settings(r=r), [m.rank_point])[0] for r in m.ranks}
        self.log(f"[+] seed spread: training seeds {m.spread_seeds} at step {m.rank_point} (the curve's is {SEED})")
        spread = {SEED: ranks[32], **{s: self.curve(self.lapt_settings(seed=s), [m.rank_point])[0]
                                      for s in m.spread_seeds}}
        return {"curve": curve, "downstream": downstream, "nf4": nf4, "ranks": ranks, "spread": spread}


def first_words(text: str, chars: int) -> str:
    """The start of `text`, cut at the last space within its first `chars` characters (all of it if shorter)."""
    if len(text) <= chars:
        return text
    cut = text.rfind(" ", 0, chars + 1)
    return text[:cut if cut > 0 else chars]


# ------------------------------------------------------------------------------------------------- statistics

def bootstrap_accuracy(correct: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over seeds (rows) of the accuracy on resampled test examples
    (columns); `correct` may hold differences (lapt - base, paired by example and seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, correct.shape[1], size=(n, correct.shape[1]))
    means = correct[:, idx].mean(axis=(0, 2))                       # [n]: one mean per resample
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def downstream_summary(downstream: dict, n_boot: int) -> dict:
    out = {}
    c = {init: np.array([r["correct"] for r in runs], dtype=float) for init, runs in downstream.items()}
    for init, arr in c.items():
        out[init] = {"mean": float(arr.mean()), "ci": bootstrap_accuracy(arr, n_boot),
                     "seeds": [float(a.mean()) for a in arr]}
    diff = c["lapt"] - c["base"]
    out["diff"] = {"mean": float(diff.mean()), "ci": bootstrap_accuracy(diff, n_boot)}
    out["majority"] = downstream["base"][0]["majority"]
    return out


# ------------------------------------------------------------------------------------------------- the page

def _ppl(point: dict, name: str) -> float:
    return point["eval"][name]["perplexity"]


def _bpb(point: dict, name: str) -> float:
    return point["eval"][name]["bits_per_byte"]


def _not_monotone(curve: list[dict], name: str, what: str) -> str:
    values = [_ppl(p, name) for p in curve]
    if all(b <= a for a, b in zip(values, values[1:])):
        return ""
    low = min(curve, key=lambda p: _ppl(p, name))
    return (f"{what} does not fall steadily: lowest {_ppl(low, name):.2f} at step {low['step']}, "
            f"{values[-1]:.2f} at the end. ")


def _spread(points, name: str) -> float:
    values = [_ppl(p, name) for p in points]
    return max(values) / min(values) - 1


def _versus(difference: float, noise: float) -> str:
    """A single-seed difference read against the seed spread; 3 seeds size the noise roughly, hence the middle band."""
    return ("within the seed spread" if difference <= noise else
            "about the size of the seed spread" if difference <= 2 * noise else "beyond the seed spread")


def _worst_rank(ranks: dict, name: str) -> int:
    return max(ranks, key=lambda r: _ppl(ranks[r], name))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _change(before: float, after: float) -> str:
    return f"{100 * (after / before - 1):+.1f}%"


def write_page(results: dict, mode: Mode, out: Path, command: str, wall: float, cache: Cache) -> Path:
    """docs/results.md (or out/results.md) and its figures in out/results/."""
    out = Path(out)
    figs = out / "results"
    figs.mkdir(parents=True, exist_ok=True)
    curve, nf4, ranks = results["curve"], results["nf4"], results["ranks"]
    base, last = curve[0], curve[-1]
    spread = results["spread"]
    every_run = [*curve, *nf4, *ranks.values(), *results["downstream"]["base"], *results["downstream"]["lapt"],
                 *(p for seed, p in spread.items() if seed != SEED)]
    commits = sorted({r["commit"] for r in every_run})
    ds = downstream_summary(results["downstream"], mode.bootstrap)
    tps = mode.tokens_per_step
    L = []
    w = L.append

    # Figures first: the text refers to them.
    kt = lambda p: p["tokens"] / 1000  # noqa: E731
    line_chart(figs / "lapt-curve.svg", "LAPT of SmolLM2-135M: bits per byte vs tokens trained",
               "tokens trained (thousands)", "bits per byte (lower is better)",
               [Series(SETS[n], [(kt(p), _bpb(p, n)) for p in curve], dashed=n == "en-gnome") for n in SETS])
    line_chart(figs / "polish-perplexity.svg", "Polish perplexity vs tokens trained", "tokens trained (thousands)",
               "perplexity (per SmolLM2 token)",
               [Series(SETS[n], [(kt(p), _ppl(p, n)) for p in curve]) for n in ("pl-test", "pl-fortunes")])
    line_chart(figs / "forgetting.svg", "Forgetting: English perplexity vs tokens of Polish trained",
               "tokens trained (thousands)", "English perplexity (per token)",
               [Series(SETS["en-gnome"], [(kt(p), _ppl(p, "en-gnome")) for p in curve], colour="#2ca02c")])
    bar_chart(figs / "downstream.svg", "Fortunes task: test accuracy after fine-tuning (95% bootstrap CI)",
              "test accuracy", [("from base", ds["base"]["mean"], tuple(ds["base"]["ci"])),
                                ("from LAPT-merged", ds["lapt"]["mean"], tuple(ds["lapt"]["ci"]))],
              reference=("majority class", ds["majority"]))
    line_chart(figs / "nf4.svg", "NF4 vs full-precision base: in-domain Polish perplexity",
               "tokens trained (thousands)", "perplexity, Polish test split",
               [Series("float32 base", [(kt(p), _ppl(p, "pl-test")) for p in curve
                                        if p["step"] in (0, *mode.nf4_points)]),
                Series("NF4 base (QLoRA)", [(kt(p), _ppl(p, "pl-test")) for p in nf4], dashed=True)])
    bar_chart(figs / "lora-rank.svg", f"LoRA rank at {mode.rank_point * tps:,} tokens: Polish test perplexity",
              "perplexity, Polish test split", [(f"r {r}", _ppl(p, "pl-test"), None) for r, p in ranks.items()],
              y_from_zero=True, reference=("base model", _ppl(base, "pl-test")))

    title = {"full": "", "quick": " (quick page)", "toy": " (toy scale: the test's page, not a result)"}[mode.name]
    w(f"# LAPT on the CPU, measured{title}\n")
    w(f"Curie-7B's paper reports that LoRA LAPT on Polish makes an English model good at Polish (perplexity 3.02) and "
      f"that the adapted model fine-tunes well on KLEJ. This page measures the same recipe at small scale "
      f"(SmolLM2-135M from its real Q4_1 GGUF, LoRA r 32 / alpha 64 on every projection and the head, "
      f"`train.py`'s cpu-smollm2 recipe) and what the paper did not: the English it loses, how the gain grows with "
      f"the budget, and whether LAPT itself helps a downstream task.\n")
    if mode.name == "full":
        total = sum(r["wall_seconds"] for r in every_run)
        w(f"This is the full page; `--quick` writes a smaller one ([quick/results.md](quick/results.md)) in at most "
          f"15 minutes. The full page is sized for 90 minutes of runs on 2 cores with AVX-512 bf16. Its runs took "
          f"{_minutes(total)} in all on the machine below"
          + (f", over that budget: this CPU has no AVX-512 bf16, so LAPT trains in float32, at "
             f"{last['tokens'] / last['train_seconds_total']:.0f} tokens/s. The cache makes a long build resumable: "
             f"an interrupted invocation loses at most the run in progress, and a LAPT run resumes from its last "
             f"checkpoint. " if total > 90 * 60 else ". ") + "\n")
    if mode.name != "full":
        at_most = "at most " if mode.eval_chars else ""
        w(f"**This is the `--{mode.name}` page**: the curve stops at {mode.steps} steps ({mode.steps * tps:,} "
          f"tokens, {mode.steps * tps / (60 * 2048):.0%} of the default `train.py` run's 60 x 2048), perplexity is "
          f"scored on {at_most}{mode.eval_tokens:,} tokens per set, and the downstream task uses {len(mode.seeds)} "
          f"seed(s) and {mode.ft_epochs or DEMO_TASK.epochs} epoch(s). "
          f"`python -m experiments.lapt_report` (without `--{mode.name}`) runs the full page "
          f"([results.md](../results.md)): the curve to 4x the "
          f"default budget, 12,000 tokens per set, 3 seeds. With so few tokens per set, a set is a handful of "
          f"documents (the table below says how many): read this page's perplexities as indicative, not as "
          f"measurements of the sets' domains.\n")
    w("| | |\n|---|---|")
    w(f"| command | `{command}` |")
    w(f"| commit | {', '.join(commits)} (of the runs; the cache key leaves the commit out) |")
    w(f"| machine | {machine()} |")
    w(f"| wall time | {_minutes(wall)} for this invocation; {cache.hits} cached and {cache.misses} new runs; "
      f"{_minutes(sum(r['wall_seconds'] for r in every_run))} of runs in all (cached ones as they took) |")
    w(f"| LAPT recipe | {mode.steps} steps x {mode.micro_batch} x {mode.grad_accum} x {mode.seq_len} tokens "
      f"= {mode.steps * tps:,} tokens, AdamW lr {mode.lr}, warm-up {mode.warmup}, cosine to 0.1x, "
      f"{'bf16 autocast' if AUTOCAST == 'bfloat16' else 'float32 (no bf16 autocast: this CPU has no AVX-512 bf16)'}, "
      f"seed {SEED} |")
    scored = (f"the first {mode.eval_chars} characters (cut at a space) of the first document of each set"
              if mode.eval_chars else f"the first {mode.eval_tokens:,} tokens of whole documents of each set")
    w(f"| perplexity | sliding windows of {mode.eval_ctx} (stride {mode.eval_stride}), {scored}, float32 "
      f"(eval_ppl.py) |\n")

    w("Evaluation sets (experiments/datasets.py; none of their text is trained on):\n")
    w("| set | what | documents | tokens scored | bytes |\n|---|---|---:|---:|---:|")
    for n in SETS:
        e = base["eval"][n]
        w(f"| `{n}` | {SETS[n]} | {e['documents']} | {e['tokens']:,} | {e['bytes']:,} |")
    w(f"\nLAPT trains on the corpus's train split without fortunes-pl ({datasets.HELD_OUT} is held out entirely: it "
      f"is the second Polish domain, and the downstream task is built from it).\n")

    # 1. curve
    w("## 1. The LAPT curve\n")
    w(f"![bits per byte vs tokens](results/lapt-curve.svg)\n")
    w(f"*Figure 1. Bits per byte (UTF-8) of the three evaluation sets as LAPT proceeds; tokens trained on the x axis "
      f"(thousands). What to see: whether both Polish lines fall, and how far the held-out domain trails the "
      f"in-domain one; the dashed English line shows what the Polish training costs in English.*\n")
    w("| step | tokens | training time | Polish test ppl | bits/byte | Polish fortunes ppl | bits/byte | "
      "English ppl | bits/byte |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in curve:
        w(f"| {p['step']} | {p['tokens']:,} | {_minutes(p['train_seconds_total'])} | "
          + " | ".join(f"{_ppl(p, n):.2f} | {_bpb(p, n):.3f}" for n in SETS) + " |")
    w("")
    w(f"![Polish perplexity](results/polish-perplexity.svg)\n")
    w(f"*Figure 2. Polish perplexity (per SmolLM2 token) against tokens trained. What to see: how fast the gain "
      f"comes and whether it has flattened by the last point.*\n")
    pt, pf = (_ppl(base, "pl-test"), _ppl(last, "pl-test")), (_ppl(base, "pl-fortunes"), _ppl(last, "pl-fortunes"))
    w(f"Measured: in-domain Polish perplexity {pt[0]:.2f} -> {pt[1]:.2f} ({_change(*pt)}) after "
      f"{last['tokens']:,} tokens; on the held-out domain {pf[0]:.2f} -> {pf[1]:.2f} ({_change(*pf)}). "
      + ("The held-out domain gains less than the in-domain test split: part of the gain is the domain "
         "(man pages and help text), not Polish as such. "
         if pf[1] / pf[0] > pt[1] / pt[0] else
         "The held-out domain gains as much as the in-domain split or more: the gain is Polish, not only the domain. ")
      + ("The held-out domain got worse: LAPT on technical text did not carry over to it. " if pf[1] > pf[0] else "")
      + _not_monotone(curve, "pl-fortunes", "The held-out domain's perplexity")
      + _not_monotone(curve, "pl-test", "The in-domain perplexity")
      + "The curve is one training run (seed " + str(SEED) + "); the next table measures how far another seed moves "
        "its numbers (evaluation itself is deterministic).\n")
    w(f"Run-to-run spread: the curve's recipe trained with {len(spread)} seeds (data order, LoRA initialisation and "
      f"dropout) to step {mode.rank_point} ({mode.rank_point * tps:,} tokens):\n")
    w("| training seed | Polish test ppl | Polish fortunes ppl | English ppl |\n|---|---:|---:|---:|")
    for seed, p in spread.items():
        w(f"| {seed}{' (the curve)' if seed == SEED else ''} | " + " | ".join(f"{_ppl(p, n):.2f}" for n in SETS) + " |")
    spreads = {n: _spread(spread.values(), n) for n in SETS}
    w(f"\nMeasured: across these seeds the perplexities differ by up to "
      + ", ".join(f"{100 * spreads[n]:.1f}% ({SETS_SHORT[n]})" for n in SETS)
      + f" (largest / smallest - 1). Read a difference between two single-seed runs smaller than this as noise; "
        f"{len(spread)} seeds give the size of the noise roughly, not an interval.\n")

    # 2. forgetting
    w("## 2. Forgetting: English\n")
    w(f"![English perplexity](results/forgetting.svg)\n")
    w(f"*Figure 3. Perplexity of English text (gnome-user-docs' English pages, never trained on) against "
      f"tokens of Polish trained. What to see: the cost in English of the Polish gain of "
      f"Figure 2.*\n")
    w("| step | tokens | English ppl | change vs base | English bits/byte |\n|---:|---:|---:|---:|---:|")
    for p in curve:
        w(f"| {p['step']} | {p['tokens']:,} | {_ppl(p, 'en-gnome'):.2f} | "
          f"{_change(_ppl(base, 'en-gnome'), _ppl(p, 'en-gnome'))} | {_bpb(p, 'en-gnome'):.3f} |")
    pe = (_ppl(base, "en-gnome"), _ppl(last, "en-gnome"))
    worst = max(curve, key=lambda p: _ppl(p, "en-gnome"))
    en_seeds = [_ppl(p, "en-gnome") for p in spread.values()]
    w(f"\nMeasured: English perplexity {pe[0]:.2f} -> {pe[1]:.2f} ({_change(*pe)}) at the last point"
      + (f", worst {_ppl(worst, 'en-gnome'):.2f} at step {worst['step']}" if worst not in (base, last) else "")
      + ". "
      + ("English degrades: the paper's recipe trades English for Polish, and it did not measure this. "
         if pe[1] > pe[0] * 1.05 else
         "English barely moves (within 5%). " if pe[1] >= pe[0] * 0.95 else
         "English perplexity fell too: these English pages are the originals of GNOME help pages whose Polish "
         "translations are in the training text, and the help-text domain is shared, so what LAPT learns about "
         "the domain outweighs any forgetting here; English unlike the training text is not measured. ")
      + f"Across the {len(spread)} training seeds of section 1 at step {mode.rank_point}, English perplexity is "
        f"{min(en_seeds):.2f} to {max(en_seeds):.2f} ({_change(pe[0], min(en_seeds))} to "
        f"{_change(pe[0], max(en_seeds))} vs the base)"
      + (": every seed loses English.\n" if min(en_seeds) > pe[0] else
         ": every seed gains in English.\n" if max(en_seeds) < pe[0] else ": the sign depends on the seed.\n"))

    # 3. downstream
    runs = results["downstream"]
    first = runs["base"][0]
    w("## 3. Downstream transfer: does LAPT help fine-tuning?\n")
    w(f"![downstream accuracy](results/downstream.svg)\n")
    w(f"*Figure 4. Test accuracy on the fortunes task (3 classes from fortunes-pl: chuck-norris, pratchett, milosc; "
      f"KLEJ's format, klej/demo.py's recipe: task LoRA r 2 on wq/wv, lr 1e-3, inputs cut to 48 tokens), "
      f"fine-tuned from the base model and from the base with the LAPT adapter of the curve's last point merged, "
      f"mean over {len(mode.seeds)} seed(s); whiskers: 95% bootstrap interval over the {first['test_examples']} "
      f"test examples. Dashed: the majority-class baseline. What to see: whether the bars differ by more than their "
      f"whiskers.*\n")
    w("| initialised from | seed | train examples | steps | dev accuracy | test accuracy |\n"
      "|---|---:|---:|---:|---:|---:|")
    for init in ("base", "lapt"):
        for r in runs[init]:
            w(f"| {'base' if init == 'base' else 'LAPT-merged'} | {r['seed']} | {r['train_examples']} | {r['steps']} | "
              f"{r['dev_accuracy']:.3f} | {r['test_accuracy']:.3f} |")
    d = ds["diff"]
    w(f"\nMean test accuracy: base {ds['base']['mean']:.3f} (95% CI {ds['base']['ci'][0]:.3f}-"
      f"{ds['base']['ci'][1]:.3f}), LAPT-merged {ds['lapt']['mean']:.3f} ({ds['lapt']['ci'][0]:.3f}-"
      f"{ds['lapt']['ci'][1]:.3f}); majority class {ds['majority']:.3f}. Paired difference (LAPT - base, same seeds "
      f"and examples): {100 * d['mean']:+.1f} points, 95% CI {100 * d['ci'][0]:+.1f} to {100 * d['ci'][1]:+.1f}. "
      + ("LAPT helps here: the interval of the difference lies above zero. " if d["ci"][0] > 0 else
         "LAPT hurts here: the interval of the difference lies below zero, against the paper's story. "
         if d["ci"][1] < 0 else
         "The interval of the difference includes zero: at this scale LAPT does not measurably help (or hurt) the "
         "downstream task, so this run does not support the claim that the adaptation itself is what helps. ")
      + "(The bootstrap resamples test examples; the seed-to-seed spread is in the table, not in the interval.)\n")

    # 4. NF4 and rank
    w("## 4. NF4 vs full-precision base; LoRA rank\n")
    w(f"![NF4 vs float32](results/nf4.svg)\n")
    w(f"*Figure 5. In-domain Polish perplexity with the frozen base held in float32 (solid) and in 4-bit NF4 "
      f"(dashed, QLoRA), at step 0 and two budgets of the same schedule. What to see: the gap NF4 opens at step 0 "
      f"and whether training closes it.*\n")
    w("| base | step | tokens | training time | Polish test ppl | Polish fortunes ppl | English ppl |\n"
      "|---|---:|---:|---:|---:|---:|---:|")
    by_step = {p["step"]: p for p in curve}
    for p in nf4:
        for label, q in (("float32", by_step[p["step"]]), ("NF4", p)):
            w(f"| {label} | {q['step']} | {q['tokens']:,} | {_minutes(q['train_seconds_total'])} | "
              + " | ".join(f"{_ppl(q, n):.2f}" for n in SETS) + " |")
    gaps = [_ppl(p, "pl-test") / _ppl(by_step[p["step"]], "pl-test") - 1 for p in nf4]
    w(f"\nMeasured: NF4 raises in-domain perplexity by {100 * gaps[0]:+.1f}% at step 0, "
      + ", ".join(f"{100 * g:+.1f}% at step {p['step']}" for g, p in zip(gaps[1:], nf4[1:]))
      + f". The step-0 gap is the quantisation alone (no training, deterministic evaluation); after training, "
        f"another seed moves this perplexity by up to {100 * spreads['pl-test']:.1f}% (section 1, step "
        f"{mode.rank_point}): "
      + ", ".join(f"the gap at step {p['step']} is {_versus(abs(g), spreads['pl-test'])}"
                  for g, p in zip(gaps[1:], nf4[1:]))
      + ". (The NF4 training time includes quantised matmuls on the CPU, which are not optimised here.)\n")
    w(f"![LoRA rank](results/lora-rank.svg)\n")
    w(f"*Figure 6. In-domain Polish perplexity after {mode.rank_point} steps ({mode.rank_point * tps:,} tokens) "
      f"with LoRA rank 8, 32 and 128 (alpha = 2r, so the same scale alpha/r); dashed: the base model. What to see: "
      f"whether more trainable parameters buy lower perplexity at this budget.*\n")
    w("| rank | trainable parameters | Polish test ppl | Polish fortunes ppl | English ppl | training time |\n"
      "|---:|---:|---:|---:|---:|---:|")
    for r, p in ranks.items():
        w(f"| {r} | {p['trainable']:,} | " + " | ".join(f"{_ppl(p, n):.2f}" for n in SETS)
          + f" | {_minutes(p['train_seconds_total'])} |")
    best = min(ranks, key=lambda r: _ppl(ranks[r], "pl-test"))
    rank_gaps = {n: _spread(ranks.values(), n) for n in SETS}
    worse = [r for r, p in ranks.items() if _ppl(p, "pl-test") > _ppl(base, "pl-test")]
    w(f"\nMeasured: the lowest in-domain perplexity at this budget is rank {best}'s. "
      + (f"Rank {', '.join(map(str, worse))} ended worse than the base model ({_ppl(base, 'pl-test'):.2f}): with "
         f"alpha = 2r the scale is the same, so at the recipe's learning rate ({mode.lr}) a larger rank takes larger "
         f"steps and overshoots; a rank comparison at one learning rate favours small ranks (a learning rate per "
         f"rank, or rsLoRA, is not tried here). " if worse else "")
      + "One seed each, so read the ranks' differences (largest / smallest - 1) against the seed spread of "
        "section 1 at this budget: "
      + "; ".join(f"{SETS_SHORT[n]}, {100 * rank_gaps[n]:.1f}% across ranks vs {100 * spreads[n]:.1f}% across "
                  f"seeds: {_versus(rank_gaps[n], spreads[n])}"
                  + (f" (worst: rank {_worst_rank(ranks, n)})" if rank_gaps[n] > spreads[n] else "")
                  for n in SETS) + ".\n")
    w("---\nWritten by `experiments/lapt_report.py`; rerunning it reuses every finished run "
      f"(`{Path('runs/lapt-report')}`, keyed by each run's settings).\n")
    page = out / "results.md"
    training.atomic_write_text(page, "\n".join(L))
    return page


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a smaller page in <= 15 minutes on 2 cores")
    g.add_argument("--toy", action="store_true", help="the machinery at toy scale (for the test; not results)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of results.md and results/*.svg (default: docs for the full page, docs/quick for "
                        "--quick, runs/lapt-report/toy-page for --toy)")
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "lapt-report",
                   help="run folders and the cache of finished runs")
    args = p.parse_args(argv)
    mode = MODES["quick" if args.quick else "toy" if args.toy else "full"]
    out = args.out or DEFAULT_OUT[mode.name]
    started = time.perf_counter()
    report = Report(mode, args.root / mode.name)
    results = report.run()
    command = "python -m experiments.lapt_report" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    page = write_page(results, mode, out, command, time.perf_counter() - started, report.cache)
    print(f"wrote {page} ({report.cache.hits} cached, {report.cache.misses} new runs, "
          f"{time.perf_counter() - started:.0f} s)")
    return {"page": page, "results": results, "cache": {"hits": report.cache.hits, "misses": report.cache.misses}}


if __name__ == "__main__":
    main()
