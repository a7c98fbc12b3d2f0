"""RoPE kernel (and the reference the CPU path uses) against float64 complex multiplication: output and dx."""
from __future__ import annotations

import pytest
import torch

from model.kernels.rope import apply_rope_reference, apply_rope_triton
from tests.kernel_testing import DEVICE, DTYPES, assert_close, forward_backward

IMPLEMENTATIONS = {"triton": apply_rope_triton, "reference": apply_rope_reference}

# [B, T, H, head_dim]: a single pair of a single token; batch > 1 with odd T, heads and head_dim/2 not powers of
# two; Mistral's 32 heads of 128.
SHAPES = [(1, 1, 1, 2), (2, 7, 3, 24), (1, 5, 32, 128)]


def rope_float64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mistral's own formulation: each adjacent pair is a complex number, multiplied by cos + j sin."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))                  # [B, T, H, Dh/2]
    rotated = pairs * torch.complex(cos.double(), sin.double())[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_float64(shape: tuple[int, ...], dtype: torch.dtype, impl: str):
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
