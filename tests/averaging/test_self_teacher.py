"""The averaged adapter as self-teacher, exact for the peft adapters people train.

Every scenario trains a real (tiny) peft model for several optimizer steps on fresh random data
and checks: every trainable tensor of the adapter is averaged; the average equals a float64
re-computation of the formulas; the teacher adapter holds the average of EVERY tensor of the
adapter (its logits under peft's own adapter switching equal the averaged model's); ``teacher()``
equals ``swapped()`` bit for bit; the exported adapter reloads to the averaged logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, Oracle, assert_close, tiny_causal_lm

from emalora_fast import BEMA, EMA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 128
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, **kw)


# name: (architecture, peft config factory, kinds that must be averaged)
SCENARIOS = {
    "lora-llama": ("llama", lambda: lora(target_modules="all-linear"), {"lora_A", "lora_B"}),
    "dora-llama": (
        "llama",
        lambda: lora(target_modules="all-linear", use_dora=True),
        {"lora_A", "lora_B", "lora_magnitude_vector"},
    ),
    "dora-qwen2": (
        "qwen2",
        lambda: lora(target_modules=["q_proj", "v_proj"], use_dora=True),
        {"lora_A", "lora_B", "lora_magnitude_vector"},
    ),
    "embedding-llama": (
        "llama",
        lambda: lora(target_modules=["embed_tokens", "q_proj"]),
        {"lora_embedding_A", "lora_embedding_B", "lora_A", "lora_B"},
    ),
    "embedding-gpt2": (
        "gpt2",
        lambda: lora(target_modules=["wte", "c_attn"], fan_in_fan_out=True),
        {"lora_embedding_A", "lora_embedding_B", "lora_A", "lora_B"},
    ),
    "modules_to_save-llama": (
        "llama",
        lambda: lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        {"lora_A", "lora_B", "modules_to_save"},
    ),
    "modules_to_save-qwen2": (
        "qwen2",
        lambda: lora(target_modules=LLAMA_LINEAR, modules_to_save=["lm_head"]),
        {"lora_A", "lora_B", "modules_to_save"},
    ),
    "loha-llama": (
        "llama",
        lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    ),
    "lokr-llama": (
        "llama",
        lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
        {"lokr_w1", "lokr_w2"},
    ),
    "ia3-llama": (
        "llama",
        lambda: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        {"ia3_l"},
    ),
}
AVERAGERS = {
    "ema": (EMA, dict(decay=0.8), "ema"),
    "ema-warmup": (EMA, dict(decay=0.9, warmup=True, update_after=1), "ema"),
    "bema-teacher-bema": (BEMA, dict(teacher_weights="bema", lag=2.0), "bema"),
    "bema-teacher-ema": (BEMA, dict(lag=2.0, update_after=1), "bema"),
}


def peft_model(arch: str, make_config, seed: int = 0):
    return peft.get_peft_model(tiny_causal_lm(arch, VOCAB, seed), make_config())


def train(model, avg, steps: int, lr: float = 2e-2, seed: int = 0) -> list[list[torch.Tensor]]:
    """AdamW steps on random tokens, each followed by ``avg.update()``; returns the averaged
    parameters' values after each step (float64), for the oracle."""
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update()
        seen.append([params[n].detach().double().clone() for n in avg.parameter_names])
    return seen


