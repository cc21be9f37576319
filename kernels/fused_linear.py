"""Fused-linear distillation loss (Triton): logits tiles formed with ``tl.dot``, never stored.

Student logits s = softcap(h_s W_s^T + b_s) and teacher logits t = softcap(h_t W_t^T + b_t) are
formed tile by tile, [BLOCK_N tokens, BLOCK_V vocabulary entries], with an fp32 accumulator (an
fp32 dot for fp32 inputs, a bf16/fp16 dot with fp32 accumulation otherwise: never a round trip of
the logits through bf16), softcap(z) = c tanh(z / c). The math per row is that of
``kernels/distill_loss.py`` with a = s / T, b = t / T (tile helpers in ``kernels/_tiles.py``):

- ``_fused_linear_stats_kernel`` (pass 1): grid (token blocks, vocabulary splits). Each program
  streams the vocabulary tiles j = split, split + SPLITS, ... of its token block and keeps, per
  row, the online log-sum-exp pairs (m, d = sum e^(x - m)) of a, b and (cross-entropy at T != 1)
  the raw s, the rescaled forward/reverse-KL sum S or R, and the label's logit. It writes these
  partial statistics [8, SPLITS, N] (fp64); the caller merges the splits (a few [SPLITS, N] torch
  ops) into the loss and the row statistics {m_a, ld_a, m_b, ld_b, m_s, ld_s, aux}.
- ``_fused_linear_jsd_kernel`` (pass 2, interior-beta JSD only): the same sweep once more, now
  with the final log-normalizers, for KL(p||M) and KL(q||M), M = beta p + (1 - beta) q.
- The gradient pass, g = dL/dz per tile (the logits loss gradient times the softcap derivative
  1 - (s/c)^2, times the per-row grad_output), in one of two forms:

  - ``"gemm"`` (the default): ``_fused_linear_grad_kernel`` writes g for a chunk of rows
    [rows, V] in the student's dtype (no atomics), and two GEMMs form grad_h = g W and
    grad_W (+)= g^T h directly in the weight's dtype (grad_b = sum_rows g). Chunks hold at most
    about as many elements as grad_W itself; with several chunks, grad_W is accumulated in its
    own dtype (one more rounding per chunk for bf16 weights).
  - ``"atomic"``: ``_fused_linear_bwd_kernel``, grid (token blocks x vocabulary tiles) in grouped
    order (GROUP_N token blocks sweep the vocabulary together, so that their fp32 grad_h rows stay
    in L2), pushes g straight into grad_h += g W and grad_W += g^T h (and grad_b) with relaxed
    fp32 atomic adds (no fences: the sums are read after the kernel), one [BLOCK_N, BLOCK_K] /
    [BLOCK_V, BLOCK_K] product per step over the hidden size. It needs fp32 [N, H] and [V, H]
    buffers and a cast copy; the first GPU measurements decide between the two
    (``EMALORA_FUSED_LINEAR_BACKWARD=atomic`` selects it).

When the teacher shares the student's weight, one loop over the hidden size loads each weight
tile once for both dot products, and no teacher weight gradient exists anywhere. Rows whose label
is ``ignore_index`` load zeros for their hidden states (NaN there is never read) and get exactly
zero gradient. With ``eps`` (gradient filtering, off by default) a backward tile whose every
|dl_i/dz_ij| (row loss i, before grad_output) is at most eps is dropped, as cut-cross-entropy does
(the atomic form skips its products and atomics; the gemm form writes zeros).

Every arithmetic step is guarded so that -inf (masked vocabulary columns) never forms
(-inf) - (-inf).

Cost: pass 1 and the gradient pass each form both logits tiles (2 N V H multiply-adds per
model); the gradient adds the two products g W and g^T h (2 N V H more). The GPU block sizes of
:func:`default_blocks` are a starting point, not a tuned choice; ``emalora-fast bench
--compile-report`` prints their registers, spills and instruction mix, and the byte/FLOP floors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import Launch, Target, check_labels, mix_logs, target_of
from ._online import _fold, _jsd_terms, _lse_step
from ._tiles import _row_lse, _row_state, _scaled_tiles
from .fused_linear_grad import _fused_linear_bwd_kernel, _fused_linear_grad_kernel

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
NUM_PARTIALS = 8  # m_a, d_a, m_b, d_b, m_r, d_r, acc (S or R), label logit
NUM_STATS = 7  # m_a, ld_a, m_b, ld_b, m_s, ld_s, aux (as in distill_loss)
BACKWARD_MODES = ("gemm", "atomic")
GROUP_N = 16  # token blocks per group of the atomic backward's program order

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _new_empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffers the kernels must fill entirely (tests poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Pointer arguments shared by the kernels (after the hidden states and weights):
#   hs_ptr [N, H_s] student hidden states; ws_ptr [V, H_s] student weight; bs_ptr [V] student bias
#   (read when HAS_BS); ht_ptr [N, H_t] teacher hidden states; wt_ptr [>=V, H_t] teacher weight
#   (read when not SHARED); bt_ptr [>=V] teacher bias (read when HAS_BT); labels_ptr [N] int64
#   (read when HAS_LABELS). Row strides hs_stride, ws_stride, ht_stride, wt_stride; unit columns.


@triton.jit
def _split_program(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr,  # see above
    hs_stride, ws_stride, ht_stride, wt_stride, N, V, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (token block, vocabulary split) of a statistics pass: the linear layers' operands
    as one tuple (see _logit_tiles), its split, the number of splits, the number of vocabulary
    tiles, and the row state of its token block (see _row_state)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    ops = (hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_stride, ws_stride, ht_stride,
           wt_stride)  # fmt: skip
    rows, row_in, label, row_ok = _row_state(
        labels_ptr, pid_n, N, ignore_index, HAS_LABELS, BLOCK_N
    )
    return ops, split, n_splits, tl.cdiv(V, BLOCK_V), rows, row_in, label, row_ok


@triton.jit
def _partials(part_ptr, split, n_splits, N, rows):
    """Pointers to part[0, split, rows] of the partials [K, SPLITS, N] and the stride of K."""
    return part_ptr + split.to(tl.int64) * N + rows, n_splits.to(tl.int64) * N


# ------------------------------------------------------------------------------------------------
# Pass 1: online row statistics.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_stats_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr,  # see above
    part_ptr,  # [8, SPLITS, N] fp64 partial statistics of this split
    hs_stride, ws_stride, ht_stride, wt_stride, N, V, H_s, H_t,
    inv_t,  # 1 / T
    cap,  # softcap c
    ignore_index,
    DIVERGENCE: tl.constexpr,  # FORWARD_KL | REVERSE_KL | JSD
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # the label logit is needed
    RAW_LSE: tl.constexpr,  # HAS_CE and T != 1: the LSE of the raw student logits too
    SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    ops, split, n_splits, n_tiles, rows, row_in, label, row_ok = _split_program(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, hs_stride, ws_stride,
        ht_stride, wt_stride, N, V, ignore_index, HAS_LABELS, BLOCK_N, BLOCK_V,
    )  # fmt: skip
    # Running maxima in fp32; running sums of per-tile fp32 tree sums in fp64.
    m_a = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    m_b = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    m_r = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    d_a = tl.zeros([BLOCK_N], dtype=tl.float64)
    d_b = tl.zeros([BLOCK_N], dtype=tl.float64)
    d_r = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    s_lab = tl.zeros([BLOCK_N], dtype=tl.float64)
    for j in range(split, n_tiles, n_splits):
        s, r, a, b, cols, col_ok = _scaled_tiles(
            ops, rows, row_ok, j, V, H_s, H_t, inv_t, cap, SHARED, HAS_BS, HAS_BT, SOFTCAP,
            DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        m_a, _, e_a, c_a = _lse_step(a, m_a, 1)
        m_b, _, e_b, c_b = _lse_step(b, m_b, 1)
        d_a = _fold(d_a, c_a, e_a, 1)
        d_b = _fold(d_b, c_b, e_b, 1)
        if DIVERGENCE == 0:
            live = b > float("-inf")
            diff = tl.where(live, b, 0.0) - tl.where(live, a, 0.0)
            acc = acc * c_b + tl.sum(e_b * diff, axis=1).to(tl.float64)
        elif DIVERGENCE == 1:
            live = a > float("-inf")
            diff = tl.where(live, a, 0.0) - tl.where(live, b, 0.0)
            acc = acc * c_a + tl.sum(e_a * diff, axis=1).to(tl.float64)
        if RAW_LSE:
            m_r, _, e_r, c_r = _lse_step(r, m_r, 1)
            d_r = _fold(d_r, c_r, e_r, 1)
        if HAS_CE:
            hit = cols[None, :] == label[:, None]
            s_lab += tl.sum(tl.where(hit, s, 0.0), axis=1).to(tl.float64)
    out, stride = _partials(part_ptr, split, n_splits, N, rows)
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
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr,  # see above
    stats_ptr,  # [N, 7] fp32 row statistics (m_a, ld_a, m_b, ld_b used)
    part_ptr,  # [2, SPLITS, N] fp64 partial KL(p||M), KL(q||M) of this split
    hs_stride, ws_stride, ht_stride, wt_stride, N, V, H_s, H_t, inv_t, cap,
    log_beta,  # log(beta)
    log_1mbeta,  # log(1 - beta)
    ignore_index,
    HAS_LABELS: tl.constexpr, SHARED: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    ops, split, n_splits, n_tiles, rows, row_in, label, row_ok = _split_program(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, hs_stride, ws_stride,
        ht_stride, wt_stride, N, V, ignore_index, HAS_LABELS, BLOCK_N, BLOCK_V,
    )  # fmt: skip
    kl_pm = tl.zeros([BLOCK_N], dtype=tl.float64)
    kl_qm = tl.zeros([BLOCK_N], dtype=tl.float64)
    m_a, ld_a, m_b, ld_b = _row_lse(stats_ptr, rows, row_in)
    for j in range(split, n_tiles, n_splits):
        _, _, a, b, _, _ = _scaled_tiles(
            ops, rows, row_ok, j, V, H_s, H_t, inv_t, cap, SHARED, HAS_BS, HAS_BT, SOFTCAP,
            DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        t_pm, t_qm = _jsd_terms((a - m_a) - ld_a, (b - m_b) - ld_b, log_beta, log_1mbeta)
        kl_pm += tl.sum(t_pm, axis=1).to(tl.float64)
        kl_qm += tl.sum(t_qm, axis=1).to(tl.float64)
    out, stride = _partials(part_ptr, split, n_splits, N, rows)
    tl.store(out, kl_pm, mask=row_in)
    tl.store(out + stride, kl_qm, mask=row_in)


# ------------------------------------------------------------------------------------------------
# Launchers.
# ------------------------------------------------------------------------------------------------
def default_blocks(
    target: Target, kernel: str = "stats", fp32: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K) of ``kernel`` ("stats", "jsd", "grad", "bwd"): tensor-core
    tiles on a GPU, small ones under the interpreter. The statistics passes on sm_80 take
    64 x 64 x 32 tiles: at 64 x 128 (8 warps) they need more than 255 registers and spill up to
    548 bytes, at 64 x 64 x 64 still 16; 64 x 64 x 32 fits in 242 with 2 blocks per SM. fp32
    inputs (exact fp32 dots, no tensor cores) take 32 x 64 x 32: at 64 x 128 x 64 they spill
    hundreds of bytes to kilobytes."""
    if target.arch == 0:
        return 16, 64, 16
    if fp32:
        return 32, 64, 32
    if target.arch < 90 and kernel in ("stats", "jsd"):
        return 64, 64, 32
    return 64, 128, 64


