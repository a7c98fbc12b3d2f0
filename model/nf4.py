"""NF4: QLoRA's 4-bit NormalFloat weights (Dettmers et al., 2023), the frozen base under Curie's LoRA adapters.

Curie-7B ran its language-adaptive pre-training on one consumer GPU by holding Mistral-7B in NF4 and training bf16
LoRA adapters on top. A weight matrix is stored as

    flatten row-major, cut into blocks of 64 values (the last block may be shorter)
    absmax[b]  = max |w| over block b                                       (float32, one per 64 weights)
    code[i]    = the NF4 value nearest to w[i] / absmax[b]                  (4 bits: 2 codes per byte, first high)
    double quantisation of the absmax (QLoRA section 3): subtract their mean (`scale_offset`), cut them into
    blocks of 256, and store each as the nearest 8-bit dynamic-tree value times its block's max (`scale_absmax`)

    w_hat[i]   = NF4[code[i]] * (DYNAMIC[scale_codes[b]] * scale_absmax[b // 256] + scale_offset)

i.e. 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight: Mistral-7B's linear layers take 3.6 GB instead of 14 GB in
bf16. The layout, the nibble order and the float32 arithmetic are those of bitsandbytes' `quantize_4bit(..,
quant_type="nf4", blocksize=64, compress_statistics=True)`, so our codes and dequantised weights are its own.

The base is frozen: `NF4Linear` dequantises its weight at every forward (in the input's dtype) and again in the
backward, which then needs only grad_x = grad_y @ W; no full-precision copy outlives the matmul. On CUDA the
dequantisation is a Triton kernel (model/kernels/triton/nf4.py); everywhere else the plain-PyTorch
`dequantize_reference`.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model.kernels import _switch
from model.kernels.cpu.build import CKernel, plain_cpu_tensors
from model.kernels.frozen_linear import frozen_linear
from model.kernels.triton import nf4 as nf4_kernels

BLOCK_SIZE = 64         # weights sharing one absmax (QLoRA: 64)
SCALE_BLOCK_SIZE = 256  # absmax values sharing one second-level scale (QLoRA: 256)
# Elements quantised per step: bounds the float32 temporaries (~100 MB) whatever the tensor's size, so quantising
# the 32000 x 4096 head or a 14336 x 4096 feed-forward matrix costs little more than its own bytes.
_CHUNK = BLOCK_SIZE * 2**16


# ------------------------------------------------------------------------------------------------------ codebooks

def nf4_codebook() -> torch.Tensor:
    """The 16 NormalFloat values [16] (float32, sorted): quantiles of N(0, 1), scaled to [-1, 1].

    Each code covers an equal share of a normal distribution, which QLoRA calls information-theoretically optimal
    for normally distributed weights. 8 quantiles on the positive side and 7 on the negative, plus an exact zero, use
    all 16 codes and still represent 0 (padding, pruned weights) exactly. The outermost probability, 0.9677083, is
    the mean of 1 - 1/(2*15) and 1 - 1/(2*16): it keeps the tails finite (ppf(1) = inf).

    The probabilities and the final normalisation are float32, as in bitsandbytes' `create_normal_map` (which
    produced QLoRA's published table), so the table is bit-identical to it; a float64 derivation differs in the last
    bit of a few entries.
    """
    outer = 0.9677083
    positive = torch.special.ndtri(torch.linspace(outer, 0.5, 9)[:-1].double())    # 8 values, ppf(0.5) = 0 dropped
    negative = -torch.special.ndtri(torch.linspace(outer, 0.5, 8)[:-1].double())   # 7 values
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def dynamic_codebook() -> torch.Tensor:
    """The 256 signed 8-bit dynamic-tree values [256] (float32, sorted) that hold the double-quantised scales.

    Dettmers' dynamic tree (arXiv 1511.04561): after the sign bit, a run of zero bits sets a decimal exponent and the
    remaining bits a linear fraction, so the grid is dense near zero and coarse near 1. With 7 exponent levels,
    level e in 0..6 has 2^e fractions: the midpoints of 2^e equal bins of [0.1, 1], times 10^(e - 6), with both
    signs (254 values); 0 and 1 complete the table. The centred absmax values it encodes are mostly small.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        # float32 throughout, as bitsandbytes builds the table, so that ours is bit-identical to it
        edges = torch.linspace(0.1, 1.0, 2**e + 1)
        fractions = 10.0 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2)     # bin midpoints [2^e]
        levels += [fractions, -fractions]
    return torch.cat(levels).sort().values


