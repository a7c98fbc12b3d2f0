"""A decoder as a sequence classifier (or regressor): a linear head on the hidden state of the last real token.

A causal decoder has no [CLS] token; the only position that has attended to the whole input is the last one, so
Curie (like Hugging Face's MistralForSequenceClassification) scores that position:

    tokens [B, T] -> Transformer.hidden -> h [B, T, dim] -> h[b, last real token of row b] [B, dim]
                  -> score (Linear dim -> n_outputs, no bias) -> [B, n_outputs]    (logits, or one value)

Batches are padded to a common length. Our decoder has no attention mask, so we pad on the right: a causal model
never lets a real token see the padding to its right, and each row's scores are exactly those of the row alone.
The picking itself does not depend on the side: it finds each row's last real token from the mask, so a
left-padded batch (what generation code builds) is pooled correctly too.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [B, T] (int64) and mask [B, T] (bool, True on real tokens), T = the longest sequence."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r} must be 'left' or 'right'")
    if not sequences or min(len(s) for s in sequences) == 0:
        raise ValueError("cannot pad an empty batch or an empty sequence")
    t = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.bool)
    for row, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        tokens[row, span] = torch.as_tensor(s, dtype=torch.long)
        mask[row, span] = True
    return tokens.to(device), mask.to(device)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] (True on real tokens) -> [B] position of each row's last real token, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    if (last < 0).any():
        raise ValueError("a row of the batch has no real token")
    return last


def pool_last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h [B, T, dim], mask [B, T] -> [B, dim]: each row's hidden state at its last real token."""
    return h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]


class SequenceHead(nn.Module):
    """`model` (our Transformer, possibly LoRA-wrapped) with a `score` head of n_outputs units."""

    def __init__(self, model: nn.Module, n_outputs: int):
        super().__init__()
        self.model = model
        dim = model.args.dim
        weight = next(model.parameters())
        # float32 whatever the decoder's storage dtype: the head is trained in full, like LoRA's own weights.
        self.score = nn.Linear(dim, n_outputs, bias=False, device=weight.device, dtype=torch.float32)
        # std 0.02, as Hugging Face initialises a fresh score layer: small logits, so the first steps are gentle.
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, T] -> [B, n_outputs] float32."""
        h = self.model.hidden(tokens)                   # [B, T, dim]
        return self.score(pool_last(h, mask).float())   # [B, dim] -> [B, n_outputs]
