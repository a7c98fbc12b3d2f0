"""The kernel switch, and a whole tiny decoder run through the Triton kernels (in the interpreter) against the same
model on the plain-PyTorch references: logits, loss and every parameter's gradient."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.kernels as kernels
from model.args import ModelArgs
from model.kernels import _switch, use_kernels
from model.transformer import Transformer
from tests.kernel_testing import DEVICE, assert_close

TRITON_ENTRY_POINTS = ["rms_norm_triton", "apply_rope_triton", "swiglu_triton", "flash_attention_triton"]


@pytest.fixture
def triton_calls(monkeypatch) -> dict[str, int]:
    """How often each Triton entry point (and the fused cross-entropy's Triton step) ran, by name."""
    calls = dict.fromkeys(TRITON_ENTRY_POINTS + ["linear_cross_entropy_triton_step"], 0)
    for name in TRITON_ENTRY_POINTS:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    fused = kernels.linear_cross_entropy_fused

    def counted_fused(*args, **kwargs):
        calls["linear_cross_entropy_triton_step"] += kwargs["use_triton"]
        return fused(*args, **kwargs)
    monkeypatch.setattr(kernels, "linear_cross_entropy_fused", counted_fused)
    return calls


def loss_and_grads(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor):
    model.zero_grad()
    logits = model(tokens)
    h = model.hidden(tokens)
    loss = kernels.linear_cross_entropy(h.flatten(0, 1), model.output.weight, targets.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_model_triton_path_equals_reference(triton_calls):
    args = ModelArgs.from_name("tiny")        # window 5 < T: the sliding window is active; GQA 4:2
    model = Transformer(args).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))   # norm weights of ones would hide a weight-gradient bug
    tokens = torch.randint(0, args.vocab_size, (2, 11), device=DEVICE)
    targets = torch.randint(0, args.vocab_size, (2, 11), device=DEVICE)
    targets[0, :3] = -100

    with use_kernels("reference"):
        ref_logits, ref_loss, ref_grads = loss_and_grads(model, tokens, targets)
    assert not any(triton_calls.values())
    with use_kernels("triton"):
        logits, loss, grads = loss_and_grads(model, tokens, targets)
    assert all(triton_calls.values()), f"a kernel did not run: {triton_calls}"

    # Both paths compute in float32, only in different orders; kernel_testing's float32 tolerance (1e-5, relative
    # to each tensor's largest value) leaves room for that through three layers and their backward.
    assert_close(logits, ref_logits, torch.float32, "logits")
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, f"grad of {name}")


def test_auto_picks_reference_on_cpu_and_env_var_forces_triton(triton_calls, monkeypatch):
    x, w = torch.randn(3, 16), torch.randn(16)
    monkeypatch.delenv(_switch.ENV_VAR, raising=False)
    kernels.rms_norm(x, w, 1e-5)
    assert triton_calls["rms_norm_triton"] == 0
    monkeypatch.setenv(_switch.ENV_VAR, "triton")
    x, w = x.to(DEVICE), w.to(DEVICE)        # compiled Triton (a CUDA machine) takes CUDA tensors only
    kernels.rms_norm(x, w, 1e-5)
    assert triton_calls["rms_norm_triton"] == 1
    with use_kernels("reference"):           # the context manager wins over the environment
        kernels.rms_norm(x, w, 1e-5)
    assert triton_calls["rms_norm_triton"] == 1


def test_bad_path_names_are_rejected(monkeypatch):
    monkeypatch.setenv(_switch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MINICURIE_KERNELS='cuda'"):
        kernels.swiglu(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="use_kernels"):
        with use_kernels("fast"):
            pass


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(_switch, "INTERPRETING", False)
    with use_kernels("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.swiglu(torch.randn(4), torch.randn(4))


def test_package_imports_and_runs_without_triton():
    # A fresh interpreter in which `import triton` fails, as on a machine with only the runtime requirements.
    script = """
import sys
sys.modules["triton"] = None
import torch
from model import kernels
x = torch.randn(2, 5, 8)
assert torch.equal(kernels.rms_norm(x, torch.ones(8), 1e-5), kernels.rms_norm_reference(x, torch.ones(8), 1e-5))
with kernels.use_kernels("triton"):
    try:
        kernels.rms_norm(x, torch.ones(8), 1e-5)
    except RuntimeError as e:
        assert "triton is not installed" in str(e), e
    else:
        raise AssertionError("the triton path ran without triton")
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, _switch.ENV_VAR: "auto"}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_importing_the_decoder_imports_no_c_build(tmp_path):
    # The C side (model/kernels/cpu/) is imported at its first call: importing the decoder imports neither the build
    # helper (nor, through it, model.sources) nor a C wrapper; a call that may take a C path (SwiGLU) then does.
    code = """
import sys, torch
import model.transformer
from model import kernels
loaded = lambda: sorted(m for m in sys.modules if m.startswith("model.kernels.cpu.") and m != "model.kernels.cpu.matmul"
                        or m in ("model.sources", "model.gguf"))
print(loaded())
kernels.swiglu(torch.randn(4).bfloat16(), torch.randn(4).bfloat16())
print(loaded())
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, _switch.ENV_VAR: "auto", "CC": "no-such-compiler", "MINICURIE_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    after_import, after_call = run.stdout.strip().splitlines()
    assert after_import == "[]"
    assert "model.kernels.cpu.build" in after_call and "model.kernels.cpu.swiglu" in after_call


@pytest.mark.parametrize("head_dim, flash_runs", [(16, True), (24, False), (8, False), (256, False)])
def test_auto_falls_back_where_flash_attention_has_no_tiles(triton_calls, monkeypatch, head_dim, flash_runs):
    # Auto mode on CUDA, simulated on the CPU: use_triton answers yes, as it does there for CUDA tensors.
    monkeypatch.delenv(_switch.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    q, k, v = (torch.randn(1, h, 9, head_dim, device=DEVICE) for h in (4, 2, 2))
    out = kernels.attention(q, k, v, sliding_window=4)
    assert triton_calls["flash_attention_triton"] == flash_runs
    assert_close(out, kernels.attention_reference(q, k, v, 4), torch.float32, f"attention, head_dim {head_dim}")


def test_forced_triton_still_reports_an_unsupported_head_dim():
    q = torch.randn(1, 2, 5, 24, device=DEVICE)
    with use_kernels("triton"), pytest.raises(ValueError, match="head_dim=24 is not supported"):
        kernels.attention(q, q, q, None)


def test_model_with_head_dim_96_runs_in_auto_mode(monkeypatch):
    # Before the fallback, no model with such heads (e.g. head_dim 80 or 96) could run on CUDA at all.
    args = ModelArgs(dim=192, n_layers=1, head_dim=96, hidden_dim=64, n_heads=2, n_kv_heads=1, vocab_size=32,
                     sliding_window=None, max_seq_len=16)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 6))
    with torch.no_grad(), use_kernels("reference"):
        expected = model(tokens)
    monkeypatch.delenv(_switch.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)   # auto on CUDA, simulated
    with torch.no_grad():
        assert_close(model(tokens), expected, torch.float32, "logits")
