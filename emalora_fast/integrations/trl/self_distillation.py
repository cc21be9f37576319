"""SDFT/SDPO's per-token distillation losses, without a full-vocabulary log-softmax.

TRL's ``trl.experimental.sdft.loss_utils`` (and the identical ``sdpo`` one) computes the three
``distillation_mode`` objectives from two [B, T, V] log-softmaxes (full_logits), two
``selective_log_softmax`` passes (sampled_token) or two ``logsumexp`` over V (topk_logits). The
drop-ins here have the same signatures and return the same per-token losses [B, T], computed by
the streamed kernels of :func:`emalora_fast.distillation_loss`:

- ``full_logits``: D(q, p) per position (alpha as TRL's beta: 0 forward KL, 1 reverse KL).
- ``sampled_token``: ``(log q_y - log p_y).detach() * log q_y`` at the sampled token y, with
  log q_y = -CE(s, y) from the streamed cross-entropy.
- ``topk_logits``: the student's top-k support, the teacher gathered on it, TRL's tail bucket or
  renormalisation and divergence on those k entries; the two normalisers LSE(s) and LSE(t) come
  from the streamed cross-entropy (LSE(x) = CE(x, y) + x_y), so no [B, T, V] temporary is formed
  besides the student gradient.
"""

from __future__ import annotations

import torch
from trl.experimental.sdft import loss_utils as _sdft_losses

from ... import distillation_loss
from ._checks import _divergence

__all__ = [
    "compute_full_logit_self_distillation_loss",
    "compute_sampled_token_self_distillation_loss",
    "compute_topk_self_distillation_loss",
]


def _log_prob_at(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] per position, [B, T], streamed: -CE(logits, index).
    The gradient reaches ``logits`` (softmax - onehot, times -1) and is exact."""
    return -distillation_loss(
        logits, logits.detach(), labels=index, hard_label_weight=1.0, reduction="none"
    )


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """LSE over the last dimension, [B, T, 1], streamed: CE(x, y) + x_y for y = argmax."""
    top = logits.detach().argmax(-1)
    lse = -_log_prob_at(logits, top) + logits.gather(-1, top[..., None])[..., 0]
    return lse[..., None]


def compute_full_logit_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    distillation_alpha: float,
) -> torch.Tensor:
    """Per-position divergence over the full vocabulary, [B, T] (TRL's ``full_logits``)."""
    return distillation_loss(
        student_logits, teacher_logits, reduction="none", **_divergence(distillation_alpha)
    )


def compute_sampled_token_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    distillation_alpha: float,
) -> torch.Tensor:
    """``(log q_y - log p_y).detach() * log q_y`` at the sampled tokens y, [B, T]."""
    if distillation_alpha != 1.0:
        raise ValueError(
            "Only reverse KL (alpha=1.0) is supported for token-level distillation when "
            f"`distillation_mode='sampled_token'`, got alpha={distillation_alpha}"
        )
    student = _log_prob_at(student_logits, completion_ids)
    with torch.no_grad():
        teacher = _log_prob_at(teacher_logits, completion_ids)
    return (student - teacher).detach() * student


def compute_topk_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    distillation_topk: int,
    distillation_alpha: float,
    distillation_add_tail: bool,
) -> torch.Tensor:
    """TRL's top-k objective, [B, T]: the student's top-k entries, the teacher gathered on
    them, then a tail bucket (``distillation_add_tail``) or renormalisation, then the
    divergence on k (+ 1) entries; the normalisers are streamed."""
    topk_student_logits, topk_indices = torch.topk(student_logits, k=distillation_topk, dim=-1)
    topk_student = topk_student_logits - _logsumexp(student_logits)
    with torch.no_grad():
        topk_teacher = teacher_logits.gather(-1, topk_indices) - _logsumexp(teacher_logits)
    if distillation_add_tail:
        topk_student = _sdft_losses.add_tail_bucket(topk_student)
        topk_teacher = _sdft_losses.add_tail_bucket(topk_teacher)
    else:
        topk_student = topk_student - torch.logsumexp(topk_student, dim=-1, keepdim=True)
        topk_teacher = topk_teacher - torch.logsumexp(topk_teacher, dim=-1, keepdim=True)
    return _sdft_losses.compute_divergence(topk_student, topk_teacher, distillation_alpha)


REPLACEMENTS = {
    "compute_full_logit_self_distillation_loss": compute_full_logit_self_distillation_loss,
    "compute_sampled_token_self_distillation_loss": compute_sampled_token_self_distillation_loss,
    "compute_topk_self_distillation_loss": compute_topk_self_distillation_loss,
}
