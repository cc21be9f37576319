"""Benchmarks share the tests' set-up: Triton under its interpreter where no GPU runs it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# EMALORA_BENCH_SMOKE=1 (CI) runs every benchmark once on tiny shapes and asserts nothing on time.
SMOKE = os.environ.get("EMALORA_BENCH_SMOKE") == "1"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(benchmark, fn):
    """Time ``fn`` with pytest-benchmark (one round in smoke mode)."""
    if SMOKE:
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    return benchmark(fn)
