"""The TRL loss drop-ins against TRL's own functions (trl 1.16): values and gradients."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import FP32_RTOL, assert_close, rel_err  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.trainer import distillation_trainer as trl_distillation  # noqa: E402

from emalora_fast.integrations.trl import (  # noqa: E402
    chunked_divergence_loss,
    generalized_jsd_loss,
    gold_generalized_jsd_loss,
    use_streamed_losses,
)

BETAS = (0.0, 0.5, 1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(b=2, t=5, v=301, scale=3.0):
    s = (torch.randn(b, t, v) * scale).requires_grad_()
    te = torch.randn(b, t, v) * scale
    return s, te


def _labels(b, t):
    labels = torch.randint(0, 50, (b, t))
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return labels


def _value_and_grad(fn, s, te, **kw):
    s = s.detach().clone().requires_grad_()
    out = fn(s, te, **kw)
    out.backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("masked", [True, False])
def test_generalized_jsd_matches_trl(beta, temperature, reduction, masked):
    s, te = _logits()
    labels = _labels(2, 5) if masked else None
    kw = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    ours, g_ours = _value_and_grad(generalized_jsd_loss, s, te, **kw)
    # The truth: TRL's own function in float64.
    ref, g_ref = _value_and_grad(GKDTrainer.generalized_jsd_loss, s.double(), te.double(), **kw)
    trl32, _ = _value_and_grad(GKDTrainer.generalized_jsd_loss, s, te, **kw)
    assert_close(ours, ref.float(), FP32_RTOL, "loss")
    assert_close(g_ours, g_ref.float(), FP32_RTOL, "grad")
    assert rel_err(trl32, ref) <= FP32_RTOL  # TRL's fp32 sits as close to the truth


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_generalized_jsd_num_items_in_batch(beta, as_tensor, reduction):
    s, te = _logits(b=3, t=4, v=257)
    labels = _labels(3, 4)
    n = 17
    kw = dict(labels=labels, beta=beta, reduction=reduction)
    kw["num_items_in_batch"] = torch.tensor(n) if as_tensor else n
    ours, g_ours = _value_and_grad(generalized_jsd_loss, s, te, **kw)
    ref, g_ref = _value_and_grad(GKDTrainer.generalized_jsd_loss, s.double(), te.double(), **kw)
    assert_close(ours, ref.float(), FP32_RTOL, "loss")
    assert_close(g_ours, g_ref.float(), FP32_RTOL, "grad")


def test_generalized_jsd_all_masked_and_none():
    s, te = _logits(b=2, t=3, v=129)
    labels = torch.full((2, 3), -100)
    ours, g = _value_and_grad(generalized_jsd_loss, s, te, labels=labels)
    ref, _ = _value_and_grad(GKDTrainer.generalized_jsd_loss, s, te, labels=labels)
    assert ours.item() == ref.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    # reduction="none" is TRL's elementwise [n_valid, V] tensor.
    labels = _labels(2, 3)
    out = generalized_jsd_loss(s, te, labels=labels, reduction="none")
    assert torch.equal(out, GKDTrainer.generalized_jsd_loss(s, te, labels=labels, reduction="none"))


def test_gold_form_matches_trl():
    from trl.experimental.gold import GOLDTrainer

    s, te = _logits(b=2, t=4, v=200)
    labels = _labels(2, 4)
    ours = gold_generalized_jsd_loss(s, te, labels=labels, beta=0.3, temperature=0.7)
    ref = GOLDTrainer.generalized_jsd_loss(
        s.double(), te.double(), labels=labels, beta=0.3, temperature=0.7
    )
    assert_close(ours.detach(), ref.detach().float(), FP32_RTOL, "gold")
    probs_s, probs_t = s.softmax(-1)[0], te.softmax(-1)[0]
    got = gold_generalized_jsd_loss(probs_s, probs_t, beta=0.3, logits_are_probs=True)
    want = GOLDTrainer.generalized_jsd_loss(probs_s, probs_t, beta=0.3, logits_are_probs=True)
    assert torch.equal(got, want)


def _heads(n_rows_shape=(2, 6), hidden=24, hidden_t=16, vocab=331, bias=True):
    h_s = torch.randn(*n_rows_shape, hidden, requires_grad=True)
    h_t = torch.randn(*n_rows_shape, hidden_t)
    w_s = (torch.randn(vocab, hidden) / math.sqrt(hidden)).requires_grad_()
    w_t = torch.randn(vocab, hidden_t) / math.sqrt(hidden_t)
    b_s = (torch.randn(vocab) * 0.5).requires_grad_() if bias else None
    b_t = torch.randn(vocab) * 0.5 if bias else None
    mask = torch.ones(n_rows_shape, dtype=torch.long)
    mask[0, :2] = 0
    mask[-1, -1] = 0
    return h_s, h_t, w_s, w_t, b_s, b_t, mask


def _truth(h_s, h_t, w_s, w_t, b_s, b_t, mask, beta, num_items, scale_s, scale_t, cap, temp):
    """Float64 logits materialized (TRL's order: scale, soft-cap, temperature), TRL's GKD loss."""

    def logits(h, w, b, scale):
        z = h.double() @ w.double().T + (0 if b is None else b.double())
        z = z * scale
        return z if cap is None else cap * torch.tanh(z / cap)

    zs = logits(h_s, w_s, b_s, scale_s)
    zt = logits(h_t, w_t, b_t, scale_t)
    labels = torch.where(mask != 0, 0, -100)
    loss = GKDTrainer.generalized_jsd_loss(
        zs, zt, labels=labels, beta=beta, temperature=temp, num_items_in_batch=num_items
    )
    log_q = torch.log_softmax(zs / temp, -1)
    entropy = -(log_q.exp() * log_q).sum(-1)[mask != 0].sum()
    return loss, entropy


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("num_items", [None, 13])
@pytest.mark.parametrize("variant", ["plain", "bias_scale_cap_temp"])
def test_chunked_divergence_matches_trl(beta, num_items, variant):
    h_s, h_t, w_s, w_t, b_s, b_t, mask = _heads(bias=variant != "plain")
    scale_s, scale_t, cap, temp = (1.0, 1.0, None, 1.0)
    if variant != "plain":
        scale_s, scale_t, cap, temp = (0.8, 1.3, 5.0, 1.7)
    items = None if num_items is None else torch.tensor(num_items)
    args = (h_s, h_t, w_s, w_t, mask, beta, items, b_s, b_t, scale_s, scale_t, cap, cap, temp)

    student = [t for t in (h_s, w_s, b_s) if t is not None]
    loss, ent, n = chunked_divergence_loss(*args)
    grads = torch.autograd.grad(loss, student)
    t_loss, t_ent, t_n = trl_distillation._chunked_divergence_loss(*args)
    t_grads = torch.autograd.grad(t_loss, student)

    ref = [x.detach().double().requires_grad_() for x in student]
    r_loss, r_ent = _truth(ref[0], h_t, ref[1], w_t, ref[2] if b_s is not None else None, b_t,
                           mask, beta, items, scale_s, scale_t, cap, temp)  # fmt: skip
    r_grads = torch.autograd.grad(r_loss, ref)

    assert int(n) == int(t_n) == int((mask != 0).sum())
    assert_close(loss.detach(), r_loss.detach().float(), FP32_RTOL, "loss")
    assert_close(t_loss.detach(), r_loss.detach().float(), FP32_RTOL, "trl loss")
    assert_close(ent, r_ent.float(), FP32_RTOL, "entropy")
    assert_close(t_ent, r_ent.float(), FP32_RTOL, "trl entropy")
    for g, tg, rg, what in zip(grads, t_grads, r_grads, ("h", "W", "b")):
        assert_close(g, rg.float(), FP32_RTOL, f"grad {what}")
        assert_close(tg, rg.float(), 1e-4, f"trl grad {what}")


def test_chunked_divergence_all_masked_is_zero():
    h_s, h_t, w_s, w_t, b_s, b_t, mask = _heads()
    mask.zero_()
    loss, ent, n = chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and int(n) == 0 and ent.item() == 0.0
    assert torch.equal(h_s.grad, torch.zeros_like(h_s))


def test_use_streamed_losses_rejects_other_trainers_and_versions(monkeypatch):
    with pytest.raises(TypeError, match="GKDTrainer, GOLDTrainer, DistillationTrainer"):
        use_streamed_losses(object())
    fake = object.__new__(GKDTrainer)

    def changed(student_logits, teacher_logits, labels=None, beta=0.5):
        return None

    monkeypatch.setattr(GKDTrainer, "generalized_jsd_loss", staticmethod(changed))
    with pytest.raises(RuntimeError, match=r"emalora-fast\[trl\]"):
        use_streamed_losses(fake)
    assert "generalized_jsd_loss" not in vars(fake)


# ---------------------------------------------------------------------------------------------
# A few GKD steps: TRL's loss and ours, step by step, from the same start.


def _gkd_trainer(tmp_path, student, teacher, tok, rows, streamed: bool, beta: float):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig
    from trl_helpers import gkd_collate, record_losses

    args = GKDConfig(
        output_dir=str(tmp_path / ("ours" if streamed else "trl")),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",  # smooth in the gradient: Adam's first steps amplify rounding to sign flips
        lmbda=0.0,  # off-policy: the same data in both runs
        beta=beta,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=gkd_collate,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    if streamed:
        use_streamed_losses(trainer)
    losses = record_losses(trainer)
    return trainer, losses


@pytest.mark.parametrize("beta", [0.5])
def test_gkd_steps_match_trl(tmp_path, beta):
    """TRL's loss and ours from the same start: the first step's two micro-batches within 1e-5
    of TRL's (the same weights); after the update (SGD, lr 0.1) the runs' weights differ by
    the fp32 rounding of the two gradients times the step, so the second step's within 1e-4."""
    from helpers import tiny_llama
    from trl_helpers import prompt_completion_rows, tiny_tokenizer

    vocab = 96
    tok = tiny_tokenizer(vocab)
    rows = prompt_completion_rows(12, vocab, prompt_len=4, completion_len=6)
    student0, teacher = tiny_llama(vocab=vocab, seed=1), tiny_llama(vocab=vocab, seed=2)
    with torch.no_grad():  # peaked, different distributions: a loss of order 1, not 1e-3
        student0.lm_head.weight.mul_(10)
        teacher.lm_head.weight.mul_(40)
    runs = []
    for streamed in (False, True):
        trainer, losses = _gkd_trainer(
            tmp_path, copy.deepcopy(student0), teacher, tok, rows, streamed, beta
        )
        trainer.train()
        runs.append((losses, trainer.model))
    (trl_losses, trl_model), (our_losses, our_model) = runs
    assert len(trl_losses) == len(our_losses) == 4  # 2 steps x 2 micro-batches
    assert rel_err(trl_losses[2], trl_losses[0]) > 1e-3  # the data and the update change it
    for i, (a, b) in enumerate(zip(trl_losses, our_losses)):
        bound = FP32_RTOL if i < 2 else 1e-4
        assert rel_err(b, a) <= bound, f"micro-batch {i}: ours {b.item()} vs TRL {a.item()}"
    for (name, p), q in zip(trl_model.named_parameters(), our_model.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-4, name
