"""Autoregressive generation over the rolling-buffer cache: chunked prefill, then one token at a time.

Sampling follows the usual order: logits / temperature -> keep the top_k largest -> keep the smallest set whose
probability reaches top_p (the nucleus) -> draw. temperature 0 means greedy (argmax), with no randomness at all.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from model.transformer import Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]          # [B, 1] the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, chunk_size: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one as soon as it is chosen; stop after eos_id."""
    if not prompt:
        raise ValueError("generate() needs a non-empty prompt (at least a BOS token)")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.make_cache(1, max_tokens=len(prompt) + max_new_tokens)
    logits = model.prefill(torch.tensor([prompt], device=device), cache, chunk_size)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        t = int(token)
        yield t
        if t == eos_id or i == max_new_tokens - 1:
            return
        logits = model(token.view(1, 1), cache)[:, -1]
