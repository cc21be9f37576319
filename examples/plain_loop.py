"""Self-distillation from a BEMA teacher adapter in a plain PyTorch loop.

    python examples/plain_loop.py --steps 100

A tiny Llama model is built from a config (no download), LoRA-adapted to the embedded Psalms
text; the loss mixes cross-entropy with the KL divergence to the BEMA teacher adapter, which the
averager's single fused launch keeps up to date after every optimizer step.
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from emalora_fast import BEMA, DistillationLoss, SelfDistiller
from emalora_fast.experiments.data import VOCAB_SIZE, encode_bytes, load_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear"))
    # The teacher adapter is frozen, never optimized; it follows the ema part of the BEMA.
    avg = BEMA(model, teacher_adapter="bema")
    distiller = SelfDistiller(
        model, avg, loss=DistillationLoss(divergence="forward_kl"), hard_label_weight=0.5
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    tokens = encode_bytes(load_text("psalms"))
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, tokens.numel() - args.seq_len, (args.batch_size,))
        ids = tokens[starts[:, None] + torch.arange(args.seq_len)]
        loss, _ = distiller.compute_loss({"input_ids": ids}, step=step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg.update(step=step)  # one fused launch: EMA state, BEMA weights and teacher adapter
        if step % 20 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
