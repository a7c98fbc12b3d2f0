"""The seeded dropout (model/kernels/cpu/dropout.py, dropout.c): the C pass against its PyTorch reference bit for bit,
the reference's hash against a scalar Python spelling of it, and the masks' statistics."""
from __future__ import annotations

import ctypes
import math
import os
import shlex
import shutil

import pytest
import torch

from model.kernels.cpu import dropout as D
from model.kernels._switch import use_kernels

# Skipped only where there is no C compiler. With one, a kernel that fails to build is a failure, not a skip.
HAVE_CC = shutil.which(shlex.split(os.environ.get("CC") or "cc")[0]) is not None
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the PyTorch path is the only one")


def kernel() -> ctypes.CDLL:
    lib = D.KERNEL.library()
    assert lib is not None, "a C compiler is here, but dropout.c did not build (see the warning)"
    return lib
DTYPES = [torch.float32, torch.bfloat16]


def scalar_keep(seed: int, i: int, p: float) -> bool:
    """dropout.c's keep(i), one Python int at a time (independent of the tensor spelling)."""
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % 2**32
        x ^= x >> 15
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)
    k0, k1 = seed % 2**32, (seed >> 32) % 2**32
    h = mix(mix((i % 2**32) ^ k0) ^ (i >> 32) ^ k1)
    return (h >> 8) < round((1 - p) * 2**24)


def test_reference_mask_equals_the_scalar_definition():
    torch.manual_seed(0)
    seed = D.draw_seed()
    mask = D.keep_mask(seed, (3, 700), 0.3).flatten()
    assert [bool(m) for m in mask] == [scalar_keep(seed, i, 0.3) for i in range(mask.numel())]


# Elements past 2^32 (a tensor that large, or one read at an offset): the index's high half enters the hash too.
# Read through `keep_mask` and the C kernel at those indices (the stream's `first` element), not rebuilt here.
PAST_2_32 = [2**32 - 700, 2**33 + 3, 2**40 + 12345]


@pytest.mark.parametrize("first", PAST_2_32)
def test_reference_mask_past_2_to_the_32(first):
    torch.manual_seed(0)
    seed = D.draw_seed()
    mask = D.keep_mask(seed, (1400,), 0.3, first=first)
    assert [bool(m) for m in mask] == [scalar_keep(seed, first + i, 0.3) for i in range(1400)]
    # ... and it is not the stream of the same indices mod 2^32.
    assert not torch.equal(mask[-600:], D.keep_mask(seed, (600,), 0.3, first=(first + 800) % 2**32))


@needs_kernel
@pytest.mark.parametrize("first", PAST_2_32)
def test_kernel_past_2_to_the_32(first):
    torch.manual_seed(1)
    seed, n, p = D.draw_seed(), 5000, 0.3
    x = torch.randn(n)
    out = torch.empty(n)
    assert kernel().dropout_apply(ctypes.c_void_p(x.data_ptr()), 0, ctypes.c_void_p(out.data_ptr()), 0, n, first,
                                  seed, D.keep_below(p), 1 / (1 - p), 1) == 0
    expected = x * D.keep_mask(seed, (n,), p, first=first) * (1 / (1 - p))
    assert torch.equal(out, expected)


@needs_kernel
@pytest.mark.parametrize("p", [0.05, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_reference_bit_for_bit(p, src_dtype, dtype, threads):
    torch.manual_seed(int(p * 100) + threads)
    x = (torch.randn(3, 4099 * 3 + 5) * 3).to(src_dtype)[:, 7:]    # odd sizes, a non-contiguous view
    x[0, :4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0]).to(src_dtype)
    seed = D.draw_seed()
    kernel()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = D.dropout(x, seed, p, dtype)
    finally:
        torch.set_num_threads(prev)
    with use_kernels("reference"):
        reference = D.dropout(x, seed, p, dtype)
    assert ours.dtype == reference.dtype == dtype and ours.shape == x.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_masks_keep_1_minus_p_and_are_independent(p):
    torch.manual_seed(1)
    n = 1 << 20
    a = D.keep_mask(D.draw_seed(), (n,), p).double()
    b = D.keep_mask(D.draw_seed(), (n,), p).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(a.mean().item() - (1 - p)) < 5 * sigma
    assert abs(b.mean().item() - (1 - p)) < 5 * sigma
    corr = lambda u, v: ((u - u.mean()) * (v - v.mean())).mean().item() / (u.std() * v.std()).item()  # noqa: E731
    # Neighbours in one mask, the same element in two masks, and elements 2^k apart: all uncorrelated (5 sigma
    # of a correlation estimated from n pairs is 5 / sqrt(n) ~ 0.005).
    assert abs(corr(a[1:], a[:-1])) < 5 / math.sqrt(n)
    assert abs(corr(a, b)) < 5 / math.sqrt(n)
    for shift in (1, 64, 576, 4096):
        assert abs(corr(a[shift:], a[:-shift])) < 5 / math.sqrt(n)
    # Seeds that differ in one bit give unrelated masks (the seed is mixed, not added).
    seed = D.draw_seed()
    for bit in (0, 31, 32, 63):
        c = D.keep_mask(seed ^ (1 << bit), (n,), p).double()
        assert abs(corr(D.keep_mask(seed, (n,), p).double(), c)) < 5 / math.sqrt(n)


def test_seeds_follow_torch_manual_seed():
    torch.manual_seed(7)
    first = [D.draw_seed() for _ in range(3)]
    torch.manual_seed(7)
    assert [D.draw_seed() for _ in range(3)] == first
    assert len(set(first)) == 3 and all(0 <= s < 2**64 for s in first)


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError, match="dropout p=1.5"):
        D.dropout(torch.randn(4), 0, 1.5, torch.float32)


@needs_kernel
def test_kernel_drops_exactly_at_the_threshold():
    # keep iff (draw >> 8) < keep_below: find elements whose draw sits exactly on the threshold (about one in 2^24)
    # and check the kernel drops them and keeps those just below it.
    n, p = 1 << 24, 0.5
    below = D.keep_below(p)
    i = torch.arange(n, dtype=torch.int64)
    for seed in range(1, 20):
        h = D._mix(D._mix(i ^ seed) ^ 0) >> 8             # seed < 2^32: k0 = seed, k1 = 0; i < 2^32: hi = 0
        on, under = (h == below).nonzero().flatten(), (h == below - 1).nonzero().flatten()
        if len(on) and len(under):
            break
    else:
        pytest.fail("no element on the threshold in 19 seeds")
    kernel()
    out = D.dropout(torch.ones(n), seed, p, torch.float32)
    assert (out[on] == 0).all() and (out[under] == 2).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_take_the_reference_and_keep_their_precision(dtype):
    # float64 and float16 are not the kernel's: the reference computes in float64 / float32 and rounds once.
    torch.manual_seed(9)
    x = torch.randn(300, dtype=dtype)
    assert not D.seeded(x, dtype)
    out = D.dropout(x, 11, 0.0, dtype)
    assert out.dtype == dtype and torch.equal(out, x)      # p = 0: every element kept, scaled by exactly 1
    out = D.dropout(x, 11, 0.25, dtype)
    keep = D.keep_mask(11, x.shape, 0.25)
    expected = (x.to(torch.promote_types(dtype, torch.float32)) * keep * (1 / 0.75)).to(dtype)
    assert torch.equal(out, expected)
