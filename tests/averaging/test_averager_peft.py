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
    avg = BEMA(model, teacher_adapter="ema", teacher_weights="bema")
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
        assert model.active_adapters == ["default"]  # the teacher's weights, swapped in
        assert not model.training
        teacher_logits = logits(model, IDS)
    assert model.training
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


def mixed_dtype_model():
    """A peft model whose adapter holds fp32 and bf16 tensors: two groups, two launches."""
    model = tiny_peft_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layers.1." in n and "lora_" in n:
                p.data = p.data.to(torch.bfloat16)
    return model


def test_failed_launch_in_a_later_group_changes_no_group(monkeypatch):
    model, twin = mixed_dtype_model(), mixed_dtype_model()
    avg = BEMA(model, teacher_adapter="teacher", teacher_weights="bema")
    ref = BEMA(twin, teacher_adapter="teacher", teacher_weights="bema")
    assert len(avg._groups) == 2
    for a in (avg, ref):
        a.update()
    with torch.no_grad():
        for m in (model, twin):
            g = torch.Generator().manual_seed(11)
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype))

    def state(a):
        return [t.clone() for g in a._groups for t in g.state_buffers()]

    before = state(avg)
    real, calls = avg._launch, []

    def second_fails(g, *args):
        calls.append(g)
        if len(calls) == 2:
            raise RuntimeError("launch failed in group 2")
        return real(g, *args)

    monkeypatch.setattr(avg, "_launch", second_fails)
    with pytest.raises(RuntimeError, match="group 2"):
        avg.update()
    after = state(avg)
    assert len(before) == len(after) and all(
        torch.equal(x, y) for x, y in zip(before, after, strict=True)
    ), "a group changed"
    assert avg.step == 1
    monkeypatch.undo()
    avg.update()  # the retry applies step 2 once, to every group
    ref.update()
    for x, y in zip(state(avg), state(ref), strict=True):
        assert torch.equal(x, y)


def test_load_state_dict_refuses_nonfinite_state():
    model = tiny_peft_model()
    avg = EMA(model, decay=0.9)
    avg.update()
    state = avg.state_dict()
    name = avg.parameter_names[3]
    state["ema"][name][0, 0] = float("nan")
    before = avg.state_dict()
    with pytest.raises(ValueError, match=r"ema\[.*\] holds NaN/Inf"):
        avg.load_state_dict(state)
    for n, t in avg.state_dict()["ema"].items():
        assert torch.equal(t, before["ema"][n])


def test_a_parameter_replaced_in_the_middle_is_followed():
    model = tiny_peft_model()
    avg = EMA(model, decay=0.5)
    avg.update()
    name = avg.parameter_names[9]  # neither the first nor the last
    owner, _, key = name.rpartition(".")
    module = model.get_submodule(owner)
    new = torch.nn.Parameter(torch.randn_like(getattr(module, key)))
    setattr(module, key, new)  # a new Parameter object, new storage
    shadow = avg.averaged_state_dict(torch.float32)[name]
    avg.update()
    expected = 0.5 * shadow + 0.5 * new.detach()
    assert_close(avg.averaged_state_dict(torch.float32)[name], expected, FP32_RTOL, name)


def test_merge_and_unload_is_a_clear_error(tmp_path):
    model = tiny_peft_model()
    avg = BEMA(model)
    avg.update()
    model.merge_and_unload()
    with pytest.raises(RuntimeError, match="no longer in the model .*merge_and_unload"):
        avg.update()
    assert avg.step == 1
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        avg.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def timm_model_ema_v3():
    """timm's own ModelEmaV3, loaded from its file (timm's package import needs torchvision)."""
    import importlib.metadata
    import importlib.util

    try:
        path = importlib.metadata.distribution("timm").locate_file("timm/utils/model_ema.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("timm is not installed (make install puts it in the dev environment)")
    spec = importlib.util.spec_from_file_location("timm_model_ema", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelEmaV3


@pytest.mark.parametrize(
    "hp",
    [
        dict(decay=0.9),
        dict(decay=0.9, update_after=3),
        dict(decay=0.95, warmup=True),
        dict(decay=0.99, warmup=True, warmup_gamma=2.0, warmup_power=0.75, update_after=2),
        dict(decay=0.9, warmup=True, min_decay=0.3),
    ],
)
def test_ema_matches_timm_model_ema_v3_driven_like_timm_train(hp):
    """timm's train loop: after each optimizer step, num_updates += 1, then
    model_ema.update(model, step=num_updates)."""
    ModelEmaV3 = timm_model_ema_v3()
    model = tiny_peft_model()
    timm_ema = ModelEmaV3(
        model,
        decay=hp["decay"],
        min_decay=hp.get("min_decay", 0.0),
        update_after_step=hp.get("update_after", 0),
        use_warmup=hp.get("warmup", False),
        warmup_gamma=hp.get("warmup_gamma", 1.0),
        warmup_power=hp.get("warmup_power", 2 / 3),
    )
    ours = EMA(model, **hp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(7)
    timm_params = dict(timm_ema.module.named_parameters())
    for num_updates in range(1, 13):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        timm_ema.update(model, step=num_updates)
        ours.update(step=num_updates)
        assert ours.current_decay() == timm_ema.get_decay(num_updates)
        averaged = ours.averaged_state_dict(torch.float32)
        for n in ours.parameter_names:
            assert_close(averaged[n], timm_params[n].detach(), FP32_RTOL, f"{n} at {num_updates}")
