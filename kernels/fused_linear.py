"""Fused-linear distillation loss (Triton): logits tiles formed with ``tl.dot``, never stored.

Student logits s = softcap(h_s W_s^T + b_s) and teacher logits t = softcap(h_t W_t^T + b_t) are
formed tile by tile, [BLOCK_N tokens, BLOCK_V vocabulary entries], with an fp32 accumulator (an
fp32 dot for fp32 inputs, a bf16/fp16 dot with fp32 accumulation otherwise: never a round trip of
the logits through bf16), softcap(z) = c tanh(z / c). The math per row is that of
``kernels/distill_loss.py`` with a = s / T, b = t / T:

- ``_fused_linear_stats_kernel`` (pass 1): grid (token blocks, vocabulary splits). Each program
  streams the vocabulary tiles j = split, split + SPLITS, ... of its token block and keeps, per
  row, the online log-sum-exp pairs (m, d = sum e^(x - m)) of a, b and (cross-entropy at T != 1)
  the raw s, the rescaled forward/reverse-KL sum S or R, and the label's logit. It writes these
  partial statistics [8, SPLITS, N] (fp64); the caller merges the splits (a few [SPLITS, N] torch
  ops) into the loss and the row statistics {m_a, ld_a, m_b, ld_b, m_s, ld_s, aux}.
- ``_fused_linear_jsd_kernel`` (pass 2, interior-beta JSD only): the same sweep once more, now
  with the final log-normalizers, for KL(p||M) and KL(q||M), M = beta p + (1 - beta) q.
- ``_fused_linear_bwd_kernel`` (the last pass): grid (token blocks, vocabulary tiles). Each
  program recomputes its two logits tiles, forms g = dL/dz for the tile (the logits loss gradient
  times the softcap derivative 1 - (s/c)^2, times the per-row grad_output) and pushes it straight
  into grad_h += g W and grad_W += g^T h (and grad_b += sum_rows g) with fp32 atomic adds, one
  [BLOCK_N, BLOCK_K] / [BLOCK_V, BLOCK_K] product per step over the hidden size.

When the teacher shares the student's weight, one loop over the hidden size loads each weight
tile once for both dot products, and no teacher weight gradient exists anywhere. Rows whose label
is ``ignore_index`` load zeros for their hidden states (NaN there is never read) and get exactly
zero gradient. With ``eps`` (gradient filtering, off by default) a backward tile whose every
|dl_i/dz_ij| (row loss i, before grad_output) is at most eps is skipped, as cut-cross-entropy does.

Every arithmetic step is guarded so that -inf (masked vocabulary columns) never forms
(-inf) - (-inf).

Cost: pass 1 and the gradient pass each form both logits tiles (2 N V H multiply-adds per
model); the gradient pass adds the two gradient products and moves (BLOCK_N + BLOCK_V) H fp32
atomic adds per tile. The GPU block sizes of :func:`default_blocks` are a starting point, not a
tuned choice; gradient filtering is what skips a tile's products and atomics.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .distill_loss import _logaddexp, _shift

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
NUM_PARTIALS = 8  # m_a, d_a, m_b, d_b, m_r, d_r, acc (S or R), label logit
NUM_STATS = 7  # m_a, ld_a, m_b, ld_b, m_s, ld_s, aux (as in distill_loss)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _new_empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffers the kernels must fill entirely (tests poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Tile helpers.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|)) with sign; expm1 by Kahan's log trick, so
    that small |x| keeps its relative accuracy; +-1 at +-inf, no NaN formed."""
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    den = tl.where((u == 1.0) | (u == 0.0), 1.0, tl.log(u))
    em = tl.where(u == 1.0, y, tl.where(u == 0.0, -1.0, (u - 1.0) * (y / den)))
    t = -em / (2.0 + em)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _dot_nt(x, w, acc, DOT_FP32: tl.constexpr):
    """acc + x @ w^T for x [M, K], w [V, K]: fp32 operands (exact fp32) or bf16/fp16 operands,
    always with fp32 accumulation."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _logit_tiles(
    hs_ptr,  # [N, H_s] student hidden states, row stride hs_stride
    ws_ptr,  # [V, H_s] student weight, row stride ws_stride
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, H_t] teacher hidden states, row stride ht_stride
    wt_ptr,  # [V, H_t] teacher weight (first V rows), row stride wt_stride; unused when SHARED
    bt_ptr,  # [V] teacher bias (read when HAS_BT)
    hs_stride,
    ws_stride,
    ht_stride,
    wt_stride,
    rows,  # [BLOCK_N] int64 row indices
    row_ok,  # [BLOCK_N] rows that are read (in range and not ignored)
    cols,  # [BLOCK_V] vocabulary indices
    col_ok,  # [BLOCK_V] cols < V
    H_s,
    H_t,
    cap,  # softcap c
    SHARED: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 student and teacher logits tiles [BLOCK_N, BLOCK_V] (softcapped; finite in the
    masked lanes, which the caller masks)."""
    ks = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H_s, BLOCK_K):
        k = k0 + ks
        k_ok = k < H_s
        w = tl.load(
            ws_ptr + cols[:, None] * ws_stride + k[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        h = tl.load(
            hs_ptr + rows[:, None] * hs_stride + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        s = _dot_nt(h, w, s, DOT_FP32)
        if SHARED:  # one weight tile load serves both dot products
            ht = tl.load(
                ht_ptr + rows[:, None] * ht_stride + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            t = _dot_nt(ht, w, t, DOT_FP32)
    if not SHARED:
        for k0 in range(0, H_t, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_t
            w = tl.load(
                wt_ptr + cols[:, None] * wt_stride + k[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            ht = tl.load(
                ht_ptr + rows[:, None] * ht_stride + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            t = _dot_nt(ht, w, t, DOT_FP32)
    if HAS_BS:
        s += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BT:
        t += tl.load(bt_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        s = cap * _tanh(s / cap)
        t = cap * _tanh(t / cap)
    return s, t


@triton.jit
def _row_state(labels_ptr, pid_n, N, ignore_index, HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices of a token block, in-range mask, labels and the mask of rows that count."""
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index)
        row_ok = row_in & (label != ignore_index)
    else:
        label = tl.zeros([BLOCK_N], dtype=tl.int64)
        row_ok = row_in
    return rows, row_in, label, row_ok


# ------------------------------------------------------------------------------------------------
# Pass 1: online row statistics.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_stats_kernel(
    hs_ptr,  # [N, H_s] student hidden states
    ws_ptr,  # [V, H_s] student weight
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, H_t] teacher hidden states
    wt_ptr,  # [>=V, H_t] teacher weight (read when not SHARED)
    bt_ptr,  # [>=V] teacher bias (read when HAS_BT)
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    part_ptr,  # [8, SPLITS, N] fp64 partial statistics of this split
    hs_stride,
    ws_stride,
    ht_stride,
    wt_stride,
    N,
    V,
    H_s,
    H_t,
    inv_t,  # 1 / T
    cap,  # softcap c
    ignore_index,
    DIVERGENCE: tl.constexpr,  # FORWARD_KL | REVERSE_KL | JSD
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # the label logit is needed
    RAW_LSE: tl.constexpr,  # HAS_CE and T != 1: the LSE of the raw student logits too
    SHARED: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows, row_in, label, row_ok = _row_state(
        labels_ptr, pid_n, N, ignore_index, HAS_LABELS, BLOCK_N
    )
    # Running maxima in fp32; running sums of per-tile fp32 tree sums in fp64.
    m_a = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    m_b = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    m_r = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    d_a = tl.zeros([BLOCK_N], dtype=tl.float64)
    d_b = tl.zeros([BLOCK_N], dtype=tl.float64)
    d_r = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    s_lab = tl.zeros([BLOCK_N], dtype=tl.float64)
    n_tiles = tl.cdiv(V, BLOCK_V)
    for j in range(split, n_tiles, n_splits):
        cols = (j * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        s, t = _logit_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
            hs_stride, ws_stride, ht_stride, wt_stride,
            rows, row_ok, cols, col_ok, H_s, H_t, cap,
            SHARED, HAS_BS, HAS_BT, SOFTCAP, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        r = tl.where(col_ok[None, :], s, float("-inf"))
        a = r * inv_t
        b = tl.where(col_ok[None, :], t, float("-inf")) * inv_t
        new_a = tl.maximum(m_a, tl.max(a, axis=1))
        new_b = tl.maximum(m_b, tl.max(b, axis=1))
        sh_a = _shift(new_a)
        sh_b = _shift(new_b)
        e_a = tl.exp(a - sh_a[:, None])
        e_b = tl.exp(b - sh_b[:, None])
        c_a = tl.exp(m_a - sh_a).to(tl.float64)
        c_b = tl.exp(m_b - sh_b).to(tl.float64)
        d_a = d_a * c_a + tl.sum(e_a, axis=1).to(tl.float64)
        d_b = d_b * c_b + tl.sum(e_b, axis=1).to(tl.float64)
        if DIVERGENCE == 0:
            live = b > float("-inf")
            diff = tl.where(live, b, 0.0) - tl.where(live, a, 0.0)
            acc = acc * c_b + tl.sum(e_b * diff, axis=1).to(tl.float64)
        elif DIVERGENCE == 1:
            live = a > float("-inf")
            diff = tl.where(live, a, 0.0) - tl.where(live, b, 0.0)
            acc = acc * c_a + tl.sum(e_a * diff, axis=1).to(tl.float64)
        if RAW_LSE:
            new_r = tl.maximum(m_r, tl.max(r, axis=1))
            sh_r = _shift(new_r)
            c_r = tl.exp(m_r - sh_r).to(tl.float64)
            d_r = d_r * c_r + tl.sum(tl.exp(r - sh_r[:, None]), axis=1).to(tl.float64)
            m_r = new_r
        if HAS_CE:
            hit = cols[None, :] == label[:, None]
            s_lab += tl.sum(tl.where(hit, s, 0.0), axis=1).to(tl.float64)
        m_a = new_a
        m_b = new_b
    out = part_ptr + split.to(tl.int64) * N + rows
    stride = n_splits.to(tl.int64) * N
    tl.store(out, m_a.to(tl.float64), mask=row_in)
    tl.store(out + stride, d_a, mask=row_in)
    tl.store(out + 2 * stride, m_b.to(tl.float64), mask=row_in)
    tl.store(out + 3 * stride, d_b, mask=row_in)
    tl.store(out + 4 * stride, m_r.to(tl.float64), mask=row_in)
    tl.store(out + 5 * stride, d_r, mask=row_in)
    tl.store(out + 6 * stride, acc, mask=row_in)
    tl.store(out + 7 * stride, s_lab, mask=row_in)


# ------------------------------------------------------------------------------------------------
# Pass 2 (interior-beta JSD): KL(p||M) and KL(q||M) with the final log-normalizers.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_jsd_kernel(
    hs_ptr,  # [N, H_s] student hidden states
    ws_ptr,  # [V, H_s] student weight
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, H_t] teacher hidden states
    wt_ptr,  # [>=V, H_t] teacher weight (read when not SHARED)
    bt_ptr,  # [>=V] teacher bias (read when HAS_BT)
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    stats_ptr,  # [N, 7] fp32 row statistics (m_a, ld_a, m_b, ld_b used)
    part_ptr,  # [2, SPLITS, N] fp64 partial KL(p||M), KL(q||M) of this split
    hs_stride,
    ws_stride,
    ht_stride,
    wt_stride,
    N,
    V,
    H_s,
    H_t,
    inv_t,
    cap,
    log_beta,  # log(beta)
    log_1mbeta,  # log(1 - beta)
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows, row_in, label, row_ok = _row_state(
        labels_ptr, pid_n, N, ignore_index, HAS_LABELS, BLOCK_N
    )
    st = stats_ptr + rows * 7
    m_a = tl.load(st + 0, mask=row_in, other=0.0)
    ld_a = tl.load(st + 1, mask=row_in, other=0.0)
    m_b = tl.load(st + 2, mask=row_in, other=0.0)
    ld_b = tl.load(st + 3, mask=row_in, other=0.0)
    kl_pm = tl.zeros([BLOCK_N], dtype=tl.float64)
    kl_qm = tl.zeros([BLOCK_N], dtype=tl.float64)
    n_tiles = tl.cdiv(V, BLOCK_V)
    for j in range(split, n_tiles, n_splits):
        cols = (j * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        s, t = _logit_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
            hs_stride, ws_stride, ht_stride, wt_stride,
            rows, row_ok, cols, col_ok, H_s, H_t, cap,
            SHARED, HAS_BS, HAS_BT, SOFTCAP, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        lq = (tl.where(col_ok[None, :], s, float("-inf")) * inv_t - m_a[:, None]) - ld_a[:, None]
        lp = (tl.where(col_ok[None, :], t, float("-inf")) * inv_t - m_b[:, None]) - ld_b[:, None]
        q = tl.exp(lq)
        p = tl.exp(lp)
        lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
        p_live = p > 0.0
        q_live = q > 0.0
        t_pm = p * (tl.where(p_live, lp, 0.0) - tl.where(p_live, lm, 0.0))
        t_qm = q * (tl.where(q_live, lq, 0.0) - tl.where(q_live, lm, 0.0))
        kl_pm += tl.sum(t_pm, axis=1).to(tl.float64)
        kl_qm += tl.sum(t_qm, axis=1).to(tl.float64)
    out = part_ptr + split.to(tl.int64) * N + rows
    tl.store(out, kl_pm, mask=row_in)
    tl.store(out + n_splits.to(tl.int64) * N, kl_qm, mask=row_in)


# ------------------------------------------------------------------------------------------------
# Last pass: g = dL/dz per tile, pushed into grad_h, grad_W and grad_b.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_bwd_kernel(
    hs_ptr,  # [N, H_s] student hidden states
    ws_ptr,  # [V, H_s] student weight
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, H_t] teacher hidden states
    wt_ptr,  # [>=V, H_t] teacher weight (read when not SHARED)
    bt_ptr,  # [>=V] teacher bias (read when HAS_BT)
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    stats_ptr,  # [N, 7] fp32 row statistics from the forward passes
    grad_rows_ptr,  # [N] fp32 dL/d(row loss)
    gh_ptr,  # [N, H_s] fp32 grad of the student hidden states (atomic adds; when NEED_GH)
    gw_ptr,  # [V, H_s] fp32 grad of the student weight (atomic adds; when NEED_GW)
    gb_ptr,  # [V] fp32 grad of the student bias (atomic adds; when NEED_GB)
    hs_stride,
    ws_stride,
    ht_stride,
    wt_stride,
    N,
    V,
    H_s,
    H_t,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    div_scale,  # weight of the divergence in the row loss
    ce_scale,  # weight of the cross-entropy term
    cap,
    eps,  # gradient-filter threshold (read when FILTER)
    ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    NEED_GH: tl.constexpr,
    NEED_GW: tl.constexpr,
    NEED_GB: tl.constexpr,
    FILTER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows, row_in, label, row_ok = _row_state(
        labels_ptr, pid_n, N, ignore_index, HAS_LABELS, BLOCK_N
    )
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    s, t = _logit_tiles(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
        hs_stride, ws_stride, ht_stride, wt_stride,
        rows, row_ok, cols, col_ok, H_s, H_t, cap,
        SHARED, HAS_BS, HAS_BT, SOFTCAP, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    st = stats_ptr + rows * 7
    m_a = tl.load(st + 0, mask=row_ok, other=0.0)[:, None]
    ld_a = tl.load(st + 1, mask=row_ok, other=0.0)[:, None]
    m_b = tl.load(st + 2, mask=row_ok, other=0.0)[:, None]
    ld_b = tl.load(st + 3, mask=row_ok, other=0.0)[:, None]
    aux = tl.load(st + 6, mask=row_ok, other=0.0)[:, None]
    go = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0)
    r = tl.where(col_ok[None, :], s, float("-inf"))
    lq = (r * inv_t - m_a) - ld_a
    lp = (tl.where(col_ok[None, :], t, float("-inf")) * inv_t - m_b) - ld_b
    q = tl.exp(lq)
    if DIVERGENCE == 0:
        gd = q - tl.exp(lp)
    elif DIVERGENCE == 1:
        live = q > 0.0
        gd = q * ((tl.where(live, lq, 0.0) - tl.where(live, lp, 0.0)) - aux)
    else:
        lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
        live = q > 0.0
        gd = (1.0 - beta) * q * ((tl.where(live, lq, 0.0) - tl.where(live, lm, 0.0)) - aux)
    g = (div_scale * inv_t) * gd
    if HAS_CE:
        m_r = tl.load(st + 4, mask=row_ok, other=0.0)[:, None]
        ld_r = tl.load(st + 5, mask=row_ok, other=0.0)[:, None]
        onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        g += ce_scale * (tl.exp((r - m_r) - ld_r) - onehot)
        bad_label = (label < 0) | (label >= V)
        g = tl.where(bad_label[:, None], float("nan"), g)
    if SOFTCAP:  # d softcap(z) / dz = 1 - (s / c)^2
        u = s / cap
        g = g * (1.0 - u * u)
    # A select, not a product: nothing of an ignored row or a padding column survives.
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    keep = True
    if FILTER:
        keep = tl.max(tl.max(tl.abs(g), axis=1), axis=0) > eps
    if keep:
        g = g * go[:, None]
        if NEED_GB:
            tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok)
        if DOT_FP32:
            g_op = g
        else:
            g_op = g.to(ws_ptr.dtype.element_ty)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, H_s, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_s
            if NEED_GH:
                w = tl.load(
                    ws_ptr + cols[:, None] * ws_stride + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    gh = tl.dot(g_op, w.to(tl.float32), input_precision="ieee")
                else:
                    gh = tl.dot(g_op, w)
                tl.atomic_add(
                    gh_ptr + rows[:, None] * H_s + k[None, :],
                    gh,
                    mask=row_ok[:, None] & k_ok[None, :],
                )
            if NEED_GW:
                h = tl.load(
                    hs_ptr + rows[:, None] * hs_stride + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    gw = tl.dot(tl.trans(g_op), h.to(tl.float32), input_precision="ieee")
                else:
                    gw = tl.dot(tl.trans(g_op), h)
                tl.atomic_add(
                    gw_ptr + cols[:, None] * H_s + k[None, :],
                    gw,
                    mask=col_ok[:, None] & k_ok[None, :],
                )


# ------------------------------------------------------------------------------------------------
# Launchers.
# ------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K): tensor-core tiles on a GPU, small ones under the interpreter."""
    if device.type == "cuda" and not _interpreting():
        return 64, 128, 64
    return 16, 64, 16


def _dot_fp32(dtype: torch.dtype) -> bool:
    # bf16/fp16 tl.dot is not implemented by the interpreter: there the operands are upcast.
    return dtype == torch.float32 or _interpreting()


def _mix_logs(beta: float) -> tuple[float, float]:
    if 0.0 < beta < 1.0:
        return math.log(beta), math.log1p(-beta)
    return 0.0, 0.0


def _splits(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits of pass 1: enough programs to fill the device (2 per SM)."""
    if device.type == "cuda" and not _interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, triton.cdiv(2 * sms, n_blocks)))
    return min(n_tiles, 2)


def _check(hs, ws, bs, ht, wt, bt, labels) -> None:
    for name, x in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
                    ("teacher_weight", wt)):  # fmt: skip
        if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
            raise ValueError(f"{name} must be 2-D with a unit column stride")
        if x.dtype not in _DTYPES:
            raise TypeError(f"the triton backend takes fp32/bf16/fp16 tensors, {name} is {x.dtype}")
    if hs.dtype != ws.dtype or ht.dtype != wt.dtype:
        raise TypeError("hidden states and weight of one model must share a dtype")
    for b in (bs, bt):
        if b is not None and (b.dim() != 1 or b.stride(0) != 1):
            raise ValueError("biases must be contiguous 1-D tensors")
    if labels is not None and (
        labels.dtype != torch.int64 or labels.shape != (hs.shape[0],) or labels.stride(0) != 1
    ):
        raise ValueError("labels must be a contiguous int64 tensor of shape [N]")


def _common(hs, ws, bs, ht, wt, bt, shared, softcap, blocks):
    """Pointer/stride arguments and compile-time flags shared by the three kernels."""
    block_n, block_v, block_k = blocks or default_blocks(hs.device)
    args = (hs, ws, bs if bs is not None else ws, ht, wt, bt if bt is not None else wt)
    strides = (hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0))
    flags = dict(
        SHARED=shared,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        SOFTCAP=softcap is not None,
        DOT_FP32=_dot_fp32(hs.dtype) or _dot_fp32(ht.dtype),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
    )
    return args, strides, flags


def fused_linear_fwd(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab: int,
    shared: bool,
    divergence: int,
    temperature: float,
    softcap: float | None,
    has_ce: bool,
    ignore_index: int,
    blocks: tuple[int, int, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Pass 1: partial row statistics [8, SPLITS, N] (fp64) over vocabulary splits.

    Rows 0..7 of the first dimension: m_a, d_a, m_b, d_b, m_s, d_s (online log-sum-exp pairs of
    a = s/T, b = t/T and the raw s), the forward/reverse-KL sum S or R (scaled with m_b or m_a),
    and the label's logit (0 in the splits that do not hold it).
    """
    _check(hs, ws, bs, ht, wt, bt, labels)
    n = hs.shape[0]
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, shared, softcap, blocks)
    n_blocks = triton.cdiv(n, flags["BLOCK_N"])
    n_tiles = triton.cdiv(vocab, flags["BLOCK_V"])
    splits = max(1, min(splits or _splits(n_blocks, n_tiles, hs.device), n_tiles))
    part = _new_empty((NUM_PARTIALS, splits, n), torch.float64, hs.device)
    if n == 0:
        return part
    _fused_linear_stats_kernel[(n_blocks, splits)](
        *args,
        labels if labels is not None else part,
        part,
        *strides,
        n,
        vocab,
        hs.shape[1],
        ht.shape[1],
        1.0 / temperature,
        float(softcap or 1.0),
        ignore_index,
        DIVERGENCE=divergence,
        HAS_LABELS=labels is not None,
        HAS_CE=has_ce,
        RAW_LSE=has_ce and temperature != 1.0,
        num_warps=8 if flags["BLOCK_N"] * flags["BLOCK_V"] >= 8192 else 4,
        **flags,
    )
    return part


def fused_linear_jsd(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    vocab: int,
    shared: bool,
    beta: float,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    blocks: tuple[int, int, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Pass 2 of interior-beta JSD: partial KL(p||M), KL(q||M) [2, SPLITS, N] (fp64)."""
    _check(hs, ws, bs, ht, wt, bt, labels)
    n = hs.shape[0]
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, shared, softcap, blocks)
    n_blocks = triton.cdiv(n, flags["BLOCK_N"])
    n_tiles = triton.cdiv(vocab, flags["BLOCK_V"])
    splits = max(1, min(splits or _splits(n_blocks, n_tiles, hs.device), n_tiles))
    part = _new_empty((2, splits, n), torch.float64, hs.device)
    if n == 0:
        return part
    log_beta, log_1mbeta = _mix_logs(beta)
    _fused_linear_jsd_kernel[(n_blocks, splits)](
        *args,
        labels if labels is not None else part,
        stats,
        part,
        *strides,
        n,
        vocab,
        hs.shape[1],
        ht.shape[1],
        1.0 / temperature,
        float(softcap or 1.0),
        log_beta,
        log_1mbeta,
        ignore_index,
        HAS_LABELS=labels is not None,
        num_warps=8 if flags["BLOCK_N"] * flags["BLOCK_V"] >= 8192 else 4,
        **flags,
    )
    return part


def fused_linear_bwd(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    vocab: int,
    shared: bool,
    divergence: int,
    beta: float,
    temperature: float,
    div_scale: float,
    ce_scale: float,
    softcap: float | None,
    ignore_index: int,
    need: tuple[bool, bool, bool],
    eps: float | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradient pass: fp32 (grad_h [N, H_s], grad_W [V, H_s], grad_b [V]), each None where
    ``need`` says so. The buffers are zero-filled and accumulated with atomic adds (the order of
    the additions, hence the last bits, varies from run to run)."""
    _check(hs, ws, bs, ht, wt, bt, labels)
    n, h_s = hs.shape
    dev = hs.device
    f32 = torch.float32
    need_gh, need_gw, need_gb = need
    gh = torch.zeros((n, h_s), dtype=f32, device=dev) if need_gh else None
    gw = torch.zeros((vocab, h_s), dtype=f32, device=dev) if need_gw else None
    gb = torch.zeros((vocab,), dtype=f32, device=dev) if need_gb else None
    if n == 0 or not any(need):
        return gh, gw, gb
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, shared, softcap, blocks)
    log_beta, log_1mbeta = _mix_logs(beta)
    dummy = stats
    grid = (triton.cdiv(n, flags["BLOCK_N"]), triton.cdiv(vocab, flags["BLOCK_V"]))
    _fused_linear_bwd_kernel[grid](
        *args,
        labels if labels is not None else dummy,
        stats,
        grad_rows,
        gh if gh is not None else dummy,
        gw if gw is not None else dummy,
        gb if gb is not None else dummy,
        *strides,
        n,
        vocab,
        h_s,
        ht.shape[1],
        1.0 / temperature,
        beta,
        log_beta,
        log_1mbeta,
        div_scale,
        ce_scale,
        float(softcap or 1.0),
        float(eps or 0.0),
        ignore_index,
        DIVERGENCE=divergence,
        HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and ce_scale != 0.0,
        NEED_GH=need_gh,
        NEED_GW=need_gw,
        NEED_GB=need_gb,
        FILTER=eps is not None,
        num_warps=8 if flags["BLOCK_N"] * flags["BLOCK_V"] >= 8192 else 4,
        **flags,
    )
    return gh, gw, gb
