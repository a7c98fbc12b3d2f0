"""LoRA layers, injection, merging and our adapter format, checked against float64 math and the untouched base."""
import contextlib
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (LoRAConfig, LoRALinear, count_parameters, export_merged_hf, inject_lora, load_adapter,
                  lora_modules, merge_lora, parameter_summary, remove_lora, save_adapter, unmerge_lora)
from lora.lean import LeanLoRALinear
from lora.adapter import ADAPTER_WEIGHTS
from model.kernels.cpu import dropout as D
from model.args import ModelArgs
from model.loading import load
from model.nf4 import NF4Linear
from model.safetensors import load_file, save_file
from model import fast
from model.transformer import Transformer


def tiny(**changes) -> Transformer:
    return Transformer(dataclasses.replace(ModelArgs.from_name("tiny"), **changes)).eval()


def randomise_lora(model: nn.Module, std: float = 0.1) -> None:
    """Non-zero B (and a fresh A), so the adapters change the output."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(0, 0.2)
            m.lora_B.normal_(0, std)


def tokens(vocab: int = 256, b: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t))


# ---------------------------------------------------------------------------------------------------- config

def test_config_accepts_hf_names_and_rejects_unknown():
    cfg = LoRAConfig(targets=("q_proj", "k_proj", "gate_proj", "down_proj", "up_proj", "lm_head", "wq"))
    assert cfg.targets == ("wq", "wk", "w1", "w2", "w3", "output")
    with pytest.raises(ValueError, match="query_key_value"):
        LoRAConfig(targets=("query_key_value",))
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_scale_plain_and_rslora():
    assert LoRAConfig(r=32, alpha=64).scale == 2.0
    assert LoRAConfig(r=16, alpha=8, rslora=True).scale == pytest.approx(8 / math.sqrt(16))


def test_curie_preset_is_the_papers_recipe():
    cfg = LoRAConfig.curie()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (32, 64, 0.05, False)
    assert set(cfg.targets) == {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"}


# ---------------------------------------------------------------------------------------------------- LoRALinear

@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_float64(rslora):
    base = nn.Linear(24, 40, bias=True)
    lora = LoRALinear(base, r=4, alpha=7, dropout=0.3, rslora=rslora).eval()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    scale = 7 / (math.sqrt(4) if rslora else 4)
    d = lambda t: t.detach().double()  # noqa: E731
    expected = (d(x) @ d(base.weight).T + d(base.bias)) + scale * d(x) @ d(lora.lora_A).T @ d(lora.lora_B).T
    torch.testing.assert_close(lora(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_lora_init_shapes_and_zero_b():
    lora = LoRALinear(nn.Linear(24, 40, bias=False), r=6, alpha=12)
    assert lora.lora_A.shape == (6, 24) and lora.lora_B.shape == (40, 6)
    assert torch.count_nonzero(lora.lora_B) == 0
    # Kaiming-uniform with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in)), like an nn.Linear weight.
    bound = 1 / math.sqrt(24)
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.5 * bound


def test_lora_path_runs_in_the_input_dtype():
    base = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=8).eval()
    with torch.no_grad():
        lora.lora_B.normal_()
    assert lora.lora_A.dtype == torch.float32  # the trained weights stay float32
    x = torch.randn(4, 32).to(torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    d = lambda t: t.detach().double()  # noqa: E731
    expected = d(x) @ d(base.weight).T + 2 * d(x) @ d(lora.lora_A).T @ d(lora.lora_B).T
    torch.testing.assert_close(y.double(), expected, atol=0.1, rtol=0.03)


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_path_matches_float64_with_the_same_mask(p, dtype):
    # _DropoutThenA keeps x and its mask's seed (float32 on the CPU: the C kernel) or a stored bool mask (float64,
    # which the kernel does not take) instead of nn.Dropout's two float copies. Replay its mask (same torch seed,
    # same draw) and check the output and both gradients against float64 autograd of x * mask / (1 - p) @ A.T.
    lora = LeanLoRALinear(nn.Linear(24, 40, bias=False), r=4, alpha=8, dropout=p).to(dtype).train()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, 40, dtype=dtype)
    torch.manual_seed(123)
    y = lora(x)
    y.backward(dy)
    torch.manual_seed(123)
    seeded = D.seeded(x, dtype)
    assert seeded == (dtype == torch.float32 and D.KERNEL.library() is not None)
    keep = D.keep_mask(D.draw_seed(), x.shape, p) if seeded else D.random_mask(x, p)
    assert 0 < keep.sum() < keep.numel()
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, w64, a64, b64 = d(x), d(lora.base.weight), d(lora.lora_A), d(lora.lora_B)
    y64 = x64 @ w64.T + 2 * ((x64 * keep / (1 - p)) @ a64.T) @ b64.T
    y64.backward(dy.double())
    # float32 sums of up to 40 products of O(1..10) terms: a few ulps of the largest, ~1e-5 absolute (float64:
    # ~1e-14; the adapter's A and B are float32 whatever the base, so their products round to float32).
    for ours, exact in [(y, y64), (x.grad, x64.grad), (lora.lora_A.grad, a64.grad), (lora.lora_B.grad, b64.grad)]:
        torch.testing.assert_close(ours.double(), exact, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_dropout_path_under_bf16_autocast_uses_one_mask_throughout(x_dtype):
    # Training's common case: float32 (or bf16) activations, bf16 products. The base is zero, so y, dx and dA are
    # the adapter's alone, and a mask that differed between the forward and either backward product would show as
    # errors of the size of the values themselves, far above bf16's rounding.
    p = 0.5
    lora = LeanLoRALinear(nn.Linear(48, 40, bias=False), r=4, alpha=8, dropout=p).train()
    with torch.no_grad():
        lora.base.weight.zero_()
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 48).to(x_dtype).requires_grad_()
    dy = torch.randn(3, 5, 40)
    torch.manual_seed(321)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    y.backward(dy.to(y.dtype))
    torch.manual_seed(321)
    keep = D.keep_mask(D.draw_seed(), x.shape, p) if D.seeded(x, torch.bfloat16) else D.random_mask(x, p)
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, a64, b64 = d(x), d(lora.lora_A), d(lora.lora_B)
    y64 = 2 * ((x64 * keep / (1 - p)) @ a64.T) @ b64.T
    y64.backward(dy.double())
    for name, ours, exact in [("y", y, y64), ("dx", x.grad, x64.grad), ("dA", lora.lora_A.grad, a64.grad),
                              ("dB", lora.lora_B.grad, b64.grad)]:
        scale = exact.abs().max().item()
        torch.testing.assert_close(ours.double(), exact, atol=2**-6 * scale, rtol=2**-6, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_gradients_are_the_same_under_activation_checkpointing(autocast):
    # A checkpointed block recomputes its forward in the backward; the recomputed dropout must draw the same seeds
    # (torch.utils.checkpoint restores the RNG state), or the LoRA gradients would differ.
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                                  vocab_size=64, sliding_window=None))
    fast.apply(model)   # the lean adapters, whose masks come from seeds
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    model.train()
    tokens = torch.randint(0, 64, (2, 17))
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of fn(), each storage counted once (shared inputs count once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_dropout_keeps_no_mask_and_no_float_copies():
    # Three adapters on one input, as q, k, v: nn.Dropout + linear keeps a float noise tensor and a float dropped
    # copy per adapter (6 float copies of x); ours keeps x once (each mask is rebuilt from its seed).
    x = torch.randn(64, 96, requires_grad=True)
    adapters = [LeanLoRALinear(nn.Linear(96, 96, bias=False), r=4, alpha=8, dropout=0.1).train() for _ in range(3)]
    dropout = nn.Dropout(0.1)
    ours = _saved_bytes(lambda: [a(x) for a in adapters])
    plain = _saved_bytes(lambda: [a.base(x) + 2 * (dropout(x) @ a.lora_A.T) @ a.lora_B.T for a in adapters])
    x_bytes = x.numel() * 4
    weights = sum(a.base.weight.numel() * 4 for a in adapters)   # saved by both (the base's backward needs W)
    assert plain - weights >= 6 * x_bytes
    assert ours - weights <= x_bytes + 3 * 2 * (96 * 4 + 64 * 4) * 4


def test_frozen_base_under_autocast_keeps_no_bf16_weight_copy():
    # float32 weights, bf16 autocast: the same output and input gradient as nn.Linear under autocast, bit for bit,
    # without holding the [out, in] bf16 copy of the frozen weight until the backward.
    lora = LeanLoRALinear(nn.Linear(96, 128, bias=False), r=4, alpha=8).train()
    lora.base.requires_grad_(False)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 96, requires_grad=True)
    dy = torch.randn(5, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
        y_ref = lora.base(x) + lora.scale * F.linear(F.linear(x, lora.lora_A), lora.lora_B)
        saved = _saved_bytes(lambda: lora(x))
        saved_plain = _saved_bytes(lambda: lora.base(x))
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(dx, dx_ref, atol=1e-2, rtol=1e-2)   # both bf16 products, summed in another order
    weight_bf16 = 96 * 128 * 2
    assert saved_plain >= weight_bf16                          # nn.Linear under autocast keeps the bf16 copy ...
    assert saved - 96 * 128 * 4 < weight_bf16                  # ... ours the float32 weight that exists anyway


def test_nf4_base_forward_and_gradients_work_and_merge_refuses():
    base = NF4Linear.from_weight(torch.randn(12, 64))
    lora = LoRALinear(base, r=2, alpha=4).eval()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 64)
    d = lambda t: t.detach().double()  # noqa: E731
    expected = d(x) @ d(base.dequantize()).T + 2 * d(x) @ d(lora.lora_A).T @ d(lora.lora_B).T
    y = lora(x)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    with pytest.raises(TypeError, match="NF4Linear.*full-precision"):
        lora.merge()


# ---------------------------------------------------------------------------------------------------- injection

def test_zero_b_leaves_logits_unchanged():
    model = tiny()
    x = tokens()
    before = model(x)
    names = inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert len(names) == 3 * 7 + 1 and names[-1] == "output"
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_only_lora_parameters_train():
    model = tiny()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("wq", "wv", "w2")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in lora_modules(model) for ab in "AB"}
    assert len(trainable) == 2 * 3 * 3
    randomise_lora(model)
    model(tokens()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_dropout_is_on_the_lora_path_only():
    base = tiny()
    x = tokens()
    base_logits = base(x)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.5))
    model.train()
    # B = 0: whatever dropout does to the LoRA input, the base must see the clean input.
    torch.testing.assert_close(model(x), base_logits, atol=0, rtol=0)
    # Dropout of every LoRA input: the adapters vanish in training, and only there.
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=1.0))
    randomise_lora(model)
    model.train()
    torch.testing.assert_close(model(x), base_logits, atol=1e-6, rtol=0)
    assert (model.eval()(x) - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_head_loss_equals_logits_then_cross_entropy(autocast):
    # model(x, targets=y) runs the head and the loss fused, the LoRA head's low-rank path as an extra term, so no
    # [B, T, vocab] logits exist. Same seed, so every adapter draws the same dropout masks on both paths (training
    # mode, dropout on): the loss and every LoRA gradient equal those of logits -> F.cross_entropy.
    model = fast.apply(tiny(tied_embeddings=True))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3))
    assert isinstance(model.output, LeanLoRALinear)
    randomise_lora(model)
    model.train()
    x, y = tokens(t=12), tokens(t=12)
    y[0, 3] = -100   # an ignored target
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with ctx:
            loss = (model(x, targets=y) if fused else
                    torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten()))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (loss, grads), (ref, ref_grads) = run(True), run(False)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * (3 * 7 + 1)
    if not autocast:
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    else:
        # bf16 products round differently in the two orders (8 mantissa bits): compare whole tensors, relatively.
        torch.testing.assert_close(loss, ref, atol=0, rtol=1e-2)
        for n in grads:
            error = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()
            assert error < 3e-2, f"{n}: relative error {error:.3g}"
    assert grads["output.lora_B"].abs().max() > 0


def test_merge_unmerge_round_trip_and_merged_logits():
    model = tiny()
    x = tokens()
    base_logits = model(x)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomise_lora(model)
    base_weights = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    unmerged = model(x)
    merge_lora(model)
    for n, m in lora_modules(model).items():
        assert m.merged
        expected = base_weights[n].double() + m.scale * m.lora_B.double() @ m.lora_A.double()
        torch.testing.assert_close(m.base.weight.double(), expected, atol=1e-6, rtol=0)
    merged = model(x)
    assert (merged - base_logits).abs().max() > 1e-2  # the adapters' update is material
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-6)
    unmerge_lora(model)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-6)


def test_remove_lora_merged_and_discarded():
    original = tiny()
    x = tokens()
    base_logits = original(x)
    model = copy.deepcopy(original)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomise_lora(model)
    with_lora = model(x)
    discarded = copy.deepcopy(model)
    remove_lora(model, merge=True)
    assert not lora_modules(model) and type(model.layers[0].attention.wq) is nn.Linear
    torch.testing.assert_close(model(x), with_lora, atol=1e-5, rtol=1e-6)
    remove_lora(discarded, merge=False)
    torch.testing.assert_close(discarded(x), base_logits, atol=0, rtol=0)


def test_tied_head_stays_tied_and_merges_without_touching_embeddings():
    model = tiny(tied_embeddings=True)
    n_base = count_parameters(model)[1]
    cfg = LoRAConfig(r=4, alpha=8, targets=("wq", "output"))
    inject_lora(model, cfg)
    assert model.output.base.weight is model.tok_embeddings.weight
    lora_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
    assert count_parameters(model) == (lora_params, n_base + lora_params)
    randomise_lora(model)
    embeddings = model.tok_embeddings.weight.detach().clone()
    x = tokens()
    unmerged = model(x)
    keys = set(model.state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == keys and count_parameters(model)[0] == lora_params
    torch.testing.assert_close(model.tok_embeddings.weight, embeddings, atol=0, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-6)
    unmerge_lora(model)
    assert model.output.base.weight is model.tok_embeddings.weight


def test_mistral_7b_on_meta_counts_curies_trainable_parameters():
    args = ModelArgs.from_name("mistral-7b-v0.1")
    with torch.device("meta"):
        model = Transformer(args)
    names = inject_lora(model, LoRAConfig.curie())
    assert model.layers[5].feed_forward.w2.lora_A.is_meta
    # Brute force from the shapes: each target with r=32 adds r * (in + out) parameters.
    per_layer = sum(32 * (i + o) for i, o in [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                                (4096, 14336), (14336, 4096), (4096, 14336)])
    expected = 32 * per_layer + 32 * (4096 + 32000)
    trainable, total = count_parameters(model)
    assert len(names) == 32 * 7 + 1
    assert trainable == expected == 85_041_152
    assert total - trainable == 7_241_732_096
    summary = parameter_summary(model)
    print(summary)
    assert "85,041,152" in summary and "1.17%" in summary and "7,241,732,096" in summary


def test_inject_twice_or_unknown_target_is_an_error():
    model = tiny()
    inject_lora(model, LoRAConfig(r=2, alpha=2, targets=("wq",)))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(r=2, alpha=2, targets=("wk",)))
    headless = tiny()
    del headless.output
    with pytest.raises(ValueError, match="output.*match no module"):
        inject_lora(headless, LoRAConfig(r=2, alpha=2, targets=("wq", "output")))
    headless.output = nn.Identity()
    with pytest.raises(TypeError, match="'output' is a Identity, not a linear layer"):
        inject_lora(headless, LoRAConfig(r=2, alpha=2, targets=("wq", "output")))


# ---------------------------------------------------------------------------------------------------- adapter files

def test_save_load_round_trip(tmp_path):
    base = tiny()
    x = tokens()
    trained = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=6, dropout=0.1, targets=("wq", "wk", "w3", "output"), rslora=True)
    inject_lora(trained, cfg)
    randomise_lora(trained)
    save_adapter(trained, cfg, tmp_path / "adapter")
    assert not list((tmp_path / "adapter").glob(".*"))  # no temporary files left behind
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert set(stored) == {f"{n}.lora_{ab}" for n in lora_modules(trained) for ab in "AB"}

    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    torch.testing.assert_close(fresh(x), trained(x), atol=0, rtol=0)
    assert (fresh(x) - base(x)).abs().max() > 1e-2


def test_adapter_for_another_model_names_folder_tensor_and_shapes(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, targets=("wq", "w1"))
    trained = tiny()
    inject_lora(trained, cfg)
    save_adapter(trained, cfg, tmp_path / "a")
    other = tiny(hidden_dim=96)
    with pytest.raises(ValueError) as e:
        load_adapter(other, tmp_path / "a")
    msg = str(e.value)
    assert str(tmp_path / "a") in msg and "layers.0.feed_forward.w1.lora_B" in msg
    assert "(160, 4)" in msg and "(96, 4)" in msg


def test_adapter_with_missing_or_extra_tensors_is_an_error(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, targets=("wq",))
    trained = tiny()
    inject_lora(trained, cfg)
    save_adapter(trained, cfg, tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = load_file(path)
    dropped = tensors.pop("layers.2.attention.wq.lora_A")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"lacks.*layers\.2\.attention\.wq\.lora_A"):
        load_adapter(tiny(), tmp_path / "a")
    tensors["layers.2.attention.wq.lora_A"] = dropped
    tensors["layers.9.attention.wq.lora_A"] = dropped.clone()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"layers\.9\.attention\.wq\.lora_A"):
        load_adapter(tiny(), tmp_path / "a")


# ---------------------------------------------------------------------------------------------------- merged export

def test_merged_export_reloads_with_our_loader_merged_or_not(tmp_path):
    model = tiny(tied_embeddings=True)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomise_lora(model)
    x = tokens()
    expected = model(x)
    export_merged_hf(model, model.args, tmp_path / "a", max_shard_bytes=50_000)
    merge_lora(model)  # exporting an already merged model must not add the update twice
    export_merged_hf(model, model.args, tmp_path / "b")
    remove_lora(model)  # nor must a plain model whose merged head is no longer tied lose that head
    export_merged_hf(model, model.args, tmp_path / "c")
    a, b, c = (dict(kv for f in sorted((tmp_path / d).glob("model-*.safetensors")) for kv in load_file(f).items())
               for d in "abc")
    assert a.keys() == b.keys() == c.keys() and "lm_head.weight" in a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(c[name], a[name], atol=1e-6, rtol=0)
    reloaded, _ = load(tmp_path / "a", require_tokenizer=False)
    assert not reloaded.args.tied_embeddings
    # The randomised adapters push logits to ~60; at that scale float32 rounds a sum at ~60 * 2^-24 per term, and
    # merged (W + s B A) and unmerged (W, then B A) add the same products in another order: a few 1e-5 apart, each
    # within 2e-5 of float64 (measured).
    torch.testing.assert_close(reloaded(x), expected, atol=3e-5, rtol=1e-5)


def test_merged_export_refuses_a_quantised_base(tmp_path):
    model = tiny()
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("wq",)))
    model.layers[1].attention.wq.base = NF4Linear.from_weight(torch.randn(64, 64))
    with pytest.raises(TypeError, match=r"layers\.1\.attention\.wq.*NF4Linear"):
        export_merged_hf(model, model.args, tmp_path / "out")
