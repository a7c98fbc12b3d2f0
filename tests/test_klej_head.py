"""The classification head picks each row's last real token, for left- and right-padded batches alike."""
import pytest
import torch

from klej.head import SequenceHead, last_token_index, pad_batch, pool_last
from model import ModelArgs, Transformer


def _random_sequences(gen: torch.Generator, n: int, vocab: int = 256) -> list[list[int]]:
    lengths = torch.randint(1, 12, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (t,), generator=gen).tolist() for t in lengths]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", range(3))
def test_pad_batch_places_tokens_and_mask(side, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = _random_sequences(gen, 6)
    tokens, mask = pad_batch(seqs, pad_id=0, side=side)
    width = max(map(len, seqs))
    assert tokens.shape == mask.shape == (6, width)
    for row, s in enumerate(seqs):
        real = list(range(len(s))) if side == "right" else list(range(width - len(s), width))
        assert tokens[row, real].tolist() == s
        assert mask[row].nonzero().flatten().tolist() == real
        assert (tokens[row, ~mask[row]] == 0).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", range(3))
def test_pooling_picks_the_last_real_token(side, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = _random_sequences(gen, 7)
    _, mask = pad_batch(seqs, pad_id=0, side=side)
    h = torch.randn(*mask.shape, 5, generator=gen)
    pooled = pool_last(h, mask)
    for row in range(len(seqs)):                           # brute force: scan the row for its last True
        last = max(t for t in range(mask.shape[1]) if mask[row, t])
        assert last_token_index(mask)[row].item() == last
        torch.testing.assert_close(pooled[row], h[row, last], rtol=0, atol=0)


def test_a_row_without_tokens_is_refused():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(mask)


def test_right_padded_batch_scores_each_row_as_if_alone():
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    head = SequenceHead(model, n_outputs=3).eval()
    seqs = _random_sequences(torch.Generator().manual_seed(7), 5)
    tokens, mask = pad_batch(seqs, pad_id=0, side="right")
    with torch.no_grad():
        batched = head(tokens, mask)
        for row, s in enumerate(seqs):
            alone = head.score(model.hidden(torch.tensor([s]))[0, -1])
            torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_scores_the_final_position():
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    head = SequenceHead(model, n_outputs=2).eval()
    seqs = _random_sequences(torch.Generator().manual_seed(8), 4)
    tokens, mask = pad_batch(seqs, pad_id=0, side="left")
    with torch.no_grad():
        expected = head.score(model.hidden(tokens)[:, -1])
        torch.testing.assert_close(head(tokens, mask), expected, rtol=0, atol=0)
