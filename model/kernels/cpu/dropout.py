"""Dropout whose mask is a function of a seed: drawn in the forward, rebuilt in the backward, never stored.

    dropout(x, seed, p, dtype) = x * keep(seed) * 1 / (1 - p)    in float32, then rounded once to `dtype`
    keep(seed)[i]              = (draw(seed, i) >> 8) < round((1 - p) 2^24)      (dropout.c spells out `draw`)

Why. A LoRA adapter applies dropout to its input before the A product, and A's gradient needs the dropped-out input
again. nn.Dropout keeps it (a float copy per adapter); a bool mask costs a byte an element; a seed costs nothing,
and in C the mask is as cheap to rebuild as to read. On the CPU one C pass (dropout.c) draws, scales and writes the
product's input in its dtype (bf16 under autocast), where PyTorch takes five passes: a SmolLM2 LoRA step draws 211
masks, and this took ~1.3 s out of a 9 s bf16 step (docs/benchmarks.md). Where the kernel does not run (CUDA,
float64, no C compiler: `seeded` says), LoRA draws and stores a bool mask instead (`random_mask`, `apply_mask`).

Each call takes a fresh 64-bit seed from PyTorch's default generator (`draw_seed`), so `torch.manual_seed` fixes
the masks, a checkpoint's RNG state resumes them, and activation checkpointing (which replays the RNG state)
recomputes the same ones. The probability of keeping is (1 - p) rounded to a multiple of 2^-24.

`dropout_reference` computes the same stream with int64 tensor arithmetic (the path without a C compiler, and what
the tests compare the kernel with, bit for bit).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from model.kernels.cpu.build import CKernel, plain_cpu_tensors

_KINDS = {torch.float32: 0, torch.bfloat16: 1}   # the element types dropout.c reads and writes
_MASK32 = 0xFFFFFFFF


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.dropout_apply.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    lib.dropout_apply.restype = ctypes.c_int
    return lib


KERNEL = CKernel(Path(__file__).with_name("dropout.c"), _open, "dropout")


def draw_seed() -> int:
    """A 64-bit seed from PyTorch's default CPU generator (so manual_seed and saved RNG states govern it)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) ^ int(torch.randint(0, 2, ())) << 63


def keep_below(p: float) -> int:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1]")
    return round((1.0 - p) * (1 << 24))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """dropout.c's 32-bit hash on int64 tensors holding uint32 values (products stay below 2^63: no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def keep_mask(seed: int, shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              first: int = 0) -> torch.Tensor:
    """The bool mask [shape] that `dropout` applies for this seed (elements in row-major order). `first`: the index
    of the mask's first element in the stream (0 for `dropout`; a test reads the stream past 2^32 with it)."""
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(first, first + n, dtype=torch.int64, device=device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    h = _mix(_mix((i & _MASK32) ^ k0) ^ (i >> 32) ^ k1)
    return ((h >> 8) < keep_below(p)).view(shape)


def dropout_reference(x: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """x * keep * 1/(1-p) in float32 (float64 for a float64 x), rounded once to `dtype`: what the kernel computes,
    in PyTorch."""
    keep = keep_mask(seed, x.shape, p, x.device)
    return (x.to(torch.promote_types(x.dtype, torch.float32)) * keep * (1.0 / (1.0 - p) if p < 1 else 0.0)).to(dtype)


def dropout(x: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted dropout of x with the mask of `seed`, returned in `dtype` (a new tensor; no autograd)."""
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    below = keep_below(p)
    lib = KERNEL.library() if _takes(x, dtype) else None
    if lib is None:
        return dropout_reference(x, seed, p, dtype)
    src = x.detach().contiguous()
    out = torch.empty(x.shape, dtype=dtype, device="cpu")
    rc = lib.dropout_apply(ctypes.c_void_p(src.data_ptr()), _KINDS[src.dtype], ctypes.c_void_p(out.data_ptr()),
                           _KINDS[dtype], src.numel(), 0, seed & (2**64 - 1), below, scale, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"dropout kernel refused {src.dtype} -> {dtype}")
    return out


def seeded(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Does dropout of x into `dtype` run in the C kernel? Only there is rebuilding a mask cheaper than keeping it:
    elsewhere (CUDA, float64 or float16, no C compiler) the reference's int64 hash costs ~25 passes over x, and
    LoRA keeps a stored mask instead (`random_mask`, `apply_mask`)."""
    return _takes(x, dtype) and KERNEL.library() is not None


def random_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep-mask shaped like x, each element True with probability 1 - p (uniform floats below 1 - p; on the
    CPU 1.6x faster than `bernoulli_` into a bool tensor)."""
    return torch.rand(x.shape, device=x.device) < 1 - p


def apply_mask(t: torch.Tensor, keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted dropout of t with a stored mask, in `dtype`: kept elements scaled by 1 / (1 - p), the others zero;
    scaled in t's precision and rounded once to `dtype`, as the seeded path and nn.Dropout under autocast do."""
    out = t * keep
    out = out.mul_(1.0 / (1.0 - p)) if p < 1 else out.zero_()
    return out.to(dtype)


def _takes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.dtype in _KINDS and dtype in _KINDS and x.numel() > 0 and plain_cpu_tensors(x)
