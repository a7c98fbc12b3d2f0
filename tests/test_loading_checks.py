"""model/loading.py and model/args.py refuse what they cannot run, early and by name: RoPE scaling (HF config,
GGUF metadata, GGUF rope_freqs), missing config keys, missing tensors (in the checkpoint's own names), and a
tokenizer they cannot read (before any weight is loaded)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from model import loading
from model.args import ModelArgs
from model.loading import load
from model.safetensors import load_file, save_file
from model.transformer import Transformer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TINY_HF = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256)


def save_hf(folder, cls=transformers.LlamaConfig, model_cls=transformers.LlamaForCausalLM, **overrides):
    """A tiny checkpoint written by transformers itself (its config.json is the one real exports carry)."""
    torch.manual_seed(1)
    model_cls(cls(**{**TINY_HF, **overrides})).save_pretrained(folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------- RoPE scaling, HF

def test_plain_configs_written_by_transformers_load(tmp_path):
    for name, cls, model_cls in [("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 ("mistral", transformers.MistralConfig, transformers.MistralForCausalLM)]:
        folder = save_hf(tmp_path / name, cls, model_cls)
        assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
        model, _ = load(folder, require_tokenizer=False)
        assert model.args.rope_theta == 10000.0
    # transformers 4 wrote rope_scaling null beside a top-level rope_theta
    edit_config(tmp_path / "llama", rope_parameters=..., rope_scaling=None, rope_theta=5e5)
    assert ModelArgs.from_hf_config(tmp_path / "llama" / "config.json").rope_theta == 5e5


def test_llama3_rope_scaling_written_by_transformers_is_refused(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}
    folder = save_hf(tmp_path, rope_scaling=scaling)
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters .*'llama3'.* is not supported"):
        load(folder, require_tokenizer=False)


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),                    # transformers 4, old spelling
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),               # Llama-3.1's config.json
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ("rope_scaling", "dynamic"),
])
def test_scaled_rope_in_config_is_refused_by_name(tmp_path, key, value):
    folder = save_hf(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'config.json'))}: {key} .* is not supported"):
        ModelArgs.from_hf_config(folder / "config.json")


# ------------------------------------------------------------------------------------------------ tiny GGUF

GGUF_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(ours: str) -> str:
    module, leaf = ours.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"blk.{i}.{GGUF_LAYER[rest]}.{leaf}"
    return f"{GGUF_TOP[module]}.{leaf}"


def write_gguf(path, model: Transformer, drop=(), extra=None, tokenizer_model="gpt2", rope_scaling=None,
               quant=None):
    """model's weights as a float32 llama GGUF (q/k rows already in llama.cpp's = our interleaved layout).
    quant(gguf_name) -> a gguf.GGMLQuantizationType (or None: float32) quantises tensors with the gguf package."""
    a = model.args
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_vocab_size(a.vocab_size)
    if a.sliding_window is not None:
        w.add_sliding_window(a.sliding_window)
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling)
        w.add_rope_scaling_factor(4.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list([f"<{i}>" for i in range(a.vocab_size)])
    for name, t in model.state_dict().items():
        if name in drop:
            continue
        qtype = quant(gguf_name(name)) if quant else None
        if qtype is None:
            w.add_tensor(gguf_name(name), t.float().numpy())
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t.float().numpy(), qtype), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny():
    return Transformer(ModelArgs.from_name("tiny")).eval()


def test_gguf_rope_freqs_of_ones_loads_and_others_are_refused(tmp_path, tiny):
    half = tiny.args.head_dim // 2
    ones = write_gguf(tmp_path / "ones.gguf", tiny, extra={"rope_freqs.weight": np.ones(half, np.float32)})
    model, _ = load(ones, require_tokenizer=False, fast=False)   # the plain model, as `tiny` is: bit for bit
    tokens = torch.randint(0, tiny.args.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), tiny(tokens))
    llama3 = np.ones(half, np.float32)
    llama3[half // 2:] = 8.0                              # low frequencies slowed down, as Llama 3.1's are
    path = write_gguf(tmp_path / "llama31.gguf", tiny, extra={"rope_freqs.weight": llama3})
    with pytest.raises(ValueError, match=r"llama31\.gguf: tensor 'rope_freqs\.weight' rescales the RoPE"):
        load(path, require_tokenizer=False)


def test_gguf_rope_scaling_metadata_is_refused(tmp_path, tiny):
    path = write_gguf(tmp_path / "linear.gguf", tiny, rope_scaling=gguf.RopeScalingType.LINEAR)
    with pytest.raises(ValueError, match=r"linear\.gguf: GGUF metadata llama\.rope\.scaling\.type='linear'"):
        load(path, require_tokenizer=False)


def test_real_smollm2_gguf_still_loads(smollm2_gguf):
    model, tok = load(smollm2_gguf)
    assert model.args.rope_theta == 100000.0 and tok.vocab_size == model.args.vocab_size


# ------------------------------------------------------------------------------------------ missing names

def test_missing_tensor_is_named_in_the_checkpoints_own_terms(tmp_path, tiny):
    folder = save_hf(tmp_path / "hf", transformers.MistralConfig, transformers.MistralForCausalLM)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(
            f"{folder / 'model.safetensors'}: checkpoint lacks 1 tensor(s): model.layers.1.mlp.up_proj.weight "
            f"(our layers.1.feed_forward.w3.weight)")):
        load(folder, require_tokenizer=False)

    path = write_gguf(tmp_path / "tiny.gguf", tiny, drop={"layers.2.attention.wk.weight"})
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: checkpoint lacks 1 tensor(s): blk.2.attn_k.weight (our layers.2.attention.wk.weight)")):
        load(path, require_tokenizer=False)


def test_missing_config_keys_are_named(tmp_path):
    folder = save_hf(tmp_path)
    edit_config(folder, num_attention_heads=..., intermediate_size=...)
    with pytest.raises(ValueError, match=r"config\.json: config\.json lacks num_attention_heads, intermediate_size"):
        ModelArgs.from_hf_config(folder / "config.json")
    params = ModelArgs.from_name("tiny").to_params_json()
    del params["hidden_dim"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params\.json: params\.json lacks hidden_dim"):
        ModelArgs.from_params_json(tmp_path / "params.json")


# --------------------------------------------------------------------------------- tokenizer before weights

@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(loading, "build_model", lambda *a, **k: pytest.fail("read the weights before the tokenizer"))


def test_unreadable_hf_tokenizer_fails_before_the_weights(tmp_path, no_weights):
    folder = save_hf(tmp_path)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json: its model is None; only byte-level BPE"):
        load(folder)


def test_sentencepiece_gguf_tokenizer_fails_before_the_weights(tmp_path, tiny, no_weights):
    path = write_gguf(tmp_path / "sp.gguf", tiny, tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"sp\.gguf: tokenizer\.ggml\.model is 'llama'"):
        load(path)
