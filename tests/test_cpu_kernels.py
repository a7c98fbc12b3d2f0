"""The bf16 CPU kernels of LoRA training under autocast (model/kernels/cpu/): attention (attention.py / .c), SwiGLU
(swiglu.py / .c) and the cross-entropy chunk step (cross_entropy.py / .c). Each is checked, forward and gradients,
against float64 with fresh random inputs, on every path the C file has: the CPU's own (AVX-512 here) and plain C
built on purpose, with one and two threads."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.kernels.cpu import attention as attention_cpu
from model.kernels.cpu import build, cross_entropy, swiglu
from model.kernels.reference import attention_reference, chunk_step_reference
from model.kernels.swiglu_recompute import swiglu_recompute

HAVE_CC = shutil.which("cc") is not None
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the PyTorch paths are the only ones")
MODULES = {"attention": attention_cpu, "swiglu": swiglu, "cross_entropy": cross_entropy}
PATHS = {"native": None, "plain C": ["-O3"], "plain C + OpenMP": ["-O3", "-fopenmp"]}


@pytest.fixture(scope="module", params=list(PATHS))
def path(request, tmp_path_factory):
    """Every module's KERNEL built with this path's flags (None: as the library builds it for this CPU)."""
    flags = PATHS[request.param]
    saved = {name: (m.KERNEL.lib, m.KERNEL.tried) for name, m in MODULES.items()}
    if flags is not None:
        for name, m in MODULES.items():
            target = tmp_path_factory.mktemp(name) / f"{name}.so"
            error = build.compile_library(m.KERNEL.source, flags, target)
            assert error is None, error
            m.KERNEL.lib, m.KERNEL.tried = m.KERNEL.opener(target), True
    for m in MODULES.values():
        assert m.KERNEL.library() is not None
    yield request.param
    for name, m in MODULES.items():
        m.KERNEL.lib, m.KERNEL.tried = saved[name]


@contextlib.contextmanager
def threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def grads(fn, inputs, dy):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach(), *(x.grad for x in leaves)]


def assert_rows_close(ours, exact, others, what=""):
    """Row by row (the last dimension), so that an error confined to small rows (the last keys' dk, say) shows:
    each row of ours within 2^-7 of the row's largest exact value, or within twice SDPA's error on that row plus
    one bf16 rounding of it."""
    exact = exact.double()
    err = (ours.double() - exact).abs().amax(-1)
    theirs = (others.double() - exact).abs().amax(-1)
    row_scale = exact.abs().amax(-1)
    bound = torch.maximum(2**-7 * row_scale, 2 * theirs + 2**-8 * row_scale) + 1e-6 * exact.abs().max()
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: a row's error is {worst:.2f}x its bound"


def assert_bf16_close(ours, exact, others=None, what=""):
    """ours within bf16's rounding of float64: a few units of 2^-8 relative to the tensor's largest value, and
    (where another bf16 implementation is given) no more than twice its error plus one rounding."""
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err <= 4 * 2**-8 * scale, f"{what}: max error {err:.3g} for values up to {scale:.3g}"
    if others is not None:
        theirs = (others.double() - exact).abs().max().item()
        assert err <= 2 * theirs + 2**-8 * scale, f"{what}: ours {err:.3g} against SDPA's {theirs:.3g}"


# --------------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("b, h, hkv, t, d", [(1, 2, 2, 37, 16), (2, 6, 2, 130, 32), (1, 9, 3, 300, 64),
                                             (2, 4, 1, 129, 64)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_attention_matches_float64_and_sdpa(path, b, h, hkv, t, d, n_threads):
    torch.manual_seed(t * 7 + h)
    # The decoder's layout: q, k, v are [B, T, H, D] tensors seen as [B, H, T, D].
    q, k, v = (torch.randn(b, t, n, d).transpose(1, 2).to(torch.bfloat16) for n in (h, hkv, hkv))
    q = q * 2   # larger scores: a peakier softmax than unit-scale inputs give
    dy = torch.randn(b, h, t, d).to(torch.bfloat16)
    assert attention_cpu.supports(q, k, v, None)
    with threads(n_threads):
        ours = grads(attention_cpu.attention_cpu, (q, k, v), dy)
    exact = grads(lambda q, k, v: attention_reference(q.double(), k.double(), v.double(), None),
                  (q, k, v), dy.double())
    sdpa = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h),
                 (q, k, v), dy)
    for name, o, e, s in zip(("output", "dq", "dk", "dv"), ours, exact, sdpa):
        assert o.dtype == torch.bfloat16 and o.shape == e.shape
        assert_bf16_close(o, e, s, name)
        if name != "output":
            assert_rows_close(o, e, s, name)
    # The output row by row, against the bound of its arithmetic: P rounded to bf16 (each P_j off by at most
    # u P_j, u = 2^-8) before P V, and the result rounded once: |error| <= u sum_j P_j |v_j| + u |o| (+ float32).
    scores = (q.double() @ k.double().repeat_interleave(h // hkv, 1).transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    spread = scores.softmax(-1) @ v.double().abs().repeat_interleave(h // hkv, 1)      # sum_j P_j |v_j|
    bound = 2**-8 * (spread + exact[0].abs()) * 1.01 + 1e-6
    assert ((ours[0].double() - exact[0]).abs() <= bound).all()


def test_attention_dispatch_and_fallbacks(path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, 40, 16).to(torch.bfloat16) for n in (4, 2, 2))
    ours = kernels.attention(q, k, v, None)
    torch.testing.assert_close(ours, attention_cpu.attention_cpu(q, k, v), rtol=0, atol=0)
    # What the path does not take goes to SDPA: a binding window, float32, the reference switch.
    assert not attention_cpu.supports(q, k, v, 16)
    assert not attention_cpu.supports(q.float(), k.float(), v.float(), None)
    with kernels.use_kernels("reference"):
        assert not attention_cpu.supports(q, k, v, None)
    windowed = kernels.attention(q, k, v, 16)
    assert_bf16_close(windowed, attention_reference(q.double(), k.double(), v.double(), 16))
    # A window at least as long as the sequence binds nothing: the path takes it.
    assert attention_cpu.supports(q, k, v, 40)


def test_attention_in_a_model_under_autocast_matches_sdpa(path):
    # The decoder in float32 weights under bf16 autocast: our path against SDPA's, loss and gradients.
    from model import ModelArgs, Transformer
    torch.manual_seed(1)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=128,
                     sliding_window=None)
    model = Transformer(args)
    tokens = torch.randint(0, 128, (2, 33))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss.detach(), model.layers[0].attention.wq.weight.grad.clone()
    ours = loss_and_grads()
    saved = attention_cpu.KERNEL.lib
    attention_cpu.KERNEL.lib = None   # as where the kernel cannot be built: SDPA
    try:
        theirs = loss_and_grads()
    finally:
        attention_cpu.KERNEL.lib = saved
    torch.testing.assert_close(ours[0], theirs[0], rtol=0.02, atol=0.02)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0.05, atol=0.05 * theirs[1].abs().max().item())


# ------------------------------------------------------------------------------------------------------ SwiGLU

@pytest.mark.parametrize("shape", [(3, 5, 96), (4099,), (2, 64, 1536)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_swiglu_matches_float64(path, shape, n_threads):
    torch.manual_seed(sum(shape) + n_threads)
    gate, up = (torch.randn(shape) * 4).to(torch.bfloat16), torch.randn(shape).to(torch.bfloat16)
    gate.view(-1)[:3] = torch.tensor([0.0, -30.0, 30.0])    # the sigmoid's flat ends and its midpoint
    dy = torch.randn(shape).to(torch.bfloat16)
    with threads(n_threads):
        ours = grads(swiglu_recompute, (gate, up), dy)
    exact = grads(lambda g, u: F.silu(g) * u, (gate.double(), up.double()), dy.double())
    for name, o, e in zip(("output", "d gate", "d up"), ours, exact):
        assert o.dtype == torch.bfloat16
        # One rounding of a float32 result: within 2^-8 of each element, relative (plus float32's own error).
        torch.testing.assert_close(o.double(), e, rtol=2**-8 + 1e-5, atol=1e-30, msg=name)


def test_swiglu_float32_keeps_the_reference():
    gate, up = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)
    assert not swiglu.c_kernel_takes(gate, up)
    torch.testing.assert_close(swiglu_recompute(gate, up), F.silu(gate) * up, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cross_entropy_chunk_matches_float64(path, label_smoothing, n_threads):
    torch.manual_seed(int(label_smoothing * 10) + n_threads)
    n, v = 37, 1000 + 3                                    # a vocabulary that is no multiple of the vector width
    logits = (torch.randn(n, v) * 5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,))
    targets[[2, 30]] = -100
    targets[5] = v - 1
    z = logits.clone()
    with threads(n_threads):
        loss = cross_entropy.chunk_step_cpu(z, targets, -100, label_smoothing, write_grad=True)
    z64 = logits.double().requires_grad_()
    kept = targets != -100
    per_token = F.cross_entropy(z64, targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    per_token.sum().backward()
    torch.testing.assert_close(loss.double(), per_token.detach(), rtol=1e-5, atol=1e-5)
    assert (loss[~kept] == 0).all() and (z[~kept] == 0).all()
    # The gradient rounded once to bf16: within 2^-8 of each element relative, plus float32's error near 0.
    torch.testing.assert_close(z.double(), z64.grad, rtol=2**-8, atol=1e-7)
    # Without write_grad the logits stay as they were.
    z = logits.clone()
    cross_entropy.chunk_step_cpu(z, targets, -100, label_smoothing, write_grad=False)
    assert torch.equal(z, logits)


def test_cross_entropy_chunk_rejects_targets_outside_the_vocabulary(path):
    logits = torch.randn(4, 50).to(torch.bfloat16)
    with pytest.raises(IndexError, match="target 50 is out of range for a vocabulary of 50"):
        cross_entropy.chunk_step_cpu(logits, torch.tensor([1, 2, 50, 3]), -100, 0.0, write_grad=True)


def test_attention_long_sequences_train_on_sdpa():
    # The backward's [T*G, T] buffers grow as T^2: beyond MAX_BACKWARD_T a sequence that needs gradients goes to
    # SDPA, while inference (no gradients) still takes the path.
    t = attention_cpu.MAX_BACKWARD_T + 1
    q, k, v = (torch.empty(1, 1, t, 16, dtype=torch.bfloat16) for _ in range(3))
    if attention_cpu.KERNEL.library() is None:
        pytest.skip("no kernel")
    assert attention_cpu.supports(q, k, v, None)
    assert not attention_cpu.supports(q.requires_grad_(), k, v, None)
    with torch.no_grad():
        assert attention_cpu.supports(q, k, v, None)


def test_without_a_compiler_training_runs_on_the_pytorch_paths(tmp_path):
    # No C compiler and an empty cache: each kernel says once that it is unavailable, and a bf16 LoRA step runs on
    # the PyTorch paths with the same dropout masks (the reference draws the same stream).
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = """
import warnings
warnings.simplefilter("always")
import torch, lora
from model import ModelArgs, Transformer
from model import fast
from model.kernels.cpu import dropout
torch.manual_seed(0)
model = fast.apply(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                                         vocab_size=64, sliding_window=None)))
lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
tokens = torch.randint(0, 64, (2, 17))
with warnings.catch_warnings(record=True) as caught:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    x = torch.randn(100)
    assert torch.equal(dropout.dropout(x, 5, 0.5, torch.float32), dropout.dropout_reference(x, 5, 0.5, torch.float32))
