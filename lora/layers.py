"""LoRALinear: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021), as Curie-7B trains it.

    y = base(x) + scale * dropout(x) @ A.T @ B.T        A: [r, in_features], B: [out_features, r]

B starts at zero, so a freshly wrapped model computes exactly what the base model computed; A starts like an
nn.Linear weight (Kaiming-uniform, a=sqrt(5)), so the first gradient step on B is already informative. The scale is
alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023), which keeps the update's size from
shrinking as r grows.

The base may be any module with `in_features`, `out_features` and a forward (our quantised NF4 linear is wrapped
the same way as an nn.Linear). Only an nn.Linear base can be merged in place: W <- W + scale * B @ A; a base that
rebuilds its exact float weight (`to_linear`) becomes that nn.Linear first.

This is the plain layer; training runs LeanLoRALinear (lora/lean.py), the same arithmetic with less memory, which
`model.fast.apply` swaps in.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self._set_aside: list[nn.Parameter | nn.Module] = []

        # The adapter lives where the base lives (the meta device included: the caller materialises it later), but
        # always in float32, whatever the base's storage: the optimiser updates these few weights, and bf16 would
        # round small steps away. The forward casts them to the input's dtype.
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:   # W already holds W + scale * B A
            return y
        # Dropout only on the low-rank path, so the frozen base sees the clean input, as in the LoRA paper. A and B
        # are float32 (see __init__); they take x's dtype (bf16 under autocast computes in bf16 either way).
        down = F.linear(F.dropout(x, self.dropout, self.training), self.lora_A.to(x.dtype))     # [..., r]
        return y + self.scale * F.linear(down, self.lora_B.to(x.dtype))                          # [..., out]

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A: [out_features, in_features], in float32 so that merging rounds only once, into W's dtype."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merge(self) -> None:
        """W <- W + scale * B @ A (float32 arithmetic, stored back in W's dtype); the forward then skips the update."""
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear) and hasattr(self.base, "to_linear"):
            # A frozen base in another exact format gives way to the nn.Linear of its very values, set aside (and
            # restored on unmerge) as a tied head's weight is.
            self._set_aside.append(self.base)
            self.base = self.base.to_linear()
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
        if self._set_aside and isinstance(self._set_aside[-1], nn.Module):
            self.base = self._set_aside.pop()   # the exact base set aside by merge
            self.merged = False
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


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's weight (or, for a quantised layer, of its first parameter or buffer)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
