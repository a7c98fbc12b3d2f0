"""The rolling-buffer KV cache of Mistral's paper: W slots per layer, position p lives in slot p mod W.

With a sliding window of W keys no query ever looks further back than W - 1 positions, so the cache never needs
more than W slots: generating 100k tokens costs the memory of W. A model without a window (SmolLM2, Llama) gets as
many slots as the longest sequence it will see, and the same code never wraps.

New tokens are handled in two steps per layer:
  1. attend: the queries of the new chunk see the cached keys plus the chunk's own keys, with a mask computed
     from absolute positions (cached slot s holds the latest position p < pos with p % capacity == s);
  2. store: the chunk's last min(T, capacity) keys and values overwrite their slots.
Attending before storing is what makes chunks longer than the window correct: a chunk's early queries still need
keys that its later keys would overwrite. A single new token (a decode step) can store first and attend to the
buffer in place, without a mask or a copy (`_decode_step`).

Speculative decoding feeds a few guessed tokens at once and then takes back the ones the model disagrees with
(`rewind`). Their keys were stored already and overwrote the keys of older positions, which later queries may still
need within the window: `lookahead` extra slots (W + lookahead in all) keep those older keys out of harm's way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import kernels
from model.args import ModelArgs


class RollingKVCache:
    def __init__(self, args: ModelArgs, batch_size: int, max_tokens: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, lookahead: int = 0):
        window = args.sliding_window
        if window is None and max_tokens is None:
            raise ValueError("a model without a sliding window needs max_tokens to size its cache")
        # Never more slots than tokens will be seen, never more than the window (plus the rewindable lookahead).
        self.capacity = min(c for c in (window and window + lookahead, max_tokens) if c is not None)
        self.sliding_window = window
        self.max_tokens = max_tokens
        shape = (args.n_layers, batch_size, args.n_kv_heads, self.capacity, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens seen so far = position of the next token

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has stored its keys."""
        self.pos += n

    def _slot_positions(self, device) -> torch.Tensor:
        """Absolute position held by each slot in use, in slot order; the slots in use are 0..min(pos, C)-1."""
        n = min(self.pos, self.capacity)
        s = torch.arange(n, device=device)
        return self.pos - 1 - (self.pos - 1 - s) % self.capacity

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] for positions pos..pos+T-1 -> attention output [B, Hq, T, D]."""
        t = q.shape[2]
        # Wrapping is only right when the buffer holds a whole window: else it would overwrite keys still in view.
        wraps_too_early = self.sliding_window is None or self.capacity < self.sliding_window
        if wraps_too_early and self.pos + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {self.pos} + {t} would exceed it "
                             f"(make the cache with a larger max_tokens)")
        n_cached = min(self.pos, self.capacity)
        if t == 1 and n_cached > 0 and (self.sliding_window is None or self.capacity <= self.sliding_window):
            return self._decode_step(layer, q, k, v)
        q_pos = torch.arange(self.pos, self.pos + t, device=q.device)
        if n_cached == 0:
            # A first chunk sees only itself: the model's own causal sliding-window attention. (On the CPU that is
            # SDPA with is_causal, which skips the key blocks above the diagonal: an explicit mask would not.)
            out = kernels.attention(q, k, v, self.sliding_window)
        else:
            keys = torch.cat((self.k[layer, :, :, :n_cached], k), dim=2)      # [B, Hkv, n_cached + T, D]
            values = torch.cat((self.v[layer, :, :, :n_cached], v), dim=2)
            k_pos = torch.cat((self._slot_positions(q.device), q_pos))
            visible = k_pos[None, :] <= q_pos[:, None]                         # [T, n_cached + T]
            if self.sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
            mask = None if bool(visible.all()) else visible  # e.g. a speculative step inside the window
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        # Store the chunk's last `capacity` keys in their slots (earlier ones would be overwritten anyway).
        # In the cache's dtype: under torch.autocast k, v come out of the projections in bf16/fp16 while the buffer
        # keeps the parameters' dtype (index_copy_ does not convert; _decode_step's assignment does).
        keep = min(t, self.capacity)
        slots = q_pos[t - keep:] % self.capacity
        self.k[layer].index_copy_(2, slots, k[:, :, t - keep:].to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v[:, :, t - keep:].to(self.v.dtype))
        return out

    def _decode_step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token, the common case of generation: store first, then attend to the buffer as it is.

        Storing first is safe here: the slot it overwrites holds position pos - capacity, at least W back, which the
        new query must not see anyway. And every slot in use is visible: without a window all of them are, and
        with capacity <= W the buffer holds only the last W positions. So no mask, and no concatenated copy of
        the cached keys (the general path's `cat`), which is most of a decode step's attention cost.
        """
        slot = self.pos % self.capacity
        self.k[layer, :, :, slot] = k[:, :, 0]
        self.v[layer, :, :, slot] = v[:, :, 0]
        n = min(self.pos + 1, self.capacity)
        return F.scaled_dot_product_attention(q, self.k[layer, :, :, :n], self.v[layer, :, :, :n],
                                              enable_gqa=q.shape[1] != k.shape[1])

    def rewind(self, n: int) -> None:
        """Forget the last n positions (draft tokens that speculative decoding rejected).

        Their slots keep stale keys that no later query sees. Slots at or past the new `pos` are not in use yet;
        after wrapping, `_slot_positions` maps a stale slot to a position at least W back, which the window masks.
        What rewinding cannot undo is the older key each stale slot overwrote: a position that may still be in the
        window of the next query, unless `lookahead` extra slots put it at least W back.
        """
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot rewind {n} of the {self.pos} positions seen")
        # Once wrapped, the n newest positions overwrote positions pos - n - capacity .. pos - 1 - capacity; the next
        # query (at pos - n) sees keys after pos - n - W, so all of those are out of its view iff
        # pos - 1 - capacity <= pos - n - W, i.e. n <= capacity - W + 1 (= lookahead + 1).
        wrapped = self.sliding_window is not None and self.pos > self.capacity
        if wrapped and n > self.capacity - self.sliding_window + 1:
            raise ValueError(f"cannot rewind {n} positions in a wrapped cache of {self.capacity} slots (window "
                             f"{self.sliding_window}): at most capacity - window + 1 = "
                             f"{self.capacity - self.sliding_window + 1}; make it with lookahead >= {n - 1}")
        self.pos -= n

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
