"""RMSNorm kernel (and the reference the CPU path uses) against float64 math: output, dx and dweight."""
from __future__ import annotations

import pytest
import torch

from model.kernels.reference import rms_norm_reference
from model.kernels.triton.rms_norm import rms_norm_triton
from tests.kernel_testing import DEVICE, DTYPES, assert_close, forward_backward, skip_bf16_in_interpreter

EPS = 1e-5
IMPLEMENTATIONS = {"triton": rms_norm_triton, "reference": rms_norm_reference}

# one row; batch > 1 with more row blocks than backward programs (each program loops, the last block is partial);
# rows wider than 4096 features that are not a power of two (one row per program, masked tail).
SHAPES = [(1, 96), (2, 150, 96), (3, 5, 4100)]


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * weight


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64(shape: tuple[int, ...], dtype: torch.dtype, impl: str):
    skip_bf16_in_interpreter(dtype, impl == "triton")
    x = torch.randn(shape, device=DEVICE).mul(3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (dx, dweight) = forward_backward(lambda a, w: IMPLEMENTATIONS[impl](a, w, EPS), [x, weight], dy)

    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = rms_norm_float64(x64, w64)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    assert_close(dweight, w64.grad, dtype, "dweight")


def test_frozen_weight_gets_no_gradient():
    # Under LoRA the norms are frozen: the backward skips the dweight reduction, and dx must still be right.
    x = torch.randn(4, 33, 80, device=DEVICE)
    weight = torch.randn(80, device=DEVICE)
    dy = torch.randn(4, 33, 80, device=DEVICE)
    _, (dx, dweight) = forward_backward(lambda a, w: rms_norm_triton(a, w, EPS), [x, weight], dy,
                                        differentiable=[True, False])
    x64 = x.double().requires_grad_()
    rms_norm_float64(x64, weight.double()).backward(dy.double())
    assert dweight is None
    assert_close(dx, x64.grad, torch.float32, "dx")


def test_weight_of_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(torch.randn(3, 8, device=DEVICE), torch.randn(9, device=DEVICE), EPS)
