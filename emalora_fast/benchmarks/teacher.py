"""Teacher-switch benchmark cases: entering and leaving ``avg.teacher()`` vs peft's adapter
switching, on a 30-layer model (the per-step overhead a self-distillation step pays around its
teacher forward)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..averaging.ema import EMA


def model_30_layers(device: torch.device, layers: int = 30):
    """A narrow Llama of SmolLM2-135M's depth (30 layers) with an all-linear LoRA (r=8) and a
    teacher adapter: its module and tensor counts, not its width."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    lora = LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05)
    return get_peft_model(LlamaForCausalLM(cfg), lora).to(device)


def cases(device: torch.device, layers: int = 30) -> dict[str, Callable[[], object]]:
    """Providers -> one enter/exit of the teacher (and a no-grad forward, for scale)."""
    model = model_30_layers(device, layers)
    avg = EMA(model, decay=0.99, teacher_adapter="teacher")
    avg.update()
    ids = torch.randint(0, 256, (1, 16), device=device)

    def ours():
        with avg.teacher():
            pass

    def peft_switch():
        """peft's own way: activate the teacher adapter in eval mode, then restore the live
        adapter, train mode and the trainable flags (the caller's bookkeeping included)."""
        flags = [p.requires_grad for p in model.parameters()]
        model.set_adapter("teacher", inference_mode=True)
        model.eval()
        model.set_adapter("default")
        model.train()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)

    @torch.no_grad()
    def forward():
        model(input_ids=ids)

    model.train()
    return {"emalora": ours, "peft_set_adapter": peft_switch, "forward_1x16": forward}
