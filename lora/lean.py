"""LeanLoRALinear: LoRALinear (lora/layers.py) with the same arithmetic and less memory in training.

`model.fast.apply` swaps it in (and `lora.inject_lora` does on an accelerated model), so the reader of
lora/layers.py sees the idea and a training run gets this. Three differences, none in the result:

Dropout. The gradient of A needs the dropped-out input. nn.Dropout followed by a linear layer keeps two float copies
of x for it (the dropout's noise and its output), per adapter: with Curie's seven adapters per block that is more
than half of a LoRA step's activations. `_DropoutThenA` keeps x itself (q, k and v share one input, so they share
one saved x, as do gate and up) and the 64-bit seed of its mask, and rebuilds the dropped-out input in the backward
pass (model/kernels/cpu/dropout.py: the mask is a function of the seed, drawn and applied in one C pass on the CPU;
where that kernel does not run, a one-byte keep-mask is kept instead). The masks are independent per adapter, as
with nn.Dropout.

Frozen weight. Under autocast, F.linear on a frozen float32 base keeps the bf16 copy of W it multiplied by, for
dx = dy @ W: 2 bytes per frozen parameter held from the forward to the backward, the whole model over again.
W is in memory anyway: `frozen_linear` (as for an NF4 base) casts it again in the backward instead.

Fused head. `logit_terms` gives the layer's output as a sum of products, so that a head + loss fused over the
vocabulary (model.fast.FusedHeadLoss) takes the low-rank path as an extra term and never builds the logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lora.layers import LoRALinear
from model.kernels import compute_dtype, linear, matmul_nt
from model.kernels.cpu import dropout as D
from model.kernels.frozen_linear import frozen_linear


class LeanLoRALinear(LoRALinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        if self.merged:
            return y
        # [..., in] -> [..., r] -> [..., out], in the compute dtype (bf16 under autocast keeps its speed).
        down = self.lora_down(x)
        # In place into y (nothing keeps the base's output for its backward): no [..., out] temporaries beyond one.
        return y.add_(linear(down, self.lora_B.to(down.dtype)), alpha=self.scale)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if (isinstance(self.base, nn.Linear) and self.base.bias is None and not weight.requires_grad
                and torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)
                and weight.dtype != compute_dtype(x)):
            return frozen_linear(x, weight.to)
        return self.base(x)

    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) @ A.T: [..., in] -> [..., r]."""
        dtype = compute_dtype(x)
        if self.training and self.dropout > 0:
            return _DropoutThenA.apply(x, self.lora_A, self.dropout, dtype)
        return linear(x.to(dtype), self.lora_A.to(dtype))

    def logit_terms(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This layer's output as a sum of products x_k @ w_k.T, [(x, W), (scale * dropout(x) A^T, B)], for a fused
        head + loss (model.kernels.linear_cross_entropy) that never builds the [tokens, vocab] output."""
        weight = getattr(self.base, "weight", None)
        if weight is None and hasattr(self.base, "to_linear"):   # a base that rebuilds its exact weight (GGUFLinear)
            weight = self.base.dequantize(x.dtype)                # its own tensor: the loss keeps it for the backward
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"a fused head needs a full-precision weight; {type(self.base).__name__} has none")
        if self.merged:
            return [(x, weight)]
        return [(x, weight), (self.scale * self.lora_down(x), self.lora_B)]


class _DropoutThenA(torch.autograd.Function):
    """u = dropout(x, p) @ A.T, keeping x and its mask's seed (or, where the seeded kernel does not run, a bool
    mask) for the backward instead of two float copies.

        forward:   m = keep_mask(a fresh seed) [..., in],  u = ((x * m) / (1 - p)) @ A.T       [..., r]
        backward:  dA = du^T @ ((x * m) / (1 - p))     dx = ((du @ A) * m) / (1 - p)     (m rebuilt from the seed)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
        if D.seeded(x, dtype):
            ctx.seed, keep = D.draw_seed(), None
            dropped = D.dropout(x, ctx.seed, p, dtype)
        else:
            ctx.seed, keep = None, D.random_mask(x, p)
            dropped = D.apply_mask(x, keep, p, dtype)
        with torch.autocast(x.device.type, enabled=False):   # the products run in `dtype`, chosen by the caller
            u = matmul_nt(dropped, lora_A.to(dtype))
        ctx.save_for_backward(x, lora_A, keep)
        ctx.p, ctx.dtype = p, dtype
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable   # (no double backward: its graph would not include the mask)
    def backward(ctx, du: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, lora_A, keep = ctx.saved_tensors
        p, seed = ctx.p, ctx.seed

        def drop(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:   # the forward's mask, on another tensor
            return D.dropout(t, seed, p, dtype) if seed is not None else D.apply_mask(t, keep, p, dtype)
        du = du.to(ctx.dtype)
        dx = dA = None
        if ctx.needs_input_grad[1]:
            dropped = drop(x, ctx.dtype)                                                      # [..., in]
            dA = matmul_nt(du.flatten(0, -2).T, dropped.flatten(0, -2).T).to(lora_A.dtype)   # [r, in]
        if ctx.needs_input_grad[0]:
            dx = drop(matmul_nt(du, lora_A.to(ctx.dtype).T), x.dtype)                        # [..., in]
        return dx, dA, None, None
