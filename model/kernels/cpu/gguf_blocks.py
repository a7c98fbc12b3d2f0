"""A GGUF's own 4- and 8-bit blocks: y = x @ W.T for a few rows of x, read from the blocks; W itself for many.

Why. One decode step multiplies a single token's activations by every weight of the model, so it is bound by how
fast the weights stream from memory, not by arithmetic: SmolLM2-135M dequantised to float32 is 538 MB per token.
The GGUF it came from holds the same weights in 32-value blocks of 4 or 8 bits plus fp16 scales (Q4_1: 5 bits a
weight), and rebuilding a weight from its block costs less than reading its float32 copy. So a product with at
most `MAX_ROWS` rows of x (a decode or speculative step) reads the blocks (`matmul`); a product of many rows
(prefill, scoring, training), bound by arithmetic, multiplies by W dequantised into a reused buffer
(`dequantize_into`), which costs a pass over W per call. GGUFLinear (model/gguf_linear.py) holds the blocks
instead of a float32 weight and picks between the two; docs/benchmarks.md has the timings.

Same arithmetic. Each weight is rebuilt in float32 exactly as the dequantiser builds it (d * code + m: the product
is exact, so the single rounding is the same), then multiplied and summed in float32. The result differs from
x @ W.T on the dequantised W only in the order of the additions, as any two GEMMs differ; `dequantize_into`
writes the very values of the file's float32 dequantisation (model/gguf.py), bit for bit.

    Q4_0   W = d * (code - 8)     stored as code 0..15, m = -8 d (d * code - 8 d is d * (code - 8) exactly;
                                  only a zero may come out +0.0 instead of -0.0)
    Q4_1   W = d * code + m
    Q8_0   W = d * code           code -128..127

Other GGUF types (k-quants, F16, ...) load as float32 weights.

The kernels are ~200 lines of C (gguf_blocks.c: AVX-512, AVX2 or plain C, OpenMP over the rows of W), compiled
once with the system's C compiler (`$CC`, default `cc`) into the cache folder (`<cache>/kernels/`) and called
through ctypes. Without a compiler the loader keeps float32 weights instead of blocks; with
MINICURIE_KERNELS=reference every product dequantises W in PyTorch (`dequantize`) and multiplies with F.linear.
`reference_matmul` and `dequantize` below are the PyTorch references the tests compare the kernels with.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.gguf import GGML_TYPES, _f16
from model.kernels.cpu import build as _cbuild
from model.kernels._switch import current_mode
from model.kernels.cpu.matmul import eager_only

QK = 32          # values per block
MAX_ROWS = 8     # rows of x the kernel takes per call (gguf_blocks.c's MAX_X); more rows go to oneDNN's GEMM
BLOCK_TYPES = {t: GGML_TYPES[t][0] for t in (2, 3, 8)}   # ggml type id -> name (Q4_0, Q4_1, Q8_0): kept as blocks

_SOURCE = Path(__file__).with_name("gguf_blocks.c")


@dataclass
class Blocks:
    """W [n_out, k] as 32-value blocks (layout in gguf_blocks.c)."""
    bits: int                 # 4 or 8
    codes: torch.Tensor       # uint8 [n_out, k/2] (4-bit, two codes a byte) or int8 [n_out, k] (8-bit)
    d: torch.Tensor           # float32 [n_out, k/32]
    m: torch.Tensor | None    # float32 [n_out, k/32] (4-bit only)

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.d, self.m) if t is not None)


def pack(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> Blocks:
    """A GGUF tensor's bytes (uint8 [n_blocks * type_size]) of type Q4_0, Q4_1 or Q8_0 -> Blocks of `shape`."""
    n_out, k = shape
    if ggml_type not in BLOCK_TYPES:
        raise ValueError(f"ggml type id {ggml_type} is not kept as blocks (only {', '.join(BLOCK_TYPES.values())})")
    if k % QK:
        raise ValueError(f"rows of {k} values are not whole blocks of {QK}")
    name, _, type_size = GGML_TYPES[ggml_type]
    if raw.numel() != n_out * k // QK * type_size:
        raise ValueError(f"{name} {shape}: expected {n_out * k // QK * type_size} bytes, got {raw.numel()}")
    b = raw.reshape(n_out, k // QK, type_size)
    d = _f16(b[..., 0:2]).squeeze(-1)                                   # float32 [n_out, k/32]
    if name == "Q8_0":
        return Blocks(8, b[..., 2:].contiguous().view(torch.int8).reshape(n_out, k), d, None)
    m = _f16(b[..., 2:4]).squeeze(-1) if name == "Q4_1" else -8 * d
    first = 4 if name == "Q4_1" else 2
    return Blocks(4, b[..., first:].contiguous().reshape(n_out, k // 2), d, m)


def dequantize(blocks: Blocks) -> torch.Tensor:
    """Blocks -> the float32 W [n_out, k] they stand for, in PyTorch (the dequantiser's arithmetic)."""
    n_out, k = blocks.shape
    if blocks.bits == 8:
        return (blocks.codes.view(n_out, k // QK, QK).float() * blocks.d[..., None]).reshape(n_out, k)
    c = blocks.codes.view(n_out, k // QK, QK // 2)
    codes = torch.cat((c & 15, c >> 4), dim=-1).float()   # low nibbles are values 0-15 of a block, high 16-31
    return (codes * blocks.d[..., None] + blocks.m[..., None]).reshape(n_out, k)


def reference_matmul(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """x [..., k] @ W.T -> [..., n_out], W dequantised: what `matmul` computes, in plain PyTorch."""
    return F.linear(x, dequantize(blocks))


# ----------------------------------------------------------------------------------------------------- the kernel

def compile_library(flags: list[str], target: Path) -> str | None:
    """Compile gguf_blocks.c with `flags` into `target` (atomically). -> None, or the error (see _cbuild.py)."""
    return _cbuild.compile_library(_SOURCE, flags, target)


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for fn, n_ptr in (("gguf_blocks_matmul_q4", 5), ("gguf_blocks_matmul_q8", 4)):
        getattr(lib, fn).argtypes = [ctypes.c_void_p] * n_ptr + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                                  ctypes.c_int]
        getattr(lib, fn).restype = ctypes.c_int
    for fn, n_ptr in (("gguf_blocks_dequantize_q4", 4), ("gguf_blocks_dequantize_q8", 3)):
        getattr(lib, fn).argtypes = [ctypes.c_void_p] * n_ptr + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        getattr(lib, fn).restype = ctypes.c_int
    return lib


KERNEL = _cbuild.CKernel(_SOURCE, open_library, "GGUF block kernel",
                         unavailable="GGUF block kernel unavailable, decoding from float32 weights instead")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (said once, as a warning)."""
    return KERNEL.library()


def takes(x: torch.Tensor, k: int) -> bool:
    """Does y = x @ W.T (W: [n_out, k] blocks) go to the block kernel? Small float32 CPU products outside autograd
    and autocast (and outside torch.func transforms, forward-mode AD and torch.compile traces, whose tensors a C
    function cannot see through), unless MINICURIE_KERNELS=reference or the kernel cannot be built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() > 0 and x.shape[-1] == k
            and 0 < x.numel() // k <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.is_autocast_enabled("cpu") and eager_only() and current_mode() != "reference"
            and library() is not None)


def matmul(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """x [..., k] (at most MAX_ROWS rows) @ W.T -> float32 [..., n_out], from the blocks."""
    n_out, k = blocks.shape
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n_out, dtype=torch.float32, device="cpu")   # not the default dtype / device
    lib, p = library(), ctypes.c_void_p
    if blocks.bits == 4:
        rc = lib.gguf_blocks_matmul_q4(p(blocks.codes.data_ptr()), p(blocks.d.data_ptr()), p(blocks.m.data_ptr()),
                                       p(x2.data_ptr()), p(y.data_ptr()), n_out, k, x2.shape[0],
                                       torch.get_num_threads())
    else:
        rc = lib.gguf_blocks_matmul_q8(p(blocks.codes.data_ptr()), p(blocks.d.data_ptr()), p(x2.data_ptr()),
                                       p(y.data_ptr()), n_out, k, x2.shape[0], torch.get_num_threads())
    if rc:
        raise RuntimeError(f"gguf_blocks kernel refused {x2.shape[0]} rows")
    return y.view(*x.shape[:-1], n_out)


def dequantize_into(blocks: Blocks, out: torch.Tensor) -> torch.Tensor:
    """`dequantize(blocks)` written into `out` (float32 [n_out, k], CPU, contiguous), bit for bit, by the C kernel
    (both threads) without allocating; where it cannot be built, or MINICURIE_KERNELS=reference, in PyTorch."""
    n_out, k = blocks.shape
    if tuple(out.shape) != (n_out, k) or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device.type != "cpu":
        raise ValueError(f"dequantize_into: expected a contiguous float32 CPU tensor of shape {(n_out, k)}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    lib = library() if current_mode() != "reference" else None
    if lib is None:
        return out.copy_(dequantize(blocks))
    p = ctypes.c_void_p
    if blocks.bits == 4:
        rc = lib.gguf_blocks_dequantize_q4(p(blocks.codes.data_ptr()), p(blocks.d.data_ptr()),
                                           p(blocks.m.data_ptr()), p(out.data_ptr()), n_out, k,
                                           torch.get_num_threads())
    else:
        rc = lib.gguf_blocks_dequantize_q8(p(blocks.codes.data_ptr()), p(blocks.d.data_ptr()), p(out.data_ptr()),
                                           n_out, k, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"gguf_blocks dequantiser refused a [{n_out}, {k}] weight")
    return out
