"""Argument checks: one clear line that names the problem, raised before anything changes."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def real_scalar(value: Any) -> float | None:
    """``value`` as a Python float when it is one real number: an int or float, a NumPy scalar
    or 0-d array, any ``numbers.Real``, or a 0-d real tensor; else None. Booleans, strings,
    complex numbers and arrays or tensors with a dimension are not real scalars."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
        return float(value.item()) if ok else None
    if isinstance(value, np.ndarray):
        ok = value.ndim == 0 and value.dtype.kind in "iuf"
        return float(value) if ok else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def is_real_scalar(value: Any) -> bool:
    return real_scalar(value) is not None


def _given(value: Any) -> str:
    """What a check names as given: the value and, when it says less than it, its type."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(value, torch.Tensor) else "array"
        if value.ndim == 0:
            return f"a 0-d {value.dtype} {kind} holding {value.item()!r}"
        return f"a {value.dtype} {kind} of shape {tuple(value.shape)}"
    kind = type(value).__name__
    return f"{value!r} ({kind})" if kind not in ("int", "float") else repr(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float when it is a finite real scalar (:func:`real_scalar`) in the range;
    else a ValueError that names what was given."""
    x = real_scalar(value)
    ok = x is not None and math.isfinite(x)
    if ok and low is not None:
        ok = x > low if open_low else x >= low
    if ok and high is not None:
        ok = x < high if open_high else x <= high
    if not ok:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(
            f"{name} must be a finite real number in {rng} (a Python or NumPy number or a 0-d "
            f"tensor), got {_given(value)}"
        )
    return x


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
