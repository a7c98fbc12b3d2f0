"""`apply(model)`: swap the plain model's modules for faster equivalents, in place. `model.load` calls it by default.

The decoder in model/transformer.py and LoRALinear in lora/layers.py are written to be read: nn.Linear layers, a
loss that builds the logits and calls F.cross_entropy, LoRA as base(x) + scale * B A dropout(x). Each swap below
computes the same function (up to the order of float additions) with less time or memory, and each is a subclass
of the module it replaces with the same parameters, so a swap is a change of class: state-dict names, tied
weights, optimiser state and hooks stay as they were.

    nn.Linear          -> OneDNNLinear      products through `kernels.linear`: oneDNN for float32 on the CPU, where
                                            F.linear's BLAS runs a generic path (model/kernels/cpu/matmul.py)
    HeadLoss           -> FusedHeadLoss     head + cross-entropy chunked over the vocabulary, so the [tokens, vocab]
                                            logits never exist (model/kernels/chunked_loss.py); a LoRA head's
                                            low-rank path enters as an extra term
    LoRALinear         -> LeanLoRALinear    the memory-lean training variant (lora/lean.py): a seeded dropout mask
                                            rebuilt in the backward, no saved bf16 copy of a frozen float32 weight
    (at load, GGUF)    -> GGUFLinear        holds the file's 4/8-bit blocks instead of a float32 weight: decode steps
                                            read them, longer products dequantise per call (model/gguf_linear.py)

The other hot operations (RMSNorm, RoPE, SwiGLU, attention) already go through the one kernel switch,
`model.kernels`, which picks Triton on CUDA and C kernels for bf16 on the CPU per call; no swap is needed there.

`apply` is idempotent, and `lora.inject_lora` calls it again on a model that was accelerated, so the adapters it
adds are the lean ones without the caller asking. `load(..., fast=False)` or MINICURIE_FAST=0 gives the plain model.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from model import kernels
from model.gguf_linear import GGUFLinear
from model.transformer import HeadLoss


class OneDNNLinear(nn.Linear):
    """nn.Linear whose product is `kernels.linear` (oneDNN for float32 CPU tensors, F.linear elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class FusedHeadLoss(HeadLoss):
    """HeadLoss without the [tokens, vocab] logits: `kernels.linear_cross_entropy` over the head's products.

    The head as a sum of products x_k @ w_k.T: its weight, plus (a LeanLoRALinear head) the low-rank path; a
    GGUFLinear head's weight is its blocks dequantised for the call. A head that is none of these (say an NF4 one)
    takes the plain loss."""

    def forward(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = h.flatten(0, 1)                                         # [B*T, dim]
        if hasattr(head, "logit_terms"):
            terms = head.logit_terms(rows)
        elif isinstance(head, nn.Linear) and head.bias is None and head.weight.is_floating_point():
            terms = [(rows, head.weight)]
        elif isinstance(head, GGUFLinear):
            terms = [(rows, head.dequantize(rows.dtype))]   # its own tensor: the loss keeps it for the backward
        else:
            return super().forward(head, h, targets)                   # the plain loss takes h as it came
        (h, weight), *extra = terms
        return kernels.linear_cross_entropy(h, weight, targets.flatten(), extra_terms=tuple(extra))


def enabled(fast: bool | None = None) -> bool:
    """`fast` if given, else the environment: MINICURIE_FAST=0 asks for the plain model."""
    if fast is not None:
        return fast
    value = os.environ.get("MINICURIE_FAST", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"MINICURIE_FAST={value!r}: expected 1 (accelerated, the default) or 0 (the plain model)")
    return value in ("1", "true", "yes", "on")


def apply(model: nn.Module) -> nn.Module:
    """Swap every plain module of `model` for its fast equivalent (table above), in place; returns `model`."""
    from lora.layers import LoRALinear
    from lora.lean import LeanLoRALinear
    swaps = {nn.Linear: OneDNNLinear, HeadLoss: FusedHeadLoss, LoRALinear: LeanLoRALinear}
    for module in model.modules():
        fast = swaps.get(type(module))   # exact types: a subclass (already swapped, or someone's own) is left alone
        if fast is not None:
            module.__class__ = fast
    return model


def applied(model: nn.Module) -> bool:
    """Was `apply` called on this model (does any of its modules have a fast class)?"""
    from lora.lean import LeanLoRALinear
    return any(isinstance(m, (OneDNNLinear, FusedHeadLoss, LeanLoRALinear, GGUFLinear)) for m in model.modules())

