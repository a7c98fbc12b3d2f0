"""NF4 on the GPU: a Triton kernel that turns packed 4-bit weights back into floats.

Dequantisation (model/nf4.py has the format and the plain-PyTorch reference) is, per weight i of a flat tensor,

    code  = byte i // 2, high nibble if i is even else low nibble
    scale = DYNAMIC[scale_codes[i // 64]] * scale_absmax[i // (64 * 256)] + scale_offset      (double quantisation)
    w[i]  = NF4[code] * scale

Both levels are fused into one pass: each program reads BLOCK weights' worth of bytes and scale codes (about 0.52
bytes per weight) and writes BLOCK weights, so the kernel runs at the speed of writing the output. The matmul that
follows is cuBLAS's (through frozen_linear.py, which dequantises again in the backward): for training batches of
thousands of tokens a fused dequant-matmul saves little next to the GEMM itself, and this keeps the kernel small
enough to read.
"""
from __future__ import annotations

import torch

from model.kernels._switch import jit, tl, triton

# Weights per program: large enough that a program is a sizeable memory transaction on a GPU, and that the
# interpreter (which pays ~1 ms per program on the CPU) runs the tests quickly.
PROGRAM_SIZE = 1024


@jit
def _dequantize_nf4_kernel(packed_ptr, scale_codes_ptr, scale_absmax_ptr, scale_offset_ptr, nf4_ptr, dynamic_ptr,
                           out_ptr, n, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, SCALE_GROUP: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)                          # [BLOCK] flat weight indices
    mask = i < n
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)                          # first weight in the high nibble
    value = tl.load(nf4_ptr + code)                                             # NF4[code], float32 in [-1, 1]
    block = i // QBLOCK
    scale_code = tl.load(scale_codes_ptr + block, mask=mask, other=0).to(tl.int32)
    group_max = tl.load(scale_absmax_ptr + block // SCALE_GROUP, mask=mask, other=0.0)
    # The reference's float32 operations in its order (multiply, add, multiply); the launch turns off fusing the
    # first two into an FMA, which would round once instead of twice and miss the reference by an ulp.
    scale = tl.load(dynamic_ptr + scale_code) * group_max + tl.load(scale_offset_ptr)
    tl.store(out_ptr + i, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nf4(packed: torch.Tensor, scale_codes: torch.Tensor, scale_absmax: torch.Tensor,
                   scale_offset: torch.Tensor, nf4: torch.Tensor, dynamic: torch.Tensor, n: int,
                   dtype: torch.dtype, block_size: int, scale_block_size: int) -> torch.Tensor:
    """The flat weights [n] in `dtype` from an NF4 tensor's parts (see model/nf4.NF4Weight), the two codebooks
    NF4 [16] and DYNAMIC [256] (float32) and the two block sizes (64 weights per absmax, 256 absmax per
    second-level scale), all on one device: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if n >= 2**31:  # the kernel indexes in int32; Mistral-7B's largest tensor, the head, has 1.3e8 elements
        raise ValueError(f"dequantize_nf4: {n} elements is more than the kernel's int32 indexing allows")
    out = torch.empty(n, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, PROGRAM_SIZE),)
    _dequantize_nf4_kernel[grid](packed, scale_codes, scale_absmax, scale_offset, nf4, dynamic, out, n,
                                 BLOCK=PROGRAM_SIZE, QBLOCK=block_size, SCALE_GROUP=scale_block_size,
                                 enable_fp_fusion=False)
    return out
