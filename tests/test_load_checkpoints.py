"""Official checkpoint layouts load into our decoder and give transformers' logits (acceptance 1, 2, 8)."""
import copy
import json

import pytest
import torch

from model.loading import load

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=5, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)


def hf_tiny_mistral(**overrides):
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them random too, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_mistral()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(2))


def test_sharded_hugging_face_checkpoint(tmp_path, hf_model, tokens):
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ours, tok = load(tmp_path, require_tokenizer=False)
    assert tok is None and ours.args.sliding_window == 5
    with torch.no_grad():
        diff = (ours(tokens) - hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= 1e-5


def test_tied_llama_hugging_face_checkpoint(tmp_path, tokens):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "sliding_window"},
                                   attn_implementation="eager")
    cfg.tie_word_embeddings = True
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours, _ = load(tmp_path, require_tokenizer=False)
    assert ours.args.tied_embeddings and ours.args.sliding_window is None
    assert ours.output.weight is ours.tok_embeddings.weight
    with torch.no_grad():
        assert (ours(tokens) - hf_logits(hf, tokens)).abs().max().item() <= 1e-5


def _meta_interleave(w, n_heads):
    """HF's q/k rows (rotate-half halves) back to Meta/Mistral's interleaved pairs, written out longhand:
    within each head, HF row i (i < Dh/2) is pair i's first element, row i + Dh/2 its second."""
    rows, cols = w.shape
    dh = rows // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for i in range(dh // 2):
            out[h * dh + 2 * i] = w[h * dh + i]
            out[h * dh + 2 * i + 1] = w[h * dh + dh // 2 + i]
    return out


def write_mistral_layout(folder, hf_model, fmt="pth"):
    """The same weights as Mistral ships them: params.json + consolidated.00.pth, interleaved RoPE rows."""
    sd = hf_model.state_dict()
    c = hf_model.config
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"layers.{i}.attention.wq.weight": _meta_interleave(sd[p + "self_attn.q_proj.weight"],
                                                                c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": _meta_interleave(sd[p + "self_attn.k_proj.weight"],
                                                                c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "head_dim": c.head_dim,
              "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
              "sliding_window": c.sliding_window}  # like v0.1: no rope_theta, so 10000 must be the default
    (folder / "params.json").write_text(json.dumps(params))
    out = {k: v.clone().contiguous() for k, v in out.items()}
    if fmt == "pth":
        torch.save(out, folder / "consolidated.00.pth")
    else:
        import safetensors.torch
        safetensors.torch.save_file(out, str(folder / "consolidated.safetensors"))
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_mistral_reference_layout(tmp_path, hf_model, tokens, fmt):
    write_mistral_layout(tmp_path, hf_model, fmt)
    ours, _ = load(tmp_path, require_tokenizer=False)
    assert ours.args.rope_theta == 10000.0
    with torch.no_grad():
        assert (ours(tokens) - hf_logits(hf_model, tokens)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_bf16_load_and_meta_free(tmp_path, hf_model, tokens, stored):
    # A float32 checkpoint cast as it loads, and a bf16 one read as it is stored: transformers' float32 logits within
    # bf16's error, which is measured on transformers' own bf16 model (twice its error plus one rounding).
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)   # a copy: the module's float32 model stays as it is
    (hf_model if stored == torch.float32 else hf_bf16).save_pretrained(tmp_path)
    ours, _ = load(tmp_path, dtype=torch.bfloat16, require_tokenizer=False)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ours.parameters())
    with torch.no_grad():
        logits = ours(tokens)
    exact, theirs = hf_logits(hf_model, tokens).double(), hf_logits(hf_bf16, tokens).double()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    scale = exact.abs().max().item()
    ours_err, theirs_err = ((x.double() - exact).abs().max().item() for x in (logits, theirs))
    assert ours_err <= 2 * theirs_err + 2**-8 * scale, f"bf16 logits off by {ours_err:.3g} (transformers' bf16: " \
                                                        f"{theirs_err:.3g}, logits up to {scale:.3g})"


# ------------------------------------------------------------------------------------------- bad input (acc. 8)

def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="params.json.*config.json"):
        load(tmp_path)


def test_missing_weights_file(tmp_path, hf_model):
    write_mistral_layout(tmp_path, hf_model)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated"):
        load(tmp_path, require_tokenizer=False)


def test_shape_disagreeing_with_config_names_file_and_tensor(tmp_path, hf_model):
    write_mistral_layout(tmp_path, hf_model)
    params = json.loads((tmp_path / "params.json").read_text())
    params["hidden_dim"] = 96
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*layers\.0\.feed_forward\.w1\.weight.*\(160, 64\)"):
        load(tmp_path, require_tokenizer=False)


def test_missing_tensor_is_named(tmp_path, hf_model):
    sd = write_mistral_layout(tmp_path, hf_model)
    del sd["layers.2.ffn_norm.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*layers\.2\.ffn_norm\.weight"):
        load(tmp_path, require_tokenizer=False)


def test_unexpected_tensor_is_named(tmp_path, hf_model):
    sd = write_mistral_layout(tmp_path, hf_model)
    sd["layers.3.attention.wq.weight"] = torch.randn(64, 64)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"unexpected tensor 'layers\.3\.attention\.wq\.weight'"):
        load(tmp_path, require_tokenizer=False)


def test_truncated_safetensors_names_file(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(tmp_path, require_tokenizer=False)


def test_missing_tokenizer_is_reported(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(tmp_path)


def test_truncated_and_corrupt_gguf(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.gguf"):
        load(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:4096])
    with pytest.raises(ValueError, match="bad.gguf.*not a GGUF file"):
        load(bad)
