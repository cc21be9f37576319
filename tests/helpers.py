"""Comparison helpers shared by the tests: the tolerances of ARCHITECTURE.md in one place."""

from __future__ import annotations

import torch

# Relative-norm tolerance per dtype for results computed in fp32 from inputs of that dtype.
FP32_RTOL = 1e-5
FP32_RTOL_LONG = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0/0 = 0)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "") -> None:
    """Relative-norm and max-abs check; NaN never passes."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    assert torch.isfinite(out).eq(torch.isfinite(ref)).all(), f"{what}: finiteness differs"
    e = rel_err(out, ref)
    assert e <= rtol, f"{what}: relative error {e:.3g} > {rtol:.3g}"
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    m = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert m <= 10 * rtol * max(scale, 1e-30), f"{what}: max abs error {m:.3g} (scale {scale:.3g})"


def rounding_bound(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the relative error of torch's own rounding of the float64 truth to ``dtype``."""
    return 2 * rel_err(ref.to(dtype), ref) + 1e-12


def one_ulp_bound(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative norm of one unit in the last place of ``dtype`` at ``ref``'s magnitudes.

    Triton's interpreter converts float32 to bf16/fp16 by truncation, not round-to-nearest-even
    as torch and the GPU do: under the interpreter a converted result may sit one ulp off.
    """
    mant = torch.finfo(dtype).eps  # 2**-(mantissa bits)
    mag = ref.double().abs().clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * mant
    return ulp.norm().item() / max(ref.double().norm().item(), 1e-300) + 1e-12


def tiny_llama(vocab: int = 128, layers: int = 2, seed: int = 0):
    """A tiny LlamaForCausalLM built from a config (no download), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def tiny_peft_llama(vocab: int = 128, layers: int = 2, seed: int = 0, b_std: float = 0.02):
    """``tiny_llama`` with an all-linear LoRA (r=4) whose B factors are random, not peft's zeros
    (so that the adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(vocab, layers, seed), LoraConfig(r=4, target_modules="all-linear")
    )
    if b_std:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, b_std)
    return model
