"""SwiGLU kernel (and the reference the CPU path uses) against float64 math: output, d gate and d up. Also shows
that the poisoned allocations of tests/kernel_testing.py catch an element a kernel leaves unwritten."""
from __future__ import annotations

import pytest
import torch

from model.kernels.reference import swiglu_reference
from model.kernels.swiglu_recompute import swiglu_recompute
from model.kernels.triton.swiglu import _swiglu_forward, swiglu_triton
from tests.kernel_testing import (DEVICE, DTYPES, assert_close, forward_backward, poisoned_allocations,
                                  skip_bf16_in_interpreter)

# "recompute" is the CPU path when gradients are needed: the reference arithmetic, keeping gate and up only.
IMPLEMENTATIONS = {"triton": swiglu_triton, "reference": swiglu_reference, "recompute": swiglu_recompute}

# one element; batch > 1 with Mistral-like hidden sizes that are not multiples of the 1024-element block.
SHAPES = [(1, 1), (2, 7, 160), (3, 1537)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_float64(shape: tuple[int, ...], dtype: torch.dtype, impl: str):
    skip_bf16_in_interpreter(dtype, impl == "triton")
    gate = torch.randn(shape, device=DEVICE).mul(4).to(dtype)   # wide enough to reach silu's saturated tails
    up = torch.randn(shape, device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (dgate, dup) = forward_backward(IMPLEMENTATIONS[impl], [gate, up], dy)

    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y64 = g64 / (1 + torch.exp(-g64)) * u64
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(dgate, g64.grad, dtype, "dgate")
    assert_close(dup, u64.grad, dtype, "dup")


def test_poison_exposes_an_unwritten_element():
    # Launch the forward kernel over one block too few: the last 1000 outputs are never written, and must be NaN.
    gate, up = torch.randn(2024, device=DEVICE), torch.randn(2024, device=DEVICE)
    with poisoned_allocations():
        out = torch.empty_like(gate)
        _swiglu_forward[(1,)](gate, up, out, gate.numel(), BLOCK=1024)
    assert not out[:1024].isnan().any()
    assert out[1024:].isnan().all()


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="gate"):
        swiglu_triton(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
