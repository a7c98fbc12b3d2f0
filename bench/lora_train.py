"""Issue 4: LoRA training speed and peak RAM, ours against transformers + peft, on the real SmolLM2-135M.

    python bench/lora_train.py            # 4 configurations, ~15 minutes on a busy 2-core machine
    python bench/lora_train.py --quick    # smoke run: 32-token sequences, one timed step
    python bench/lora_train.py --profile  # also print where each side's time goes in one step (mb 1, fp32)
    python bench/lora_train.py --malloc pinned --memory-only    # peak RAM nearer the live tensors (see below)

Curie-7B's adapters on both sides: rank 32, alpha 64, dropout 0.05 on q, k, v, o, gate, up, down and the head.
  ours    model.load("smollm2-135m") + lora.inject_lora(model, lora.LoRAConfig.curie())
  theirs  transformers' GGUF loader + peft.get_peft_model(model, LoraConfig(the same numbers and targets)),
          forward with use_cache=False (no KV cache is built while training)
One step, as train.py does it: the same random tokens [micro_batch, 513], forward and loss under the configuration's
autocast (none, or bf16), backward, AdamW on the LoRA parameters only. The loss is each side's own training path:
  ours    model(inputs, targets=targets): the fused head + cross-entropy (model/kernels/chunked_loss.py)
  theirs  cross_entropy(logits.float().flatten(0, 1), targets), what transformers' own `labels=` loss computes
Base weights are float32 in every configuration.

Speed: both models live in this process; per configuration, a warm-up step each, then timed steps alternating
ours / theirs; tokens/s = micro_batch * seq_len / median step time. Peak RAM: per configuration and side, a fresh
child process (`--child`) loads, injects and runs two steps (the second is the first to hold AdamW's state), and
reports its resident high-water mark (VmHWM): over the whole process, and over the steps alone above the RSS it had
before the first step (activations, gradients, optimiser state).

Allocator: glibc serves large buffers with mmap until the first is freed, then raises its threshold (up to 32 MB)
and serves them from its heap, which the forward/backward pattern fragments: resident memory then exceeds the live
tensors by up to ~2x. `--malloc default` (the default) measures what a user gets. `--malloc pinned` pins the
threshold at 1 MiB (mallopt M_MMAP_THRESHOLD) in every process of both sides, so that freed buffers leave at once and
the peak approaches the live tensors: an analysis mode, not a recommendation, as the page faults it causes cost
~75% more time per step (measured, 2 threads). The two sides always run under the same allocator.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# `python bench/X.py` puts bench/ first on sys.path; the scripts import from the repo root instead (bench.common, ...).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (MB, alternate, load_average, machine_summary, markdown_table, median,  # noqa: E402
                          peak_rss, peft_curie, profile_table, report_to_parent, reset_peak_rss, rss, run_child,
                          set_threads, verdict)

SPEED_TARGET, MEMORY_TARGET = 1.5, 0.7
SIDES = ("ours", "theirs")
PRECISIONS = ("fp32", "bf16")


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build(side: str) -> tuple[torch.nn.Module, LossFn, int]:
    """(model in training mode with the Curie adapters, loss(inputs, targets) -> mean loss, vocab size)."""
    if side == "ours":
        import lora
        from model import load
        model, _ = load("smollm2-135m", dtype=torch.float32)
        lora.inject_lora(model, lora.LoRAConfig.curie())
        return model.train(), lambda inputs, targets: model(inputs, targets=targets), model.args.vocab_size
    import transformers

    from model.sources import resolve
    gguf = resolve("smollm2-135m")
    base = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model, loss = peft_curie(base)
    return model, loss, base.config.vocab_size


def make_step(model: torch.nn.Module, loss_fn: LossFn, batch: torch.Tensor, precision: str) -> Callable[[], float]:
    """One optimiser step on `batch` [micro_batch, seq_len + 1] with a fresh AdamW over the trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(inputs, targets)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def random_batch(vocab_size: int, micro_batch: int, seq_len: int) -> torch.Tensor:
    """The same tokens for both sides: a fixed seed, whatever else has drawn random numbers before."""
    return torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_allocator(mode: str) -> None:
    if mode == "pinned":
        import ctypes
        try:
            pinned = ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD = -3 in glibc's malloc.h
        except (OSError, AttributeError):
            pinned = 0
        if not pinned:
            sys.exit("--malloc pinned needs Linux with glibc; use --malloc default")


