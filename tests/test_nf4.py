"""NF4 (model/nf4.py, model/kernels/triton/nf4.py, model/kernels/frozen_linear.py) against float64 references,
brute force and bitsandbytes.

    codebooks        NF4 = normal quantiles (scipy, float64); dynamic tree = its definition in float64
    round trip       every code is the float64-nearest, every weight NF4[code] * its double-quantised scale
    packing          exact, two codes per byte, first in the high nibble; odd sizes handled, bad input refused
    bitsandbytes     same codebooks, codes, scales and dequantised values (skipped if it does not install)
    Triton           the dequantisation kernel equals the reference (interpreter, fp32 / fp16)
    NF4Linear        forward and backward against float64; nothing weight-sized saved for the backward;
                     LoRA on top; whole-model quantisation and quantise-while-loading
"""
import pytest
import torch
import torch.nn as nn

from model import nf4
from model.args import ModelArgs
from model.kernels import _switch
from model.kernels.frozen_linear import frozen_linear
from model.kernels.triton import nf4 as nf4_kernels
from model.transformer import Transformer

# Shapes whose element count is, and is not, a multiple of 64 (and of 2, and of 64 * 256 blocks).
SHAPES = [(128, 192), (37, 53), (1, 1), (5,), (3, 64 * 256 + 64 * 3 + 7)]


# ------------------------------------------------------------------------------------------ float64 references

