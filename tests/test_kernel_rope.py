"""RoPE kernel (and the reference the CPU path uses) against the rotation written out in float64: output and dx."""
from __future__ import annotations

import pytest
import torch

from model.kernels.reference import apply_rope_reference
from model.kernels.triton.rope import apply_rope_triton
from tests.kernel_testing import DEVICE, DTYPES, assert_close, forward_backward, skip_bf16_in_interpreter

IMPLEMENTATIONS = {"triton": apply_rope_triton, "reference": apply_rope_reference}

# [B, T, H, head_dim]: a single pair of a single token; batch > 1 with odd T, heads and head_dim/2 not powers of
# two; Mistral's 32 heads of 128.
SHAPES = [(1, 1, 1, 2), (2, 7, 3, 24), (1, 5, 32, 128)]


def rope_float64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation written out pair by pair (the reference multiplies complex numbers instead):
    out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i] sin + x[2i+1] cos."""
    x, c, s = x.double(), cos.double()[None, :, None, :], sin.double()[None, :, None, :]   # c, s [1, T, 1, Dh/2]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_float64(shape: tuple[int, ...], dtype: torch.dtype, impl: str):
    skip_bf16_in_interpreter(dtype, impl == "triton")
    b, t, h, dh = shape
    x = torch.randn(shape, device=DEVICE).to(dtype)
    # Arbitrary angles, not just pos * theta^(-2i/Dh): any table must rotate correctly. The model keeps the
    # tables in float32, whatever its dtype.
    angles = torch.rand(t, dh // 2, device=DEVICE, dtype=torch.float64) * 200
    cos, sin = angles.cos().float(), angles.sin().float()
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (dx, _, _) = forward_backward(IMPLEMENTATIONS[impl], [x, cos, sin], dy, differentiable=[True, False, False])

    x64 = x.double().requires_grad_()
    y64 = rope_float64(x64, cos, sin)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")


def test_tables_of_wrong_length_are_rejected():
    x = torch.randn(1, 6, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        apply_rope_triton(x, torch.randn(5, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE))
