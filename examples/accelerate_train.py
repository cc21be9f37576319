"""Self-distillation from an EMA teacher adapter with Hugging Face Accelerate.

    accelerate launch examples/accelerate_train.py --steps 50      # or plain `python`

The averager is built on the unwrapped model (``accelerator.unwrap_model``): under DDP every rank
holds the same LoRA weights, so every rank's average stays identical without communication.
"""

import argparse

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from emalora_fast import EMA, DistillationLoss, SelfDistiller
from emalora_fast.experiments.data import VOCAB_SIZE, encode_bytes, load_text


class Windows(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i * self.seq_len : (i + 1) * self.seq_len]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
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
    # Build the averager (and its teacher adapter) before prepare(): the optimizer never sees
    # the teacher's tensors.
    avg = EMA(model, decay=0.99, warmup=True, teacher_adapter="ema")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    loader = torch.utils.data.DataLoader(
        Windows(encode_bytes(load_text("psalms")), 64), batch_size=args.batch_size, shuffle=True
    )
    model, opt, loader = accelerator.prepare(model, opt, loader)
    inner = accelerator.unwrap_model(model)
    distiller = SelfDistiller(inner, avg, loss=DistillationLoss(), hard_label_weight=0.5)

    step = 0
    while step < args.steps:
        for batch in loader:
            step += 1
            loss, _ = distiller.compute_loss(batch, step=step)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            avg.update(step=step)
            if step % 10 == 0 and accelerator.is_main_process:
                print(f"step {step}: loss {loss.item():.4f}")
            if step == args.steps:
                break
    if accelerator.is_main_process:
        avg.save_pretrained("emalora-runs/accelerate-ema")


if __name__ == "__main__":
    main()
