"""The matrix products on the CPU: F.linear (PyTorch's BLAS, MKL in the x86 builds) against `kernels.linear` (oneDNN).

    python bench/linear.py            # ~1 minute
    python bench/linear.py --threads 2

Why this matters: every CPU benchmark of this project spends most of its time in these products (SmolLM2-135M:
~90% of perplexity scoring, ~80% of a decode step, ~65% of a LoRA step), and which library runs them is a property
of the CPU, not of our code. MKL chooses its code by the CPU's vendor (AVX2 code on AMD CPUs, even those with
AVX-512); oneDNN by the instruction sets the CPU reports. Run this first on a new machine: where the two columns
are equal, `kernels.linear` changes nothing there.

Shapes are SmolLM2-135M's (dim 576, hidden 1536, 3 KV heads of 64, vocab 49152), float32, one weight in memory
per product as in the model: compute-bound rows (a 2048-token LoRA step or scoring window, forward and the two
backward products) report GFLOP/s; decode rows (1 and 7 tokens through every weight of the model, one step with
and without 6 speculative guesses) report the GB/s of weights read. Each row: alternated runs, medians.
A second table times the decode products of the real SmolLM2 GGUF both ways: oneDNN on the float32 weights, and
the block kernel on the file's own Q4_1 / Q8_0 blocks (model/kernels/cpu/gguf_blocks.py).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import alternate, machine_summary, markdown_table, median, set_threads  # noqa: E402
from model.kernels.cpu.matmul import matmul_nt, use_onednn  # noqa: E402

DIM, HIDDEN, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
BLOCK_SHAPES = [(DIM, DIM), (KV, DIM), (KV, DIM), (DIM, DIM), (HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the other benchmarks)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-blocks", action="store_true", help="skip the GGUF block kernel table (needs SmolLM2)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    print(f"machine: {machine_summary(threads)}")
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    print(f"F.linear's BLAS in this PyTorch build: {blas.group(1) if blas else 'unknown'}")
    if not use_onednn(torch.empty(1), torch.empty(1, 1)):
        print("this PyTorch build has no oneDNN linear op: kernels.linear is F.linear here")
        return
    g = torch.Generator().manual_seed(0)
    rows = []

    def compare(name: str, work: float, unit: str, ours, theirs) -> None:
        s = alternate({"mkl": theirs, "onednn": ours}, args.runs)
        a, b = work / median(s["onednn"]), work / median(s["mkl"])
        rows.append([name, f"{b:.1f}", f"{a:.1f}", unit, f"{a / b:.2f}x"])

    n = 2048
    for out_f, in_f in [(HIDDEN, DIM), (DIM, HIDDEN), (DIM, DIM), (KV, DIM)]:
        x, w = torch.randn(n, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
        dy = torch.randn(n, out_f, generator=g)
        flops = 2 * n * in_f * out_f / 1e9
        compare(f"y = x @ W.T, x [{n}, {in_f}], W [{out_f}, {in_f}]", flops, "GFLOP/s",
                lambda: matmul_nt(x, w), lambda: F.linear(x, w))
        compare(f"dx = dy @ W, dy [{n}, {out_f}]", flops, "GFLOP/s",
                lambda: matmul_nt(dy, w.T), lambda: dy @ w)
        compare(f"dW = dy.T @ x [{out_f}, {in_f}]", flops, "GFLOP/s",
                lambda: matmul_nt(dy.T, x.T), lambda: dy.T @ x)
    weights = [torch.randn(o, i, generator=g) for _ in range(LAYERS) for o, i in BLOCK_SHAPES]
    weights.append(torch.randn(VOCAB, DIM, generator=g))
    gb = sum(w.numel() for w in weights) * 4 / 1e9
    for t in (1, 7):
        xs = {i: torch.randn(t, i, generator=g) for i in (DIM, HIDDEN)}
        compare(f"decode: {t} token(s) through all {len(weights)} weights ({gb * 1e3:.0f} MB)", gb, "GB/s",
                lambda: [matmul_nt(xs[w.shape[1]], w) for w in weights],
                lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
    print(markdown_table(["product (float32)", "F.linear (MKL)", "kernels.linear (oneDNN)", "unit", "oneDNN / MKL"],
                         rows))
    if not args.no_blocks:
        gguf_blocks_table(args.runs)


def gguf_blocks_table(runs: int) -> None:
    """Decode products of the real SmolLM2 GGUF: oneDNN on the float32 weights vs the block kernel on the file's
    Q4_1 / Q8_0 blocks (model/kernels/cpu/gguf_blocks.py), the same weights; time per pass over all 211 products."""
    from model import load
    from model.gguf_linear import GGUFLinear
    from model.kernels.cpu import gguf_blocks
    model, _ = load("smollm2-135m", require_tokenizer=False)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    if not layers:
        print("\nno GGUF block kernel here (no C compiler?): nothing to compare")
        return
    for m in layers:   # the float32 weight beside the blocks, for this comparison only
        m.weight, m.gguf_blocks = m.dequantize(), m.blocks
    dense_mb = sum(m.weight.nbytes for m in layers) / 1e6
    blocks_mb = sum(m.gguf_blocks.nbytes() for m in layers) / 1e6
    print(f"\nSmolLM2-135M's GGUF: {len(layers)} products, float32 weights {dense_mb:.0f} MB, "
          f"blocks {blocks_mb:.0f} MB")
    g = torch.Generator().manual_seed(1)
    rows = []
    for t in (1, 2, 4, 7):
        xs = {i: torch.randn(t, i, generator=g) for i in (DIM, HIDDEN)}
        with torch.no_grad():
            worst = 0.0
            for m in layers:
                dense = matmul_nt(xs[m.in_features], m.weight)
                diff = (gguf_blocks.matmul(xs[m.in_features], m.gguf_blocks) - dense).abs().max()
                worst = max(worst, (diff / dense.abs().max()).item())
            s = alternate({"dense": lambda: [matmul_nt(xs[m.in_features], m.weight) for m in layers],
                           "blocks": lambda: [gguf_blocks.matmul(xs[m.in_features], m.gguf_blocks)
                                              for m in layers]}, runs)
        a, b = median(s["dense"]), median(s["blocks"])
        rows.append([f"decode: {t} token(s) through all {len(layers)} weights", f"{a * 1e3:.2f}",
                     f"{b * 1e3:.2f}", f"{dense_mb / 1e3 / a:.1f} / {blocks_mb / 1e3 / b:.1f}", f"{a / b:.2f}x",
                     f"{worst:.1e}"])
    print(markdown_table(["product (float32)", "oneDNN, float32 weights (ms)", "GGUF blocks (ms)",
                          "GB/s read, dense / blocks", "speed-up", "max |diff| / max |y|"], rows))


if __name__ == "__main__":
    main()
