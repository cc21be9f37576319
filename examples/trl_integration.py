"""emalora-fast inside TRL's own trainers: one entry per integration.

    python examples/trl_integration.py gkd     # GKD with the streamed generalized-JSD loss
    python examples/trl_integration.py distill # DistillationTrainer with the fused-linear loss
    python examples/trl_integration.py sdft    # SDFT with the fused EMA teacher adapter
    python examples/trl_integration.py dpo     # TR-DPO: DPO's "ref" adapter as a mixup average
    python examples/trl_integration.py bema    # BEMA of a LoRA adapter, saved as a peft adapter

Everything runs offline on a tiny Llama built from a config and a word-level tokenizer built in
memory; for a real run, load your model and tokenizer with ``from_pretrained`` in
``model_and_tokenizer`` instead. Needs ``pip install 'emalora-fast[trl]'``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

VOCAB = 64


def model_and_tokenizer(seed: int = 0):
    """A tiny Llama (random weights) and a tokenizer over the words w0..w61, <pad>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    words = {f"w{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return LlamaForCausalLM(config), tokenizer


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


def sentences(n: int, length: int = 3, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 2, (length,), generator=g).tolist())
        for _ in range(n)
    ]


def common(output_dir: str, steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )


def run_gkd(out: str, steps: int):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from emalora_fast.integrations.trl import use_streamed_losses

    student, tokenizer = model_and_tokenizer(0)
    teacher, _ = model_and_tokenizer(1)
    messages = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        for p, c in zip(sentences(8), sentences(8, seed=1))
    ]
    args = GKDConfig(**common(out, steps), lmbda=0.0, beta=0.5, max_length=32)
    trainer = GKDTrainer(
        model=lora(student),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"messages": messages}),
        processing_class=tokenizer,
    )
    use_streamed_losses(trainer)  # the one line: generalized_jsd_loss, streamed
    return trainer


def run_distill(out: str, steps: int):
    from trl import DistillationConfig, DistillationTrainer

    from emalora_fast.integrations.trl import use_streamed_losses

    student, tokenizer = model_and_tokenizer(0)
    teacher, _ = model_and_tokenizer(1)
    tokenizer.padding_side = "left"
    args = DistillationConfig(**common(out, steps), max_completion_length=4)
    trainer = DistillationTrainer(
        model=lora(student),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": sentences(8)}),
        processing_class=tokenizer,
    )
    use_streamed_losses(trainer)  # the one line: the fused-linear loss, no logits at all
    return trainer


def run_sdft(out: str, steps: int):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from emalora_fast.integrations.trl import fused_ema_teacher

    model, tokenizer = model_and_tokenizer(0)
    data = Dataset.from_dict(
        {"prompt": sentences(8), "privileged_context": sentences(8, 2, seed=1)}
    )
    args = SDFTConfig(
        **common(out, steps),
        max_completion_length=4,
        num_generations=1,
        teacher_model_kind="ema",
        distillation_mode="full_logits",
    )
    # The one line: the trainer class whose "teacher" adapter the fused averager keeps.
    trainer_cls = fused_ema_teacher(SDFTTrainer)
    return trainer_cls(model=lora(model), args=args, train_dataset=data, processing_class=tokenizer)


def run_dpo(out: str, steps: int):
    from trl import DPOConfig, DPOTrainer

    from emalora_fast.integrations.trl import sync_ref_adapter

    model, tokenizer = model_and_tokenizer(0)
    data = Dataset.from_dict(
        {"prompt": sentences(8), "chosen": sentences(8, seed=1), "rejected": sentences(8, seed=2)}
    )
    args = DPOConfig(**common(out, steps), ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
    trainer = DPOTrainer(
        model=lora(model), args=args, train_dataset=data, processing_class=tokenizer
    )
    sync_ref_adapter(trainer)  # the one line: TR-DPO's synced reference, as the "ref" adapter
    return trainer


def run_bema(out: str, steps: int):
    from trl import SFTConfig, SFTTrainer

    from emalora_fast.integrations.trl import BEMACallback

    model, tokenizer = model_and_tokenizer(0)
    data = Dataset.from_dict({"text": sentences(8, 6)})
    trainer = SFTTrainer(
        model=lora(model),
        args=SFTConfig(**common(out, steps), max_length=16),
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[BEMACallback(update_freq=1)],  # writes <output_dir>/bema, a peft adapter
    )
    return trainer


ENTRIES = {
    "gkd": run_gkd,
    "distill": run_distill,
    "sdft": run_sdft,
    "dpo": run_dpo,
    "bema": run_bema,
}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entry", choices=sorted(ENTRIES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix=f"emalora-trl-{args.entry}-")
    trainer = ENTRIES[args.entry](out, args.steps)
    trainer.train()
    print(f"{args.entry}: {args.steps} steps, outputs in {out}")
    return trainer


if __name__ == "__main__":
    main()
