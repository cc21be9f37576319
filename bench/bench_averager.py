"""Averager microbenchmarks: fused EMA/BEMA update vs per-tensor loop vs torch foreach vs copy.

Run: ``pytest bench/bench_averager.py`` (group rows by kind; compare within one run). The copy row
moves 8 bytes per element; the fused update's floor is 12 (EMA) or 20 (BEMA) bytes per element.
"""

import pytest
import torch
from conftest import SMOKE, run

from emalora_fast.benchmarks import averager as cases
from emalora_fast.benchmarks.timing import copy_case

# On CPU 8 of the 32 layers (112 tensors, 10.5 M params) keep the run short; the GPU runs all.
LAYERS = 1 if SMOKE else (None if torch.cuda.is_available() else 8)
MODEL = "tiny" if SMOKE else "llama3-8b"


@pytest.mark.parametrize("kind", ["ema", "bema"])
@pytest.mark.parametrize("provider", ["emalora", "loop", "foreach", "averaged_model"])
def bench_averager(benchmark, device, kind, provider):
    if provider == "averaged_model" and kind == "bema":
        pytest.skip("AveragedModel has no BEMA")
    providers, numel = cases.cases(kind, MODEL, device, layers=LAYERS)
    benchmark.group = f"averager-{kind}-{MODEL}"
    benchmark.extra_info.update(numel=numel, floor_bytes_per_element=cases.FLOOR_BYTES[kind])
    run(benchmark, providers[provider])


@pytest.mark.parametrize("kind", ["ema", "bema"])
def bench_averager_copy(benchmark, device, kind):
    numel = sum(a * b for a, b in cases.lora_shapes(MODEL, layers=LAYERS))
    benchmark.group = f"averager-{kind}-{MODEL}"
    benchmark.extra_info.update(numel=numel, bytes_per_element=8)
    run(benchmark, copy_case(numel, device))


@pytest.mark.parametrize("provider", ["emalora", "peft_set_adapter", "forward_1x16"])
def bench_teacher_switch(benchmark, device, provider):
    """Entering and leaving the teacher on a 30-layer model (2 layers in smoke mode)."""
    from emalora_fast.benchmarks import teacher

    benchmark.group = "teacher-switch-30-layers"
    run(benchmark, teacher.cases(device, layers=2 if SMOKE else 30)[provider])


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("provider", ["emalora", "k_averagers", "k_foreach"])
def bench_profiles(benchmark, device, k, provider):
    """K EMA profiles: one launch for all vs K separate updates (floor 4 + 8K bytes/element)."""
    providers, numel = cases.profile_cases(k, MODEL, device, layers=LAYERS)
    benchmark.group = f"profiles-k{k}-{MODEL}"
    benchmark.extra_info.update(numel=numel, floor_bytes_per_element=cases.profile_floor_bytes(k))
    run(benchmark, providers[provider])
