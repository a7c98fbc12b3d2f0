"""Autoregressive generation over the rolling-buffer cache: chunked prefill, then one token at a time.

Sampling follows the usual order: logits / temperature -> keep the top_k largest -> keep the smallest set whose
probability reaches top_p (the nucleus) -> draw. temperature 0 means greedy (argmax), with no randomness at all.
top_k and top_p are None when off; set, they must be >= 1 and in (0, 1] (`check_sampling`).

Greedy decoding can also run speculatively (`draft_tokens > 0`): guess the next few tokens cheaply, score them all
in one forward pass, keep the longest run of guesses that the model's own argmax agrees with, plus the model's token
after it. Accepted guesses come cheap: at batch 1 a decode step is bound by reading every weight once, and one pass
over 1 + d tokens reads them once too (SmolLM2 on one CPU core: 7 tokens cost ~1.5 single steps). The tokens are
those of plain greedy decoding (up to floating-point near-ties: a chunk's logits may round unlike one token's).
The default guesser is prompt lookup: find the latest earlier occurrence of the text's last few tokens and copy what
followed it, which pays off on text that repeats itself (names, lists, code, quoted input).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from model.transformer import Transformer


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject settings that have no meaning, before any work: top_k 0 would keep no token and top_p 0 no nucleus."""
    if not temperature >= 0:  # NaN fails too
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, or None for no top-k cut, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], or None for no nucleus cut, got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]          # [B, 1] the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token, with nothing
        # before it (0 < top_p), always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | Iterable[int] | None = None,
             seed: int | None = None, chunk_size: int | None = None, draft_tokens: int = 0,
             draft: Callable[[list[int], int], list[int]] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one as soon as it is chosen; stop after eos_id.

    eos_id: one id or several (a checkpoint's generation_config.json may list more than one, e.g. an end-of-turn
    token beside EOS; `tokenizer.stop_ids`): generation stops after any of them.

    draft_tokens > 0 (greedy only): speculative decoding with up to that many guesses per forward pass, from
    `draft(context, n) -> up to n token ids` (default: `prompt_lookup`).
    """
    if not prompt:
        raise ValueError("generate() needs a non-empty prompt (at least a BOS token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
    if draft_tokens and temperature > 0:
        raise ValueError(f"draft_tokens (speculative decoding) works with greedy decoding only, got temperature "
                         f"{temperature}")
    if max_new_tokens == 0:
        return
    stops = frozenset(() if eos_id is None else (eos_id,) if isinstance(eos_id, int) else map(int, eos_id))
    if draft_tokens:
        yield from _greedy_speculative(model, prompt, max_new_tokens, stops, chunk_size, draft_tokens,
                                       draft or prompt_lookup)
        return
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
        if t in stops or i == max_new_tokens - 1:
            return
        logits = model(token.view(1, 1), cache)[:, -1]


def prompt_lookup(context: list[int], n: int, max_ngram: int = 3) -> list[int]:
    """Up to n guessed next tokens: what followed the latest earlier occurrence of the context's last max_ngram
    tokens (or, failing that, of fewer: down to the last token alone); [] when nothing matches."""
    for size in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):  # latest first: the freshest repetition
            if context[start:start + size] == tail:
                return context[start + size:start + size + n]
    return []


def _greedy_speculative(model: Transformer, prompt: list[int], max_new_tokens: int, stops: frozenset[int],
                        chunk_size: int | None, draft_tokens: int,
                        draft: Callable[[list[int], int], list[int]]) -> Iterator[int]:
    device = next(model.parameters()).device
    cache = model.make_cache(1, max_tokens=len(prompt) + max_new_tokens, lookahead=draft_tokens)
    token = int(model.prefill(torch.tensor([prompt], device=device), cache, chunk_size).argmax(-1))
    context, produced = list(prompt) + [token], 1
    yield token
    while token not in stops and produced < max_new_tokens:
        # Never guess past the last token asked for: a step yields the accepted guesses plus one token more.
        n = min(draft_tokens, max_new_tokens - produced - 1)
        guesses = [int(t) for t in draft(context, n)][:n]
        # The cache holds everything but the newest token: feed it with the guesses, [1, 1 + d].
        fed = torch.tensor([[token] + guesses], device=device)
        best = model(fed, cache)[0].argmax(-1).tolist()                  # best[i]: the greedy token after fed[i]
        accepted = 0
        while accepted < len(guesses) and guesses[accepted] == best[accepted]:
            accepted += 1
        cache.rewind(len(guesses) - accepted)                             # the keys of rejected guesses
        for token in guesses[:accepted] + [best[accepted]]:
            context.append(token)
            produced += 1
            yield token
            if token in stops or produced == max_new_tokens:
                return
