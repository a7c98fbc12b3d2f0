"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight, as a fused Triton kernel (reference.rms_norm_reference).

Eager PyTorch reads and writes the activations about five times (square, mean, rsqrt, two multiplies); the kernel
reads x once and writes y once, keeping one whole row in registers. The backward kernel likewise makes one pass,
from x and the saved 1/rms per row (4 bytes a row) rather than a stored normalised copy of x:

    x_hat = x * rstd,  g = dy * weight
    dx = rstd * (g - x_hat * mean(g * x_hat))          (the mean over the row's `dim` features)
    dweight = sum over rows of dy * x_hat

dweight is a reduction over every row. Instead of one atomic add per row into a single [dim] vector (thousands of
programs contending for the same addresses), each program walks a contiguous range of rows, accumulates its own
partial sum in registers, and writes it to its own row of a [programs, dim] buffer; one torch.sum finishes it.
"""
from __future__ import annotations

import torch

from model.kernels._switch import jit, tl, triton


@jit
def _rms_norm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, dim, eps,
                      BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)                  # [R]
    cols = tl.arange(0, BLOCK_DIM)                                                   # [D]
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]                          # [R, D]
    offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]                       # int64: rows * dim > 2^31
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / dim + eps)                               # [R]
    x_hat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty)                           # the reference's type_as(x)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    y = x_hat.to(tl.float32) * w[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@jit
def _rms_norm_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, dim, rows_per_program,
                       BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, COMPUTE_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_DIM)                                                   # [D]
    col_mask = cols < dim
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_DIM,), dtype=tl.float32)                                    # this program's partial sum
    first_row = pid * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for start in range(first_row, last_row, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)                                      # [R]
        mask = (rows < last_row)[:, None] & col_mask[None, :]                        # [R, D]
        offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < last_row, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / dim)[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * x_hat, axis=0)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * dim + cols, dw, mask=col_mask)


def _blocks(n_rows: int, dim: int) -> tuple[int, int, int]:
    """BLOCK_ROWS, BLOCK_DIM, num_warps: a whole row per program, several short rows together (~4k elements)."""
    block_dim = triton.next_power_of_2(dim)
    if block_dim > 65536:
        raise ValueError(f"rms_norm: rows of {dim} features do not fit one Triton program (at most 65536)")
    block_rows = min(triton.next_power_of_2(n_rows), max(1, 4096 // block_dim))
    num_warps = 4 if block_dim <= 2048 else 8 if block_dim <= 8192 else 16
    return block_rows, block_dim, num_warps


def _max_programs(device: torch.device) -> int:
    # One program per streaming multiprocessor (x4 to hide latency) on a GPU. The CPU interpreter runs programs one
    # after another, so a few suffice there; more than one keeps the partial-sum reduction exercised.
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()                                         # [N, dim]
        n_rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_rows, block_dim, num_warps = _blocks(n_rows, dim)
        _rms_norm_forward[(triton.cdiv(n_rows, block_rows),)](
            x2, weight, y, rstd, n_rows, dim, eps, BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x2, weight, rstd = ctx.saved_tensors
        n_rows, dim = x2.shape
        dy2 = dy.reshape(n_rows, dim).contiguous()
        dx = torch.empty_like(x2)
        block_rows, block_dim, num_warps = _blocks(n_rows, dim)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, _max_programs(x2.device)), block_rows) * block_rows
        n_programs = triton.cdiv(n_rows, rows_per_program)
        compute_dw = ctx.needs_input_grad[1]   # frozen under LoRA: skip the reduction entirely
        # Without a weight gradient the kernel never touches the partial-sum pointer; dx stands in for it.
        dw_partial = torch.empty(n_programs, dim, dtype=torch.float32, device=x2.device) if compute_dw else dx
        _rms_norm_backward[(n_programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, n_rows, dim, rows_per_program,
            BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim, COMPUTE_DW=compute_dw, num_warps=num_warps)
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(dy.shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight, eps)
