"""The averager in a real transformers.Trainer: one update per optimizer step, resume."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_peft_llama

from emalora_fast import BEMA
from emalora_fast.integrations.transformers import AveragerCallback, state_path

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_model():
    return tiny_peft_llama(vocab=64, layers=1, b_std=0.0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=10):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(tmp_path, model, callbacks, max_steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        save_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def test_callback_updates_checkpoints_and_resumes(tmp_path):
    model = tiny_model()
    avg = BEMA(model, update_every=1)
    trainer = make_trainer(tmp_path, model, [AveragerCallback(avg)])
    trainer.train()
    assert avg.step == 6  # one update per optimizer step (accumulation: 2 micro-batches each)
    assert os.path.isfile(state_path(str(tmp_path / "checkpoint-3")))
    final = avg.state_dict()
    live_final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model2 = tiny_model()
    avg2 = BEMA(model2, update_every=1)
    trainer2 = make_trainer(tmp_path, model2, [AveragerCallback(avg2)])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert avg2.step == 6
    for n, p in model2.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), live_final[n], rtol=1e-6, atol=1e-7)
    resumed = avg2.state_dict()
    for key in ("ema", "theta0", "out"):
        for n in final[key]:
            torch.testing.assert_close(resumed[key][n], final[key][n], rtol=1e-6, atol=1e-7)


def test_resume_without_averager_state_fails_clearly(tmp_path):
    model = tiny_model()
    avg = BEMA(model)
    make_trainer(tmp_path, model, [AveragerCallback(avg)]).train()
    os.remove(state_path(str(tmp_path / "checkpoint-3")))
    model2 = tiny_model()
    trainer2 = make_trainer(tmp_path, model2, [AveragerCallback(BEMA(model2))])
    with pytest.raises(FileNotFoundError, match="no averager state"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_top_level_exports():
    import emalora_fast
    from emalora_fast import AveragerCallback as A
    from emalora_fast import AveragingTrainer, SelfDistillationTrainer
    from emalora_fast.integrations import transformers as integration

    assert A is integration.AveragerCallback
    assert AveragingTrainer is integration.AveragingTrainer
    assert SelfDistillationTrainer is integration.SelfDistillationTrainer
    assert {"AveragerCallback", "AveragingTrainer", "SelfDistillationTrainer"} <= set(
        emalora_fast.__all__
    )


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    """trainer.train(resume_from_checkpoint=path) in another output_dir: the averager state is
    read from the Trainer's own resume path, nothing given to the callback."""
    from emalora_fast import AveragingTrainer

    def trainer_for(out, model, avg):
        t = make_trainer(out, model, [])
        return AveragingTrainer(
            model=model, args=t.args, train_dataset=t.train_dataset, averager=avg
        )

    model = tiny_model()
    avg = BEMA(model)
    trainer_for(tmp_path / "first", model, avg).train()
    final = avg.state_dict()

    model2 = tiny_model()
    avg2 = BEMA(model2)
    trainer2 = trainer_for(tmp_path / "elsewhere", model2, avg2)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-3"))
    assert avg2.step == 6
    resumed = avg2.state_dict()
    for key in ("ema", "theta0", "out"):
        for n in final[key]:
            torch.testing.assert_close(resumed[key][n], final[key][n], rtol=1e-6, atol=1e-7)

    model3 = tiny_model()
    avg3 = BEMA(model3)
    trainer3 = trainer_for(tmp_path / "first", model3, avg3)
    trainer3.args.max_steps = 9
    trainer3.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir
    assert avg3.step == 9


def test_plain_trainer_resumes_from_the_checkpoint_it_is_given_not_output_dirs(tmp_path):
    """A plain Trainer resumed from run A's checkpoint while its output_dir holds run B's
    checkpoint of the same step: the averager continues run A, exactly."""

    def run(out, lr, resume=None, max_steps=6):
        model = tiny_model()
        avg = BEMA(model)
        trainer = make_trainer(out, model, [AveragerCallback(avg)], max_steps=max_steps)
        trainer.args.learning_rate = lr
        trainer.train(resume_from_checkpoint=resume)
        return avg.state_dict()

    final_a = run(tmp_path / "A", 1e-2)
    final_b = run(tmp_path / "B", 3e-2)  # another run: B/checkpoint-3 exists too
    assert not torch.equal(
        final_a["ema"][next(iter(final_a["ema"]))], final_b["ema"][next(iter(final_b["ema"]))]
    )
    resumed = run(tmp_path / "B", 1e-2, resume=str(tmp_path / "A" / "checkpoint-3"))
    for key in ("ema", "theta0", "out"):
        for n in final_a[key]:
            torch.testing.assert_close(resumed[key][n], final_a[key][n], rtol=1e-6, atol=1e-7)
