"""TRL integration microbenchmarks: the SDFT teacher update and one generalized-JSD loss step.

Run: ``pytest bench/bench_trl.py`` (compare rows within one group and one run). The teacher
update runs on the Llama-3-8B-shaped LoRA set (r=16, all linear layers; 2 of 32 layers on CPU,
the tiny shape in smoke mode); the loss step on fp32 logits at SmolLM2's vocabulary (V = 49,152).
"""

import pytest
import torch
from conftest import SMOKE, run

pytest.importorskip("trl")

from emalora_fast.benchmarks import trl as cases  # noqa: E402

MODEL = "tiny" if SMOKE else "llama3-8b"
LAYERS = None if SMOKE or torch.cuda.is_available() else 2
N, V = (8, 512) if SMOKE else ((4096 if torch.cuda.is_available() else 512), 49152)


@pytest.mark.parametrize("provider", ["emalora", "trl_callback"])
def bench_sdft_teacher_update(benchmark, device, provider):
    providers, numel = cases.teacher_update_cases(device, model=MODEL, layers=LAYERS)
    benchmark.group = f"sdft-teacher-update-{MODEL}-r16-{LAYERS or 'all'}-layers"
    benchmark.extra_info.update(numel=numel)
    run(benchmark, providers[provider])


@pytest.mark.parametrize("provider", ["emalora", "trl"])
def bench_generalized_jsd_step(benchmark, device, provider):
    benchmark.group = f"generalized-jsd-step-{N}x{V}"
    run(benchmark, cases.loss_step_case(provider, N, V, device))
