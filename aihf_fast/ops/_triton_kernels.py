"""Triton kernels behind ``aihf_fast.ops`` (imported lazily: only the Triton backend needs them).

Three kernels, all fp32 inside whatever the input dtype:
- ``_row_logprob_fwd_kernel``: one program per token row; online log-sum-exp over vocabulary
  tiles (Milakov & Gimelshein, arXiv 1805.02867) plus the target logit and optionally the
  entropy. Reads the logits once, writes 3 floats per token.
- ``_dlogits_kernel``: one program per (row, vocabulary tile); recomputes softmax from the saved
  log-sum-exp and writes d(loss)/d(logits) in the logits' dtype, in place when asked (the
  target column is formed in fp32 before rounding).
- ``_linear_lse_fwd_kernel``: fused ``hidden @ weight.T`` + online log-sum-exp; each program owns
  a block of tokens and a contiguous range ("split") of vocabulary tiles and writes per-split
  partial (max, sum-exp, target logit, entropy numerator); the logits never reach memory. For
  bf16/fp16 inputs the fp32 accumulator is rounded to the input dtype first, so the log-probs
  are those of the logits an LM head would output, and exactly consistent with the backward,
  which recomputes those logits with cuBLAS in the input dtype. Its schedules: tiles loaded by
  pointer (the default autotuning) or through TMA descriptors, one program per work item or
  persistent programs (``LINEAR_FWD_SCHEDULES``).
Offsets that can exceed 2**31 (row * stride for N x V logits) are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

# finite "minus infinity" (a constexpr: jit code may only read constexpr globals); keeps
# exp(m_old - m_new) free of inf - inf
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_logprob_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    ignore_index,
    inv_temp,
    BLOCK_V: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    base = logits_ptr + row * stride_row
    n_cols = tl.where(valid, V, 0)
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        if RETURN_ENTROPY:
            a = a * alpha + tl.sum(e * tl.where(mask, x, 0.0), axis=0)
        m = m_new
    s = tl.where(valid, s, 1.0)  # ignored rows: no NaN/inf even in dead lanes
    safe_label = tl.where(valid, label, 0)
    target = tl.load(base + safe_label).to(tl.float32) * inv_temp
    lse = m + tl.log(s)
    tl.store(logp_ptr + row, tl.where(valid, target - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, lse - a / s, 0.0))


@triton.jit
def _dlogits_kernel(
    logits_ptr,
    stride_in,
    out_ptr,
    stride_out,
    labels_ptr,
    lse_ptr,
    grad_logp_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    tile_pmax_ptr,
    V,
    col_offset,
    ignore_index,
    inv_temp,
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    WRITE_PMAX: tl.constexpr = False,
):
    """d/dz of g * logp + ge * H, with x = z / T, p = softmax(x):
    dlogp/dx_v = 1[v = y] - p_v;  dH/dx_v = p_v (lse - H - x_v);  then times 1/T.
    The V columns given may be a slice of the vocabulary starting at ``col_offset``: p only needs
    the saved full-vocabulary log-sum-exp. WRITE_PMAX: also the largest p of each (row, tile) into
    tile_pmax (rows x tiles, fp32; 0 on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    g = tl.where(valid, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0)
    lse = tl.load(lse_ptr + row)
    x = tl.load(logits_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
    p = tl.exp(x - lse)
    d = g * (tl.where(cols + col_offset == label, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        ge = tl.where(valid, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0)
        h = tl.load(entropy_ptr + row)
        d += ge * p * (lse - h - x)
    d = tl.where(valid, d * inv_temp, 0.0)
    tl.store(out_ptr + row * stride_out + cols, d.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_PMAX:
        pmax = tl.max(tl.where(mask, p, 0.0), axis=0)
        tl.store(tile_pmax_ptr + row * tl.num_programs(1) + tile, tl.where(valid, pmax, 0.0))


@triton.jit
def _linear_lse_fwd_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    w_ptr,
    stride_wv,
    stride_wk,
    x_desc,
    w_desc,
    labels_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_target_ptr,
    part_ent_ptr,
    M,
    V,
    K,
    inv_temp,
    cols_per_split,
    n_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
    DOT_UPCAST: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
):
    # Work items are (token block, vocabulary split) pairs, one per program, or with PERSISTENT a
    # fixed number of programs (about one per SM) that take every num_programs-th item in turn.
    # USE_TMA: the hidden and weight tiles come through TMA descriptors (x_desc: (M, K) in
    # [BLOCK_M, BLOCK_K] blocks, w_desc: (V, K) in [BLOCK_V, BLOCK_K] blocks; zero beyond the
    # edges) instead of pointer arithmetic; x_ptr / w_ptr are then unused (and the reverse).
    n_work = tl.cdiv(M, BLOCK_M) * n_splits
    if PERSISTENT:
        for work in tl.range(tl.program_id(0), n_work, tl.num_programs(0)):
            _lse_split(work, x_ptr, stride_xm, stride_xk, w_ptr, stride_wv, stride_wk, x_desc, w_desc, labels_ptr,
                       part_max_ptr, part_sum_ptr, part_target_ptr, part_ent_ptr, M, V, K, inv_temp, cols_per_split,
                       n_splits, BLOCK_M, BLOCK_V, BLOCK_K, RETURN_ENTROPY, INPUT_PRECISION, ROUND_LOGITS, GROUP_M,
                       DOT_UPCAST, USE_TMA)
    else:
        _lse_split(tl.program_id(0), x_ptr, stride_xm, stride_xk, w_ptr, stride_wv, stride_wk, x_desc, w_desc,
                   labels_ptr, part_max_ptr, part_sum_ptr, part_target_ptr, part_ent_ptr, M, V, K, inv_temp,
                   cols_per_split, n_splits, BLOCK_M, BLOCK_V, BLOCK_K, RETURN_ENTROPY, INPUT_PRECISION, ROUND_LOGITS,
                   GROUP_M, DOT_UPCAST, USE_TMA)


@triton.jit
def _lse_split(
    work, x_ptr, stride_xm, stride_xk, w_ptr, stride_wv, stride_wk, x_desc, w_desc, labels_ptr, part_max_ptr,
    part_sum_ptr, part_target_ptr, part_ent_ptr, M, V, K, inv_temp, cols_per_split, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr, GROUP_M: tl.constexpr, DOT_UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """One work item: the partial (max, sum-exp, target logit, entropy numerator) of a token block
    over a vocabulary split. Items are grouped: consecutive ones cover GROUP_M token blocks x all
    splits, so the programs resident together share GROUP_M hidden blocks and n_splits weight
    tiles in L2 (each weight tile is read from HBM once per group, each hidden block once per tile)."""
    n_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * n_splits
    first_m = (work // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    within = work % per_group
    pid_m = first_m + within % group_m
    pid_s = within // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m_i = tl.full((BLOCK_M,), _NEG_BIG, tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    t_i = tl.zeros((BLOCK_M,), tl.float32)
    a_i = tl.zeros((BLOCK_M,), tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_V)
    # cols_per_split is a multiple of every BLOCK_V tried, so splits hold whole tiles
    tile_lo = (pid_s * cols_per_split) // BLOCK_V
    tile_hi = tl.minimum(((pid_s + 1) * cols_per_split) // BLOCK_V, n_tiles)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wv
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k in range(0, K, BLOCK_K):
            if USE_TMA:
                a = x_desc.load([pid_m * BLOCK_M, k])
                b = w_desc.load([tile * BLOCK_V, k]).T
            else:
                ks = k + offs_k
                k_mask = ks < K
                ks64 = ks.to(tl.int64)
                a = tl.load(x_rows + ks64[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_cols + ks64[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_UPCAST:  # triton's CPU interpreter mis-multiplies bf16 tiles; products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        # logits as the LM head would output them (and as the backward recomputes them)
        if ROUND_LOGITS == 1:  # bf16, round to nearest even by bits (triton's CPU interpreter truncates casts)
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
        elif ROUND_LOGITS == 2:  # fp16
            acc = acc.to(tl.float16).to(tl.float32)
        x = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(x - m_new[:, None])
        s_i = s_i * alpha + tl.sum(e, axis=1)
        if RETURN_ENTROPY:
            a_i = a_i * alpha + tl.sum(e * tl.where(col_mask[None, :], x, 0.0), axis=1)
        t_i += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
        m_i = m_new
    out = pid_s * M + rows
    tl.store(part_max_ptr + out, m_i, mask=row_mask)
    tl.store(part_sum_ptr + out, s_i, mask=row_mask)
    tl.store(part_target_ptr + out, t_i, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(part_ent_ptr + out, a_i, mask=row_mask)


_LINEAR_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),  # fp32-sized
]



def _set_tma_blocks(nargs):
    """Autotune pre-hook: a TMA configuration's descriptors take its tile shape."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]


def _tma(block_m, block_v, block_k, warps, stages, persistent):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_K": block_k, "USE_TMA": True,
                          "PERSISTENT": persistent}, num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)


# Hopper schedules (TMA loads; persistent programs), opt-in with AIHF_FAST_LINEAR_TMA=1 on a GPU of
# compute capability >= 9 until measured there; AIHF_FAST_LINEAR_CONFIG indexes them after the
# configurations above. (Triton's automatic warp specialisation is Blackwell-only.)
_LINEAR_FWD_TMA_CONFIGS = [
    _tma(128, 128, 64, 8, 3, False),
    _tma(128, 256, 64, 8, 3, False),
    _tma(128, 128, 64, 8, 4, True),
    _tma(128, 256, 64, 8, 3, True),
    _tma(64, 128, 32, 4, 3, True),  # fp32-sized
]
LINEAR_FWD_SCHEDULES = _LINEAR_FWD_CONFIGS + _LINEAR_FWD_TMA_CONFIGS
_KEY = ["V", "K", "RETURN_ENTROPY", "INPUT_PRECISION", "ROUND_LOGITS"]

# GPU entry points: pick the schedule by measurement, once per (V, K, dtype, entropy) key.
_linear_lse_fwd_kernel_autotuned = triton.autotune(configs=_LINEAR_FWD_CONFIGS, key=_KEY)(_linear_lse_fwd_kernel)
_linear_lse_fwd_kernel_autotuned_tma = triton.autotune(configs=LINEAR_FWD_SCHEDULES, key=_KEY)(_linear_lse_fwd_kernel)
