"""A GGUF's own blocks (model/kernels/cpu/gguf_blocks.c, model/gguf_linear.py): each SIMD path of the C kernels against
float64 products and the gguf package's dequantiser on random blocks, the GGUFLinear layer (which product it takes,
its input gradient, that it holds no float copy, state dicts, copies, casts), and whole models loaded from
quantised GGUFs: the same logits, tokens, LoRA merges and exports as from the float32 weights.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from model.args import ModelArgs
from model.generate import generate
from model.gguf import GGML_TYPES, dequantize as gguf_dequantize
from model import fast as acceleration
from model.gguf_linear import GGUFLinear
from model.kernels import use_kernels
from model.kernels.cpu import gguf_blocks
from model.loading import load
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
    with pytest.raises(ValueError, match=r"expected a contiguous float32 CPU tensor of shape \(4, 64\)"):
        gguf_blocks.dequantize_into(blocks, torch.empty(64, 4))


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

def run_dequantizer(lib, blocks: gguf_blocks.Blocks, threads: int = 1) -> torch.Tensor:
    saved = gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried
    gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried = lib, True
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return gguf_blocks.dequantize_into(blocks, torch.full(blocks.shape, float("nan")))
    finally:
        torch.set_num_threads(prev)
        gguf_blocks.KERNEL.lib, gguf_blocks.KERNEL.tried = saved


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_dequantizer_equals_the_gguf_package(kernel_path, type_name, threads):
    rng = np.random.default_rng(11 + threads)
    n_out, k = 29, 224                                      # 7 blocks a row; fresh random bytes (any scale)
    raw, blocks = random_packed(rng, type_name, n_out, k)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(n_out, -1), T[type_name]).copy())
    ours = run_dequantizer(kernel_path, blocks, threads)
    assert torch.equal(ours, theirs)                        # every value (a Q4_0 zero may differ in sign only)
    assert torch.equal(ours, gguf_blocks.dequantize(blocks))
    if type_name != "Q4_0":
        assert torch.equal(ours.view(torch.int32), gguf_blocks.dequantize(blocks).view(torch.int32))


@needs_cc
def test_dequantizer_without_the_kernel_is_the_reference():
    blocks = sane_blocks(np.random.default_rng(6), "Q4_1", 12, 64)
    with use_kernels("reference"):
        ref = gguf_blocks.dequantize_into(blocks, torch.empty(12, 64))
    assert torch.equal(ref, gguf_blocks.dequantize(blocks))


# ------------------------------------------------------------------------------------------------ the layer

def counting(monkeypatch) -> list:
    """Record each call of the block kernel (x's shape)."""
    calls = []
    real = gguf_blocks.matmul
    monkeypatch.setattr(gguf_blocks, "matmul", lambda x, b: calls.append(tuple(x.shape)) or real(x, b))
    return calls


@needs_cc
@pytest.mark.parametrize("type_name", TYPES)
def test_layer_forward_and_input_gradient_equal_float64(monkeypatch, type_name):
    blocks = sane_blocks(np.random.default_rng(1), type_name, 48, 64)
    layer = GGUFLinear(blocks, "blk.0.attn_q.weight")
    w64 = gguf_blocks.dequantize(blocks).double()
    calls = counting(monkeypatch)
    for rows in (1, 2, gguf_blocks.MAX_ROWS, gguf_blocks.MAX_ROWS + 1, 40):
        x = torch.randn(rows, 64)
        calls.clear()
        with torch.no_grad():
            y = layer(x)
        expected = x.double() @ w64.T
        bound = 64 * 2.0 ** -24 * (x.double().abs() @ w64.abs().T) + 1e-30
        assert y.dtype == torch.float32 and bool(((y.double() - expected).abs() <= 4 * bound).all()), rows
        assert len(calls) == (rows <= gguf_blocks.MAX_ROWS)     # a few rows: the blocks; more: the dequantised W
        # Training through the frozen base: dx = dy @ W, W dequantised again in the backward.
        xg = x.clone().requires_grad_()
        dy = torch.randn(rows, 48)
        calls.clear()
        (layer(xg) * dy).sum().backward()
        assert not calls
        torch.testing.assert_close(xg.grad.double(), dy.double() @ w64, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        layer(torch.randn(1, 32))             # another width: F.linear's own error, not the kernel's


@needs_cc
def test_layer_holds_the_blocks_and_no_float_copy():
    blocks = sane_blocks(np.random.default_rng(2), "Q4_1", 96, 64)
    layer = GGUFLinear(blocks)
    assert list(layer.parameters()) == []                   # nothing to train, nothing for an optimiser
    assert {n: (b.dtype, tuple(b.shape)) for n, b in layer.named_buffers()} == {
        "codes": (torch.uint8, (96, 32)), "d": (torch.int32, (96, 2)), "m": (torch.int32, (96, 2))}
    assert sum(b.nbytes for b in layer.buffers()) == blocks.nbytes() < 96 * 64 * 4 / 5
    # A product of many rows leaves no float W with the layer (the buffer it used is shared by its shape).
    with torch.no_grad():
        layer(torch.randn(20, 64))
    assert list(layer.parameters()) == [] and len(list(layer.buffers())) == 3


@needs_cc
def test_reference_mode_autocast_and_other_dtypes_take_the_dequantised_weight(monkeypatch):
    blocks = sane_blocks(np.random.default_rng(3), "Q8_0", 16, 32)
    layer = GGUFLinear(blocks)
    w = gguf_blocks.dequantize(blocks)
    x = torch.randn(1, 32)
    calls = counting(monkeypatch)
    with torch.no_grad():
        with use_kernels("reference"):
            torch.testing.assert_close(layer(x), x @ w.T)
        y = layer(x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, x.double() @ w.double().T, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
    assert not calls
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1


@needs_cc
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")   # inside torch.func
def test_forward_ad_and_torch_func_take_the_dequantised_weight():
    from torch.autograd import forward_ad
    blocks = sane_blocks(np.random.default_rng(2), "Q8_0", 16, 32)
    layer = GGUFLinear(blocks)
    w = gguf_blocks.dequantize(blocks)
    x, t = torch.randn(1, 32), torch.randn(1, 32)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, t @ w.T)     # the kernel would have dropped it
    _, jvp = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(jvp, t @ w.T)
    torch.testing.assert_close(torch.func.vmap(layer)(x), x @ w.T)


@needs_cc
def test_layer_survives_state_dicts_copies_and_casts():
    blocks = sane_blocks(np.random.default_rng(4), "Q4_0", 24, 64)
    layer = GGUFLinear(blocks)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = layer(x)
        other = GGUFLinear(sane_blocks(np.random.default_rng(5), "Q4_0", 24, 64))
        other.load_state_dict(layer.state_dict())
        assert torch.equal(other(x), expected)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert torch.equal(twin(x), expected)
        # .to(bfloat16) casts floating buffers: the scales are kept as int32 bits, so the weights stay exact
        # and the products run in bf16.
        layer.to(torch.bfloat16)
        assert torch.equal(layer.dequantize(), gguf_blocks.dequantize(blocks))
        y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)
    linear = layer.to_linear()    # the float32 nn.Linear of the very values (what merging and export take)
    assert isinstance(linear, torch.nn.Linear) and not linear.weight.requires_grad
    assert torch.equal(linear.weight, gguf_blocks.dequantize(blocks))


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


def float_weights(path: Path):
    """The same GGUF with float32 weights alone: the plain model, accelerated (every linear a float nn.Linear)."""
    model, _ = load(path, require_tokenizer=False, fast=False)
    return acceleration.apply(model)


def gguf_layers(model) -> dict[str, GGUFLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}


@needs_cc
@pytest.mark.parametrize("tied", [True, False])
def test_model_decodes_from_blocks_like_from_float32_weights(tmp_path, monkeypatch, tied):
    path = quantised_gguf(tmp_path / "tiny.gguf", tied)
    fast, _ = load(path, require_tokenizer=False)
    dense = float_weights(path)
    kept = gguf_layers(fast)
    assert len(kept) == 7 * fast.args.n_layers + 1 and "output" in kept and not gguf_layers(dense)
    assert kept["output"].bits == 8 and kept["layers.0.attention.wq"].bits == 4
    assert kept["output"].tied_embeddings == tied
    for name, layer in kept.items():   # each layer's blocks are exactly the float32 weight of the other model
        assert torch.equal(layer.dequantize(), dense.get_submodule(name).weight)
    # No float copy of a blocked weight: the model's float tensors are the embeddings and the norms.
    floats = {n for n, t in fast.state_dict().items() if t.is_floating_point()}
    assert floats == {n for n in dense.state_dict() if n.startswith("tok_embeddings") or n.endswith("norm.weight")}
    if tied:
        assert torch.equal(fast.tok_embeddings.weight, dense.tok_embeddings.weight)

    calls = counting(monkeypatch)
    prompt = torch.randint(0, fast.args.vocab_size, (1, 11))
    with torch.no_grad():
        caches = fast.make_cache(1, 64), dense.make_cache(1, 64)
        a, b = fast.prefill(prompt, caches[0]), dense.prefill(prompt, caches[1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for _ in range(8):   # past the window of 5: the rolling cache wraps
            nxt = a.argmax(-1, keepdim=True)
            a, b = fast(nxt, caches[0])[:, -1], dense(nxt, caches[1])[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # All positions' logits (a forward of 11 rows: every product from the dequantised weights) and the loss.
        torch.testing.assert_close(fast(prompt), dense(prompt), rtol=1e-5, atol=1e-5)
        targets = torch.randint(0, fast.args.vocab_size, (1, 11))
        torch.testing.assert_close(fast(prompt, targets=targets), dense(prompt, targets=targets))
    # Every product of the prompt's chunks (of the window, 5 tokens: at most MAX_ROWS rows) and decode steps.
    n_chunks = -(-prompt.shape[1] // fast.args.sliding_window)
    assert len(calls) == (n_chunks + 8) * (7 * fast.args.n_layers + 1)
    assert list(generate(fast, prompt[0].tolist(), 12)) == list(generate(dense, prompt[0].tolist(), 12))
    # Speculative steps (a few rows at once) read the blocks too, and still give plain greedy's tokens.
    calls.clear()
    text = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert list(generate(fast, text, 10, draft_tokens=3)) == list(generate(dense, text, 10))
    assert any(shape[-2] > 1 for shape in calls if len(shape) > 1)
    # A whole model's state dict saves and loads back (the blocks as buffers), and the model copies.
    again, _ = load(path, require_tokenizer=False)
    again.load_state_dict(fast.state_dict())
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        assert torch.equal(again(prompt), fast(prompt)) and torch.equal(twin(prompt), fast(prompt))


def lora_pair(path: Path, targets=("wq", "wv", "w2", "output"), dropout: float = 0.0):
    """(GGUF-block model, float32-weights model) with the same adapters, B non-zero."""
    from lora import LoRAConfig, inject_lora
    pair = load(path, require_tokenizer=False)[0], float_weights(path)
    for model in pair:
        torch.manual_seed(7)     # the same A and B in both
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, targets=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)     # B = 0 would make merging a no-op
    return pair


@needs_cc
@pytest.mark.parametrize("tied", [True, False])
def test_a_lora_step_over_blocks_equals_the_float32_base(tmp_path, tied):
    from lora import count_parameters
    pair = lora_pair(quantised_gguf(tmp_path / "tiny.gguf", tied))
    assert count_parameters(pair[0]) == count_parameters(pair[1])   # blocks count as the weights they stand for
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for model in pair:
        model.train()
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys() and any("output" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5 * gb[n].abs().max().item(), msg=n)


@needs_cc
def test_merging_lora_over_blocks_is_the_float32_merge_and_unmerges_exactly(tmp_path):
    from lora import merge_lora, unmerge_lora
    fast, dense = lora_pair(quantised_gguf(tmp_path / "tiny.gguf", tied=True))
    tokens = torch.randint(0, 256, (1, 9))

    def last_logits(model):
        with torch.no_grad():
            cache = model.make_cache(1, 32)
            model.prefill(tokens[:, :-1], cache)
            return model(tokens[:, -1:], cache)[0, -1]

    before = last_logits(fast)
    torch.testing.assert_close(before, last_logits(dense), rtol=1e-5, atol=1e-5)    # unmerged: base + LoRA
    merge_lora(fast), merge_lora(dense)
    # Merged: each base became the float32 nn.Linear of its blocks, plus the update: dense's merged weights.
    for name, m in fast.named_modules():
        if hasattr(m, "lora_A"):
            assert torch.equal(m.base.weight, dense.get_submodule(name).base.weight), name
    merged = last_logits(fast)
    torch.testing.assert_close(merged, last_logits(dense), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    unmerge_lora(fast)   # the blocks come back as they were
    assert isinstance(fast.layers[0].attention.wq.base, GGUFLinear)
    assert torch.equal(last_logits(fast), before)


@needs_cc
@pytest.mark.parametrize("targets", [("wq", "wv", "w2"), ("wq", "w2", "output")])
def test_merged_export_over_blocks_equals_the_float32_export(tmp_path, targets):
    from lora.export import export_merged_hf
    from model.safetensors import SafeTensorsFile
    fast, dense = lora_pair(quantised_gguf(tmp_path / "tiny.gguf", tied=True), targets)
    for model, name in ((fast, "fast"), (dense, "dense")):
        export_merged_hf(model, model.args, tmp_path / name)
    files = [sorted((tmp_path / n).glob("*.safetensors")) for n in ("fast", "dense")]
    assert [f.name for f in files[0]] == [f.name for f in files[1]]
    for a, b in zip(*files):
        with SafeTensorsFile(a) as x, SafeTensorsFile(b) as y:
            assert sorted(x.keys()) == sorted(y.keys())
            # A head without an adapter is the embeddings, written once (tied), as from the float32 model.
            assert ("lm_head.weight" in x.keys()) == ("output" in targets)
            for k in x.keys():
                assert torch.equal(x.get_tensor(k), y.get_tensor(k)), k
    for n in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "fast" / n).read_text() == (tmp_path / "dense" / n).read_text()


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
    assert not gguf_layers(model)
    dense = float_weights(path)
    tokens = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(tokens), dense(tokens))


def test_only_accelerated_float32_cpu_models_hold_blocks(tmp_path):
    path = quantised_gguf(tmp_path / "tiny.gguf", tied=False)
    assert not gguf_layers(load(path, require_tokenizer=False, dtype=torch.bfloat16)[0])
    assert not gguf_layers(load(path, require_tokenizer=False, fast=False)[0])      # the plain model
    # NF4 replaces the blocks' linear layers (quantised from the float32 weights); the head stays float32.
    model, _ = load(path, require_tokenizer=False, quantize="nf4")
    assert not gguf_layers(model) and type(model.output).__name__ == "OneDNNLinear"


def test_block_types_are_ggml_types():
    for type_id, name in gguf_blocks.BLOCK_TYPES.items():
        assert GGML_TYPES[type_id][0] == name and GGML_TYPES[type_id][1] == gguf_blocks.QK
