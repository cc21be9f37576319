"""SelfDistiller: the averaged adapter as teacher of the trainable one, and the Trainer subclass."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, assert_close, tiny_peft_llama

from emalora_fast import BEMA, EMA, DistillationLoss, SelfDistiller, distillation_loss
from emalora_fast.distill.self_distill import next_token_labels

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FUSED = [False, True]


def tiny_model(seed: int = 0):
    return tiny_peft_llama(vocab=96, seed=seed, b_std=0.05)


def batch(seed: int = 1, b: int = 3, s: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    return {"input_ids": ids, "labels": labels}


def snapshot(model):
    return (
        list(model.active_adapters),
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def fused_or_skip(fused: bool) -> bool:
    if fused:
        pytest.importorskip("emalora_fast.distill.fused_linear")
    return fused


@pytest.mark.parametrize("fused", FUSED)
def test_loss_matches_distillation_loss_on_teacher_and_student_logits(fused):
    fused_or_skip(fused)
    model = tiny_model()
    avg = BEMA(model, teacher_adapter="teacher")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(1, 4):  # make student and teacher differ
        loss = model(**batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update()
    d = SelfDistiller(
        model,
        avg,
        loss=DistillationLoss(divergence="jsd", beta=0.3, temperature=2.0),
        hard_label_weight=0.25,
        fused_linear=fused,
    )
    b = batch(7)
    ours, metrics = d.compute_loss(b)
    assert metrics["distilling"]
    ours.backward()  # before swapped(), which writes the parameters in place
    # gradients reach the student adapter only
    for n, p in model.named_parameters():
        if ".teacher." in n or "lora_" not in n:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad(), avg.swapped():
        teacher_logits = model(input_ids=b["input_ids"]).logits
    student_logits = model(input_ids=b["input_ids"]).logits
    ref = distillation_loss(
        student_logits.double(),
        teacher_logits.double(),
        labels=next_token_labels(b["labels"]),
        divergence="jsd",
        beta=0.3,
        temperature=2.0,
        hard_label_weight=0.25,
        backend="torch",
    )
    assert_close(ours.detach().double().reshape(1), ref.reshape(1), 1e-4, "loss")


@pytest.mark.parametrize("fused", FUSED)
def test_training_reduces_loss_and_keeps_state(fused):
    fused_or_skip(fused)
    model = tiny_model()
    avg = EMA(model, decay=0.9, teacher_adapter="teacher")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    opt_params = [list(g["params"]) for g in opt.param_groups]
    d = SelfDistiller(model, avg, hard_label_weight=0.5, fused_linear=fused)
    state = snapshot(model)
    b = batch(3)
    losses = []
    for step in range(1, 16):
        loss, _ = d.compute_loss(b, step=step)
        assert snapshot(model) == state
        loss.backward()
        teacher_grads = [p.grad for n, p in model.named_parameters() if ".teacher." in n]
        assert all(g is None for g in teacher_grads)
        opt.step()
        opt.zero_grad()
        avg.update(step=step)
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses
    assert [list(g["params"]) for g in opt.param_groups] == opt_params
    assert snapshot(model) == state


def test_base_teacher_uses_the_model_without_adapters():
    model = tiny_model()
    d = SelfDistiller(model, teacher="base", hard_label_weight=0.0, fused_linear=False)
    b = batch(2)
    ours, _ = d.compute_loss(b)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=b["input_ids"]).logits
    student_logits = model(input_ids=b["input_ids"]).logits
    ref = distillation_loss(student_logits, base_logits, labels=next_token_labels(b["labels"]))
    assert_close(ours.detach().reshape(1), ref.detach().reshape(1), FP32_RTOL, "loss")
    assert ours.item() > 0


def test_distill_from_step_skips_the_teacher(monkeypatch):
    model = tiny_model()
    avg = BEMA(model, teacher_adapter="teacher")
    d = SelfDistiller(model, avg, distill_from_step=3, fused_linear=False)
    calls = []
    real = avg.teacher
    monkeypatch.setattr(avg, "teacher", lambda: calls.append(1) or real())
    b = batch(4)
    loss1, m1 = d.compute_loss(b, step=1)
    assert not m1["distilling"] and calls == []
    ce = model(**b).loss  # transformers' mean cross-entropy over scored tokens
    assert_close(loss1.detach().reshape(1), ce.detach().reshape(1), FP32_RTOL, "ce")
    _, m3 = d.compute_loss(b, step=3)
    assert m3["distilling"] and calls == [1]


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs the averager"):
        SelfDistiller(model)
    with pytest.raises(ValueError, match="trains nothing.*hard_label_weight > 0"):
        SelfDistiller(model, EMA(model), hard_label_weight=0.0)
    assert SelfDistiller(model, EMA(model), hard_label_weight=0.0, distill_from_step=5)
    with pytest.raises(ValueError, match="teacher must be"):
        SelfDistiller(model, teacher="ema")
    with pytest.raises(ValueError, match="hard_label_weight"):
        SelfDistiller(model, teacher="base", hard_label_weight=1.5)


def test_trainer_subclass_with_gradient_accumulation(tmp_path):
    from emalora_fast.integrations.transformers import SelfDistillationTrainer

    model = tiny_model()
    avg = BEMA(model, teacher_adapter="teacher")
    d = SelfDistiller(model, avg, hard_label_weight=0.5)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {k: v[0] for k, v in batch(100 + i, b=1).items()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    seen = []
    real = d.compute_loss

    def spy(inputs, **kw):
        seen.append(kw["num_items_in_batch"])
        return real(inputs, **kw)

    d.compute_loss = spy
    trainer = SelfDistillationTrainer(model=model, args=args, train_dataset=Data(), distiller=d)
    trainer.train()
    assert avg.step == 4
    # every micro-batch is normalized by the scored tokens of the whole accumulated batch:
    # 2 micro-batches x 2 sequences, each with 10 targets of which the first 3 are unscored
    assert [int(n) for n in seen] == [4 * 7] * 8


def test_padding_is_not_scored_without_labels():
    model = tiny_model()
    d = SelfDistiller(model, teacher="base", hard_label_weight=0.5)
    b = batch(9)
    mask = torch.ones_like(b["input_ids"])
    mask[1, 7:] = 0  # right padding of the second sequence
    implicit, _ = d.compute_loss({"input_ids": b["input_ids"], "attention_mask": mask})
    labels = b["input_ids"].masked_fill(mask == 0, -100)
    explicit, _ = d.compute_loss(
        {"input_ids": b["input_ids"], "attention_mask": mask, "labels": labels}
    )
    assert torch.equal(implicit, explicit)
    unmasked, _ = d.compute_loss({"input_ids": b["input_ids"], "attention_mask": mask,
                                  "labels": b["input_ids"]})  # fmt: skip
    assert not torch.equal(implicit, unmasked)


@pytest.mark.parametrize("cls", [EMA, BEMA])
def test_defaults_train_from_peft_init(cls):
    """SelfDistiller(model, avg) as the README writes it: from peft's zero lora_B, the student
    learns (a positive hard-label weight by default), and the teacher follows."""
    model = tiny_peft_llama(vocab=96, b_std=0.0)
    avg = cls(model)
    d = SelfDistiller(model, avg, fused_linear=False)
    assert d.loss.options["hard_label_weight"] == 0.5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 4):
        loss, _ = d.compute_loss(batch(step))
        assert loss.item() > 0
        loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update()
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert any(t.abs().max() > 0 for n, t in avg.averaged_state_dict().items() if "lora_B" in n)


def test_bema_burn_in_delays_distillation_by_default():
    model = tiny_model()
    assert SelfDistiller(model, BEMA(model, update_after=10)).distill_from_step == 11
    assert SelfDistiller(model, BEMA(model)).distill_from_step == 0
    assert SelfDistiller(model, EMA(model, update_after=10)).distill_from_step == 0


def test_teacher_forward_is_deterministic_under_dropout(monkeypatch):
    from helpers import tiny_llama
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(vocab=96), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.3)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # peft's zeros would hide the dropout of the LoRA path
    avg = EMA(model, decay=0.9)
    for teacher in ("average", "base"):
        d = SelfDistiller(model, avg, teacher=teacher, fused_linear=False)
        outs = []
        real = d._forward

        def spy(b, real=real, outs=outs):
            out = real(b)
            outs.append(out.detach().clone())
            return out

        monkeypatch.setattr(d, "_forward", spy)
        model.train()
        for _ in range(2):
            d.compute_loss(batch(3))
        teacher_a, student_a, teacher_b, student_b = outs
        assert torch.equal(teacher_a, teacher_b), teacher  # no dropout in the teacher
        assert not torch.equal(student_a, student_b)  # the student keeps its dropout
        assert model.training
