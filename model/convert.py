"""Names and RoPE layouts: Mistral's reference checkpoint (ours), Hugging Face's, and GGUF's.

Our decoder uses Mistral's own module names and its RoPE convention, in which the rotated pairs are adjacent
features (x[2i], x[2i+1]). Hugging Face rotates the two halves of each head instead (x[i], x[i + Dh/2]); its
conversion script therefore permutes the rows of wq and wk. We undo that permutation exactly once, at load time,
and redo it when we write a Hugging Face checkpoint or a peft adapter. llama.cpp permutes Hugging Face's rows back
when it writes a GGUF, so GGUF q/k rows are already in our layout.
"""
from __future__ import annotations

import re

import torch

# ours (Mistral's reference names)  ->  Hugging Face's, per layer
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}

# ours -> GGUF (llama.cpp's names)
_GGUF_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def _split(name: str) -> tuple[str, str]:
    """'layers.3.attention.wq.weight' -> ('layers.3.attention.wq', 'weight')."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _rename(name: str, layer_re: re.Pattern, layer_names: dict, top_names: dict, layer_prefix: str,
            error: str) -> str:
    """Map a tensor name through a per-layer table and a top-level table; the leaf ('weight') is kept."""
    module, leaf = _split(name)
    m = layer_re.match(module)
    if m and m.group(2) in layer_names:
        return f"{layer_prefix}.{m.group(1)}.{layer_names[m.group(2)]}.{leaf}"
    if module in top_names:
        return f"{top_names[module]}.{leaf}"
    raise KeyError(error.format(name=name))


def to_hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    return _rename(name, _LAYER_RE, _LAYER_NAMES, _TOP_NAMES, "model.layers", "no Hugging Face name for {name!r}")


_HF_LAYER_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP_BACK = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def from_hf_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'."""
    return _rename(name, _HF_LAYER_RE, _HF_LAYER_BACK, _HF_TOP_BACK, "layers",
                   "unexpected tensor {name!r} in a Hugging Face Mistral/Llama checkpoint")


def to_gguf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight'."""
    return _rename(name, _LAYER_RE, _GGUF_LAYER_NAMES, _GGUF_TOP_NAMES, "blk", "no GGUF name for {name!r}")


_GGUF_LAYER_BACK = {v: k for k, v in _GGUF_LAYER_NAMES.items()}
_GGUF_TOP_BACK = {v: k for k, v in _GGUF_TOP_NAMES.items()}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def from_gguf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight'."""
    return _rename(name, _GGUF_LAYER_RE, _GGUF_LAYER_BACK, _GGUF_TOP_BACK, "layers",
                   "unexpected tensor {name!r} in a llama-architecture GGUF")


def is_rope_projection(name: str) -> str | None:
    """'q' or 'k' for our wq / wk weights (rows follow the RoPE layout), None otherwise."""
    module, _ = _split(name)
    if module.endswith("attention.wq"):
        return "q"
    if module.endswith("attention.wk"):
        return "k"
    return None


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (or of a LoRA B for them), ours -> Hugging Face's rotate-half layout.

    w: [n_heads * head_dim, cols]. Within a head, row 2i (pair i, first) moves to i, row 2i+1 to i + head_dim/2.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`: Hugging Face's q_proj/k_proj rows -> ours."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

