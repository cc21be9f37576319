"""Offline fixtures for the TRL tests: a word-level tokenizer and token datasets, no hub."""

from __future__ import annotations

import torch


def tiny_tokenizer(vocab: int):
    """A ``PreTrainedTokenizerFast`` over words ``w0 .. w{vocab-3}`` plus ``<pad>`` and ``<eos>``
    (ids vocab-2 and vocab-1), built in memory with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words["<pad>"], words["<eos>"] = vocab - 2, vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}{% endif %}"
    )
    return fast


def prompt_completion_rows(n: int, vocab: int, prompt_len: int, completion_len: int):
    """``n`` random examples of prompt + completion ids (no pad/eos ids inside), as lists."""
    rows = []
    for _ in range(n):
        p = torch.randint(0, vocab - 2, (prompt_len,)).tolist()
        c = torch.randint(0, vocab - 2, (completion_len,)).tolist()
        rows.append({"prompt_ids": p, "completion_ids": c})
    return rows


def gkd_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Equal-length prompt + completion rows as GKD's collator lays them out: labels -100 on the
    prompt, ``prompts`` and ``prompt_attention_mask`` for on-policy generation."""
    ids = torch.tensor([e["prompt_ids"] + e["completion_ids"] for e in examples])
    prompts = torch.tensor([e["prompt_ids"] for e in examples])
    labels = ids.clone()
    labels[:, : prompts.shape[1]] = -100
    labels[1::2, -1] = -100  # uneven valid-token counts across rows
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "prompts": prompts,
        "prompt_attention_mask": torch.ones_like(prompts),
    }


def record_losses(trainer) -> list[torch.Tensor]:
    """Make ``trainer`` keep every loss its ``compute_loss`` returns; returns that list."""
    losses: list[torch.Tensor] = []
    compute = trainer.compute_loss

    def recording(*a, **kw):
        loss = compute(*a, **kw)
        losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recording
    return losses
