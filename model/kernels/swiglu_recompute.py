"""SwiGLU's gating, silu(gate) * up, keeping gate and up for the backward instead of silu(gate): the CPU path.

The feed-forward computes w2(silu(w1 x) * w3 x). Eager autograd of reference.swiglu_reference keeps gate, silu(gate)
and up for the backward (three [tokens, hidden_dim] tensors, the largest activations of the block); the backward
below recomputes sigmoid(gate) from the two it keeps, as the Triton kernel (triton/swiglu.py) does on the GPU:

    s = sigmoid(gate),  silu = gate * s
    d up   = dy * silu
    d gate = dy * up * s * (1 + gate * (1 - s))        (the derivative of gate * sigmoid(gate))

Plain PyTorch, so it runs on any device; the switch (__init__.py) sends every non-Triton call here. bf16 CPU tensors
(training under autocast) take the C kernel instead (cpu/swiglu.py), which computes the same formulas in one pass
each way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.reference import swiglu_reference


def _swiglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate, d up of silu(gate) * up, in float32 arithmetic, returned in the inputs' dtypes."""
    g, u, dy32 = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    return (dy32 * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy32 * g * s).to(up.dtype)


class SwiGLURecompute(torch.autograd.Function):
    """The reference arithmetic with the kernel's memory: keeps gate and up, recomputes sigmoid in the backward.

    Eager autograd of F.silu(gate) * up keeps gate, silu(gate) and up (three [tokens, hidden_dim] tensors); this
    keeps two. It is the CPU path of `model.kernels.swiglu` whenever a gradient is needed.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _swiglu_grads(dy, *ctx.saved_tensors)


def swiglu_recompute(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from model.kernels.cpu import swiglu as c_swiglu   # at first use: importing the decoder imports no C build
    if c_swiglu.c_kernel_takes(gate, up):
        return c_swiglu.SwiGLUCPU.apply(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLURecompute.apply(gate, up)
    return swiglu_reference(gate, up)
