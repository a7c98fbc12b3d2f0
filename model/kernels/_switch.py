"""Which implementation of the hot operations runs: the fused Triton kernels or the plain-PyTorch references.

    auto       (default) Triton for CUDA tensors when Triton is installed, the reference everywhere else
    triton     always Triton; CPU tensors then need TRITON_INTERPRET=1, Triton's interpreter (how tests check it)
    reference  always the plain-PyTorch reference

The path comes from `use_kernels(...)` when one is active (a context manager, so a test can run both paths in one
process), else from the environment variable MINICURIE_KERNELS.

Triton is imported here, guarded, and only here: the runtime requirements are torch, numpy, sentencepiece and tqdm,
and the package must import on a machine without Triton. The kernel files decorate their kernels with `jit`, which
is `triton.jit` when Triton is present; without it the kernels stay plain functions that the switch never selects.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

MODES = ("auto", "triton", "reference")
ENV_VAR = "MINICURIE_KERNELS"

# triton.jit picks the interpreter when it decorates a kernel, i.e. at import: the answer cannot change afterwards.
INTERPRETING: bool = triton is not None and bool(triton.knobs.runtime.interpret)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("minicurie_kernels", default=None)


def jit(fn: Callable) -> Callable:
    """triton.jit, or the plain function where Triton is missing (the switch then never routes to it)."""
    return triton.jit(fn) if triton is not None else fn


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a kernel path; choose one of {', '.join(MODES)}")
    return mode


def current_mode() -> str:
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """`with use_kernels("triton"): ...` forces a path inside the block (this thread / task only)."""
    token = _forced.set(_check_mode(mode, "use_kernels(mode)"))
    try:
        yield
    finally:
        _forced.reset(token)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Should an operation on these tensors take the Triton path?"""
    mode = current_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return triton is not None and on_cuda
    if triton is None:
        raise RuntimeError(f"kernel path 'triton' was requested ({ENV_VAR} or use_kernels) but triton is not "
                           "installed; install it or use 'auto' / 'reference'")
    if not on_cuda and not INTERPRETING:
        raise RuntimeError("kernel path 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before anything imports triton")
    return True
