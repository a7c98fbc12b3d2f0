"""The Mistral decoder, by hand: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU, pre-norm blocks.

    tokens [B, T]
      -> tok_embeddings                                   h [B, T, dim]
      -> n_layers x  h = h + attention(attention_norm(h))   (RoPE on q, k; GQA; query i sees keys i-W < j <= i)
                     h = h + feed_forward(ffn_norm(h))      (w2(silu(w1 h) * w3 h))
      -> norm -> output                                   logits [B, T, vocab_size]

Module and parameter names are those of Mistral's reference checkpoints (`consolidated.00.pth`), so a state dict in
that layout loads as it is. The hot operations (`rms_norm`, `apply_rope`, `swiglu`, `attention`) come from
`model.kernels`, which picks fused Triton kernels on CUDA and plain-PyTorch references elsewhere. The linear layers
are nn.Linear and the loss is F.cross_entropy on the head's logits: what you read is what the plain model runs.
Faster equivalents (other matrix-product paths, a head + loss that never builds the logits, quantised weights) are
swapped in from outside by `model.fast.apply`, which `model.load` calls by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model import kernels
from model.args import ModelArgs
from model.cache import RollingKVCache


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim/2] (float32) of the angles positions[t] * theta^(-2i/head_dim).

    Computed from the positions at every forward (a few thousand flops) rather than stored, so a model built on the
    meta device needs no buffer fixing after loading, and any position is covered.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)                                 # [head_dim/2]
    angles = positions.float()[:, None] * inv_freq[None, :]              # [T, head_dim/2]
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: RollingKVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        # [B, H, T, head_dim]: heads become a batch dimension for the attention product.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            # One whole sequence from position 0 (training, scoring): the kernels' causal sliding-window attention.
            o = kernels.attention(q, k, v, self.sliding_window)
        else:
            # Decoding / chunked prefill: new queries attend to the rolling buffer plus the new keys.
            o = cache.attend(layer, q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: RollingKVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class HeadLoss(nn.Module):
    """Mean next-token cross-entropy of head(h) against targets, positions with target -100 skipped.

    h [B, T, dim] -> logits [B*T, vocab] in float32 (a bf16 softmax over 49k-152k classes loses digits) -> loss [].
    A module of its own, with no parameters, so that a fused head + loss that never builds the logits can take its
    place (model/fast.py) without the model changing.
    """

    def forward(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(h.flatten(0, 1)).float()
        return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.loss = HeadLoss()
        self.tie_weights()
        # Recompute each block's activations in the backward pass instead of storing them (train.py turns it on).
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """SmolLM2 shares one matrix between the embedding and the head; call again after assigning weights."""
        if self.args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def hidden(self, tokens: torch.Tensor, cache: RollingKVCache | None = None) -> torch.Tensor:
        """tokens [B, T] -> final-norm hidden states [B, T, dim]. With a cache, tokens continue from cache.pos."""
        start = 0 if cache is None else cache.pos
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, i)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, cache: RollingKVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab_size]; with targets [B, T] (next tokens, -100 to skip one), the
        mean cross-entropy over the kept tokens instead (`self.loss`)."""
        h = self.hidden(tokens, cache)
        if targets is None:
            return self.output(h)
        return self.loss(self.output, h, targets)

    def make_cache(self, batch_size: int, max_tokens: int | None = None, lookahead: int = 0) -> RollingKVCache:
        """A rolling-buffer cache of min(sliding_window + lookahead, max_tokens) slots per layer; it refuses to go
        past max_tokens unless it holds a whole window (then it rolls for ever). `lookahead`: how many positions
        speculative decoding may take back (`RollingKVCache.rewind`)."""
        p = next(self.parameters())
        return RollingKVCache(self.args, batch_size, max_tokens=max_tokens, device=p.device, dtype=p.dtype,
                              lookahead=lookahead)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: RollingKVCache, chunk_size: int | None = None) -> torch.Tensor:
        """Feed a long prompt through the cache in chunks (default: the window), return the last logits [B, V].

        Chunking bounds the attention's [chunk, window + chunk] score matrix, so a 32k-token prompt needs no
        [32k, 32k] buffer (Mistral's paper, section "pre-fill and chunking").
        """
        chunk_size = chunk_size or cache.capacity
        logits = None
        for s in range(0, tokens.shape[1], chunk_size):
            h = self.hidden(tokens[:, s:s + chunk_size], cache)
            logits = self.output(h[:, -1])
        return logits
