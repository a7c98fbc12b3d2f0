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
