"""EMA and BEMA weight averaging of a peft adapter, one kernel launch per update.

What is averaged: by default every trainable tensor of the live peft adapter, as peft saves it
(LoRA factors of linear, embedding and conv layers, DoRA magnitudes, ``modules_to_save`` copies,
LoHa/LoKr/(IA)³ weights); for a module without peft adapters, every trainable parameter.

The averaged tensors ("shadows") are fp32 and live in one flat buffer per group of parameters
sharing (device, dtype); a normal peft model has one group, so :meth:`update` is one launch of the
fused kernel (Triton on CUDA, the C++ op on CPU). Step-dependent scalars are Python floats computed
on the host: an update allocates nothing and never synchronizes with the device.

Note: these average the LoRA *factors* A and B, as every weight-averaging tool in use does; the
product of averaged factors is not the average of the products (EMA(B)·EMA(A) != EMA(B·A)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from .. import _dispatch
from .._checks import check_choice, check_float, is_real_scalar
from . import peft_utils
from .core import Averager
from .schedules import BemaSchedule, bema_coefficients, ema_decay

__all__ = ["EMA", "BEMA"]

TeacherWeights = Literal["ema", "bema"]


class EMA(Averager):
    """Exponential moving average of an adapter: ``shadow <- shadow + (1 - d)*(theta - shadow)``.

    Steps count optimizer updates (1 after the first), as in timm's ``ModelEmaV3`` driven by
    timm's train loop, whose rule this follows exactly: with ``s = t - update_after - 1`` the
    shadow copies theta while ``s <= 0``; then it updates when ``s % update_every == 0`` with
    ``d = decay``, or with warmup ``d = clip(1 - (1 + s/warmup_gamma) ** -warmup_power,
    min_decay, decay)``. The update is the lerp form (torch's ``lerp``, timm's, AveragedModel's):
    ``1 - d`` is computed in float64 and rounded to fp32 once, and weights that stop changing
    keep the shadow bit-equal to them.

    Several decays, ``EMA(model, decay=(0.99, 0.999, 0.9999))``, keep one shadow per decay (a
    "profile"), all updated in the same launch from one read of the weights (4 + 8K bytes per
    fp32 element for K profiles). :meth:`swapped`, :meth:`averaged_state_dict`,
    :meth:`copy_to` and :meth:`save_pretrained` take ``profile=`` (an index or a decay; default
    the first); the teacher follows ``teacher_profile``.

    Args:
        model: a ``PeftModel`` or any module; a DDP, DataParallel, FSDP1, DeepSpeed or
            ``torch.compile`` wrapper is unwrapped (names are the inner module's).
        decay: the decay in (0, 1), or a sequence of 1 to 8 distinct decays.
        update_after: steps after the first during which the shadow copies the weights.
        update_every: update every this many steps.
        warmup: use the warmup rule above.
        warmup_gamma: warmup's gamma (> 0).
        warmup_power: warmup's power (> 0).
        min_decay: lower clip of the warmup decay, in [0, min(decay)].
        param_filter: ``(name, param) -> bool`` over the model's parameters; default: every
            trainable tensor of the adapter (of every trainable parameter without peft).
        adapter: the peft adapter to average (default: the active one).
        teacher_adapter: name of a frozen peft adapter to create and keep equal to the average.
        teacher_profile: the profile the teacher follows (an index or one of the decays).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Non-finite weights: elements whose weight is NaN/Inf keep their average and set a device
    flag (:meth:`nonfinite_detected`), like apex's noop flag; the shadow is never poisoned.
    """

    _kind = "ema"
    _hyperparameters = (
        *Averager._hyperparameters,
        *("decay", "warmup", "warmup_gamma", "warmup_power", "min_decay"),
    )

    def __init__(
        self,
        model: nn.Module,
        decay: float | Sequence[float] = 0.999,
        *,
        update_after: int = 0,
        update_every: int = 1,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        param_filter: peft_utils.ParamFilter | None = None,
        adapter: str | None = None,
        teacher_adapter: str | None = None,
        teacher_profile: int | float = 0,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        decays = _check_decays(decay)
        warmup_gamma = check_float("warmup_gamma", warmup_gamma, low=0.0, open_low=True)
        warmup_power = check_float("warmup_power", warmup_power, low=0.0, open_low=True)
        min_decay = check_float("min_decay", min_decay, low=0.0, high=min(decays))
        self.decays = self._profile_values = decays
        self.decay = decays[0] if is_real_scalar(decay) else decays
        self._profiles = len(decays)
        self.teacher_profile = self._profile_index(teacher_profile)
        self.warmup = bool(warmup)
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.min_decay = min_decay
        super().__init__(
            model,
            update_after=update_after,
            update_every=update_every,
            param_filter=param_filter,
            adapter=adapter,
            teacher_adapter=teacher_adapter,
            backend=backend,
        )

    def current_decay(self, step: int | None = None) -> float | tuple[float, ...]:
        """The decay d used at ``step`` (default: the last step); 0 where the shadow copies.
        A tuple, one per profile, with several decays."""
        t = self.step if step is None else step
        ds = tuple(
            ema_decay(
                t - self.update_after - 1,
                decay,
                warmup=self.warmup,
                warmup_gamma=self.warmup_gamma,
                warmup_power=self.warmup_power,
                min_decay=self.min_decay,
            )
            for decay in self.decays
        )
        return ds if isinstance(self.decay, tuple) else ds[0]

    def _coefficients(self, t: int) -> tuple[list[float], float, bool] | None:
        s = t - self.update_after - 1
        if s <= 0:
            return [1.0] * self._profiles, 0.0, True
        if s % self.update_every:
            return None
        ds = self.current_decay(t)
        return [1.0 - d for d in (ds if isinstance(ds, tuple) else (ds,))], 0.0, False


class BEMA(Averager):
    """Bias-corrected EMA (arXiv 2508.00180) of an adapter.

    At global step t (TRL's BEMACallback schedule, ``schedule="trl"``)::

        beta_t  = max((lag + multiplier*t) ** -ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier*t) ** -bias_power
        ema    <- ema + beta_t * (theta_t - ema)      (= (1 - beta_t)*ema + beta_t*theta_t)
        bema    = ema + alpha_t * (theta_t - theta_0)

    (the EMA part in the lerp form, as :class:`EMA`: beta_t is rounded to fp32 once).

    At ``t == update_after`` (the first update at or after it), theta_0 and ema are reset to
    theta_t; afterwards it updates when ``(t - update_after) % update_every == 0``. With
    ``update_after=0`` the weights at construction are theta_0. ``schedule="paper"`` uses the
    paper's offline code instead: ``t_e = max(t - update_after + lag, 1)``,
    ``beta = max((1 + multiplier*t_e) ** -ema_power, min_ema_multiplier)``,
    ``alpha = (1 + t_e) ** -bias_power``. The averaged weights (:meth:`swapped`,
    :meth:`save_pretrained`) are ``bema``.

    As a self-teacher, ``bema`` is an extrapolation: ``alpha_t * (theta_t - theta_0)`` puts it
    ahead of the student along the student's own displacement, so distilling towards it feeds
    the displacement back into itself and the run drifts away. The teacher therefore follows the
    ``ema`` part by default (``teacher_weights="ema"``: BEMA's power-schedule average without the
    bias correction); ``teacher_weights="bema"`` makes the teacher the extrapolation.

    Args:
        model: a ``PeftModel`` or any module; a DDP, DataParallel, FSDP1, DeepSpeed or
            ``torch.compile`` wrapper is unwrapped (names are the inner module's).
        ema_power: kappa (>= 0).
        bias_power: eta (>= 0; 0 keeps alpha at 1).
        lag: rho (> 0).
        multiplier: gamma (> 0).
        update_after: tau, burn-in steps before theta_0 is taken.
        update_every: phi; TRL and the paper use 400 because their update is slow, ours is not.
        min_ema_multiplier: lower bound of beta, in [0, 1].
        schedule: ``"trl"`` or ``"paper"``.
        teacher_weights: what :meth:`teacher` and the teacher adapter hold: ``"ema"`` or
            ``"bema"``.
        param_filter, adapter, teacher_adapter, backend: as for :class:`EMA`.
    """

    _kind = "bema"
    _hyperparameters = (
        *Averager._hyperparameters,
        *("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier", "schedule"),
    )
    _is_bema = True

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_after: int = 0,
        update_every: int = 1,
        min_ema_multiplier: float = 0.0,
        schedule: BemaSchedule = "trl",
        teacher_weights: TeacherWeights = "ema",
        param_filter: peft_utils.ParamFilter | None = None,
        adapter: str | None = None,
        teacher_adapter: str | None = None,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        self.ema_power = check_float("ema_power", ema_power, low=0.0)
        self.bias_power = check_float("bias_power", bias_power, low=0.0)
        self.lag = check_float("lag", lag, low=0.0, open_low=True)
        self.multiplier = check_float("multiplier", multiplier, low=0.0, open_low=True)
        self.min_ema_multiplier = check_float(
            "min_ema_multiplier", min_ema_multiplier, low=0.0, high=1.0
        )
        check_choice("schedule", schedule, ("trl", "paper"))
        check_choice("teacher_weights", teacher_weights, ("ema", "bema"))
        self.schedule = schedule
        self.teacher_weights = teacher_weights
        self._teacher_view = "ema" if teacher_weights == "ema" else "out"
        super().__init__(
            model,
            update_after=update_after,
            update_every=update_every,
            param_filter=param_filter,
            adapter=adapter,
            teacher_adapter=teacher_adapter,
            backend=backend,
        )

    def coefficients(self, step: int) -> tuple[float, float]:
        """(beta_t, alpha_t) at global step ``step``."""
        return bema_coefficients(
            step,
            ema_power=self.ema_power,
            bias_power=self.bias_power,
            lag=self.lag,
            multiplier=self.multiplier,
            min_ema_multiplier=self.min_ema_multiplier,
            update_after=self.update_after,
            schedule=self.schedule,
        )

    def _coefficients(self, t: int) -> tuple[list[float], float, bool] | None:
        if t < self.update_after:
            return None
        if not self._anchored:
            return [1.0], 0.0, True
        if (t - self.update_after) % self.update_every:
            return None
        beta, alpha = self.coefficients(t)
        return [beta], alpha, False


def _check_decays(decay: Any) -> tuple[float, ...]:
    """One decay (any real scalar) or a sequence of 1 to 8 distinct ones, each in (0, 1)."""
    many = isinstance(decay, Sequence) and not isinstance(decay, (str, bytes))
    values = tuple(decay) if many and not is_real_scalar(decay) else (decay,)
    if not 1 <= len(values) <= 8:
        raise ValueError(f"decay must be one value or 1 to 8 values, got {decay!r}")
    floats = tuple(
        check_float("decay", d, low=0.0, high=1.0, open_low=True, open_high=True) for d in values
    )
    if len(set(floats)) != len(floats):
        raise ValueError(f"the decays must differ, got {decay!r}")
    return floats
