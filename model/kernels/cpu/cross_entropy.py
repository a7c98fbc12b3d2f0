"""The loss's chunk step for bf16 logits on the CPU (training under autocast), in C (cross_entropy.c).

chunked_loss.py computes the head and the loss a chunk of tokens at a time; for each chunk of bf16 logits [C, V]
cross_entropy.c does reference.chunk_step_reference in two passes per row for the statistics (max, sum of
exponentials) and one for the gradient, in the logits' own memory, where the reference makes a float32 copy and
walks it six times (~0.5 s of a 6 s SmolLM2 LoRA step at micro-batch 4).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from model.kernels.cpu.build import CKernel, plain_cpu_tensors
from model.kernels.reference import chunk_step_reference


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.cross_entropy_chunk_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                             ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_int]
    lib.cross_entropy_chunk_bf16.restype = None
    return lib


KERNEL = CKernel(Path(__file__).with_name("cross_entropy.c"), _open, "cross-entropy")


def chunk_step_cpu(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                   write_grad: bool) -> torch.Tensor:
    """reference.chunk_step_reference, through the C kernel for contiguous bf16 CPU logits (else the reference
    itself)."""
    lib = KERNEL.library() if (logits.dtype == torch.bfloat16 and logits.dim() == 2 and logits.is_contiguous()
                               and plain_cpu_tensors(logits)) else None
    if lib is None:
        return chunk_step_reference(logits, targets, ignore_index, label_smoothing, write_grad)
    n_rows, vocab_size = logits.shape
    targets = targets.to(torch.int64).contiguous()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        raise IndexError(f"cross-entropy target {int(targets[bad][0])} is out of range for a vocabulary of "
                         f"{vocab_size} (ignore_index {ignore_index})")
    loss = torch.empty(n_rows, dtype=torch.float32, device="cpu")
    lib.cross_entropy_chunk_bf16(logits.data_ptr(), n_rows, vocab_size, targets.data_ptr(), ignore_index,
                                 label_smoothing, loss.data_ptr(), int(write_grad), torch.get_num_threads())
    return loss
