"""Argument checks: one clear line that names the problem, raised before anything changes."""

from __future__ import annotations

import math
from typing import Any

import torch


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_param(name: str, p: torch.Tensor, local: torch.Tensor) -> None:
    """A parameter the averager can hold: floating, a supported dtype, contiguous storage."""
    if not p.is_floating_point():
        raise TypeError(f"parameter {name} has dtype {p.dtype}; only floating tensors average")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"parameter {name} has unsupported dtype {p.dtype}")
    if not local.is_contiguous():
        raise ValueError(f"parameter {name} is not contiguous; the averager needs it to be")
