"""Teacher-student distillation loss on logits, streamed over the vocabulary (Triton).

One program per row. With a = s / T, b = t / T (student s, teacher t, temperature T), the forward
kernel loops over vocabulary chunks once, keeping an online log-sum-exp LSE(x) = m_x + log d_x of
a and b (and of the raw s when the cross-entropy term needs it at T != 1) together with

    forward KL:  S = sum_v e^(b_v - m_b) ((b_v - m_b) - (a_v - m_a))
                 KL(p||q) = S / d_b + log d_a - log d_b
    reverse KL:  R = sum_v e^(a_v - m_a) ((a_v - m_a) - (b_v - m_b))
                 KL(q||p) = R / d_a - log d_a + log d_b

(terms measured from the running maxima, moved along when a maximum grows, so that no large
m_a - m_b has to cancel when teacher and student logits sit at different offsets)
and, for interior-beta JSD, loops a second time for KL(p||M) and KL(q||M) with
log M = logaddexp(log beta + log p, log(1 - beta) + log q). It writes the per-row loss and the
row statistics {m_a, ld_a, m_b, ld_b, m_s, ld_s, aux}: each log-normalizer LSE(x) = m_x + ld_x is
kept as its running max and log(sum e^(x - m_x)), so that log-probabilities are formed as
(x - m_x) - ld_x, exact in x - m_x like log_softmax; aux = KL(q||p) or KL(q||M). The backward
kernel loops once more and writes dL/ds, optionally over the student logits themselves.

Every arithmetic step is guarded so that -inf logits never form (-inf) - (-inf).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import Launch, check_labels, mix_logs
from ._online import _ce_grad, _div_grad, _fold, _jsd_terms, _lse_step, _shift

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
NUM_STATS = 7  # m_a, ld_a, m_b, ld_b, m_s, ld_s, aux
MAX_BLOCK_V = 4096
# Pass 1 of the forward kernel with tl.range(num_stages=2) compiles to cp.async prefetches
# (LDGSTS.128 through 16 KB of shared memory) in fewer registers; whether that beats plain 128-bit
# loads is for a GPU to say: EMALORA_LOSS_STAGES=2 selects it (gpu_smoke.py times both).
FWD_STAGES = int(os.environ.get("EMALORA_LOSS_STAGES", "1"))

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_start(ptr, row, stride, ROW_ALIGNED: tl.constexpr):
    """Pointer to row ``row`` (int64) of a matrix with row stride ``stride``; with ROW_ALIGNED
    (host-checked) marked as 16-byte aligned."""
    p = ptr + row * stride
    if ROW_ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _row_prologue(
    s_ptr,  # [N, V] student logits, row stride s_stride
    t_ptr,  # [N, V] teacher logits, row stride t_stride
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    s_stride, t_stride, V, ignore_index,
    HAS_LABELS: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """The program's row (int64), its student and teacher row pointers, v_main (columns
    [0, v_main) in unmasked full chunks, the rest masked), its label and whether it counts."""
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_start(s_ptr, row, s_stride, ROW_ALIGNED)
    t_row = _row_start(t_ptr, row, t_stride, ROW_ALIGNED)
    v_main = 0
    if ROW_ALIGNED:
        v_main = V - V % BLOCK_V
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    else:
        label = 0
        valid = True
    return row, s_row, t_row, v_main, label, valid


@triton.jit
def _load_logits(s_row, t_row, cols, V, MASKED: tl.constexpr):
    """fp32 student and teacher logits of one chunk; with MASKED, lanes past V are -inf."""
    if MASKED:
        in_v = cols < V
        r = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32)
        b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32)
    else:
        r = tl.load(s_row + cols).to(tl.float32)
        b = tl.load(t_row + cols).to(tl.float32)
    return r, b


@triton.jit
def _stats_chunk(
    s_row, t_row, cols, V, inv_t, m_a, m_b, m_r, d_a, d_b, d_r, acc,
    DIVERGENCE: tl.constexpr, RAW_LSE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 1 over the chunk ``cols``: the online (max, sum) pairs of a, b (and the raw s) and
    S or R."""
    r, b = _load_logits(s_row, t_row, cols, V, MASKED)
    a = r * inv_t
    b = b * inv_t
    new_a, sh_a, e_a, c_a = _lse_step(a, m_a, 0)
    new_b, sh_b, e_b, c_b = _lse_step(b, m_b, 0)
    # Growth of the shifts: old S / R terms move by -(delta) / +(delta).
    delta = ((sh_b - _shift(m_b)) - (sh_a - _shift(m_a))).to(tl.float64)
    if DIVERGENCE == 0:
        live = b > float("-inf")
        diff = tl.where(live, b - sh_b, 0.0) - tl.where(live, a - sh_a, 0.0)
        acc = (acc - delta * d_b) * c_b + tl.sum(e_b * diff, axis=0).to(tl.float64)
    elif DIVERGENCE == 1:
        live = a > float("-inf")
        diff = tl.where(live, a - sh_a, 0.0) - tl.where(live, b - sh_b, 0.0)
        acc = (acc + delta * d_a) * c_a + tl.sum(e_a * diff, axis=0).to(tl.float64)
    d_a = _fold(d_a, c_a, e_a, 0)
    d_b = _fold(d_b, c_b, e_b, 0)
    if RAW_LSE:
        m_r, _, e_r, c_r = _lse_step(r, m_r, 0)
        d_r = _fold(d_r, c_r, e_r, 0)
    return new_a, new_b, m_r, d_a, d_b, d_r, acc


