"""Self-distillation of a peft model from its own averaged (EMA/BEMA) adapter.

The teacher is the same network with the averager's teacher weights in place of the live
adapter's (:meth:`~emalora_fast.EMA.teacher`), or with the adapters disabled (the base model);
it runs under ``no_grad`` with every module in eval mode (no dropout). The student is the
trainable adapter. Where the model exposes its output head, the loss is the fused-linear
distillation loss on hidden states (logits never exist in memory); otherwise the logits loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import _watch
from .loss import DistillationLoss

TeacherKind = Literal["average", "base"]

__all__ = ["SelfDistiller", "next_token_labels"]


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with causal-LM outputs: position i is scored on token i + 1.

    Args:
        labels: [B, S] token ids (``ignore_index`` where nothing is to be learnt).
    Returns:
        [B, S]: ``labels[:, 1:]`` followed by one ``ignore_index`` column.
    """
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


class SelfDistiller:
    """Loss of a student adapter distilled from a teacher: its EMA/BEMA average or the base.

    Args:
        model: a peft model whose active adapter is trained.
        averager: the :class:`~emalora_fast.EMA` or :class:`~emalora_fast.BEMA` of that
            adapter; needed when ``teacher="average"``.
        loss: the :class:`~emalora_fast.DistillationLoss` (divergence, temperature, ...).
        teacher: ``"average"`` (the averager's teacher weights) or ``"base"`` (adapters off).
        hard_label_weight: w in ``(1 - w) * divergence + w * cross-entropy``; default: the
            loss module's own when it is positive, else 0.5. An averaged teacher starts equal to
            the student, so with w = 0 the divergence alone has no gradient: that setting is
            refused unless distillation starts later (``distill_from_step > 1``) or the
            averager already holds steps.
        distill_from_step: before this optimizer step only the cross-entropy is trained (the
            teacher forward is skipped). Default: for a BEMA with a burn-in, the first step
            after its anchor (``update_after + 1``: before it the teacher is the initial
            adapter); else 0.
        fused_linear: use the fused-linear loss on hidden states (``"auto"``: where the model has
            a plain linear output head and the fused loss is available).

    ``compute_loss(batch)`` leaves the active adapter, every ``requires_grad`` flag and the
    optimizer's parameters as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        averager: Any = None,
        *,
        loss: DistillationLoss | None = None,
        teacher: TeacherKind = "average",
        hard_label_weight: float | None = None,
        distill_from_step: int | None = None,
        fused_linear: bool | Literal["auto"] = "auto",
    ) -> None:
        if teacher not in ("average", "base"):
            raise ValueError(f"teacher must be 'average' or 'base', got {teacher!r}")
        if teacher == "average" and not callable(getattr(averager, "teacher", None)):
            raise ValueError("teacher='average' needs the averager (an EMA or BEMA) of the model")
        if distill_from_step is None:
            burn_in = getattr(averager, "update_after", 0) if teacher == "average" else 0
            is_bema = getattr(averager, "_is_bema", False)
            distill_from_step = burn_in + 1 if is_bema and burn_in > 0 else 0
        if not isinstance(distill_from_step, int) or distill_from_step < 0:
            raise ValueError(
                f"distill_from_step must be an integer >= 0, got {distill_from_step!r}"
            )
        from ..distributed import unwrap_model

        self.forward_model = model
        self.model = unwrap_model(model)
        self.averager = averager
        self.loss = loss if loss is not None else DistillationLoss()
        if hard_label_weight is None:
            own = self.loss.options["hard_label_weight"]
            hard_label_weight = own if own > 0 else 0.5
        if not 0.0 <= hard_label_weight <= 1.0:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight!r}")
        if hard_label_weight == 0 and teacher == "average" and distill_from_step <= 1:
            if getattr(averager, "step", 0) == 0:
                raise ValueError(
                    "hard_label_weight=0 with distillation from the first step trains nothing: "
                    "the averaged teacher starts equal to the student, so the divergence and "
                    "its gradient are 0; set hard_label_weight > 0 (e.g. 0.5) or "
                    "distill_from_step > 1"
                )
        self.loss = self.loss.with_options(hard_label_weight=hard_label_weight)
        self.teacher = teacher
        self.distill_from_step = distill_from_step
        self._eval = _watch.EvalMode(self.model)
        self._head = _output_head(self.model)
        if fused_linear == "auto":
            fused_linear = self._head is not None
        elif fused_linear and self._head is None:
            raise ValueError("fused_linear=True needs a model with a plain linear output head")
        self.fused_linear = bool(fused_linear)
        self.step = 0

    @contextlib.contextmanager
    def _teacher_active(self) -> Iterator[None]:
        if self.teacher == "base":
            with self.model.disable_adapter(), self._eval():
                yield
        else:
            with self.averager.teacher():
                yield

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states [B, S, H] (fused-linear path) or logits [B, S, V].

        The forward goes through the model as given (a DDP/Accelerate wrapper included, so that
        gradient synchronization happens); for hidden states the output head is swapped for an
        identity during the call, so the logits are never formed.
        """
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        if not self.fused_linear:
            return self.forward_model(**inputs).logits
        base = _base(self.model)
        base.set_output_embeddings(nn.Identity())
        try:  # some models upcast their logits: hand the loss the head's dtype
            return self.forward_model(**inputs).logits.to(self._head.weight.dtype)
        finally:
            base.set_output_embeddings(self._head)

    def compute_loss(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training loss of one batch, and metrics (device tensors, no host sync).

        Args:
            batch: ``input_ids`` [B, S], optional ``attention_mask`` and ``labels`` (default:
                the input ids; ``-100`` entries are ignored).
            step: the global optimizer step (default: an internal count of calls).
            num_items_in_batch: the number of scored tokens over all accumulated micro-batches
                (gradient accumulation); default: this batch's.
        """
        self.step = self.step + 1 if step is None else step
        ignore = self.loss.options["ignore_index"]
        raw = batch.get("labels")
        if raw is None:  # next-token prediction on the inputs; padding is not scored
            raw = batch["input_ids"]
            if "attention_mask" in batch:
                raw = raw.masked_fill(batch["attention_mask"] == 0, ignore)
        labels = next_token_labels(raw, ignore)
        flat_labels = labels.reshape(-1)
        if self.step < self.distill_from_step:
            out = self._forward(batch)
            logits = self._logits(out)
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                ignore_index=ignore, reduction="sum",
            )  # fmt: skip
            if num_items_in_batch is None:
                denom = flat_labels.ne(ignore).sum().clamp_min(1)
            elif isinstance(num_items_in_batch, torch.Tensor):
                denom = num_items_in_batch.clamp_min(1)
            else:
                denom = max(num_items_in_batch, 1)
            loss = ce / denom
            return loss, {"loss": loss.detach(), "distilling": False}
        with torch.no_grad(), self._teacher_active():
            teacher_out = self._forward(batch)
        student_out = self._forward(batch)
        if self.fused_linear:
            from .fused_linear import fused_linear_distillation_loss

            head = self._head
            opts = dict(self.loss.options)
            opts.pop("inplace_grad", None)
            if num_items_in_batch is not None:
                opts["num_items_in_batch"] = num_items_in_batch
            loss = fused_linear_distillation_loss(
                student_out.reshape(-1, student_out.shape[-1]),
                head.weight,
                teacher_out.reshape(-1, teacher_out.shape[-1]),
                head.weight,
                student_bias=head.bias,
                teacher_bias=head.bias,
                labels=flat_labels,
                **opts,
            )
        else:
            loss = self.loss(
                student_out, teacher_out, labels=labels, num_items_in_batch=num_items_in_batch
            )
        return loss, {"loss": loss.detach(), "distilling": True}

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        if not self.fused_linear:
            return out
        head = self._head
        return F.linear(out, head.weight, head.bias)


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _output_head(model: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` output head of a causal LM, or None (LoRA-adapted, soft-capped,
    missing, or not replaceable)."""
    base = _base(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not nn.Linear or not hasattr(base, "set_output_embeddings"):
        return None
    if getattr(getattr(base, "config", None), "final_logit_softcapping", None):
        return None
    return head
