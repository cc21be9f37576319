"""The averager on a real (tiny) peft Llama model: swap, export, resume, teacher adapter."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, assert_close, tiny_llama, tiny_peft_llama

from emalora_fast import BEMA, EMA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_base(seed: int = 0):
    return tiny_llama(seed=seed)


def tiny_peft_model(seed: int = 0):
    return tiny_peft_llama(seed=seed)


def train_steps(model, opt, avg, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.arange(24).reshape(2, 12) % 128


@pytest.mark.parametrize("cls", [EMA, BEMA])
def test_real_training_swap_and_export(cls, tmp_path):
    model = tiny_peft_model()
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 28
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    avg = cls(model, decay=0.7) if cls is EMA else cls(model)
    assert avg.parameter_names == lora
    train_steps(model, opt, avg, 5)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = avg.averaged_state_dict()
    assert any(not torch.equal(averaged[n], live[n]) for n in lora)
    live_logits = logits(model, IDS)
    with avg.swapped():
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), averaged[n] if n in averaged else live[n])
        swapped_logits = logits(model, IDS)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n]), n
    assert torch.equal(logits(model, IDS), live_logits)

    avg.save_pretrained(tmp_path / "avg")
    assert (tmp_path / "avg" / "adapter_model.safetensors").exists()
    assert (tmp_path / "avg" / "adapter_config.json").exists()
    base = tiny_base()  # same seed: same base weights
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "avg")
    assert_close(logits(loaded, IDS), swapped_logits, FP32_RTOL, "reloaded logits")


def test_resume_from_state_dict_continues_identically(tmp_path):
    model = tiny_peft_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    avg = BEMA(model, update_after=1, update_every=2)
    train_steps(model, opt, avg, 3, seed=1)
    torch.save({"avg": avg.state_dict(), "model": model.state_dict()}, tmp_path / "ck.pt")
    train_steps(model, opt, avg, 4, seed=2)

    model2 = tiny_peft_model(seed=5)
    ck = torch.load(tmp_path / "ck.pt")
    model2.load_state_dict(ck["model"])
    opt2 = torch.optim.SGD([p for p in model2.parameters() if p.requires_grad], lr=0.1)
    avg2 = BEMA(model2, update_after=1, update_every=2)
    avg2.load_state_dict(ck["avg"])
    train_steps(model2, opt2, avg2, 4, seed=2)
    assert avg2.step == avg.step == 7
    a, b = avg.averaged_state_dict(), avg2.averaged_state_dict()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_teacher_adapter_is_frozen_written_and_restores_state():
    model = tiny_peft_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    avg = BEMA(model, teacher_adapter="ema")
    assert "ema" in model.peft_config
    assert model.active_adapters == ["default"]
    assert [p for p in model.parameters() if p.requires_grad] == trainable
    assert sum(len(g["params"]) for g in opt.param_groups) == n_opt
    train_steps(model, opt, avg, 4)

    teacher = {
        n.replace(".ema.", ".default."): p.detach()
        for n, p in model.named_parameters()
        if ".ema." in n
    }
    averaged = avg.averaged_state_dict()
    assert set(teacher) == set(averaged)
    for n in averaged:
        assert torch.equal(teacher[n], averaged[n]), n

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with avg.swapped():
        swapped_logits = logits(model, IDS)
    with avg.teacher():
        assert model.active_adapters == ["ema"]
        teacher_logits = logits(model, IDS)
    assert model.active_adapters == ["default"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(teacher_logits, swapped_logits)
    # restored even when the body raises
    with pytest.raises(KeyError), avg.teacher():
        raise KeyError("x")
    assert model.active_adapters == ["default"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # the teacher got no gradient from training
    assert all(p.grad is None for n, p in model.named_parameters() if ".ema." in n)


def test_teacher_needs_peft_model():
    from torch import nn

    m = nn.Module()
    m.lora_A = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="peft model"):
        EMA(m, param_filter=lambda n, p: True, teacher_adapter="ema")
