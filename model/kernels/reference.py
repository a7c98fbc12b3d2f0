"""The maths of the decoder's hot operations in plain PyTorch: the one file of model/kernels/ a learner reads.

Every fast path beside it computes one of these functions and is tested against it and against float64:
triton/ (the GPU kernels), cpu/ (the C kernels and oneDNN products), chunked_loss.py and swiglu_recompute.py (the
same arithmetic in PyTorch, keeping less memory for the backward). With MINICURIE_KERNELS=reference the switch in
__init__.py sends RMSNorm and RoPE here; SwiGLU then runs swiglu_reference's arithmetic without keeping silu(gate),
attention runs PyTorch's SDPA with the mask `causal_window_mask` spells out, and the loss runs the chunked
algorithm with `chunk_step_reference` as its step (the [N, V] logits of `linear_cross_entropy_reference` never exist).

Shapes: x [..., D] (D = dim), q [B, Hq, T, Dh], k and v [B, Hkv, T, Dh] (Hq a multiple of Hkv: grouped-query
attention), h [N, D] for the N tokens of a batch, the head's weight [V, D] for a vocabulary of V.
Each function computes in float32 whatever the storage dtype (float64 when a test passes float64) and returns the
input's dtype, as Mistral's reference code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight
# ---------------------------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the storage dtype (the mean of squares underflows in fp16/bf16), in float64 when
    # a test asks for exact arithmetic. Round back to x's dtype before the weight, as Mistral's reference does.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), Mistral's interleaved pairs: (x[2i], x[2i+1]) turned by pos * theta^(-2i/Dh)
#     out[2i] = x[2i] cos - x[2i+1] sin,   out[2i+1] = x[2i] sin + x[2i+1] cos
# ---------------------------------------------------------------------------------------------------------------

def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dh], cos/sin [T, Dh/2] -> x rotated. In float32 (float64 when a test asks for exact arithmetic),
    returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))   # [B, T, H, Dh/2, 2]
    z = torch.view_as_complex(xf.contiguous())                                       # x[2i] + j x[2i+1]
    rotation = torch.complex(cos.to(xf.dtype), sin.to(xf.dtype))[:, None, :]         # e^(j angle) [T, 1, Dh/2]
    return torch.view_as_real(z * rotation).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU's gating: the feed-forward is w2(silu(w1 x) * w3 x)
# ---------------------------------------------------------------------------------------------------------------

def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------------
# Causal sliding-window grouped-query attention: query i sees key j iff i - W < j <= i (W = sliding_window)
# ---------------------------------------------------------------------------------------------------------------

def causal_window_mask(seq_len: int, sliding_window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may see key j: i - W < j <= i (W = sliding_window, None: causal)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    keep = j <= i
    if sliding_window is not None:
        keep &= j > i - sliding_window
    return keep


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """What flash_attention computes, as a masked softmax in fp32 with the whole [T, T] score matrix."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    # Query head h reads KV head h // group (Mistral's repeat_kv), so repeat each KV head `group` times in a row.
    k = k.float().repeat_interleave(group, dim=1)                           # [B, Hq, T, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * scale                         # [B, Hq, T, T]
    scores = scores.masked_fill(~causal_window_mask(q.shape[-2], sliding_window, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The output head and the cross-entropy loss: mean over kept tokens of -log softmax(h @ weight.T)[target]
#     loss_i = (1 - eps) (lse - logits_i[target]) + eps (lse - mean_j logits_ij)     (eps: label smoothing)
#     grad_i = softmax(logits_i) - (1 - eps) onehot(target) - eps / V                 (d loss_i / d logits_i)
# ---------------------------------------------------------------------------------------------------------------

def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, label_smoothing: float = 0.0) -> torch.Tensor:
    # The loss in float32 whatever the storage dtype (float64 when a test asks for exact arithmetic).
    logits = h @ weight.T                                                            # [N, V]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def chunk_step_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                         write_grad: bool) -> torch.Tensor:
    """Per-token losses [C] (float32; 0 where ignored); with write_grad, logits [C, V] become d(sum loss)/d logits.

    The step of chunked_loss.py on one chunk of C tokens (the Triton and C chunk steps compute the same). In place
    where it can be: z is the logits themselves when they are float32, and the softmax is formed in z, so a chunk
    costs no [C, V] temporaries beyond a float32 copy of low-precision logits.
    """
    z = logits.float()                                                               # [C, V]
    lse = torch.logsumexp(z, dim=-1)                                                 # [C]
    kept = targets != ignore_index
    safe_targets = torch.where(kept, targets, 0)[:, None]                            # [C, 1]
    loss = lse - z.gather(1, safe_targets)[:, 0]
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if write_grad:
        grad = z.sub_(lse[:, None]).exp_()                                           # softmax, in z's memory
        grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, label_smoothing - 1, dtype=grad.dtype))
        if label_smoothing:
            grad -= label_smoothing / z.shape[1]
        grad.mul_(kept[:, None])
        if grad.data_ptr() != logits.data_ptr():
            logits.copy_(grad)
    return torch.where(kept, loss, 0.0)
