"""Fused linear + cross-entropy against F.cross_entropy(h @ weight.T) in float64: loss, d h and d weight, for both
per-chunk steps (the Triton kernel and the PyTorch one the CPU path uses), and a measurement of its peak memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.kernels.chunked_loss import MIN_CHUNK, linear_cross_entropy_fused
from model.kernels.reference import linear_cross_entropy_reference
from tests.kernel_testing import (DEVICE, DTYPES, assert_close, forward_backward, peak_allocated_bytes,
                                  skip_bf16_in_interpreter)

STEPS = {"triton": True, "torch": False}
IGNORE = -100


def random_problem(n: int, dim: int, vocab: int, dtype: torch.dtype, n_ignored: int = 0, device: str = DEVICE):
    h = torch.randn(n, dim, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, device=device) / dim ** 0.25).to(dtype)   # logits of a few units
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.randperm(n, device=device)[:n_ignored]] = IGNORE
    return h, weight, targets


def float64_oracle(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    h64, w64 = h.double().requires_grad_(), weight.double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.T, targets, ignore_index=IGNORE, label_smoothing=label_smoothing)
    loss.backward()
    return loss, h64.grad, w64.grad


# (tokens, dim, vocab, chunk_size): one token with the default chunk; an odd token count over chunks of 8 (the last
# one partial) with a vocabulary that is not a power of two.
PROBLEMS = [(1, 24, 1000, None), (37, 24, 1000, 8)]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_matches_float64(problem: tuple, dtype: torch.dtype, step: str):
    skip_bf16_in_interpreter(dtype, STEPS[step])
    n, dim, vocab, chunk_size = problem
    h, weight, targets = random_problem(n, dim, vocab, dtype, n_ignored=n // 6)
    loss, (dh, dweight) = forward_backward(
        lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, chunk_size=chunk_size, use_triton=STEPS[step]),
        [h, weight])
    loss64, dh64, dweight64 = float64_oracle(h, weight, targets)
    assert_close(loss, loss64, dtype, "loss")
    assert_close(dh, dh64, dtype, "dh")
    assert_close(dweight, dweight64, dtype, "dweight")
    assert dh.dtype == dweight.dtype == dtype


@pytest.mark.parametrize("step", STEPS)
def test_label_smoothing(step: str):
    h, weight, targets = random_problem(29, 16, 300, torch.float32, n_ignored=4)
    loss, (dh, dweight) = forward_backward(
        lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, label_smoothing=0.1, chunk_size=8,
                                                use_triton=STEPS[step]), [h, weight])
    loss64, dh64, dweight64 = float64_oracle(h, weight, targets, label_smoothing=0.1)
    assert_close(loss, loss64, torch.float32, "loss")
    assert_close(dh, dh64, torch.float32, "dh")
    assert_close(dweight, dweight64, torch.float32, "dweight")


def test_vocabulary_wider_than_one_kernel_block():
    # 17000 words > the kernel's 16384-word block: both passes loop, the online softmax merges two blocks.
    h, weight, targets = random_problem(3, 8, 17000, torch.float32)
    loss, (dh, dweight) = forward_backward(
        lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, use_triton=True), [h, weight])
    loss64, dh64, dweight64 = float64_oracle(h, weight, targets)
    assert_close(loss, loss64, torch.float32, "loss")
    assert_close(dh, dh64, torch.float32, "dh")
    assert_close(dweight, dweight64, torch.float32, "dweight")


@pytest.mark.parametrize("step", STEPS)
def test_frozen_head_and_evaluation(step: str):
    h, weight, targets = random_problem(11, 16, 200, torch.float32, n_ignored=2)
    loss64, dh64, _ = float64_oracle(h, weight, targets)
    # A frozen output head (LoRA): only d h is computed.
    loss, (dh, dweight) = forward_backward(
        lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, chunk_size=4, use_triton=STEPS[step]),
        [h, weight], differentiable=[True, False])
    assert dweight is None
    assert_close(dh, dh64, torch.float32, "dh")
    # Perplexity evaluation: no gradient wanted, the loss alone.
    with torch.no_grad():
        assert_close(linear_cross_entropy_fused(h, weight, targets, IGNORE, chunk_size=4, use_triton=STEPS[step]),
                     loss64, torch.float32, "loss under no_grad")


@pytest.mark.parametrize("step", STEPS)
def test_extra_terms_a_lora_head(step: str):
    # logits = h @ W.T + u @ B.T, as a LoRA head (u = scale * dropout(h) A^T): loss and the gradients of h, u and
    # B against float64 autograd; the frozen W gets none.
    h, weight, targets = random_problem(13, 16, 300, torch.float32, n_ignored=2)
    u, b = torch.randn(13, 3), torch.randn(300, 3) * 0.3
    loss, (dh, du, db) = forward_backward(
        lambda a, x, w: linear_cross_entropy_fused(a, weight, targets, IGNORE, chunk_size=4, use_triton=STEPS[step],
                                                   extra_terms=((x, w),)), [h, u, b])
    h64, u64, b64 = (t.double().requires_grad_() for t in (h, u, b))
    loss64 = F.cross_entropy(h64 @ weight.double().T + u64 @ b64.T, targets, ignore_index=IGNORE)
    loss64.backward()
    assert_close(loss, loss64, torch.float32, "loss")
    for name, ours, exact in [("dh", dh, h64.grad), ("du", du, u64.grad), ("dB", db, b64.grad)]:
        assert_close(ours, exact, torch.float32, name)
    with pytest.raises(ValueError, match=r"extra_terms\[0\]"):
        linear_cross_entropy_fused(h, weight, targets, extra_terms=((u, b[:10]),))


def test_autocast_runs_the_products_in_bfloat16():
    # Under CPU autocast the chunks' products run in bf16, as F.linear's would; gradients come back in the inputs'
    # float32. Compared with the unfused path under the same autocast (bf16 logits, float32 loss).
    h, weight, targets = random_problem(24, 32, 500, torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (dh, dweight) = forward_backward(
            lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, chunk_size=8), [h, weight])
        ref, (dh_ref, dweight_ref) = forward_backward(
            lambda a, w: F.cross_entropy(F.linear(a, w).float(), targets, ignore_index=IGNORE), [h, weight])
    assert dh.dtype == dweight.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dh, dh_ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(dweight, dweight_ref, atol=2e-3, rtol=2e-2)


def test_every_token_ignored_behaves_like_pytorch():
    h, weight, targets = random_problem(5, 8, 50, torch.float32, n_ignored=5)
    loss, (dh, dweight) = forward_backward(
        lambda a, w: linear_cross_entropy_fused(a, w, targets, IGNORE, use_triton=True), [h, weight])
    ref, (dh_ref, dweight_ref) = forward_backward(
        lambda a, w: linear_cross_entropy_reference(a, w, targets, IGNORE), [h, weight])
    assert loss.isnan() and ref.isnan()     # 0 / 0 kept tokens
    assert torch.equal(dh, dh_ref) and torch.equal(dweight, dweight_ref)


def test_target_outside_vocabulary_is_rejected():
    h, weight, targets = random_problem(6, 8, 50, torch.float32)
    targets[4] = 50
    with pytest.raises(ValueError, match=r"targets\[4\] = 50"):
        linear_cross_entropy_fused(h, weight, targets, IGNORE)


def test_peak_memory_does_not_grow_with_vocabulary_like_unfused():
    # Many tokens, a narrow model: the unfused [N, V] logits (and their gradient) dominate its memory. The fused
    # path's vocabulary-wide buffers are weight-sized ([V, D] gradients) and one [C, V] chunk, which the default
    # chunk size keeps within twice the size of h or MIN_CHUNK tokens. Measured on the CPU allocator, whatever device
    # the others use.
    n, dim, vocab_small, vocab_large = 2048, 64, 1000, 8000

    def peak(fn, vocab: int) -> int:
        h, weight, targets = random_problem(n, dim, vocab, torch.float32, device="cpu")
        h.requires_grad_(), weight.requires_grad_()
        return peak_allocated_bytes(lambda: fn(h, weight, targets).backward())

    extra_vocab = vocab_large - vocab_small
    logits_growth = n * extra_vocab * 4                        # bytes of one more float32 [N, V] buffer
    weight_growth, h_bytes = extra_vocab * dim * 4, n * dim * 4
    unfused = peak(linear_cross_entropy_reference, vocab_large) - peak(linear_cross_entropy_reference, vocab_small)
    fused = peak(linear_cross_entropy_fused, vocab_large) - peak(linear_cross_entropy_fused, vocab_small)
    report = f"peak grew by {fused / 2**20:.1f} MiB fused, {unfused / 2**20:.1f} MiB unfused"
    assert unfused >= logits_growth, report
    # At most a few weight-sized gradients (float32 accumulator, result, a matmul's output) and chunks.
    chunk_growth = max(MIN_CHUNK * extra_vocab * 4, h_bytes)
    assert fused <= 4 * weight_growth + 4 * chunk_growth, report   # the chunk, its exp, a temporary
    assert fused < unfused / 3, report
