"""Argument checks of the TRL callbacks: one line naming the problem and the fix."""

from __future__ import annotations

import math
from typing import Any


def check_adapter_model(model: Any, who: str, *, new_adapter: str | None = None) -> None:
    """``model`` has peft adapters; ``new_adapter`` (to be created) is not one of them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError(
            f"{who} needs a peft model (peft.get_peft_model(model, LoraConfig(...))), got a "
            f"{type(model).__name__} without peft adapters"
        )
    if new_adapter is not None and new_adapter in configs:
        raise ValueError(
            f"{who}: the model already has an adapter named {new_adapter!r} "
            f"(adapters: {sorted(configs)}); pass another teacher_adapter_name or delete it"
        )


def check_rate(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_steps(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _divergence(beta: float) -> dict[str, Any]:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1] (TRL's convention), got {beta!r}")
    if beta == 0:
        return {"divergence": "forward_kl"}
    if beta == 1:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": float(beta)}
