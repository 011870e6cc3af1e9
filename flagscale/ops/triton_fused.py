"""Fused Triton kernels for Pi0's Gemma and SigLIP layers (CUDA; `engine.fused_kernels`).

Short inputs (the action expert: batch x 50 rows) are memory-bound on the weights, and launch
count dominates: the composed path runs ~15 kernels per layer (cuBLAS split-K GEMMs plus their
reductions, norm, RoPE, GeGLU, residual adds, cache copies, attention pieces). Five kernels, and
the five as one:

- `qkv_rope`:      RMSNorm (1 + w) -> q|k|v projection -> RoPE on q and k -> q out, k/v written
                   straight into the KV cache;
- `linear_residual`: residual + x @ W^T (o_proj, down_proj), split-K with an in-kernel,
                   fixed-order reduction (deterministic);
- `norm_geglu`:    RMSNorm (1 + w) -> gate|up projection -> gelu_tanh(gate) * up;
- `mqa_attention`: one-K/V-head attention over the cache, split over keys, the splits merged by
                   the last one to finish or by a second kernel;
- `decoder_layer`: all of the above for one expert layer in one persistent launch (one program
                   per SM at most; the kernels' tile functions as phases with grid barriers
                   between them; bit-identical to the separate kernels). Every program must be
                   resident at once: with GPU partitioning that hides SMs, turn it off
                   (`engine.persistent_layers: false`).

Pi0.5's adaptive layers (per-sample, per-step norm modulation: nothing to fold into a weight) take,
with `fused_kernels: true` only (`fused_routes.ADAPTIVE`; interpreter-tested, not yet run on a GPU):
`ada_rms_norm` (one row kernel), then `qkv_rope` / `norm_geglu` without their norm (NORM off: x is
normalized already), and `linear_residual` with the gate in its epilogue (`linear_gated_residual`).

Long inputs (the prefix: 816 tokens per sample) keep cuBLAS for the projections and get row-wise
kernels around them (RMSNorm, RoPE + q/cache scatter, GeGLU), one `addmm` for linear + residual
(in place where the model owns the residual), one cuBLASLt GEMM with a GELU epilogue for SigLIP's
fc1 (`linear_gelu`), the same MQA kernel with a long-sequence configuration for the padded prefix
attention, and one row kernel for SigLIP's residual add + LayerNorm (`add_layer_norm`). Which
path an op takes depends on its row count (`fused_routes.MAX_ROWS`, measured). The long path is
for the native table only: with another backend (FlagGems) only the expert's short inputs take
these kernels.

RMSNorm's (1 + w) is folded into the projection weight (cached per weight) and the row scale
1 / rms is applied to the fp32 accumulator, so the K loop is a plain pipelined GEMM: one bf16
rounding of W * (1 + w) replaces the composed path's rounding of the normalized input (errors of
the same size). Otherwise the kernels round where the composed ops round (projection outputs and
activations are bf16 before the next op); tests bound their error against an fp32 reference by
the composed ops' own. fp32 and CPU tensors take the composed ops. The split reductions use a
per-tile arrival counter that the last CTA resets, so the kernels are safe to replay in CUDA
graphs; on the CPU they run in Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests
them. Which kernel takes a call is decided in `fused_routes.py`.
"""

import functools
import os

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from flagscale.ops import fp8

