"""Causal grouped-query attention for bf16 on the CPU (training under autocast): oneDNN products, a C softmax.

Why. Under bf16 autocast a SmolLM2 LoRA step spends ~2.5 s of ~9 in PyTorch's CPU flash attention (SDPA), which
runs its [block x block] products at ~40-55 GFLOP/s on a core that does ~400 in oneDNN's bf16 GEMM. Here every
product is one large oneDNN GEMM per (sequence, KV head, block of queries), and the elementwise work between them
(softmax forward, the softmax's gradient) is one vectorised C pass each (attention.c), which also writes the
bf16 operands of the next products: about 2x faster than SDPA forward + backward (docs/benchmarks.md).

Shapes and grouping. q [B, H, T, D], k and v [B, Hkv, T, D]; query head h reads KV head h // G (G = H / Hkv). For
one KV head the G query heads are stacked as rows (t, g) of one [T*G, D] matrix, row t*G + g, so a block of query
positions [t0, t1) is a block of rows and a single product serves all G heads.

    forward, per (b, KV head, query block [t0, t1)):     keys 0 .. t1-1 (causal: later keys are never multiplied)
        S   = Q_blk K^T                 float32 (bf16 values, float32 products and sums: as SDPA)    [rows, t1]
        P, lse = softmax(scale S)       C: P in bf16, the row's log-sum-exp in float32
        O_blk = P V                     bf16 GEMM, float32 sums
    backward (FlashAttention-2's, recomputing P from lse instead of storing it):
        S = Q K^T, dP = dO V^T          float32, per query block
        P, dS = P (dP - delta) scale    C, both bf16;  delta = rowsum(P * dP) in float32 (FlashAttention's
                                        rowsum(dO * O) would carry the bf16 rounding of P and O into dP - delta,
                                        a difference that cancels for the first queries: see attention.c)
        dQ_blk = dS_blk K               per query block
        dK_blk = dS[:, blk]^T Q, dV_blk = P[:, blk]^T dO      per key block, over the queries that see it

Arithmetic: the scores and dP are float32 sums of exact products of bf16 values, the softmax float32, P and dS
rounded to bf16 for the products that follow, every sum in float32, outputs rounded once to bf16. SDPA's CPU kernel
rounds the same kinds of operands, but its unnormalised exponentials rather than P: its output is a little more
accurate (ours is within u (sum_j P_j |v_j| + |o|), u = 2^-8, which the tests check row by row, and its largest
error 1.3-1.6x SDPA's). tests/test_cpu_kernels.py checks forward and gradients against float64 and against SDPA's
own error. Only whole-sequence causal attention without a binding sliding window, bf16 q/k/v, CPU,
eager mode; `supports` says when, and kernels.attention sends everything else to SDPA.

Memory: saved for the backward are q, k, v and lse (SDPA also keeps its output); the products' float32 blocks are
transient ([rows, T] per call, BLOCK query positions at a time), and so are the backward's bf16 P and dS of one
(sequence, KV head), [T*G, T] each: hence MAX_BACKWARD_T.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from model.kernels.cpu.build import CKernel, plain_cpu_tensors
from model.kernels.cpu.matmul import matmul_nt

BLOCK = 128   # query positions per block: smaller skips more of the causal triangle, larger makes fewer calls
# The backward holds P and dS of one (sequence, KV head) whole, 2 * 2 * G * T^2 bytes (50 MB at T = 2048, G = 3);
# longer sequences that need gradients go to SDPA, whose memory grows as T.
MAX_BACKWARD_T = 2048

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.attention_softmax_forward.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, _I, ctypes.c_float, _P, ctypes.c_int]
    lib.attention_softmax_backward.argtypes = [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P,
                                               ctypes.c_int]
    lib.attention_softmax_forward.restype = lib.attention_softmax_backward.restype = None
    return lib


KERNEL = CKernel(Path(__file__).with_name("attention.c"), _open, "CPU attention")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None) -> bool:
    """Does attention(q, k, v) take this path? bf16 CPU tensors of one whole sequence, causal with no binding
    window, in eager mode, with the C kernel built."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return False
    t, h, hkv, d = q.shape[-2], q.shape[1], k.shape[1], q.shape[-1]
    if h == 0 or hkv == 0 or h % hkv or d == 0 or t == 0 or k.shape[-2] != t:
        return False
    if t > MAX_BACKWARD_T and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and (sliding_window is None or sliding_window >= t)
            and plain_cpu_tensors(q, k, v) and KERNEL.library() is not None)


