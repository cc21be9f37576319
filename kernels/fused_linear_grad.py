"""The gradient kernels of the fused-linear loss (see ``kernels/fused_linear.py`` for the math,
the two backward forms and the launchers).

Pointer arguments shared with the forward kernels: hs_ptr [N, H_s] student hidden states; ws_ptr
[V, H_s] student weight; bs_ptr [V] student bias (read when HAS_BS); ht_ptr [N, H_t] teacher
hidden states; wt_ptr [>=V, H_t] teacher weight (read when not SHARED); bt_ptr [>=V] teacher bias
(read when HAS_BT); labels_ptr [N] int64 (read when HAS_LABELS); row strides hs_stride,
ws_stride, ht_stride, wt_stride; unit column strides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import _dot, _grad_tile, _load_tile, _logit_tiles, _row_state


# ------------------------------------------------------------------------------------------------
# The gradient pass: g = dL/dz per tile, stored ("gemm") or pushed into the gradients ("atomic").
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile_grad(
    ops,  # the linear layers' operands (see _logit_tiles)
    labels_ptr, stats_ptr, grad_rows_ptr, N, V, H_s, H_t, inv_t, beta, log_beta, log_1mbeta,
    div_scale, ce_scale, cap, eps, ignore_index, pid_n, pid_v,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """g = dL/dz of tile (token block pid_n, vocabulary tile pid_v), recomputed from the hidden
    states; returns g, keep (see _grad_tile), rows, row_in, row_ok, cols and col_ok."""
    rows, row_in, label, row_ok = _row_state(
        labels_ptr, pid_n, N, ignore_index, HAS_LABELS, BLOCK_N
    )
    s, t, cols, col_ok = _logit_tiles(
        ops, rows, row_ok, pid_v, V, H_s, H_t, cap, SHARED, HAS_BS, HAS_BT, SOFTCAP, DOT_FP32,
        BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    g, keep = _grad_tile(
        s, t, stats_ptr, grad_rows_ptr, rows, row_ok, label, cols, col_ok, V, inv_t, beta,
        log_beta, log_1mbeta, div_scale, ce_scale, cap, eps, DIVERGENCE, HAS_CE, SOFTCAP, FILTER,
    )  # fmt: skip
    return g, keep, rows, row_in, row_ok, cols, col_ok


@triton.jit
def _fused_linear_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr,  # see the module docstring
    stats_ptr,  # [N, 7] fp32 row statistics from the forward passes
    grad_rows_ptr,  # [N] fp32 dL/d(row loss)
    g_ptr,  # [N, V] dL/dz out (student dtype, or fp32 when DOT_FP32), row stride V
    hs_stride, ws_stride, ht_stride, wt_stride, N, V, H_s, H_t, inv_t, beta, log_beta,
    log_1mbeta,
    div_scale,  # weight of the divergence in the row loss
    ce_scale,  # weight of the cross-entropy term
    cap,
    eps,  # gradient-filter threshold (read when FILTER)
    ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    ops = (hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_stride, ws_stride, ht_stride,
           wt_stride)  # fmt: skip
    g, _, rows, row_in, row_ok, cols, col_ok = _tile_grad(
        ops, labels_ptr, stats_ptr, grad_rows_ptr, N, V, H_s, H_t, inv_t, beta, log_beta,
        log_1mbeta, div_scale, ce_scale, cap, eps, ignore_index, tl.program_id(0),
        tl.program_id(1), DIVERGENCE, HAS_LABELS, HAS_CE, SHARED, HAS_BS, HAS_BT, SOFTCAP,
        FILTER, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    tl.store(
        g_ptr + rows[:, None] * V + cols[None, :],
        g.to(g_ptr.dtype.element_ty),
        mask=row_in[:, None] & col_ok[None, :],
    )


@triton.jit
def _fused_linear_bwd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr,  # see the module docstring
    stats_ptr,  # [N, 7] fp32 row statistics from the forward passes
    grad_rows_ptr,  # [N] fp32 dL/d(row loss)
    gh_ptr,  # [N, H_s] fp32 grad of the student hidden states (atomic adds; when NEED_GH)
    gw_ptr,  # [V, H_s] fp32 grad of the student weight (atomic adds; when NEED_GW)
    gb_ptr,  # [V] fp32 grad of the student bias (atomic adds; when NEED_GB)
    hs_stride, ws_stride, ht_stride, wt_stride, N, V, H_s, H_t, inv_t, beta, log_beta,
    log_1mbeta, div_scale, ce_scale, cap, eps, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,  # token blocks that sweep the vocabulary together
):  # fmt: skip
    ops = (hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_stride, ws_stride, ht_stride,
           wt_stride)  # fmt: skip
    # Grouped order: programs in flight share GROUP_N token blocks (their grad_h rows in L2).
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_vtiles = tl.cdiv(V, BLOCK_V)
    group = pid // (GROUP_N * n_vtiles)
    first = group * GROUP_N
    size = tl.minimum(n_blocks - first, GROUP_N)
    in_group = pid % (GROUP_N * n_vtiles)
    pid_n = first + in_group % size
    pid_v = in_group // size
    g, keep, rows, row_in, row_ok, cols, col_ok = _tile_grad(
        ops, labels_ptr, stats_ptr, grad_rows_ptr, N, V, H_s, H_t, inv_t, beta, log_beta,
        log_1mbeta, div_scale, ce_scale, cap, eps, ignore_index, pid_n, pid_v, DIVERGENCE,
        HAS_LABELS, HAS_CE, SHARED, HAS_BS, HAS_BT, SOFTCAP, FILTER, DOT_FP32, BLOCK_N, BLOCK_V,
        BLOCK_K,
    )  # fmt: skip
    if keep:
        if NEED_GB:
            tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
        if DOT_FP32:
            g_op = g
        else:
            g_op = g.to(ws_ptr.dtype.element_ty)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, H_s, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_s
            if NEED_GH:
                w = _load_tile(ws_ptr, cols, col_ok, ws_stride, k, k_ok)
                gh = _dot(g_op, w, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), DOT_FP32)
                tl.atomic_add(gh_ptr + rows[:, None] * H_s + k[None, :], gh,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")  # fmt: skip
            if NEED_GW:
                h = _load_tile(hs_ptr, rows, row_ok, hs_stride, k, k_ok)
                gw = _dot(tl.trans(g_op), h, tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32),
                          DOT_FP32)  # fmt: skip
                tl.atomic_add(gw_ptr + cols[:, None] * H_s + k[None, :], gw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")  # fmt: skip
