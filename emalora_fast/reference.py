"""Pure-PyTorch formulas of every op: the test oracle (run in float64) and the fallback backend.

Readability over speed; every function works in whatever floating dtype its state tensors have.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "averager_update_",
    "distillation_loss_reference",
    "fused_linear_distillation_loss_reference",
]


@torch.no_grad()
def averager_update_(
    params: list[torch.Tensor],
    ema: list[torch.Tensor],
    theta0: list[torch.Tensor] | None,
    out: list[torch.Tensor] | None,
    teachers: list[torch.Tensor] | None,
    flag: torch.Tensor,
    weights: list[float],
    alpha: float,
    reset: bool,
    teacher_from_ema: bool = False,
    teacher_profile: int = 0,
) -> None:
    """Fused EMA / BEMA update of K EMA profiles, in place, tensor by tensor.

    For each tensor (theta cast to the state dtype) and each profile k::

        reset:  ema[k] = theta0 = out = theta
        update: ema[k] = ema[k] + w[k] * (theta - ema[k])       (the lerp form)
                out    = ema[0] + alpha * (theta - theta0)       (BEMA, K = 1: theta0/out given)
        teacher = (out if BEMA and not teacher_from_ema else ema[teacher_profile]), cast to the
                  teacher's dtype

    Elements whose theta is not finite keep all their state and set ``flag`` to 1.

    Args:
        params: live tensors theta.
        ema: shadow tensors, ``[K, *shape]`` for a parameter of ``shape``.
        theta0: BEMA anchors (shapes of ``params``), or None for EMA.
        out: BEMA outputs, or None for EMA (given together with ``theta0``).
        teachers: tensors to receive the averaged value, or None.
        flag: int32 tensor of one element, set to 1 on a non-finite theta.
        weights: per profile, the weight w of theta (EMA: 1 - d; BEMA: beta), a host float
            (rounded to the state dtype by the arithmetic: fp32 once, or kept in float64).
        alpha: BEMA bias-correction weight.
        reset: copy theta into the state instead of averaging.
        teacher_from_ema: BEMA: the teachers receive ``ema`` instead of ``out``.
        teacher_profile: the profile the teachers receive (EMA).
    """
    is_bema = theta0 is not None
    for i, p in enumerate(params):
        e = ema[i]
        theta = p.detach().reshape(e.shape[1:]).to(e.dtype)
        ok = torch.isfinite(theta)
        flag.copy_(torch.maximum(flag, (~ok.all()).to(flag.dtype)))
        for k in range(e.shape[0]):
            new_ema = theta if reset else e[k] + weights[k] * (theta - e[k])
            e[k].copy_(torch.where(ok, new_ema, e[k]))
        avg = e[teacher_profile]
        if is_bema:
            if reset:
                theta0[i].copy_(torch.where(ok, theta, theta0[i]))
                new_out = theta
            else:
                new_out = e[0] + alpha * (theta - theta0[i])
            out[i].copy_(torch.where(ok, new_out, out[i]))
            if not teacher_from_ema:
                avg = out[i]
        if teachers is not None:
            t = teachers[i]
            t.copy_(torch.where(ok, avg, t.to(avg.dtype)).reshape(t.shape))


def _masked_mul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w * x`` with 0 where ``w == 0`` (so 0 * inf is 0), safe for autograd."""
    nz = w > 0
    return torch.where(nz, w * torch.where(nz, x, torch.zeros_like(x)), torch.zeros_like(w))


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p + (1 - beta) * q) as a logaddexp of log-probabilities, -inf where both are 0."""
    x = log_p + math.log(beta)
    y = log_q + math.log1p(-beta)
    both_zero = torch.isneginf(x) & torch.isneginf(y)
    safe_x = torch.where(both_zero, torch.zeros_like(x), x)
    safe_y = torch.where(both_zero, torch.zeros_like(y), y)
    return torch.where(both_zero, x, torch.logaddexp(safe_x, safe_y))


def distillation_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
) -> torch.Tensor:
    """Teacher-student distillation loss, materializing every [N, V] term (the test oracle).

    Computes in the dtype of ``student_logits`` (pass float64 tensors for the oracle); the teacher
    is cast to it. Differentiable in the student logits through ordinary autograd. With
    ``a = s / T``, ``b = t / T``, ``log q = log_softmax(a)``, ``log p = log_softmax(b)`` per row::

        forward_kl = sum_v p_v (log p_v - log q_v)                      KL(p || q)
        reverse_kl = sum_v q_v (log q_v - log p_v)                      KL(q || p)
        jsd        = beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q
                     (beta = 0 is forward_kl and beta = 1 is reverse_kl)
        row loss   = (1 - w) c D + w CE,  c = T**2 if scale_by_temperature_squared else 1,
                     CE = logsumexp(s) - s[label]   (raw logits, T = 1)

    Terms with a zero weight (p_v = 0 or q_v = 0) contribute 0, so -inf logits stay finite.
    Rows whose label is ``ignore_index`` contribute 0. Reductions: ``batchmean`` = sum / valid
    rows (or / ``num_items_in_batch``), ``mean`` = sum / (valid rows * V), ``sum``, ``none``
    (per-row loss, shape ``student_logits.shape[:-1]``). Denominators are clamped to at least 1.

    Args:
        student_logits: [..., V] logits s.
        teacher_logits: [..., V] logits t.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation weight in [0, 1].
        temperature: T > 0 dividing both logit sets.
        scale_by_temperature_squared: multiply the divergence by T**2.
        labels: [...] integer labels or None.
        ignore_index: label value of rows to skip.
        reduction: ``"batchmean"``, ``"mean"``, ``"sum"`` or ``"none"``.
        num_items_in_batch: divisor of the summed loss for ``batchmean``.
        hard_label_weight: weight w of the cross-entropy term.

    Returns:
        The reduced loss (0-dim), or the per-row loss for ``reduction="none"``.
    """
    dtype = student_logits.dtype
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab).to(dtype)
    a = s / temperature
    b = t / temperature
    log_q = torch.log_softmax(a, dim=-1)
    log_p = torch.log_softmax(b, dim=-1)
    q = log_q.exp()
    p = log_p.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        div = _masked_mul(p, log_p - log_q).sum(-1)
    elif divergence == "reverse_kl":
        div = _masked_mul(q, log_q - log_p).sum(-1)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        kl_pm = _masked_mul(p, log_p - log_m).sum(-1)
        kl_qm = _masked_mul(q, log_q - log_m).sum(-1)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    row = (1.0 - hard_label_weight) * scale * div
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if hard_label_weight > 0:
            target = torch.where(valid, flat, torch.zeros_like(flat))
            ce = torch.logsumexp(s, dim=-1) - s.gather(1, target[:, None])[:, 0]
            row = row + hard_label_weight * ce
        row = torch.where(valid, row, torch.zeros_like(row))
        n_valid = valid.sum()
    else:
        n_valid = torch.tensor(row.shape[0], device=row.device)
    if reduction == "none":
        return row.reshape(student_logits.shape[:-1])
    total = row.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (n_valid.clamp_min(1) * vocab).to(dtype)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=row.device)
        return total / denom.clamp_min(1).to(dtype)
    return total / n_valid.clamp_min(1).to(dtype)


def fused_linear_distillation_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    teacher_vocab: str = "error",
    **kwargs,
) -> torch.Tensor:
    """The fused-linear distillation loss, materializing both models' logits (the test oracle).

    Computes in the dtype of ``student_hidden`` (pass float64 tensors for the oracle)::

        s = softcap(h_s W_s^T + b_s),  t = softcap(h_t W_t^T + b_t)[..., :V],
        softcap(z) = c tanh(z / c)  (identity when ``softcap`` is None)

    and returns :func:`distillation_loss_reference` of (s, t) with ``kwargs``. Differentiable in
    the student's hidden states, weight and bias through ordinary autograd; the teacher's tensors
    are detached (they get no gradient, also when the teacher's weight is the student's).

    Args:
        student_hidden: [..., H] hidden states h_s.
        student_weight: [V, H] weight W_s.
        teacher_hidden: [..., H_t] hidden states h_t.
        teacher_weight: [V_t, H_t] weight W_t.
        student_bias: [V] or None.
        teacher_bias: [V_t] or None.
        softcap: soft-capping constant c, or None.
        teacher_vocab: ``"truncate"`` keeps the teacher's first V logits when V_t > V.
        **kwargs: the options of :func:`distillation_loss_reference`.

    Returns:
        The reduced loss (0-dim), or the per-row loss for ``reduction="none"``.
    """
    dtype = student_hidden.dtype
    vocab = student_weight.shape[0]

    def logits(h, w, b):
        z = h @ w.to(dtype).t()
        if b is not None:
            z = z + b.to(dtype)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    s = logits(student_hidden, student_weight, student_bias)
    tb = None if teacher_bias is None else teacher_bias.detach()
    t = logits(teacher_hidden.detach().to(dtype), teacher_weight.detach(), tb)
    if t.shape[-1] != vocab:
        if teacher_vocab != "truncate" or t.shape[-1] < vocab:
            raise ValueError(f"teacher vocabulary {t.shape[-1]} differs from {vocab}")
        t = t[..., :vocab]
    return distillation_loss_reference(s, t, **kwargs)
