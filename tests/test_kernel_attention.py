"""Flash attention kernel (and the reference beside it) against brute-force float64 attention: output, the saved
logsumexp, dq, dk, dv; then the block schedules that let the kernels skip everything outside the sliding window.

The oracle is written here: the mask is built pair by pair from the rule "query i sees key j iff i - W < j <= i",
query head h reads KV head h // (Hq / Hkv), and gradients come from autograd in float64. Every run is under the
poisoned allocations of tests/kernel_testing.py, so an output or gradient element the kernels never write is NaN.

Tolerances are the shared per-dtype ones (tests/kernel_testing.py: 1e-5 / 4e-3 / 3e-2 of the largest expected
magnitude, for fp32 / fp16 / bf16). Besides the output rounding they cover the one rounding this kernel adds, the
probabilities P (and dS in the backward) cast to the storage dtype for their tl.dot as in FlashAttention-2: an
error of u relative to values <= 1, summed into outputs of similar size. Measured in the interpreter on these
cases: at most 1/20 of the allowance for fp32 and 1/7 for fp16.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from model.kernels.reference import attention_reference
from model.kernels.triton import flash_attention as fa
from tests.kernel_testing import (DEVICE, DTYPES, TOLERANCES, assert_close, forward_backward, poisoned_allocations,
                                  skip_bf16_in_interpreter)


def brute_force_mask(seq_len: int, window: int | None) -> torch.Tensor:
    """[T, T] bool, pair by pair from the rule."""
    return torch.tensor([[j <= i and (window is None or j > i - window) for j in range(seq_len)]
                         for i in range(seq_len)], dtype=torch.bool).reshape(seq_len, seq_len)


def broadcast_mask(seq_len: int, window: int | None) -> torch.Tensor:
    """The same rule with broadcasting, for sequences too long to loop over."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    return (j <= i) & (j > i - (seq_len if window is None else window))


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, Hq, T, D] and natural logsumexp [B, Hq, T], in float64."""
    kv_head = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
    k, v = k.double()[:, kv_head], v.double()[:, kv_head]
    scores = q.double() @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~brute_force_mask(q.shape[2], window).to(q.device), float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def random_qkv(batch: int, n_heads: int, n_kv_heads: int, seq_len: int, head_dim: int,
               dtype: torch.dtype) -> list[torch.Tensor]:
    # Built as [B, T, H, D] and viewed as [B, H, T, D], the layout the decoder hands over (not contiguous).
    return [torch.randn(batch, seq_len, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
            for heads in (n_heads, n_kv_heads, n_kv_heads)]


# (batch, n_heads, n_kv_heads, seq_len, head_dim, sliding_window, block_rows, block_keys). Key blocks of 16 keys,
# query tiles of 32 rows = 32 / G positions per query block (G = n_heads / n_kv_heads).
CASES = {
    "T_not_multiple_W_below_block": (1, 4, 2, 37, 32, 5, 32, 16),
    "W_equals_block": (1, 4, 4, 40, 16, 16, 32, 16),
    "W_above_block_group_3": (1, 6, 2, 50, 32, 24, 32, 16),      # 3 heads x 10 positions: 2 padded tile rows
    "W_equals_T": (1, 4, 2, 24, 16, 24, 32, 16),
    "W_above_T": (1, 4, 1, 33, 16, 40, 32, 16),
    "causal": (1, 4, 2, 45, 64, None, 32, 16),
    "T_below_W": (1, 4, 2, 10, 16, 24, 32, 16),
    "T_is_1": (1, 4, 1, 1, 16, 3, 32, 16),
    "batch_2": (2, 6, 2, 29, 16, 12, 32, 16),
    "T_much_longer_than_W": (1, 4, 2, 80, 16, 7, 32, 16),
    "wide_key_blocks": (1, 4, 4, 70, 32, 20, 16, 32),
    "head_dim_128": (1, 4, 2, 20, 128, 9, 32, 16),
}


def flash(window: int | None, block_rows: int, block_keys: int) -> Callable[..., torch.Tensor]:
    return lambda q, k, v: fa.flash_attention(q, k, v, window, block_rows=block_rows, block_keys=block_keys)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flash_attention_matches_float64(case: tuple, dtype: torch.dtype):
    skip_bf16_in_interpreter(dtype)
    batch, n_heads, n_kv_heads, seq_len, head_dim, window, block_rows, block_keys = case
    q, k, v = random_qkv(batch, n_heads, n_kv_heads, seq_len, head_dim, dtype)
    do = torch.randn(q.shape, device=DEVICE).to(dtype)
    o, (dq, dk, dv) = forward_backward(flash(window, block_rows, block_keys), [q, k, v], do)
    with poisoned_allocations():
        _, lse2 = fa._forward(q, k, v, window, head_dim ** -0.5, block_rows, block_keys)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, window, head_dim ** -0.5)
    o64.backward(do.double())
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    assert_close(o, o64, dtype, "o")
    assert_close(lse2 * math.log(2), lse64, dtype, "logsumexp")   # the kernel keeps it in base 2
    for name, got, want, other in (("dq", dq, q64.grad, k), ("dk", dk, k64.grad, q)):
        if want.any():
            assert_close(got, want, dtype, name)
        else:
            # T = 1: one key, softmax is constant and dq = dk = 0 exactly, so there is no magnitude to be relative
            # to. The kernel's value is what rounding leaves of dS = P (dP - delta), two D-term dot products of dO
            # and v that cancel, times the other operand / sqrt(D): bound it by the tolerance on those terms' size.
            terms = head_dim * do.float().abs().max() * v.float().abs().max() * other.float().abs().max()
            assert (got.abs() <= TOLERANCES[dtype] * terms * head_dim ** -0.5).all(), f"{name} should vanish: {got}"
    assert_close(dv, v64.grad, dtype, "dv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(dtype: torch.dtype):
    q, k, v = random_qkv(2, 6, 2, 30, 16, dtype)
    do = torch.randn(q.shape, device=DEVICE).to(dtype)
    o, (dq, dk, dv) = forward_backward(lambda q, k, v: attention_reference(q, k, v, 7), [q, k, v], do)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, _ = attention_float64(q64, k64, v64, 7, 16 ** -0.5)
    o64.backward(do.double())
    for name, got, want in (("o", o, o64), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, want, dtype, name)


def test_window_at_least_T_is_plain_causal():
    q, k, v = random_qkv(1, 4, 2, 40, 16, torch.float32)
    causal = fa.flash_attention(q, k, v, None, block_rows=32, block_keys=16)
    for window in (40, 41, 1000):
        assert torch.equal(fa.flash_attention(q, k, v, window, block_rows=32, block_keys=16), causal)


def test_custom_softmax_scale():
    q, k, v = random_qkv(1, 4, 2, 21, 16, torch.float32)
    with poisoned_allocations():
        o = fa.flash_attention(q, k, v, 6, softmax_scale=0.37, block_rows=32, block_keys=16)
    assert_close(o, attention_float64(q, k, v, 6, 0.37)[0], torch.float32, "o")


# ---------------------------------------------------------------------------------------------------------------
# Block skipping: the tables the launcher hands the kernels, checked against the mask block by block.
# ---------------------------------------------------------------------------------------------------------------

def brute_force_block_pairs(seq_len: int, window: int | None, block_m: int,
                            block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (query block, key block): does any real pair see each other, and is every pair visible?"""
    mask = brute_force_mask(seq_len, window) if seq_len <= 100 else broadcast_mask(seq_len, window)
    n_q, n_k = -(-seq_len // block_m), -(-seq_len // block_n)
    meets = torch.zeros(n_q, n_k, dtype=torch.bool)
    full = torch.zeros(n_q, n_k, dtype=torch.bool)
    for m in range(n_q):
        for n in range(n_k):
            tile = mask[m * block_m:(m + 1) * block_m, n * block_n:(n + 1) * block_n]
            meets[m, n] = tile.any()
            # Full: no padded key slot (those must be masked) and every real query sees every key.
            full[m, n] = (n + 1) * block_n <= seq_len and tile.all()
    return meets, full


def ranges_to_sets(table: torch.Tensor) -> tuple[list[set], list[set]]:
    visited = [set(range(first, end)) for first, _, _, end in table.tolist()]
    unmasked = [set(range(first, end)) & set(range(ff, ef)) for first, ff, ef, end in table.tolist()]
    return visited, unmasked


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 37, 64, 80])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 23, 32, 70, 100])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (10, 16), (32, 16), (8, 32)])
def test_schedules_visit_exactly_the_blocks_that_meet_the_window(seq_len: int, window: int | None, block_m: int,
                                                                  block_n: int):
    meets, full = brute_force_block_pairs(seq_len, window, block_m, block_n)
    by_query = fa.keys_for_query_blocks(seq_len, window, block_m, block_n)
    by_key = fa.queries_for_key_blocks(seq_len, window, block_m, block_n)
    assert by_query.shape == (meets.shape[0], 4) and by_key.shape == (meets.shape[1], 4)

    visited, unmasked = ranges_to_sets(by_query)
    for m in range(meets.shape[0]):
        assert visited[m] == set(meets[m].nonzero().flatten().tolist()), f"query block {m}"
        assert unmasked[m] == set(full[m].nonzero().flatten().tolist()), f"query block {m}"
    visited, unmasked = ranges_to_sets(by_key)
    for n in range(meets.shape[1]):
        assert visited[n] == set(meets[:, n].nonzero().flatten().tolist()), f"key block {n}"
        assert unmasked[n] == set(full[:, n].nonzero().flatten().tolist()), f"key block {n}"


