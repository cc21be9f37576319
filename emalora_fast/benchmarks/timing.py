"""Timing on any device: CUDA events via triton.testing.do_bench, else perf_counter medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def measure(
    fn: Callable[[], object], device: torch.device, *, reps: int = 20, warmup: int = 3
) -> float:
    """Median seconds of one call of ``fn`` (after warm-up)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Rounds:
    """Per provider, the time of each round (see :func:`measure_rounds`), in seconds."""

    times: dict[str, list[float]]

    def best(self, name: str) -> float:
        """The least disturbed round's time (other load only ever adds time)."""
        return min(self.times[name])

    def ratio(self, num: list[str], den: str) -> tuple[float, float, float]:
        """``min(best of num) / best(den)``, and the lowest and highest ratio of one round
        (the spread): the fastest of ``num`` in that round over ``den`` in the same round."""
        value = min(self.best(n) for n in num) / self.best(den)
        per_round = [
            min(self.times[n][r] for n in num) / self.times[den][r]
            for r in range(len(self.times[den]))
        ]
        return value, min(per_round), max(per_round)


def measure_rounds(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int = 5,
    reps: int = 3,
    warmup: int = 2,
) -> Rounds:
    """Time several providers side by side, robust to a machine whose load changes.

    In each of ``rounds`` rounds every provider runs ``reps`` times, the providers in a
    rotated order from round to round, so that a burst of other load falls on all of them
    alike rather than on whichever ran during it. A round's time is the fastest of its calls on
    CPU (where other processes take the cores for tens of milliseconds, a median of a few calls
    is still disturbed; interference only ever adds time), do_bench's median on CUDA. Report
    :meth:`Rounds.best` and :meth:`Rounds.ratio` with its spread over the rounds.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                times[name].append(measure(fns[name], device))
                continue
            calls = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fns[name]()
                calls.append(time.perf_counter() - t0)
            times[name].append(min(calls))
    return Rounds(times)


def copy_case(numel: int, device: torch.device) -> Callable[[], object]:
    """A plain copy of ``numel`` fp32 elements: moves 8 bytes per element."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
