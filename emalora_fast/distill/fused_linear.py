"""Fused-linear distillation loss: from hidden states to the loss, the logits never in memory.

:func:`fused_linear_distillation_loss` and :class:`FusedLinearDistillationLoss` compute
:func:`~emalora_fast.distill.loss.distillation_loss` of the logits
``s = softcap(h_s W_s^T + b_s)`` and ``t = softcap(h_t W_t^T + b_t)`` without ever holding the
[N, V] logits of either model, nor their gradient. One :class:`torch.autograd.Function` wraps
the backends (their code is in :mod:`emalora_fast.distill.fused_linear_paths`):

- ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): the kernels of
  ``emalora_fast.kernels.fused_linear``. Logits exist only as [BLOCK_N, BLOCK_V] tiles in
  registers: pass 1 keeps online log-sum-exp statistics per row (split over the vocabulary and
  merged here with a few O(N) torch ops), interior-beta JSD takes a second pass for KL(p||M) and
  KL(q||M), and the backward pass recomputes each tile and forms g = dL/dz: by default it writes
  g for a chunk of rows and two GEMMs give grad_h = g W and grad_W = g^T h in the weight's dtype
  (no atomics); ``EMALORA_FUSED_LINEAR_BACKWARD=atomic`` pushes each tile straight into fp32
  grad_h and grad_W with relaxed atomic adds instead.
- ``"cpp"`` and ``"torch"`` (any device; float64 too): chunks of ``rows`` tokens (only rows
  whose label counts) by the whole vocabulary. Each chunk's logits [rows, V] are formed with one
  fp32 (fp64) matmul per model (one for both when the head is shared), handed to the row ops of
  the logits loss (the C++ op or the torch path of :mod:`emalora_fast.distill.loss`: statistics,
  then dL/ds written over the chunk's own logits) and multiplied into grad_h and grad_W. ``rows`` is
  chosen so that a chunk holds about 4 M logits, so the extra memory is a few chunk buffers
  whatever N is. The vocabulary is not tiled on this path: the row ops stream it themselves.

The forward pass saves the inputs and O(N) row statistics. The gradient is formed in backward,
which recomputes the logits (one more matmul pass) and scales each row by its incoming gradient
(``reduction="none"`` with any grad_output, reductions, ``num_items_in_batch``); masked rows get
exactly zero. On the chunked path, when the result is a scalar and a student input requires
grad, the forward sweep forms the gradient as well, from the chunk's logits already in hand (as
Liger's fused-linear losses do), and backward only multiplies it by grad_output: four matmul
passes in all instead of six.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._dispatch import load_triton, resolve
from .checks import (
    Divergence,
    Reduction,
    TeacherVocab,
    _check_labels,
    _check_options,
    _divergence_terms,
    _teacher_vocab_matches,
)
from .fused_linear_paths import (
    _OP,
    _TRITON,
    _acc_dtype,
    _as,
    _Config,
    _sweep,
    _triton_bwd,
    _triton_fwd,
)
from .loss import (
    _choose_backend,
)

__all__ = ["FusedLinearDistillationLoss", "fused_linear_distillation_loss"]


# ------------------------------------------------------------------------------------------------
# The autograd Function.
# ------------------------------------------------------------------------------------------------
class FusedLinearDistillationFunction(torch.autograd.Function):
    """The loss from hidden states [N, H] and heads [V, H]; gradient for the student's hidden
    states, weight and bias only.

    Returns the per-row loss [N] when ``scale`` is None, else ``scale * sum(rows)`` (0-dim).
    Forward runs the statistics pass(es) and saves the inputs and the O(N) row statistics;
    backward recomputes the logits (tiles or chunks) and forms the gradient, scaled row by row by
    the incoming gradient. One exception, on the chunked path: with a scalar result and a
    student input that requires grad, the one forward sweep over the chunks forms the gradient
    too (for grad_output 1, from the chunk's logits already in hand: no second matmul pass), and
    backward scales it by grad_output (a second backward through a retained graph recomputes).
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, scale, cfg: _Config):
        ctx.grads = None
        if cfg.backend == "triton":
            loss, stats = _triton_fwd(hs, ws, bs, ht, wt, bt, labels, cfg)
        else:
            early = cfg.grads_in_forward and scale is not None
            grad_rows = scale.to(_acc_dtype(hs, ht)).expand(hs.shape[0]) if early else None
            loss, stats, grads = _sweep(
                hs, ws, bs, ht, wt, bt, labels, cfg, cfg.need, grad_rows=grad_rows
            )
            if early:
                ctx.grads = grads
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels, stats, scale)
        ctx.cfg = cfg
        return loss if scale is None else loss.sum() * scale.to(loss.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt, labels, stats, scale = ctx.saved_tensors
        cfg = ctx.cfg
        need = tuple(ctx.needs_input_grad[:3])
        grads = (None, None, None)
        if ctx.grads is not None:  # formed in forward for grad_output 1
            grads, ctx.grads = ctx.grads, None
            grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
        elif any(need):
            grad_rows = grad_out if scale is None else (grad_out * scale).expand(hs.shape[0])
            grad_rows = grad_rows.to(stats.dtype).contiguous()
            if cfg.backend == "triton":
                grads = _triton_bwd(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, cfg, need)
            else:
                grads = _sweep(
                    hs, ws, bs, ht, wt, bt, labels, cfg, need, stats=stats, grad_rows=grad_rows
                )[2]
        gh, gw, gb = (g if n else None for g, n in zip(grads, need, strict=True))
        return (
            _as(gh, hs.dtype),
            _as(gw, ws.dtype),
            None if gb is None else _as(gb, bs.dtype),
            None, None, None, None, None, None,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The public API.
# ------------------------------------------------------------------------------------------------
_TENSOR_NAMES = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


def _check_fused_options(softcap, grad_filter_eps) -> None:
    if softcap is not None and not (
        isinstance(softcap, int | float) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if grad_filter_eps is not None and not (
        isinstance(grad_filter_eps, int | float)
        and math.isfinite(grad_filter_eps)
        and grad_filter_eps >= 0
    ):
        raise ValueError(f"grad_filter_eps must be None or a finite number >= 0, got "
                         f"{grad_filter_eps!r}")  # fmt: skip


def _check_tensors(hs, ws, ht, wt, bs, bt, teacher_vocab):
    """Validates the inputs; returns the teacher weight and bias cut to the student vocabulary."""
    tensors = (hs, ws, ht, wt)
    for name, x in zip(_TENSOR_NAMES, tensors, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be floating point (fp32, bf16, fp16, fp64), got {x.dtype}"
            )
    for name, x in (("student_weight", ws), ("teacher_weight", wt)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [V, H], got shape {tuple(x.shape)}")
    for name, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{name}_hidden {tuple(h.shape)} does not end in the hidden size {w.shape[1]} of "
                f"{name}_weight {tuple(w.shape)}"
            )
        if h.dtype != w.dtype:
            raise TypeError(f"{name}_hidden ({h.dtype}) and {name}_weight ({w.dtype}) differ in "
                            "dtype")  # fmt: skip
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} have "
            "different leading shapes"
        )
    for name, b, w in (("student_bias", bs, ws), ("teacher_bias", bt, wt)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
        if b.shape != (w.shape[0],) or b.dtype != w.dtype:
            raise ValueError(
                f"{name} must have shape ({w.shape[0]},) and dtype {w.dtype}, got "
                f"{tuple(b.shape)} {b.dtype}"
            )
    devices = {x.device for x in (*tensors, bs, bt) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    v_s, v_t = ws.shape[0], wt.shape[0]
    if v_s == 0:
        raise ValueError("the vocabulary dimension of the weights is empty")
    if ws.shape[1] == 0 or wt.shape[1] == 0:
        raise ValueError("the hidden dimension of the weights is empty")
    if not _teacher_vocab_matches(v_s, v_t, teacher_vocab):
        return wt[:v_s], (bt[:v_s] if bt is not None else None)
    return wt, bt


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is y
    return x is y or (
        x.data_ptr() == y.data_ptr()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x.dtype == y.dtype
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    if x.dim() == 1:
        return x if x.stride(0) == 1 else x.contiguous()
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _choose(backend: str, device: torch.device, has_fp64: bool) -> str:
    """The concrete backend (``"triton"``, ``"cpp"`` or ``"torch"``), loaded."""
    chosen = resolve(backend, device, _OP)
    if chosen == "triton" and has_fp64:
        if backend == "triton":
            raise TypeError("the triton backend takes fp32/bf16/fp16 tensors, not float64")
        chosen = "torch"
    if chosen == "triton":
        _TRITON[_OP] = load_triton(_OP)
    else:  # the row ops of the logits loss (registers the C++ op's fakes)
        _choose_backend(chosen, device.type, has_fp64)
    return chosen


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    reduction: Reduction = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    teacher_vocab: TeacherVocab = "error",
    grad_filter_eps: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss of the logits of two linear heads, never materializing the logits.

    Equal to :func:`~emalora_fast.distill.loss.distillation_loss` applied to the logits
    ``s = softcap(h_s W_s^T + b_s)`` and ``t = softcap(h_t W_t^T + b_t)``, with
    ``softcap(z) = c tanh(z / c)`` when ``softcap=c`` (Gemma's final logit soft-capping) and the
    identity otherwise. Per row, with a = s / T, b = t / T, log q = log_softmax(a) (student) and
    log p = log_softmax(b) (teacher)::

        forward_kl = KL(p || q),  reverse_kl = KL(q || p),
        jsd        = beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q,
        row loss   = (1 - w) c_T D + w CE,  c_T = T**2 if scale_by_temperature_squared else 1,
                     CE = logsumexp(s) - s[label]   (raw logits, T = 1)

    The gradient reaches ``student_hidden``, ``student_weight`` and ``student_bias`` (those that
    require it): with g = dL/dz [N, V] (the logits loss gradient times 1 - (s/c)^2 under softcap),
    grad_h = g W_s, grad_W = g^T h_s, grad_b = sum_rows g, formed tile by tile (Triton) or chunk
    by chunk (cpp / torch). The teacher's tensors get no gradient; when ``teacher_weight`` is
    ``student_weight`` the weight is read once per tile for both models and no teacher weight
    gradient is formed. Rows whose label is ``ignore_index`` contribute 0, are never read, and
    get exactly zero gradient. The gradient is formed in backward, except on the chunked path
    (cpp / torch) for a scalar loss with grad enabled: there the forward sweep forms it too, for
    grad_output 1, and backward scales it (so a forward without backward costs a gradient pass).

    Args:
        student_hidden: [..., H] student hidden states (fp32/bf16/fp16; fp64 on cpp and torch).
        student_weight: [V, H] student output head, the dtype of ``student_hidden``.
        teacher_hidden: [..., H_t] teacher hidden states, the leading shape of
            ``student_hidden``.
        teacher_weight: [V_t, H_t] teacher output head (may be ``student_weight`` itself).
        student_bias: [V] or None.
        teacher_bias: [V_t] or None.
        softcap: final logit soft-capping c > 0, or None.
        labels: [...] integer labels (the hidden states' leading shape) or None: they mask rows
            and are the targets of the cross-entropy term.
        ignore_index: label value of rows to skip.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD weight in [0, 1] (TRL's convention: 0 is forward KL, 1 reverse KL).
        temperature: T > 0; divides both logit sets.
        scale_by_temperature_squared: multiply the divergence term by T**2.
        reduction: ``"batchmean"`` (sum / valid rows, or / ``num_items_in_batch``), ``"mean"``
            (sum / (valid rows * V)), ``"sum"`` or ``"none"`` (per-row loss of the leading
            shape). Denominators are clamped to at least 1.
        num_items_in_batch: divisor of the summed loss with ``batchmean``; int or 0-dim tensor.
        hard_label_weight: weight w in [0, 1] of the cross-entropy term (needs labels).
        teacher_vocab: ``"error"`` raises when V_t != V; ``"truncate"`` keeps the teacher's first
            V rows (and bias entries) when V_t > V.
        grad_filter_eps: None (default: exact) or eps >= 0: backward tiles (a block of tokens by
            a block of vocabulary entries: the Triton tile, or ``rows`` x 256 on the chunked
            path) whose every |dl_i/dz_ij| is at most eps (row loss l_i, before the reduction)
            are left out of the gradients, as cut-cross-entropy does. The error of each gradient
            entry is then at most eps |grad_output_i| times the sum of the |W| (or |h|) entries
            of the skipped tiles. It saves time with the Triton backend's atomic backward only.
        backend: ``"auto"`` (CUDA: triton; CPU: cpp when built, else torch), ``"triton"``,
            ``"cpp"`` or ``"torch"``.

    Returns:
        A 0-dim fp32 loss (fp64 for fp64 inputs), or the per-row loss for ``"none"``.

    Raises:
        TypeError: non-tensor or non-floating inputs, mismatched dtypes, non-integer labels.
        ValueError: mismatched shapes, devices or vocabulary sizes, bad options.
    """
    _check_options(divergence, beta, temperature, reduction, hard_label_weight, teacher_vocab)
    _check_fused_options(softcap, grad_filter_eps)
    wt, bt = _check_tensors(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, teacher_vocab,
    )  # fmt: skip
    if hard_label_weight > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    if num_items_in_batch is not None and reduction != "batchmean":
        raise ValueError(
            f"num_items_in_batch is used with reduction='batchmean', not {reduction!r}"
        )
    flat_labels = _check_labels(labels, student_hidden) if labels is not None else None

    device = student_hidden.device
    vocab = student_weight.shape[0]
    has_fp64 = torch.float64 in (student_hidden.dtype, teacher_hidden.dtype)
    chosen = _choose(backend, device, has_fp64)

    code, t2, w = _divergence_terms(
        divergence, beta, temperature, scale_by_temperature_squared, hard_label_weight
    )
    need = (
        student_hidden.requires_grad,
        student_weight.requires_grad,
        student_bias is not None and student_bias.requires_grad,
    )
    cfg = _Config(
        backend=chosen,
        vocab=vocab,
        shared=_same(student_weight, teacher_weight),
        divergence=code,
        beta=float(beta),
        temperature=float(temperature),
        div_scale=(1.0 - w) * t2,
        ce_scale=w,
        ignore_index=int(ignore_index),
        softcap=None if softcap is None else float(softcap),
        eps=None if grad_filter_eps is None else float(grad_filter_eps),
        has_ce=flat_labels is not None and w != 0.0,
        need=need,
        grads_in_forward=torch.is_grad_enabled() and any(need),
    )
    acc = torch.float64 if has_fp64 else torch.float32
    n_rows = math.prod(student_hidden.shape[:-1])
    scale = _reduction_scale(
        reduction, flat_labels, ignore_index, n_rows, vocab, num_items_in_batch, acc, device
    )
    out = FusedLinearDistillationFunction.apply(
        _rows(student_hidden),
        _unit_stride(student_weight),
        _unit_stride(student_bias),
        _rows(teacher_hidden),
        _unit_stride(wt),
        _unit_stride(bt),
        flat_labels,
        scale,
        cfg,
    )
    return out.reshape(student_hidden.shape[:-1]) if scale is None else out


def _reduction_scale(reduction, labels, ignore_index, n_rows, vocab, num_items, dtype, device):
    """The factor of the summed row losses (None for ``"none"``): 1, 1 / valid rows,
    1 / (valid rows * V) or 1 / num_items_in_batch, each denominator clamped to >= 1."""
    if reduction == "none":
        return None
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if reduction == "batchmean" and num_items is not None:
        if isinstance(num_items, torch.Tensor):
            denom = num_items.to(device=device, dtype=dtype)
        else:  # a host number: a fill, no host-to-device copy
            denom = torch.full((), float(num_items), dtype=dtype, device=device)
    elif labels is None:
        denom = torch.full((), n_rows, dtype=dtype, device=device)
    else:
        denom = (labels != ignore_index).sum().to(dtype)
    denom = denom.clamp_min(1)
    if reduction == "mean":
        denom = denom * vocab
    return 1.0 / denom


class FusedLinearDistillationLoss(nn.Module):
    """Module form of :func:`fused_linear_distillation_loss`; options fixed at construction.

    Example::

        loss_fn = FusedLinearDistillationLoss(divergence="jsd", beta=0.5, temperature=2.0)
        loss = loss_fn(student_hidden, lm_head.weight, teacher_hidden, lm_head.weight,
                       labels=labels)
    """

    def __init__(
        self,
        *,
        softcap: float | None = None,
        ignore_index: int = -100,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = False,
        reduction: Reduction = "batchmean",
        hard_label_weight: float = 0.0,
        teacher_vocab: TeacherVocab = "error",
        grad_filter_eps: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_options(divergence, beta, temperature, reduction, hard_label_weight, teacher_vocab)
        _check_fused_options(softcap, grad_filter_eps)
        self.options = dict(
            softcap=softcap,
            ignore_index=ignore_index,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            scale_by_temperature_squared=scale_by_temperature_squared,
            reduction=reduction,
            hard_label_weight=hard_label_weight,
            teacher_vocab=teacher_vocab,
            grad_filter_eps=grad_filter_eps,
            backend=backend,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`fused_linear_distillation_loss`; tensors, labels and
        ``num_items_in_batch`` per call."""
        return fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