def _num_warps(block_n: int, block_v: int) -> int:
    return 8 if block_n * block_v >= 8192 else 4


# Resident blocks per SM of the statistics passes at the default tiles, by (target arch, fp32
# inputs) (the compile check verifies the bf16 ones against the compiled registers and shared
# memory).
BLOCKS_PER_SM = {(90, False): 1, (80, False): 2, (90, True): 2, (80, True): 2}


def _splits(n_blocks: int, n_tiles: int, target: Target, fp32: bool = False) -> int:
    """Vocabulary splits of pass 1: the fewest that fill the device's SMs in nearly whole waves
    (at least 90% of the last wave busy), at most n_tiles; 2 under the interpreter."""
    if target.arch == 0:
        return min(n_tiles, 2)
    slots = target.sms * BLOCKS_PER_SM.get((target.arch, fp32), 1)
    best, best_eff = 1, 0.0
    for s in range(1, min(n_tiles, 64) + 1):
        programs = n_blocks * s
        eff = programs / (-(-programs // slots) * slots)
        if eff >= 0.9:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


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
    check_labels(labels, hs.shape[0])


def _common(hs, ws, bs, ht, wt, bt, labels, shared, softcap, blocks, target, kernel):
    """Leading pointer arguments, strides and compile-time flags shared by the kernels."""
    fp32 = torch.float32 in (hs.dtype, ht.dtype)
    block_n, block_v, block_k = blocks or default_blocks(target, kernel, fp32)
    args = (hs, ws, bs if bs is not None else ws, ht, wt, bt if bt is not None else wt,
            labels if labels is not None else hs)  # fmt: skip
    strides = (hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0))
    flags = dict(
        HAS_LABELS=labels is not None,
        SHARED=shared,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        SOFTCAP=softcap is not None,
        # bf16/fp16 tl.dot is not implemented by the interpreter: there the operands are upcast.
        DOT_FP32=target.arch == 0 or fp32,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
    )
    return args, strides, flags


def _split_pass(hs, ws, bs, ht, wt, bt, labels, vocab, shared, softcap, blocks, splits, target,
                kernel, n_partials):  # fmt: skip
    """_common's arguments, the grid (token blocks, vocabulary splits) of a statistics pass and
    its output, the partials [n_partials, SPLITS, N] (fp64)."""
    target = target or target_of(hs.device)
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, labels, shared, softcap, blocks,
                                   target, kernel)  # fmt: skip
    n_blocks = triton.cdiv(hs.shape[0], flags["BLOCK_N"])
    n_tiles = triton.cdiv(vocab, flags["BLOCK_V"])
    fp32 = torch.float32 in (hs.dtype, ht.dtype)
    splits = max(1, min(splits or _splits(n_blocks, n_tiles, target, fp32), n_tiles))
    part = _new_empty((n_partials, splits, hs.shape[0]), torch.float64, hs.device)
    return args, strides, flags, (n_blocks, splits), part


