"""The pieces of a training loop that train.py (LAPT) and klej/ (task fine-tuning) share.

No framework: a learning-rate schedule, atomic checkpoints that hold everything a bit-exact resume needs (trainable
weights, optimiser, scheduler, data position, every RNG), a JSONL metrics log that survives a resume, a loss-curve
picture drawn as plain SVG, and the NEFTune embedding noise.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SCHEDULES = ("cosine", "linear", "constant")


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
