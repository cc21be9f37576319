"""The BEMACallback drop-in against TRL's own BEMACallback and a float64 reference."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import FP32_RTOL, assert_close, tiny_llama, tiny_peft_llama  # noqa: E402
from transformers import TrainerState, TrainingArguments  # noqa: E402

from emalora_fast.integrations.trl import BEMACallback  # noqa: E402

HP = dict(update_freq=2, ema_power=0.5, bias_power=0.2, lag=10, multiplier=1.5)


def _step(models, scale=0.05):
    deltas = None
    for m in models:
        params = [p for p in m.parameters() if p.requires_grad]
        deltas = deltas or [torch.randn_like(p) * scale for p in params]
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d)


class Float64Bema:
    """ARCHITECTURE.md's BEMA (TRL's schedule), in float64, written from the formula."""

    def __init__(self, named, update_after, update_freq, kappa, eta, rho, gamma, beta_min=0.0):
        self.theta0 = {n: p.detach().double().clone() for n, p in named}
        self.ema = {n: t.clone() for n, t in self.theta0.items()}
        self.bema = {n: t.clone() for n, t in self.theta0.items()}
        self.tau, self.phi, self.k, self.eta, self.rho, self.g = (
            update_after, update_freq, kappa, eta, rho, gamma,
        )  # fmt: skip
        self.beta_min = beta_min

    def step(self, t, named):
        theta = {n: p.detach().double() for n, p in named}
        if t == self.tau:
            self.theta0 = {n: x.clone() for n, x in theta.items()}
            self.ema = {n: x.clone() for n, x in theta.items()}
            self.bema = {n: x.clone() for n, x in theta.items()}  # TRL's copy keeps its start
        elif t > self.tau and (t - self.tau) % self.phi == 0:
            beta = max((self.rho + self.g * t) ** -self.k, self.beta_min)
            alpha = (self.rho + self.g * t) ** -self.eta
            for n, x in theta.items():
                self.ema[n] = (1 - beta) * self.ema[n] + beta * x
                self.bema[n] = self.ema[n] + alpha * (x - self.theta0[n])


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)


@pytest.mark.parametrize("update_after", [0, 3])
def test_plain_model_equals_trl_bema(tmp_path, update_after):
    from trl import BEMACallback as TrlBEMACallback

    trl_model = tiny_llama(vocab=64)
    our_model = copy.deepcopy(trl_model)
    theirs = TrlBEMACallback(**HP, update_after=update_after)
    ours = BEMACallback(**HP, update_after=update_after)
    args = _args(tmp_path)
    theirs.on_train_begin(args, TrainerState(), None, model=trl_model)
    ours.on_train_begin(args, TrainerState(), None, model=our_model)
    for t in range(1, 10):
        _step([trl_model, our_model])
        theirs.on_step_end(args, TrainerState(global_step=t), None, model=trl_model)
        ours.on_step_end(args, TrainerState(global_step=t), None, model=our_model)
        if t > update_after and (t - update_after) % HP["update_freq"] == 0:
            mine = ours.averager.averaged_state_dict()
            trl = dict(theirs.running_model.named_parameters())
            for n, v in mine.items():
                assert_close(v, trl[n].detach(), FP32_RTOL, f"step {t} {n}")
    ours.on_train_end(args, TrainerState(), None)
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(tmp_path / "bema")
    for n, p in saved.named_parameters():
        assert torch.equal(p, ours.averager.averaged_state_dict()[n]), n


def test_peft_model_equals_float64_and_saves_adapter(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    model = tiny_peft_llama(vocab=64)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = Float64Bema(named, 2, HP["update_freq"], 0.5, 0.2, 10, 1.5)
    ours = BEMACallback(**HP, update_after=2)
    args = _args(tmp_path)
    ours.on_train_begin(args, TrainerState(), None, model=model)
    for t in range(1, 9):
        _step([model])
        ours.on_step_end(args, TrainerState(global_step=t), None, model=model)
        ref.step(t, named)
        mine = ours.averager.averaged_state_dict()
        for n, v in mine.items():
            assert_close(v, ref.bema[n].float(), FP32_RTOL, f"step {t} {n}")
    ours.on_train_end(args, TrainerState(), None)
    loaded = PeftModel.from_pretrained(tiny_llama(vocab=64), tmp_path / "bema")
    saved = get_peft_model_state_dict(loaded)
    want = {n: ref.bema[n].float() for n in ref.bema}
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(saved) == len(want) == 28
    for n, v in got.items():
        assert_close(v.detach(), want[n], FP32_RTOL, f"saved {n}")


def test_bad_input():
    with pytest.raises(ValueError, match="update_freq must be an integer >= 1"):
        BEMACallback(update_freq=0)
    with pytest.raises(ValueError, match="update_after must be an integer >= 0"):
        BEMACallback(update_after=-1)
    with pytest.raises(ValueError, match="lag"):
        BEMACallback(lag=0)
    cb = BEMACallback()
    with pytest.raises(ValueError, match="no trainable parameters"):
        cb.on_train_begin(
            None, TrainerState(), None, model=tiny_llama(vocab=64).requires_grad_(False)
        )
    assert cb.averager is None
