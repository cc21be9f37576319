"""Fused-linear distillation loss: ours vs materialize-then-distillation_loss vs naive torch vs the
four matmuls of a materializing method (the time floor on a GPU).

Run: ``pytest bench/bench_fused_linear.py`` (functions are named ``bench_*``, as under bench/'s
pytest.ini). Each row is one forward + backward of the forward-KL loss, self-distillation with a
shared head; ``extra_info`` holds each provider's extra peak memory (beyond inputs and returned
gradients), measured in a fresh process on CPU. Compare rows within one run only.
``EMALORA_BENCH_SMOKE=1`` runs each provider once on tiny shapes and asserts nothing on time.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the Triton backend runs only under its interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

from emalora_fast.benchmarks import fused_linear as cases  # noqa: E402

SMOKE = os.environ.get("EMALORA_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = cases.SHAPES["tiny" if SMOKE else ("llama3-8b" if DEVICE.type == "cuda" else "cpu")]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _peak_bytes(provider: str) -> int:
    """Extra peak memory (upper bound for ours, lower bound for the others) in a fresh process."""
    args = ["memory", provider, *map(str, SHAPE), str(DTYPE).removeprefix("torch."), DEVICE.type]
    proc = subprocess.run(
        [sys.executable, "-m", "emalora_fast.benchmarks.fused_linear", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    lower, upper = map(int, proc.stdout.split()[-2:])
    return upper if provider == "emalora" else lower


@pytest.mark.parametrize("provider", cases.PROVIDERS)
def bench_fused_linear(benchmark, provider):
    fn = cases.cases(DEVICE, SHAPE, DTYPE)[provider]
    n, h, v = SHAPE
    benchmark.group = f"fused-linear-{n}x{h}x{v}-{str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(
        shape=SHAPE, matmul_flops=cases.flops(SHAPE), peak_extra_bytes=_peak_bytes(provider)
    )
    if SMOKE:
        benchmark.pedantic(fn, rounds=1, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
