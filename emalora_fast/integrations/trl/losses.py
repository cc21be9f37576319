"""Drop-ins for TRL's distillation losses, computed by this package's streamed kernels.

- :func:`generalized_jsd_loss` has the signature of ``GKDTrainer.generalized_jsd_loss`` (and
  :func:`gold_generalized_jsd_loss` that of ``GOLDTrainer``'s) and gives the same values:
  TRL takes two full [B, T, V] log-softmaxes and a [B, T, V] divergence tensor; this streams the
  vocabulary with an online log-sum-exp (:func:`emalora_fast.distillation_loss`).
- :func:`chunked_divergence_loss` has the signature of ``DistillationTrainer``'s loss
  (``trl.trainer.distillation_trainer._chunked_divergence_loss``, TRL's fused-linear hook since
  it replaced the Liger loss) and returns the same ``(loss, entropy_sum, n_valid)``, computed by
  :func:`emalora_fast.fused_linear_distillation_loss` from hidden states and heads.
- :func:`use_streamed_losses` switches a constructed GKD, GOLD, Distillation, SDFT or SDPO
  trainer to them (SDFT/SDPO: :mod:`.self_distillation`).

beta follows TRL: 0 is forward KL(teacher || student), 1 reverse KL(student || teacher), in
between the generalized JSD with mixture M = beta p_teacher + (1 - beta) p_student.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from trl.experimental.gkd import GKDTrainer
from trl.experimental.gold import GOLDTrainer
from trl.experimental.sdft import SDFTTrainer
from trl.experimental.sdpo import SDPOTrainer
from trl.trainer import distillation_trainer as _trl_distillation

from ... import distillation_loss, fused_linear_distillation_loss
from ._checks import _divergence

__all__ = [
    "chunked_divergence_loss",
    "generalized_jsd_loss",
    "gold_generalized_jsd_loss",
    "use_streamed_losses",
]

TrlReduction = Literal["batchmean", "sum", "mean", "none"]
_IGNORE = -100  # TRL's label mask value


def _divide(total: torch.Tensor, num_items: int | float | torch.Tensor) -> torch.Tensor:
    """``total / num_items`` as TRL divides (no clamp): a host number stays on the host."""
    if isinstance(num_items, torch.Tensor):
        return total / num_items.to(total.device)
    return total / num_items


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: TrlReduction = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``GKDTrainer.generalized_jsd_loss``, streamed over the vocabulary.

    With a = s / T, b = t / T, log q = log_softmax(a), log p = log_softmax(b), per position::

        beta = 0:   D = KL(p || q)
        beta = 1:   D = KL(q || p)
        otherwise:  D = beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q

    summed over the positions whose label is not -100 (all positions without labels), then
    reduced as TRL does: with ``num_items_in_batch``, ``sum / num_items_in_batch`` whatever
    ``reduction``; else ``"batchmean"`` = sum / valid positions (clamped to >= 1), or / B without
    labels (TRL divides by the first dimension then); ``"sum"``; ``"mean"`` = sum / (valid
    positions * V). ``reduction="none"`` returns TRL's elementwise [..., V] tensor, which is
    itself full-vocabulary, so TRL's own function computes it.

    The arithmetic is fp32 whatever the logits' dtype (TRL's is in the logits' dtype), and the
    gradient reaches ``student_logits`` only (TRL's trainers give teacher logits no gradient).

    Args:
        student_logits: [B, T, V] (or [N, V]) student logits.
        teacher_logits: teacher logits of the same shape.
        labels: [B, T] (the logits' leading shape) with -100 at ignored positions, or None.
        beta: interpolation weight in [0, 1].
        temperature: T > 0, divides both logit sets.
        reduction: ``"batchmean"``, ``"sum"``, ``"mean"`` or ``"none"``.
        num_items_in_batch: global count of valid tokens (gradient accumulation), or None.

    Returns:
        The 0-dim fp32 loss (TRL's elementwise tensor for ``"none"``).
    """
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return GKDTrainer.generalized_jsd_loss(
            student_logits, teacher_logits, labels, beta, temperature, reduction
        )
    total = distillation_loss(
        student_logits,
        teacher_logits,
        labels=labels,
        ignore_index=_IGNORE,
        temperature=temperature,
        reduction="sum",
        **_divergence(beta),
    )
    if num_items_in_batch is not None:
        return _divide(total, num_items_in_batch)
    if reduction == "sum":
        return total
    if labels is not None:
        count = (labels != _IGNORE).sum()
    else:
        count = (
            student_logits.shape[0] if reduction == "batchmean" else student_logits[..., 0].numel()
        )
    if reduction == "batchmean":
        return total / (count.clamp_min(1) if labels is not None else max(count, 1))
    return total / (count * student_logits.shape[-1])


