"""TR-DPO under PEFT: DPOTrainer's "ref" adapter as the mixup average of the policy adapter."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import FP32_RTOL, assert_close, tiny_llama, tiny_peft_llama  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from emalora_fast.integrations.trl import SyncRefAdapterCallback, sync_ref_adapter  # noqa: E402

VOCAB, K, ALPHA = 64, 2, 0.3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _adapter(model, name):
    return {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(model, adapter_name=name).items()
    }


class Record(TrainerCallback):
    """The policy and ref adapters after train begin (step 0) and after every step."""

    def __init__(self, model):
        self.model, self.policy, self.ref = model, {}, {}

    def _take(self, t):
        self.policy[t], self.ref[t] = _adapter(self.model, "default"), _adapter(self.model, "ref")

    def on_train_begin(self, args, state, control, **kwargs):
        self._take(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._take(state.global_step)


def _trainer(tmp_path, max_steps=4):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl_helpers import tiny_tokenizer

    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 2, (n,), generator=g).tolist())

    data = Dataset.from_dict(
        {c: [words(3) for _ in range(8)] for c in ("prompt", "chosen", "rejected")}
    )
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=5e-2,
        ref_model_sync_steps=K,
        ref_model_mixup_alpha=ALPHA,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        seed=0,
    )
    model = tiny_peft_llama(vocab=VOCAB, b_std=0.1)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(VOCAB)
    )
    sync_ref_adapter(trainer)
    record = Record(model)
    trainer.add_callback(record)
    return trainer, model, record


def test_ref_adapter_is_the_mixup_average_and_resumes(tmp_path):
    trainer, model, record = _trainer(tmp_path)
    trainer.train()
    # The float64 mixup, from the policy at train begin (DPOTrainer's copy).
    ref = {k: v.double() for k, v in record.policy[0].items()}
    for t in range(1, 5):
        if t % K == 0:
            ref = {
                k: ALPHA * record.policy[t][k].double() + (1 - ALPHA) * v for k, v in ref.items()
            }
        for k, v in record.ref[t].items():
            assert_close(v, ref[k].float(), FP32_RTOL, f"step {t} {k}")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)

    # DPO's reference log-probs come from the ref adapter.
    from trl.trainer.utils import use_adapter

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad(), use_adapter(model, "ref"):
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    want = (logp * mask[:, 1:]).sum(1).float()
    assert_close(torch.cat([chosen, rejected]), want, FP32_RTOL, "ref log-probs")

    # Resume from the step-2 checkpoint: the ref adapter comes back bit for bit, and the run
    # continues as the uninterrupted one did.
    resumed, model2, record2 = _trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k, v in record.ref[2].items():
        assert torch.equal(record2.ref[2][k], v), k
    for k, v in record.ref[4].items():
        assert_close(record2.ref[4][k], v, FP32_RTOL, f"resumed step 4 {k}")


def test_bad_input_changes_nothing():
    model = tiny_peft_llama(vocab=VOCAB)
    with pytest.raises(ValueError, match="no adapter 'ref'"):
        SyncRefAdapterCallback(model)
    model.add_adapter("ref", model.peft_config["default"])
    for alpha in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"ref_model_mixup_alpha must be a number in \(0, 1\]"):
            SyncRefAdapterCallback(model, ref_model_mixup_alpha=alpha)
    with pytest.raises(ValueError, match="ref_model_sync_steps must be an integer >= 1"):
        SyncRefAdapterCallback(model, ref_model_sync_steps=0)
    with pytest.raises(ValueError, match="needs a peft model"):
        SyncRefAdapterCallback(tiny_llama(vocab=VOCAB))
    with pytest.raises(TypeError, match="DPOTrainer"):
        sync_ref_adapter(object())
    assert sorted(model.peft_config) == ["default", "ref"]
