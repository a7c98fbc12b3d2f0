"""The loss's chunk step as a Triton kernel: softmax, loss and gradient of one chunk of logits, in place.

chunked_loss.py computes the output head and the cross-entropy a chunk of C tokens at a time; for each chunk of
logits [C, V] this kernel writes the per-token losses and overwrites the logits with d(sum loss)/d logits (the maths
and the reference: reference.chunk_step_reference). One program per token makes two passes over the vocabulary: an
online max / sum of exponentials, then the gradient. ignore_index tokens get neither loss nor gradient.
"""
from __future__ import annotations

import torch

from model.kernels._switch import jit, tl, triton


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


def chunk_step_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                       write_grad: bool) -> torch.Tensor:
    n_rows, vocab_size = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(vocab_size), 16384)
    _chunk_step_kernel[(n_rows,)](logits, targets, loss, vocab_size, ignore_index, label_smoothing,
                                  BLOCK_V=block_v, SMOOTHING=label_smoothing > 0, WRITE_GRAD=write_grad,
                                  num_warps=16 if block_v >= 8192 else 8)
    return loss
