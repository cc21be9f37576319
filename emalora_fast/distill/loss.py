"""Teacher-student distillation loss on logits, streamed over the vocabulary.

:func:`distillation_loss` and :class:`DistillationLoss` compute forward KL, reverse KL or the
generalized JSD between the teacher's and the student's token distributions, optionally mixed
with cross-entropy on the labels, without materializing a full-vocabulary softmax, log-softmax or
per-element loss. One :class:`torch.autograd.Function` wraps the backends:

- ``"triton"``: the kernels of ``emalora_fast.kernels.distill_loss`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
- ``"cpp"``: the ``torch.ops.emalora_fast.distill_loss_*`` CPU ops (with fake implementations
  registered here, so they run under ``torch.compile``);
- ``"torch"``: a plain PyTorch path that loops over vocabulary chunks (any device, float64 too).

The forward pass streams the logits once (twice for interior-beta JSD) and keeps O(N) row
statistics; the backward pass streams them once more and writes dL/ds, optionally over the student
logits buffer itself (``inplace_grad=True``), so the extra memory is O(N).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
from torch import nn

from .._dispatch import load_cpp, load_triton, resolve
from .checks import (
    FORWARD_KL,
    JSD,
    REVERSE_KL,
    Divergence,
    Reduction,
    TeacherVocab,
    _check_labels,
    _check_logits,
    _check_options,
    _divergence_terms,
)

__all__ = ["DistillationLoss", "distillation_loss"]

# Per row: the log-normalizers of a = s/T, b = t/T and s, each as (max m, log sum e^(x - m)) so that
# log-probabilities are formed as (x - m) - ld, then aux = KL(q||p) (reverse KL) or KL(q||M) (JSD).
NUM_STATS = 7
_OP = "distill_loss"


# ------------------------------------------------------------------------------------------------
# The C++ ops: fake (meta) implementations so that they trace under torch.compile.
# ------------------------------------------------------------------------------------------------
def _acc_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


@functools.cache
def _cpp_ops():
    """``torch.ops.emalora_fast`` with the loss ops' fake implementations registered (once)."""
    load_cpp()

    @torch.library.register_fake("emalora_fast::distill_loss_fwd")
    def _fwd_fake(student, teacher, labels, divergence, beta, temperature, div_scale, ce_scale,
                  ignore_index):  # fmt: skip
        n = student.shape[0]
        acc = _acc_dtype(student)
        return student.new_empty((n,), dtype=acc), student.new_empty((n, NUM_STATS), dtype=acc)

    @torch.library.register_fake("emalora_fast::distill_loss_bwd")
    def _bwd_fake(student, teacher, labels, stats, grad_rows, divergence, beta, temperature,
                  div_scale, ce_scale, ignore_index):  # fmt: skip
        return student.new_empty(student.shape)

    @torch.library.register_fake("emalora_fast::distill_loss_bwd_")
    def _bwd_inplace_fake(student, teacher, labels, stats, grad_rows, divergence, beta,
                          temperature, div_scale, ce_scale, ignore_index):  # fmt: skip
        return None

    return torch.ops.emalora_fast


# ------------------------------------------------------------------------------------------------
# The plain PyTorch path: the same passes, vectorized over rows, looping over vocabulary chunks.
# ------------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = 1 << 21  # elements per [N, chunk] temporary