assert torch.isfinite(loss)
print(sorted({str(w.message).split(":")[0] for w in caught if "C kernel unavailable" in str(w.message)}))
"""
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "MINICURIE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(sorted(["CPU attention", "SwiGLU", "cross-entropy",
                                                              "dropout"]))


def test_attention_gradients_for_some_inputs_only_and_in_place_use(path):
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, n, 50, 16).to(torch.bfloat16) for n in (4, 2, 2))
    dy = torch.randn(1, 4, 50, 16).to(torch.bfloat16)
    exact = grads(lambda q, k, v: attention_reference(q.double(), k.double(), v.double(), None), (q, k, v),
                  dy.double())
    for needs in ([True, False, False], [False, True, False], [False, False, True]):
        leaves = [x.detach().clone().requires_grad_(n) for x, n in zip((q, k, v), needs)]
        out = attention_cpu.attention_cpu(*leaves)
        out.mul_(1.0)            # the output is a tensor of its own: in-place use is allowed, as with SDPA's
        out.backward(dy)
        for leaf, n, e in zip(leaves, needs, exact[1:]):
            assert (leaf.grad is not None) == n
            if n:
                assert_bf16_close(leaf.grad, e)


def test_attention_and_loss_let_nan_through(path):
    # A NaN score must not become a probability of 0: SDPA and the reference give NaN for every row that sees it.
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, n, 40, 16).to(torch.bfloat16) for n in (2, 1, 1))
    k[0, 0, 5, 3] = float("nan")
    ours = attention_cpu.attention_cpu(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
    # A NaN logit makes its row's loss and whole gradient NaN, as in the reference.
    logits = torch.randn(3, 70).to(torch.bfloat16)
    logits[1, 9] = float("nan")
    z, z_ref = logits.clone(), logits.clone()
    loss = cross_entropy.chunk_step_cpu(z, torch.tensor([1, 2, 3]), -100, 0.0, write_grad=True)
    loss_ref = chunk_step_reference(z_ref, torch.tensor([1, 2, 3]), -100, 0.0, write_grad=True)
    assert torch.equal(loss.isnan(), loss_ref.isnan()) and torch.equal(z.isnan(), z_ref.isnan())
    assert z[1].isnan().all() and not z[0].isnan().any()


def test_attention_supports_refuses_odd_shapes_instead_of_failing():
    b = torch.bfloat16
    ok = (torch.empty(1, 4, 8, 16, dtype=b), torch.empty(1, 2, 8, 16, dtype=b), torch.empty(1, 2, 8, 16, dtype=b))
    assert attention_cpu.supports(*ok, None) and attention_cpu.supports(*ok, 8)   # the control: these it takes
    assert not attention_cpu.supports(ok[0], ok[1][:, :0], ok[2][:, :0], None)           # no KV heads
    assert not attention_cpu.supports(ok[0][..., :0], ok[1][..., :0], ok[2][..., :0], None)   # head_dim 0
    assert not attention_cpu.supports(ok[0], ok[1][..., :8], ok[2][..., :8], None)       # head_dims differ
    assert not attention_cpu.supports(ok[0].expand(2, -1, -1, -1), ok[1], ok[2], None)   # batch sizes differ
    assert not attention_cpu.supports(ok[0][:, :3], ok[1], ok[2], None)                  # 3 heads over 2


def test_cross_entropy_chunk_with_a_minus_inf_logit(path):
    # A -inf logit (a masked-out word) is probability 0: the loss stays finite without label smoothing. Both steps
    # against F.cross_entropy in float64 (loss and gradient), not only against each other.
    logits = torch.randn(2, 40).to(torch.bfloat16)
    logits[0, 7] = float("-inf")
    targets = torch.tensor([3, 5])
    z64 = logits.double().requires_grad_()
    loss64 = F.cross_entropy(z64, targets, reduction="none")
    loss64.sum().backward()
    assert z64.grad[0, 7] == 0
    z, z_ref = logits.clone(), logits.clone()
    loss = cross_entropy.chunk_step_cpu(z, targets, -100, 0.0, write_grad=True)
    loss_ref = chunk_step_reference(z_ref, targets, -100, 0.0, write_grad=True)
    assert torch.isfinite(loss).all()
    for ours, grad in ((loss, z), (loss_ref, z_ref)):
        torch.testing.assert_close(ours.double(), loss64.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), z64.grad, rtol=2**-8, atol=1e-7)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.float(), z_ref.float(), rtol=2**-8, atol=1e-7)


def test_attention_refuses_tensors_off_the_cpu_and_allocates_on_it(path):
    b = torch.bfloat16
    q, k, v = (torch.randn(1, n, 8, 16).to(b) for n in (2, 1, 1))
    assert attention_cpu.supports(q, k, v, None)                                  # the control
    assert not attention_cpu.supports(q, k.to("meta"), v.to("meta"), None)
    assert not attention_cpu.supports(q[:, :0], k, v, None)                     # no query heads
    # A default device other than the CPU (torch.set_default_device) does not reach the C code's buffers.
    expected = attention_cpu.attention_cpu(q, k, v)
    with torch.device("meta"):
        out = attention_cpu.attention_cpu(q, k, v)
    assert out.device.type == "cpu" and torch.equal(out, expected)


def test_a_bf16_lora_step_reaches_every_kernel(path):
    # The wiring: a LoRA step under bf16 autocast on the CPU goes through each C kernel, forward and backward, so
    # the speed bench/lora_train.py and bench/cpu_kernels.py measure is the code these tests check.
    import lora
    from model import ModelArgs, Transformer, fast
    from model.kernels.cpu import dropout

    class Counting:
        def __init__(self, lib):
            self.lib, self.calls = lib, set()

        def __getattr__(self, name):
            self.calls.add(name)
            return getattr(self.lib, name)
    modules = {**MODULES, "dropout": dropout}
    saved = {name: (m.KERNEL.lib, m.KERNEL.tried) for name, m in modules.items()}
    counters = {name: Counting(m.KERNEL.library()) for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.KERNEL.lib, m.KERNEL.tried = counters[name], True
        torch.manual_seed(0)
        model = fast.apply(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                                                 hidden_dim=96, vocab_size=128, sliding_window=None)))
        lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
        model.train()
        tokens = torch.randint(0, 128, (2, 17))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
    finally:
        for name, m in modules.items():
            m.KERNEL.lib, m.KERNEL.tried = saved[name]
    assert counters["attention"].calls == {"attention_softmax_forward", "attention_softmax_backward"}
    assert counters["swiglu"].calls == {"swiglu_forward", "swiglu_backward"}
    assert counters["cross_entropy"].calls == {"cross_entropy_chunk_bf16"}
    assert counters["dropout"].calls == {"dropout_apply"}