NF4 = nf4_codebook()
DYNAMIC = dynamic_codebook()
ZERO_CODE = int((NF4 == 0).nonzero())  # 7: the code of an exact zero


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4, DYNAMIC and their midpoints (the decision boundaries of nearest rounding) on `device`, made once."""
    nf4, dynamic = NF4.to(device), DYNAMIC.to(device)
    return nf4, (nf4[:-1] + nf4[1:]) / 2, dynamic, (dynamic[:-1] + dynamic[1:]) / 2


def nearest_code(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for each entry of `scaled` (in [-1, 1]), as uint8.

    For a sorted codebook the nearest value is found by counting the midpoints below x; a tie (x exactly on a
    midpoint) goes to the lower value, as in bitsandbytes.
    """
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------- packing

def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n] (values 0..15) -> bytes [ceil(n/2)]: code 2i in the high nibble, code 2i+1 in the low one.

    An odd count is completed with the code of 0.0 (index 7), which is what quantising a zero gives.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.full((1,), ZERO_CODE, dtype=torch.uint8, device=codes.device)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bytes [ceil(n/2)] -> uint8 codes [n], the inverse of `pack`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten()[:n]


# --------------------------------------------------------------------------------------------------- quantising

@dataclass
class NF4Weight:
    """One quantised tensor. n = shape.numel(), n_blocks = ceil(n / 64)."""
    packed: torch.Tensor        # uint8 [ceil(n / 2)]          two 4-bit NF4 codes per byte
    scale_codes: torch.Tensor   # uint8 [n_blocks]             8-bit dynamic-tree code of each centred absmax
    scale_absmax: torch.Tensor  # float32 [ceil(n_blocks / 256)]  max |absmax - offset| of each group of 256
    scale_offset: torch.Tensor  # float32 []                   mean absmax, subtracted before the 8-bit step
    shape: torch.Size


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """[n] -> [ceil(n / size), size], the short last block completed with zeros (they change no absmax)."""
    pad = -flat.numel() % size
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, size)


