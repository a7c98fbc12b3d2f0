"""Shared helpers for the kernel tests: poisoned allocations, float64 comparison with per-dtype tolerances, peak
memory, the dtypes each test runs in.

Kernels write into tensors from torch.empty, whose contents are whatever the allocator hands back, often zeros or a
previous result that happens to be right. Inside `poisoned_allocations()` every such tensor starts filled with NaN
(integers: their largest value), so an element a kernel forgot to write fails the comparison instead of passing by
luck. It catches the kernels' own outputs and every scratch buffer (partial sums, per-row statistics), forward and
backward alike, without the kernels needing an `out=` argument.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from model.kernels._switch import INTERPRETING

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter emulates bf16 with numpy and gets its arithmetic (and tl.dot) wrong, so bf16 Triton kernels are
# only checked on a GPU running them compiled (`skip_bf16_in_interpreter`). The plain-PyTorch references run in
# bf16 everywhere, the CPU included.
BF16_ON_HARDWARE = torch.cuda.is_available() and not INTERPRETING
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_bf16_in_interpreter(dtype: torch.dtype, triton: bool = True) -> None:
    """Skip a bf16 case that runs a Triton kernel in the interpreter (whose bf16 arithmetic is wrong)."""
    if triton and dtype == torch.bfloat16 and not BF16_ON_HARDWARE:
        pytest.skip("bf16 Triton kernels need a CUDA GPU without TRITON_INTERPRET: the interpreter's bf16 "
                    "arithmetic is wrong")


# Tolerance per dtype, relative to both each element and the largest magnitude in the expected tensor (see
# assert_close). The kernels compute in float32 and round each output once to the storage dtype; the expected values
# are exact (float64 on the same rounded inputs). Unit roundoff u: fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3.
#   fp16 / bf16: 8u covers the output rounding, an intermediate rounding the kernel mirrors from the reference
#                (RMSNorm's x_hat, CE's logits and gradient chunks from a half-precision matmul) and float32 sums.
#   fp32: 1e-5 (~170u) covers float32 sums of up to ~10^4 terms in a different order than the float64 oracle.
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """actual (any dtype) against a float64 expected: |a - e| <= tol * (|e| + max|e|), NaN never passes."""
    tol = TOLERANCES[dtype]
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol,
                               atol=tol * float(expected.abs().max()), msg=lambda m: f"{what} ({dtype}): {m}")


_EMPTY_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class _Poison(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _EMPTY_OPS:
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype != torch.bool:
                out.fill_(torch.iinfo(out.dtype).max)
        return out


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    with _Poison():
        yield


def forward_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                     grad_out: torch.Tensor | None = None,
                     differentiable: list[bool] | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. each differentiable input, under poison.

    Inputs are detached copies, so the caller's tensors can feed the float64 oracle too. differentiable defaults
    to every floating-point input; grad_out defaults to ones (a scalar loss).
    """
    if differentiable is None:
        differentiable = [x.is_floating_point() for x in inputs]
    leaves = [x.detach().clone().requires_grad_(d) for x, d in zip(inputs, differentiable)]
    with poisoned_allocations():
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    return out.detach(), [x.grad for x in leaves]


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated while fn runs, above what was allocated when it started.

    A real measurement: the profiler records every allocation and free of the CPU allocator with a running total
    of the bytes it tracks. That total carries over from earlier profiling sessions, so the baseline is the total
    just before fn's first allocation.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            events.append(event)
    if not events:
        return 0
    first = min(events, key=lambda e: e.start_time_ns).typed[1]
    return max(e.typed[1].total_allocated for e in events) - (first.total_allocated - first.alloc_size)
