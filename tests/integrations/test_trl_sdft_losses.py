"""SDFT/SDPO's distillation_mode losses, streamed, against TRL's loss_utils (float64)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import FP32_RTOL, assert_close, rel_err, tiny_peft_llama  # noqa: E402
from trl.experimental.sdft import loss_utils as trl_losses  # noqa: E402

from emalora_fast.integrations.trl import self_distillation as ours  # noqa: E402
from emalora_fast.integrations.trl import use_streamed_losses  # noqa: E402


def _inputs(b=2, t=5, v=203):
    s = torch.randn(b, t, v) * 3
    te = torch.randn(b, t, v) * 3
    ids = torch.randint(0, v, (b, t))
    weights = torch.rand(b, t)  # a generic upstream gradient
    return s, te, ids, weights


def _check(fn_ours, fn_trl, s, te, weights, *args, **kw):
    a = s.clone().requires_grad_()
    out = fn_ours(a, te, *args, **kw)
    (out * weights).sum().backward()
    r = s.double().requires_grad_()
    ref = fn_trl(r, te.double(), *args, **kw)
    (ref * weights.double()).sum().backward()
    # The bound: the fp32 tolerance, or twice TRL's own fp32 error where its formula loses more
    # (the top-k tail bucket, log(1 - sum of top-k probabilities), cancels on some draws).
    f = s.clone().requires_grad_()
    own = fn_trl(f, te, *args, **kw)
    (own * weights).sum().backward()
    tol_loss = max(FP32_RTOL, 2 * rel_err(own.detach(), ref.detach()))
    tol_grad = max(FP32_RTOL, 2 * rel_err(f.grad, r.grad))
    assert_close(out.detach(), ref.detach().float(), tol_loss, "per-token loss")
    assert_close(a.grad, r.grad.float(), tol_grad, "grad")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_logits(alpha):
    s, te, _, w = _inputs()
    _check(
        ours.compute_full_logit_self_distillation_loss,
        trl_losses.compute_full_logit_self_distillation_loss,
        s, te, w, distillation_alpha=alpha,
    )  # fmt: skip


def test_sampled_token():
    s, te, ids, w = _inputs()
    _check(
        ours.compute_sampled_token_self_distillation_loss,
        trl_losses.compute_sampled_token_self_distillation_loss,
        s, te, w, ids, distillation_alpha=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="alpha=1.0"):
        ours.compute_sampled_token_self_distillation_loss(s, te, ids, distillation_alpha=0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [False, True])
def test_topk_logits(alpha, tail):
    s, te, _, w = _inputs()
    _check(
        ours.compute_topk_self_distillation_loss,
        trl_losses.compute_topk_self_distillation_loss,
        s, te, w, distillation_topk=7, distillation_alpha=alpha, distillation_add_tail=tail,
    )  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        {"distillation_mode": "topk_logits", "distillation_topk": 8, "distillation_add_tail": True},
        {"distillation_mode": "sampled_token", "distillation_alpha": 1.0},
        {"distillation_mode": "full_logits", "distillation_alpha": 0.5},
    ],
    ids=["topk", "sampled", "full"],
)
def test_sdft_trainer_steps_match_trl(tmp_path, config):
    from test_trl_teacher import _sdft_run
    from trl.experimental.sdft import SDFTTrainer

    torch.set_num_threads(1)
    model0 = tiny_peft_llama(vocab=64, b_std=0.2)
    config = config | {"top_k": 1}  # greedy completions: a rounding cannot flip a sample
    _, trl_losses_ = _sdft_run(tmp_path, copy.deepcopy(model0), SDFTTrainer, "trl", **config)
    _, our_losses = _sdft_run(
        tmp_path, copy.deepcopy(model0), SDFTTrainer, "ours", prepare=use_streamed_losses, **config
    )
    assert len(trl_losses_) == len(our_losses) == 3
    for step, (a, b) in enumerate(zip(trl_losses_, our_losses), 1):
        assert torch.isfinite(a) and a.abs() > 0
        assert_close(b.float(), a.float(), 1e-5, f"step {step}")
