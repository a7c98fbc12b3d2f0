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
(and 1 / kept tokens, which turns the summed loss into the mean). The default chunk keeps [C, V] about the size of h,
and at least 256 tokens long.

The per-chunk step (softmax, loss, gradient in place) is a Triton kernel on the Triton path (triton/cross_entropy.py),
a C kernel for bf16 logits on the CPU (cpu/cross_entropy.py), elsewhere reference.chunk_step_reference: this file is
the algorithm, the same on every device. ignore_index tokens contribute neither loss nor gradient; optional label
smoothing eps mixes in the uniform distribution as F.cross_entropy does:

    loss_i = (1 - eps) (lse - logits_i[target]) + eps (lse - mean_j logits_ij)
    grad_i = softmax(logits_i) - (1 - eps) onehot(target) - eps / V
"""
from __future__ import annotations

import torch

from model.kernels.cpu.matmul import matmul_nt
from model.kernels.triton.cross_entropy import chunk_step_triton


MIN_CHUNK = 256   # tokens: each chunk reads the whole [V, D] weight (twice), so a chunk must be worth a read


def _default_chunk_size(n: int, dim: int, vocab_size: int) -> int:
    # A [C, V] chunk about as large as h [N, D], rounded up to a power of two (at most twice as large), but at
    # least MIN_CHUNK tokens: with a narrow model and a wide vocabulary (SmolLM2: D = 576, V = 49152) the size rule
    # alone gives chunks of 8 tokens, and the head's weight is streamed from memory 2 x N / 8 times per step.
    tokens = max(1, -(-n * dim // vocab_size))
    return min(n, max(MIN_CHUNK, 1 << (tokens - 1).bit_length()))


def _chunked_loss_and_grads(terms: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                            ignore_index: int, label_smoothing: float, chunk_size: int, use_triton: bool,
                            needs_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Summed loss over kept tokens (float32 scalar) and its gradients w.r.t. each term's x and w (in order
    x_0, w_0, x_1, w_1, ...; None where needs_grad says no), for logits = sum_k x_k @ w_k.T.

    The terms are already in the compute dtype. Weight gradients accumulate in float32.
    """
    from model.kernels.cpu.cross_entropy import chunk_step_cpu   # at first use: the decoder's import builds no C
    step = chunk_step_triton if use_triton else chunk_step_cpu
    n = targets.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=targets.device)
    grads: list[torch.Tensor | None] = []
    for k, (x, w) in enumerate(terms):
        grads.append(torch.empty(x.shape, dtype=x.dtype, device=x.device) if needs_grad[2 * k] else None)
        grads.append(torch.zeros(w.shape, dtype=torch.float32, device=w.device) if needs_grad[2 * k + 1] else None)
    write_grad = any(needs_grad)
    for s in range(0, n, chunk_size):
        rows = slice(s, s + chunk_size)
        logits = matmul_nt(terms[0][0][rows], terms[0][1])                           # [C, V]
        for x, w in terms[1:]:
            logits.addmm_(x[rows], w.T)
        losses[rows] = step(logits, targets[rows], ignore_index, label_smoothing, write_grad=write_grad)
        for k, (x, w) in enumerate(terms):   # logits now hold d loss / d logits
            dx, dw = grads[2 * k], grads[2 * k + 1]
            if dx is not None:
                dx[rows] = matmul_nt(logits, w.T)                                    # [C, V] @ [V, D_k]
            if dw is not None:
                dw += matmul_nt(logits.T, x[rows].T).float()                         # [V, C] @ [C, D_k]
    return losses.sum(), grads


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: autocast's where it is on (as F.linear would), else the input's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, targets: torch.Tensor, ignore_index: int, label_smoothing: float, chunk_size: int,
                use_triton: bool, compute_dtype: torch.dtype, *flat: torch.Tensor) -> torch.Tensor:
        # flat = x_0, w_0, x_1, w_1, ...; autocast stays off inside: the products run in compute_dtype, chosen
        # by the caller, and the gradients come back in each input's own dtype.
        terms = [(flat[i].to(compute_dtype), flat[i + 1].to(compute_dtype)) for i in range(0, len(flat), 2)]
        needs_grad = list(ctx.needs_input_grad[6:])
        loss_sum, grads = _chunked_loss_and_grads(terms, targets, ignore_index, label_smoothing, chunk_size,
                                                  use_triton, needs_grad)
        n_kept = (targets != ignore_index).sum()
        ctx.grad_slots = [g is not None for g in grads]
        ctx.dtypes = [t.dtype for t in flat]
        ctx.save_for_backward(n_kept, *(g for g in grads if g is not None))
        return loss_sum / n_kept   # no kept token: 0 / 0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, dloss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n_kept, *saved = ctx.saved_tensors
        scale = dloss / n_kept.clamp(min=1)   # ... and zero gradients, as F.cross_entropy
        saved_iter = iter(saved)
        grads = []
        for has_grad, dtype in zip(ctx.grad_slots, ctx.dtypes):
            grads.append((next(saved_iter) * scale).to(dtype) if has_grad else None)
        return (None,) * 6 + tuple(grads)


def linear_cross_entropy_fused(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               chunk_size: int | None = None, use_triton: bool = False,
                               extra_terms: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T + sum x @ w.T over extra_terms, targets) without [N, V] logits.

    extra_terms are further (x [N, d], w [V, d]) products added to the logits: a LoRA head adds
    (scale * dropout(h) @ A.T, B), so its gradients come out of the same chunks without a [V, D] gradient of the
    frozen weight. use_triton picks the per-chunk kernel. The products run in autocast's dtype where autocast is on,
    else in h's dtype (every term is cast to it); each gradient comes back in its input's dtype.
    """
    terms = [(h, weight), *extra_terms]
    for i, (x, w) in enumerate(terms):
        name = "h, weight" if i == 0 else f"extra_terms[{i - 1}]"
        if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[0] != h.shape[0] \
                or w.shape[0] != weight.shape[0]:
            raise ValueError(f"linear_cross_entropy: {name} have shapes {tuple(x.shape)}, {tuple(w.shape)}; "
                             f"they must be [N, d] = [{h.shape[0]}, d] and [V, d] = [{weight.shape[0]}, d]")
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
    flat = [t for term in terms for t in term]
    dtype = compute_dtype(h)
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        with torch.autocast(h.device.type, enabled=False):
            return LinearCrossEntropyFunction.apply(targets, ignore_index, label_smoothing, chunk_size, use_triton,
                                                    dtype, *flat)
    # Evaluation (perplexity): the loss alone, no gradient buffers.
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        loss_sum, _ = _chunked_loss_and_grads([(x.to(dtype), w.to(dtype)) for x, w in terms], targets,
                                              ignore_index, label_smoothing, chunk_size, use_triton,
                                              [False] * len(flat))
    return loss_sum / (targets != ignore_index).sum()
