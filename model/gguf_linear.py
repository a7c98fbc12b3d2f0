"""GGUFBlockLinear: a float32 linear layer that also keeps its GGUF file's 4/8-bit blocks for decode steps.

A product of a few rows (a decode or speculative step) is bound by reading the weight; the blocks it came from are
3.6-5.3x fewer bytes than its float32 copy, so such products read them instead (model/kernels/gguf_blocks.py);
longer products (prefill, scoring) run on the float32 weight as OneDNNLinear does. `model.load` swaps these in for
a float32 CPU model read from a GGUF (`keep_gguf_blocks`), on top of `model.fast.apply`.

The blocks stand for one weight tensor in one state: a layer frees them on the next product once its weight was
written to (version counter, address), replaced (`__setattr__`) or moved / cast (`_apply`).
"""
from __future__ import annotations

import torch

from model import kernels
from model.fast import OneDNNLinear
from model.kernels.cpu import gguf_blocks as block_kernel


class GGUFBlockLinear(OneDNNLinear):
    gguf_blocks: block_kernel.Blocks | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf_blocks is not None and self.bias is None and kernels.eager_only():
            if not self.gguf_blocks.matches(self.weight):
                self.gguf_blocks = None   # the weight was written to since (a merge, load_state_dict): free them
            elif block_kernel.takes(x, self.weight, self.in_features):   # (block_kernel.applies, less what's done)
                return block_kernel.matmul(x, self.gguf_blocks)
        return kernels.linear(x, self.weight, self.bias)

    # The blocks stand for one weight tensor in one state; whatever replaces it drops them (and frees them).
    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and self.__dict__.get("gguf_blocks") is not None and value is not self.weight:
            self.gguf_blocks = None   # a new weight (LoRA merging a tied head, load_state_dict(assign=True), ...)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda(), ... give the weight new contents, which may even land at the old address.
        out = super()._apply(fn, recurse)
        if self.gguf_blocks is not None and not self.gguf_blocks.matches(self.weight):
            self.gguf_blocks = None
        return out