def gold_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: TrlReduction = "batchmean",
    logits_are_probs: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``GOLDTrainer.generalized_jsd_loss``: :func:`generalized_jsd_loss` on logits.

    With ``logits_are_probs=True`` the inputs are probabilities of a matched sub-vocabulary
    (GOLD's cross-tokenizer path, small); TRL's own function computes that case.
    """
    if logits_are_probs:
        return GOLDTrainer.generalized_jsd_loss(
            student_logits, teacher_logits, labels, beta, temperature, reduction,
            logits_are_probs, num_items_in_batch,
        )  # fmt: skip
    return generalized_jsd_loss(
        student_logits, teacher_logits, labels, beta, temperature, reduction, num_items_in_batch
    )


def _full(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor head (FSDP2) gathered once, as TRL does; any other tensor as it is."""
    if x is not None and isinstance(x, torch.distributed.tensor.DTensor):
        return x.full_tensor()
    return x


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _scaled(x: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return x if x is None or scale == 1.0 else x * scale


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    log_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``DistillationTrainer``'s fused-linear loss, computed by the fused-linear kernels.

    Logits ``z = softcap(scale (h W^T + b))`` of each model (the scale folded into h and b, the
    soft-capping c tanh(z / c) when set) are never materialized: tiles on GPU, bounded chunks
    on CPU. The divergence D of :func:`generalized_jsd_loss` (at temperature T) is summed over
    the positions where ``completion_mask`` is nonzero, then divided by ``num_items_in_batch``
    when given, else by the local count of those positions (clamped to >= 1): TRL's local
    normalisation, so TRL's own rescaling across processes stays right.

    The student entropy H = LSE(a) - sum_v q_v a_v (a = z / T) that TRL logs is computed as
    log V - KL(q || uniform) by one more no-grad streaming pass (``log_entropy=False`` skips it
    and returns a zero sum). When the two models soft-cap with different constants, TRL's own
    function computes the loss (this package's kernels take one constant).

    Args:
        student_hidden_states: [B, K, H] student hidden states aligned with the completion.
        teacher_hidden_states: [B, K, H_t] teacher hidden states.
        student_lm_head_weight: [V, H] student head.
        teacher_lm_head_weight: [V, H_t] teacher head.
        completion_mask: [B, K], nonzero where a position enters the loss.
        beta: 0 forward KL, 1 reverse KL, else the generalized JSD.
        num_items_in_batch: divisor of the summed loss (a global token count), or None.
        student_lm_head_bias, teacher_lm_head_bias: [V] or None.
        student_logit_scale, teacher_logit_scale: multipliers of the logits.
        student_final_logit_softcapping, teacher_final_logit_softcapping: c or None.
        temperature: T > 0.
        log_entropy: compute the entropy sum (an extra forward pass without gradient).

    Returns:
        ``(loss, entropy_sum, n_valid)``: the 0-dim loss, the summed student entropy over valid
        positions (no gradient) and the 0-dim count of valid positions.
    """
    if student_final_logit_softcapping != teacher_final_logit_softcapping:
        return _trl_chunked_divergence_loss(
            student_hidden_states, teacher_hidden_states, student_lm_head_weight,
            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch,
            student_lm_head_bias, teacher_lm_head_bias, student_logit_scale,
            teacher_logit_scale, student_final_logit_softcapping,
            teacher_final_logit_softcapping, temperature,
        )  # fmt: skip
    w_s, w_t = _full(student_lm_head_weight), _full(teacher_lm_head_weight)
    b_s, b_t = _full(student_lm_head_bias), _full(teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    labels = valid.long().sub_(1).mul_(-_IGNORE)  # 0 where valid, -100 elsewhere: no sync
    h_s = _scaled(
        student_hidden_states.reshape(-1, student_hidden_states.shape[-1]), student_logit_scale
    )
    h_t = _scaled(
        teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]), teacher_logit_scale
    )
    common = {
        "softcap": student_final_logit_softcapping,
        "labels": labels,
        "ignore_index": _IGNORE,
        "temperature": temperature,
        "reduction": "sum",
    }
    total = fused_linear_distillation_loss(
        h_s,
        w_s,
        h_t.to(w_t.dtype),
        w_t,
        student_bias=_scaled(b_s, student_logit_scale),
        teacher_bias=_scaled(b_t, teacher_logit_scale),
        **common,
        **_divergence(beta),
    )
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        loss = _divide(total, num_items_in_batch)
    if log_entropy:
        entropy_sum = _entropy_sum(h_s, w_s, _scaled(b_s, student_logit_scale), n_valid, common)
    else:
        entropy_sum = torch.zeros((), dtype=total.dtype, device=total.device)
    return loss, entropy_sum, n_valid


@torch.no_grad()
def _entropy_sum(h_s, w_s, b_s, n_valid, common) -> torch.Tensor:
    """sum over valid rows of H(q) = log V - KL(q || uniform): the uniform teacher is the
    softmax of zero logits, from a [N, 1] x [V, 1] zero head (no head-sized allocation)."""
    vocab = w_s.shape[0]
    zeros_h = h_s.new_zeros((h_s.shape[0], 1))
    zeros_w = w_s.new_zeros((vocab, 1))
    kl_uniform = fused_linear_distillation_loss(
        h_s.detach(), w_s.detach(), zeros_h, zeros_w,
        student_bias=None if b_s is None else b_s.detach(),
        divergence="reverse_kl", **common,
    )  # fmt: skip
    return n_valid.to(kl_uniform.dtype) * math.log(vocab) - kl_uniform


_trl_chunked_divergence_loss = _trl_distillation._chunked_divergence_loss


def _same_parameters(ours: Callable, theirs: Callable, what: str) -> None:
    """The TRL hook must take exactly the drop-in's parameters (ours may add keyword-only ones)."""
    got = list(inspect.signature(theirs).parameters)
    mine = [
        p
        for p in inspect.signature(ours).parameters.values()
        if p.kind != p.KEYWORD_ONLY or p.name in got  # our own keyword-only extras aside
    ]
    if [p.name for p in mine] != got:
        import trl

        raise RuntimeError(
            f"{what} of the installed trl {trl.__version__} takes {got}, the drop-in "
            f"{[p.name for p in mine]}: install the trl version this package supports "
            "(pip install 'emalora-fast[trl]')"
        )


def _with_globals(original: Callable, module: Any, replacements: dict[str, Callable]) -> Callable:
    """``original`` (a bound method) with ``module``'s functions named in ``replacements``
    swapped for them during the call, and restored after, also on error."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        saved = {name: getattr(module, name) for name in replacements}
        for name, fn in replacements.items():
            setattr(module, name, fn)
        try:
            return original(*args, **kwargs)
        finally:
            for name, fn in saved.items():
                setattr(module, name, fn)

    return call


def _self_distillation_switch(trainer: Any) -> None:
    """SDFT/SDPO: their three ``distillation_mode`` losses, swapped in the trainer's module."""
    import sys

    from . import self_distillation

    step = trainer._compute_self_distillation_loss
    module = sys.modules[step.__func__.__module__]
    for name, ours in self_distillation.REPLACEMENTS.items():
        _same_parameters(ours, getattr(module, name), f"{type(trainer).__name__}'s {name}")
    trainer._compute_self_distillation_loss = _with_globals(
        step, module, self_distillation.REPLACEMENTS
    )


def use_streamed_losses(trainer: Any, *, log_entropy: bool = True) -> Any:
    """Make a TRL distillation trainer compute its loss with this package's kernels.

    ``GKDTrainer`` (and its subclasses) gets :func:`generalized_jsd_loss` in place of its
    ``generalized_jsd_loss``, ``GOLDTrainer`` :func:`gold_generalized_jsd_loss`, and
    ``DistillationTrainer`` :func:`chunked_divergence_loss` in its loss step, and
    ``SDFTTrainer``/``SDPOTrainer`` the streamed forms of their three ``distillation_mode``
    losses (:mod:`.self_distillation`) in theirs. Only this trainer
    changes (an attribute of the instance), and the values are TRL's (tested against TRL's own
    functions). Call it once, after constructing the trainer::

        trainer = use_streamed_losses(GKDTrainer(model=..., teacher_model=..., args=...))

    Args:
        trainer: a constructed GKD, GOLD or Distillation trainer.
        log_entropy: DistillationTrainer only: keep logging the student entropy (one more
            forward pass over the vocabulary without gradient).

    Returns:
        The same trainer.

    Raises:
        TypeError: the trainer has none of these hooks.
        RuntimeError: the installed TRL's hook has another signature (a version this package
            was not tested with); nothing is changed then.
    """
    if getattr(trainer, "_emalora_streamed_losses", False):
        return trainer
    if isinstance(trainer, GOLDTrainer):
        _same_parameters(gold_generalized_jsd_loss, GOLDTrainer.generalized_jsd_loss, "GOLD's loss")
        trainer.generalized_jsd_loss = gold_generalized_jsd_loss
    elif isinstance(trainer, GKDTrainer):
        _same_parameters(generalized_jsd_loss, GKDTrainer.generalized_jsd_loss, "GKD's loss")
        trainer.generalized_jsd_loss = generalized_jsd_loss
    elif isinstance(trainer, _trl_distillation.DistillationTrainer):
        _same_parameters(
            chunked_divergence_loss, _trl_chunked_divergence_loss, "DistillationTrainer's loss"
        )
        loss_fn = functools.partial(chunked_divergence_loss, log_entropy=log_entropy)
        trainer._compute_loss = _with_globals(
            trainer._compute_loss, _trl_distillation, {"_chunked_divergence_loss": loss_fn}
        )
    elif isinstance(trainer, (SDFTTrainer, SDPOTrainer)):
        _self_distillation_switch(trainer)
    else:
        raise TypeError(
            "use_streamed_losses takes a trl GKDTrainer, GOLDTrainer, DistillationTrainer, "
            f"SDFTTrainer or SDPOTrainer, got "
            f"{type(trainer).__name__}; for another trainer call emalora_fast.distillation_loss "
            "(or fused_linear_distillation_loss) in its compute_loss"
        )
    trainer._emalora_streamed_losses = True
    return trainer