def eval_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def teacher_is_the_average(avg) -> bool:
    """An EMA's teacher is its average; a BEMA's follows its ema part unless told otherwise."""
    return isinstance(avg, EMA) or avg.teacher_weights == "bema"


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_teacher_is_exact(scenario, averager, tmp_path):
    arch, make_config, kinds = SCENARIOS[scenario]
    cls, hp, kind = AVERAGERS[averager]
    model = peft_model(arch, make_config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = [dict(model.named_parameters())[n].detach().double().clone() for n in trainable]
    avg = cls(model, teacher_adapter="teacher", **hp)
    assert avg.parameter_names == trainable  # every trainable tensor of the adapter
    assert set(avg.kinds()) == kinds
    assert f"{len(trainable)} tensors of adapter 'default'" in repr(avg)

    seen = train(model, avg, steps=5)
    oracle = Oracle(kind, initial, **{k: v for k, v in hp.items() if k != "teacher_weights"})
    for t, theta in enumerate(seen, 1):
        oracle.step(t, theta)
    averaged = avg.averaged_state_dict(torch.float32)
    want = oracle.averaged if teacher_is_the_average(avg) else oracle.ema
    for i, n in enumerate(trainable):
        assert_close(averaged[n], oracle.averaged[i], FP32_RTOL, f"average of {n}")
    params = dict(model.named_parameters())
    teacher_names = avg._teacher_names
    for i, n in enumerate(trainable):
        assert_close(params[teacher_names[n]].detach(), want[i], FP32_RTOL, f"teacher of {n}")

    ids = torch.randint(0, VOCAB, (2, 10))
    model.eval()
    live = eval_logits(model, ids)
    with avg.swapped():
        swapped = eval_logits(model, ids)
    with avg.teacher():
        taught = eval_logits(model, ids)
    assert not torch.equal(swapped, live)  # the average differs from the live weights
    if teacher_is_the_average(avg):
        assert torch.equal(taught, swapped)  # bit for bit
    else:  # a BEMA teacher following its ema part, not the extrapolated output
        assert not torch.equal(taught, swapped)
    # The teacher adapter itself, under peft's own switching: every tensor the adapter has.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter("teacher")
    by_peft = eval_logits(model, ids)
    model.set_adapter("default")
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    assert torch.equal(by_peft, taught)
    assert torch.equal(eval_logits(model, ids), live)

    avg.save_pretrained(tmp_path / "averaged")
    base = tiny_causal_lm(arch, VOCAB, 0)  # same seed: same base weights
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "averaged").eval()
    assert_close(eval_logits(reloaded, ids), swapped, FP32_RTOL, "reloaded averaged adapter")


