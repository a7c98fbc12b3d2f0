"""The output head and the cross-entropy loss fused: mean over kept tokens of -log softmax(h @ weight.T)[target].

Unfused, h [N, D] @ weight.T [D, V] materialises [N, V] logits, then autograd keeps them and creates a gradient of
the same size: at 8192 tokens and Mistral's 32000-word vocabulary, 1 GiB per float32 copy, more than the rest of a
LoRA step's activations. Here tokens are processed in chunks of C, and for each chunk

    logits = h_c @ weight.T                          [C, V], the only vocabulary-wide buffer
    loss_i = logsumexp(logits_i) - logits_i[target_i]
    logits <- d loss / d logits = softmax(logits) - onehot(target)     (in place: the logits are not needed again)
    dh_c   = logits @ weight                         [C, D]
    dweight += logits.T @ h_c                        [V, D], accumulated in float32

so the gradients are computed during the forward pass and the backward only scales them by the incoming gradient
(and 1 / kept tokens, which turns the summed loss into the mean). The default chunk keeps [C, V] about the size of h.

The per-chunk step (softmax, loss, gradient in place) is a Triton kernel on the Triton path, one program per token
making two passes over the vocabulary (an online max / sum of exponentials, then the gradient); on the reference
path the same step is written in PyTorch. ignore_index tokens contribute neither loss nor gradient; optional label
smoothing eps mixes in the uniform distribution as F.cross_entropy does:

    loss_i = (1 - eps) (lse - logits_i[target]) + eps (lse - mean_j logits_ij)
    grad_i = softmax(logits_i) - (1 - eps) onehot(target) - eps / V
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels._switch import jit, tl, triton


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, label_smoothing: float = 0.0) -> torch.Tensor:
    # The loss in float32 whatever the storage dtype (float64 when a test asks for exact arithmetic).
    logits = h @ weight.T                                                            # [N, V]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def _chunk_step_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                          write_grad: bool) -> torch.Tensor:
    """Per-token losses [C] (float32; 0 where ignored); with write_grad, logits [C, V] become d(sum loss)/d logits."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)                                                 # [C]
    kept = targets != ignore_index
    safe_targets = torch.where(kept, targets, 0)[:, None]                            # [C, 1]
    loss = lse - z.gather(1, safe_targets)[:, 0]
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if write_grad:
        grad = torch.exp(z - lse[:, None])
        grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, label_smoothing - 1, dtype=grad.dtype))
        grad -= label_smoothing / z.shape[1]
        grad *= kept[:, None]
        logits.copy_(grad)
    return torch.where(kept, loss, 0.0)


@jit
def _chunk_step_kernel(logits_ptr, targets_ptr, loss_ptr, vocab_size, ignore_index, label_smoothing,
                       BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * vocab_size
    target = tl.load(targets_ptr + row)
    kept = target != ignore_index
    # Pass 1: running max m and sum d of exp(z - m) over the vocabulary, block by block (online softmax).
    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if SMOOTHING:
            z_sum += tl.sum(tl.where(cols < vocab_size, z, 0.0), axis=0)
    lse = m + tl.log(d)
    z_target = tl.load(row_ptr + target, mask=kept, other=0.0).to(tl.float32)
    loss = lse - z_target
    if SMOOTHING:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z_sum / vocab_size)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    # Pass 2: overwrite the logits with the gradient; an ignored token's row becomes zeros.
    if WRITE_GRAD:
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab_size
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(cols == target, 1 - label_smoothing, 0.0)
            if SMOOTHING:
                grad -= label_smoothing / vocab_size
            grad = tl.where(kept, grad, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_step_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                       write_grad: bool) -> torch.Tensor:
    n_rows, vocab_size = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(vocab_size), 16384)
    _chunk_step_kernel[(n_rows,)](logits, targets, loss, vocab_size, ignore_index, label_smoothing,
                                  BLOCK_V=block_v, SMOOTHING=label_smoothing > 0, WRITE_GRAD=write_grad,
                                  num_warps=16 if block_v >= 8192 else 8)
    return loss


def _default_chunk_size(n: int, dim: int, vocab_size: int) -> int:
    # A [C, V] chunk about as large as h [N, D], rounded up to a power of two (at most twice as large).
    tokens = max(1, -(-n * dim // vocab_size))
    return min(n, 1 << (tokens - 1).bit_length())


def _chunked_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            label_smoothing: float, chunk_size: int, use_triton: bool, need_dh: bool,
                            need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over kept tokens (float32 scalar) and the gradients of that sum w.r.t. h and weight."""
    step = _chunk_step_triton if use_triton else _chunk_step_reference
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None   # contiguous: mm's out=
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dweight else None
    for s in range(0, h.shape[0], chunk_size):
        h_c = h[s:s + chunk_size]                                                    # [C, D]
        logits = h_c @ weight.T                                                      # [C, V]
        losses[s:s + chunk_size] = step(logits, targets[s:s + chunk_size], ignore_index, label_smoothing,
                                        write_grad=need_dh or need_dweight)
        if need_dh:
            torch.mm(logits, weight, out=dh[s:s + chunk_size])
        if need_dweight:
            dweight += logits.T @ h_c
    return losses.sum(), dh, dweight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                label_smoothing: float, chunk_size: int, use_triton: bool) -> torch.Tensor:
        loss_sum, dh, dweight = _chunked_loss_and_grads(
            h, weight, targets, ignore_index, label_smoothing, chunk_size, use_triton,
            need_dh=ctx.needs_input_grad[0], need_dweight=ctx.needs_input_grad[1])
        n_kept = (targets != ignore_index).sum()
        ctx.save_for_backward(dh, dweight, n_kept)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_kept   # no kept token: 0 / 0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, dloss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dweight, n_kept = ctx.saved_tensors
        scale = dloss / n_kept.clamp(min=1)   # ... and zero gradients, as F.cross_entropy
        dh = dh * scale.to(dh.dtype) if dh is not None else None
        dweight = (dweight * scale).to(ctx.weight_dtype) if dweight is not None else None
        return dh, dweight, None, None, None, None, None


def linear_cross_entropy_fused(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               chunk_size: int | None = None, use_triton: bool = False) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets) without [N, V] logits; use_triton picks the per-chunk kernel."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} must be [N, D] and weight "
                         f"{tuple(weight.shape)} [V, D]")
    if h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}")
    if targets.shape != (h.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} {targets.dtype} must be integer "
                         f"class indices [N] = [{h.shape[0]}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must be in [0, 1]")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside the vocabulary "
                         f"[0, {weight.shape[0]}) and is not ignore_index={ignore_index}")
    chunk_size = chunk_size or _default_chunk_size(h.shape[0], h.shape[1], weight.shape[0])
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(h, weight, targets, ignore_index, label_smoothing, chunk_size,
                                                use_triton)
    # Evaluation (perplexity): the loss alone, no gradient buffers.
    loss_sum, _, _ = _chunked_loss_and_grads(h, weight, targets, ignore_index, label_smoothing, chunk_size,
                                             use_triton, need_dh=False, need_dweight=False)
    return loss_sum / (targets != ignore_index).sum()
