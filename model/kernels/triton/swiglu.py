"""SwiGLU's gating, silu(gate) * up, as a fused Triton kernel (the reference: reference.swiglu_reference).

The feed-forward computes w2(silu(w1 x) * w3 x). Eager PyTorch writes silu(gate) out as a [tokens, hidden_dim]
tensor and autograd keeps it for the backward; at Mistral's hidden_dim = 14336 that is the largest activation of
the block. The kernel fuses the two elementwise steps, and its backward recomputes sigmoid(gate) from the saved
gate and up instead of storing silu:

    s = sigmoid(gate),  silu = gate * s
    d up   = dy * silu
    d gate = dy * up * s * (1 + gate * (1 - s))        (the derivative of gate * sigmoid(gate))
"""
from __future__ import annotations

import torch

from model.kernels._switch import jit, tl, triton

_BLOCK = 1024   # elements per program: a flat elementwise map, so any size that keeps the GPU's loads wide


@jit
def _swiglu_forward(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_backward(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dup_ptr + offsets, (dy * g * s).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offsets, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_forward[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=_BLOCK)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    return SwiGLUFunction.apply(gate, up)