def _rows(x: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] -> [B, Hkv, T*G, D] in `dtype`, row t*G + g holding query head (kv * G + g) at position t."""
    b, h, t, d = x.shape
    out = torch.empty(b, h // g, t, g, d, dtype=dtype, device="cpu")
    out.copy_(x.view(b, h // g, g, t, d).transpose(2, 3))
    return out.view(b, h // g, t * g, d)


def _heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """The inverse of `_rows`: [B, H, T, D] with the memory layout of [B, T, H, D] (what the decoder's wo reads
    without a copy). A tensor of its own, not a view: autograd forbids in-place changes to a view a Function returns."""
    b, hkv, tg, d = x.shape
    t, h = tg // g, hkv * g
    out = torch.empty_strided((b, h, t, d), (t * h * d, d, h * d, 1), dtype=x.dtype, device="cpu")
    out.transpose(1, 2).view(b, t, hkv, g, d).copy_(x.view(b, hkv, t, g, d).transpose(1, 2))
    return out


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, contiguous, in one copy (x.float().contiguous() of a transposed view makes two)."""
    return x.to(dtype, memory_format=torch.contiguous_format)


def _blocks(t: int) -> list[tuple[int, int]]:
    return [(t0, min(t, t0 + BLOCK)) for t0 in range(0, t, BLOCK)]


class _CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):   # S must stay float32: autocast would make it bf16
            return _CPUAttention._forward(ctx, q, k, v)

    @staticmethod
    def _forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        scale = d ** -0.5
        lib, threads = KERNEL.library(), torch.get_num_threads()
        q32, k32 = _rows(q, g, torch.float32), _dense(k, torch.float32)
        vc = v.contiguous()
        o = torch.empty(b, hkv, t * g, d, dtype=torch.bfloat16, device="cpu")   # (not the default device)
        lse = torch.empty(b, hkv, t * g, dtype=torch.float32, device="cpu")
        work = torch.empty(threads, t, dtype=torch.float32, device="cpu")
        for bi in range(b):
            for hi in range(hkv):
                for t0, t1 in _blocks(t):
                    rows = slice(t0 * g, t1 * g)
                    s = matmul_nt(q32[bi, hi, rows], k32[bi, hi, :t1])                    # [rows, t1] float32
                    p = torch.empty(s.shape, dtype=torch.bfloat16, device="cpu")
                    lib.attention_softmax_forward(s.data_ptr(), s.stride(0), p.data_ptr(), p.stride(0),
                                                  lse[bi, hi, rows].data_ptr(), s.shape[0], t1, g, t0, scale,
                                                  work.data_ptr(), threads)
                    torch.mm(p, vc[bi, hi, :t1], out=o[bi, hi, rows])                     # [rows, D] bf16
        ctx.save_for_backward(q, k, v, lse)
        ctx.g = g
        return _heads(o, g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):
            return _CPUAttention._backward(ctx, do)

    @staticmethod
    def _backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, lse = ctx.saved_tensors
        g = ctx.g
        b, h, t, d = q.shape
        hkv = k.shape[1]
        scale = d ** -0.5
        lib, threads = KERNEL.library(), torch.get_num_threads()
        do16 = _rows(do, g, torch.bfloat16)
        do32 = do16.float()
        q32, k32, v32 = _rows(q, g, torch.float32), _dense(k, torch.float32), _dense(v, torch.float32)
        q16, k16 = q32.to(torch.bfloat16), k.contiguous()
        cpu = {"device": "cpu"}
        dq = torch.empty(b, hkv, t * g, d, dtype=torch.bfloat16, **cpu)
        dk = torch.empty(b, hkv, t, d, dtype=torch.bfloat16, **cpu)
        dv = torch.empty(b, hkv, t, d, dtype=torch.bfloat16, **cpu)
        p = torch.empty(t * g, t, dtype=torch.bfloat16, **cpu)        # one (sequence, KV head) at a time
        work = torch.empty(threads, t, dtype=torch.float32, **cpu)
        ds = torch.empty(t * g, t, dtype=torch.bfloat16, **cpu)
        for bi in range(b):
            for hi in range(hkv):
                for t0, t1 in _blocks(t):
                    rows = slice(t0 * g, t1 * g)
                    s = matmul_nt(q32[bi, hi, rows], k32[bi, hi, :t1])                   # [rows, t1] float32
                    dp = matmul_nt(do32[bi, hi, rows], v32[bi, hi, :t1])
                    lib.attention_softmax_backward(s.data_ptr(), s.stride(0), dp.data_ptr(), dp.stride(0),
                                                   lse[bi, hi, rows].data_ptr(), p[rows].data_ptr(),
                                                   ds[rows].data_ptr(), p.stride(0), s.shape[0], t1, g, t0, scale,
                                                   work.data_ptr(), threads)
                    torch.mm(ds[rows, :t1], k16[bi, hi, :t1], out=dq[bi, hi, rows])
                for k0, k1 in _blocks(t):
                    rows = slice(k0 * g, t * g)                                           # queries that see them
                    torch.mm(p[rows, k0:k1].T, do16[bi, hi, rows], out=dv[bi, hi, k0:k1])
                    torch.mm(ds[rows, k0:k1].T, q16[bi, hi, rows], out=dk[bi, hi, k0:k1])
        return _heads(dq, g), dk, dv


def attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for bf16 CPU tensors (see `supports`) -> [B, H, T, D] bf16."""
    return _CPUAttention.apply(q, k, v)
