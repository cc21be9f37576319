"""Small-sample statistics of the study: t intervals, paired differences, curve diagnostics.

No scipy: Student's t quantile is computed from the regularized incomplete beta function
(continued fraction, Numerical Recipes' ``betacf``) and inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Interval",
    "describe",
    "paired",
    "t_quantile",
    "t_cdf",
    "diverged",
    "oscillation",
]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
    ln += b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (e.g. p = 0.975 for a two-sided 95% interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and a two-sided t interval of n values.

    With n = 1 the standard deviation and interval are NaN (undefined).
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    worst: float  # the largest value (losses: the worst seed)
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of 0 (a significant difference)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in ("n", "mean", "std", "low", "high", "worst")}


def describe(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± t interval: mean ± t_{(1+level)/2, n-1} · s / √n, s with n - 1 in the divisor."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    mean = math.fsum(xs) / n
    if n == 1 or not all(math.isfinite(x) for x in xs):
        nan = float("nan")
        std = nan if n == 1 else float("inf")
        return Interval(n, mean, std, nan, nan, max(xs), level)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, max(xs), level)


def paired(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of the paired differences ``values[i] - baseline[i]`` (same seed i)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired() needs equal lengths, got {len(values)} and {len(baseline)}")
    return describe([a - b for a, b in zip(values, baseline)], level)


def diverged(curve: Sequence[float], min_rise: float = 0.02) -> bool:
    """A run that lost control of its loss.

    True when a value is not finite, or when the final value gave back more than half of the
    run's improvement over its start (and at least ``min_rise``): with s the first value, b the
    smallest and f the last, ``f - b > max(0.5 * (s - b), min_rise)``.
    """
    if not curve or not all(math.isfinite(v) for v in curve):
        return True
    s, b, f = curve[0], min(curve), curve[-1]
    return f - b > max(0.5 * (s - b), min_rise)


def oscillation(curve: Sequence[float]) -> float:
    """Total upward movement of a loss curve: Σ max(0, c[i+1] - c[i]) (0 for a monotone fall)."""
    return math.fsum(max(0.0, b - a) for a, b in zip(curve, curve[1:]))