@triton.jit
def _jsd_chunk(
    s_row, t_row, cols, V, inv_t, m_a, ld_a, m_b, ld_b, log_beta, log_1mbeta, kl_pm, kl_qm,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 2 of JSD over the chunk ``cols``: the running sums of p (log p - log M) and
    q (log q - log M) plus the chunk's."""
    r, b = _load_logits(s_row, t_row, cols, V, MASKED)
    t_pm, t_qm = _jsd_terms((r * inv_t - m_a) - ld_a, (b * inv_t - m_b) - ld_b, log_beta,
                            log_1mbeta)  # fmt: skip
    return (kl_pm + tl.sum(t_pm, axis=0).to(tl.float64),
            kl_qm + tl.sum(t_qm, axis=0).to(tl.float64))  # fmt: skip


@triton.jit
def _distill_loss_fwd_kernel(
    s_ptr,  # [N, V] student logits, row stride s_stride, unit column stride
    t_ptr,  # [N, V] teacher logits, row stride t_stride, unit column stride
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    loss_ptr,  # [N] fp32 per-row loss: div_scale * D + ce_scale * CE, 0 on ignored rows
    stats_ptr,  # [N, 7] fp32 per-row m_a, ld_a, m_b, ld_b, m_s, ld_s, aux
    s_stride,
    t_stride,
    V,
    inv_t,  # 1 / T
    beta,  # JSD weight (interior beta only)
    log_beta,  # log(beta)
    log_1mbeta,  # log(1 - beta)
    div_scale,  # weight of the divergence in the row loss
    ce_scale,  # weight of the cross-entropy term
    ignore_index,
    DIVERGENCE: tl.constexpr,  # FORWARD_KL | REVERSE_KL | JSD
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    RAW_LSE: tl.constexpr,  # HAS_CE and T != 1: LSE of the raw student logits too
    ROW_ALIGNED: tl.constexpr,  # host-checked 16-byte aligned rows: unmasked main loop, tail
    BLOCK_V: tl.constexpr,
    STAGES: tl.constexpr,  # software pipelining of the pass-1 loads (1: none)
):
    row, s_row, t_row, v_main, label, valid = _row_prologue(
        s_ptr, t_ptr, labels_ptr, s_stride, t_stride, V, ignore_index, HAS_LABELS, ROW_ALIGNED,
        BLOCK_V,
    )  # fmt: skip
    offs = tl.arange(0, BLOCK_V)
    if valid:
        # Running maxima in fp32; the running sums (one fp32 tree sum per chunk) in fp64, so that
        # LSE(a) - LSE(b) keeps its accuracy when teacher and student nearly agree.
        m_a = float("-inf")
        m_b = float("-inf")
        m_r = float("-inf")
        d_a = tl.cast(0.0, tl.float64)
        d_b = tl.cast(0.0, tl.float64)
        d_r = tl.cast(0.0, tl.float64)
        acc = tl.cast(0.0, tl.float64)
        for start in tl.range(0, v_main, BLOCK_V, num_stages=STAGES):
            m_a, m_b, m_r, d_a, d_b, d_r, acc = _stats_chunk(
                s_row, t_row, tl.multiple_of(start, BLOCK_V) + offs, V, inv_t, m_a, m_b, m_r,
                d_a, d_b, d_r, acc, DIVERGENCE, RAW_LSE, False,
            )  # fmt: skip
        for start in tl.range(v_main, V, BLOCK_V, num_stages=STAGES):
            m_a, m_b, m_r, d_a, d_b, d_r, acc = _stats_chunk(
                s_row, t_row, start + offs, V, inv_t, m_a, m_b, m_r, d_a, d_b, d_r, acc,
                DIVERGENCE, RAW_LSE, True,
            )  # fmt: skip
        ld_a64 = tl.log(d_a)
        ld_b64 = tl.log(d_b)
        ld_a = ld_a64.to(tl.float32)
        ld_b = ld_b64.to(tl.float32)
        if RAW_LSE:
            ld_r = tl.log(d_r).to(tl.float32)
        else:  # a == s when T == 1
            m_r = m_a
            ld_r = ld_a
        if DIVERGENCE == 0:
            div = (acc / d_b + (ld_a64 - ld_b64)).to(tl.float32)
            aux = 0.0
        elif DIVERGENCE == 1:
            div = (acc / d_a - (ld_a64 - ld_b64)).to(tl.float32)
            aux = div
        else:
            kl_pm = tl.cast(0.0, tl.float64)
            kl_qm = tl.cast(0.0, tl.float64)
            for start in range(0, v_main, BLOCK_V):
                kl_pm, kl_qm = _jsd_chunk(
                    s_row, t_row, tl.multiple_of(start, BLOCK_V) + offs, V, inv_t, m_a, ld_a,
                    m_b, ld_b, log_beta, log_1mbeta, kl_pm, kl_qm, False,
                )  # fmt: skip
            for start in range(v_main, V, BLOCK_V):
                kl_pm, kl_qm = _jsd_chunk(
                    s_row, t_row, start + offs, V, inv_t, m_a, ld_a, m_b, ld_b, log_beta,
                    log_1mbeta, kl_pm, kl_qm, True,
                )  # fmt: skip
            div = (beta * kl_pm + (1.0 - beta) * kl_qm).to(tl.float32)
            aux = kl_qm.to(tl.float32)
        loss = div_scale * div
        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            s_label = tl.load(s_row + label, mask=in_range, other=float("nan")).to(tl.float32)
            loss += ce_scale * ((m_r - s_label) + ld_r)
        tl.store(loss_ptr + row, loss)
        st = stats_ptr + row * 7
        tl.store(st + 0, m_a)
        tl.store(st + 1, ld_a)
        tl.store(st + 2, m_b)
        tl.store(st + 3, ld_b)
        tl.store(st + 4, m_r)
        tl.store(st + 5, ld_r)
        tl.store(st + 6, aux)
    else:
        tl.store(loss_ptr + row, 0.0)
        k = tl.arange(0, 8)
        tl.store(stats_ptr + row * 7 + k, tl.zeros([8], dtype=tl.float32), mask=k < 7)


@triton.jit
def _grad_chunk(
    g_row, s_row, t_row, cols, V, label, bad_label, inv_t, m_a, ld_a, m_b, ld_b, m_r, ld_r, aux,
    div_coef, ce_coef, beta, log_beta, log_1mbeta,
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The gradient pass over the chunk ``cols``: dL/ds, stored in the dtype of g."""
    r, b = _load_logits(s_row, t_row, cols, V, MASKED)
    lq = (r * inv_t - m_a) - ld_a
    lp = (b * inv_t - m_b) - ld_b
    g = div_coef * _div_grad(lq, lp, aux, beta, log_beta, log_1mbeta, DIVERGENCE)
    if HAS_CE:
        g += ce_coef * _ce_grad(r, m_r, ld_r, cols == label)
        g = tl.where(bad_label, float("nan"), g)
    g = g.to(g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + cols, g, mask=cols < V)
    else:
        tl.store(g_row + cols, g)


@triton.jit
def _distill_loss_bwd_kernel(
    s_ptr,  # [N, V] student logits, row stride s_stride
    t_ptr,  # [N, V] teacher logits, row stride t_stride
    labels_ptr,  # [N] int64 labels (read when HAS_LABELS)
    stats_ptr,  # [N, 7] fp32 row statistics from the forward kernel
    grad_rows_ptr,  # [N] fp32 dL/d(row loss)
    g_ptr,  # [N, V] dL/ds in the student dtype, row stride g_stride; may alias s_ptr
    s_stride,
    t_stride,
    g_stride,
    V,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    div_scale,
    ce_scale,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,  # host-checked 16-byte aligned rows: unmasked main loop, tail
    BLOCK_V: tl.constexpr,
):
    row, s_row, t_row, v_main, label, valid = _row_prologue(
        s_ptr, t_ptr, labels_ptr, s_stride, t_stride, V, ignore_index, HAS_LABELS, ROW_ALIGNED,
        BLOCK_V,
    )  # fmt: skip
    g_row = _row_start(g_ptr, row, g_stride, ROW_ALIGNED)
    offs = tl.arange(0, BLOCK_V)
    if valid:
        st = stats_ptr + row * 7
        m_a = tl.load(st + 0)
        ld_a = tl.load(st + 1)
        m_b = tl.load(st + 2)
        ld_b = tl.load(st + 3)
        m_r = tl.load(st + 4)
        ld_r = tl.load(st + 5)
        aux = tl.load(st + 6)
        go = tl.load(grad_rows_ptr + row)
        div_coef = go * div_scale * inv_t
        ce_coef = go * ce_scale
        bad_label = (label < 0) | (label >= V)
        for start in range(0, v_main, BLOCK_V):
            _grad_chunk(
                g_row, s_row, t_row, tl.multiple_of(start, BLOCK_V) + offs, V, label, bad_label,
                inv_t, m_a, ld_a, m_b, ld_b, m_r, ld_r, aux, div_coef, ce_coef, beta, log_beta,
                log_1mbeta, DIVERGENCE, HAS_CE, False,
            )  # fmt: skip
        for start in range(v_main, V, BLOCK_V):
            _grad_chunk(
                g_row, s_row, t_row, start + offs, V, label, bad_label, inv_t, m_a, ld_a, m_b,
                ld_b, m_r, ld_r, aux, div_coef, ce_coef, beta, log_beta, log_1mbeta, DIVERGENCE,
                HAS_CE, True,
            )  # fmt: skip
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(g_row + cols, zeros.to(g_ptr.dtype.element_ty), mask=cols < V)


def _block_v(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    return block, (4 if block <= 1024 else 8)


def _check(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> None:
    for x in (student, teacher):
        if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
            raise ValueError("logits must be 2-D [N, V] with a unit column stride")
        if x.dtype not in _DTYPES:
            raise TypeError(f"the triton backend takes fp32/bf16/fp16 logits, got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    check_labels(labels, student.shape[0])


def _row_aligned(*xs: torch.Tensor) -> bool:
    """Every row of every tensor starts on 16 bytes (a host check: no sync)."""
    return all(x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0 for x in xs)


def _split_loop(vocab: int, *xs: torch.Tensor) -> bool:
    """ROW_ALIGNED: the unmasked main loop pays where Triton cannot see the alignment itself,
    rows on 16 bytes but V or a row stride not a multiple of 16 elements (e.g. V = 128264 in
    bf16). With both multiples of 16 the masked loop is already 128-bit, in fewer registers."""
    seen = vocab % 16 == 0 and all(x.stride(0) % 16 == 0 for x in xs)
    return _row_aligned(*xs) and not seen


def _loss_args(vocab, beta, temperature, div_scale, ce_scale, ignore_index) -> tuple:
    """The scalar arguments both kernels take after the strides, V to ignore_index."""
    return (vocab, 1.0 / temperature, beta, *mix_logs(beta), div_scale, ce_scale, ignore_index)


def _flags(divergence: int, labels, ce_scale: float, vocab: int, *rows: torch.Tensor) -> dict:
    """The compile-time switches both kernels take (ROW_ALIGNED checked on ``rows``)."""
    block, _ = _block_v(vocab)
    return dict(
        DIVERGENCE=divergence,
        HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and ce_scale != 0.0,
        ROW_ALIGNED=_split_loop(vocab, *rows),
        BLOCK_V=block,
    )


def distill_loss_fwd_launch(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    loss: torch.Tensor, stats: torch.Tensor, divergence: int, beta: float, temperature: float,
    div_scale: float, ce_scale: float, ignore_index: int, stages: int | None = None,
) -> Launch:  # fmt: skip
    """The launch of :func:`distill_loss_fwd` into ``loss`` [N] and ``stats`` [N, 7]."""
    n, vocab = student.shape
    args = (
        student, teacher, labels if labels is not None else loss, loss, stats, student.stride(0),
        teacher.stride(0), *_loss_args(vocab, beta, temperature, div_scale, ce_scale, ignore_index),
    )  # fmt: skip
    flags = _flags(divergence, labels, ce_scale, vocab, student, teacher)
    flags.update(RAW_LSE=flags["HAS_CE"] and temperature != 1.0,
                 STAGES=FWD_STAGES if stages is None else stages)  # fmt: skip
    return Launch(_distill_loss_fwd_kernel, (n,), args, flags, num_warps=_block_v(vocab)[1])


def distill_loss_bwd_launch(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, grad_rows: torch.Tensor, out: torch.Tensor, divergence: int,
    beta: float, temperature: float, div_scale: float, ce_scale: float, ignore_index: int,
) -> Launch:  # fmt: skip
    """The launch of :func:`distill_loss_bwd` into ``out`` [N, V]."""
    n, vocab = student.shape
    args = (
        student, teacher, labels if labels is not None else grad_rows, stats, grad_rows, out,
        student.stride(0), teacher.stride(0), out.stride(0),
        *_loss_args(vocab, beta, temperature, div_scale, ce_scale, ignore_index),
    )  # fmt: skip
    flags = _flags(divergence, labels, ce_scale, vocab, student, teacher, out)
    return Launch(_distill_loss_bwd_kernel, (n,), args, flags, num_warps=_block_v(vocab)[1])


def distill_loss_fwd(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, divergence: int,
    beta: float, temperature: float, div_scale: float, ce_scale: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-row loss [N] and row statistics [N, 7] (fp32) of logits [N, V]; one launch."""
    _check(student, teacher, labels)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty(n, NUM_STATS, dtype=torch.float32, device=student.device)
    if n:
        distill_loss_fwd_launch(student, teacher, labels, loss, stats, divergence, beta,
                                temperature, div_scale, ce_scale, ignore_index)()  # fmt: skip
    return loss, stats


def distill_loss_bwd(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, grad_rows: torch.Tensor, divergence: int, beta: float,
    temperature: float, div_scale: float, ce_scale: float, ignore_index: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """dL/ds [N, V] in the student dtype, into ``out`` (which may be ``student`` itself)."""
    _check(student, teacher, labels)
    if out is None:
        out = torch.empty_like(student, memory_format=torch.contiguous_format)
    if out.shape != student.shape or out.dtype != student.dtype or out.stride(-1) != 1:
        raise ValueError("out must match the student logits' shape and dtype")
    if student.shape[0]:
        distill_loss_bwd_launch(student, teacher, labels, stats, grad_rows, out, divergence, beta,
                                temperature, div_scale, ce_scale, ignore_index)()  # fmt: skip
    return out
