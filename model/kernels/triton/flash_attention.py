"""Sliding-window, grouped-query flash attention in Triton, forward and backward.

Mistral attends causally within a window of W keys: query i sees key j iff i - W < j <= i (itself included).
Materialising the [T, T] score matrix costs O(T^2) memory, so these kernels follow FlashAttention-2 (Dao, 2023):
each program keeps a tile of query rows on chip, streams key/value blocks past it and folds them into an online
softmax (a running row max m, a running denominator l, a rescaled accumulator). Only the output o and the
logsumexp of every row are saved for the backward pass, which recomputes the probabilities block by block.

Two things are specific to Mistral:

* The window. A query block [m0, m1) only meets keys in (m0 - W, m1), so it visits only the key blocks that
  intersect that range, and the backward visits, for a key block, only the query blocks that can see it. The work
  is O(T * W) instead of O(T^2). Which blocks to visit is decided once, in Python, by `keys_for_query_blocks` and
  `queries_for_key_blocks`; the kernels read those tables, so the tests count exactly what the kernels do.
  The same tables say which visited blocks lie wholly inside the window, so the mask is built only on the
  boundary blocks (the diagonal and the window's trailing edge).
* Grouped-query attention. Hq query heads share Hkv key/value heads; a group is the G = Hq / Hkv query heads of
  one KV head. A program works on one KV head and stacks the G heads' query rows into one tile:
  row r is position m0 + r // G of query head r % G. Each K/V block is then loaded once per group, one tl.dot
  serves all G heads, and in the backward dK/dV of the KV head is a plain sum over the tile's rows: no atomics.

Shapes: q [B, Hq, T, D], k and v [B, Hkv, T, D], any strides. D is 16, 32, 64 or 128. fp32, fp16 and
bf16 are accepted; scores, softmax statistics and all gradients accumulate in fp32. Without a GPU, run the kernels
with TRITON_INTERPRET=1 (set before triton is imported); the interpreter is exact for fp32/fp16 but not for bf16.
"""
from __future__ import annotations

import functools

import torch

from model.kernels._switch import INTERPRETING, jit, tl, triton

LOG2E = 1.4426950408889634  # the kernels use exp2 (one hardware instruction): e^x = 2^(x * log2 e)
# tl.dot rounds fp32 operands to tf32 on NVIDIA tensor cores by default; ask for full fp32 products instead.
# fp16/bf16 operands are unaffected by the setting.
DOT_PRECISION = "ieee"


# ---------------------------------------------------------------------------------------------------------------
# Which blocks each program visits
# ---------------------------------------------------------------------------------------------------------------
# Query block m holds positions [m * block_m, min((m + 1) * block_m, T)); key block n holds [n * block_n, ...).
# Every real query i in [m0, m1) sees keys (i - W, i], and their union is (m0 - W, m1 - 1]: the key blocks to visit
# form one contiguous range. A visited key block needs no mask ("full") when all its block_n slots are real keys
# that every real query of the block sees: its last key is <= m0 (causal for the first query) and its first key is
# > m1 - 1 - W (in the window of the last query). Padded query rows past T are never stored and, in the backward,
# carry dO = 0, so they need no mask; padded key slots past T are never full, so they are always masked.
# Each table row is (first, first_full, end_full, end): visit [first, end), skip the mask on [first_full, end_full).

def _effective_window(seq_len: int, sliding_window: int | None) -> int:
    # A window of T or more cuts nothing off: i - T < 0 <= j. Clamping keeps the bounds below in [0, T].
    return seq_len if sliding_window is None else min(sliding_window, seq_len)


def keys_for_query_blocks(seq_len: int, sliding_window: int | None, block_m: int, block_n: int) -> torch.Tensor:
    """int32 [n_query_blocks, 4]: for each query block, the key blocks (first, first_full, end_full, end)."""
    w = _effective_window(seq_len, sliding_window)
    m0 = torch.arange(0, seq_len, block_m)
    m1 = (m0 + block_m).clamp(max=seq_len)
    first = (m0 - w + 1).clamp(min=0) // block_n                 # block holding the first query's oldest key
    end = (m1 - 1) // block_n + 1                                # one past the block holding the last query
    first_full = ((m1 - w).clamp(min=0) + block_n - 1) // block_n  # ceil((m1 - W) / block_n): first key > m1-1-W
    end_full = (m0 + 1) // block_n                               # blocks whose last key n0 + block_n - 1 <= m0
    return torch.stack((first, first_full, end_full, end), dim=1).to(torch.int32)


