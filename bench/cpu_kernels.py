"""The CPU kernels of bf16 LoRA training, each against the PyTorch code it replaces, at a SmolLM2 LoRA step's shapes.

    python bench/cpu_kernels.py            # ~1 minute
    python bench/cpu_kernels.py --threads 2

One row per kernel (model/kernels/cpu/*.c; see docs/benchmarks.md, "LoRA training"), micro-batch 4 x 512 tokens,
the same inputs on both sides, alternated runs, medians:
  attention      attention_cpu (oneDNN products around a C softmax) against SDPA, forward + backward of one layer
                 ([4, 9, 512, 64] queries, 3 KV heads, causal), bf16
  dropout        the seeded C pass (float32 x -> bf16 dropped input) against PyTorch's five (uniform floats,
                 compare, multiply, cast, scale) on one adapter input [4, 512, 576]
  SwiGLU         swiglu.c against the float32-arithmetic PyTorch recompute (SwiGLURecompute), forward +
                 backward, bf16 [4, 512, 1536]
  loss chunk     cross_entropy.c against the PyTorch chunk step, on one chunk of bf16 logits [256, 49152]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import alternate, machine_summary, markdown_table, median, set_threads  # noqa: E402

from model.kernels.cpu import attention as attention_cpu  # noqa: E402
from model.kernels.cpu import cross_entropy, dropout, swiglu  # noqa: E402
from model.kernels.reference import chunk_step_reference  # noqa: E402
from model.kernels.swiglu_recompute import SwiGLURecompute  # noqa: E402


def cases() -> dict[str, dict[str, object]]:
    """name -> {"ours": fn, "theirs": fn}: each fn does the whole timed work once."""
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    q, k, v = (torch.randn(4, 512, n, 64).transpose(1, 2).to(bf16).requires_grad_() for n in (9, 3, 3))
    do = torch.randn(4, 9, 512, 64).to(bf16)

    def attention(fn):
        def run():
            fn(q, k, v).backward(do)
        return run
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731

    x = torch.randn(4, 512, 576)
    seed, p = dropout.draw_seed(), 0.05

    gate, up = (torch.randn(4, 512, 1536).to(bf16).requires_grad_() for _ in range(2))
    dy = torch.randn(4, 512, 1536).to(bf16)

    def swiglu_step(fn):
        def run():
            fn.apply(gate, up).backward(dy)
        return run

    logits = (torch.randn(256, 49152) * 4).to(bf16)
    targets = torch.randint(0, 49152, (256,))
    return {
        "attention forward + backward, [4, 9, 512, 64], bf16": {
            "ours": attention(attention_cpu.attention_cpu), "theirs": attention(sdpa)},
        "LoRA dropout of one input, [4, 512, 576] float32 -> bf16": {
            "ours": lambda: dropout.dropout(x, seed, p, bf16),
            "theirs": lambda: dropout.apply_mask(x, dropout.random_mask(x, p), p, bf16)},
        "SwiGLU forward + backward, [4, 512, 1536], bf16": {
            "ours": swiglu_step(swiglu.SwiGLUCPU), "theirs": swiglu_step(SwiGLURecompute)},
        "loss chunk step, [256, 49152] bf16 logits": {
            "ours": lambda: cross_entropy.chunk_step_cpu(logits.clone(), targets, -100, 0.0, True),
            "theirs": lambda: chunk_step_reference(logits.clone(), targets, -100, 0.0, True)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the other benchmarks)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per side and row (default 7)")
    a = p.parse_args()
    threads = set_threads(a.threads)
    missing = [m.__name__ for m in (attention_cpu, swiglu, cross_entropy, dropout) if m.KERNEL.library() is None]
    if missing:
        sys.exit(f"no C kernel for {', '.join(missing)} (no C compiler?): nothing to compare")
    print(f"machine: {machine_summary(threads)}; {a.runs} alternated runs per side, medians\n")
    rows = []
    for name, sides in cases().items():
        seconds = alternate(sides, a.runs, warmup=2)
        ours, theirs = median(seconds["ours"]), median(seconds["theirs"])
        rows.append([name, f"{ours * 1e3:.2f}", f"{theirs * 1e3:.2f}", f"{theirs / ours:.2f}x"])
    print(markdown_table(["operation (one core)" if threads == 1 else f"operation ({threads} threads)",
                          "C kernel ms", "PyTorch ms", "speed-up"], rows))


if __name__ == "__main__":
    main()
