"""A short, offline demo of the averager: LoRA on a tiny Llama model, live weights vs BEMA."""

from __future__ import annotations

import os
import time

import torch

from .averager import BEMA

_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
)


def _batches(data: torch.Tensor, seq: int, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def run_demo(steps: int = 60, output_dir: str = "emalora-runs/demo", seed: int = 0) -> dict:
    """Train an all-linear LoRA on bytes of a short text; report live vs BEMA held-out loss."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear"))
    data = torch.tensor(list(_TEXT.encode() * 8), dtype=torch.long)
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    avg = BEMA(model)
    print(f"averaging {avg!r}")
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(train, 64, 8, gen)
    eval_ids = held_out[: (held_out.numel() // 32) * 32].view(-1, 32)

    def held_out_loss() -> float:
        with torch.no_grad():
            return model(input_ids=eval_ids, labels=eval_ids).loss.item()

    t0 = time.perf_counter()
    result = {}
    for step in range(1, steps + 1):
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg.update()
        if step % max(1, steps // 6) == 0 or step == steps:
            live = held_out_loss()
            with avg.swapped():
                bema = held_out_loss()
            result = {"step": step, "live": live, "bema": bema}
            print(
                f"step {step:4d} train {loss.item():.4f} held-out: live {live:.4f} bema {bema:.4f}"
            )
    os.makedirs(output_dir, exist_ok=True)
    avg.save_pretrained(output_dir)
    print(f"BEMA adapter saved to {output_dir} ({time.perf_counter() - t0:.1f} s)")
    return result
