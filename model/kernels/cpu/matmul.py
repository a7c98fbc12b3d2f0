"""y = x @ W.T on the CPU through oneDNN, the GEMM library inside PyTorch, instead of the BLAS behind F.linear.

Why. PyTorch's x86 CPU build sends a float32 F.linear to Intel's MKL, and MKL picks its code by the CPU's vendor:
on this project's AMD CPU (AVX-512 with bf16) it runs its generic path (`MKL_VERBOSE=1` names no AVX-512), at about
half of what the CPU can do. oneDNN (also inside every x86 build of PyTorch) picks its code by the instruction sets
the CPU reports. On that 2-core machine, one core, float32 (`python bench/linear.py`, docs/benchmarks.md):

    [2048, 576] @ [576, 1536]    MKL 103 GFLOP/s    oneDNN 223 GFLOP/s       (training, scoring, prefill)
    [1, 576] @ every SmolLM2 W   MKL 15.8 GB/s      oneDNN 18.4 GB/s         (one decode step reads all weights)
    [7, 576] @ every SmolLM2 W   MKL 7.8 GB/s       oneDNN 12.7 GB/s         (a speculative step with 6 guesses)

Both compute the same float32 products and sums; only the order of the additions differs, so the results differ in
the last bits, as any two GEMMs' do. On an Intel CPU, where MKL runs its AVX-512 code, we expect the two to be
close (not measured here); `bench/linear.py` tells for the machine at hand.

The entry point is `torch.ops.mkldnn._linear_pointwise(x, W, bias, "none", [], "")`: the op PyTorch's own compiler
(inductor) emits for a CPU linear layer. It takes plain strided tensors, transposed views included, so the backward
needs no copies:

    forward     y  = x @ W.T                 [..., in] x [out, in]  -> [..., out]
    backward    dx = dy @ W   = dy @ (W.T).T  (W.T: a view)           -> [..., in]
                dW = dy^T @ x = dy^T @ (x^T).T                        -> [out, in]    (only if W trains)

It has no autograd formula of its own, hence `_OneDNNLinear`. The path is taken for float32 CPU tensors outside
autocast (autocast's bf16 products already run in oneDNN) unless MINICURIE_KERNELS=reference; everything else,
CUDA included, is F.linear, which is also the reference the tests compare with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from model.kernels._switch import current_mode


def _find_op():
    """The oneDNN op, or None where this build has none or it does not work (checked once on a tiny product)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
        if op is not None:
            a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
            if not torch.equal(op(a, b, None, "none", [], ""), a @ b.T):   # small integers: exact in any order
                return None
        return op
    except (AttributeError, RuntimeError, NotImplementedError):   # not x86, or a build that renamed the op
        return None


_LINEAR_POINTWISE = _find_op()


def use_onednn(*tensors: torch.Tensor | None) -> bool:
    """Do these tensors take the oneDNN path? float32 CPU tensors outside autocast, unless the switch says
    'reference'. (Callers also send mismatched shapes to F.linear, whose error names them; oneDNN's does not.)"""
    if _LINEAR_POINTWISE is None or current_mode() == "reference" or torch.is_autocast_enabled("cpu") \
            or not eager_only():
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def eager_only() -> bool:
    """No torch.func transform (vmap, jvp, grad), forward-mode AD level or torch.compile trace is active: the raw
    ops below (and the C kernel of gguf_blocks.py) have no rules for those, F.linear has. One global check per
    call (~0.1 us), not one per tensor."""
    return (not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0
            and not torch.compiler.is_compiling())


def _fits(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """a [..., k] against b [n, k] (and bias [n]): else F.linear, whose error names the shapes."""
    return (a.dim() >= 1 and b.dim() == 2 and a.shape[-1] == b.shape[-1]
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == b.shape[0])))


def _onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [..., k] @ b.T (+ bias) for b [n, k] -> [..., n] in oneDNN. The op returns a view of its [N, n] result for
    an input of more than two dimensions; autograd forbids changing such a view in place when it leaves a custom
    Function (LoRA adds into a base layer's output in place), so the result is reshaped as aten's own matmul does:
    into a new tensor header that autograd does not track as a view."""
    if a.dim() == 2:
        return _LINEAR_POINTWISE(a, b, bias, "none", [], "")
    y = _LINEAR_POINTWISE(a.reshape(-1, a.shape[-1]), b, bias, "none", [], "")
    return torch.ops.aten._unsafe_view(y, (*a.shape[:-1], b.shape[0]))


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., k] @ b.T for b [n, k] -> [..., n], no autograd: oneDNN where `use_onednn` says so, else F.linear.
    Either argument may be a transposed view."""
    if use_onednn(a, b) and _fits(a, b):
        return _onednn_mm(a, b)
    return F.linear(a, b)


class _OneDNNLinear(torch.autograd.Function):
    """x [..., in] @ W.T (+ bias) -> [..., out], with the backward of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Save only what the backward will use: a frozen W (LoRA's base) needs no x, an x without a gradient
        # (the first layer's embeddings) needs no W.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul_nt(dy, weight.t())                                     # [..., out] @ [out, in]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = matmul_nt(dy2.t(), x.reshape(-1, x.shape[-1]).t())            # [out, N] @ [N, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [..., in], weight [out, in], bias [out] -> [..., out]."""
    if not (use_onednn(x, weight, bias) and _fits(x, weight, bias)):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_mm(x, weight, bias)   # inference: no autograd bookkeeping per call
