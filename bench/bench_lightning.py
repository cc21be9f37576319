"""One update of the Lightning callback vs Lightning's own weight averaging, same peft model.

Run: ``pytest bench/bench_lightning.py`` (compare within one run). ``extra_info`` records each
callback's extra memory (the bytes of the tensors it holds that are not the model's): the adapter's
fp32 shadows and swap buffer for ours, a copy of the whole model for Lightning's callbacks.
"""

import functools

import pytest
import torch
from conftest import SMOKE, run

pytest.importorskip("lightning.pytorch")
from emalora_fast.benchmarks import lightning as cases  # noqa: E402

SIZE = "tiny" if SMOKE else "small"


@functools.cache
def _cases(device_type: str):
    return cases.cases(SIZE, torch.device(device_type))


@pytest.mark.parametrize("provider", cases.PROVIDERS)
def bench_lightning_update(benchmark, device, provider):
    steps, held, sizes = _cases(device.type)
    benchmark.group = f"lightning-update-{SIZE}"
    benchmark.extra_info.update(extra_bytes=held[provider], **sizes)
    run(benchmark, steps[provider])
