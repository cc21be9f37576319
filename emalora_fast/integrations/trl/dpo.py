"""TR-DPO under PEFT: DPO's "ref" adapter kept as the mixup average of the policy adapter.

TR-DPO (Gorbatovski et al., arXiv 2404.09656) updates the reference model every
``ref_model_sync_steps`` steps as ``ref <- alpha * policy + (1 - alpha) * ref`` with
``alpha = ref_model_mixup_alpha``. TRL's ``DPOTrainer(sync_ref_model=True)`` raises for a
peft model; with a peft model its reference is an adapter named ``"ref"`` (a frozen copy of the
policy adapter at the start), which :func:`sync_ref_adapter` keeps as that average, written by
the fused averager. DPO's reference log-probs then come from it (TRL switches to the adapter).
"""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer

from ._checks import check_adapter_model, check_rate, check_steps
from .teacher import FusedAdapterEMACallback

__all__ = ["SyncRefAdapterCallback", "sync_ref_adapter"]


class SyncRefAdapterCallback(FusedAdapterEMACallback):
    """Every ``ref_model_sync_steps`` optimizer steps t (``t % ref_model_sync_steps == 0``)::

        ref <- ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * ref

    for every tensor of the policy adapter, in the existing frozen adapter ``ref_adapter_name``
    (which starts as the policy's copy, as DPOTrainer makes it). The fp32 shadows are saved with
    the Trainer's checkpoints, and a resume writes them back into the adapter.

    Args:
        model: the ``PeftModel`` DPO trains, with the adapter ``ref_adapter_name``.
        ref_model_sync_steps: sync every this many optimizer steps (>= 1).
        ref_model_mixup_alpha: alpha in (0, 1].
        ref_adapter_name: the reference adapter (TRL's name is ``"ref"``).
        backend: the averager's backend.
    """

    def __init__(
        self,
        model,
        ref_model_sync_steps: int = 512,
        ref_model_mixup_alpha: float = 0.6,
        ref_adapter_name: str = "ref",
        *,
        backend: str = "auto",
    ) -> None:
        check_rate("ref_model_mixup_alpha", ref_model_mixup_alpha)
        check_steps("ref_model_sync_steps", ref_model_sync_steps)
        super().__init__(
            model,
            teacher_adapter_name=ref_adapter_name,
            update_rate=ref_model_mixup_alpha,
            sync_steps=ref_model_sync_steps,
            init="copy",
            backend=backend,
        )

    @staticmethod
    def _check_model(model, adapter_name: str) -> None:
        check_adapter_model(model, "SyncRefAdapterCallback")
        if adapter_name not in model.peft_config:
            raise ValueError(
                f"SyncRefAdapterCallback: the model has no adapter {adapter_name!r} (adapters: "
                f"{sorted(model.peft_config)}); DPOTrainer adds 'ref' when given a PeftModel and "
                "no ref_model: call sync_ref_adapter(trainer) after constructing the trainer"
            )


def sync_ref_adapter(
    trainer: Any,
    ref_model_sync_steps: int | None = None,
    ref_model_mixup_alpha: float | None = None,
    *,
    backend: str = "auto",
) -> SyncRefAdapterCallback:
    """Keep a constructed ``DPOTrainer``'s "ref" adapter as TR-DPO's mixup average.

    ``trainer = DPOTrainer(model=peft_model, args=DPOConfig(...), ...); sync_ref_adapter(trainer)``.
    The schedule defaults to the trainer's ``args.ref_model_sync_steps`` and
    ``args.ref_model_mixup_alpha`` (leave ``sync_ref_model=False``: TRL raises for peft).

    Returns:
        The callback, added to the trainer.

    Raises:
        TypeError: not a ``DPOTrainer``.
        ValueError: a trainer without a peft model and its "ref" adapter (a separate
            ``ref_model``, or TRL's base-model fallback), or a bad schedule; nothing is changed.
    """
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"sync_ref_adapter takes a trl DPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, "ref_model", None) is not None:
        raise ValueError(
            "sync_ref_adapter: this DPOTrainer has a separate ref_model; TR-DPO for it is TRL's "
            "own sync_ref_model=True"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    callback = SyncRefAdapterCallback(
        model,
        trainer.args.ref_model_sync_steps if ref_model_sync_steps is None else ref_model_sync_steps,
        trainer.args.ref_model_mixup_alpha
        if ref_model_mixup_alpha is None
        else ref_model_mixup_alpha,
        backend=backend,
    )
    trainer.add_callback(callback)
    return callback