# Triton's CPU interpreter computes bf16 dots wrongly and truncates fp32 -> bf16 casts; there the
# dot operands are widened to fp32 (exact for bf16 products) and casts round to nearest even in
# software, so interpreted kernels round exactly like compiled ones.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_EMULATE = tl.constexpr(_INTERPRET)


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc):
    if _EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even (also under the interpreter)."""
    if _EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mainloop(
    x_ptr,
    w_ptr,
    offs_m,
    m_mask,
    n0,
    n1,
    k_start,
    stride_xm,
    stride_wn,
    eps,
    K_LEN: tl.constexpr,
    NORM: tl.constexpr,
    PAIRED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """acc0 = x[:, k_start:k_start+K_LEN] @ W[n0:n0+BN]^T (and acc1 for rows n1:n1+BN). With
    NORM (K_LEN = K), rows are then scaled by 1 / sqrt(mean(x^2) + eps): RMSNorm whose (1 + w)
    was folded into W. A plain pipelined GEMM loop; the sums of squares ride along."""
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    ss = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    acc0 = tl.zeros([offs_m.shape[0], BN], dtype=tl.float32)
    acc1 = tl.zeros([offs_m.shape[0], BN], dtype=tl.float32)
    for i in range(K_LEN // BK):  # constexpr trip counts (the interpreter needs them too)
        kk = k_start + i * BK + offs_k
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None])
        if NORM:
            xf = xk.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        w0 = tl.load(w_ptr + (n0 + offs_n)[None, :] * stride_wn + kk[:, None])
        acc0 = _dot(xk, w0, acc0)
        if PAIRED:
            w1 = tl.load(w_ptr + (n1 + offs_n)[None, :] * stride_wn + kk[:, None])
            acc1 = _dot(xk, w1, acc1)
    if NORM:
        rstd = 1.0 / tl.sqrt(ss / K_LEN + eps)
        acc0 = acc0 * rstd[:, None]
        acc1 = acc1 * rstd[:, None]
    return acc0, acc1


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * x * (1.0 + tanh)


# ----------------------------------------------------------------------------------------------
# RMSNorm -> q|k|v -> RoPE -> q, cache
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qkv_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    M,
    T,
    eps,
    stride_xm,
    stride_wn,
    stride_qm,
    stride_cb,
    stride_ct,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    N_Q: tl.constexpr,
    N_KV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NORM: tl.constexpr,
):
    _qkv_rope_tile(
        tl.program_id(0), tl.program_id(1), x_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
        M, T, eps, stride_xm, stride_wn, stride_qm, stride_cb, stride_ct, K, HEAD_DIM, N_Q, N_KV,
        BM, BN, BK, NORM,
    )  # fmt: skip


@triton.jit
def _qkv_rope_tile(
    pid, pid_m, x_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, M, T, eps, stride_xm,
    stride_wn, stride_qm, stride_cb, stride_ct, K: tl.constexpr, HEAD_DIM: tl.constexpr,
    N_Q: tl.constexpr, N_KV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr,
):  # fmt: skip
    """Tile (pid, pid_m): head pid // PAIRS, columns j..j+BN of its first half and j+HALF.. of
    its second half (RoPE partners); q/k heads rotated, v heads copied. NORM: RMSNorm first (its
    weight folded into W); without it x is normalized already (Pi0.5's adaptive norm)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = HALF // BN
    head = pid // PAIRS
    j = (pid % PAIRS) * BN
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    n0 = head * HEAD_DIM + j
    lo, hi = _mainloop(
        x_ptr, w_ptr, offs_m, m_mask, n0, n0 + HALF, 0, stride_xm, stride_wn, eps, K, NORM, True,
        BN, BK,
    )  # fmt: skip
    dtype = q_ptr.dtype.element_ty
    lo = _cast(lo, dtype).to(tl.float32)
    hi = _cast(hi, dtype).to(tl.float32)
    offs_j = j + tl.arange(0, BN)
    if head < N_Q + N_KV:  # RoPE; sin is stored signed as [-sin | sin]
        cos = tl.load(cos_ptr + offs_m[:, None] * HEAD_DIM + offs_j[None, :], mask=m_mask[:, None])
        sin = tl.load(
            sin_ptr + offs_m[:, None] * HEAD_DIM + HALF + offs_j[None, :], mask=m_mask[:, None]
        )
        lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
    if head < N_Q:
        base = q_ptr + offs_m[:, None] * stride_qm + head * HEAD_DIM
    else:
        row = (offs_m // T) * stride_cb + (offs_m % T) * stride_ct
        if head < N_Q + N_KV:
            base = k_ptr + row[:, None] + (head - N_Q) * HEAD_DIM
        else:
            base = v_ptr + row[:, None] + (head - N_Q - N_KV) * HEAD_DIM
    tl.store(base + offs_j[None, :], _cast(lo, dtype), mask=m_mask[:, None])
    tl.store(base + HALF + offs_j[None, :], _cast(hi, dtype), mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------
# RMSNorm -> gate|up -> gelu_tanh(gate) * up
# ----------------------------------------------------------------------------------------------


@triton.jit
def _norm_geglu_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    F,
    eps,
    stride_xm,
    stride_wn,
    stride_om,
    K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NORM: tl.constexpr,
):
    _norm_geglu_tile(
        tl.program_id(0), tl.program_id(1), x_ptr, w_ptr, out_ptr, M, F, eps, stride_xm,
        stride_wn, stride_om, K, BM, BN, BK, NORM,
    )  # fmt: skip


@triton.jit
def _norm_geglu_tile(
    pid_n, pid_m, x_ptr, w_ptr, out_ptr, M, F, eps, stride_xm, stride_wn, stride_om,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """NORM: RMSNorm first (weight folded into W); without it x is normalized already."""
    n0 = pid_n * BN
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    gate, up = _mainloop(
        x_ptr, w_ptr, offs_m, m_mask, n0, n0 + F, 0, stride_xm, stride_wn, eps, K, NORM, True, BN,
        BK,
    )  # fmt: skip
    dtype = out_ptr.dtype.element_ty
    act = _cast(_gelu_tanh(_cast(gate, dtype).to(tl.float32)), dtype).to(tl.float32)
    out = act * _cast(up, dtype).to(tl.float32)
    offs_n = n0 + tl.arange(0, BN)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _cast(out, dtype), m_mask[:, None]
    )


# ----------------------------------------------------------------------------------------------
# residual + x @ W^T, split-K
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_residual_kernel(
    x_ptr,
    w_ptr,
    res_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    M,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    gate_ptr,
    T,
    stride_gb,
    K: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
):
    _linear_residual_tile(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), x_ptr, w_ptr,
        res_ptr, out_ptr, ws_ptr, count_ptr, M, stride_xm, stride_wn, stride_rm, stride_om,
        gate_ptr, T, stride_gb, K, SPLIT, BM, BN, BK, GATE,
    )  # fmt: skip


@triton.jit
def _linear_residual_tile(
    pid_n, pid_m, split, n_tiles, x_ptr, w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr, M,
    stride_xm, stride_wn, stride_rm, stride_om, gate_ptr, T, stride_gb, K: tl.constexpr,
    SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """Tile (n, m, s) reduces K-slice s; with SPLIT > 1 the partials go to a workspace and the
    last program to arrive for tile (n, m) sums them in split order and applies the epilogue.
    GATE: the product is scaled by gate[row // T] first (Pi0.5's gated residual)."""
    n0 = pid_n * BN
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    m_mask = offs_m < M
    acc, _ = _mainloop(
        x_ptr, w_ptr, offs_m, m_mask, n0, n0, split * (K // SPLIT), stride_xm, stride_wn, 0.0,
        K // SPLIT, False, False, BN, BK,
    )  # fmt: skip
    if SPLIT > 1:
        tile = pid_m * n_tiles + pid_n
        tile_ws = ws_ptr + tile * SPLIT * BM * BN
        local = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        tl.store(tile_ws + split * BM * BN + local, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # last one in: reduce in a fixed order (deterministic)
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for s in range(SPLIT):
                acc += tl.load(tile_ws + s * BM * BN + local, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)  # ready for the next launch / graph replay
            _residual_store(
                acc, res_ptr, out_ptr, offs_m, offs_n, m_mask, stride_rm, stride_om, gate_ptr, T,
                stride_gb, GATE,
            )  # fmt: skip
    else:
        _residual_store(
            acc, res_ptr, out_ptr, offs_m, offs_n, m_mask, stride_rm, stride_om, gate_ptr, T,
            stride_gb, GATE,
        )  # fmt: skip


@triton.jit
def _residual_store(
    acc, res_ptr, out_ptr, offs_m, offs_n, m_mask, stride_rm, stride_om, gate_ptr, T, stride_gb,
    GATE: tl.constexpr,
):  # fmt: skip
    """out = res + bf16(acc); GATE: res + bf16(bf16(acc) * gate[row // T]) (the composed ops'
    roundings: the product, the gated branch, the sum)."""
    dtype = out_ptr.dtype.element_ty
    res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=m_mask[:, None])
    branch = _cast(acc, dtype).to(tl.float32)
    if GATE:
        gate_rows = gate_ptr + (offs_m // T)[:, None] * stride_gb
        gate = tl.load(gate_rows + offs_n[None, :], mask=m_mask[:, None]).to(tl.float32)
        branch = _cast(branch * gate, dtype).to(tl.float32)
    out = res.to(tl.float32) + branch
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _cast(out, dtype), m_mask[:, None]
    )


# ----------------------------------------------------------------------------------------------
# attention with one K/V head, split over keys
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mqa_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    R,
    H,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mq,
    stride_ob,
    LK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    DH: tl.constexpr,
    SPLIT: tl.constexpr,
    BR: tl.constexpr,
    BKV: tl.constexpr,
    MERGE_KERNEL: tl.constexpr,
):
    _mqa_tile(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), q_ptr, k_ptr,
        v_ptr, mask_ptr, out_ptr, ws_ptr, count_ptr, R, H, scale, stride_qb, stride_qt,
        stride_qh, stride_kb, stride_kt, stride_vb, stride_vt, stride_mb, stride_mq, stride_ob,
        LK, HAS_MASK, MASK_ROWS, DH, SPLIT, BR, BKV, MERGE_KERNEL,
    )  # fmt: skip


@triton.jit
def _mqa_tile(
    pid_r, split, b, r_tiles, q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, count_ptr, R, H,
    scale, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
    stride_mb, stride_mq, stride_ob, LK, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
    DH: tl.constexpr, SPLIT: tl.constexpr, BR: tl.constexpr, BKV: tl.constexpr,
    MERGE_KERNEL: tl.constexpr,
):  # fmt: skip
    """Rows r = t * H + h (query t, head h); tile (rows, split, batch) runs an online softmax
    over its key range; with SPLIT > 1 the last split to arrive merges the partial states, or
    (MERGE_KERNEL) `_mqa_merge_kernel` does, spread over many programs."""
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, DH)
    r_mask = offs_r < R
    q_rows = q_ptr + b * stride_qb + (offs_r // H) * stride_qt + (offs_r % H) * stride_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :], r_mask[:, None])
    BLOCKS: tl.constexpr = (LK + SPLIT * BKV - 1) // (SPLIT * BKV)  # key blocks per split
    m_i = tl.full([BR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BR], dtype=tl.float32)
    acc = tl.zeros([BR, DH], dtype=tl.float32)
    for i in range(BLOCKS):
        offs_k = (split * BLOCKS + i) * BKV + tl.arange(0, BKV)
        k_mask = offs_k < LK
        k = tl.load(
            k_ptr + b * stride_kb + offs_k[:, None] * stride_kt + offs_d[None, :], k_mask[:, None]
        )
        s = _dot(q, tl.trans(k), tl.zeros([BR, BKV], dtype=tl.float32)) * scale
        if MASK_ROWS:  # a mask row per query token
            mrow = mask_ptr + b * stride_mb + (offs_r // H)[:, None] * stride_mq
            s += tl.load(mrow + offs_k[None, :], r_mask[:, None] & k_mask[None, :], 0.0).to(
                tl.float32
            )
        elif HAS_MASK:  # one row for every query (key padding): a vector per key block
            s += tl.load(mask_ptr + b * stride_mb + offs_k, k_mask, 0.0).to(tl.float32)[None, :]
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the last key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + b * stride_vb + offs_k[:, None] * stride_vt + offs_d[None, :], k_mask[:, None]
        )
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out_rows = out_ptr + b * stride_ob + offs_r[:, None] * DH + offs_d[None, :]
    tile = b * r_tiles + pid_r  # the row tile's workspace and counter (SPLIT > 1)
    tile_ws = ws_ptr + tile * SPLIT * BR * (DH + 2)
    if SPLIT == 1:
        tl.store(out_rows, _cast(acc / l_i[:, None], out_ptr.dtype.element_ty), r_mask[:, None])
    elif MERGE_KERNEL:
        _mqa_store_partial(acc, m_i, l_i, tile_ws, split)
    else:
        _mqa_combine(acc, m_i, l_i, tile_ws, count_ptr + tile, out_rows, r_mask, split, SPLIT)


@triton.jit
def _mqa_store_partial(acc, m_i, l_i, tile_ws, split):
    """Workspace of a row tile: per split, acc [BR, DH] fp32, then m [BR], then l [BR]."""
    BR: tl.constexpr = acc.shape[0]
    DH: tl.constexpr = acc.shape[1]
    rows = tl.arange(0, BR)
    part = tile_ws + split * BR * (DH + 2)
    tl.store(part + rows[:, None] * DH + tl.arange(0, DH)[None, :], acc)
    tl.store(part + BR * DH + rows, m_i)
    tl.store(part + BR * DH + BR + rows, l_i)


@triton.jit
def _mqa_merge(tile_ws, rows, SPLIT: tl.constexpr, BR: tl.constexpr, DH: tl.constexpr):
    """Softmax-weighted sum of the SPLIT partial states of the tile's `rows` -> [rows, DH]."""
    local = rows[:, None] * DH + tl.arange(0, DH)[None, :]
    m_all = tl.full([rows.shape[0]], float("-inf"), dtype=tl.float32)
    for s in range(SPLIT):
        m_s = tl.load(tile_ws + s * BR * (DH + 2) + BR * DH + rows, cache_modifier=".cg")
        m_all = tl.maximum(m_all, m_s)
    total = tl.zeros([rows.shape[0], DH], dtype=tl.float32)
    denom = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for s in range(SPLIT):
        part = tile_ws + s * BR * (DH + 2)
        m_s = tl.load(part + BR * DH + rows, cache_modifier=".cg")
        l_s = tl.load(part + BR * DH + BR + rows, cache_modifier=".cg")
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_all))
        total += tl.load(part + local, cache_modifier=".cg") * w[:, None]
        denom += l_s * w
    return total / denom[:, None]


