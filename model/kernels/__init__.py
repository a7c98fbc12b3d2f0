"""The decoder's hot operations: one switch in front of their plain-PyTorch maths and the fast paths that compute it.

What the folder holds, grouped by what each piece is for:

    __init__.py          the switch: each operation picks its path per call (this file)
    _switch.py           which path may run: MINICURIE_KERNELS=auto|triton|reference, or `with use_kernels(...)`
    reference.py         the maths, in plain PyTorch: rms_norm, apply_rope, swiglu, attention + causal_window_mask,
                         the head + cross-entropy and its chunk step. Read this one; every fast path is tested
                         against it and against float64.
    chunked_loss.py      the head + loss a chunk of tokens at a time, so the [N, V] logits never exist   } plain
    swiglu_recompute.py  SwiGLU keeping gate and up, not silu(gate), for the backward                    } PyTorch,
    frozen_linear.py     x @ W.T for a frozen W rebuilt on demand (the NF4 base), no W kept for backward  } any device
    triton/              the GPU kernels, one file per operation, forward and backward: rms_norm, rope, swiglu,
                         flash_attention, cross_entropy (chunked_loss's step), nf4 (dequantisation)
    cpu/                 the CPU side: build.py compiles each C source at first use and loads it with ctypes;
                         cpu_vec.h (shared by the C files) beside them, as the build's cache key wants. attention,
                         swiglu, cross_entropy (chunked_loss's step): bf16 kernels for training under autocast;
                         dropout (a mask rebuilt from a seed); nf4.c (its wrapper is model/nf4.py); gguf_blocks
                         (decode products from a GGUF's 4/8-bit blocks); matmul.py (float32 products in oneDNN)

chunked_loss.py, swiglu_recompute.py and frozen_linear.py sit at the top because they are algorithms, not kernels:
the same PyTorch on every device, with the per-chunk or per-element work handed to triton/ or cpu/ where those run.
Formats keep their PyTorch reference beside their kernel (cpu/dropout.py's stream, model/nf4.py's dequantisation,
cpu/gguf_blocks.py's block product): each is the exact specification one kernel is compared with bit for bit, not
part of the decoder's maths.

Which path runs: the Triton kernels for CUDA tensors, the references everywhere else; `linear` is cuBLAS on CUDA
and oneDNN for float32 products on the CPU (cpu/matmul.py). In auto mode `attention` also takes PyTorch's SDPA
where the flash kernel has no tiles (head_dim other than 16/32/64/128), and SDPA is its CPU path. On the CPU, bf16
tensors (training under autocast) take the C kernels where a C compiler is present: attention of a whole causal
sequence (oneDNN products around a C softmax), SwiGLU and the loss's chunk step; LoRA's dropout (lora/lean.py)
rebuilds its mask from a seed, in C for float32 and bf16 alike. The C side is imported at its first call, so
importing the decoder neither imports the build helper nor compiles anything. MINICURIE_KERNELS=reference turns
every fast path off. `TRITON_INTERPRET=1` (set before anything imports triton) runs the Triton path on the CPU,
which is how the tests check it.

Call signatures (the decoder relies on these; `Transformer(tokens, targets=...)` uses linear_cross_entropy):
    rms_norm(x[..., D], weight[D], eps) -> [..., D]                  x's dtype (promoted with weight's)
    apply_rope(x[B, T, H, Dh], cos[T, Dh/2], sin[T, Dh/2]) -> x       interleaved pairs (Mistral's convention)
    swiglu(gate[..., F], up[..., F]) -> silu(gate) * up
    attention(q[B, Hq, T, Dh], k[B, Hkv, T, Dh], v[B, Hkv, T, Dh], sliding_window) -> [B, Hq, T, Dh]
        causal over one whole sequence; query i sees key j iff i - W < j <= i (W = sliding_window, None: causal)
    linear(x[..., in], weight[out, in], bias=None) -> x @ weight.T + bias   oneDNN for float32 on the CPU
    linear_cross_entropy(h[N, D], weight[V, D], targets[N], ignore_index=-100, label_smoothing=0.0,
                         extra_terms=((x[N, d], w[V, d]), ...))
        -> mean loss over kept tokens of logits h @ weight.T (+ x @ w.T for each extra term: a LoRA head's
           low-rank path); always chunked, so the [N, V] logits never exist (see chunked_loss.py)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels._switch import current_mode, use_kernels, use_triton
from model.kernels.chunked_loss import compute_dtype, linear_cross_entropy_fused
from model.kernels.cpu.matmul import eager_only, linear, matmul_nt
from model.kernels.reference import apply_rope_reference, attention_reference, causal_window_mask, rms_norm_reference
from model.kernels.swiglu_recompute import swiglu_recompute
from model.kernels.triton.flash_attention import flash_attention as flash_attention_triton
from model.kernels.triton.flash_attention import supports as flash_attention_supports
from model.kernels.triton.rms_norm import rms_norm_triton
from model.kernels.triton.rope import apply_rope_triton
from model.kernels.triton.swiglu import swiglu_triton

__all__ = ["rms_norm", "apply_rope", "swiglu", "attention", "linear", "matmul_nt", "linear_cross_entropy",
           "compute_dtype", "causal_window_mask", "attention_reference", "use_kernels", "eager_only"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton(x, cos, sin):
        return apply_rope_triton(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up):
        return swiglu_triton(gate, up)
    return swiglu_recompute(gate, up)   # the reference's arithmetic, saving one tensor fewer for the backward


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    # The kernel's tiles take head_dim 16/32/64/128 only: in auto mode anything else (e.g. head_dim 80 or 96) runs
    # on SDPA below; a forced "triton" path still goes to the kernel, which says what it cannot do.
    if use_triton(q, k, v) and (current_mode() == "triton" or flash_attention_supports(q, k, v)):
        return flash_attention_triton(q, k, v, sliding_window)
    # bf16 on the CPU (training under autocast): oneDNN products around a C softmax, ~2x SDPA (cpu/attention.py),
    # imported at first use, so that importing the decoder builds and imports no C.
    from model.kernels.cpu import attention as c_attention
    if c_attention.supports(q, k, v, sliding_window):
        return c_attention.attention_cpu(q, k, v)
    # Elsewhere PyTorch's fused attention, with the mask that attention_reference spells out.
    t = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if sliding_window is None or sliding_window >= t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_window_mask(t, sliding_window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         extra_terms: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()) -> torch.Tensor:
    return linear_cross_entropy_fused(h, weight, targets, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, use_triton=use_triton(h, weight),
                                      extra_terms=extra_terms)
