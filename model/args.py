"""ModelArgs: every number that shapes a Mistral-style decoder, named as in Mistral's `params.json`.

Mistral-7B v0.1 (the model Curie adapted) and SmolLM2-135M (our small real LAPT subject, a Llama, i.e. a Mistral
without a sliding window) are both described by this one dataclass.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelArgs:
    dim: int = 4096             # width of the residual stream
    n_layers: int = 32
    head_dim: int = 128         # dim // n_heads for every model we know, but params.json states it separately
    hidden_dim: int = 14336     # width of the SwiGLU feed-forward
    n_heads: int = 32           # query heads
    n_kv_heads: int = 8         # key/value heads; n_heads // n_kv_heads query heads share one (grouped-query)
    norm_eps: float = 1e-5
    vocab_size: int = 32000
    sliding_window: int | None = 4096  # query i sees key j iff i - W < j <= i; None: plain causal attention
    rope_theta: float = 10000.0        # v0.1's params.json has no rope_theta: 10000 is right, not 1e6
    tied_embeddings: bool = False      # output head shares tok_embeddings' weight (SmolLM2 does, Mistral doesn't)
    max_seq_len: int = 32768           # context length the checkpoint declares; exported as max_position_embeddings,
                                       # nothing here limits positions to it (RoPE angles come per forward)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])

    @classmethod
    def from_params_json(cls, path: str | Path) -> "ModelArgs":
        """Mistral's own `params.json` (the file beside `consolidated.00.pth`)."""
        path = Path(path)
        p = _read_json(path, "params.json")
        missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size") if k not in p]
        if missing:
            raise ValueError(f"{path}: params.json lacks {', '.join(missing)}")
        n_heads = p["n_heads"]
        return cls(
            dim=p["dim"], n_layers=p["n_layers"], head_dim=p.get("head_dim", p["dim"] // n_heads),
            hidden_dim=p["hidden_dim"], n_heads=n_heads, n_kv_heads=p.get("n_kv_heads", n_heads),
            norm_eps=p["norm_eps"], vocab_size=p["vocab_size"],
            sliding_window=p.get("sliding_window"), rope_theta=p.get("rope_theta", 10000.0),
            tied_embeddings=p.get("tied_embeddings", False),
        )

    def to_params_json(self) -> dict:
        return {"dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim, "hidden_dim": self.hidden_dim,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "norm_eps": self.norm_eps,
                "vocab_size": self.vocab_size, "sliding_window": self.sliding_window, "rope_theta": self.rope_theta,
                "tied_embeddings": self.tied_embeddings}

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelArgs":
        """Hugging Face `config.json` of a MistralForCausalLM / LlamaForCausalLM checkpoint."""
        path = Path(path)
        c = _read_json(path, "config.json")
        arch = (c.get("architectures") or ["?"])[0]
        if c.get("model_type") not in ("mistral", "llama"):
            raise ValueError(f"{path}: model_type {c.get('model_type')!r} ({arch}) is not mistral or llama")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "rms_norm_eps", "vocab_size") if k not in c]
        if missing:
            raise ValueError(f"{path}: config.json lacks {', '.join(missing)}")
        # Plain RoPE only: transformers 4 writes rope_scaling null, 5 writes rope_parameters {rope_type: "default",
        # rope_theta}. Scaled variants (Llama 3.1's "llama3", "linear", "yarn", ...) change every angle, so running
        # them as plain RoPE would give wrong logits without a word.
        for key in ("rope_scaling", "rope_parameters"):
            rope = c.get(key)
            if rope is not None and (not isinstance(rope, dict)
                                     or rope.get("rope_type", rope.get("type", "default")) != "default"):
                raise ValueError(f"{path}: {key} {rope!r} is not supported (only plain RoPE, rope_type 'default')")
        n_heads = c["num_attention_heads"]
        rope_theta = c.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it in rope_parameters
            rope_theta = (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        window = c.get("sliding_window") if c.get("model_type") == "mistral" else None
        return cls(
            dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, hidden_dim=c["intermediate_size"],
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads), norm_eps=c["rms_norm_eps"],
            vocab_size=c["vocab_size"], sliding_window=window, rope_theta=float(rope_theta),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_seq_len=c.get("max_position_embeddings", 32768),
        )

    def to_hf_config(self) -> dict:
        """The `config.json` transformers needs to open our merged export."""
        mistral = self.sliding_window is not None
        cfg = {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": self.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2,
        }
        if mistral:
            cfg["sliding_window"] = self.sliding_window
        return cfg

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * self.dim) + emb + self.dim


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 norm_eps=1e-5, vocab_size=32000, sliding_window=4096, rope_theta=10000.0),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3,
                              norm_eps=1e-5, vocab_size=49152, sliding_window=None, rope_theta=100000.0,
                              tied_embeddings=True, max_seq_len=8192),
    # Small enough for a unit test to build in milliseconds, odd enough (window 5, GQA 2:1) to catch mistakes.
    "tiny": ModelArgs(dim=64, n_layers=3, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                      vocab_size=256, sliding_window=5, rope_theta=10000.0, max_seq_len=512),
}