def queries_for_key_blocks(seq_len: int, sliding_window: int | None, block_m: int, block_n: int) -> torch.Tensor:
    """int32 [n_key_blocks, 4]: for each key block, the query blocks (first, first_full, end_full, end).

    The same block pairs as `keys_for_query_blocks`, listed key-block-major for the dK/dV pass.
    """
    w = _effective_window(seq_len, sliding_window)
    n_query_blocks = -(-seq_len // block_m)
    n0 = torch.arange(0, seq_len, block_n)
    n1 = (n0 + block_n).clamp(max=seq_len)
    first = n0 // block_m                                        # the first query that sees key n0 is n0 itself
    end = (n1 + w - 2).clamp(max=seq_len - 1) // block_m + 1     # the last key n1 - 1 is seen up to n1 - 2 + W
    first_full = (n0 + block_n - 1 + block_m - 1) // block_m     # m0 >= n0 + block_n - 1 (whole block causal)
    # Every real query of block m sees key n0 while m1 - 1 < n0 + W, i.e. min(m0 + block_m, T) <= n0 + W.
    end_full = torch.where(n0 + w >= seq_len, n_query_blocks, (n0 + w) // block_m)
    return torch.stack((first, first_full, end_full, end), dim=1).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _schedule_on(device: torch.device, keys_major: bool, seq_len: int, sliding_window: int | None,
                 block_m: int, block_n: int) -> torch.Tensor:
    # Cached per shape: training calls attention with the same T and W in every layer and step.
    table = queries_for_key_blocks if keys_major else keys_for_query_blocks
    return table(seq_len, sliding_window, block_m, block_n).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
# Grid: (query or key block, batch * KV head). Tiles: BLOCK_R query rows (GROUP heads x BLOCK_M positions, padded to
# a power of two), BLOCK_N keys, HEAD_DIM features. qk_scale is softmax_scale * log2(e), so scores are in base 2.

@jit
def _query_rows(pid_m, kv_head, seq_len, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Position, query head and validity of the BLOCK_R rows of query block pid_m of one KV head's group."""
    rows = tl.arange(0, BLOCK_R)
    pos = pid_m * BLOCK_M + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    valid = (rows < GROUP * BLOCK_M) & (pos < seq_len)     # the tile is padded to a power of two, the sequence ends
    return pos, head, valid


@jit
def _masked_scores(q, k, q_pos, k_pos, qk_scale, window, is_boundary, DOT_PRECISION: tl.constexpr):
    """Scores [BLOCK_R, BLOCK_N] in base 2; on a boundary block, -inf where the key is outside the query's window."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if is_boundary:
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    return s


@jit
def _forward_kernel(Q, K, V, O, LSE, SCHEDULE,
                    stride_qb, stride_qh, stride_qt, stride_qd,
                    stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_vb, stride_vh, stride_vt, stride_vd,
                    stride_ob, stride_oh, stride_ot, stride_od,
                    n_heads, n_kv_heads, seq_len, window, qk_scale,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // n_kv_heads
    kv_head = tl.program_id(1) % n_kv_heads
    q_pos, q_head, q_valid = _query_rows(pid_m, kv_head, seq_len, GROUP, BLOCK_M, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    b64 = batch.to(tl.int64)       # batch * stride can pass 2^31 elements on long sequences

    q = tl.load(Q + b64 * stride_qb + q_head[:, None] * stride_qh + q_pos[:, None] * stride_qt
                + d[None, :] * stride_qd, mask=q_valid[:, None], other=0.0)               # [BLOCK_R, D]
    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh

    # Online softmax state per row. m starts finite: on a boundary block a row may see no key at all, and
    # exp2(-inf - (-inf)) would be NaN; with m = -1e30 those blocks add exactly 0 and rescale by exactly 1.
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)

    first = tl.load(SCHEDULE + pid_m * 4)
    first_full = tl.load(SCHEDULE + pid_m * 4 + 1)
    end_full = tl.load(SCHEDULE + pid_m * 4 + 2)
    end = tl.load(SCHEDULE + pid_m * 4 + 3)
    for n in range(first, end):
        k_pos = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_valid = k_pos[:, None] < seq_len
        k = tl.load(k_base + k_pos[:, None] * stride_kt + d[None, :] * stride_kd, mask=k_valid, other=0.0)
        v = tl.load(v_base + k_pos[:, None] * stride_vt + d[None, :] * stride_vd, mask=k_valid, other=0.0)
        s = _masked_scores(q, k, q_pos, k_pos, qk_scale, window, (n < first_full) | (n >= end_full),
                           DOT_PRECISION)                                                  # [BLOCK_R, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)              # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Every real row sees at least itself, so l_i > 0 there; padded rows may have seen nothing and are not stored.
    l_i = tl.where(q_valid, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(O + b64 * stride_ob + q_head[:, None] * stride_oh + q_pos[:, None] * stride_ot + d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=q_valid[:, None])
    # The logsumexp stays in base 2 (natural logsumexp * log2 e), the unit the backward's exp2 wants.
    tl.store(LSE + (b64 * n_heads + q_head) * seq_len + q_pos, m_i + tl.log2(l_i), mask=q_valid)


@jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SCHEDULE,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        n_heads, n_kv_heads, seq_len, window, qk_scale, softmax_scale,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Query-block-major: dQ_i = scale * sum_j dS_ij k_j over the same key blocks as the forward.
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // n_kv_heads
    kv_head = tl.program_id(1) % n_kv_heads
    q_pos, q_head, q_valid = _query_rows(pid_m, kv_head, seq_len, GROUP, BLOCK_M, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    b64 = batch.to(tl.int64)

    row_mask = q_valid[:, None]
    q = tl.load(Q + b64 * stride_qb + q_head[:, None] * stride_qh + q_pos[:, None] * stride_qt
                + d[None, :] * stride_qd, mask=row_mask, other=0.0)                       # [BLOCK_R, D]
    do = tl.load(DO + b64 * stride_dob + q_head[:, None] * stride_doh + q_pos[:, None] * stride_dot
                 + d[None, :] * stride_dod, mask=row_mask, other=0.0)
    row_stats = (b64 * n_heads + q_head) * seq_len + q_pos
    lse = tl.load(LSE + row_stats, mask=q_valid, other=0.0)                               # [BLOCK_R], base 2
    delta = tl.load(DELTA + row_stats, mask=q_valid, other=0.0)
    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    dq = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)

    first = tl.load(SCHEDULE + pid_m * 4)
    first_full = tl.load(SCHEDULE + pid_m * 4 + 1)
    end_full = tl.load(SCHEDULE + pid_m * 4 + 2)
    end = tl.load(SCHEDULE + pid_m * 4 + 3)
    for n in range(first, end):
        k_pos = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_valid = k_pos[:, None] < seq_len
        k = tl.load(k_base + k_pos[:, None] * stride_kt + d[None, :] * stride_kd, mask=k_valid, other=0.0)
        v = tl.load(v_base + k_pos[:, None] * stride_vt + d[None, :] * stride_vd, mask=k_valid, other=0.0)
        s = _masked_scores(q, k, q_pos, k_pos, qk_scale, window, (n < first_full) | (n >= end_full),
                           DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])                                 # the forward's probabilities [BLOCK_R, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)   # dL/dP
        ds = p * (dp - delta[:, None])                                # softmax backward: dS = P * (dP - rowsum(dO*O))
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + b64 * stride_dqb + q_head[:, None] * stride_dqh + q_pos[:, None] * stride_dqt
             + d[None, :] * stride_dqd, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=row_mask)


@jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SCHEDULE,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          n_heads, n_kv_heads, seq_len, window, qk_scale, softmax_scale,
                          GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Key-block-major: dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i over the query blocks that see
    # block j. The sum over i runs over every row of the tile, i.e. over the whole group of query heads at once.
    pid_n = tl.program_id(0)
    batch = tl.program_id(1) // n_kv_heads
    kv_head = tl.program_id(1) % n_kv_heads
    d = tl.arange(0, HEAD_DIM)
    b64 = batch.to(tl.int64)

    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = k_pos[:, None] < seq_len
    k = tl.load(K + b64 * stride_kb + kv_head * stride_kh + k_pos[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=k_valid, other=0.0)                                                   # [BLOCK_N, D]
    v = tl.load(V + b64 * stride_vb + kv_head * stride_vh + k_pos[:, None] * stride_vt + d[None, :] * stride_vd,
                mask=k_valid, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    first = tl.load(SCHEDULE + pid_n * 4)
    first_full = tl.load(SCHEDULE + pid_n * 4 + 1)
    end_full = tl.load(SCHEDULE + pid_n * 4 + 2)
    end = tl.load(SCHEDULE + pid_n * 4 + 3)
    for m in range(first, end):
        q_pos, q_head, q_valid = _query_rows(m, kv_head, seq_len, GROUP, BLOCK_M, BLOCK_R)
        row_mask = q_valid[:, None]
        # Padded rows load q = dO = lse = delta = 0: p is finite there and dS = p * (0 - 0) = 0, so they add nothing.
        q = tl.load(Q + b64 * stride_qb + q_head[:, None] * stride_qh + q_pos[:, None] * stride_qt
                    + d[None, :] * stride_qd, mask=row_mask, other=0.0)                   # [BLOCK_R, D]
        do = tl.load(DO + b64 * stride_dob + q_head[:, None] * stride_doh + q_pos[:, None] * stride_dot
                     + d[None, :] * stride_dod, mask=row_mask, other=0.0)
        row_stats = (b64 * n_heads + q_head) * seq_len + q_pos
        lse = tl.load(LSE + row_stats, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + row_stats, mask=q_valid, other=0.0)
        s = _masked_scores(q, k, q_pos, k_pos, qk_scale, window, (m < first_full) | (m >= end_full),
                           DOT_PRECISION)                                                  # [BLOCK_R, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    tl.store(DK + b64 * stride_dkb + kv_head * stride_dkh + k_pos[:, None] * stride_dkt + d[None, :] * stride_dkd,
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=k_valid)
    tl.store(DV + b64 * stride_dvb + kv_head * stride_dvh + k_pos[:, None] * stride_dvt + d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=k_valid)


# ---------------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ---------------------------------------------------------------------------------------------------------------

def _tile_limit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_rows: int) -> str | None:
    """Why the kernel's tiles cannot take these (well-shaped) inputs, or None when they can."""
    if q.shape[1] % k.shape[1] != 0:
        return f"n_heads={q.shape[1]} is not a multiple of n_kv_heads={k.shape[1]}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}"
    head_dim = q.shape[-1]
    # tl.dot needs at least 16; past 128 the fp32 tiles outgrow an H100/H200's 227 KiB of shared memory.
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not supported; use 16, 32, 64 or 128"
    if q.shape[1] // k.shape[1] > block_rows:
        return (f"block_rows={block_rows} is smaller than the query group n_heads / n_kv_heads = "
                f"{q.shape[1] // k.shape[1]}")
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_rows: int = 64) -> bool:
    """Whether flash_attention's tiles fit these inputs (head_dim a power of two in 16..128, one float dtype for
    q, k, v, a query group no taller than block_rows), so that a caller can take another path instead."""
    return _tile_limit(q, k, v, block_rows) is None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None,
                  block_rows: int, block_keys: int) -> None:
    where = "model/kernels/triton/flash_attention.py"
    if triton is None:
        raise RuntimeError(f"{where}: flash_attention needs triton; use attention_reference without it")
    if not q.is_cuda and not INTERPRETING:
        raise RuntimeError(f"{where}: tensors are on {q.device}; Triton runs on CUDA, or on the CPU with "
                           "TRITON_INTERPRET=1 set before triton is imported")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{where}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree on "
                         "batch, sequence length and head_dim")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{where}: sliding_window={sliding_window} must be >= 1 or None")
    for name, size in (("block_rows", block_rows), ("block_keys", block_keys)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{where}: {name}={size} must be a power of two >= 16 (tl.dot's smallest tile)")
    reason = _tile_limit(q, k, v, block_rows)
    if reason:
        raise ValueError(f"{where}: {reason}")


def _launch_args(q: torch.Tensor, k: torch.Tensor, sliding_window: int | None,
                 block_rows: int) -> tuple[int, int, dict]:
    """Block length in positions, the window passed to the kernels, and the compile-time constants."""
    group = q.shape[1] // k.shape[1]
    block_m = block_rows // group        # positions per query block; G * block_m <= block_rows rows are used
    window = _effective_window(q.shape[2], sliding_window)
    return block_m, window, dict(GROUP=group, BLOCK_M=block_m, BLOCK_R=block_rows, HEAD_DIM=q.shape[-1],
                                 DOT_PRECISION=DOT_PRECISION)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None, softmax_scale: float,
             block_rows: int, block_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, Hq, T, D] in q's dtype and, per row, the fp32 base-2 logsumexp [B, Hq, T] of its scaled scores."""
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    block_m, window, consts = _launch_args(q, k, sliding_window, block_rows)
    schedule = _schedule_on(q.device, False, seq_len, sliding_window, block_m, block_keys)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, n_heads, seq_len), device=q.device, dtype=torch.float32)
    grid = (schedule.shape[0], batch * n_kv_heads)
    _forward_kernel[grid](q, k, v, o, lse, schedule, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                          n_heads, n_kv_heads, seq_len, window, softmax_scale * LOG2E,
                          BLOCK_N=block_keys, num_warps=8 if head_dim >= 128 else 4, **consts)
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, sliding_window: int | None, softmax_scale: float, block_rows: int,
              block_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_heads, seq_len, _ = q.shape
    n_kv_heads = k.shape[1]
    block_m, window, consts = _launch_args(q, k, sliding_window, block_rows)
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the term the softmax backward subtracts; O(T * D) work.
    delta = (do.float() * o.float()).sum(dim=-1)                                    # [B, Hq, T]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (n_heads, n_kv_heads, seq_len, window, softmax_scale * LOG2E, softmax_scale)
    by_query = _schedule_on(q.device, False, seq_len, sliding_window, block_m, block_keys)
    _backward_dq_kernel[(by_query.shape[0], batch * n_kv_heads)](
        q, k, v, do, lse, delta, dq, by_query, *strides, *dq.stride(), *scalars, BLOCK_N=block_keys, **consts)
    by_key = _schedule_on(q.device, True, seq_len, sliding_window, block_m, block_keys)
    _backward_dkdv_kernel[(by_key.shape[0], batch * n_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, by_key, *strides, *dk.stride(), *dv.stride(), *scalars,
        BLOCK_N=block_keys, **consts)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None,
                softmax_scale: float, block_rows: int, block_keys: int) -> torch.Tensor:
        o, lse = _forward(q, k, v, sliding_window, softmax_scale, block_rows, block_keys)
        ctx.save_for_backward(q, k, v, o, lse)       # no [T, T] matrix: the backward recomputes P from lse
        ctx.settings = (sliding_window, softmax_scale, block_rows, block_keys)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable      # the backward kernels are not themselves differentiable
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, *ctx.settings)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None,
                    softmax_scale: float | None = None, *, block_rows: int = 64,
                    block_keys: int = 64) -> torch.Tensor:
    """Causal sliding-window grouped-query attention: q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D].

    Query i sees key j iff i - W < j <= i (W = sliding_window; None is plain causal). softmax_scale defaults to
    1/sqrt(D). block_rows (query rows per tile, shared by the group's heads) and block_keys are powers of two;
    the defaults are untuned starting points for a GPU, the tests use smaller ones.
    """
    _check_inputs(q, k, v, sliding_window, block_rows, block_keys)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _FlashAttention.apply(q, k, v, sliding_window, scale, block_rows, block_keys)
