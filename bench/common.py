"""What every CPU benchmark here shares: fair timing, peak RAM of a fresh process, the machine, a markdown table.

The rules these helpers enforce (the project guide's):
  * ours and the reference run side by side in ONE process, on the same inputs, dtype and thread count;
  * their runs ALTERNATE (ours, theirs, ours, theirs, ...), so a burst of load from the other users of a shared
    machine slows both alike instead of one of them; we report MEDIANS, which one bad run cannot move;
  * peak RAM is read in a fresh child process per measurement, never in the parent, whose high-water mark holds
    everything it ever did (both models, earlier measurements). The child reports Linux's VmHWM (resident
    high-water mark) after resetting it once its imports are done, so import peaks do not count twice.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
_RESULT_PREFIX = "BENCH-RESULT "  # marks the child's result line among whatever else it prints


# ------------------------------------------------------------------------------------------------------ timing

def set_threads(n: int) -> int:
    """Give torch n intra-op threads, the same for ours and theirs; returns n, to record with the figures."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def alternate(candidates: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each candidate: `warmup` untimed rounds, then `runs` timed rounds, each round
    calling every candidate once in turn (ours, theirs, ours, theirs, ...)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def profile_table(fn: Callable[[], object], row_limit: int = 12) -> str:
    """torch.profiler's operators of one call of fn, by self CPU time: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


# ---------------------------------------------------------------------------------------- peak RAM of a child

def _proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status ('VmRSS', 'VmHWM'), in bytes (the file gives kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: peak RAM needs Linux")


def rss() -> int:
    """Resident bytes of this process now."""
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int:
    """Resident high-water mark of this process (since it started, or since the last reset_peak_rss)."""
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> int:
    """Start the high-water mark afresh from the current RSS (Linux >= 4.0: write 5 to clear_refs); returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss()


def report_to_parent(result: dict) -> None:
    """A child's last word: its result, one JSON line on stdout, for run_child to find."""
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, args: Sequence[str], timeout: float) -> dict:
    """Run `python script *args` in a fresh process and return the dict it passed to report_to_parent."""
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{script.name} {' '.join(args)}: child still running after {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)}: child failed (exit code {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-3000:]}")
    return json.loads(lines[-1].removeprefix(_RESULT_PREFIX))


# ------------------------------------------------------------------------------------------------ reporting

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_summary(threads: int) -> str:
    """One line to print above the figures: what ran them, when, and how busy the machine was."""
    import numpy
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; CPU {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, numpy {numpy.__version__}, "
            f"Python {platform.python_version()}; torch threads {threads}; load average (1/5/15 min) "
            f"{load_average()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given, so format them before."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    passed = ratio >= target if higher_is_better else ratio <= target
    return "pass" if passed else "FAIL"


def load_smollm2_both(dtype: torch.dtype = torch.float32) -> tuple:
    """(ours, our tokenizer, transformers' model): the same SmolLM2-135M GGUF, in `dtype`, on both sides. Ours as
    `model.load` gives it (float32: its linear layers hold the file's blocks, model/gguf_linear.py)."""
    import transformers

    from model import load
    from model.sources import resolve
    gguf = resolve("smollm2-135m")
    ours, tokenizer = load(gguf, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                dtype=dtype).eval()
    return ours, tokenizer, theirs


def load_float_weights(source, dtype: torch.dtype = torch.float32, **kwargs) -> tuple:
    """Ours accelerated but with float weights alone (no GGUF blocks): the plain model, then `model.fast.apply`,
    as theirs runs (every linear a float nn.Linear)."""
    from model import fast, load
    model, tokenizer = load(source, dtype=dtype, fast=False, **kwargs)
    return fast.apply(model), tokenizer


PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def peft_curie(base: torch.nn.Module) -> tuple[torch.nn.Module, Callable]:
    """The reference side of a LoRA benchmark: peft's LoRA with Curie's settings (r 32, alpha 64, dropout 0.05, the
    seven projections and the head) on a transformers model, in training mode, and loss(inputs, targets) as
    transformers' own labels= path computes it (float32 logits, mean cross-entropy)."""
    import peft
    import torch.nn.functional as F
    config = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=PEFT_TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config).train()

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return model, loss