def _scale(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """blocks [m, size] / absmax [m] -> [-1, 1], as x * (1 / absmax) like bitsandbytes (so ties round alike).

    An all-zero block has absmax 0; the floor of 1e-38 turns its 0 / 0 into 0 * 1e38 = 0 (code of zero).
    """
    return (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)


def quantize(weight: torch.Tensor, name: str = "weight") -> NF4Weight:
    """A floating tensor of any shape (its size need not be a multiple of 64) -> NF4Weight, on weight's device.

    `name` only labels errors (the loader passes "layers.3.attention.wq.weight in <file>").
    """
    if not weight.is_floating_point():
        raise TypeError(f"{name}: cannot quantise a {weight.dtype} tensor to NF4, it must be floating point")
    n = weight.numel()
    if n == 0:
        raise ValueError(f"{name}: cannot quantise an empty tensor (shape {tuple(weight.shape)}) to NF4")
    nf4, nf4_mid, dynamic, dynamic_mid = _tables(weight.device)
    flat = weight.detach().reshape(-1)

    # First level, chunk by chunk: absmax per block of 64 and the 4-bit code of every weight.
    absmax = torch.empty(-(n // -BLOCK_SIZE), dtype=torch.float32, device=weight.device)    # [n_blocks]
    packed = torch.empty(-(n // -2), dtype=torch.uint8, device=weight.device)              # [ceil(n/2)]
    # On the CPU the C kernel does it in one pass (a 7B load quantises 7e9 weights: ~20x faster than the loop).
    lib = _CPU_KERNEL.library() if (n % BLOCK_SIZE == 0 and flat.dtype in _CPU_KINDS
                                     and plain_cpu_tensors(flat)) else None
    if lib is not None:
        flat = flat.contiguous()
        rc = lib.nf4_quantize_blocks(ctypes.c_void_p(flat.data_ptr()), _CPU_KINDS[flat.dtype], n,
                                     ctypes.c_void_p(nf4_mid.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
                                     ctypes.c_void_p(packed.data_ptr()), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"nf4_quantize_blocks refused {flat.dtype}")
    for start in range(0, n if lib is None else 0, _CHUNK):
        blocks = _blocks(flat[start:start + _CHUNK].float(), BLOCK_SIZE)                   # [m, 64]
        block_max = blocks.abs().amax(dim=1)                                               # [m]
        absmax[start // BLOCK_SIZE:start // BLOCK_SIZE + len(block_max)] = block_max
        codes = nearest_code(_scale(blocks, block_max), nf4_mid).flatten()[:min(_CHUNK, n - start)]
        packed[start // 2:start // 2 + -(len(codes) // -2)] = pack(codes)
    if not torch.isfinite(absmax).all():
        bad = int((~torch.isfinite(absmax)).nonzero()[0]) * BLOCK_SIZE
        raise ValueError(f"{name}: non-finite value (inf or nan) among elements {bad}..{bad + BLOCK_SIZE - 1} of the "
                         f"flattened tensor; refusing to quantise it to NF4")

    # Second level: the absmax values, centred on their mean so that the signed 8-bit grid is used on both sides.
    offset = absmax.mean()
    centred = _blocks(absmax - offset, SCALE_BLOCK_SIZE)                                   # [n_groups, 256]
    scale_absmax = centred.abs().amax(dim=1)                                               # [n_groups]
    scale_codes = nearest_code(_scale(centred, scale_absmax), dynamic_mid).flatten()[:len(absmax)]
    return NF4Weight(packed, scale_codes, scale_absmax, offset, weight.shape)


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The dequantised absmax of each block of 64 [n_blocks] (float32): DYNAMIC[code] * scale_absmax + offset."""
    _, _, dynamic, _ = _tables(q.packed.device)
    group = torch.arange(len(q.scale_codes), device=q.packed.device) // SCALE_BLOCK_SIZE
    return dynamic[q.scale_codes.long()] * q.scale_absmax[group] + q.scale_offset


def dequantize_reference(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight -> tensor of q.shape in `dtype`: NF4[code] * block scale, in float32, then one rounding to dtype."""
    nf4, _, _, _ = _tables(q.packed.device)
    n = q.shape.numel()
    values = _blocks(nf4[unpack(q.packed, n).long()], BLOCK_SIZE)                          # [n_blocks, 64]
    return (values * block_scales(q)[:, None]).flatten()[:n].view(q.shape).to(dtype)


# Elements dequantised per step on the CPU: 2^18 = 4096 blocks of 64 = 16 groups of 256 block scales, so a step's
# float32 values (1 MB) stay in cache and each step covers whole scale groups.
_CPU_CHUNK = BLOCK_SIZE * SCALE_BLOCK_SIZE * 16


def _open(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.nf4_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.nf4_dequantize.restype = ctypes.c_int
    lib.nf4_quantize_blocks.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int]
    lib.nf4_quantize_blocks.restype = ctypes.c_int
    return lib


_CPU_KERNEL = CKernel(Path(__file__).with_name("kernels") / "cpu" / "nf4.c", _open, "NF4 (de)quantisation")
_CPU_KINDS = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two NF4 values a packed byte holds (high nibble first), so one lookup per byte."""
    nf4 = NF4.to(device)
    byte = torch.arange(256, device=device)
    return torch.stack([nf4[byte >> 4], nf4[byte & 0xF]], dim=1)


class _Scratch(threading.local):
    """Per-thread buffers of the CPU dequantisation, kept between calls (see `dequantize_cpu_into`)."""

    def __init__(self):
        self.chunk: dict[str, torch.Tensor] = {}
        self.weights: dict[tuple[torch.dtype, int], torch.Tensor] = {}


_scratch = _Scratch()


def _chunk_buffer(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _scratch.chunk.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _scratch.chunk[name] = torch.empty(n, dtype=dtype)
    return buf[:n]


def dequantize_cpu_into(q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """`dequantize_reference(q, out.dtype)` written into `out` (q.shape, CPU, contiguous), bit for bit, without
    allocating: a C kernel (model/kernels/cpu/nf4.c, both threads) for float32 and bf16, else PyTorch, 2^18 weights
    at a time through four small per-thread buffers that are reused from call to call.

    The reference allocates its temporaries afresh at every call (int64 codes, float32 values, the product: 20
    bytes per weight, 1.2 GB for one 14336 x 4096 feed-forward matrix), and every fresh allocation of that size is
    new pages from the kernel, faulted in one by one: at Mistral-7B's shape, hundreds of millions of page faults per
    training step. Here the same float32 operations, in the same order, touch no new memory. Needs a size that
    is a multiple of 64 (every linear layer of the models we load); others go to the reference.
    """
    n = q.shape.numel()
    if n % BLOCK_SIZE or out.numel() != n or not out.is_contiguous() or q.packed.device.type != "cpu":
        out.copy_(dequantize_reference(q, out.dtype).view(out.shape))
        return out
    lib = _CPU_KERNEL.library() if out.dtype in _CPU_KINDS and plain_cpu_tensors(q.packed, out) else None
    if lib is not None:
        nf4, _, dynamic, _ = _tables(q.packed.device)
        parts = [t.contiguous() for t in (q.packed, q.scale_codes, q.scale_absmax)]
        rc = lib.nf4_dequantize(*(ctypes.c_void_p(t.data_ptr()) for t in parts), float(q.scale_offset),
                                ctypes.c_void_p(nf4.data_ptr()), ctypes.c_void_p(dynamic.data_ptr()), n,
                                ctypes.c_void_p(out.data_ptr()), _CPU_KINDS[out.dtype], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"nf4_dequantize refused {out.dtype}")
        return out
    # Without a C compiler: the same arithmetic in PyTorch, a chunk at a time through reused buffers.
    pairs = _pair_table(q.packed.device)
    _, _, dynamic, _ = _tables(q.packed.device)
    flat = out.view(-1)
    for start in range(0, n, _CPU_CHUNK):
        m = min(_CPU_CHUNK, n - start)                     # weights in this step, a multiple of 64
        b0, nb = start // BLOCK_SIZE, m // BLOCK_SIZE      # first block, blocks
        g0 = b0 // SCALE_BLOCK_SIZE                        # first scale group (steps start on a group boundary)
        ng = -(nb // -SCALE_BLOCK_SIZE)
        codes = _chunk_buffer("codes", m // 2, torch.int32).copy_(q.packed[start // 2:(start + m) // 2])
        values = _chunk_buffer("values", m, torch.float32).view(m // 2, 2)
        torch.index_select(pairs, 0, codes, out=values)                                    # NF4[code] [m/2, 2]
        # block scale = DYNAMIC[scale_code] * scale_absmax[group] + offset, the reference's multiply, then add
        scale_codes = _chunk_buffer("scale_codes", nb, torch.int32).copy_(q.scale_codes[b0:b0 + nb])
        scales = _chunk_buffer("scales", ng * SCALE_BLOCK_SIZE, torch.float32)
        torch.index_select(dynamic, 0, scale_codes, out=scales[:nb])
        grouped = scales.view(ng, SCALE_BLOCK_SIZE)
        grouped.mul_(q.scale_absmax[g0:g0 + ng, None]).add_(q.scale_offset)
        values.view(nb, BLOCK_SIZE).mul_(scales[:nb, None])
        flat[start:start + m].copy_(values.view(-1))       # one rounding to out.dtype, as the reference's .to()
    return out


def dequantize_scratch(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, written into a per-thread buffer of its size and dtype that the next call for a weight
    of the same size overwrites: for a product that uses it at once and keeps nothing (NF4Linear's forward and
    backward), never for a caller that holds on to it. CUDA (and anything but the CPU) gets a fresh tensor."""
    if q.packed.device.type != "cpu" or q.shape.numel() % BLOCK_SIZE:
        return dequantize(q, dtype)
    key = (dtype, q.shape.numel())
    buf = _scratch.weights.get(key)
    if buf is None:
        buf = _scratch.weights[key] = torch.empty(q.shape.numel(), dtype=dtype)
    return dequantize_cpu_into(q, buf.view(q.shape))


def dequantize(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight -> tensor of q.shape in `dtype`: the Triton kernel on CUDA, `dequantize_reference` elsewhere."""
    if _switch.use_triton(q.packed):
        nf4, _, dynamic, _ = _tables(q.packed.device)
        flat = nf4_kernels.dequantize_nf4(q.packed, q.scale_codes, q.scale_absmax, q.scale_offset, nf4, dynamic,
                                          q.shape.numel(), dtype, BLOCK_SIZE, SCALE_BLOCK_SIZE)
        return flat.view(q.shape)
    return dequantize_reference(q, dtype)


# ------------------------------------------------------------------------------------------------------ the layer

class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer y = x @ W.T whose W is held in NF4 (a drop-in for the nn.Linear it replaces).

    It has no parameters, only buffers, so optimisers and `requires_grad_` leave it alone; LoRA wraps it through
    `in_features` / `out_features` / `forward` exactly like an nn.Linear.
    """

    def __init__(self, q: NF4Weight):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D [out_features, in_features] weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", q.packed)
        self.register_buffer("scale_codes", q.scale_codes)
        # The two float32 scale tensors are kept as their raw bits (int32): Module.to(torch.bfloat16) casts every
        # floating buffer, which would round them and silently change every dequantised weight.
        self.register_buffer("scale_absmax", q.scale_absmax.view(torch.int32))
        self.register_buffer("scale_offset", q.scale_offset.view(torch.int32))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, name: str = "weight") -> "NF4Linear":
        """[out_features, in_features] floating weight -> NF4Linear on the weight's device."""
        if weight.dim() != 2:
            raise ValueError(f"{name}: NF4Linear needs a 2-D [out_features, in_features] weight, "
                             f"got shape {tuple(weight.shape)}")
        return cls(quantize(weight, name))

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> "NF4Linear":
        if linear.bias is not None:
            raise ValueError(f"{name}: has a bias; NF4Linear quantises bias-free layers (all of Mistral's are)")
        return cls.from_weight(linear.weight, f"{name}.weight")

    @property
    def quantized(self) -> NF4Weight:
        return NF4Weight(self.packed, self.scale_codes, self.scale_absmax.view(torch.float32),
                         self.scale_offset.view(torch.float32), torch.Size((self.out_features, self.in_features)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight W_hat [out_features, in_features] in `dtype` (what the forward multiplies by)."""
        return dequantize(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features], computed in x's dtype (bf16 training keeps its speed).
        # The weight exists only for the product (forward) and again for grad_x (backward): on the CPU it is
        # written into a buffer shared by every layer of its size instead of a fresh allocation per call.
        return frozen_linear(x, self._scratch_weight)

    def _scratch_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_scratch(self.quantized, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, block={BLOCK_SIZE}"


# ---------------------------------------------------------------------------------------------- model surgery

def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """`skip` holds full module names ('output', 'layers.0.attention.wq') or leaf names ('wo': every layer's)."""
    return name in skip or name.rpartition(".")[2] in skip


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def quantize_model_(model: nn.Module, skip: tuple[str, ...] = ("output",)) -> int:
    """Replace every nn.Linear of `model` (except those named in `skip`) by an NF4Linear, in place; -> how many.

    The head is skipped by default, as in QLoRA: it is 2% of Mistral's weights but sees every logit, and a head
    tied to the embeddings (SmolLM2) would otherwise be stored twice. Each full-precision weight is released as soon
    as its layer is replaced (if nothing else holds it), so a model can be quantised layer by layer in little RAM.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(name, skip)]
    for name, linear in targets:
        _replace(model, name, NF4Linear.from_linear(linear, name))
    return len(targets)


def quantize_while_loading(skip: tuple[str, ...] = ("output",)) -> Callable[[nn.Module, str, torch.Tensor], bool]:
    """A `transform` for model.loading.build_model/load: each linear weight becomes an NF4Linear as it is read.

    The model under construction lives on the meta device, so a 7B checkpoint never exists at full precision as a
    whole: only the tensor being read does. Returns True (tensor taken) for the weights it quantised.
    """
    def transform(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or _skipped(module_name, skip):
            return False
        if not isinstance(model.get_submodule(module_name), nn.Linear):
            return False
        _replace(model, module_name, NF4Linear.from_weight(tensor, name))
        return True
    return transform