@triton.jit
def _mqa_merge_kernel(
    ws_ptr, out_ptr, R, stride_ob, SPLIT: tl.constexpr, BR: tl.constexpr, DH: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    _mqa_merge_tile(tl.program_id(0), tl.program_id(1), ws_ptr, out_ptr, R, stride_ob, SPLIT, BR,
                    DH, ROWS)  # fmt: skip


@triton.jit
def _mqa_merge_tile(
    pid, b, ws_ptr, out_ptr, R, stride_ob, SPLIT: tl.constexpr, BR: tl.constexpr,
    DH: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Tile (row chunk, batch): merges the partial states of ROWS rows of one row tile."""
    CHUNKS: tl.constexpr = BR // ROWS
    tile_r = pid // CHUNKS
    rows = (pid % CHUNKS) * ROWS + tl.arange(0, ROWS)
    tile_ws = ws_ptr + (b * tl.cdiv(R, BR) + tile_r) * SPLIT * BR * (DH + 2)
    out = _mqa_merge(tile_ws, rows, SPLIT, BR, DH)
    offs_r = tile_r * BR + rows
    out_rows = out_ptr + b * stride_ob + offs_r[:, None] * DH + tl.arange(0, DH)[None, :]
    tl.store(out_rows, _cast(out, out_ptr.dtype.element_ty), (offs_r < R)[:, None])


@triton.jit
def _mqa_combine(acc, m_i, l_i, tile_ws, tile_count, out_rows, r_mask, split, SPLIT):
    BR: tl.constexpr = acc.shape[0]
    DH: tl.constexpr = acc.shape[1]
    _mqa_store_partial(acc, m_i, l_i, tile_ws, split)
    tl.debug_barrier()
    arrived = tl.atomic_add(tile_count, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        out = _mqa_merge(tile_ws, tl.arange(0, BR), SPLIT, BR, DH)
        tl.store(tile_count, 0)
        tl.store(out_rows, _cast(out, out_rows.dtype.element_ty), r_mask[:, None])


# ----------------------------------------------------------------------------------------------
# one whole decoder layer in one persistent launch
# ----------------------------------------------------------------------------------------------

N_BARRIERS = tl.constexpr(5)  # grid barriers per decoder-layer launch


@triton.jit
def _grid_sync(bar_ptr, index: tl.constexpr, NPROG: tl.constexpr):
    """Grid-wide barrier `index` (every program of the launch is resident: one per SM at most).
    Stores before it are visible to every program after it (release / acquire at GPU scope).
    Program 0 then re-arms the previous barrier's counter: everyone has left that one."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr + index, 1, sem="release")
    seen = tl.atomic_add(bar_ptr + index, 0, sem="acquire")
    while seen < NPROG:
        seen = tl.atomic_add(bar_ptr + index, 0, sem="acquire")
    tl.debug_barrier()
    if tl.program_id(0) == 0:
        tl.store(bar_ptr + (index + N_BARRIERS - 1) % N_BARRIERS, 0)


@triton.jit
def _linear_residual_phase(
    pid, x_ptr, w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr, M, K: tl.constexpr,
    N: tl.constexpr, SPLIT: tl.constexpr, M_TILES: tl.constexpr, NPROG: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Program pid's share of the (n, m, split) tiles of out = res + x @ W^T (x [M, K], W [N, K],
    res and out [M, N], all contiguous)."""
    N_TILES: tl.constexpr = N // BN
    TILES: tl.constexpr = N_TILES * M_TILES * SPLIT
    for i in range((TILES + NPROG - 1) // NPROG):
        t = pid + i * NPROG
        if t < TILES:
            _linear_residual_tile(
                t % N_TILES, (t // N_TILES) % M_TILES, t // (N_TILES * M_TILES), N_TILES, x_ptr,
                w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr, M, K, K, N, N, res_ptr, 1, 0, K, SPLIT,
                BM, BN, BK, False,
            )  # fmt: skip


@triton.jit
def _decoder_layer_kernel(
    x_ptr, q_ptr, attn_ptr, h_ptr, act_ptr, out_ptr,
    w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr,
    cos_ptr, sin_ptr, k_ptr, v_ptr, mask_ptr,
    ws_ptr, count_ptr, ws_attn_ptr, bar_ptr,
    M, T, start, eps, scale, stride_cb, stride_ct, stride_mb, stride_mq,
    W: tl.constexpr, F: tl.constexpr, HEAD_DIM: tl.constexpr, N_Q: tl.constexpr,
    LK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, N_BATCH: tl.constexpr,
    M_TILES: tl.constexpr, R_TILES: tl.constexpr, NPROG: tl.constexpr, BM: tl.constexpr,
    QKV_BN: tl.constexpr, QKV_BK: tl.constexpr, GEGLU_BN: tl.constexpr, GEGLU_BK: tl.constexpr,
    LIN_BN: tl.constexpr, LIN_BK: tl.constexpr, O_SPLIT: tl.constexpr, D_SPLIT: tl.constexpr,
    BR: tl.constexpr, BKV: tl.constexpr, A_SPLIT: tl.constexpr, ROWS: tl.constexpr,
    PHASES: tl.constexpr,
):  # fmt: skip
    """A Gemma decoder layer over the expert's rows, the five fused ops' tiles as phases of one
    launch with grid barriers between them (program p takes tiles p, p + NPROG, ...):
    qkv_rope -> attention partials -> merge -> o_proj + residual -> norm_geglu -> down_proj +
    residual. The same tile functions as the separate kernels: the results are bit-identical.
    Trip counts are constexpr (the interpreter needs them). Bit i of PHASES runs phase i (all: 63;
    fewer only to time the phases, `bench_kernels.py --phases`)."""
    pid = tl.program_id(0)
    QD: tl.constexpr = N_Q * HEAD_DIM
    PAIRS: tl.constexpr = (N_Q + 2) * (HEAD_DIM // 2 // QKV_BN)  # q|k|v tiles per row tile
    if PHASES >> 0 & 1:
        for i in range((PAIRS * M_TILES + NPROG - 1) // NPROG):
            t = pid + i * NPROG
            if t < PAIRS * M_TILES:
                _qkv_rope_tile(
                    t % PAIRS, t // PAIRS, x_ptr, w_qkv_ptr, cos_ptr, sin_ptr, q_ptr,
                    k_ptr + start * stride_ct, v_ptr + start * stride_ct, M, T, eps, W, W, QD,
                    stride_cb, stride_ct, W, HEAD_DIM, N_Q, 1, BM, QKV_BN, QKV_BK, True,
                )  # fmt: skip
    _grid_sync(bar_ptr, 0, NPROG)
    rows = T * N_Q
    ATTN_TILES: tl.constexpr = R_TILES * A_SPLIT * N_BATCH
    if PHASES >> 1 & 1:
        for i in range((ATTN_TILES + NPROG - 1) // NPROG):
            t = pid + i * NPROG
            if t < ATTN_TILES:
                _mqa_tile(
                    t % R_TILES, (t // R_TILES) % A_SPLIT, t // (R_TILES * A_SPLIT), R_TILES, q_ptr,
                    k_ptr, v_ptr, mask_ptr, attn_ptr, ws_attn_ptr, count_ptr, rows, N_Q, scale,
                    T * QD, QD, HEAD_DIM, stride_cb, stride_ct, stride_cb, stride_ct, stride_mb,
                    stride_mq, T * QD, LK, HAS_MASK, MASK_ROWS, HEAD_DIM, A_SPLIT, BR, BKV, True,
                )  # fmt: skip
    _grid_sync(bar_ptr, 1, NPROG)
    MERGE_TILES: tl.constexpr = R_TILES * (BR // ROWS)  # per sample
    if PHASES >> 2 & 1:
        for i in range((MERGE_TILES * N_BATCH + NPROG - 1) // NPROG):
            t = pid + i * NPROG
            if t < MERGE_TILES * N_BATCH:
                _mqa_merge_tile(
                    t % MERGE_TILES, t // MERGE_TILES, ws_attn_ptr, attn_ptr, rows, T * QD, A_SPLIT,
                    BR, HEAD_DIM, ROWS,
                )  # fmt: skip
    _grid_sync(bar_ptr, 2, NPROG)
    if PHASES >> 3 & 1:
        _linear_residual_phase(
            pid, attn_ptr, w_o_ptr, x_ptr, h_ptr, ws_ptr, count_ptr, M, QD, W, O_SPLIT, M_TILES,
            NPROG, BM, LIN_BN, LIN_BK,
        )  # fmt: skip
    _grid_sync(bar_ptr, 3, NPROG)
    GEGLU_TILES: tl.constexpr = F // GEGLU_BN  # per row tile
    if PHASES >> 4 & 1:
        for i in range((GEGLU_TILES * M_TILES + NPROG - 1) // NPROG):
            t = pid + i * NPROG
            if t < GEGLU_TILES * M_TILES:
                _norm_geglu_tile(
                    t % GEGLU_TILES, t // GEGLU_TILES, h_ptr, w_gu_ptr, act_ptr, M, F, eps, W, W, F,
                    W, BM, GEGLU_BN, GEGLU_BK, True,
                )  # fmt: skip
    _grid_sync(bar_ptr, 4, NPROG)
    if PHASES >> 5 & 1:
        _linear_residual_phase(
            pid, act_ptr, w_down_ptr, h_ptr, out_ptr, ws_ptr, count_ptr, M, F, W, D_SPLIT, M_TILES,
            NPROG, BM, LIN_BN, LIN_BK,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# row-wise kernels for long sequences (the prefix): around cuBLAS GEMMs
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps, D: tl.constexpr, BLOCK: tl.constexpr
):
    """One row: bf16(x * rsqrt(mean(x^2) + eps) * (1 + w)), in fp32 (Gemma RMSNorm)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = _cast(x * rstd * (1.0 + w), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask)


@triton.jit
def _ada_rms_norm_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, T, stride_x, stride_sb, stride_hb, stride_o, eps,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row of sample row // T: x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift in fp32,
    rounded once (Pi0.5's adaptive RMSNorm)."""
    row = tl.program_id(0)
    b = row // T
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_sb + offs, mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_hb + offs, mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = _cast(x * rstd * (1.0 + scale) + shift, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask)


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, stride_x, stride_y, stride_s, stride_o, eps,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: s = bf16(x + y) (stored), out = bf16(LayerNorm(s) * w + b) in fp32."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + offs, mask, other=0.0).to(tl.float32)
    total = _cast(x + y, sum_ptr.dtype.element_ty)  # rounded like the composed add
    tl.store(sum_ptr + row * stride_s + offs, total, mask)
    t = total.to(tl.float32)
    mean = tl.sum(t, axis=0) / D
    centred = tl.where(mask, t - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs,
        _cast(centred * rstd * w + b, out_ptr.dtype.element_ty),
        mask,
    )


@triton.jit
def _rope_split_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    T,
    stride_m,
    stride_qm,
    stride_cb,
    stride_ct,
    HEAD_DIM: tl.constexpr,
    N_Q: tl.constexpr,
    N_KV: tl.constexpr,
):
    """Program (row, head) of a q|k|v projection: RoPE on q/k heads, then q -> q_ptr, k/v -> the
    cache rows (the epilogue of `_qkv_rope_kernel`, for a cuBLAS projection)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    row, head = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, HALF)
    src = qkv_ptr + row * stride_m + head * HEAD_DIM
    lo = tl.load(src + offs).to(tl.float32)
    hi = tl.load(src + HALF + offs).to(tl.float32)
    if head < N_Q + N_KV:
        cos = tl.load(cos_ptr + row * HEAD_DIM + offs)
        sin = tl.load(sin_ptr + row * HEAD_DIM + HALF + offs)
        lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
    if head < N_Q:
        base = q_ptr + row * stride_qm + head * HEAD_DIM
    else:
        cache_row = (row // T) * stride_cb + (row % T) * stride_ct
        if head < N_Q + N_KV:
            base = k_ptr + cache_row + (head - N_Q) * HEAD_DIM
        else:
            base = v_ptr + cache_row + (head - N_Q - N_KV) * HEAD_DIM
    dtype = q_ptr.dtype.element_ty
    tl.store(base + offs, _cast(lo, dtype))
    tl.store(base + HALF + offs, _cast(hi, dtype))


@triton.jit
def _geglu_kernel(x_ptr, out_ptr, stride_x, stride_o, F, BLOCK: tl.constexpr):
    """Program (row, block): gelu_tanh(gate) * up of a fused [gate | up] row, rounded like torch."""
    row, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    gate = tl.load(x_ptr + row * stride_x + offs, mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + F + offs, mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = _cast(_gelu_tanh(gate), dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _cast(act * up, dtype), mask)


# ----------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------

# Launch configurations (block sizes, K/key splits, warps, pipeline stages): the best of
# benchmarks/bench_kernels.py --sweep on an H200 at B=1 (the `*_batch` entries, which the
# dispatcher takes for batches of 2+, and the prefix attention: on an H100); split 0 = chosen from
# the shape.
CONFIG = {
    "qkv_rope": dict(bn=16, bk=64, warps=4, stages=4),
    # batches of 2+ (H100, us per layer): B=2 13.5 -> 8.9, B=4 19.3 -> 12.0, B=8 25.0 -> 15.9
    "qkv_rope_batch": dict(bm=64, bn=32, bk=64, warps=4, stages=3),
    "norm_geglu": dict(bn=32, bk=64, warps=4, stages=4),
    "linear_residual": dict(bn=32, bk=128, split=4, warps=4, stages=3),
    # merge: "last" (the last key split
    # to finish merges the tile) or "kernel" (a second, wider kernel merges).
    "mqa_attention": dict(br=16, bkv=128, split=4, warps=8, stages=2, merge="kernel"),
    # the same for batches of 2+ (the five-kernel expert path), H100, us per layer: B=2 19.5 ->
    # 15.1, B=4 34.5 -> 22.0, B=8 60.4 -> 40.9 (at B=1 these tiles measured 13.7 vs 11.2)
    "mqa_attention_batch": dict(br=32, bkv=64, split=4, warps=8, stages=2, merge="kernel"),
    # the prefix (816 x 8 rows; native ops only): 26.2 us per layer on an H100 (41.0 with 32-key
    # blocks and a mask tile per block; SDPA 63.2)
    "mqa_attention_long": dict(br=64, bkv=64, split=1, warps=4, stages=2, merge="last"),
}
# One persistent launch per expert layer (`decoder_layer`): the ops' tile sizes above, one warp
# count and pipeline depth for all phases (shared memory: the attention's key block is smaller).
CONFIG["decoder_layer"] = dict(
    qkv_bn=16, qkv_bk=64, geglu_bn=32, geglu_bk=64, lin_bn=32, lin_bk=128, o_split=4, d_split=4,
    br=16, bkv=32, a_split=4, rows=4, warps=4, stages=5,
)  # fmt: skip
ALL_PHASES = 63  # the layer kernel's six phases (CONFIG["decoder_layer"]["phases"]: time some)
MERGE_ROWS = 4  # rows per program of the merge kernel
_SCRATCH: Dict[Tuple[str, torch.device], torch.Tensor] = {}
_RETIRED = []  # outgrown buffers stay alive: CUDA graphs captured earlier still point at them


def _scratch(kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-device buffer that only grows. Counters start at zero and every kernel leaves them
    at zero; kernels on one stream never overlap, so one buffer of each kind is enough."""
    key = (kind, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _RETIRED.append(buf)
        buf = _SCRATCH[key] = torch.zeros(max(numel, 1), dtype=dtype, device=device)
    return buf


def _row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` columns."""
    return max(1, min(16, block // 256))


def _block_m(m: int, cfg: dict) -> int:
    """Row tile: `cfg["bm"]` if set, else every row in one tile up to 128 rows, else 128-row
    tiles. Smaller tiles mean more programs reading each weight slice (from L2 after the first)."""
    return cfg.get("bm") or min(128, max(16, triton.next_power_of_2(m)))


def _k_split(k: int, bk: int, split: int = 0) -> int:
    """K splits of a split-K GEMM: `split` (0: from K), lowered until K divides into them."""
    split = split or max(1, min(8, k // (4 * bk)))
    while k % (split * bk):
        split -= 1
    return split


def folded_weight(weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """W * (1 + norm_weight) over the input dim, rounded once to W's dtype; cached on the weight
    (rebuilt if either tensor changes). Normally built in warm-up, before any graph capture."""
    key = (id(norm_weight), norm_weight._version, weight._version, weight.data_ptr())
    cached = getattr(weight, "_flagscale_folded", None)
    if cached is None or cached[0] != key:
        folded = weight.float() * (1.0 + norm_weight.float())[None, :]
        cached = weight._flagscale_folded = (key, folded.to(weight.dtype))
    return cached[1]


def qkv_rope(
    x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out,
    config="qkv_rope",
):  # fmt: skip
    """x [B, T, W] -> q [B, T, H, Dh]; writes k, v [B, T, Hkv*Dh] into k_out / v_out (e.g. cache
    slices). cos / sin: [B, T, 1, Dh] fp32 from `rope_cos_sin` (sin signed). `config` names the
    CONFIG entry (launch parameters). norm_weight None: x is normalized already (no RMSNorm)."""
    b, t, width = x.shape
    m = b * t
    x2 = x.reshape(m, width)
    q = torch.empty(b, t, heads * head_dim, dtype=x.dtype, device=x.device)
    cfg = CONFIG[config]
    bm, bn, bk = _block_m(m, cfg), cfg["bn"], cfg["bk"]
    assert k_out.stride() == v_out.stride() and k_out.stride(-1) == 1 and x2.stride(-1) == 1
    assert cos.is_contiguous() and sin.is_contiguous() and (head_dim // 2) % bn == 0
    assert width % bk == 0
    w = weight if norm_weight is None else folded_weight(weight, norm_weight)
    grid = ((heads + 2 * kv_heads) * (head_dim // 2 // bn), triton.cdiv(m, bm))
    _qkv_rope_kernel[grid](
        x2, w, cos, sin, q, k_out, v_out, m, t, eps, x2.stride(0), w.stride(0), q.stride(1),
        k_out.stride(0), k_out.stride(1), K=width, HEAD_DIM=head_dim, N_Q=heads, N_KV=kv_heads,
        BM=bm, BN=bn, BK=bk, NORM=norm_weight is not None,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return q.view(b, t, heads, head_dim)


def norm_geglu(x, norm_weight, eps, weight):
    """x [..., W], weight [2F, W] (gate rows then up rows) -> gelu_tanh(gate) * up [..., F].
    norm_weight None: x is normalized already (no RMSNorm)."""
    width = x.shape[-1]
    x2 = x.reshape(-1, width)
    m, f = x2.shape[0], weight.shape[0] // 2
    out = torch.empty(m, f, dtype=x.dtype, device=x.device)
    cfg = CONFIG["norm_geglu"]
    bm, bn, bk = _block_m(m, cfg), cfg["bn"], cfg["bk"]
    assert f % bn == 0 and width % bk == 0 and x2.stride(-1) == 1
    w = weight if norm_weight is None else folded_weight(weight, norm_weight)
    grid = (f // bn, triton.cdiv(m, bm))
    _norm_geglu_kernel[grid](
        x2, w, out, m, f, eps, x2.stride(0), w.stride(0), out.stride(0), K=width, BM=bm, BN=bn,
        BK=bk, NORM=norm_weight is not None, num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return out.view(*x.shape[:-1], f)


def linear_residual(x, weight, residual, split=None, inplace=False, gate=None):
    """residual + x @ weight^T, x [..., K], weight [N, K], residual [..., N]; with `inplace`
    the result is written over residual where it reshapes to rows without a copy (each element
    is read before it is written, by the same program). Use the return value. `gate` [B, 1, N]
    (x [B, T, K]): residual + (x @ weight^T) * gate, rounded like the composed ops."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2, r2 = x.reshape(-1, k), residual.reshape(-1, n)
    m = x2.shape[0]
    out = r2 if inplace else torch.empty_like(r2)
    cfg = CONFIG["linear_residual"]
    bm, bn, bk = _block_m(m, cfg), cfg["bn"], cfg["bk"]
    split = _k_split(k, bk, split or cfg["split"])
    assert n % bn == 0 and k % (split * bk) == 0 and x2.stride(-1) == 1 and r2.stride(-1) == 1
    g = r2 if gate is None else gate  # r2: a placeholder pointer, never read without GATE
    assert g.stride(-1) == 1 and (gate is None or m % gate.shape[0] == 0)
    t = 1 if gate is None else m // gate.shape[0]
    grid = (n // bn, triton.cdiv(m, bm), split)
    tiles = grid[0] * grid[1]
    ws = _scratch("ws", tiles * split * bm * bn, torch.float32, x.device)
    count = _scratch("count", tiles, torch.int32, x.device)
    _linear_residual_kernel[grid](
        x2, weight, r2, out, ws, count, m, x2.stride(0), weight.stride(0), r2.stride(0),
        out.stride(0), g, t, g.stride(0), K=k, SPLIT=split, BM=bm, BN=bn, BK=bk,
        GATE=gate is not None, num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return out.view(residual.shape)


def linear_gated_residual(x, weight, residual, gate, inplace=False):
    """Pi0.5's gated residual, residual + (x @ W^T) * gate: `linear_residual` with the gate in
    its epilogue (x [B, T, K], residual [B, T, N], gate [B, 1, N] in x's dtype)."""
    return linear_residual(x, weight, residual, inplace=inplace, gate=gate)


def _long_linear(x, weight):
    """cuBLAS, or the FP8 GEMM where the weight carries an e4m3 copy (engine.precision=fp8)."""
    if fp8.has_fp8(weight):
        return fp8.linear(x, weight)
    return torch.nn.functional.linear(x, weight)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, K: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr):  # fmt: skip
    """One row per program: amax over the row, then x / scale rounded to e4m3 (two passes)."""
    row = tl.program_id(0)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
    tl.store(s_ptr + row, scale)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)


def quantize_rows(x2):
    """`fp8.quantize_rows` of a 2-D row-major tensor in one kernel: (e4m3 [M, K], fp32 [M, 1])."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=fp8.E4M3, device=x2.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    block = min(4096, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](
        x2, q, scale, x2.stride(0), q.stride(0), K=k, BLOCK=block, QMAX=fp8.E4M3_MAX,
        num_warps=_row_warps(block),
    )  # fmt: skip
    return q, scale


def rms_norm(x, weight, eps):
    """Gemma RMSNorm of the rows of x [..., D] in one kernel (fp32 math, one rounding)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, out, x2.stride(0), out.stride(0), eps, D=d, BLOCK=block,
        num_warps=_row_warps(block),
    )  # fmt: skip
    return out.view(x.shape)


def ada_rms_norm(x, scale, shift, eps):
    """Pi0.5's adaptive RMSNorm of x [B, T, D] with scale / shift [B, 1, D] (any float dtype,
    unit last stride) in one row kernel: fp32 math, one rounding."""
    b, t, d = x.shape
    x2 = x.reshape(-1, d)
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    assert scale.stride(-1) == 1 and shift.stride(-1) == 1 and x2.stride(-1) == 1
    _ada_rms_norm_kernel[(b * t,)](
        x2, scale, shift, out, t, x2.stride(0), scale.stride(0), shift.stride(0), out.stride(0),
        eps, D=d, BLOCK=block, num_warps=_row_warps(block),
    )  # fmt: skip
    return out.view(x.shape)


def ada_qkv_rope(
    x, scale, shift, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out,
    config="qkv_rope",
):  # fmt: skip
    """Pi0.5's `qkv_rope`: the adaptive RMSNorm kernel, then the projection + RoPE + K/V write
    kernel without its norm (two launches)."""
    h = ada_rms_norm(x, scale, shift, eps)
    args = (h, None, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out)
    return qkv_rope(*args, config=config)


def ada_norm_geglu(x, scale, shift, eps, weight):
    """Pi0.5's `norm_geglu`: the adaptive RMSNorm kernel, then gate|up + GeGLU without a norm."""
    return norm_geglu(ada_rms_norm(x, scale, shift, eps), None, eps, weight)


def add_layer_norm(x, y, weight, bias, eps):
    """(x + y, LayerNorm(x + y)) for x, y [..., D] in one row-wise kernel."""
    d = x.shape[-1]
    x2, y2 = x.reshape(-1, d), y.reshape(-1, d)
    total, out = torch.empty_like(x2), torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    _add_layer_norm_kernel[(x2.shape[0],)](
        x2, y2, weight, bias, total, out, x2.stride(0), y2.stride(0), total.stride(0),
        out.stride(0), eps, D=d, BLOCK=block, num_warps=_row_warps(block),
    )  # fmt: skip
    return total.view(x.shape), out.view(x.shape)


def long_qkv_rope(x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out):
    """`qkv_rope` for long inputs: RMSNorm kernel, cuBLAS projection, RoPE + scatter kernel."""
    b, t, _ = x.shape
    qkv = _long_linear(rms_norm(x, norm_weight, eps), weight).view(b * t, -1)
    q = torch.empty(b, t, heads * head_dim, dtype=x.dtype, device=x.device)
    assert k_out.stride() == v_out.stride() and k_out.stride(-1) == 1
    _rope_split_kernel[(b * t, heads + 2 * kv_heads)](
        qkv, cos, sin, q, k_out, v_out, t, qkv.stride(0), q.stride(1), k_out.stride(0),
        k_out.stride(1), HEAD_DIM=head_dim, N_Q=heads, N_KV=kv_heads, num_warps=1,
    )  # fmt: skip
    return q.view(b, t, heads, head_dim)


def long_norm_geglu(x, norm_weight, eps, weight):
    """`norm_geglu` for long inputs: RMSNorm kernel, cuBLAS gate|up, GeGLU kernel."""
    gate_up = _long_linear(rms_norm(x, norm_weight, eps), weight)
    g2 = gate_up.reshape(-1, gate_up.shape[-1])
    f = g2.shape[1] // 2
    out = torch.empty(g2.shape[0], f, dtype=x.dtype, device=x.device)
    block = 1024
    _geglu_kernel[(g2.shape[0], triton.cdiv(f, block))](
        g2, out, g2.stride(0), out.stride(0), f, BLOCK=block, num_warps=4
    )
    return out.view(*x.shape[:-1], f)


def long_linear_residual(x, weight, residual, inplace=False):
    """residual + x @ W^T in one cuBLAS call (beta = 1 epilogue; rounds once, not twice). Out of
    place, torch first copies residual into the output; `inplace` accumulates into it."""
    if fp8.has_fp8(weight):  # engine.precision=fp8: the bf16 product, then the sum
        out = fp8.linear(x, weight)
        return residual.add_(out) if inplace else residual + out
    k, n = x.shape[-1], weight.shape[0]
    r2 = residual.reshape(-1, n)
    if inplace and r2.data_ptr() == residual.data_ptr():
        return r2.addmm_(x.reshape(-1, k), weight.t()).view(residual.shape)
    return torch.addmm(r2, x.reshape(-1, k), weight.t()).view(residual.shape)


def long_linear_gelu(x, weight, bias):
    """gelu_tanh(x @ W^T + b) as one cuBLASLt call: the GELU (tanh approximation) runs in the
    GEMM's epilogue on the fp32 sum, rounded once (the composed ops round the sum, then the
    GELU): no separate pass over the [rows, mlp] activations."""
    if fp8.has_fp8(weight):  # engine.precision=fp8: GELU after the bf16 product
        return torch.nn.functional.gelu(fp8.linear(x, weight, bias), approximate="tanh")
    k, n = x.shape[-1], weight.shape[0]
    out = torch._addmm_activation(bias, x.reshape(-1, k), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], n)


def mqa_attention(q, k, v, mask=None, scale=None, split=None, config="mqa_attention"):
    """q [B, Lq, H, Dh], k/v [B, Lk, 1, Dh] (any batch/token/head strides, unit last stride),
    mask additive [B, 1 | Lq, Lk] -> [B, Lq, H*Dh]. fp32 logits and softmax, like
    `native.attention`. Programs split over rows and over keys (merged in-kernel, or by a second
    kernel); `config` names the CONFIG entry (launch parameters). A mask with one row for all
    queries (key padding: the prefix, the later denoising steps) is read as one vector per key
    block instead of a [rows, keys] tile."""
    b, lq, h, dh = q.shape
    lk = k.shape[1]
    scale = dh**-0.5 if scale is None else scale
    rows = lq * h
    cfg = CONFIG[config]
    br, bkv = cfg["br"], cfg["bkv"]
    split = split or cfg["split"] or max(1, min(8, triton.cdiv(lk, 2 * bkv)))
    merge_kernel = split > 1 and cfg.get("merge") == "kernel"
    out = torch.empty(b, lq, h * dh, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(rows, br), split, b)
    tiles = grid[0] * b
    ws = _scratch(
        "ws_attn", tiles * split * br * (dh + 2) if split > 1 else 1, torch.float32, q.device
    )
    count = _scratch("count_attn", tiles if split > 1 else 1, torch.int32, q.device)
    has_mask = mask is not None
    m = mask if has_mask else q
    stride_mq = (m.stride(1) if m.shape[1] > 1 else 0) if has_mask else 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert not has_mask or m.stride(-1) == 1
    _mqa_kernel[grid](
        q, k, v, m, out, ws, count, rows, h, scale, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), m.stride(0) if has_mask else 0,
        stride_mq, out.stride(0), LK=lk, HAS_MASK=has_mask, MASK_ROWS=stride_mq != 0, DH=dh,
        SPLIT=split, BR=br, BKV=bkv, MERGE_KERNEL=merge_kernel, num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )  # fmt: skip
    if merge_kernel:
        chunk = min(MERGE_ROWS, br)
        _mqa_merge_kernel[(grid[0] * (br // chunk), b)](
            ws, out, rows, out.stride(0), SPLIT=split, BR=br, DH=dh, ROWS=chunk, num_warps=4
        )
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def decoder_layer(x, weights, eps, cos, sin, cache_k, cache_v, start, mask, heads, head_dim):
    """One Gemma decoder layer in one persistent launch (see `_decoder_layer_kernel`).
    x [B, T, W]; weights = (input_norm, qkv, o_proj, ffw_norm, gate_up, down_proj) of the layer;
    cos / sin [B, T, 1, Dh] fp32; cache_k / cache_v [B, S, Dh] (one K/V head): the layer's k, v
    land in [:, start:start+T] and the attention reads [:, :start+T]; mask additive
    [B, 1 | T, start+T]. -> [B, T, W], equal to qkv_rope -> mqa_attention -> linear_residual ->
    norm_geglu -> linear_residual with the same configurations."""
    input_norm, w_qkv, w_o, ffw_norm, w_gu, w_down = weights
    b, t, width = x.shape
    m, f, qd = b * t, w_gu.shape[0] // 2, heads * head_dim
    cfg = CONFIG["decoder_layer"]
    bm, br, a_split = _block_m(m, cfg), cfg["br"], cfg["a_split"]
    lin_bn, lin_bk = cfg["lin_bn"], cfg["lin_bk"]
    o_split, d_split = _k_split(qd, lin_bk, cfg["o_split"]), _k_split(f, lin_bk, cfg["d_split"])
    assert width % lin_bn == 0 and width % cfg["qkv_bk"] == 0 and width % cfg["geglu_bk"] == 0
    assert (head_dim // 2) % cfg["qkv_bn"] == 0 and f % cfg["geglu_bn"] == 0 and x.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous()
    assert cache_k.stride() == cache_v.stride() and cache_k.stride(-1) == 1
    assert mask.stride(-1) == 1 and br % cfg["rows"] == 0
    new = dict(dtype=x.dtype, device=x.device)
    q, attn = torch.empty(m, qd, **new), torch.empty(m, qd, **new)
    h, out = torch.empty(m, width, **new), torch.empty(m, width, **new)
    act = torch.empty(m, f, **new)
    m_tiles, r_tiles = triton.cdiv(m, bm), triton.cdiv(t * heads, br)
    lin_tiles = (width // lin_bn) * m_tiles * max(o_split, d_split)
    ws = _scratch("ws", lin_tiles * bm * lin_bn, torch.float32, x.device)
    count = _scratch("count", lin_tiles, torch.int32, x.device)
    ws_attn = _scratch(
        "ws_attn", b * r_tiles * a_split * br * (head_dim + 2), torch.float32, x.device
    )
    bars = _scratch("barriers", N_BARRIERS.value, torch.int32, x.device)
    qkv_tiles = (heads + 2) * (head_dim // 2 // cfg["qkv_bn"]) * m_tiles
    merge_tiles = b * r_tiles * (br // cfg["rows"])
    geglu_tiles = (f // cfg["geglu_bn"]) * m_tiles
    tiles = max(qkv_tiles, b * r_tiles * a_split, merge_tiles, lin_tiles, geglu_tiles)
    nprog = 1 if _INTERPRET else min(tiles, _num_sms(x.device))  # all resident: no deadlock
    stride_mq = mask.stride(1) if mask.shape[1] > 1 else 0
    _decoder_layer_kernel[(nprog,)](
        x, q, attn, h, act, out,
        folded_weight(w_qkv, input_norm), w_o, folded_weight(w_gu, ffw_norm), w_down,
        cos, sin, cache_k, cache_v, mask, ws, count, ws_attn, bars,
        m, t, start, eps, head_dim**-0.5, cache_k.stride(0), cache_k.stride(1), mask.stride(0),
        stride_mq, W=width, F=f, HEAD_DIM=head_dim, N_Q=heads, LK=start + t, HAS_MASK=True,
        MASK_ROWS=stride_mq != 0, N_BATCH=b, M_TILES=m_tiles, R_TILES=r_tiles, NPROG=nprog,
        BM=bm, QKV_BN=cfg["qkv_bn"], QKV_BK=cfg["qkv_bk"], GEGLU_BN=cfg["geglu_bn"],
        GEGLU_BK=cfg["geglu_bk"], LIN_BN=lin_bn, LIN_BK=lin_bk, O_SPLIT=o_split, D_SPLIT=d_split,
        BR=br, BKV=cfg["bkv"], A_SPLIT=a_split, ROWS=cfg["rows"],
        PHASES=cfg.get("phases", ALL_PHASES), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return out.view(b, t, width)
