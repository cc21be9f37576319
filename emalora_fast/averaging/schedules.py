"""Step schedules of the averagers: host-side Python floats, never tensors.

These are the single source of the step-dependent scalars; the kernels only ever see the
resulting coefficients.
"""

from __future__ import annotations

from typing import Literal

BemaSchedule = Literal["trl", "paper"]


def ema_decay(
    steps_since_start: int,
    decay: float,
    *,
    warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    min_decay: float = 0.0,
) -> float:
    """Decay d of the EMA update ``shadow <- shadow + (1 - d) * (theta - shadow)``.

    ``steps_since_start`` is timm's ``s = t - update_after - 1`` for t optimizer steps taken:
    ``s <= 0`` gives 0 (the shadow copies theta); otherwise ``decay``, or with warmup
    ``clip(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay)`` (the rule of timm's
    ModelEmaV3).
    """
    if steps_since_start <= 0:
        return 0.0
    if not warmup:
        return decay
    d = 1.0 - (1.0 + steps_since_start / warmup_gamma) ** (-warmup_power)
    return min(max(d, min_decay), decay)


def bema_coefficients(
    step: int,
    *,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    lag: float = 10.0,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
    update_after: int = 0,
    schedule: BemaSchedule = "trl",
) -> tuple[float, float]:
    """(beta_t, alpha_t) of BEMA at global step t (arXiv 2508.00180).

    ``schedule="trl"`` (TRL's BEMACallback): ``beta = max((lag + multiplier*t) ** -ema_power,
    min_ema_multiplier)``, ``alpha = (lag + multiplier*t) ** -bias_power``.

    ``schedule="paper"`` (the paper's offline code): ``t_e = max(t - update_after + lag, 1)``,
    ``beta = max((1 + multiplier*t_e) ** -ema_power, min_ema_multiplier)``,
    ``alpha = (1 + t_e) ** -bias_power`` (the multiplier does not enter alpha).
    """
    if schedule == "trl":
        base = lag + multiplier * step
        return max(base ** (-ema_power), min_ema_multiplier), base ** (-bias_power)
    if schedule == "paper":
        t_e = max(step - update_after + lag, 1.0)
        beta = max((1.0 + multiplier * t_e) ** (-ema_power), min_ema_multiplier)
        return beta, (1.0 + t_e) ** (-bias_power)
    raise ValueError(f"schedule must be 'trl' or 'paper', got {schedule!r}")
