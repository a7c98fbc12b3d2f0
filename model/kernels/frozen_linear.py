"""y = x @ W.T for a frozen W that is not stored but rebuilt on demand (QLoRA's NF4 base), on any device.

`frozen_linear` is the autograd wrapper. The base weight is frozen, so the backward needs only grad_x = grad_y @ W;
the weight is dequantised again there instead of being saved, so no full-precision copy of a layer outlives its
matmul (saving it would bring back the 14 GB that NF4 removes). The products are `matmul_nt`'s: cuBLAS on CUDA,
oneDNN for float32 on the CPU (cpu/matmul.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from model.kernels.cpu.matmul import matmul_nt


class _FrozenLinear(torch.autograd.Function):
    """y = x @ W.T where W [out, in] is not stored but produced on demand by weight(dtype); W gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.weight = weight
        return matmul_nt(x, weight(x.dtype))                    # [..., in] @ [in, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return matmul_nt(grad_y, ctx.weight(grad_y.dtype).T), None   # [..., out] @ [out, in] -> [..., in]


def frozen_linear(x: torch.Tensor, weight: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """x [..., in] -> x @ W.T [..., out] for a frozen W = weight(x.dtype), dequantised again in the backward."""
    return _FrozenLinear.apply(x, weight)
