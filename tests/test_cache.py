"""The rolling-buffer cache: chunked prefill and decoding give the logits of one full forward pass."""
import pytest
import torch

from model.args import ModelArgs
from model.generate import generate, sample
from model.transformer import Transformer


@pytest.fixture
def tiny():
    args = ModelArgs.from_name("tiny")  # window 5, GQA 4:2
    return Transformer(args).eval()


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 37])
def test_chunked_prefill_equals_full_forward(tiny, chunk):
    tokens = torch.randint(0, tiny.args.vocab_size, (2, 37))  # prompt much longer than W = 5
    with torch.no_grad():
        full = tiny(tokens)
        cache = tiny.make_cache(2)
        pieces = [tiny(tokens[:, s:s + chunk], cache) for s in range(0, 37, chunk)]
    assert cache.capacity == tiny.args.sliding_window
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


def test_cache_memory_stops_growing_at_the_window(tiny):
    small, big = tiny.make_cache(1, max_tokens=100), tiny.make_cache(1, max_tokens=10_000)
    assert small.nbytes() == big.nbytes()
    assert tiny.make_cache(1, max_tokens=3).capacity == 3


def test_no_window_model_cache_and_overflow():
    args = ModelArgs.from_name("tiny")
    args.sliding_window = None
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(1, max_tokens=20)
        got = torch.cat([model(tokens[:, s:s + 6], cache) for s in range(0, 20, 6)], 1)
        assert (got - full).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="exceed"):
            model(tokens[:, :1], cache)


def test_greedy_generation_equals_argmax_of_full_forward(tiny):
    prompt = torch.randint(0, tiny.args.vocab_size, (12,)).tolist()
    out = list(generate(tiny, prompt, 15))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            seq.append(int(tiny(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_generation_stops_at_eos(tiny):
    prompt = [3, 4, 5]
    first = next(iter(generate(tiny, prompt, 5)))
    assert list(generate(tiny, prompt, 5, eos_id=first)) == [first]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {3, 4}
    # softmax of [0..4]: p(4) = 0.636, p(3) = 0.234: top_p 0.5 keeps only 4, 0.8 keeps 3 and 4.
    assert {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(100)} == {4}
    assert {int(sample(logits, 1.0, top_p=0.8, generator=g)) for _ in range(300)} == {3, 4}
    assert int(sample(logits, 0.0)) == 4


def test_cache_smaller_than_window_refuses_to_wrap(tiny):
    cache = tiny.make_cache(1, max_tokens=3)  # window 5: wrapping after 3 would drop keys still in view
    with torch.no_grad():
        tiny(torch.randint(0, tiny.args.vocab_size, (1, 3)), cache)
        with pytest.raises(ValueError, match="exceed"):
            tiny(torch.randint(0, tiny.args.vocab_size, (1, 1)), cache)


# Speculative greedy decoding: guesses checked in one forward pass, rejected ones rewound out of the rolling cache.

def _float64_model(window: int | None) -> Transformer:
    args = ModelArgs.from_name("tiny")
    args.sliding_window = window
    # float64: the chunk of guesses and the single-token steps round differently; float64 keeps argmax ties away.
    return Transformer(args).double().eval()


def _plain_greedy(model, prompt, n, eos_id=None):
    return list(generate(model, prompt, n, eos_id=eos_id))


@pytest.mark.parametrize("window", [5, None])
@pytest.mark.parametrize("guesser", ["lookup", "oracle", "corrupted", "random"])
def test_speculative_greedy_equals_plain_greedy(window, guesser):
    model = _float64_model(window)
    gen = torch.Generator().manual_seed(1)
    vocab = model.args.vocab_size
    # A prompt that repeats itself, so that prompt lookup has something to find.
    motif = torch.randint(0, vocab, (4,), generator=gen).tolist()
    prompt = torch.randint(0, vocab, (6,), generator=gen).tolist() + motif * 3
    new = 40                                     # the window of 5 wraps many times
    expected = _plain_greedy(model, prompt, new)

    def oracle(context, n):                       # the true continuation: every guess accepted
        done = len(context) - len(prompt)
        return expected[done:done + n]

    def corrupted(context, n):                    # true, then wrong from a random point on: partial acceptance
        guesses = oracle(context, n)
        if guesses:
            i = int(torch.randint(0, len(guesses), (1,), generator=gen))
            guesses[i] = (guesses[i] + 1) % vocab
        return guesses

    def random_guess(context, n):                 # almost always rejected: the rewind path at every step
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    draft = {"lookup": None, "oracle": oracle, "corrupted": corrupted, "random": random_guess}[guesser]
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    got = list(generate(model, prompt, new, draft_tokens=4, draft=draft))
    hook.remove()
    assert got == expected
    decode_steps = len(calls)                     # the prefill runs through model.prefill, not forward
    if guesser == "oracle":
        assert decode_steps == -(-(new - 1) // 5)  # 4 guesses + 1 token per step after the prefill's token
    if guesser in ("random", "corrupted"):
        assert max(calls) > 1                     # guesses were fed (and mostly rejected)


def test_speculative_greedy_stops_at_eos_and_at_max_new_tokens():
    model = _float64_model(5)
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    expected = _plain_greedy(model, prompt, 12)
    for eos in (expected[0], expected[5]):
        got = list(generate(model, prompt, 12, eos_id=eos, draft_tokens=3))
        assert got == _plain_greedy(model, prompt, 12, eos_id=eos) and got[-1] == eos
    for n in (0, 1, 2, 7):
        oracle = lambda context, k: expected[len(context) - len(prompt):][:k + 3]  # noqa: E731 (too many: cut to k)
        assert list(generate(model, prompt, n, draft_tokens=3, draft=oracle)) == expected[:n]


def test_speculative_decoding_refuses_sampling_and_negative_drafts(tiny):
    with pytest.raises(ValueError, match="greedy"):
        list(generate(tiny, [1, 2, 3], 4, temperature=0.7, draft_tokens=3))
    with pytest.raises(ValueError, match="draft_tokens"):
        list(generate(tiny, [1, 2, 3], 4, draft_tokens=-1))


def test_prompt_lookup_copies_what_followed_the_latest_match():
    from model.generate import prompt_lookup
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]      # latest of two matches
    assert prompt_lookup([5, 6, 7, 8, 0, 6], 3) == [7, 8, 0]                      # falls back to one token
    assert prompt_lookup([1, 2, 3, 4], 3) == []                                   # nothing repeats
    assert prompt_lookup([4], 3) == []


def test_rewind_refuses_to_undo_more_than_the_lookahead_once_wrapped(tiny):
    cache = tiny.make_cache(1, max_tokens=100, lookahead=2)
    assert cache.capacity == tiny.args.sliding_window + 2
    with torch.no_grad():
        tiny(torch.randint(0, tiny.args.vocab_size, (1, 12)), cache)    # 12 > 7 slots: wrapped
    cache.rewind(3)                                                      # lookahead 2 -> W + 2 - W + 1 = 3
    with pytest.raises(ValueError, match="lookahead"):
        cache.rewind(4)
    with pytest.raises(ValueError, match="rewind"):
        tiny.make_cache(1, max_tokens=10).rewind(1)                      # nothing cached yet