def nearest_index(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over the whole table, float64: (index of the nearest entry, near-tie mask).

    A near tie is an x whose two nearest entries are equally far up to float32 rounding of x (a few ulp): there the
    float32 code may rightly pick either.
    """
    x = x.double()
    d = (x[:, None] - table.double()[None, :]).abs()
    two = d.topk(2, dim=1, largest=False)
    return two.indices[:, 0], two.values[:, 1] - two.values[:, 0] <= 1e-6 * x.abs()


def reference_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation by its definition, float64: (dynamic codes, near-tie mask, dequantised scales)."""
    a = absmax.double()
    offset = a.mean()
    codes, ties, scales = [], [], []
    for g in range(0, len(a), 256):
        centred = a[g:g + 256] - offset
        group_max = centred.abs().max()
        c, tie = nearest_index(centred / group_max if group_max > 0 else centred, nf4.DYNAMIC)
        codes.append(c)
        ties.append(tie)
        scales.append(nf4.DYNAMIC.double()[c] * group_max + offset)
    return torch.cat(codes), torch.cat(ties), torch.cat(scales)


def assert_nearest_except_ties(got: torch.Tensor, want: torch.Tensor, tie: torch.Tensor, what: str):
    assert tie.float().mean() < 0.01, f"{what}: too many near-ties for the test to mean anything"
    bad = (got.long() != want) & ~tie
    assert not bad.any(), f"{what}: {int(bad.sum())} codes are not the nearest, first at {int(bad.nonzero()[0])}"


# ------------------------------------------------------------------------------------------------- codebooks

def test_nf4_codebook_is_the_normal_quantiles():
    from scipy.stats import norm
    # QLoRA: 8 positive and 7 negative equal-probability quantiles of N(0, 1) between p = 0.9677083 and 0.5, an
    # exact zero, everything divided by the largest.
    positive = norm.ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor(sorted([*negative, 0.0, *positive]), dtype=torch.float64)
    want = values / values.max()
    assert nf4.NF4.dtype == torch.float32 and nf4.NF4.shape == (16,)
    torch.testing.assert_close(nf4.NF4.double(), want, rtol=0, atol=3e-7)
    assert nf4.NF4[0] == -1 and nf4.NF4[7] == 0 and nf4.NF4[15] == 1 and nf4.ZERO_CODE == 7


def test_dynamic_codebook_is_the_dynamic_tree():
    # Level e (10^(e-6)) holds the centres of 2^e equal bins of [0.1, 1], with both signs; then 0 and 1.
    want = [0.0, 1.0]
    for e in range(7):
        for k in range(2**e):
            v = 10.0 ** (e - 6) * (0.1 + 0.9 * (k + 0.5) / 2**e)
            want += [v, -v]
    want = torch.tensor(sorted(want), dtype=torch.float64)
    assert nf4.DYNAMIC.dtype == torch.float32 and nf4.DYNAMIC.shape == (256,)
    torch.testing.assert_close(nf4.DYNAMIC.double(), want, rtol=2e-7, atol=0)
    assert (nf4.DYNAMIC[1:] > nf4.DYNAMIC[:-1]).all(), "codebook must be strictly increasing"


# ------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_nearest_code_times_block_scale(shape, dtype):
    w = (torch.randn(shape) * 0.02).to(dtype)
    q = nf4.quantize(w)
    n = w.numel()
    blocks = -(n // -64)
    assert q.packed.shape == (-(n // -2),) and q.scale_codes.shape == (blocks,)
    assert q.scale_absmax.shape == (-(blocks // -256),) and q.scale_offset.shape == ()

    # First level: absmax per block (exact), then the NF4 entry nearest to w / absmax, brute force in float64.
    x = w.double().flatten()
    padded = torch.nn.functional.pad(x, (0, -n % 64)).view(-1, 64)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded / absmax[:, None]).flatten()[:n]
    want_codes, tie = nearest_index(scaled, nf4.NF4)
    got_codes = nf4.unpack(q.packed, n)
    assert_nearest_except_ties(got_codes, want_codes, tie, "NF4 codes")

    # Second level: the absmax values, centred on their mean, to the nearest dynamic-tree entry per 256.
    want_sc, tie_sc, scales = reference_scales(absmax.float())
    assert_nearest_except_ties(q.scale_codes, want_sc, tie_sc, "scale codes")
    torch.testing.assert_close(q.scale_offset.double(), absmax.mean(), rtol=1e-6, atol=0)

    # Every dequantised weight is its NF4 value times its block's double-quantised scale.
    per_weight_scale = scales.repeat_interleave(64)[:n]
    want = nf4.NF4.double()[got_codes.long()] * per_weight_scale
    got = nf4.dequantize_reference(q, torch.float32).flatten().double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    # ... so the error is at most half a codebook gap plus the scale's own error, block by block.
    half_gap = (nf4.NF4[1:] - nf4.NF4[:-1]).max().double() / 2
    bound = half_gap * absmax.repeat_interleave(64)[:n] + (per_weight_scale - absmax.repeat_interleave(64)[:n]).abs()
    assert ((got - x).abs() <= bound * (1 + 1e-5)).all()
    assert nf4.dequantize_reference(q, dtype).dtype == dtype and nf4.dequantize_reference(q).shape == w.shape


def test_all_zero_and_constant_blocks():
    w = torch.cat([torch.zeros(64), torch.full((64,), 0.5), torch.randn(64)]).view(3, 64)
    q = nf4.quantize(w)
    got = nf4.dequantize_reference(q)
    assert (got[0] == 0).all(), "an all-zero block must come back as zeros"
    # A constant block is its absmax times NF4's 1.0: one value throughout, off only by the 8-bit scale rounding
    # (half a step of the dynamic tree's top level, 0.9 / 64 / 2, times the group's largest centred absmax).
    assert (nf4.unpack(q.packed, 192)[64:128] == 15).all() and (got[1] == got[1, 0]).all()
    assert abs(got[1, 0] - 0.5) <= 0.9 / 64 / 2 * q.scale_absmax[0] * (1 + 1e-6)


# --------------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("n", [1, 2, 63, 64, 1001])
def test_pack_unpack_exact_and_high_nibble_first(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = nf4.pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (-(n // -2),)
    c = codes.tolist() + [nf4.ZERO_CODE] * (n % 2)
    assert packed.tolist() == [16 * c[2 * i] + c[2 * i + 1] for i in range(len(c) // 2)]
    assert torch.equal(nf4.unpack(packed, n), codes)


def test_bad_input_is_refused_with_the_tensor_name():
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight.*non-finite.*elements 64\.\.127"):
        w = torch.randn(4, 64)
        w[1, 5] = float("nan")
        nf4.quantize(w, "layers.0.attention.wq.weight")
    with pytest.raises(ValueError, match="w2.*non-finite"):
        nf4.quantize(torch.tensor([1.0, float("inf")]), "w2")
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.zeros(0, 8), "e")
    with pytest.raises(TypeError, match="ids.*floating point"):
        nf4.quantize(torch.arange(64), "ids")
    with pytest.raises(ValueError, match="norm.weight.*2-D"):
        nf4.NF4Linear.from_weight(torch.randn(64), "norm.weight")
    with pytest.raises(ValueError, match="proj.*bias"):
        nf4.NF4Linear.from_linear(nn.Linear(64, 8), "proj")


# ---------------------------------------------------------------------------------------------- bitsandbytes

def _bitsandbytes_nf4():
    """bitsandbytes.functional if it imports and its CPU backend quantises NF4 here; else skip, saying why."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: NF4 oracle test skipped")
    import bitsandbytes.functional as F
    try:
        F.quantize_4bit(torch.randn(64, 64), quant_type="nf4", blocksize=64, compress_statistics=True)
    except Exception as e:  # any failure of the backend means: no oracle on this machine
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantise NF4 on this machine's CPU: {e}")
    return F


def test_codebooks_equal_bitsandbytes():
    F = _bitsandbytes_nf4()
    assert torch.equal(nf4.NF4, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC, F.create_dynamic_map())


@pytest.mark.parametrize("shape", [(512, 1024), (300, 301)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_and_values_equal_bitsandbytes(shape, dtype):
    F = _bitsandbytes_nf4()
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    q = nf4.quantize(w)

    # Same bytes (two codes per byte, first in the high nibble), same offset and second-level maxima.
    assert torch.equal(q.packed, packed.flatten())
    assert torch.equal(q.scale_offset, state.offset)
    assert torch.equal(q.scale_absmax, state.state2.absmax)
    assert state.state2.blocksize == 256 and torch.equal(state.state2.code, nf4.DYNAMIC)

    # Same 8-bit scale codes, except where bitsandbytes' CPU search is off: its C kernel (csrc/common.cpp) means to
    # pick the nearest code too, but its table-driven binary search (BinSearch Direct2) lands on a neighbour for a
    # few tenths of a percent of values. Wherever we differ, ours must be the nearer one (float64), or a tie.
    ours, theirs = q.scale_codes.long(), state.absmax.long()
    differ = ours != theirs
    assert differ.float().mean() < 0.01
    x = w.float().flatten()
    absmax = torch.nn.functional.pad(x, (0, -len(x) % 64)).view(-1, 64).abs().amax(dim=1).double()
    centred = absmax - absmax.mean()
    target = centred / q.scale_absmax.double().repeat_interleave(256)[:len(centred)]
    dyn = nf4.DYNAMIC.double()
    assert ((target - dyn[ours]).abs() <= (target - dyn[theirs]).abs() + 1e-7)[differ].all()

    # bitsandbytes' dequantisation of its own state equals ours of the same state, bit for bit, in every dtype...
    theirs_state = nf4.NF4Weight(packed.flatten(), state.absmax, state.state2.absmax, state.offset, w.shape)
    with torch.compiler.set_stance("force_eager"):  # its CPU path for odd shapes would spend seconds compiling
        want = F.dequantize_4bit(packed, state)
    assert want.dtype == dtype and torch.equal(nf4.dequantize_reference(theirs_state, dtype), want)
    # ... and our own state gives the same weights in every block whose scale code agrees.
    same_block = (~differ).repeat_interleave(64)[:w.numel()].view(w.shape)
    assert torch.equal(nf4.dequantize_reference(q, dtype)[same_block], want[same_block])



# ---------------------------------------------------------------------------------------------------- Triton

needs_triton = pytest.mark.skipif(
    _switch.triton is None or not (_switch.INTERPRETING or torch.cuda.is_available()),
    reason="Triton is not installed, or neither its interpreter (TRITON_INTERPRET=1) nor a GPU is available")


@needs_triton
@pytest.mark.parametrize("shape", [(96, 200), (3, 64 * 256 + 64 * 3 + 7), (5,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dequantisation_equals_reference(shape, dtype):
    device = "cpu" if _switch.INTERPRETING else "cuda"
    q = nf4.quantize(torch.randn(shape, device=device))
    nf4_table, _, dynamic, _ = nf4._tables(q.packed.device)
    got = nf4_kernels.dequantize_nf4(q.packed, q.scale_codes, q.scale_absmax, q.scale_offset, nf4_table, dynamic,
                                     q.shape.numel(), dtype, nf4.BLOCK_SIZE, nf4.SCALE_BLOCK_SIZE)
    want = nf4.dequantize_reference(q, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(shape), want)  # same float32 operations in the same order, one rounding to dtype
    with _switch.use_kernels("triton"):        # and the switch routes nf4.dequantize to it
        assert torch.equal(nf4.dequantize(q, dtype), want)


@needs_triton
def test_nf4_linear_on_the_triton_path_matches_reference_path():
    device = "cpu" if _switch.INTERPRETING else "cuda"
    layer = nf4.NF4Linear.from_weight(torch.randn(48, 80, device=device) / 9)
    x = torch.randn(2, 3, 80, device=device, requires_grad=True)
    g = torch.randn(2, 3, 48, device=device)
    results = []
    for mode in ("reference", "triton"):
        x.grad = None
        with _switch.use_kernels(mode):
            y = layer(x)
            y.backward(g)
        results.append((y.detach(), x.grad.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- NF4Linear

def test_nf4_linear_forward_and_backward_against_float64():
    linear = nn.Linear(96, 40, bias=False)
    layer = nf4.NF4Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (96, 40) and not list(layer.parameters())
    w_hat = nf4.dequantize_reference(nf4.quantize(linear.weight)).double()
    x = torch.randn(2, 5, 96, requires_grad=True)
    g = torch.randn(2, 5, 40)
    y = layer(x)
    torch.testing.assert_close(y.double(), x.detach().double() @ w_hat.T, rtol=1e-5, atol=1e-5)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ w_hat, rtol=1e-5, atol=1e-5)
    # Quantisation error is what it should be for 4.1 bits: small next to the weights, far from zero.
    rel = (w_hat - linear.weight.double()).norm() / linear.weight.double().norm()
    assert 0.02 < rel < 0.15, rel


def test_backward_saves_nothing_weight_sized():
    """The dequantised weight must not be kept for the backward: that copy is what NF4 exists to avoid."""
    layer = nf4.NF4Linear.from_weight(torch.randn(256, 192))
    saved: list[torch.Tensor] = []

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(3, 192, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 256 * 192 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


def test_casting_the_model_keeps_the_scales_exact():
    layer = nf4.NF4Linear.from_weight(torch.randn(32, 128))
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # Module.to(dtype) casts floating buffers; ours must be immune
    assert torch.equal(layer.dequantize(), before)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), x.double() @ before.to(torch.bfloat16).double().T, rtol=2e-2, atol=2e-2)


def test_lora_trains_on_an_nf4_base():
    from lora.layers import LoRALinear
    base = nf4.NF4Linear.from_weight(torch.randn(24, 64) / 8)
    lora = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(6, 64)
    update = x.double() @ lora.lora_A.double().T @ lora.lora_B.double().T
    want = x.double() @ base.dequantize().double().T + (8 / 4) * update  # scale = alpha / r
    y = lora(x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    assert lora.lora_A.grad.abs().sum() > 0 and lora.lora_B.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- whole models

def _with_dequantized_weights(model: Transformer, skip: tuple[str, ...]) -> Transformer:
    """A full-precision twin whose linear weights are the NF4 round trip of the original's (the reference)."""
    twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict())
    twin.tie_weights()
    for name, m in twin.named_modules():
        if isinstance(m, nn.Linear) and name not in skip and name.rpartition(".")[2] not in skip:
            with torch.no_grad():
                m.weight = nn.Parameter(nf4.dequantize_reference(nf4.quantize(m.weight)))
    return twin


@pytest.mark.parametrize("skip", [("output",), ("output", "wo"), ()])
def test_quantize_model_replaces_linears_in_place(skip):
    args = ModelArgs.from_name("tiny")
    model = Transformer(args).eval()
    reference = _with_dequantized_weights(model, skip).eval()
    n = nf4.quantize_model_(model, skip=skip)
    per_layer = 7 - ("wo" in skip)
    assert n == args.n_layers * per_layer + ("output" not in skip)
    assert sum(isinstance(m, nf4.NF4Linear) for m in model.modules()) == n
    assert isinstance(model.output, nf4.NF4Linear) == ("output" not in skip)
    tokens = torch.randint(0, args.vocab_size, (2, 11))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)


def test_quantize_while_loading_equals_quantizing_after():
    from model.loading import build_model
    args = ModelArgs.from_name("tiny")
    source = Transformer(args)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    loaded = build_model(args, ((k, v, "tiny.pth") for k, v in state.items()),
                         transform=nf4.quantize_while_loading()).eval()
    after = Transformer(args)
    after.load_state_dict(state)
    nf4.quantize_model_(after)
    after.eval()
    for name, m in after.named_modules():
        if isinstance(m, nf4.NF4Linear):
            got = loaded.get_submodule(name)
            assert isinstance(got, nf4.NF4Linear) and torch.equal(got.packed, m.packed), name
    assert isinstance(loaded.output, nn.Linear)
    tokens = torch.randint(0, args.vocab_size, (1, 9))
    assert torch.equal(loaded(tokens), after(tokens))


def test_adapter_trained_on_nf4_base_merges_into_full_precision_weights(tmp_path):
    """QLoRA's export path: train on the NF4 base, save the adapter, merge it into the full-precision weights."""
    from lora.adapter import load_adapter, save_adapter
    from lora.inject import LoRAConfig, inject_lora, lora_modules, merge_lora
    args = ModelArgs.from_name("tiny")
    full = Transformer(args).eval()
    qlora = Transformer(args).eval()
    qlora.load_state_dict(full.state_dict())
    nf4.quantize_model_(qlora)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        full_before, qlora_before = full(tokens), qlora(tokens)
    weights_before = {k: v.clone() for k, v in full.state_dict().items()}

    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    inject_lora(qlora, cfg)
    opt = torch.optim.SGD([p for p in qlora.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # the first step moves only B (it starts at zero), the second A too
        loss = torch.nn.functional.cross_entropy(qlora(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(qlora, cfg, tmp_path)
    load_adapter(full, tmp_path)
    merge_lora(full)

    # Every merged weight is the untouched full-precision weight plus the update trained on the NF4 base.
    for name, m in lora_modules(qlora).items():
        assert m.lora_B.abs().sum() > 0, f"{name}: the adapter did not train"
        want = (weights_before[f"{name}.weight"].double() + m.scale * (m.lora_B.double() @ m.lora_A.double()))
        torch.testing.assert_close(full.get_submodule(name).base.weight.double(), want, rtol=1e-6, atol=1e-7)
    # ... so the adapter moves the full-precision model's logits the way it moved the NF4 model's.
    with torch.no_grad():
        moved_full, moved_qlora = (full(tokens) - full_before).flatten(), (qlora(tokens) - qlora_before).flatten()
    assert moved_qlora.norm() > 0.1 * qlora_before.norm(), "the adapter barely changed the model: nothing tested"
    assert torch.nn.functional.cosine_similarity(moved_full, moved_qlora, dim=0) > 0.99


# ------------------------------------------------------------------ CPU dequantisation into reused buffers

@pytest.mark.parametrize("mode", ["auto", "reference"])   # the C kernel, and the chunked PyTorch path without it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 64), (640, 832), (3, 5)])
def test_cpu_dequantisation_into_a_buffer_equals_the_reference_bitwise(shape, dtype, mode):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w.view(-1)[:64] = 0                         # an all-zero block
    w.view(-1)[-1] = 40.0                       # an outlier: its block's scale is far from the mean
    q = nf4.quantize(w)
    want = nf4.dequantize_reference(q, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    with _switch.use_kernels(mode):
        got = nf4.dequantize_cpu_into(q, out)
        again = nf4.dequantize_scratch(q, dtype)
    assert got is out
    bits = torch.int16 if dtype.itemsize == 2 else torch.int32
    assert torch.equal(out.view(bits), want.view(bits))
    assert torch.equal(again.view(bits), want.view(bits))


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_reuses_its_dequantisation_buffer(dtype, mode, monkeypatch):
    """After the first call, forward and backward write the weight into the same buffer (no fresh allocation,
    which at 7B shape meant hundreds of millions of page faults per step), and give the allocating path's bits."""
    torch.manual_seed(0)
    layers = [nf4.NF4Linear.from_weight(torch.randn(192, 128)) for _ in range(2)]   # two layers of one size
    x = torch.randn(4, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 192, dtype=dtype)
    # The allocating version: the reference dequantisation at every call.
    want_y = [frozen_linear(x, layer.dequantize) for layer in layers]
    want_dx = [torch.autograd.grad(y, x, g)[0] for y in want_y]

    pointers = []
    real = nf4.dequantize_scratch

    def spy(q, dt):
        w = real(q, dt)
        pointers.append(w.data_ptr())
        return w
    monkeypatch.setattr(nf4, "dequantize_scratch", spy)
    with _switch.use_kernels(mode):
        for _ in range(2):
            ys = [layer(x) for layer in layers]
            dxs = [torch.autograd.grad(y, x, g)[0] for y in ys]
            for y, dx, wy, wdx in zip(ys, dxs, want_y, want_dx):
                assert torch.equal(y, wy) and torch.equal(dx, wdx)
    assert len(pointers) == 8 and len(set(pointers)) == 1, pointers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_quantisation_kernel_equals_the_pytorch_path(dtype):
    """The C first level (absmax and codes) against the PyTorch loop, ties on the midpoints included."""
    torch.manual_seed(5)
    w = torch.randn(96, 320) * torch.rand(96, 1) * 2
    w.view(-1)[:64] = 0
    ties = w.view(-1)[64:128]                        # a block whose absmax is 1, holding every midpoint exactly
    ties[:] = 0.25
    ties[0] = 1.0
    _, mid, _, _ = nf4._tables(torch.device("cpu"))
    ties[1:16] = mid.to(dtype).float()
    ties[16:31] = -mid.to(dtype).float()
    w = w.to(dtype)
    got = nf4.quantize(w)
    with _switch.use_kernels("reference"):
        want = nf4.quantize(w)
    for part in ("packed", "scale_codes", "scale_absmax", "scale_offset"):
        assert torch.equal(getattr(got, part), getattr(want, part)), part
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[7, 9] = bad
        with pytest.raises(ValueError, match="non-finite"):
            nf4.quantize(w2, "w2")
