"""Tile helpers of the fused-linear kernels: logits tiles from hidden states and weights, the
row state of a token block, and the gradient dL/dz of one [BLOCK_N, BLOCK_V] tile.

Shared by the three passes of ``kernels/fused_linear.py``; the per-entry math comes from
``kernels/_online.py`` (the same as the logits loss's).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._online import _ce_grad, _div_grad


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
def _load_tile(ptr, idx, idx_ok, stride, k, k_ok):
    """The [len(idx), len(k)] tile ptr[idx, k] of a row-major matrix (row stride ``stride``),
    zero outside idx_ok x k_ok."""
    return tl.load(
        ptr + idx[:, None] * stride + k[None, :], mask=idx_ok[:, None] & k_ok[None, :], other=0.0
    )


@triton.jit
def _dot(x, y, acc, DOT_FP32: tl.constexpr):
    """acc + x @ y: fp32 operands (exact fp32) or bf16/fp16 operands, fp32 accumulation."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc)


@triton.jit
def _logit_tiles(
    ops,  # the linear layers' operands (hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    # hs_stride, ws_stride, ht_stride, wt_stride): hs_ptr [N, H_s] student hidden states,
    # ws_ptr [V, H_s] student weight, bs_ptr [V] student bias (read when HAS_BS), ht_ptr [N, H_t]
    # teacher hidden states, wt_ptr [>=V, H_t] teacher weight (unused when SHARED), bt_ptr [>=V]
    # teacher bias (read when HAS_BT); row strides, unit column strides
    rows,  # [BLOCK_N] int64 row indices
    row_ok,  # [BLOCK_N] rows that are read (in range and not ignored)
    j,  # vocabulary tile index: columns j * BLOCK_V + [0, BLOCK_V)
    V,
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
    """The fp32 student and teacher logits tiles [BLOCK_N, BLOCK_V] of vocabulary tile j
    (softcapped; finite in the masked lanes, which the caller masks), its column indices and
    their mask cols < V."""
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_stride, ws_stride, ht_stride, wt_stride = ops
    cols = (j * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # j * BLOCK_V < V: no overflow
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H_s, BLOCK_K):
        k = k0 + ks
        k_ok = k < H_s
        w = _load_tile(ws_ptr, cols, col_ok, ws_stride, k, k_ok)
        s = _dot(_load_tile(hs_ptr, rows, row_ok, hs_stride, k, k_ok), tl.trans(w), s, DOT_FP32)
        if SHARED:  # one weight tile load serves both dot products
            ht = _load_tile(ht_ptr, rows, row_ok, ht_stride, k, k_ok)
            t = _dot(ht, tl.trans(w), t, DOT_FP32)
    if not SHARED:
        for k0 in range(0, H_t, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_t
            w = _load_tile(wt_ptr, cols, col_ok, wt_stride, k, k_ok)
            ht = _load_tile(ht_ptr, rows, row_ok, ht_stride, k, k_ok)
            t = _dot(ht, tl.trans(w), t, DOT_FP32)
    if HAS_BS:
        s += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BT:
        t += tl.load(bt_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        s = cap * _tanh(s / cap)
        t = cap * _tanh(t / cap)
    return s, t, cols, col_ok


@triton.jit
def _scaled_tiles(
    ops, rows, row_ok, j, V, H_s, H_t, inv_t, cap,
    SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The tiles of _logit_tiles (same arguments, and inv_t = 1 / T) as the statistics passes
    read them: s, r = s with -inf in the padding columns, a = r / T, b = t / T with -inf in the
    padding columns, the column indices and their mask."""
    s, t, cols, col_ok = _logit_tiles(
        ops, rows, row_ok, j, V, H_s, H_t, cap, SHARED, HAS_BS, HAS_BT, SOFTCAP, DOT_FP32,
        BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    r = tl.where(col_ok[None, :], s, float("-inf"))
    a = r * inv_t
    b = tl.where(col_ok[None, :], t, float("-inf")) * inv_t
    return s, r, a, b, cols, col_ok


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


@triton.jit
def _row_lse(stats_ptr, rows, mask):
    """m_a, ld_a, m_b, ld_b of the rows (stats_ptr [N, 7]) as [BLOCK_N, 1] columns, 0 where
    mask is False."""
    st = stats_ptr + rows * 7
    m_a = tl.load(st + 0, mask=mask, other=0.0)[:, None]
    ld_a = tl.load(st + 1, mask=mask, other=0.0)[:, None]
    m_b = tl.load(st + 2, mask=mask, other=0.0)[:, None]
    ld_b = tl.load(st + 3, mask=mask, other=0.0)[:, None]
    return m_a, ld_a, m_b, ld_b


@triton.jit
def _grad_tile(
    s, t, stats_ptr, grad_rows_ptr, rows, row_ok, label, cols, col_ok, V, inv_t, beta,
    log_beta, log_1mbeta, div_scale, ce_scale, cap, eps,
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
):  # fmt: skip
    """g = dL/dz of a tile [BLOCK_N, BLOCK_V] from its logits tiles s, t (fp32): the logits loss
    gradient times the softcap derivative, times the rows' grad_output; exactly 0 on ignored
    rows and padding columns, and on the whole tile when FILTER finds every |dl/dz| <= eps.
    Returns (g, keep): keep is False for a filtered tile."""
    st = stats_ptr + rows * 7
    m_a, ld_a, m_b, ld_b = _row_lse(stats_ptr, rows, row_ok)
    aux = tl.load(st + 6, mask=row_ok, other=0.0)[:, None]
    go = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0)
    r = tl.where(col_ok[None, :], s, float("-inf"))
    lq = (r * inv_t - m_a) - ld_a
    lp = (tl.where(col_ok[None, :], t, float("-inf")) * inv_t - m_b) - ld_b
    g = (div_scale * inv_t) * _div_grad(lq, lp, aux, beta, log_beta, log_1mbeta, DIVERGENCE)
    if HAS_CE:
        m_r = tl.load(st + 4, mask=row_ok, other=0.0)[:, None]
        ld_r = tl.load(st + 5, mask=row_ok, other=0.0)[:, None]
        g += ce_scale * _ce_grad(r, m_r, ld_r, cols[None, :] == label[:, None])
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
        g = tl.where(keep, g, 0.0)
    return g * go[:, None], keep
