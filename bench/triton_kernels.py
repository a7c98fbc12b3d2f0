"""Benchmark of minicurie's Triton kernels against PyTorch eager and torch.compile, printed as a markdown table.

    python bench/triton_kernels.py               on one CUDA GPU: Mistral-7B training shapes in bf16, under 5 minutes
    python bench/triton_kernels.py --cpu-smoke   anywhere: tiny float32 shapes through Triton's interpreter, only to show
                                          that the script runs (its numbers mean nothing)

Each kernel is timed forward alone ("fwd", under no_grad) and forward + backward ("fwd + bwd", as in training; the
loss has the second only). What the columns mean:
  * RMSNorm, RoPE, SwiGLU are memory-bound: "achieved" is the least traffic that direction must move (each input,
    output and gradient read or written once) divided by the time, and "% of peak" compares it with the bandwidth
    of a large device-to-device copy measured first.
  * Attention and the fused linear cross-entropy are compute-bound: "achieved" is TFLOP/s of the matmul work each
    implementation does (sliding-window attention skips the keys outside the window; the causal SDPA baseline,
    which has no window, does not), against the peak of a large bf16 matmul measured first.
  * "peak memory" is the most CUDA memory allocated during the step beyond the inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Setting:
    device: str
    dtype: str                        # a torch dtype's name, resolved after torch is imported
    tokens: int                       # B * T for the elementwise kernels and the loss
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    attention_lengths: tuple[int, ...]
    sliding_window: int
    copy_elements: int                # float32 elements copied to measure the memory bandwidth
    matmul_size: int                  # square matmul that measures the compute peak
    compile: bool
    reps: int


# Mistral-7B v0.1 training shapes: 8192 tokens per step, dim 4096, hidden 14336, 32 query / 8 KV heads of 128.
CUDA = Setting("cuda", "bfloat16", tokens=8192, dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128,
               vocab_size=32000, attention_lengths=(4096, 16384, 32768), sliding_window=4096,
               copy_elements=2**28, matmul_size=8192, compile=True, reps=10)
# Big enough to cover masked tails and several blocks, small enough for the interpreter (~ms per program).
SMOKE = Setting("cpu", "float32", tokens=24, dim=96, hidden_dim=160, n_heads=4, n_kv_heads=2, head_dim=16,
                vocab_size=1000, attention_lengths=(40,), sliding_window=16,
                copy_elements=2**22, matmul_size=256, compile=False, reps=1)


@dataclass
class Row:
    kernel: str
    shape: str
    implementation: str
    ms: float | None                  # None: the rows that measure the peaks
    achieved: str
    percent_of_peak: str
    peak_memory: str = ""
    direction: str = "fwd + bwd"      # "fwd": the forward alone; "fwd + bwd": one training step of the operation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run tiny shapes through Triton's interpreter on the CPU (checks the script, not speed)")
    cpu_smoke = parser.parse_args().cpu_smoke
    if cpu_smoke:
        # triton.jit picks the interpreter when the kernels are decorated, so this must precede their import.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not cpu_smoke and not torch.cuda.is_available():
        print("bench/triton_kernels.py needs CUDA (no GPU found): nothing measured. "
              "Run with --cpu-smoke to check the script through Triton's interpreter.")
        return 0
    setting = SMOKE if cpu_smoke else CUDA
    rows = run(setting)
    print_table(rows, setting)
    return 0


def run(s: Setting, on_row: Callable[[Row], None] | None = None, deadline: float | None = None) -> list[Row]:
    """Every measurement of the table, most wanted first: the peaks, ours and eager PyTorch for each kernel, then
    the torch.compile rows (each costs a compilation). on_row(row) sees each row as soon as it is measured (so a
    caller killed at its time limit keeps what was done); past `deadline` (time.monotonic()) the rest is skipped."""
    import torch
    import torch.nn.functional as F

    from model.kernels.chunked_loss import linear_cross_entropy_fused
    from model.kernels.reference import (apply_rope_reference, linear_cross_entropy_reference, rms_norm_reference,
                                        swiglu_reference)
    from model.kernels.triton.flash_attention import flash_attention
    from model.kernels.triton.rms_norm import rms_norm_triton
    from model.kernels.triton.rope import apply_rope_triton
    from model.kernels.triton.swiglu import swiglu_triton

    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    torch.manual_seed(0)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(step: Callable[[], object]) -> float:
        for _ in range(2):                          # compile, autotune, warm the allocator
            step()
        sync()
        start = time.perf_counter()
        for _ in range(s.reps):
            step()
        sync()
        return (time.perf_counter() - start) / s.reps * 1e3

    def peak_memory(step: Callable[[], object]) -> str:
        if device.type != "cuda":
            return "n/a on CPU"
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        return f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB"

    def forward_backward(op: Callable, inputs: list[torch.Tensor], wrt: list[torch.Tensor],
                         grad_out: torch.Tensor | None = None) -> Callable[[], None]:
        """One training step of op; grad_out None: op returns a scalar loss."""
        # autograd.grad, not .backward(): accumulating into .grad would add a read and a write per step.
        def step() -> None:
            torch.autograd.grad(op(*inputs), wrt, grad_out)
        return step

    def forward_only(op: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                op(*inputs)
        return step

    # Peaks: a large copy reads and writes every byte; a large square matmul does 2 n^3 flops.
    def measure_copy_gbps() -> float:
        src = torch.randn(s.copy_elements, device=device)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / time_ms(lambda: dst.copy_(src)) / 1e6

    def measure_matmul_tflops() -> float:
        a = torch.randn(s.matmul_size, s.matmul_size, device=device, dtype=dtype)
        return 2 * s.matmul_size ** 3 / time_ms(lambda: a @ a) / 1e9

    copy_gbps, matmul_tflops = measure_copy_gbps(), measure_matmul_tflops()
    add(Row("copy (peak bandwidth)", f"{s.copy_elements * 4 / 2**20:.0f} MiB", "torch", None,
            f"{copy_gbps:.0f} GB/s", "100%", direction=""))
    add(Row("matmul (peak compute)", f"{s.matmul_size}^3 {s.dtype}", "torch", None,
            f"{matmul_tflops:.1f} TFLOP/s", "100%", direction=""))

    size = torch.finfo(dtype).bits // 8
    later: list[Callable[[], None]] = []   # the torch.compile rows, measured after everything else

    def memory_bound(kernel: str, shape: str, ours: Callable, reference: Callable, inputs: list[torch.Tensor],
                     wrt: list[torch.Tensor], bytes_forward: int, bytes_step: int) -> None:
        """Rows for ours and eager now, torch.compile's later; bytes_*: the least traffic of each direction."""
        grad_out = torch.randn_like(inputs[0])

        def measure(name: str, op: Callable) -> None:
            for direction, step, nbytes in (("fwd", forward_only(op, inputs), bytes_forward),
                                            ("fwd + bwd", forward_backward(op, inputs, wrt, grad_out), bytes_step)):
                if out_of_time():
                    return
                ms = time_ms(step)
                gbps = nbytes / ms / 1e6
                add(Row(kernel, shape, name, ms, f"{gbps:.0f} GB/s", f"{100 * gbps / copy_gbps:.0f}%",
                        direction=direction))
        measure("triton (ours)", ours)
        measure("torch eager", reference)
        if s.compile:
            later.append(lambda: measure("torch.compile", torch.compile(reference)))

    # RMSNorm: forward reads x, writes y; backward reads dy and x, writes dx (the weight is negligible).
    x = torch.randn(s.tokens, s.dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(s.dim, device=device, dtype=dtype, requires_grad=True)
    eps = 1e-5
    memory_bound("RMSNorm", f"[{s.tokens}, {s.dim}]", lambda x, w: rms_norm_triton(x, w, eps),
                 lambda x, w: rms_norm_reference(x, w, eps), [x, w], [x, w], 2 * x.numel() * size,
                 5 * x.numel() * size)

    # RoPE on the queries: forward reads and writes x, backward reads dy and writes dx (tables are negligible).
    q = torch.randn(1, s.tokens, s.n_heads, s.head_dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(s.tokens, s.head_dim // 2, device=device) * 100
    cos, sin = angles.cos(), angles.sin()
    memory_bound("RoPE (q)", f"[1, {s.tokens}, {s.n_heads}, {s.head_dim}]", apply_rope_triton, apply_rope_reference,
                 [q, cos, sin], [q], 2 * q.numel() * size, 4 * q.numel() * size)

    # SwiGLU: forward reads gate and up, writes out; backward reads dy, gate, up, writes d gate and d up.
    gate = torch.randn(s.tokens, s.hidden_dim, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(s.tokens, s.hidden_dim, device=device, dtype=dtype, requires_grad=True)
    memory_bound("SwiGLU", f"[{s.tokens}, {s.hidden_dim}]", swiglu_triton, swiglu_reference, [gate, up],
                 [gate, up], 3 * gate.numel() * size, 8 * gate.numel() * size)

    # Attention: 4 D flops per visible (query, key) pair and head forward, 2.5x that backward (FlashAttention-2's
    # count). Ours visits min(i + 1, W) keys for query i; causal SDPA visits i + 1.
    def attention_flops(t: int, window: int | None, direction: str) -> float:
        visible = sum(min(i + 1, window or t) for i in range(t))
        return (1.0 if direction == "fwd" else 3.5) * 4 * s.head_dim * s.n_heads * visible

    for t in s.attention_lengths:
        if out_of_time():
            break
        q = torch.randn(1, s.n_heads, t, s.head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, s.n_kv_heads, t, s.head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, s.n_kv_heads, t, s.head_dim, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn_like(q)
        shape = f"T={t}, W={s.sliding_window}, {s.n_heads}/{s.n_kv_heads} heads x {s.head_dim}"
        for name, op, window in (
                ("triton flash (ours), windowed", lambda q, k, v: flash_attention(q, k, v, s.sliding_window),
                 s.sliding_window),
                # K/V heads repeated for the query groups inside the step (counted in its time and memory), so
                # every SDPA backend accepts the shapes and none falls back to a [T, T] score matrix.
                ("SDPA is_causal (no window)", lambda q, k, v: F.scaled_dot_product_attention(
                    q, k.repeat_interleave(s.n_heads // s.n_kv_heads, 1),
                    v.repeat_interleave(s.n_heads // s.n_kv_heads, 1), is_causal=True), None)):
            for direction, step in (("fwd", forward_only(op, [q, k, v])),
                                    ("fwd + bwd", forward_backward(op, [q, k, v], [q, k, v], grad_out))):
                if out_of_time():
                    break
                ms = time_ms(step)
                tflops = attention_flops(t, window, direction) / ms / 1e9
                add(Row("attention", shape, name, ms, f"{tflops:.1f} TFLOP/s",
                        f"{100 * tflops / matmul_tflops:.0f}%", peak_memory(step), direction=direction))
        del q, k, v, grad_out

    # Linear + cross-entropy: three [N, D] x [D, V] matmuls (logits, d h, d weight) of 2 N D V flops each.
    h = torch.randn(s.tokens, s.dim, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(s.vocab_size, s.dim, device=device) / s.dim ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, s.vocab_size, (s.tokens,), device=device)
    shape = f"N={s.tokens}, D={s.dim}, V={s.vocab_size}"
    flops = 3 * 2 * s.tokens * s.dim * s.vocab_size

    def loss_row(name: str, op: Callable) -> None:
        if out_of_time():
            return
        step = forward_backward(op, [h, weight], [h, weight])
        ms = time_ms(step)
        tflops = flops / ms / 1e9
        add(Row("linear + cross-entropy", shape, name, ms, f"{tflops:.1f} TFLOP/s",
                f"{100 * tflops / matmul_tflops:.0f}%", peak_memory(step)))

    loss_row("fused, triton step (ours)", lambda h, w: linear_cross_entropy_fused(h, w, targets, use_triton=True))
    loss_row("fused, torch step (ours, CPU path)", lambda h, w: linear_cross_entropy_fused(h, w, targets))
    loss_row("unfused, torch eager", lambda h, w: linear_cross_entropy_reference(h, w, targets))
    if s.compile:
        later.append(lambda: loss_row("unfused, torch.compile",
                                      torch.compile(lambda h, w: linear_cross_entropy_reference(h, w, targets))))
    for measure_compiled in later:
        if out_of_time():
            break
        measure_compiled()
    return rows


def print_table(rows: list[Row], s: Setting) -> None:
    import torch
    device = torch.cuda.get_device_name() if s.device == "cuda" else "CPU, Triton interpreter (smoke run only)"
    print(f"\nminicurie kernels, forward and forward + backward, {s.dtype}, {device}\n")
    print("| kernel | shape | implementation | pass | ms | achieved | % of peak | peak memory |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        ms = "" if r.ms is None else f"{r.ms:.3f}"
        print(f"| {r.kernel} | {r.shape} | {r.implementation} | {r.direction} | {ms} | {r.achieved} | "
              f"{r.percent_of_peak} | {r.peak_memory} |")


if __name__ == "__main__":
    sys.exit(main())
