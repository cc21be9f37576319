"""Comparison helpers shared by the tests: the tolerances of ARCHITECTURE.md in one place."""

from __future__ import annotations

import torch

# Relative-norm tolerance per dtype for results computed in fp32 from inputs of that dtype.
FP32_RTOL = 1e-5
FP32_RTOL_LONG = 1e-4


def backend_or_skip(backend: str) -> str:
    """Skip unless the backend can run here (Triton installed, the C++ extension built)."""
    import pytest

    from emalora_fast import _dispatch

    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cpp" and not _dispatch.cpp_available():
        pytest.skip("emalora_fast._C is not built")
    return backend


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


def tiny_causal_lm(arch: str, vocab: int = 128, seed: int = 0):
    """A tiny causal LM of architecture ``llama``, ``gpt2`` or ``qwen2``, built from a config."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        return tiny_llama(vocab, seed=seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return tf.Qwen2ForCausalLM(cfg)
    raise ValueError(arch)


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


class Oracle:
    """The averager's formulas in float64, written out from the specification."""

    def __init__(self, kind: str, theta: list[torch.Tensor], **hp):
        self.kind, self.hp = kind, hp
        self.tau = hp.get("update_after", 0)
        self.phi = hp.get("update_every", 1)
        self.ema = [t.clone() for t in theta]
        self.theta0 = [t.clone() for t in theta]
        self.bema = [t.clone() for t in theta]
        self.anchored = self.tau == 0

    def decay(self, s: int) -> float:
        hp = self.hp
        if not hp.get("warmup", False):
            return hp["decay"]
        d = 1 - (1 + s / hp.get("warmup_gamma", 1.0)) ** (-hp.get("warmup_power", 2 / 3))
        return min(max(d, hp.get("min_decay", 0.0)), hp["decay"])

    def beta_alpha(self, t: int) -> tuple[float, float]:
        hp = self.hp
        kappa, eta = hp.get("ema_power", 0.5), hp.get("bias_power", 0.2)
        rho, gamma = hp.get("lag", 10.0), hp.get("multiplier", 1.0)
        bmin = hp.get("min_ema_multiplier", 0.0)
        if hp.get("schedule", "trl") == "paper":
            te = max(t - self.tau + rho, 1)
            return max((1 + gamma * te) ** (-kappa), bmin), (1 + te) ** (-eta)
        return max((rho + gamma * t) ** (-kappa), bmin), (rho + gamma * t) ** (-eta)

    def step(self, t: int, theta: list[torch.Tensor]) -> str | None:
        """Apply step t; returns 'reset', 'update' or None."""
        if self.kind == "ema":
            # timm's ModelEmaV3 with step = optimizer updates taken: s = max(0, t - tau - 1),
            # decay 0 (a copy of theta) while s <= 0.
            s = max(0, t - self.tau - 1)
            if s <= 0:
                self.ema = [x.clone() for x in theta]
                return "reset"
            if s % self.phi:
                return None
            d = self.decay(s)
            self.ema = [e + (1 - d) * (x - e) for e, x in zip(self.ema, theta)]
            return "update"
        if t < self.tau:
            return None
        if not self.anchored:
            self.anchored = True
            self.ema = [x.clone() for x in theta]
            self.theta0 = [x.clone() for x in theta]
            self.bema = [x.clone() for x in theta]
            return "reset"
        if (t - self.tau) % self.phi:
            return None
        beta, alpha = self.beta_alpha(t)
        self.ema = [(1 - beta) * e + beta * x for e, x in zip(self.ema, theta)]
        self.bema = [e + alpha * (x - x0) for e, x, x0 in zip(self.ema, theta, self.theta0)]
        return "update"

    @property
    def averaged(self) -> list[torch.Tensor]:
        return self.bema if self.kind == "bema" else self.ema
