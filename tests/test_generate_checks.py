"""model/generate.py and model/cache.py at their edges: settings without meaning are refused up front, generation
runs under torch.autocast, and the rewind bound the cache states is the one it enforces (and a safe one)."""
from __future__ import annotations

import pytest
import torch

from model.args import ModelArgs
from model.generate import generate, sample
from model.transformer import Transformer


@pytest.fixture
def tiny():
    return Transformer(ModelArgs.from_name("tiny")).eval()  # window 5, GQA 4:2


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=1.0, top_k=-3), "top_k must be an integer >= 1"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=-0.2), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.01), r"top_p must be in \(0, 1\]"),
])
def test_meaningless_sampling_settings_are_refused(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(torch.randn(1, 8), **kwargs)
    with pytest.raises(ValueError, match=message):
        next(generate(tiny, [1, 2, 3], 4, **kwargs))


def test_smallest_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, top_p=1e-9, generator=g)) for _ in range(50)} == {4}
    assert {int(sample(logits, 1.0, top_k=1, generator=g)) for _ in range(50)} == {4}


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_negative_max_new_tokens_is_refused_before_any_work(tiny, monkeypatch, draft_tokens):
    monkeypatch.setattr(tiny, "prefill", lambda *a, **k: pytest.fail("prefilled despite max_new_tokens < 0"))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        next(generate(tiny, [1, 2, 3], -1, draft_tokens=draft_tokens))
    assert list(generate(tiny, [1, 2, 3], 0, draft_tokens=draft_tokens)) == []


def test_cache_under_autocast_gives_the_full_forward_logits(tiny):
    """k, v come out of the projections in bf16 while the cache holds float32; chunks of 3 > 1 exercise the
    general store (index_copy_), the steps after them the one-token store."""
    tokens = torch.randint(0, tiny.args.vocab_size, (1, 14))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = tiny(tokens).float()
        cache = tiny.make_cache(1, max_tokens=14)
        assert cache.k.dtype == torch.float32
        pieces = [tiny(tokens[:, :3], cache), tiny(tokens[:, 3:6], cache)]
        pieces += [tiny(tokens[:, i:i + 1], cache) for i in range(6, 14)]
    stepped = torch.cat(pieces, 1).float()
    assert full.dtype == torch.float32 and stepped.shape == full.shape
    # Both in bf16 products, chunked differently: equal to within bf16 rounding (a wrong key would be O(1) off).
    assert (stepped - full).abs().max() <= 0.05 * full.abs().max()


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_generate_runs_under_autocast(tiny, draft_tokens):
    """A smoke test: generate() used to stop with index_copy_'s dtype error under autocast. That the cache then
    gives the right logits is the test above."""
    prompt = torch.randint(0, tiny.args.vocab_size, (9,)).tolist()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = list(generate(tiny, prompt, 12, draft_tokens=draft_tokens))
    assert len(out) == 12 and all(0 <= t < tiny.args.vocab_size for t in out)


def test_rewind_message_states_the_bound_it_checks(tiny):
    window = tiny.args.sliding_window
    tokens = torch.randint(0, tiny.args.vocab_size, (1, 13))
    with torch.no_grad():
        cache = tiny.make_cache(1, max_tokens=100, lookahead=2)
        tiny(tokens[:, :12], cache)                                     # 12 > W + 2 = 7 slots: wrapped
        with pytest.raises(ValueError, match=r"at most capacity - window \+ 1 = 3; make it with lookahead >= 3"):
            cache.rewind(4)
        # ...and that bound is safe: with lookahead 3, taking back 4 = lookahead + 1 leaves a correct cache.
        cache = tiny.make_cache(1, max_tokens=100, lookahead=3)
        assert cache.capacity == window + 3
        tiny(tokens[:, :12], cache)
        cache.rewind(4)                                                 # back to position 8
        step = tiny(tokens[:, 12:13], cache)[0, -1]
        full = tiny(torch.cat((tokens[:, :8], tokens[:, 12:13]), 1))[0, -1]
    assert (step - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot rewind 2 of the 1 positions seen"):
        c = tiny.make_cache(1, max_tokens=10)
        with torch.no_grad():
            tiny(tokens[:, :1], c)
        c.rewind(2)
