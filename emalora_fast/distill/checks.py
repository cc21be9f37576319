"""Argument checks and option codes shared by the two distillation losses.

:func:`~emalora_fast.distill.loss.distillation_loss` (logits) and
:func:`~emalora_fast.distill.fused_linear.fused_linear_distillation_loss` (hidden states) take
the same options and labels; each check raises before anything is computed and names the
argument, the value given and, where there is one, the fix.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["batchmean", "mean", "sum", "none"]
TeacherVocab = Literal["error", "truncate"]

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_REDUCTIONS = ("batchmean", "mean", "sum", "none")
_TEACHER_VOCAB = ("error", "truncate")
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


def _check_options(divergence, beta, temperature, reduction, hard_label_weight, teacher_vocab):
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if teacher_vocab not in _TEACHER_VOCAB:
        raise ValueError(f"teacher_vocab must be one of {_TEACHER_VOCAB}, got {teacher_vocab!r}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence == "jsd" and not (isinstance(beta, int | float) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    if not (isinstance(hard_label_weight, int | float) and 0.0 <= hard_label_weight <= 1.0):
        raise ValueError(f"hard_label_weight must lie in [0, 1], got {hard_label_weight!r}")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, teacher_vocab: str):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be floating point (fp32, bf16, fp16, fp64), got {x.dtype}"
            )
        if x.dim() < 1:
            raise ValueError(f"{name} must have a vocabulary dimension, got a 0-dim tensor")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
            "have different leading shapes"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits are on {student.device} and teacher_logits on {teacher.device}"
        )
    v_s, v_t = student.shape[-1], teacher.shape[-1]
    if v_s == 0:
        raise ValueError("the vocabulary dimension of the logits is empty")
    return teacher if _teacher_vocab_matches(v_s, v_t, teacher_vocab) else teacher[..., :v_s]


def _teacher_vocab_matches(v_s: int, v_t: int, teacher_vocab: str) -> bool:
    """True when the vocabularies agree; False when the teacher's extra entries are to be
    dropped (``teacher_vocab="truncate"``); raises for any other mismatch, naming both sizes."""
    if v_t == v_s:
        return True
    if teacher_vocab == "truncate" and v_t > v_s:
        return False
    hint = (
        "; pass teacher_vocab='truncate' to drop the teacher's extra entries"
        if v_t > v_s
        else "; the teacher vocabulary cannot be smaller than the student's"
    )
    raise ValueError(
        f"teacher vocabulary size {v_t} differs from student vocabulary size {v_s}{hint}"
    )


def _check_labels(labels: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the logits' leading shape "
            f"{tuple(student.shape[:-1])}"
        )
    if labels.device != student.device:
        raise ValueError(f"labels are on {labels.device} and the logits on {student.device}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def _divergence_terms(
    divergence: str,
    beta: float,
    temperature: float,
    scale_by_temperature_squared: bool,
    hard_label_weight: float,
) -> tuple[int, float, float]:
    """(kernel divergence code, T**2 factor or 1, hard-label weight w). JSD at beta = 0 and 1
    is run as forward and reverse KL, which it equals, with no third pass."""
    code = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}[divergence]
    if code == JSD and beta == 0.0:
        code = FORWARD_KL
    elif code == JSD and beta == 1.0:
        code = REVERSE_KL
    t2 = float(temperature) ** 2 if scale_by_temperature_squared else 1.0
    return code, t2, float(hard_label_weight)