def _pass_launch(kernel, grid, head, tail, flags, hs, ht, vocab, temperature, softcap) -> Launch:
    """The launch of a statistics pass: arguments ``head`` (up to the strides), N, V, H_s, H_t,
    1 / T, the softcap, then ``tail`` (see the kernels)."""
    sizes = (hs.shape[0], vocab, hs.shape[1], ht.shape[1], 1.0 / temperature,
             float(softcap or 1.0))  # fmt: skip
    return Launch(kernel, grid, (*head, *sizes, *tail), flags,
                  num_warps=_num_warps(flags["BLOCK_N"], flags["BLOCK_V"]))  # fmt: skip


def _run_pass(launch: Launch, part: torch.Tensor) -> torch.Tensor:
    """Run a statistics pass unless it has no rows; its partials [K, SPLITS, N]."""
    if part.shape[2]:
        launch()
    return part


def fused_linear_fwd_launch(
    hs, ws, bs, ht, wt, bt, labels, vocab: int, shared: bool, divergence: int,
    temperature: float, softcap: float | None, has_ce: bool, ignore_index: int,
    blocks: tuple[int, int, int] | None = None, splits: int | None = None,
    target: Target | None = None,
) -> tuple[Launch, torch.Tensor]:  # fmt: skip
    """The launch of pass 1 and its output, the partial statistics [8, SPLITS, N] (fp64)."""
    args, strides, flags, grid, part = _split_pass(
        hs, ws, bs, ht, wt, bt, labels, vocab, shared, softcap, blocks, splits, target, "stats",
        NUM_PARTIALS,
    )  # fmt: skip
    flags.update(DIVERGENCE=divergence, HAS_CE=has_ce, RAW_LSE=has_ce and temperature != 1.0)
    launch = _pass_launch(_fused_linear_stats_kernel, grid, (*args, part, *strides),
                          (ignore_index,), flags, hs, ht, vocab, temperature, softcap)  # fmt: skip
    return launch, part


