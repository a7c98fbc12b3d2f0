"""Decoding from a GGUF's own blocks (model/kernels/cpu/gguf_blocks.c): each SIMD path of the C kernel against float64
on random blocks, packing against the dequantisers (ours and the gguf package's), when the layer uses it and when
it must not, and whole models loaded from quantised GGUFs: the same logits and tokens as from the float32 weights.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from model.args import ModelArgs
from model.generate import generate
from model.gguf import GGML_TYPES, dequantize as gguf_dequantize
from model.gguf_linear import GGUFBlockLinear as Linear
from model.kernels import use_kernels
from model.kernels.cpu import gguf_blocks
from model.loading import drop_gguf_blocks, load
from model.transformer import Transformer
from tests.test_gguf import random_blocks
from tests.test_loading_checks import write_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler ($CC or cc) on PATH: the kernel cannot be built")
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def random_packed(rng, type_name: str, n_out: int, k: int) -> tuple[torch.Tensor, gguf_blocks.Blocks]:
    """Random valid blocks of a [n_out, k] tensor -> (its bytes, packed Blocks)."""
    raw = torch.from_numpy(random_blocks(rng, type_name, n_out * k // 32).reshape(-1))
    return raw, gguf_blocks.pack(raw, TYPES[type_name], (n_out, k))


def sane_blocks(rng, type_name: str, n_out: int, k: int) -> gguf_blocks.Blocks:
    """Blocks quantised from Gaussian weights by the gguf package: realistic scales, so products stay finite."""
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(w, T[type_name]).reshape(-1))
    return gguf_blocks.pack(raw, TYPES[type_name], (n_out, k))


# ------------------------------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("type_name", TYPES)
def test_packed_blocks_are_the_dequantised_weights_exactly(type_name):
    rng = np.random.default_rng(3)
    n_out, k = 7, 96
    raw, blocks = random_packed(rng, type_name, n_out, k)
    ours = gguf_dequantize(raw.numpy().tobytes(), TYPES[type_name], n_out * k).view(n_out, k)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(n_out, -1), T[type_name]).copy())
    rebuilt = gguf_blocks.dequantize(blocks)
    assert rebuilt.dtype == torch.float32 and rebuilt.shape == (n_out, k)
    assert torch.equal(rebuilt, ours) and torch.equal(rebuilt, theirs)
    if type_name != "Q4_0":   # bit for bit, -0.0 included
        assert torch.equal(rebuilt.view(torch.int32), ours.view(torch.int32))
    else:   # d * 8 - 8 d is +0.0 where d * (8 - 8) is -0.0 for a negative d: the same number in any product
        differ = rebuilt.view(torch.int32) != ours.view(torch.int32)
        assert bool((rebuilt[differ] == 0).all())


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="not kept as blocks"):
        gguf_blocks.pack(torch.zeros(210, dtype=torch.uint8), 14, (1, 256))        # Q6_K
    with pytest.raises(ValueError, match="expected 40 bytes, got 39"):
        gguf_blocks.pack(torch.zeros(39, dtype=torch.uint8), 3, (2, 32))
    blocks = sane_blocks(np.random.default_rng(0), "Q8_0", 4, 64)
    with pytest.raises(ValueError, match=r"shape \(4, 64\) cannot stand for a weight of shape \(64, 4\)"):
        blocks.attach(torch.zeros(64, 4))


# ------------------------------------------------------------------------------------------------------ kernel

# Each path of gguf_blocks.c, built on purpose: plain C (no SIMD flags), AVX2, and AVX-512 (what -march=native picks
# on an AVX-512 CPU). A path the CPU cannot run is skipped.
PATHS = {
    "plain C": (["-O3", "-fopenmp"], set()),
    "AVX2": (["-O3", "-mavx2", "-mfma", "-fopenmp"], {"avx2", "fma"}),
    "AVX-512": (["-O3", "-mavx512f", "-mavx2", "-mfma", "-fopenmp"], {"avx512f", "avx2", "fma"}),
}


@pytest.fixture(scope="module", params=list(PATHS))
def kernel_path(request, tmp_path_factory):
    if not HAVE_CC:
        pytest.skip("no C compiler")
    flags, needed = PATHS[request.param]
    if not needed <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needed - cpu_flags())}")
    target = tmp_path_factory.mktemp("kernel") / "gguf_blocks.so"
    error = gguf_blocks.compile_library(flags, target)
    assert error is None, error
    return gguf_blocks.open_library(target)


def run_kernel(lib, x: torch.Tensor, blocks: gguf_blocks.Blocks, threads: int = 1) -> torch.Tensor:
    saved = gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried
    gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried = lib, True
    try:
        with torch.no_grad():
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return gguf_blocks.matmul(x, blocks)
            finally:
                torch.set_num_threads(prev)
    finally:
        gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried = saved


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", range(1, gguf_blocks.MAX_ROWS + 1))   # each case of the C switch
def test_kernel_equals_float64_products(kernel_path, type_name, rows):
    rng = np.random.default_rng(rows)
    n_out, k = 37, 160                                      # an odd row count; 5 blocks a row
    blocks = sane_blocks(rng, type_name, n_out, k)
    x = torch.randn(2, rows // 2, k) if rows % 2 == 0 else torch.randn(rows, k)   # leading dims flattened
    y = run_kernel(kernel_path, x, blocks)
    w64 = gguf_blocks.dequantize(blocks).double()
    expected = x.double() @ w64.T
    # float32 sums of k products: error below k * eps * sum |x_i w_i| (Higham's bound), with room to spare.
    bound = k * 2.0 ** -24 * (x.double().abs() @ w64.abs().T)
    assert y.shape == (*x.shape[:-1], n_out) and y.dtype == torch.float32
    assert bool(((y.double() - expected).abs() <= bound).all()), (y.double() - expected).abs().max()
    assert not torch.equal(y, torch.zeros_like(y))
    # The same as the PyTorch reference up to the order of the additions.
    torch.testing.assert_close(y, gguf_blocks.reference_matmul(x, blocks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_kernel_threads_split_rows_without_changing_sums(kernel_path, type_name):
    blocks = sane_blocks(np.random.default_rng(5), type_name, 301, 96)
    x = torch.randn(3, 96)
    assert torch.equal(run_kernel(kernel_path, x, blocks, threads=1), run_kernel(kernel_path, x, blocks, threads=2))


def test_kernel_refuses_more_rows_than_it_takes(kernel_path):
    blocks = sane_blocks(np.random.default_rng(0), "Q4_1", 4, 32)
    x, y = torch.randn(gguf_blocks.MAX_ROWS + 1, 32), torch.empty(gguf_blocks.MAX_ROWS + 1, 4)
    p = lambda t: t.data_ptr()   # noqa: E731
    assert kernel_path.gguf_blocks_matmul_q4(p(blocks.codes), p(blocks.d), p(blocks.m), p(x), p(y), 4, 32,
                                             gguf_blocks.MAX_ROWS + 1, 1) == -1


# ------------------------------------------------------------------------------------- when the layer uses it

@needs_cc
def test_layer_uses_blocks_only_while_they_are_its_weight():
    blocks = sane_blocks(np.random.default_rng(1), "Q4_1", 48, 64)
    layer = Linear(64, 48, bias=False)
    with torch.no_grad():
        layer.weight.copy_(gguf_blocks.dequantize(blocks))
    layer.weight.requires_grad_(False)
    layer.gguf_blocks = blocks.attach(layer.weight)
    x = torch.randn(1, 64)

    def used(x) -> bool:
        return gguf_blocks.applies(x, layer.gguf_blocks, layer.weight)

    with torch.no_grad():
        assert used(x) and used(torch.randn(2, 4, 64))
        assert not used(torch.randn(gguf_blocks.MAX_ROWS + 1, 64))          # prefill: oneDNN's GEMM
        assert not used(x.double()) and not used(x.bfloat16())
        with use_kernels("reference"):
            assert not used(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not used(x)
    assert used(x)                                  # grad mode, but nothing requires a gradient
    assert not used(x.clone().requires_grad_())     # training: autograd needs the dense product
    # After an in-place change (a LoRA merge, an optimiser step, load_state_dict) the blocks are stale.
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not used(x)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    # New memory behind the same parameter (`p.data = ...`, `.to()`) or another tensor: stale too.
    layer.gguf_blocks = blocks.attach(layer.weight)
    assert used(x)
    layer.weight.data = layer.weight.data.clone()
    assert not used(x)
    assert not gguf_blocks.applies(x, blocks.attach(torch.zeros(48, 64)), layer.weight)
    layer.gguf_blocks = blocks.attach(layer.weight)
    assert not used(torch.randn(1, 32))       # another width: F.linear's own error, not the kernel's
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        layer(torch.randn(1, 32))


@needs_cc
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")   # inside torch.func
def test_forward_ad_and_torch_func_take_the_dense_product():
    from torch.autograd import forward_ad
    blocks = sane_blocks(np.random.default_rng(2), "Q8_0", 16, 32)
    layer = Linear(32, 16, bias=False).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(gguf_blocks.dequantize(blocks))
    layer.gguf_blocks = blocks.attach(layer.weight)
    x, t = torch.randn(1, 32), torch.randn(1, 32)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, t @ layer.weight.T)     # the kernel would have dropped it
    _, jvp = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(jvp, t @ layer.weight.T)
    torch.testing.assert_close(torch.func.vmap(layer)(x), x @ layer.weight.T)


@needs_cc
def test_kernel_output_is_float32_whatever_the_default_dtype():
    blocks = sane_blocks(np.random.default_rng(4), "Q4_1", 8, 32)
    x = torch.randn(1, 32)
    expected = gguf_blocks.reference_matmul(x, blocks)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = gguf_blocks.matmul(x, blocks)
    finally:
        torch.set_default_dtype(previous)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected)


def blocks_in(model) -> int:
    return sum(getattr(m, "gguf_blocks", None) is not None for m in model.modules())


@needs_cc
def test_moving_replacing_or_writing_the_weight_drops_the_blocks(tmp_path):
    model, _ = load(quantised_gguf(tmp_path / "tiny.gguf", tied=True), require_tokenizer=False)
    all_layers = 7 * model.args.n_layers + 1
    assert blocks_in(model) == all_layers
    model.float()                       # already float32: nothing changes, the blocks stay
    assert blocks_in(model) == all_layers
    layer = model.layers[0].attention.wq
    old = layer.weight
    layer.weight = torch.nn.Parameter(old.detach().clone())    # a new tensor: its blocks go, and free the old one
    assert layer.gguf_blocks is None
    ref = weakref.ref(old)
    del old
    gc.collect()
    assert ref() is None
    # Written in place (a copying load_state_dict): the next product takes the weight, and the blocks are freed.
    other = model.layers[1].feed_forward.w2
    with torch.no_grad():
        other.load_state_dict({"weight": other.weight * 2})
        x = torch.randn(1, other.in_features)
        torch.testing.assert_close(other(x), x @ other.weight.T)
    assert other.gguf_blocks is None
    model.half().float()               # the values are rounded; the memory may even be reused: blocks dropped
    assert blocks_in(model) == 0
    model2, _ = load(quantised_gguf(tmp_path / "tiny2.gguf", tied=False), require_tokenizer=False)
    drop_gguf_blocks(model2)
    assert blocks_in(model2) == 0


@needs_cc
def test_copies_and_pickled_models_keep_working_blocks(tmp_path, monkeypatch):
    import copy
    import pickle
    from multiprocessing.reduction import ForkingPickler   # how a model reaches a spawned worker

    import torch.multiprocessing as _reducers  # noqa: F401  (registers the tensor reducers: shared memory)
    model, _ = load(quantised_gguf(tmp_path / "tiny.gguf", tied=True), require_tokenizer=False)
    tokens = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        expected = model(tokens)
    calls = []
    real = gguf_blocks.matmul
    monkeypatch.setattr(gguf_blocks, "matmul", lambda x, b: calls.append(1) or real(x, b))
    for name, twin in {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model))}.items():
        calls.clear()
        for module in twin.modules():   # each copy's blocks stand for the copy's own weights
            if getattr(module, "gguf_blocks", None) is not None:
                assert module.gguf_blocks.weight is module.weight, name
        with torch.no_grad():
            torch.testing.assert_close(twin(tokens), expected, rtol=1e-6, atol=1e-6)
        assert len(calls) == 7 * model.args.n_layers + 1, name
    # On its way to another process the weights move to shared memory (new addresses, same values), which the
    # blocks cannot tell from a `p.data = ...` swap: that copy, and the original, fall back to the float32 weights.
    twin = pickle.loads(ForkingPickler.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    assert blocks_in(twin) == 0 and blocks_in(model) == 0


@needs_cc
def test_swapping_parameters_on_conversion_still_works(tmp_path):
    model, _ = load(quantised_gguf(tmp_path / "tiny.gguf", tied=False), require_tokenizer=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
        model.to(torch.float32)
        model.load_state_dict(state, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    tokens = torch.randint(0, 256, (1, 3))
    dense, _ = load(quantised_gguf(tmp_path / "tiny.gguf", tied=False), require_tokenizer=False, gguf_blocks=False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)


@needs_cc
def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICURIE_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf_blocks.KERNEL, "lib", None)
    monkeypatch.setattr(gguf_blocks.KERNEL, "tried", False)
    assert gguf_blocks.library() is not None
    (built,) = (tmp_path / "kernels").glob("gguf_blocks-*.so")
    assert built.stat().st_mode & 0o044 == 0o044 & ~current_umask()     # readable by others, as the umask allows
    truncated = tmp_path / "truncated"       # a new file renamed over it: this process still maps the old one
    truncated.write_bytes(built.read_bytes()[:100])
    os.replace(truncated, built)
    # A new process (this one has the library loaded already, and dlopen would hand it back by name).
    check = ("import warnings; warnings.simplefilter('error'); from model.kernels.cpu import gguf_blocks; "
             "assert gguf_blocks.library() is not None")
    run = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, env={**os.environ, "MINICURIE_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert built.stat().st_size > 100
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]    # no temp files left behind


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ whole models

def quantised_gguf(path: Path, tied: bool, seed: int = 0) -> Path:
    """A tiny model written as a GGUF by the gguf package: Q4_1 attention, Q4_0 feed-forward, Q8_0 embeddings and
    head, float32 norms: the mix of a real quantised file."""
    torch.manual_seed(seed)
    args = dataclasses.replace(ModelArgs.from_name("tiny"), tied_embeddings=tied)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.2)

    def quant(name: str):
        if name.endswith("norm.weight"):
            return None
        if ".attn_" in name:
            return T.Q4_1
        return T.Q4_0 if ".ffn_" in name else T.Q8_0
    return write_gguf(path, model, drop=("output.weight",) if tied else (), quant=quant)


@needs_cc
@pytest.mark.parametrize("tied", [True, False])
def test_model_decodes_from_blocks_like_from_float32_weights(tmp_path, monkeypatch, tied):
    path = quantised_gguf(tmp_path / "tiny.gguf", tied)
    fast, _ = load(path, require_tokenizer=False)
    dense, _ = load(path, require_tokenizer=False, gguf_blocks=False)
    kept = {n: m.gguf_blocks for n, m in fast.named_modules() if getattr(m, "gguf_blocks", None) is not None}
    assert len(kept) == 7 * fast.args.n_layers + 1 and "output" in kept
    assert not any(getattr(m, "gguf_blocks", None) is not None for m in dense.modules())
    assert kept["output"].bits == 8 and kept["layers.0.attention.wq"].bits == 4
    for name, blocks in kept.items():   # each kept block set is exactly the weight the layer holds
        assert torch.equal(gguf_blocks.dequantize(blocks), fast.get_submodule(name).weight)

    calls = []
    real = gguf_blocks.matmul
    monkeypatch.setattr(gguf_blocks, "matmul", lambda x, b: calls.append(x.shape) or real(x, b))
    prompt = torch.randint(0, fast.args.vocab_size, (1, 11))
    with torch.no_grad():
        caches = fast.make_cache(1, 64), dense.make_cache(1, 64)
        a, b = fast.prefill(prompt, caches[0]), dense.prefill(prompt, caches[1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for _ in range(8):   # past the window of 5: the rolling cache wraps
            nxt = a.argmax(-1, keepdim=True)
            a, b = fast(nxt, caches[0])[:, -1], dense(nxt, caches[1])[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Every product of the prompt's chunks (of the window, 5 tokens: at most MAX_ROWS rows) and decode steps.
    n_chunks = -(-prompt.shape[1] // fast.args.sliding_window)
    assert len(calls) == (n_chunks + 8) * (7 * fast.args.n_layers + 1)
    assert list(generate(fast, prompt[0].tolist(), 12)) == list(generate(dense, prompt[0].tolist(), 12))
    # Speculative steps (a few rows at once) read the blocks too, and still give plain greedy's tokens.
    calls.clear()
    text = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert list(generate(fast, text, 10, draft_tokens=3)) == list(generate(dense, text, 10))
    assert any(shape[-2] > 1 for shape in calls if len(shape) > 1)


@needs_cc
def test_merged_lora_is_not_hidden_by_stale_blocks(tmp_path):
    from lora import LoRAConfig, inject_lora, merge_lora, unmerge_lora
    path = quantised_gguf(tmp_path / "tiny.gguf", tied=True)
    fast, _ = load(path, require_tokenizer=False)
    dense, _ = load(path, require_tokenizer=False, gguf_blocks=False)
    for model in (fast, dense):
        torch.manual_seed(7)     # the same A and B in both
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)     # B = 0 would make merging a no-op
    tokens = torch.randint(0, 256, (1, 9))

    def last_logits(model):
        with torch.no_grad():
            cache = model.make_cache(1, 32)
            model.prefill(tokens[:, :-1], cache)
            return model(tokens[:, -1:], cache)[0, -1]

    before = last_logits(fast)
    torch.testing.assert_close(before, last_logits(dense), rtol=1e-5, atol=1e-5)    # unmerged: base + LoRA
    merge_lora(fast), merge_lora(dense)
    merged = last_logits(fast)
    torch.testing.assert_close(merged, last_logits(dense), rtol=1e-5, atol=1e-5)   # merged weights, not the blocks
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    unmerge_lora(fast)
    torch.testing.assert_close(last_logits(fast), before, rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_model_loads_float32_only(tmp_path, monkeypatch):
    path = quantised_gguf(tmp_path / "tiny.gguf", tied=True)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MINICURIE_CACHE", str(tmp_path / "cache"))          # no library built earlier
    monkeypatch.setattr(gguf_blocks.KERNEL, "lib", None)
    monkeypatch.setattr(gguf_blocks.KERNEL, "tried", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load(path, require_tokenizer=False)
    assert any("GGUF block kernel unavailable" in str(w.message) and "no-such-compiler" in str(w.message)
               for w in caught)
    assert not any(getattr(m, "gguf_blocks", None) is not None for m in model.modules())
    dense, _ = load(path, require_tokenizer=False, gguf_blocks=False)
    tokens = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(tokens), dense(tokens))


def test_only_float32_linear_layers_keep_blocks(tmp_path):
    path = quantised_gguf(tmp_path / "tiny.gguf", tied=False)
    model, _ = load(path, require_tokenizer=False, dtype=torch.bfloat16)
    assert not any(getattr(m, "gguf_blocks", None) is not None for m in model.modules())
    # NF4 replaces the blocks' linear layers; the head stays a float32 Linear and keeps its Q8_0 blocks.
    model, _ = load(path, require_tokenizer=False, quantize="nf4")
    assert [n for n, m in model.named_modules() if getattr(m, "gguf_blocks", None) is not None] == ["output"]


def test_block_types_are_ggml_types():
    for type_id, name in gguf_blocks.BLOCK_TYPES.items():
        assert GGML_TYPES[type_id][0] == name and GGML_TYPES[type_id][1] == gguf_blocks.QK
