"""GGUFLinear: a frozen linear layer y = x @ W.T that holds its GGUF file's 4/8-bit blocks instead of a float W.

A drop-in for the nn.Linear it replaces, as NF4Linear is (model/nf4.py): `model.load` swaps it in for every
Q4_0 / Q4_1 / Q8_0 linear weight of a float32 CPU model read from a GGUF. It has no parameters, only the blocks as
buffers, so optimisers and `requires_grad_` leave it alone and LoRA wraps it through `in_features` /
`out_features` / `forward`. Two ways to multiply (model/kernels/cpu/gguf_blocks.py):

    a few rows (decode, speculative steps)   the C kernel reads the blocks: 3.6-5.3x fewer bytes than float32
    many rows, or a gradient to pass back    W dequantised into a buffer reused from call to call, then the same
                                             GEMM as a float32 nn.Linear (oneDNN): the very values, so the same
                                             result, for one pass over W per call (and one more in the backward)

The backward (dx = dy @ W, for LoRA training through the frozen base) dequantises again instead of keeping W from
the forward (NF4's `frozen_linear`). The layer is frozen by construction: what changes weights goes
through `to_linear()`, the float32 nn.Linear of the same values (LoRA merging and export do).

A head tied to the embeddings holds the embeddings' blocks (token_embd); the embedding lookup keeps its float32
weight. `tied_embeddings` records it, so that an export writes the head once, as the checkpoint had it.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from model.kernels.cpu import gguf_blocks as block_kernel
from model.kernels.cpu.matmul import eager_only, linear
from model.kernels.frozen_linear import frozen_linear


class GGUFLinear(nn.Module):
    def __init__(self, blocks: block_kernel.Blocks, name: str = "weight", tied_embeddings: bool = False):
        super().__init__()
        self.out_features, self.in_features = blocks.shape
        self.bits = blocks.bits
        self.name = name                          # the GGUF tensor it came from (for messages)
        self.tied_embeddings = tied_embeddings
        self.register_buffer("codes", blocks.codes)
        # The float32 scales are kept as their raw bits (int32): Module.to(torch.bfloat16) casts every floating
        # buffer, which would round them and silently change every weight (as NF4Linear does).
        self.register_buffer("d", blocks.d.view(torch.int32))
        self.register_buffer("m", blocks.m.view(torch.int32) if blocks.m is not None else None)

    @property
    def blocks(self) -> block_kernel.Blocks:
        return block_kernel.Blocks(self.bits, self.codes, self.d.view(torch.float32),
                                   self.m.view(torch.float32) if self.m is not None else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out_features, in_features] in `dtype`, a tensor of its own (the file's float32 values)."""
        if self.codes.device.type != "cpu":
            return block_kernel.dequantize(self.blocks).to(dtype)
        w = torch.empty(self.out_features, self.in_features)
        block_kernel.dequantize_into(self.blocks, w)
        return w.to(dtype)

    def to_linear(self) -> nn.Linear:
        """The float32 nn.Linear of the same values, frozen (in the accelerated model's class, OneDNNLinear)."""
        from model.fast import OneDNNLinear
        layer = OneDNNLinear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features] in x's dtype.
        if block_kernel.takes(x, self.in_features) and self.codes.device.type == "cpu":
            return block_kernel.matmul(x, self.blocks)
        if torch.is_grad_enabled() and x.requires_grad:
            return frozen_linear(x, self._scratch_weight)     # W again in the backward, for dx = dy @ W
        return linear(x, self._scratch_weight(x.dtype))

    def _scratch_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in the product's dtype (autocast's where it is on, else `dtype`), in a per-thread buffer shared by every
        layer of its shape: for a product that uses it at once and keeps nothing (the forward, the backward's dx),
        never for a caller that holds on to it."""
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        if self.codes.device.type != "cpu" or not eager_only():   # (torch.func, forward AD: PyTorch's ops)
            return block_kernel.dequantize(self.blocks).to(dtype)
        w32 = _scratch(torch.float32, self.out_features, self.in_features)
        block_kernel.dequantize_into(self.blocks, w32)
        if dtype == torch.float32:
            return w32
        return _scratch(dtype, self.out_features, self.in_features).copy_(w32)

    def extra_repr(self) -> str:
        kind = {4: "4-bit", 8: "8-bit"}[self.bits]
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind} GGUF blocks of "
                f"{self.name}{', tied to the embeddings' if self.tied_embeddings else ''}")


class _Scratch(threading.local):
    def __init__(self):
        self.weights: dict[tuple[torch.dtype, int, int], torch.Tensor] = {}


_SCRATCH = _Scratch()


def _scratch(dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    # A fresh 100 MB tensor per call would be new pages faulted in one by one, every call; this buffer is not.
    key = (dtype, rows, cols)
    buf = _SCRATCH.weights.get(key)
    if buf is None:
        buf = _SCRATCH.weights[key] = torch.empty(rows, cols, dtype=dtype)
    return buf