def fused_linear_fwd(*args, **kwargs) -> torch.Tensor:
    """Pass 1: partial row statistics [8, SPLITS, N] (fp64) over vocabulary splits.

    Arguments of :func:`fused_linear_fwd_launch`. Rows 0..7 of the first dimension: m_a, d_a,
    m_b, d_b, m_s, d_s (online log-sum-exp pairs of a = s/T, b = t/T and the raw s), the
    forward/reverse-KL sum S or R (scaled with m_b or m_a), and the label's logit (0 in the
    splits that do not hold it).
    """
    _check(*args[:7])
    return _run_pass(*fused_linear_fwd_launch(*args, **kwargs))


def fused_linear_jsd_launch(
    hs, ws, bs, ht, wt, bt, labels, stats: torch.Tensor, vocab: int, shared: bool, beta: float,
    temperature: float, softcap: float | None, ignore_index: int,
    blocks: tuple[int, int, int] | None = None, splits: int | None = None,
    target: Target | None = None,
) -> tuple[Launch, torch.Tensor]:  # fmt: skip
    """The launch of pass 2 (interior-beta JSD) and its output [2, SPLITS, N] (fp64)."""
    args, strides, flags, grid, part = _split_pass(
        hs, ws, bs, ht, wt, bt, labels, vocab, shared, softcap, blocks, splits, target, "jsd", 2
    )  # fmt: skip
    tail = (*mix_logs(beta), ignore_index)  # after the softcap: log(beta), log(1 - beta), ...
    return _pass_launch(_fused_linear_jsd_kernel, grid, (*args, stats, part, *strides), tail,
                        flags, hs, ht, vocab, temperature, softcap), part  # fmt: skip


