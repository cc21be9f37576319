"""Benchmark of the distillation loss: forward + backward time and extra peak memory.

Cases come from :mod:`emalora_fast.benchmarks.distill_loss` (shared with ``emalora-fast
bench``). Default problem: forward KL on fp32 logits, N=4096, V=32000 (CPU) or bf16, N=8192,
V=128256 (CUDA); ``EMALORA_BENCH_SMOKE=1`` uses tiny shapes and asserts nothing about time.
Extra peak memory is measured per provider in a fresh process and stored in ``extra_info``.
"""

import pytest

from emalora_fast.benchmarks.distill_loss import (
    PROVIDERS,
    SMOKE,
    _sync,
    make_inputs,
    peak_memory,
    problem,
    step,
)


@pytest.fixture(scope="module")
def inputs(device):
    n, v, dtype = problem(device.type)
    return make_inputs(n, v, dtype, device.type)


@pytest.fixture(scope="module")
def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_distill_loss(benchmark, inputs, provider):
    s, t = inputs
    device = s.device.type
    benchmark.group = "distill-loss"
    benchmark.extra_info.update(peak_memory(provider, device))
    benchmark.extra_info["shape"] = list(s.shape)
    benchmark.extra_info["dtype"] = str(s.dtype)

    def setup():  # the in-place provider consumes its logits: a fresh copy per round
        base = s.clone() if provider == "emalora_inplace" else s
        _sync(device)
        return (provider, base, t), {}

    def run(provider, base, t):
        step(provider, base, t)
        _sync(device)

    rounds = 1 if SMOKE else 5
    benchmark.pedantic(
        run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0 if SMOKE else 1
    )