def child(side: str, micro_batch: int, seq_len: int, precision: str, threads: int, malloc: str) -> None:
    """Load, inject and take two steps in this fresh process; report its memory to the parent."""
    set_allocator(malloc)
    set_threads(threads)
    for library in ("lora", "model") if side == "ours" else ("peft", "transformers"):
        importlib.import_module(library)  # before the baseline, which then includes each side's libraries
    after_imports = rss()
    model, forward, vocab_size = build(side)
    step = make_step(model, forward, random_batch(vocab_size, micro_batch, seq_len), precision)
    peak_before_steps = peak_rss()           # imports and loading (transformers dequantises the GGUF on the way)
    before_steps = reset_peak_rss()
    for _ in range(2):
        step()
    peak_steps = peak_rss()
    report_to_parent({"after_imports": after_imports, "before_steps": before_steps,
                      "peak": max(peak_before_steps, peak_steps), "peak_steps": peak_steps})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 32-token sequences, 1 timed step")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1, see generate.py)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --quick 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side and configuration (default 3)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one step")
    p.add_argument("--malloc", choices=("default", "pinned"), default="default",
                   help="glibc as it is (default), or its mmap threshold pinned at 1 MiB; both sides alike")
    p.add_argument("--memory-only", action="store_true", help="skip the speed measurement")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="configurations to run, of fp32,bf16 (default both; fp32 alone on a CPU without native bf16, "
                        "where bf16 products are emulated and a 512-token step takes minutes)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=argparse.SUPPRESS)
    a = p.parse_args()
    seq_len = a.seq_len or (32 if a.quick else 512)
    if a.child:
        child(a.child, a.micro_batch, seq_len, a.precision, a.threads, a.malloc)
        return
    set_allocator(a.malloc)
    steps = a.steps or (1 if a.quick else 3)
    threads = set_threads(a.threads)
    chosen = a.precisions.split(",")
    if not chosen or set(chosen) - set(PRECISIONS):
        p.error(f"--precisions: a comma-separated list of {', '.join(PRECISIONS)}, got {a.precisions!r}")
    configs = [(mb, precision) for mb in (1, 4) for precision in PRECISIONS if precision in chosen]

    import peft
    import transformers
    print(f"machine: {machine_summary(threads)}; allocator: glibc, mmap threshold {a.malloc}")
    models = {side: build(side) for side in SIDES} if not a.memory_only else {}
    if models:
        counts = {side: trainable_parameters(models[side][0]) for side in SIDES}
        print(f"transformers {transformers.__version__}, peft {peft.__version__}; trainable LoRA parameters: ours "
              f"{counts['ours']:,}, theirs {counts['theirs']:,}; sequence length {seq_len}; 1 warm-up and {steps} "
              f"timed steps per side, alternated, medians reported\n", flush=True)

    speed_rows, memory_rows = [], []
    for mb, precision in configs if models else []:
        label = f"micro-batch {mb}, {'fp32' if precision == 'fp32' else 'fp32 weights + bf16 autocast'}"
        step_fns = {side: make_step(models[side][0], models[side][1], random_batch(models[side][2], mb, seq_len),
                                    precision) for side in SIDES}
        seconds = alternate(step_fns, steps, warmup=1)
        rate = {side: mb * seq_len / median(seconds[side]) for side in SIDES}
        speed_rows.append([label, f"{rate['ours']:.0f}", f"{rate['theirs']:.0f}",
                           f"{rate['ours'] / rate['theirs']:.2f}x", f">= {SPEED_TARGET}x",
                           verdict(rate["ours"] / rate["theirs"], SPEED_TARGET)])
        print(f"{label}: step seconds ours {[round(s, 1) for s in seconds['ours']]}, "
              f"theirs {[round(s, 1) for s in seconds['theirs']]}", flush=True)

    for mb, precision in configs:
        label = f"micro-batch {mb}, {'fp32' if precision == 'fp32' else 'fp32 weights + bf16 autocast'}"
        r = {side: run_child(Path(__file__), ["--child", side, "--micro-batch", str(mb), "--precision", precision,
                                              "--seq-len", str(seq_len), "--threads", str(threads),
                                              "--malloc", a.malloc], timeout=900)
             for side in SIDES}
        ratio = r["ours"]["peak"] / r["theirs"]["peak"]
        memory_rows.append([label, f"{r['ours']['peak'] / MB:.0f}", f"{r['theirs']['peak'] / MB:.0f}",
                            f"{ratio:.2f}x", f"<= {MEMORY_TARGET}x", verdict(ratio, MEMORY_TARGET, False),
                            *(f"{(r[s]['peak_steps'] - r[s]['before_steps']) / MB:.0f}" for s in SIDES),
                            *(f"{r[s]['after_imports'] / MB:.0f} / {r[s]['before_steps'] / MB:.0f}" for s in SIDES)])
        print(f"{label}: peak RAM measured", flush=True)

    if speed_rows:
        print()
        print(markdown_table(["configuration (seq len %d)" % seq_len, "ours tok/s", "theirs tok/s",
                              "ours / theirs", "target", "verdict"], speed_rows))
    print()
    print(markdown_table(["configuration", "ours peak MB", "theirs peak MB", "ours / theirs", "target", "verdict",
                          "ours: steps above pre-step RSS MB", "theirs: steps above pre-step RSS MB",
                          "ours RSS after imports / before steps MB", "theirs RSS after imports / before steps MB"],
                         memory_rows))
    print(f"\nload average at the end: {load_average()}")

    if a.profile and models:
        for side in SIDES:
            step = make_step(models[side][0], models[side][1], random_batch(models[side][2], 1, seq_len), "fp32")
            print(f"\n### {side}, one step (micro-batch 1, fp32)\n{profile_table(step)}")


if __name__ == "__main__":
    main()