def fused_linear_jsd(*args, **kwargs) -> torch.Tensor:
    """Pass 2 of interior-beta JSD: partial KL(p||M), KL(q||M) [2, SPLITS, N] (fp64); the
    arguments of :func:`fused_linear_jsd_launch`."""
    _check(*args[:7])
    return _run_pass(*fused_linear_jsd_launch(*args, **kwargs))


def _grad_args(vocab, h_s, h_t, temperature, beta, div_scale, ce_scale, softcap, eps, ignore_index,
               n) -> tuple:  # fmt: skip
    log_beta, log_1mbeta = mix_logs(beta)
    return (n, vocab, h_s, h_t, 1.0 / temperature, beta, log_beta, log_1mbeta, div_scale,
            ce_scale, float(softcap or 1.0), float(eps or 0.0), ignore_index)  # fmt: skip


def fused_linear_grad_launch(
    hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, g: torch.Tensor, vocab: int,
    shared: bool, divergence: int, beta: float, temperature: float, div_scale: float,
    ce_scale: float, softcap: float | None, ignore_index: int, eps: float | None = None,
    blocks: tuple[int, int, int] | None = None, target: Target | None = None,
) -> Launch:  # fmt: skip
    """The "gemm" gradient pass over rows [N] (a chunk): g = dL/dz [N, V] into ``g``."""
    target = target or target_of(hs.device)
    n = hs.shape[0]
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, labels, shared, softcap, blocks,
                                   target, "grad")  # fmt: skip
    flags.update(DIVERGENCE=divergence, HAS_CE=labels is not None and ce_scale != 0.0,
                 FILTER=eps is not None)  # fmt: skip
    rest = _grad_args(vocab, hs.shape[1], ht.shape[1], temperature, beta, div_scale, ce_scale,
                      softcap, eps, ignore_index, n)  # fmt: skip
    return Launch(
        _fused_linear_grad_kernel,
        (triton.cdiv(n, flags["BLOCK_N"]), triton.cdiv(vocab, flags["BLOCK_V"])),
        (*args, stats, grad_rows, g, *strides, *rest),
        flags,
        num_warps=_num_warps(flags["BLOCK_N"], flags["BLOCK_V"]),
    )


def fused_linear_bwd_launch(
    hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, gh, gw, gb, vocab: int, shared: bool,
    divergence: int, beta: float, temperature: float, div_scale: float, ce_scale: float,
    softcap: float | None, ignore_index: int, eps: float | None = None,
    blocks: tuple[int, int, int] | None = None, target: Target | None = None,
) -> Launch:  # fmt: skip
    """The "atomic" gradient pass: relaxed fp32 atomic adds into gh [N, H_s], gw [V, H_s] and
    gb [V] (each None when not needed)."""
    target = target or target_of(hs.device)
    n = hs.shape[0]
    args, strides, flags = _common(hs, ws, bs, ht, wt, bt, labels, shared, softcap, blocks,
                                   target, "bwd")  # fmt: skip
    flags.update(DIVERGENCE=divergence, HAS_CE=labels is not None and ce_scale != 0.0,
                 NEED_GH=gh is not None, NEED_GW=gw is not None, NEED_GB=gb is not None,
                 FILTER=eps is not None, GROUP_N=GROUP_N)  # fmt: skip
    rest = _grad_args(vocab, hs.shape[1], ht.shape[1], temperature, beta, div_scale, ce_scale,
                      softcap, eps, ignore_index, n)  # fmt: skip
    outs = tuple(x if x is not None else stats for x in (gh, gw, gb))
    n_programs = triton.cdiv(n, flags["BLOCK_N"]) * triton.cdiv(vocab, flags["BLOCK_V"])
    return Launch(
        _fused_linear_bwd_kernel,
        (n_programs,),
        (*args, stats, grad_rows, *outs, *strides, *rest),
        flags,
        num_warps=_num_warps(flags["BLOCK_N"], flags["BLOCK_V"]),
    )


