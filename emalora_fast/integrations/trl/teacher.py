"""The SDFT/SDPO EMA teacher adapter, kept by the fused averager.

TRL's ``PEFTAdapterEMACallback`` (``trl.experimental.sdft`` / ``sdpo``) keeps a "teacher" LoRA
adapter as ``teacher <- (1 - r) teacher + r student`` every ``sync_steps`` optimizer steps, with a
per-tensor Python loop, a ``set_peft_model_state_dict`` and two ``set_adapter`` calls per step.
:class:`FusedAdapterEMACallback` has its constructor and its schedule, and does the update in
one launch of :class:`emalora_fast.EMA` that writes the teacher adapter in the same pass;
:func:`fused_ema_teacher` makes an ``SDFTTrainer``/``SDPOTrainer`` class use it.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from accelerate.utils import is_peft_model
from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback as _SdftCallback
from trl.experimental.sdpo.teacher_sync import PEFTAdapterEMACallback as _SdpoCallback

from ... import EMA
from ..transformers import AveragerCallback
from ._checks import check_adapter_model, check_rate, check_steps

__all__ = ["FusedAdapterEMACallback", "fused_ema_teacher"]

TeacherInit = Literal["copy", "zero"]
_ALWAYS_COPY = 2**62  # update_after that keeps EMA in its copy phase: update_rate = 1


class FusedAdapterEMACallback(AveragerCallback):
    """``PEFTAdapterEMACallback``'s constructor and schedule, on the fused averager.

    At every optimizer step t with ``t % sync_steps == 0`` (``on_step_end``)::

        teacher <- (1 - update_rate) * teacher + update_rate * student

    for every tensor of the student's peft adapter, written into the frozen adapter
    ``teacher_adapter_name`` by the same kernel launch that updates the fp32 shadows (no
    ``set_peft_model_state_dict``, no adapter switch). The adapter is created at
    ``on_train_begin`` (or at the first update), as TRL does. Every tensor the averager takes
    works (LoRA, DoRA magnitudes, embedding LoRA, and ``modules_to_save`` copies or other
    non-LoRA trainable tensors, for which TRL's trainers refuse the EMA teacher), and the shadows
    are saved with the Trainer's checkpoints and restored on resume. With ``init="zero"`` the
    tensors the averager takes start at zero; a frozen adapter tensor is copied once.

    ``init="copy"`` (default) starts the teacher as the student at train begin. ``init="zero"``
    starts it at zeros, TRL's behaviour: after k updates a zero start holds only
    ``1 - (1 - r)^k`` of the student's weight (about 5% after the first step at r = 0.05, 64%
    after 20), so the early teacher is a shrunken student (a LoRA delta scaled towards 0, i.e.
    towards the base model), and the distillation signal of the first tens of steps pulls the
    student towards that shrinkage rather than towards an average of its own recent weights.

    Args:
        model: the ``PeftModel`` being trained (a wrapper the accelerator unwraps is accepted).
        teacher_adapter_name: name of the teacher adapter to create (must not exist yet).
        update_rate: r in (0, 1]; the averager's decay is 1 - r (r = 1: the teacher copies the
            student at each sync).
        sync_steps: update every this many optimizer steps (>= 1).
        accelerator: an ``accelerate.Accelerator`` to unwrap ``model`` with, or None (the
            Trainer's is taken from the callback arguments).
        init: ``"copy"`` or ``"zero"``.
        backend: the averager's backend (``"auto"``: Triton on CUDA, C++ on CPU).

    Raises:
        ValueError: a model without peft adapters, an existing adapter name, ``update_rate``
            outside (0, 1], ``sync_steps`` < 1, an unknown ``init``; raised before anything
            changes.
    """

    def __init__(
        self,
        model,
        teacher_adapter_name: str = "teacher",
        update_rate: float = 0.05,
        sync_steps: int = 1,
        accelerator=None,
        *,
        init: TeacherInit = "copy",
        backend: str = "auto",
    ) -> None:
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        self._check_model(unwrapped, teacher_adapter_name)
        check_rate("update_rate", update_rate)
        check_steps("sync_steps", sync_steps)
        if init not in ("copy", "zero"):
            raise ValueError(f"init must be 'copy' or 'zero', got {init!r}")
        super().__init__(None)
        self.model = model
        self.teacher_adapter_name = teacher_adapter_name
        self.update_rate = float(update_rate)
        self.sync_steps = int(sync_steps)
        self.accelerator = accelerator
        self.init = init
        self.backend = backend

    @staticmethod
    def _check_model(model, adapter_name: str) -> None:
        check_adapter_model(model, "FusedAdapterEMACallback", new_adapter=adapter_name)

    def _unwrapped(self):
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.model)
        return self.model

    def _initialize_teacher_adapter(self) -> None:
        """Create the teacher adapter and the averager (once)."""
        if self.averager is not None:
            return
        model = self._unwrapped()
        copy_only = self.update_rate == 1.0
        avg = EMA(
            model,
            decay=0.5 if copy_only else 1.0 - self.update_rate,
            update_after=_ALWAYS_COPY if copy_only else 0,
            teacher_adapter=self.teacher_adapter_name,
            backend=self.backend,
        )
        if self.init == "zero":
            state = avg.state_dict()
            state["ema"] = {n: torch.zeros_like(t) for n, t in state["ema"].items()}
            avg.load_state_dict(state)  # writes the zeros into the teacher adapter too
        self.averager = avg

    def on_train_begin(self, args, state, control, **kwargs):
        if self.accelerator is None and kwargs.get("accelerator") is not None:
            self.accelerator = kwargs["accelerator"]
        self._initialize_teacher_adapter()
        super().on_train_begin(args, state, control, **kwargs)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        t = state.global_step
        if t % self.sync_steps:
            return
        self._initialize_teacher_adapter()
        # The averager copies at its step 1; from step 2 on it blends with decay 1 - r, so
        # TRL's step t is the averager's t + 1 and every sync is a blend of the start value.
        self.averager.update(step=t + 1)

    def on_save(self, args, state, control, **kwargs):
        if self.averager is not None:
            super().on_save(args, state, control, **kwargs)


_TRL_CALLBACKS = (_SdftCallback, _SdpoCallback)


def _replacing_add_callback(original, init: TeacherInit, backend: str):
    @functools.wraps(original)
    def add_callback(self, callback):
        if isinstance(callback, _TRL_CALLBACKS):
            callback = FusedAdapterEMACallback(
                callback.model,
                teacher_adapter_name=callback.teacher_adapter_name,
                update_rate=callback.update_rate,
                sync_steps=callback.sync_steps,
                accelerator=callback.accelerator,
                init=init,
                backend=backend,
            )
        return original(self, callback)

    return add_callback


@functools.cache
def fused_ema_teacher(
    trainer_cls: type, *, init: TeacherInit = "copy", backend: str = "auto"
) -> type:
    """A subclass of ``SDFTTrainer``/``SDPOTrainer`` whose EMA teacher is the fused one.

    With ``teacher_model_kind="ema"`` and a peft model, the trainer keeps its "teacher" adapter
    with :class:`FusedAdapterEMACallback` (``teacher_update_rate``, ``teacher_sync_steps``) in
    place of TRL's ``PEFTAdapterEMACallback``, also where TRL requires pure LoRA and raises
    (``modules_to_save``, trainable tokens, any trainable tensor not named ``lora_*``).
    Everything else (the teacher forward through ``use_adapter(model, "teacher")``, the
    losses) is TRL's::

        trainer = fused_ema_teacher(SDFTTrainer)(model=peft_model, args=config, ...)

    Args:
        trainer_cls: ``trl.experimental.sdft.SDFTTrainer`` or ``sdpo.SDPOTrainer`` (or a
            subclass).
        init: the teacher's start, ``"copy"`` or ``"zero"`` (see the callback).
        backend: the averager's backend.

    Raises:
        TypeError: the class lacks the hooks of TRL 1.16's self-distillation trainers.
    """
    missing = [
        name
        for name in ("_setup_teacher_model", "_use_peft_ema_teacher_adapter", "add_callback")
        if not callable(getattr(trainer_cls, name, None))
    ]
    if missing:
        raise TypeError(
            f"{getattr(trainer_cls, '__name__', trainer_cls)!r} has no {missing}: pass TRL's "
            "SDFTTrainer or SDPOTrainer of the version this package supports "
            "(pip install 'emalora-fast[trl]')"
        )
    if init not in ("copy", "zero"):
        raise ValueError(f"init must be 'copy' or 'zero', got {init!r}")

    def _use_peft_ema_teacher_adapter(self: Any) -> bool:
        return self.args.teacher_model_kind == "ema" and is_peft_model(self.model)

    return type(
        f"FusedEMA{trainer_cls.__name__}",
        (trainer_cls,),
        {
            "_use_peft_ema_teacher_adapter": _use_peft_ema_teacher_adapter,
            "add_callback": _replacing_add_callback(trainer_cls.add_callback, init, backend),
            "__doc__": f"{trainer_cls.__name__} with the fused EMA teacher (init={init!r}).",
        },
    )
