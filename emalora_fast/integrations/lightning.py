"""Lightning integration: average a peft adapter with the fused averager, no copy of the model.

>>> from emalora_fast.integrations.lightning import AdapterWeightAveraging
>>> trainer = Trainer(callbacks=[AdapterWeightAveraging(decay=0.999, save_dir="out/ema")])

Lightning's ``WeightAveraging``/``EMAWeightAveraging`` deep-copy the whole LightningModule into a
torch ``AveragedModel`` (for a LoRA run a second copy of the frozen base model) and update it
tensor by tensor. :class:`AdapterWeightAveraging` keeps fp32 shadows of the averaged tensors only
(the peft adapter's trainable tensors, or a ``param_filter`` selection) in an
:class:`~emalora_fast.EMA` (one or several decays) or :class:`~emalora_fast.BEMA`, and updates them
in one launch of the fused op after each optimizer step. As ``WeightAveraging`` does, it swaps the
averaged weights in for validation and test and the live ones back afterwards (bit for bit); its
state goes into Lightning's checkpoints, so that ``trainer.fit(..., ckpt_path=...)`` continues
the average exactly as an uninterrupted run would.

Works with ``lightning.pytorch`` and with ``pytorch_lightning`` (the callback is built on whichever
is installed, ``lightning`` first; Lightning calls callback hooks by name, so either Trainer
accepts it). Importing :mod:`emalora_fast` never imports Lightning.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, Literal

from torch import nn

from .. import _dispatch
from .._checks import check_choice, check_int, is_int
from ..averaging import peft_utils
from ..averaging.core import Averager
from ..averaging.ema import BEMA, EMA, _check_decays

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

__all__ = ["AdapterWeightAveraging", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "emalora_fast_averaging"
Averaging = Literal["ema", "bema"]
# update_after while the start waits for update_starting_at_epoch: an EMA copies the weights,
# a BEMA waits (its theta_0 is taken at the start).
_NOT_YET = 2**62
# Arguments the callback sets on the averager itself.
_OWN = {"self", "model", "decay", "update_after", "update_every", "param_filter", "adapter"}
_OWN |= {"teacher_adapter", "backend"}


def _lightning(trainer: Any, submodule: str = "") -> Any:
    """A module of the Lightning package the trainer comes from (``lightning.pytorch`` or
    ``pytorch_lightning``)."""
    root = type(trainer).__module__.split(".")[0]
    name = "pytorch_lightning" if root == "pytorch_lightning" else "lightning.pytorch"
    return importlib.import_module(name + submodule)


def _check_strategy(trainer: Any) -> None:
    """Single-device and DDP strategies only: every rank holds the whole adapter."""
    strategies = _lightning(trainer, ".strategies")
    strategy = trainer.strategy
    sharded = tuple(
        getattr(strategies, n)
        for n in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
        if hasattr(strategies, n)
    )
    plain = (strategies.SingleDeviceStrategy, strategies.DDPStrategy)
    if isinstance(strategy, sharded) or not isinstance(strategy, plain):
        raise ValueError(
            f"AdapterWeightAveraging does not support the {type(strategy).__name__} strategy: it "
            "averages whole adapter tensors on each rank, which single-device and DDP strategies "
            "keep (FSDP, DeepSpeed and model-parallel strategies shard them); use "
            'strategy="auto"/"ddp", or EMA/BEMA directly in a loop of your own'
        )


def _first_step(start: int, every: int) -> int:
    """The first zero-based step index >= start that Lightning's ``step_idx % every == 0``
    updates after."""
    return -(-start // every) * every


class AdapterWeightAveraging(Callback):
    """EMA/BEMA of the adapter a LightningModule trains, updated after each optimizer step.

    The averager is built at ``setup`` (stage ``"fit"``) on the module's peft model (the one
    ``PeftModel`` inside the LightningModule, or the attribute ``module`` names; without one,
    the LightningModule with ``param_filter``). Its extra memory is the fp32 shadows of the
    averaged tensors, K x 4 bytes per element for K decays (BEMA: 3 x 4), plus one copy of the
    live values kept during validation: nothing of the frozen base model.

    When it updates (Lightning's rule, ``step_idx`` = zero-based index of the optimizer step,
    so with ``accumulate_grad_batches=N`` after every N-th batch): after each ``step_idx >=
    update_starting_at_step`` with ``step_idx % update_every_n_steps == 0``; the first update
    copies the weights (EMA; BEMA takes theta_0 and ema there), and before it the average equals
    the live weights (BEMA without a start: theta_0 are the weights at the start of fit and it
    updates after global steps ``t = step_idx + 1`` that are multiples of
    ``update_every_n_steps``, as TRL's BEMA). ``update_starting_at_epoch`` starts it at the
    first step of that epoch instead (the later of the two when both are given). An EMA update
    is ``shadow <- decay * shadow + (1 - decay) * theta`` per decay; BEMA follows
    :class:`~emalora_fast.BEMA`. After fit the model keeps its live weights (``WeightAveraging``
    copies the average in); ``averager.copy_to()`` does that, ``save_dir=`` saves the average.

    Args:
        decay: the EMA decay in (0, 1), or a sequence of 1 to 8 distinct decays (one shadow
            per decay, one launch for all); not used by BEMA.
        averaging: ``"ema"`` or ``"bema"``.
        update_every_n_steps: update after every this many optimizer steps (>= 1).
        update_starting_at_step: zero-based index of the first optimizer step that may update.
        update_starting_at_epoch: start at the first optimizer step of this epoch.
        module: attribute name of the model to average inside the LightningModule (default:
            the one ``PeftModel`` in it, else the LightningModule itself).
        param_filter: ``(name, param) -> bool``: average these parameters instead.
        adapter: the peft adapter to average (default: the active one).
        teacher_adapter: name of a frozen peft adapter to create and keep equal to the average
            (for self-distillation, as with the Hugging Face callback).
        profile: the decay (or index) swapped in for validation/test and saved (default: the
            first).
        save_dir: save the averaged adapter there at the end of fit (a peft adapter for a peft
            model: ``PeftModel.from_pretrained`` loads it), from global rank 0.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
        **averager_kwargs: further arguments of :class:`~emalora_fast.EMA` (``warmup``,
            ``min_decay``, ...) or :class:`~emalora_fast.BEMA` (``ema_power``, ``lag``, ...).

    Raises:
        ValueError: at construction for bad arguments (a decay outside (0, 1), ...); at setup,
            before anything changes, for a module without trainable tensors to average or a
            strategy other than single-device or DDP (FSDP, DeepSpeed and model-parallel
            strategies shard the adapter and are not supported).
    """

    def __init__(
        self,
        decay: float | Sequence[float] | None = None,
        *,
        averaging: Averaging = "ema",
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        module: str | None = None,
        param_filter: peft_utils.ParamFilter | None = None,
        adapter: str | None = None,
        teacher_adapter: str | None = None,
        profile: int | float | None = None,
        save_dir: str | os.PathLike | None = None,
        backend: _dispatch.Backend = "auto",
        **averager_kwargs: Any,
    ) -> None:
        check_choice("averaging", averaging, ("ema", "bema"))
        check_int("update_every_n_steps", update_every_n_steps, minimum=1)
        for name, value in (
            ("update_starting_at_step", update_starting_at_step),
            ("update_starting_at_epoch", update_starting_at_epoch),
        ):
            if value is not None:
                check_int(name, value, minimum=0)
        check_choice("backend", backend, _dispatch.BACKENDS)
        cls = EMA if averaging == "ema" else BEMA
        if averaging == "ema":
            decays = _check_decays(0.999 if decay is None else decay)
        elif decay is not None:
            raise ValueError('decay= is an EMA setting; BEMA (averaging="bema") has ema_power=')
        else:
            decays = ()
        index_ok = is_int(profile) and 0 <= profile < max(len(decays), 1)
        if profile is not None and not (
            index_ok or (isinstance(profile, float) and profile in decays)
        ):
            raise ValueError(
                f"profile must be an index in [0, {max(len(decays), 1)}) or one of the decays "
                f"{list(decays)}, got {profile!r}"
            )
        accepted = set(inspect.signature(cls).parameters) - _OWN
        unknown = sorted(set(averager_kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no argument(s) {unknown}; it takes {sorted(accepted)}"
            )
        self.decay = 0.999 if decay is None and averaging == "ema" else decay
        self.averaging = averaging
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self.module = module
        self.param_filter = param_filter
        self.adapter = adapter
        self.teacher_adapter = teacher_adapter
        self.profile = profile
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.backend = backend
        self.averager_kwargs = averager_kwargs
        self.averager: Averager | None = None
        # Zero-based index of the first step that updates; None until the start epoch begins.
        self._start: int | None = (
            None
            if update_starting_at_epoch is not None
            else _first_step(update_starting_at_step or 0, update_every_n_steps)
        )
        self._swap = ExitStack()
        self._swapped = False

    # ----------------------------------------------------------------------------------------
    # Set-up

    def _target(self, pl_module: nn.Module) -> nn.Module:
        """The model to average inside the LightningModule."""
        if self.module is not None:
            target = getattr(pl_module, self.module, None)
            if not isinstance(target, nn.Module):
                raise ValueError(f"the LightningModule has no submodule {self.module!r} (module=)")
            return target
        peft_models = [m for m in pl_module.modules() if peft_utils.is_peft_model(m)]
        if len(peft_models) > 1:
            raise ValueError(
                f"the LightningModule holds {len(peft_models)} peft models; name the one to "
                "average with module=<attribute>"
            )
        return peft_models[0] if peft_models else pl_module

    def _update_after(self) -> int:
        """The averager's ``update_after`` for the resolved start (its own step convention:
        global steps, 1 after the first optimizer step)."""
        if self._start is None:
            return _NOT_YET
        if self.averaging == "ema":
            return self._start  # copies while step_idx <= start, then every n from there
        explicit = self.update_starting_at_step is not None
        if not explicit and self.update_starting_at_epoch is None:
            return 0  # theta_0: the weights at the start of fit
        return self._start + 1  # theta_0 and ema: the weights after step_idx == start

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer)
        base = _lightning(trainer).LightningModule.configure_model
        if type(pl_module).configure_model is not base:
            pl_module.configure_model()  # as WeightAveraging: create the layers first
        target = self._target(pl_module)
        if self.averager is not None and self.averager.model is target:
            return  # a second fit with the same callback continues the same average
        kwargs = dict(self.averager_kwargs)
        if self.averaging == "ema":
            kwargs["decay"] = self.decay
            cls = EMA
        else:
            cls = BEMA
        self.averager = cls(
            target,
            update_after=self._update_after(),
            update_every=self.update_every_n_steps,
            param_filter=self.param_filter,
            adapter=self.adapter,
            teacher_adapter=self.teacher_adapter,
            backend=self.backend,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------
    # Training

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = self.update_starting_at_epoch
        if self._start is None and epoch is not None and trainer.current_epoch >= epoch:
            first = max(trainer.global_step, self.update_starting_at_step or 0)
            self._start = _first_step(first, self.update_every_n_steps)
            self._apply_start()

    def _apply_start(self) -> None:
        if self.averager is not None:
            self.averager.update_after = self._update_after()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: it moves once per accumulate_grad_batches batches.
        if self.averager is not None and trainer.global_step > self.averager.step:
            self.averager.update(step=trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_dir is not None and self.averager is not None and trainer.is_global_zero:
            self.averager.save_pretrained(self.save_dir, profile=self.profile)

    # ----------------------------------------------------------------------------------------
    # Validation and test on the averaged weights

    def _swap_in(self) -> None:
        if self.averager is not None and not self._swapped:
            self._swap.enter_context(self.averager.swapped(self.profile))
            self._swapped = True

    def _swap_out(self) -> None:
        self._swap.close()
        self._swapped = False

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in()

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._swap_out()  # the live weights come back whatever went wrong in an evaluation

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.averager is None:
            return
        if self._swapped:
            raise RuntimeError(
                "a checkpoint is being saved while the averaged weights are swapped in for "
                "evaluation; save it outside validation/test (e.g. ModelCheckpoint's defaults)"
            )
        checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = {
            "start": self._start,
            "averager": self.averager.state_dict(),
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.averager is None:
            return  # not fitting (validate/test/predict from a checkpoint): nothing to resume
        state = checkpoint.get(CHECKPOINT_KEY, {}).get(self.state_key)
        if state is None:
            raise ValueError(
                f"the checkpoint (global step {checkpoint.get('global_step')}) holds no state of "
                f"this averaging callback ({self.state_key}): it was saved without it or with "
                "other settings; resume from a checkpoint written with the same callback"
            )
        start = self._start
        self._start = state["start"]
        self._apply_start()
        try:
            self.averager.load_state_dict(state["averager"])
        except ValueError:
            self._start = start
            self._apply_start()
            raise

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            averaging=self.averaging,
            decay=self.decay,
            adapter=self.adapter,
            teacher_adapter=self.teacher_adapter,
        )
