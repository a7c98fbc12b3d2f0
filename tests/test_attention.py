"""Attention against brute force: Mistral's window (query i sees key j iff i - W < j <= i), causal, GQA."""
import math

import pytest
import torch

from model import kernels
from model.args import ModelArgs
from model.transformer import Transformer


def brute_force_attention(q, k, v, window):
    """float64 loops over (i, j): the definition, with no masking tricks. q [B,Hq,T,D], k/v [B,Hkv,T,D]."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kh = h // group  # query head h reads K/V head h // group
            for i in range(t):
                js = [j for j in range(t) if j <= i and (window is None or j > i - window)]
                scores = torch.stack([q[bi, h, i] @ k[bi, kh, j] for j in js]) / math.sqrt(d)
                p = torch.softmax(scores, 0)
                out[bi, h, i] = sum(p[n] * v[bi, kh, j] for n, j in enumerate(js))
    return out


@pytest.mark.parametrize("t,window", [(1, 3), (9, 1), (9, 3), (13, 5), (7, 7), (6, 10), (11, None)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_sliding_window_matches_brute_force(t, window, hq, hkv):
    q = torch.randn(2, hq, t, 8)
    k, v = torch.randn(2, hkv, t, 8), torch.randn(2, hkv, t, 8)
    expected = brute_force_attention(q, k, v, window)
    assert torch.allclose(kernels.attention(q, k, v, window).double(), expected, atol=1e-5)  # the CPU path
    assert torch.allclose(kernels.attention_reference(q, k, v, window).double(), expected, atol=1e-5)


def test_window_covering_sequence_is_plain_causal():
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    assert torch.allclose(kernels.attention(q, k, v, 12), kernels.attention(q, k, v, None), atol=1e-6)
    assert torch.allclose(kernels.attention(q, k, v, 100), kernels.attention(q, k, v, None), atol=1e-6)
    assert not torch.allclose(kernels.attention(q, k, v, 11), kernels.attention(q, k, v, None), atol=1e-3)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = torch.randn(2, 6, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    k_rep, v_rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    for window in (None, 4):
        assert torch.allclose(kernels.attention(q, k, v, window), kernels.attention(q, k_rep, v_rep, window),
                              atol=1e-6)


def test_window_mask_is_exactly_w_keys_itself_included():
    mask = kernels.causal_window_mask(10, 3)
    for i in range(10):
        assert mask[i].nonzero().flatten().tolist() == [j for j in range(max(0, i - 2), i + 1)]


def test_model_window_changes_only_far_tokens():
    """A token more than W-1 positions back has no direct path... but it does through layers; with one layer it has
    none: changing token 0 must not change logits at positions >= W."""
    args = ModelArgs.from_name("tiny")
    args.n_layers = 1
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    other = tokens.clone()
    other[0, 0] = (tokens[0, 0] + 1) % args.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(other)
    w = args.sliding_window
    assert torch.equal(a[0, w:], b[0, w:])
    assert not torch.allclose(a[0, w - 1], b[0, w - 1])