def test_sliding_window_visits_far_fewer_blocks_than_causal():
    seq_len, window, block = 4096, 256, 64
    meets, _ = brute_force_block_pairs(seq_len, window, block, block)
    for table in (fa.keys_for_query_blocks, fa.queries_for_key_blocks):
        windowed = table(seq_len, window, block, block)
        causal = table(seq_len, None, block, block)
        visits = (windowed[:, 3] - windowed[:, 0]).sum().item()
        assert visits == meets.sum().item()
        # A block meets at most W / block + 1 blocks of the other side (W / block + 2 if misaligned): 5 here,
        # where causal visits 32.5 on average (64 * 65 / 2 = 2080 in all) and the gap grows with T / W.
        assert (windowed[:, 3] - windowed[:, 0]).max().item() <= window // block + 1
        assert (causal[:, 3] - causal[:, 0]).sum().item() == 64 * 65 // 2
        assert visits * 6 < 64 * 65 // 2
        # The mask is only built on the boundary: at most 2 masked blocks per row with W a multiple of the block.
        masked = (windowed[:, 3] - windowed[:, 0]) - (windowed[:, 2] - windowed[:, 1]).clamp(min=0)
        assert masked.max().item() <= 2


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")   # rows left with no key divide 0 by 0
def test_kernel_loop_bounds_come_from_the_schedule(monkeypatch: pytest.MonkeyPatch):
    """Drop the first scheduled key block of every query block: exactly the rows that needed it change."""
    seq_len, window, block_rows, block_keys = 48, 10, 16, 16     # one head per group: 16 positions per block
    q, k, v = random_qkv(1, 1, 1, seq_len, 16, torch.float32)
    full_schedule = fa.keys_for_query_blocks(seq_len, window, block_rows, block_keys)

    def without_first_block(*args):
        table = full_schedule.clone()
        table[:, 0] += 1
        return table

    fa._schedule_on.cache_clear()
    monkeypatch.setattr(fa, "keys_for_query_blocks", without_first_block)
    try:
        o = fa.flash_attention(q, k, v, window, block_rows=block_rows, block_keys=block_keys)
    finally:
        fa._schedule_on.cache_clear()
    mask = brute_force_mask(seq_len, window)
    first_keys = [range(first * block_keys, (first + 1) * block_keys) for first in full_schedule[:, 0].tolist()]
    lost = torch.tensor([mask[i, first_keys[i // block_rows]].any().item() for i in range(seq_len)])
    assert lost.any() and not lost.all()
    want = attention_float64(q, k, v, window, 16 ** -0.5)[0][0, 0]
    # A row that lost every key it sees divides 0 by 0: NaN counts as changed.
    changed = ~((o[0, 0].double() - want).abs() <= 1e-3).all(dim=-1).cpu()
    assert torch.equal(changed, lost)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes,window,message", [
    (((1, 4, 8, 48), (1, 2, 8, 48)), 4, "head_dim=48"),
    (((1, 4, 8, 256), (1, 2, 8, 256)), 4, "head_dim=256"),
    (((1, 6, 8, 16), (1, 4, 8, 16)), 4, "n_heads=6"),
    (((1, 4, 8, 16), (1, 2, 9, 16)), 4, "do not agree"),
    (((1, 4, 8, 16), (1, 2, 8, 16)), 0, "sliding_window=0"),
])
def test_bad_input_is_refused_with_a_clear_error(shapes: tuple, window: int, message: str):
    q, k = torch.randn(shapes[0], device=DEVICE), torch.randn(shapes[1], device=DEVICE)
    with pytest.raises(ValueError, match=message) as error:
        fa.flash_attention(q, k, k.clone(), window)
    assert "flash_attention.py" in str(error.value)


def test_small_block_rows_for_a_large_group_is_refused():
    q, k = torch.randn(1, 32, 8, 16, device=DEVICE), torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_rows=16"):
        fa.flash_attention(q, k, k.clone(), 4, block_rows=16)
