"""Our LoRA exports, opened by the reference libraries: peft for the adapter, transformers for the merged model.

A tiny random Hugging Face model is loaded into ours, given random non-zero adapters, and exported; peft and
transformers must then compute the logits we compute. The q/k row permutation between our RoPE layout and Hugging
Face's is the part most likely to be wrong, and a wrong permutation changes every logit.
"""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora import LoRAConfig, export_merged_hf, inject_lora, lora_modules, save_peft_adapter  # noqa: E402
from model.loading import load  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


def hf_model(tmp_path, tied: bool):
    """A random 2-layer Mistral (or, tied, a Llama like SmolLM2), saved where our loader can read it."""
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
                  initializer_range=0.1, tie_word_embeddings=tied, attn_implementation="eager")
    if tied:
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(sliding_window=64, **common)
        model = transformers.MistralForCausalLM(config)
    model = model.float().eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def ours_with_lora(tmp_path, cfg: LoRAConfig):
    model, _ = load(tmp_path / "hf", require_tokenizer=False)
    inject_lora(model, cfg)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(0, 0.3)
            m.lora_B.normal_(0, 0.3)
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("tied", [False, True], ids=["mistral", "llama-tied"])
def test_peft_adapter_and_merged_export_match_ours(tmp_path, tied):
    hf = hf_model(tmp_path, tied)
    tokens = torch.randint(0, 96, (2, 12))
    base = hf_logits(hf, tokens)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.05)  # all eight targets, the head included
    ours = ours_with_lora(tmp_path, cfg)
    with torch.no_grad():
        expected = ours(tokens)
    assert (expected - base).abs().max() > 100 * TOL["atol"]  # the adapters are material

    save_peft_adapter(ours, cfg, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    torch.testing.assert_close(hf_logits(with_adapter, tokens), expected, **TOL)

    export_merged_hf(ours, ours.args, tmp_path / "merged", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert "lm_head.weight" in index["weight_map"]  # a tied head with LoRA is no longer the embedding matrix
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(merged, tokens), expected, **TOL)


def test_tied_head_without_lora_is_exported_once(tmp_path):
    hf_model(tmp_path, tied=True)
    tokens = torch.randint(0, 96, (2, 12))
    cfg = LoRAConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "down_proj"))
    ours = ours_with_lora(tmp_path, cfg)
    with torch.no_grad():
        expected = ours(tokens)
    export_merged_hf(ours, ours.args, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(merged, tokens), expected, **TOL)
