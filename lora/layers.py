"""LoRALinear: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021), as Curie-7B trains it.

    y = base(x) + scale * dropout(x) @ A.T @ B.T        A: [r, in_features], B: [out_features, r]

B starts at zero, so a freshly wrapped model computes exactly what the base model computed; A starts like an
nn.Linear weight (Kaiming-uniform, a=sqrt(5)), so the first gradient step on B is already informative. The scale is
alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023), which keeps the update's size from
shrinking as r grows.

The base may be any module with `in_features`, `out_features` and a forward (our quantised NF4 linear is wrapped
the same way as an nn.Linear). Only an nn.Linear base can be merged in place: W <- W + scale * B @ A.

Memory. The gradient of A needs the dropped-out input. nn.Dropout followed by a linear layer keeps two float copies
of x for it (the dropout's noise and its output), per adapter: with Curie's seven adapters per block that is more
than half of a LoRA step's activations. `_DropoutThenA` keeps x itself (q, k and v share one input, so they share
one saved x, as do gate and up) and the 64-bit seed of its mask, and rebuilds the dropped-out input in the backward
pass (model/kernels/dropout.py: the mask is a function of the seed, drawn and applied in one C pass on the CPU;
where that kernel does not run, a one-byte keep-mask is kept instead).
The masks are independent per adapter, as with nn.Dropout; the arithmetic is the same. Likewise, under autocast
a frozen float32 base keeps no bf16 copy of its weight for the backward (`frozen_linear`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.kernels import compute_dtype, linear, matmul_nt
from model.kernels import dropout as D
from model.kernels.nf4 import frozen_linear


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 shared_weight: bool = False):
        """`shared_weight`: the base's weight is also another module's (a head tied to the embeddings); merging
        must then give the head a weight of its own instead of silently changing the embeddings too."""
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be >= 1")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"LoRA dropout={dropout} must be in [0, 1]")
        for attr in ("in_features", "out_features"):
            if not isinstance(getattr(base, attr, None), int):
                raise TypeError(f"cannot wrap {type(base).__name__} with LoRA: it has no integer `{attr}`")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = dropout
        self.shared_weight = shared_weight
        self.merged = False
        # While a tied head is merged, its shared weight waits here to be restored. A plain list, because nn.Module
        # would register a Parameter attribute as one of ours (it is the embeddings', saved and counted there).
        self._set_aside: list[nn.Parameter] = []

        # The adapter lives where the base lives (the meta device included: the caller materialises it later), but
        # always in float32, whatever the base's storage: the optimiser updates these few weights, and bf16 would
        # round small steps away. The forward casts them to the input's dtype.
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        if self.merged:
            return y
        # [..., in] -> [..., r] -> [..., out], in the compute dtype (bf16 under autocast keeps its speed); dropout
        # only on this path, so the frozen base sees the clean input, as in the LoRA paper.
        down = self.lora_down(x)
        # In place into y (nothing keeps the base's output for its backward): no [..., out] temporaries beyond one.
        return y.add_(linear(down, self.lora_B.to(down.dtype)), alpha=self.scale)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autograd of F.linear under autocast keeps the bf16 copy of a float32 W it multiplied by, for dx = dy @ W:
        # 2 bytes per frozen parameter held from the forward to the backward, the whole model over again. W is in
        # memory anyway: frozen_linear (as for an NF4 base) casts it again in the backward instead.
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
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"a fused head needs a full-precision weight; {type(self.base).__name__} has none")
        if self.merged:
            return [(x, weight)]
        return [(x, weight), (self.scale * self.lora_down(x), self.lora_B)]

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A: [out_features, in_features], in float32 so that merging rounds only once, into W's dtype."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merge(self) -> None:
        """W <- W + scale * B @ A (float32 arithmetic, stored back in W's dtype); the forward then skips the update."""
        if self.merged:
            return
        weight = self._linear_weight("merge")
        merged = (weight.float() + self.delta_weight()).to(weight.dtype)
        with torch.no_grad():
            if self.shared_weight:
                # A tied head gets its own merged weight; the embeddings keep the shared one, restored on unmerge.
                self._set_aside.append(weight)
                self.base.weight = nn.Parameter(merged, requires_grad=False)
            else:
                weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - scale * B @ A, undoing `merge` (up to float rounding; exactly for a tied head)."""
        if not self.merged:
            return
        weight = self._linear_weight("unmerge")
        with torch.no_grad():
            if self.shared_weight:
                self.base.weight = self._set_aside.pop()
            else:
                weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _linear_weight(self, action: str) -> torch.Tensor:
        if not (isinstance(self.base, nn.Linear) and self.base.weight.is_floating_point()):
            raise TypeError(f"cannot {action} LoRA into a {type(self.base).__name__} base: only a full-precision "
                            "nn.Linear can absorb the update; load the adapter onto the full-precision model and "
                            "merge (or export) there")
        return self.base.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout:g}, merged={self.merged}")


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


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's weight (or, for a quantised layer, of its first parameter or buffer)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
