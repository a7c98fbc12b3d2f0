"""The plain model and the accelerated one (model.fast.apply, what `load` returns by default) compute the same.

From one checkpoint, each twice (load(fast=False) and load()): the SmolLM2 GGUF (tied head; accelerated, its linear
layers hold the file's Q4_1/Q8_0 blocks instead of float32 weights) and a tiny Mistral in Mistral's own layout. Compared: the logits, a LoRA training step's loss and
gradients (dropout off, so both draw no masks; the lean LoRA's seeded masks are checked in test_lora.py), and
greedy tokens. The two differ only in the order of float additions (oneDNN vs BLAS, the chunked loss), hence the
tolerances. And the plain model holds nothing of the acceleration layer.
"""
import json
import sys
import subprocess

import pytest
import torch
import torch.nn as nn

import lora
from model import fast
from model.args import ModelArgs
from model.generate import generate
from model.loading import load
from model.transformer import HeadLoss, Transformer


def acceleration_classes(model: nn.Module) -> set[str]:
    """Names of the modules' classes that come from the acceleration layer (model.fast and what it swaps in)."""
    layer = ("model.fast", "model.gguf_linear", "lora.lean")
    return {type(m).__name__ for m in model.modules() if type(m).__module__ in layer}


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """A 2-layer Mistral (GQA, sliding window) as params.json + consolidated.00.pth."""
    folder = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=160, vocab_size=256,
                     sliding_window=6)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(args.to_params_json()))
    return folder


@pytest.fixture(scope="module", params=["smollm2", "tiny-mistral"])
def both(request, smollm2_gguf):
    """(name, plain, accelerated), loaded once per module; the LoRA test, last, wraps them."""
    source = smollm2_gguf if request.param == "smollm2" else request.getfixturevalue("tiny_mistral")
    plain, _ = load(source, require_tokenizer=False, fast=False)
    accelerated, _ = load(source, require_tokenizer=False)
    return request.param, plain, accelerated


def test_plain_model_holds_no_acceleration_class_and_the_default_does(both):
    name, plain, accelerated = both
    assert acceleration_classes(plain) == set()
    assert {type(m) for m in plain.modules()} >= {nn.Linear, HeadLoss}
    # SmolLM2's linears all have Q4_1 / Q8_0 blocks: GGUFLinear everywhere, holding them instead of float32 weights.
    expected = {"FusedHeadLoss", "GGUFLinear" if name == "smollm2" else "OneDNNLinear"}
    assert expected <= acceleration_classes(accelerated)
    assert not any(type(m) is nn.Linear for m in accelerated.modules())
    if name == "smollm2":
        # The same weights: the float tensors (embeddings, norms) under the same names, each linear's blocks the
        # plain model's float32 weight exactly; the tied head holds the embeddings' blocks.
        from model.gguf_linear import GGUFLinear
        blocked = {n for n, m in accelerated.named_modules() if isinstance(m, GGUFLinear)}
        assert blocked == {n for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
        assert accelerated.output.tied_embeddings and accelerated.output.name == "token_embd.weight"
        plain_state = plain.state_dict()
        for n in blocked:
            assert torch.equal(accelerated.get_submodule(n).dequantize(), plain_state.pop(f"{n}.weight")), n
        accelerated_state = {k: v for k, v in accelerated.state_dict().items() if v.is_floating_point()}
    else:
        # The same parameters under the same names (a swap changes classes, never state).
        plain_state, accelerated_state = plain.state_dict(), accelerated.state_dict()
    assert plain_state.keys() == accelerated_state.keys()
    for (k, a), b in zip(plain_state.items(), accelerated_state.values()):
        assert torch.equal(a, b), k
    # Idempotent: a second apply swaps nothing more.
    before = [type(m) for m in accelerated.modules()]
    fast.apply(accelerated)
    assert [type(m) for m in accelerated.modules()] == before


def test_logits_and_greedy_tokens_agree(both):
    name, plain, accelerated = both
    vocab = plain.args.vocab_size
    tokens = torch.randint(0, vocab, (1, 9))
    with torch.no_grad():
        a, b = plain(tokens), accelerated(tokens)
    # float32 sums over dim 576 (SmolLM2) in another order: ~1e-5 relative of logits of size ~10-20.
    torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-4)
    prompt = tokens[0, :6].tolist()
    greedy = [list(generate(m, prompt, max_new_tokens=5)) for m in (plain, accelerated)]
    assert greedy[0] == greedy[1]


def test_a_lora_step_has_the_same_loss_and_gradients(both):
    name, plain, accelerated = both
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("wq", "wv", "w2", "output"))
    grads = []
    for model in (plain, accelerated):
        torch.manual_seed(3)    # the same A in both (inject_lora draws it)
        lora.inject_lora(model, cfg)
        with torch.no_grad():   # and the same non-zero B, so every adapter's path counts
            for m in lora.lora_modules(model).values():
                m.lora_B.normal_(0, 0.1)
        model.train()
        tokens = torch.randint(0, model.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
        targets = tokens[:, 1:].clone()
        targets[0, 2] = -100
        loss = model(tokens[:, :-1], targets=targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert acceleration_classes(plain) == set()                         # inject_lora kept the plain model plain
    assert "LeanLoRALinear" in acceleration_classes(accelerated)        # and made the accelerated one lean
    (loss_a, ga), (loss_b, gb) = grads
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) == 2 * (3 * plain.args.n_layers + 1)
    for n in ga:
        scale = ga[n].abs().max().item()
        torch.testing.assert_close(gb[n], ga[n], atol=1e-4 * scale, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_minicurie_fast_0_gives_the_plain_model(tiny_mistral, monkeypatch):
    monkeypatch.setenv("MINICURIE_FAST", "0")
    model, _ = load(tiny_mistral, require_tokenizer=False)
    assert acceleration_classes(model) == set()
    assert acceleration_classes(load(tiny_mistral, require_tokenizer=False, fast=True)[0])
    monkeypatch.setenv("MINICURIE_FAST", "maybe")
    with pytest.raises(ValueError, match="MINICURIE_FAST='maybe'"):
        load(tiny_mistral, require_tokenizer=False)


def test_the_decoder_imports_neither_the_gguf_parser_nor_lora():
    code = ("import sys, model.transformer; "
            "print(sorted(m for m in sys.modules if m in ('model.gguf', 'model.fast', 'model.gguf_linear') "
            "or m.startswith('lora')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fused_loss_falls_back_to_the_plain_loss_for_a_head_it_cannot_fuse():
    # A head with a bias (or a quantised one) has no fused form: the fused loss must give the plain loss, on the
    # [B, T, dim] hidden states as they came.
    from model.fast import FusedHeadLoss
    from model.transformer import HeadLoss
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True)
    h, targets = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    want = torch.nn.functional.cross_entropy(head(h).flatten(0, 1).double(), targets.flatten(), ignore_index=-100)
    for loss in (HeadLoss(), FusedHeadLoss()):
        torch.testing.assert_close(loss(head, h, targets).double(), want, rtol=1e-5, atol=1e-6)
