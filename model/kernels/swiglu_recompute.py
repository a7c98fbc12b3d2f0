"""SwiGLU's gating, silu(gate) * up, keeping gate and up for the backward instead of silu(gate): the CPU path.

The feed-forward computes w2(silu(w1 x) * w3 x). Eager autograd of reference.swiglu_reference keeps gate, silu(gate)
and up for the backward (three [tokens, hidden_dim] tensors, the largest activations of the block); the backward
below recomputes sigmoid(gate) from the two it keeps, as the Triton kernel (triton/swiglu.py) does on the GPU:

    s = sigmoid(gate),  silu = gate * s
    d up   = dy * silu
    d gate = dy * up * s * (1 + gate * (1 - s))        (the derivative of gate * sigmoid(gate))

Plain PyTorch, so it runs on any device; the switch (__init__.py) sends every non-Triton call here. bf16 CPU tensors
(training under autocast) take the C kernel instead, which computes the same formulas in one pass each way.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from model.kernels._cbuild import CKernel, plain_cpu_tensors
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
    if _c_kernel_takes(gate, up):
        return SwiGLUCPU.apply(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLURecompute.apply(gate, up)
    return swiglu_reference(gate, up)


# bf16 on the CPU (training under autocast): eager PyTorch's bf16 elementwise ops each convert to float32 and back,
# ~0.8 s of a 6 s SmolLM2 LoRA step at micro-batch 4; swiglu_cpu.c does the same formulas in one pass each way,
# in float32, rounding each result once.

def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.swiglu_forward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    lib.swiglu_backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int]
    lib.swiglu_forward.restype = lib.swiglu_backward.restype = None
    return lib


KERNEL = CKernel(Path(__file__).with_name("swiglu_cpu.c"), _open, "SwiGLU")


def _c_kernel_takes(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (gate.dtype == up.dtype == torch.bfloat16 and gate.shape == up.shape and gate.numel() > 0
            and plain_cpu_tensors(gate, up) and KERNEL.library() is not None)


class SwiGLUCPU(torch.autograd.Function):
    """silu(gate) * up for bf16 CPU tensors through swiglu_cpu.c; keeps gate and up, as SwiGLURecompute."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
        KERNEL.library().swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                        torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        KERNEL.library().swiglu_backward(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                                         dup.data_ptr(), gate.numel(), torch.get_num_threads())
        return dgate, dup