def _chunk_rows(n: int, vocab: int, hidden: int, block_n: int, itemsize: int) -> int:
    """Rows per chunk of the gemm backward: g [rows, V] about the size of grad_W [V, H] (at
    least 64 MiB), a multiple of BLOCK_N."""
    budget = max(vocab * hidden * itemsize, 1 << 26)
    rows = max(block_n, budget // (vocab * itemsize) // block_n * block_n)
    return min(n, rows)


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
    mode: str | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradient pass: (grad_h [N, H_s], grad_W [V, H_s], grad_b [V]), each None where
    ``need`` says so.

    ``mode`` "gemm" (default; ``EMALORA_FUSED_LINEAR_BACKWARD`` overrides it) returns them in
    the dtype of g (the student's, fp32 under the interpreter) and grad_b in fp32; "atomic"
    returns fp32 buffers accumulated with atomic adds (the order of the additions, hence the
    last bits, varies from run to run). ``chunk_rows`` overrides the gemm form's rows per chunk.
    """
    _check(hs, ws, bs, ht, wt, bt, labels)
    mode = mode or os.environ.get("EMALORA_FUSED_LINEAR_BACKWARD", "gemm")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
    n, h_s = hs.shape
    dev, f32 = hs.device, torch.float32
    need_gh, need_gw, need_gb = need
    rest = (vocab, shared, divergence, beta, temperature, div_scale, ce_scale, softcap,
            ignore_index, eps, blocks)  # fmt: skip
    if mode == "atomic":
        gh = torch.zeros((n, h_s), dtype=f32, device=dev) if need_gh else None
        gw = torch.zeros((vocab, h_s), dtype=f32, device=dev) if need_gw else None
        gb = torch.zeros((vocab,), dtype=f32, device=dev) if need_gb else None
        if n and any(need):
            fused_linear_bwd_launch(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, gh, gw, gb,
                                    *rest)()  # fmt: skip
        return gh, gw, gb
    target = target_of(dev)
    g_dtype = f32 if target.arch == 0 or torch.float32 in (hs.dtype, ht.dtype) else hs.dtype
    gh = _new_empty((n, h_s), dtype=g_dtype, device=dev) if need_gh else None
    gw = (
        (_new_empty if n else torch.zeros)((vocab, h_s), dtype=g_dtype, device=dev)
        if need_gw
        else None
    )
    gb = torch.zeros((vocab,), dtype=f32, device=dev) if need_gb else None
    if n == 0 or not any(need):
        return gh, gw, gb
    w_op, h_op = ws.to(g_dtype), hs.to(g_dtype)  # no copies unless under the interpreter
    block_n = (blocks or default_blocks(target, "grad", torch.float32 in (hs.dtype, ht.dtype)))[0]
    step = chunk_rows or _chunk_rows(n, vocab, h_s, block_n, torch.finfo(g_dtype).bits // 8)
    g = _new_empty((min(step, n), vocab), g_dtype, dev)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        gc = g[: c1 - c0]
        lab = labels[c0:c1] if labels is not None else None
        fused_linear_grad_launch(hs[c0:c1], ws, bs, ht[c0:c1], wt, bt, lab, stats[c0:c1],
                                 grad_rows[c0:c1], gc, *rest)()  # fmt: skip
        if need_gh:
            torch.mm(gc, w_op, out=gh[c0:c1])
        if need_gw:
            h_c = h_op[c0:c1]
            if lab is not None:  # ignored rows are never read: their hidden states may be NaN
                h_c = h_c.masked_fill((lab == ignore_index)[:, None], 0.0)
            if c0 == 0:
                torch.mm(gc.t(), h_c, out=gw)
            else:
                gw.addmm_(gc.t(), h_c)
        if need_gb:
            gb += gc.sum(0, dtype=f32)
    return gh, gw, gb