def test_classification_head_is_averaged():
    """task_type SEQ_CLS: peft trains a copy of the classification head (modules_to_save)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = peft.get_peft_model(
        transformers.LlamaForSequenceClassification(cfg),
        lora(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
    )
    avg = EMA(model, decay=0.7, teacher_adapter="teacher")
    assert avg.kinds()["modules_to_save"] == 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(4):
        ids = torch.randint(1, VOCAB, (4, 9))
        model(input_ids=ids, labels=torch.randint(0, 3, (4,))).loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update()
    ids = torch.randint(1, VOCAB, (3, 9))
    model.eval()
    with avg.swapped():
        swapped = eval_logits(model, ids)
    with avg.teacher():
        taught = eval_logits(model, ids)
    assert torch.equal(taught, swapped)
    model.set_adapter("teacher")
    assert torch.equal(eval_logits(model, ids), swapped)


def test_only_the_active_adapter_is_averaged():
    model = peft_model("llama", lambda: lora(target_modules=["q_proj"]))
    model.add_adapter("other", lora(target_modules=["v_proj"]))
    other = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    avg = EMA(model, decay=0.5, teacher_adapter="teacher")
    assert all(".default." in n for n in avg.parameter_names) and len(avg.parameter_names) == 4
    train(model, avg, steps=2)
    for n, p in model.named_parameters():
        if n in other:
            assert torch.equal(p.detach(), other[n])
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 active adapters"):
        EMA(model)
    assert EMA(model, adapter="other").parameter_names == [
        n for n, p in model.named_parameters() if ".other." in n and p.requires_grad
    ]


def test_frozen_adapter_tensors_are_copied_into_the_teacher():
    """LoRA-FA style: lora_A frozen by the user. It is not averaged (it never changes), and the
    teacher adapter holds its value."""
    model = peft_model("llama", lambda: lora(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
                p.mul_(3.0)  # not peft's initial value, so a missed copy shows
    avg = EMA(model, decay=0.5, teacher_adapter="teacher")
    assert set(avg.kinds()) == {"lora_B"}
    train(model, avg, steps=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.eval()
    with avg.swapped():
        swapped = eval_logits(model, ids)
    model.set_adapter("teacher")
    assert torch.equal(eval_logits(model, ids), swapped)


def test_left_out_trainable_parameters_warn_once():
    model = peft_model("llama", lambda: lora(target_modules=["q_proj"]))
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a user-unfrozen norm
    with pytest.warns(UserWarning, match="1 trainable parameters are not averaged") as rec:
        avg = EMA(model)
    assert len(rec) == 1
    avg.update()
    chosen = BEMA(model, param_filter=lambda n, p: p.requires_grad)
    assert chosen.kinds() == {"lora_A": 2, "lora_B": 2, "other": 1}


def test_param_filter_needs_no_teacher_to_save(tmp_path):
    """Choosing tensors by hand keeps export working (it failed before when no teacher was
    asked for); tensors outside the adapter are refused by name."""
    model = peft_model(
        "llama", lambda: lora(target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    avg = EMA(model, decay=0.5, param_filter=lambda n, p: "lora_B" in n or "modules_to" in n)
    train(model, avg, steps=2)
    avg.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    wide = EMA(model, param_filter=lambda n, p: p.requires_grad)
    with pytest.raises(ValueError, match="not tensors of adapter 'default'.*averaged_state_dict"):
        wide.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="can hold only tensors of adapter 'default'"):
        EMA(model, param_filter=lambda n, p: p.requires_grad, teacher_adapter="t")


def test_teacher_runs_in_eval_mode_and_restores_everything():
    model = peft_model("llama", lambda: lora(target_modules="all-linear", lora_dropout=0.3))
    avg = EMA(model, decay=0.8)  # no teacher adapter: the teacher reads the shadows
    train(model, avg, steps=3)
    model.train()
    user_eval = model.base_model.model.model.layers[1].mlp
    user_eval.eval()  # a submodule the user keeps in eval mode
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, VOCAB, (2, 10))
    with avg.teacher():
        assert not any(m.training for m in model.modules())
        first = eval_logits(model, ids)
        second = eval_logits(model, ids)
        assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert torch.equal(first, second)  # deterministic: no dropout
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n]), n
    with pytest.raises(KeyError), avg.teacher():
        raise KeyError("restored even when the body raises")
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n]), n
    model.eval()
    with avg.swapped():
        assert torch.equal(eval_logits(model, ids), first)
    with avg.swapped(), pytest.raises(RuntimeError, match="nested"), avg.teacher():
        pass


def test_teacher_between_student_forward_and_backward():
    """A student forward taken before the teacher's keeps a valid graph: the gradient is the
    one of the live weights (the swap writes through .data and restores before backward)."""
    model = peft_model("llama", lambda: lora(target_modules="all-linear"))
    avg = EMA(model, decay=0.5, teacher_adapter="teacher")
    train(model, avg, steps=2)
    ids = torch.randint(0, VOCAB, (2, 10))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in trainable]
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad(), avg.teacher():
        model(input_ids=ids)
    loss.backward()
    for p, g in zip(trainable, plain, strict=True):
        assert torch.equal(p.grad, g)


def test_teacher_and_update_walk_no_module_tree(monkeypatch):
    """Per step, update() and teacher() work from cached lists: no module-tree walk, no
    parameter scan, no peft adapter switching."""
    model = peft_model("llama", lambda: lora(target_modules="all-linear", lora_dropout=0.1))
    avg = BEMA(model, teacher_adapter="teacher")
    avg.update()
    with avg.teacher():  # the first call builds the module cache
        pass

    def walked(*args, **kwargs):
        raise AssertionError("walked the model")

    for name in ("modules", "named_modules", "parameters", "named_parameters", "children"):
        monkeypatch.setattr(torch.nn.Module, name, walked)
    monkeypatch.setattr(model, "set_adapter", walked)
    for _ in range(3):
        avg.update()
        with avg.teacher():
            pass
    monkeypatch.undo()
    assert avg.step == 4
