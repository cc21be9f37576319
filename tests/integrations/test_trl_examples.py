"""examples/trl_integration.py, every entry, at a tiny size (two optimizer steps each)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_integration.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trl_integration_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("entry", ["gkd", "distill", "sdft", "dpo", "bema"])
def test_example_entry_runs(example, entry, tmp_path, monkeypatch):
    from emalora_fast.integrations.trl import losses

    calls = []
    real = losses.fused_linear_distillation_loss if entry == "distill" else losses.distillation_loss
    name = "fused_linear_distillation_loss" if entry == "distill" else "distillation_loss"

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(losses, name, counting)
    trainer = example.main([entry, "--steps", "2", "--output-dir", str(tmp_path)])
    assert trainer.state.global_step == 2
    assert all(
        torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h
    )
    kinds = {type(cb).__name__ for cb in trainer.callback_handler.callbacks}
    if entry in ("gkd", "distill"):
        assert calls, "the trainer's loss did not go through emalora-fast"
    if entry == "sdft":
        assert "FusedAdapterEMACallback" in kinds and "teacher" in trainer.model.peft_config
    if entry == "dpo":
        assert "SyncRefAdapterCallback" in kinds and "ref" in trainer.model.peft_config
    if entry == "bema":
        assert (tmp_path / "bema" / "adapter_config.json").is_file()
