"""SwiGLU's gating, silu(gate) * up, for bf16 CPU tensors in C (swiglu.c): the CPU path of training under autocast.

Why: eager PyTorch's bf16 elementwise ops each convert to float32 and back, ~0.8 s of a 6 s SmolLM2 LoRA step at
micro-batch 4; swiglu.c does the formulas of swiglu_recompute.py (forward, and the backward that recomputes
sigmoid(gate) from the kept gate and up) in one pass each way, in float32, rounding each result once.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from model.kernels.cpu.build import CKernel, plain_cpu_tensors


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.swiglu_forward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    lib.swiglu_backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int]
    lib.swiglu_forward.restype = lib.swiglu_backward.restype = None
    return lib


KERNEL = CKernel(Path(__file__).with_name("swiglu.c"), _open, "SwiGLU")


def c_kernel_takes(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (gate.dtype == up.dtype == torch.bfloat16 and gate.shape == up.shape and gate.numel() > 0
            and plain_cpu_tensors(gate, up) and KERNEL.library() is not None)


class SwiGLUCPU(torch.autograd.Function):
    """silu(gate) * up for bf16 CPU tensors through swiglu.c; keeps gate and up, as SwiGLURecompute."""

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