def _torch_chunk(n: int, vocab: int) -> int:
    return max(256, _TORCH_CHUNK_ELEMENTS // max(n, 1)) if vocab > 256 else max(vocab, 1)


def _shift(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mx, mn = torch.maximum(x, y), torch.minimum(x, y)
    return mx + torch.log1p(torch.exp(mn - _shift(mx)))


def _masked_diff(live: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(live, x, zero) - torch.where(live, y, zero)


def _torch_fwd(student, teacher, labels, divergence, beta, temperature, div_scale, ce_scale,
               ignore_index):  # fmt: skip
    acc = _acc_dtype(student)
    n, vocab = student.shape
    inv_t = 1.0 / temperature
    # Running maxima in the accumulation dtype; running sums in float64, so that
    # LSE(a) - LSE(b) keeps its accuracy when teacher and student nearly agree.
    f64 = torch.float64
    m_a, m_b, m_r = (torch.full((n,), -math.inf, device=student.device, dtype=acc) for _ in "abr")
    d_a, d_b, d_r, x = (torch.zeros(n, device=student.device, dtype=f64) for _ in "abrx")
    has_ce = labels is not None and ce_scale != 0.0
    raw = has_ce and temperature != 1.0
    chunk = _torch_chunk(n, vocab)
    for c0 in range(0, vocab, chunk):
        r = student[:, c0 : c0 + chunk].to(acc)
        a = r * inv_t
        b = teacher[:, c0 : c0 + chunk].to(acc) * inv_t
        new_a = torch.maximum(m_a, a.amax(1))
        new_b = torch.maximum(m_b, b.amax(1))
        sh_a, sh_b = _shift(new_a), _shift(new_b)
        e_a = torch.exp(a - sh_a[:, None])
        e_b = torch.exp(b - sh_b[:, None])
        c_a, c_b = torch.exp(m_a - sh_a).to(f64), torch.exp(m_b - sh_b).to(f64)
        # S / R terms are measured from the shifts (see the kernels): move the old ones along.
        delta = ((sh_b - _shift(m_b)) - (sh_a - _shift(m_a))).to(f64)
        a_c, b_c = a - sh_a[:, None], b - sh_b[:, None]
        if divergence == FORWARD_KL:
            terms = e_b * _masked_diff(~torch.isneginf(b), b_c, a_c)
            x = (x - delta * d_b) * c_b + terms.sum(1).to(f64)
        elif divergence == REVERSE_KL:
            terms = e_a * _masked_diff(~torch.isneginf(a), a_c, b_c)
            x = (x + delta * d_a) * c_a + terms.sum(1).to(f64)
        d_a = d_a * c_a + e_a.sum(1).to(f64)
        d_b = d_b * c_b + e_b.sum(1).to(f64)
        if raw:
            new_r = torch.maximum(m_r, r.amax(1))
            sh_r = _shift(new_r)
            c_r = torch.exp(m_r - sh_r).to(f64)
            d_r = d_r * c_r + torch.exp(r - sh_r[:, None]).sum(1).to(f64)
            m_r = new_r
        m_a, m_b = new_a, new_b
    ld_a64, ld_b64 = torch.log(d_a), torch.log(d_b)
    ld_a, ld_b = ld_a64.to(acc), ld_b64.to(acc)
    if raw:
        ld_r = torch.log(d_r).to(acc)
    else:  # a == s when T == 1
        m_r, ld_r = m_a, ld_a
    if divergence == FORWARD_KL:
        div, aux = (x / d_b + (ld_a64 - ld_b64)).to(acc), torch.zeros_like(m_a)
    elif divergence == REVERSE_KL:
        div = (x / d_a - (ld_a64 - ld_b64)).to(acc)
        aux = div
    else:
        log_beta, log_1mbeta = math.log(beta), math.log1p(-beta)
        kl_pm, kl_qm = torch.zeros_like(x), torch.zeros_like(x)
        for c0 in range(0, vocab, chunk):
            lq = (student[:, c0 : c0 + chunk].to(acc) * inv_t - m_a[:, None]) - ld_a[:, None]
            lp = (teacher[:, c0 : c0 + chunk].to(acc) * inv_t - m_b[:, None]) - ld_b[:, None]
            q, p = torch.exp(lq), torch.exp(lp)
            lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
            kl_pm += (p * _masked_diff(p > 0, lp, lm)).sum(1).to(f64)
            kl_qm += (q * _masked_diff(q > 0, lq, lm)).sum(1).to(f64)
        div = (beta * kl_pm + (1.0 - beta) * kl_qm).to(acc)
        aux = kl_qm.to(acc)
    loss = div_scale * div
    if labels is not None:
        valid = labels != ignore_index
        if has_ce:
            target = torch.where(valid, labels, torch.zeros_like(labels))
            s_label = student.gather(1, target[:, None])[:, 0].to(acc)
            loss = loss + ce_scale * ((m_r - s_label) + ld_r)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    stats = torch.stack([m_a, ld_a, m_b, ld_b, m_r, ld_r, aux], dim=1)
    return loss, stats


def _torch_bwd(student, teacher, labels, stats, grad_rows, divergence, beta, temperature,
               div_scale, ce_scale, ignore_index, out=None):  # fmt: skip
    acc = _acc_dtype(student)
    n, vocab = student.shape
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    inv_t = 1.0 / temperature
    m_a, ld_a, m_b, ld_b, m_r, ld_r, aux = (stats[:, i : i + 1] for i in range(NUM_STATS))
    go = grad_rows[:, None]
    if labels is not None:
        go = torch.where(labels[:, None] != ignore_index, go, torch.zeros_like(go))
    div_coef = go * (div_scale * inv_t)
    has_ce = labels is not None and ce_scale != 0.0
    log_beta, log_1mbeta = (math.log(beta), math.log1p(-beta)) if divergence == JSD else (0, 0)
    chunk = _torch_chunk(n, vocab)
    for c0 in range(0, vocab, chunk):
        r = student[:, c0 : c0 + chunk].to(acc)
        lq = (r * inv_t - m_a) - ld_a
        lp = (teacher[:, c0 : c0 + chunk].to(acc) * inv_t - m_b) - ld_b
        q = torch.exp(lq)
        if divergence == FORWARD_KL:
            gd = q - torch.exp(lp)
        elif divergence == REVERSE_KL:
            gd = q * (_masked_diff(q > 0, lq, lp) - aux)
        else:
            lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
            gd = (1.0 - beta) * q * (_masked_diff(q > 0, lq, lm) - aux)
        g = div_coef * gd
        if has_ce:
            cols = torch.arange(c0, c0 + r.shape[1], device=r.device)
            onehot = (cols[None, :] == labels[:, None]).to(acc)
            g = g + (go * ce_scale) * (torch.exp((r - m_r) - ld_r) - onehot)
        if labels is not None:
            g = torch.where(labels[:, None] != ignore_index, g, torch.zeros_like(g))
        out[:, c0 : c0 + chunk].copy_(g)
    return out


# ------------------------------------------------------------------------------------------------
# Backend calls and the autograd Function.
# ------------------------------------------------------------------------------------------------
_TRITON_KERNELS: dict[str, ModuleType] = {}


@torch.compiler.assume_constant_result
def _choose_backend(backend: str, device_type: str, has_fp64: bool) -> str:
    """The concrete backend; loads it (and registers the fakes) outside any compiled graph."""
    chosen = resolve(backend, torch.device(device_type), _OP)
    if chosen == "triton" and has_fp64:
        if backend == "triton":
            raise TypeError("the triton backend takes fp32/bf16/fp16 logits, not float64")
        chosen = "torch"
    if chosen == "cpp":
        _cpp_ops()
    elif chosen == "triton":
        _TRITON_KERNELS[_OP] = load_triton(_OP)
    return chosen


def _forward(backend, student, teacher, labels, args):
    if backend == "cpp":
        return torch.ops.emalora_fast.distill_loss_fwd(student, teacher, labels, *args)
    if backend == "triton":
        return _TRITON_KERNELS[_OP].distill_loss_fwd(student, teacher, labels, *args)
    return _torch_fwd(student, teacher, labels, *args)


def _backward(backend, student, teacher, labels, stats, grad_rows, args, inplace):
    if backend == "torch":
        out = student if inplace else None
        return _torch_bwd(student, teacher, labels, stats, grad_rows, *args, out=out)
    if backend == "cpp":
        ops = torch.ops.emalora_fast
        if not inplace:
            return ops.distill_loss_bwd(student, teacher, labels, stats, grad_rows, *args)
        ops.distill_loss_bwd_(student, teacher, labels, stats, grad_rows, *args)
    else:
        kernels = _TRITON_KERNELS[_OP]
        out = student if inplace else None
        grad = kernels.distill_loss_bwd(student, teacher, labels, stats, grad_rows, *args, out=out)
        if not inplace:
            return grad
    # The kernels wrote behind autograd's back: make later readers of the old values fail loudly.
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(student)
    return student


class DistillationLossFunction(torch.autograd.Function):
    """Per-row distillation loss [N] of logits [N, V]; gradient for the student only.

    The forward pass runs the backend's statistics pass and saves the O(N) row statistics; the
    backward pass runs its gradient pass, scaled row by row by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, divergence, beta, temperature, div_scale,
                ce_scale, ignore_index, backend, inplace_grad):  # fmt: skip
        args = (divergence, beta, temperature, div_scale, ce_scale, ignore_index)
        loss, stats = _forward(backend, student, teacher, labels, args)
        ctx.save_for_backward(student, teacher, labels, stats)
        ctx.args = args
        ctx.backend = backend
        ctx.inplace_grad = inplace_grad
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, labels, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_rows.to(stats.dtype).contiguous()
            grad = _backward(
                ctx.backend, student, teacher, labels, stats, grad_rows, ctx.args, ctx.inplace_grad
            )
        return grad, None, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# The public API.
# ------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    x = x.reshape(-1, vocab)
    return x if vocab == 1 or x.stride(1) == 1 else x.contiguous()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    teacher_vocab: TeacherVocab = "error",
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between teacher and student logits, never materializing a softmax.

    Per row (the leading dimensions are flattened into N rows), with a = s / T, b = t / T,
    log q = log_softmax(a) (student) and log p = log_softmax(b) (teacher)::

        forward_kl = KL(p || q) = sum_v p_v (log p_v - log q_v)
        reverse_kl = KL(q || p) = sum_v q_v (log q_v - log p_v)
        jsd        = beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q,
                     log M = logaddexp(log beta + log p, log(1 - beta) + log q)
        row loss   = (1 - w) c D + w CE,   c = T**2 if scale_by_temperature_squared else 1,
                     CE = logsumexp(s) - s[label]   (raw logits, T = 1)

    ``beta`` follows TRL's ``generalized_jsd_loss``: beta = 0 is forward KL and beta = 1 reverse
    KL; only ``jsd`` reads it. Rows whose label is ``ignore_index`` contribute 0 and get a zero
    gradient. Entries of -inf (masked vocabulary) are allowed and stay finite where the math is.

    The gradient reaches the student logits only and is exact:
    dKL(p||q)/ds = (q - p) / T; dKL(q||p)/ds_j = q_j [(log q_j - log p_j) - KL(q||p)] / T;
    dJSD/ds_j = (1 - beta) q_j [(log q_j - log M_j) - KL(q||M)] / T.

    Args:
        student_logits: [..., V] student logits, fp32/bf16/fp16 (fp64 on the cpp and torch
            backends). Arithmetic is fp32 (fp64 for fp64 student logits).
        teacher_logits: [..., V'] teacher logits; any floating dtype; V' == V unless
            ``teacher_vocab="truncate"``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation weight in [0, 1].
        temperature: T > 0; divides both logit sets.
        scale_by_temperature_squared: multiply the divergence term by T**2 (Hinton et al.); the
            cross-entropy term is not scaled.
        labels: [...] integer labels (the logits' leading shape) or None; label i belongs to
            row i (shift them beforehand for causal LM logits). They mask rows and are the
            targets of the cross-entropy term. With ``hard_label_weight > 0`` a label outside
            [0, V) on a row that is not ignored is an error: the cpp and torch backends raise,
            the Triton kernels (which cannot raise without a device sync) give that row a NaN
            loss and gradient.
        ignore_index: label value of rows to skip.
        reduction: ``"batchmean"`` (sum over rows / valid rows, or / ``num_items_in_batch``),
            ``"mean"`` (sum / (valid rows * V)), ``"sum"``, or ``"none"`` (per-row loss of the
            logits' leading shape, 0 on ignored rows). Denominators are clamped to at least 1, so
            an all-ignored batch gives 0 and a zero gradient.
        num_items_in_batch: divisor of the summed loss with ``batchmean`` (the number of valid
            tokens across gradient-accumulation steps); int or 0-dim tensor.
        hard_label_weight: weight w in [0, 1] of the cross-entropy term (needs labels).
        teacher_vocab: ``"error"`` (default) raises when the vocabulary sizes differ;
            ``"truncate"`` keeps the teacher's first V entries when V' > V (the teacher's softmax
            is then taken over those V entries).
        inplace_grad: write the gradient over the student logits' buffer in backward (their
            values are lost; use when nothing else reads them, e.g. logits of an lm_head whose
            backward needs only its inputs). The extra memory is then O(N).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        A 0-dim fp32 loss (fp64 for fp64 student logits), or the per-row loss for ``"none"``.

    Raises:
        TypeError: non-tensor or non-floating logits, non-integer labels.
        ValueError: mismatched shapes, devices or vocabulary sizes, bad options.
    """
    _check_options(divergence, beta, temperature, reduction, hard_label_weight, teacher_vocab)
    teacher_logits = _check_logits(student_logits, teacher_logits, teacher_vocab)
    if hard_label_weight > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    if num_items_in_batch is not None and reduction != "batchmean":
        raise ValueError(
            f"num_items_in_batch is used with reduction='batchmean', not {reduction!r}"
        )
    flat_labels = _check_labels(labels, student_logits) if labels is not None else None

    vocab = student_logits.shape[-1]
    device = student_logits.device
    has_fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    chosen = _choose_backend(backend, device.type, has_fp64)

    code, t2, w = _divergence_terms(
        divergence, beta, temperature, scale_by_temperature_squared, hard_label_weight
    )
    rows = DistillationLossFunction.apply(
        _rows(student_logits, vocab),
        _rows(teacher_logits, vocab),
        flat_labels,
        code,
        float(beta),
        float(temperature),
        (1.0 - w) * t2,
        w,
        int(ignore_index),
        chosen,
        bool(inplace_grad),
    )
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    total = rows.sum()
    if reduction == "sum":
        return total
    if flat_labels is None:
        n_valid = max(rows.shape[0], 1)
    else:
        n_valid = (flat_labels != ignore_index).sum().clamp_min(1).to(rows.dtype)
    if reduction == "mean":
        return total / (n_valid * vocab)
    if num_items_in_batch is not None:
        if not isinstance(num_items_in_batch, torch.Tensor):  # a host number: no copy, no sync
            return total / max(float(num_items_in_batch), 1.0)
        return total / num_items_in_batch.to(device).clamp_min(1).to(rows.dtype)
    return total / n_valid


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`; the keywords are fixed at construction.

    Example::

        loss_fn = DistillationLoss(divergence="jsd", beta=0.5, temperature=2.0)
        loss = loss_fn(student_logits, teacher_logits, labels=labels)
    """

    def __init__(
        self,
        *,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = False,
        ignore_index: int = -100,
        reduction: Reduction = "batchmean",
        hard_label_weight: float = 0.0,
        teacher_vocab: TeacherVocab = "error",
        inplace_grad: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        _check_options(divergence, beta, temperature, reduction, hard_label_weight, teacher_vocab)
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.hard_label_weight = hard_label_weight
        self.teacher_vocab = teacher_vocab
        self.inplace_grad = inplace_grad
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`distillation_loss`; ``labels`` and ``num_items_in_batch`` per call."""
        return distillation_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    _OPTIONS = (
        "divergence",
        "beta",
        "temperature",
        "scale_by_temperature_squared",
        "ignore_index",
        "reduction",
        "hard_label_weight",
        "teacher_vocab",
        "inplace_grad",
        "backend",
    )

    @property
    def options(self) -> dict:
        """The keywords fixed at construction, as passed to :func:`distillation_loss`."""
        return {k: getattr(self, k) for k in self._OPTIONS}

    def with_options(self, **changes) -> DistillationLoss:
        """A new module with some keywords changed (checked like the constructor's)."""
        unknown = set(changes) - set(self._OPTIONS)
        if unknown:
            raise TypeError(f"unknown DistillationLoss options {sorted(unknown)}")
        return DistillationLoss(**{**self.options, **changes})

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, hard_label_weight={self.hard_label_weight}, "
            f"backend={self.backend!r}"
        )
