"""Rotary position embedding (RoPE) on queries or keys, as a fused Triton kernel (reference.apply_rope_reference).

Mistral's convention rotates adjacent pairs: (x[2i], x[2i+1]) of every head is turned by the angle
pos * theta^(-2i/head_dim), as if it were the complex number x[2i] + j x[2i+1] multiplied by e^(j angle):

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

The reference (reference.py) says exactly that, as Mistral's own code does: the pairs viewed as complex numbers,
one complex product (on the CPU 7-12x faster than spelling out four real products and interleaving them again with
a stack). The kernel reads each pair once and writes it once. A rotation's transpose is the rotation by the
opposite angle, so the backward is the same kernel with sin negated, and nothing but the cos/sin tables (which the
caller already holds) is kept for it.
"""
from __future__ import annotations

import torch

from model.kernels._switch import jit, tl, triton


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads, n_pairs,
                 BLOCK_HEADS: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0)                           # one (batch, position) row of [B*T, H, Dh] per program
    pos = token % seq_len
    heads = tl.arange(0, BLOCK_HEADS)                                                # [H]
    pairs = tl.arange(0, BLOCK_PAIRS)                                                # [P]
    pair_mask = pairs < n_pairs
    c = tl.load(cos_ptr + pos * n_pairs + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * n_pairs + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    mask = (heads < n_heads)[:, None] & pair_mask[None, :]                           # [H, P]
    even = token.to(tl.int64) * n_heads * 2 * n_pairs + heads[:, None] * 2 * n_pairs + 2 * pairs[None, :]
    x0 = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + even, (x0 * c[None, :] - x1 * s[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + even + 1, (x0 * s[None, :] + x1 * c[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    b, t, h, dh = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    block_heads, block_pairs = triton.next_power_of_2(h), triton.next_power_of_2(dh // 2)
    _rope_kernel[(b * t,)](x, cos, sin, out, t, h, dh // 2, BLOCK_HEADS=block_heads, BLOCK_PAIRS=block_pairs,
                           INVERSE=inverse, num_warps=4 if block_heads * block_pairs <= 2048 else 8)
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, inverse=True), None, None   # the tables are constants: no gradient


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [B, T, H, head_dim] with an even head_dim, got {tuple(x.shape)}")
    expected = (x.shape[1], x.shape[-1] // 2)
    if cos.shape != expected or sin.shape != expected:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be [T, head_dim/2] = "
                         f"{expected} for x {tuple(x.shape)}")
    return RoPEFunction.apply(x, cos, sin)
