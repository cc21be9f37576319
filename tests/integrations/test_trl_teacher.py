"""The SDFT/SDPO EMA teacher on the fused averager against TRL's own PEFTAdapterEMACallback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import FP32_RTOL, assert_close, tiny_llama, tiny_peft_llama  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from transformers import TrainerState  # noqa: E402
from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback  # noqa: E402

from emalora_fast.integrations.trl import (  # noqa: E402
    FusedAdapterEMACallback,
    fused_ema_teacher,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _student(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _teacher(model, name="teacher") -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model, adapter_name=name)


def _optimizer_step(models, scale=0.05):
    """The same random change of every trainable tensor in each model (an optimizer step)."""
    deltas = None
    for m in models:
        params = [p for p in m.parameters() if p.requires_grad]
        if deltas is None:
            deltas = [torch.randn_like(p) * scale for p in params]
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d)


def _run(callbacks_models, steps, hook=None):
    for cb, _ in callbacks_models:
        cb.on_train_begin(None, TrainerState(global_step=0), None)
    for t in range(1, steps + 1):
        _optimizer_step([m for _, m in callbacks_models])
        for cb, _ in callbacks_models:
            cb.on_step_end(None, TrainerState(global_step=t), None)
        if hook is not None:
            hook(t)


@pytest.mark.parametrize("sync_steps", [1, 3])
@pytest.mark.parametrize("rate", [0.05, 0.3, 1.0])
def test_zero_init_equals_trl_callback(sync_steps, rate):
    trl_model = tiny_peft_llama(vocab=64)
    our_model = copy.deepcopy(trl_model)
    theirs = PEFTAdapterEMACallback(trl_model, update_rate=rate, sync_steps=sync_steps)
    ours = FusedAdapterEMACallback(our_model, update_rate=rate, sync_steps=sync_steps, init="zero")
    ref: dict[str, torch.Tensor] = {}

    def check(t):
        if t % sync_steps == 0:  # the float64 formula, from zeros
            for k, v in _student(our_model).items():
                ref[k] = (1 - rate) * ref.get(k, torch.zeros_like(v, dtype=torch.float64))
                ref[k] = ref[k] + rate * v.double()
        mine, trl = _teacher(our_model), _teacher(trl_model)
        assert mine.keys() == trl.keys() and len(mine) == 28
        for k in mine:
            want = ref.get(k, torch.zeros_like(mine[k], dtype=torch.float64))
            assert_close(mine[k], trl[k], FP32_RTOL, f"step {t} {k} vs TRL")
            assert_close(mine[k], want.float(), FP32_RTOL, f"step {t} {k} vs float64")

    _run([(theirs, trl_model), (ours, our_model)], steps=7, hook=check)
    assert our_model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in our_model.named_parameters() if ".teacher." in n)


def test_copy_init_starts_at_the_student():
    model = tiny_peft_llama(vocab=64)
    cb = FusedAdapterEMACallback(model, update_rate=0.2)  # init="copy"
    ref = {k: v.double() for k, v in _student(model).items()}

    def check(t):
        for k, v in _student(model).items():
            ref[k] = 0.8 * ref[k] + 0.2 * v.double()
        for k, v in _teacher(model).items():
            assert_close(v, ref[k].float(), FP32_RTOL, f"step {t} {k}")

    cb.on_train_begin(None, TrainerState(global_step=0), None)
    for k, v in _teacher(model).items():
        assert torch.equal(v, _student(model)[k])
    _run([(cb, model)], steps=4, hook=check)


@pytest.mark.parametrize("kind", ["dora", "embedding", "modules_to_save"])
def test_adapters_trl_refuses(kind):
    base = tiny_llama(vocab=64)
    cfg = {
        "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        "embedding": LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
        "modules_to_save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }[kind]
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.02)
    cb = FusedAdapterEMACallback(model, update_rate=0.1)
    ref = {k: v.double() for k, v in _student(model).items()}

    def check(t):
        for k, v in _student(model).items():
            ref[k] = 0.9 * ref[k] + 0.1 * v.double()
        mine = _teacher(model)
        assert mine.keys() == ref.keys()
        for k, v in mine.items():
            assert_close(v, ref[k].float(), FP32_RTOL, f"{kind} step {t} {k}")

    _run([(cb, model)], steps=3, hook=check)


def test_bad_input_changes_nothing():
    model = tiny_peft_llama(vocab=64)
    before = set(model.peft_config)
    with pytest.raises(ValueError, match="needs a peft model"):
        FusedAdapterEMACallback(tiny_llama(vocab=64))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        FusedAdapterEMACallback(model, teacher_adapter_name="default")
    for rate in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"update_rate must be a number in \(0, 1\]"):
            FusedAdapterEMACallback(model, update_rate=rate)
    for steps in (0, 1.0):
        with pytest.raises(ValueError, match="sync_steps must be an integer >= 1"):
            FusedAdapterEMACallback(model, sync_steps=steps)
    with pytest.raises(ValueError, match="init must be 'copy' or 'zero'"):
        FusedAdapterEMACallback(model, init="ones")
    with pytest.raises(TypeError, match="SDFTTrainer or SDPOTrainer"):
        fused_ema_teacher(object)
    assert set(model.peft_config) == before


def test_import_emalora_fast_never_imports_trl():
    code = "import sys, emalora_fast; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# SDFTTrainer end to end: generation through transformers, TRL's losses, our teacher adapter.


def _sdft_run(tmp_path, model, trainer_cls, tag, prepare=None, **config):
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig
    from trl_helpers import record_losses, tiny_tokenizer

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, vocab - 2, (n,), generator=g).tolist())

    data = Dataset.from_dict(
        {"prompt": [words(3) for _ in range(6)], "privileged_context": [words(2) for _ in range(6)]}
    )
    args = SDFTConfig(
        output_dir=str(tmp_path / tag),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-2,
        optim="sgd",
        max_completion_length=4,
        num_generations=1,
        teacher_model_kind="ema",
        teacher_update_rate=0.3,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **({"distillation_mode": "full_logits"} | config),
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(vocab)
    )
    if prepare is not None:
        prepare(trainer)
    losses = record_losses(trainer)
    trainer.train()
    return trainer, losses


def test_sdft_losses_equal_trl_with_zero_init(tmp_path):
    from trl.experimental.sdft import SDFTTrainer

    model0 = tiny_peft_llama(vocab=64, b_std=0.2)
    trl_trainer, trl_losses = _sdft_run(tmp_path, copy.deepcopy(model0), SDFTTrainer, "trl")
    ours_cls = fused_ema_teacher(SDFTTrainer, init="zero")
    our_trainer, our_losses = _sdft_run(tmp_path, copy.deepcopy(model0), ours_cls, "ours")
    kinds = [type(cb).__name__ for cb in our_trainer.callback_handler.callbacks]
    assert "FusedAdapterEMACallback" in kinds and "PEFTAdapterEMACallback" not in kinds
    assert len(trl_losses) == len(our_losses) == 3
    for step, (a, b) in enumerate(zip(trl_losses, our_losses), 1):
        assert torch.isfinite(a) and a.abs() > 0
        assert_close(b, a, FP32_RTOL, f"step {step} loss")
    mine, trl = _teacher(our_trainer.model), _teacher(trl_trainer.model)
    for k in trl:
        assert_close(mine[k], trl[k], FP32_RTOL, k)


def test_sdft_trains_modules_to_save_where_trl_raises(tmp_path):
    from trl.experimental.sdft import SDFTTrainer

    def model():  # a trainable lm_head copy: not "pure LoRA" for TRL
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        return get_peft_model(tiny_llama(vocab=64), cfg)

    with pytest.raises(ValueError, match="non-pure-LoRA"):
        _sdft_run(tmp_path, model(), SDFTTrainer, "trl")
    m = model()
    trainer, losses = _sdft_run(tmp_path, m, fused_ema_teacher(SDFTTrainer), "ours")
    assert len(losses) == 3 and all(torch.isfinite(x) for x in losses)
    teacher, student = _teacher(m), _student(m)
    head = next(k for k in teacher if "lm_head" in k)
    assert not torch.equal(teacher[head], student[head])  # averaged, not the live copy
    assert m.active_adapter == "default"
