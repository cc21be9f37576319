"""Hugging Face ``transformers.Trainer`` integration of the averager.

``AveragerCallback`` updates an :class:`~emalora_fast.EMA`/:class:`~emalora_fast.BEMA` after each
optimizer step (``on_step_end`` fires once per optimizer step, after gradient accumulation) and
saves/restores its state with the Trainer's checkpoints. ``AveragingTrainer`` (a ``Trainer`` with
that callback) and ``SelfDistillationTrainer`` (the distiller's loss on top) also hand the
checkpoint given to ``trainer.train(resume_from_checkpoint=...)`` to the callback, so that a resume
from any folder continues the average identically.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import get_last_checkpoint

STATE_FILE = "emalora_averager{rank}.pt"


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def state_path(checkpoint_dir: str) -> str:
    """Where the averager's state goes inside a checkpoint folder (one file per rank)."""
    rank = _rank()
    return os.path.join(checkpoint_dir, STATE_FILE.format(rank=f"_rank{rank}" if rank else ""))


def _resume_folder_of_running_trainer() -> str | None:
    """The checkpoint folder the running ``Trainer.train(resume_from_checkpoint=...)`` resumes from.

    transformers hands callbacks neither the trainer nor that path, so it is read from the
    trainer's own call frames (``train`` resolves ``True`` to a folder before it reaches the
    training loop). Only called at ``on_train_begin``, once per training run.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            folder = local.get("resume_from_checkpoint")
            if isinstance(local.get("self"), Trainer) and isinstance(folder, str | os.PathLike):
                return os.fspath(folder)
            frame = frame.f_back
        return None
    finally:
        del frame


# The TrainerState fields that tell one run's checkpoint from another's at the same step.
_RUN_FIELDS = ("global_step", "epoch", "total_flos", "log_history", "best_metric")


def _saved_by_this_run(folder: str, state: TrainerState) -> bool:
    """Whether ``folder``'s trainer_state.json is the state the Trainer just resumed."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        return False
    saved = TrainerState.load_from_json(path)
    return all(getattr(saved, k) == getattr(state, k) for k in _RUN_FIELDS)


class AveragerCallback(TrainerCallback):
    """Update ``averager`` after every optimizer step; keep its state in the checkpoints.

    Args:
        averager: the EMA/BEMA of the model the Trainer trains (built on the unwrapped model).
        resume_from_checkpoint: a checkpoint folder to restore from. Not needed with
            :class:`AveragingTrainer`/:class:`SelfDistillationTrainer` (they pass on the folder
            given to ``train``) or when the checkpoint is ``<output_dir>/checkpoint-<step>``.
    """

    def __init__(self, averager, resume_from_checkpoint: str | None = None) -> None:
        self.averager = averager
        self.resume_from_checkpoint = resume_from_checkpoint
        self.trainer_checkpoint: str | None = None  # set by AveragingTrainer.train

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        # The folder given to the callback is trusted; any other is used only if it holds the
        # very trainer state the Trainer resumed (output_dir may hold another run's checkpoint
        # of the same step).
        candidates = [self.resume_from_checkpoint] if self.resume_from_checkpoint else []
        inferred = [self.trainer_checkpoint, _resume_folder_of_running_trainer()]
        if isinstance(args.resume_from_checkpoint, str):
            inferred.append(args.resume_from_checkpoint)
        inferred.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        candidates += [f for f in dict.fromkeys(inferred) if f and _saved_by_this_run(f, state)]
        for folder in candidates:
            if os.path.isfile(state_path(folder)):
                state_dict = torch.load(state_path(folder), map_location="cpu", weights_only=True)
                self.averager.load_state_dict(state_dict)
                return
        if self.averager.step != state.global_step:
            looked = [f for f in [self.resume_from_checkpoint, *inferred] if f]
            raise FileNotFoundError(
                f"resuming at step {state.global_step}, but no averager state of this run was "
                f"found (looked in {looked}, using only folders whose trainer_state.json is the "
                "one resumed); pass AveragerCallback(resume_from_checkpoint=<the checkpoint>)"
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.averager.update(step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        tmp = state_path(folder) + ".tmp"
        torch.save(self.averager.state_dict(), tmp)
        os.replace(tmp, state_path(folder))


class AveragingTrainer(Trainer):
    """A ``transformers.Trainer`` that keeps an EMA/BEMA of the model it trains.

    Args:
        averager: the EMA/BEMA (None: none, as a plain Trainer).
        *args, **kwargs: as for ``Trainer``; an :class:`AveragerCallback` for ``averager`` is
            added unless one is given.

    ``train(resume_from_checkpoint=...)`` restores the averager from that checkpoint (a path,
    or ``True`` for the last checkpoint in ``output_dir``), wherever it lies.
    """

    def __init__(self, *args, averager=None, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if averager is not None and not any(isinstance(c, AveragerCallback) for c in callbacks):
            callbacks.append(AveragerCallback(averager))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.averager = averager

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AveragerCallback):
                cb.trainer_checkpoint = os.fspath(folder) if folder else None
        return super().train(resume_from_checkpoint, *args, **kwargs)


class SelfDistillationTrainer(AveragingTrainer):
    """A ``transformers.Trainer`` whose loss is a :class:`~emalora_fast.SelfDistiller`'s.

    Args:
        distiller: the SelfDistiller (it holds the model, the averager and the loss).
        *args, **kwargs: as for ``Trainer``; an :class:`AveragerCallback` for the distiller's
            averager is added unless one is given.

    Gradient accumulation: the Trainer's ``num_items_in_batch`` (tokens scored over all
    accumulated micro-batches) normalizes the loss, so accumulated gradients equal those of one
    large batch. Resume as for :class:`AveragingTrainer`.
    """

    def __init__(self, *args, distiller, **kwargs):
        super().__init__(*args, averager=distiller.averager, **kwargs)
        self.distiller = distiller
        # compute_loss normalizes by num_items_in_batch itself: no further division by the
        # number of accumulation steps.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _ = self.distiller.compute_loss(
            inputs, step=self.state.global_step + 1, num_items_in_batch=num_items_in_batch
        )
        # evaluation reads every non-loss entry of the outputs as logits: give it none
        return (loss, {"loss": loss}) if return_outputs else loss
