"""LoRA fine-tuning with PyTorch Lightning and an EMA of the adapter (no copy of the model).

    python examples/lightning_train.py --epochs 2 --out lightning-ema

A tiny Llama model is built from a config (no download) and LoRA-adapted to the embedded Psalms
text. ``AdapterWeightAveraging`` keeps two EMAs of the adapter (decays 0.9 and 0.99, one fused
launch after each optimizer step), validates on the first, keeps its state in Lightning's
checkpoints (resume with ``--resume``) and saves it as a peft adapter at the end.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from emalora_fast.experiments.data import VOCAB_SIZE, encode_bytes, load_text
from emalora_fast.integrations.lightning import AdapterWeightAveraging

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss

    def validation_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens: [n, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=g)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def main(argv: list[str] | None = None) -> AdapterWeightAveraging:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=32, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", default="lightning-ema", help="the averaged adapter goes here")
    parser.add_argument("--resume", default=None, help="a checkpoint to continue from")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear"))
    tokens = encode_bytes(load_text("psalms"))
    train = windows(tokens, args.batches * args.batch_size, args.seq_len, seed=1)
    valid = windows(tokens, 2 * args.batch_size, args.seq_len, seed=2)

    averaging = AdapterWeightAveraging(decay=(0.9, 0.99), save_dir=args.out)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        callbacks=[averaging],
    )
    trainer.fit(
        CausalLM(model, lr=2e-3),
        torch.utils.data.DataLoader(train, batch_size=args.batch_size),
        torch.utils.data.DataLoader(valid, batch_size=args.batch_size),
        ckpt_path=args.resume,
    )
    print(f"{averaging.averager}\nval_loss (EMA 0.9): {trainer.callback_metrics['val_loss']:.4f}")
    print(f"averaged adapter saved to {args.out} (PeftModel.from_pretrained loads it)")
    return averaging


if __name__ == "__main__":
    main()
