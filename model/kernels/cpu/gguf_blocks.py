"""Decode from a GGUF's own 4- and 8-bit blocks: y = x @ W.T for a few rows of x, in float32, reading the blocks.

Why. One decode step multiplies a single token's activations by every weight of the model, so it is bound by how
fast the weights stream from memory, not by arithmetic: SmolLM2-135M dequantised to float32 is 538 MB per token,
about 26 ms on one core of our test machine even in oneDNN. The GGUF it came from holds the same weights in
32-value blocks of 4 or 8 bits plus fp16 scales (Q4_1: 5 bits a weight), and rebuilding a weight from its block
costs less than reading its float32 copy. So a linear layer loaded from such a block keeps the blocks beside its
float32 weight, and a product with at most `MAX_ROWS` rows of x (a decode or speculative step) reads them instead:
all of SmolLM2's products then take 7 ms a token instead of 26 (`python bench/linear.py`, docs/benchmarks.md).

Same arithmetic. Each weight is rebuilt in float32 exactly as the dequantiser builds it (d * code + m: the product
is exact, so the single rounding is the same), then multiplied and summed in float32. The result differs from
x @ W.T on the dequantised W only in the order of the additions, as any two GEMMs differ.

    Q4_0   W = d * (code - 8)     stored as code 0..15, m = -8 d (d * code - 8 d is d * (code - 8) exactly;
                                  only a zero may come out +0.0 instead of -0.0)
    Q4_1   W = d * code + m
    Q8_0   W = d * code           code -128..127

Other GGUF types (k-quants, F16, ...) load as float32 only. The blocks cost memory (111 MB beside SmolLM2's 538 MB of
float32 weights) and are only used while they still are the layer's weight: `matches` checks that it is the same
tensor, of the same version (in-place ops through autograd bump it: a LoRA merge, load_state_dict, PyTorch's
default optimisers) at the same address. `Linear` frees blocks that no longer match: on the next product, when
its weight is replaced, and when `.to()`, `.half()`, ... touch it; a copy (deepcopy, pickle, torch.save of a whole
model) keeps blocks that stand for the copy's weights, while a model sent to another process (weights moved to
shared memory) falls back to its float32 weights. What no check sees is a write that bypasses the version
counter: `w.data.add_(...)`, a write through `w.numpy()`, CPU optimisers with `fused=True`. Code that changes
weights that way (full fine-tuning, say) should call `model.loading.drop_gguf_blocks(model)` first, or load with
`gguf_blocks=False`. Our own training (train.py, klej) loads without blocks.

The kernel is ~150 lines of C (gguf_blocks.c: AVX-512, AVX2 or plain C, OpenMP over the rows of W), compiled once
with the system's C compiler (`$CC`, default `cc`) into the cache folder (`<cache>/kernels/`) and called through
ctypes. Without a compiler, or with MINICURIE_KERNELS=reference, every product runs on the float32 weight as before.
`reference_matmul` below is the PyTorch reference the tests compare it with.
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
    """W [n_out, k] as 32-value blocks (layout in gguf_blocks.c), tied to the float32 weight it equals."""
    bits: int                 # 4 or 8
    codes: torch.Tensor       # uint8 [n_out, k/2] (4-bit, two codes a byte) or int8 [n_out, k] (8-bit)
    d: torch.Tensor           # float32 [n_out, k/32]
    m: torch.Tensor | None    # float32 [n_out, k/32] (4-bit only)
    weight: torch.Tensor | None = None   # the layer's float32 weight these blocks equal (set by `attach`)
    version: int = -1
    data_ptr: int = 0

    def __getstate__(self) -> dict:
        # pickle, deepcopy, torch.save of a whole model: the copy's weight is a new tensor (new memory, version 0);
        # the blocks stand for it if they stood for the original.
        return {**self.__dict__, "still_the_weight": self.weight is not None and self.matches(self.weight)}

    def __setstate__(self, state: dict) -> None:
        valid = state.pop("still_the_weight", False)
        self.__dict__.update(state)
        if valid:
            self.attach(self.weight)
        else:
            self.weight = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.d, self.m) if t is not None)

    def attach(self, weight: torch.Tensor) -> "Blocks":
        """Record which tensor (and which state of it) these blocks stand for."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"blocks of shape {self.shape} cannot stand for a weight of shape {tuple(weight.shape)}")
        self.weight, self.version, self.data_ptr = weight, weight._version, weight.data_ptr()
        return self

    def matches(self, weight: torch.Tensor) -> bool:
        """Are these blocks still `weight`: the same tensor, same memory, no in-place op since `attach`?"""
        return (weight is self.weight and weight._version == self.version and weight.data_ptr() == self.data_ptr
                and weight.dtype == torch.float32 and weight.device.type == "cpu")


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
    return lib


KERNEL = _cbuild.CKernel(_SOURCE, open_library, "GGUF block kernel",
                         unavailable="GGUF block kernel unavailable, decoding from float32 weights instead")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (said once, as a warning)."""
    return KERNEL.library()


def applies(x: torch.Tensor, blocks: Blocks | None, weight: torch.Tensor) -> bool:
    """Does y = x @ weight.T go to the block kernel? While the blocks are `weight`, for small float32 CPU products
    outside autograd and autocast (and outside torch.func transforms, forward-mode AD and torch.compile traces,
    whose tensors a C function cannot see through)."""
    return (blocks is not None and eager_only() and blocks.matches(weight)
            and takes(x, weight, blocks.d.shape[1] * QK))


def takes(x: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    """`applies` without the blocks' and eager-mode checks (Linear.forward makes those first)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() > 0 and x.shape[-1] == k
            and 0 < x.numel() // k <= MAX_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and current_mode() != "reference" and library() is not None)


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
