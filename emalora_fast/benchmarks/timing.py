"""Timing on any device: CUDA events via triton.testing.do_bench, else perf_counter medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def copy_case(numel: int, device: torch.device) -> Callable[[], object]:
    """A plain copy of ``numel`` fp32 elements: moves 8 bytes per element."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
