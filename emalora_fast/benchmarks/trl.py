"""TRL integration benchmark cases: the SDFT teacher update and one distillation-loss step.

- Teacher update per optimizer step: TRL's ``PEFTAdapterEMACallback.on_step_end`` against
  :class:`~emalora_fast.integrations.trl.FusedAdapterEMACallback`, on the Llama-3-8B-shaped
  LoRA set (r = 16, all seven linear layers per block; bf16 base weights, fp32 adapters, as peft
  makes them). ``layers`` bounds the depth on small machines.
- Loss step (forward + backward): TRL's ``generalized_jsd_loss`` against the streamed drop-in, on
  fp32 logits [N, V] (V = 49,152: SmolLM2; 128,256: Llama 3), beta = 0.5, with labels; extra
  peak memory measured in a fresh process per provider.

``python -m emalora_fast.benchmarks.trl [--quick]`` prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

from .averager import SHAPES
from .distill_loss import _CpuPeak
from .timing import measure

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Block(nn.Module):
    def __init__(self, h: int, inter: int, kv: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        dims = {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
        }  # fmt: skip
        for name, (fan_in, fan_out) in dims.items():
            layer = nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype)
            setattr(self, name, layer)


def lora_model(model: str = "llama3-8b", layers: int | None = None, device="cpu", r: int = 16):
    """A stack of Llama-shaped linear blocks (bf16, untrained) with an all-linear LoRA (r)."""
    from peft import LoraConfig, get_peft_model

    h, inter, kv, n_layers = SHAPES[model]
    base = nn.Sequential(
        *[_Block(h, inter, kv, torch.bfloat16, device) for _ in range(layers or n_layers)]
    )
    base.requires_grad_(False)
    peft_model = get_peft_model(base, LoraConfig(r=r, target_modules=list(_LINEARS)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return peft_model


def teacher_update_cases(
    device: torch.device, model: str = "llama3-8b", layers: int | None = None
) -> tuple[dict[str, Callable[[], None]], int]:
    """Providers -> one optimizer step's teacher update (update rate 0.05, every step)."""
    from transformers import TrainerState
    from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback

    from ..integrations.trl import FusedAdapterEMACallback

    providers = {}
    numel = 0
    for name, cls in (
        ("emalora", FusedAdapterEMACallback),
        ("trl_callback", PEFTAdapterEMACallback),
    ):
        m = lora_model(model, layers, device)
        numel = sum(p.numel() for p in m.parameters() if p.requires_grad)
        cb = cls(m, update_rate=0.05)
        cb.on_train_begin(None, TrainerState(global_step=0), None)
        state = TrainerState(global_step=0)

        def step(cb=cb, state=state):
            state.global_step += 1
            cb.on_step_end(None, state, None)

        providers[name] = step
    return providers, numel


def _loss_inputs(n: int, v: int, device):
    s = torch.randn(n, v, device=device).mul_(3).requires_grad_()
    t = torch.randn(n, v, device=device).mul_(3)
    labels = torch.randint(0, v, (n,), device=device)
    labels[::7] = -100
    return s, t, labels


def loss_fn(provider: str):
    if provider == "emalora":
        from ..integrations.trl import generalized_jsd_loss

        return generalized_jsd_loss
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def loss_step_case(provider: str, n: int, v: int, device) -> Callable[[], None]:
    """One forward + backward of ``provider``'s loss on fresh-gradient fp32 logits."""
    fn = loss_fn(provider)
    s, t, labels = _loss_inputs(n, v, device)

    def step():
        s.grad = None
        fn(s[None], t[None], labels=labels[None], beta=0.5).backward()

    return step


def _peak_in_this_process(provider: str, n: int, v: int, device: str) -> dict:
    loss_step_case(provider, 4, 64, device)()  # warm-up: libraries, thread pools
    s, t, labels = _loss_inputs(n, v, device)
    fn = loss_fn(provider)
    grad_bytes = s.numel() * s.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(s[None], t[None], labels=labels[None], beta=0.5).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        meter = _CpuPeak()
        before = meter.reset()
        fn(s[None], t[None], labels=labels[None], beta=0.5).backward()
        peak = meter.peak() - before
    return {"provider": provider, "extra_peak_bytes": peak - grad_bytes, "grad_bytes": grad_bytes}


def loss_peak(provider: str, n: int, v: int, device: str) -> dict:
    """Extra peak bytes (beyond inputs and gradient) of one loss step, in a fresh process."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emalora_fast.benchmarks.trl",
            "--peak",
            provider,
            str(n),
            str(v),
            device,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TRL integration benchmarks")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak", nargs=4, metavar=("PROVIDER", "N", "V", "DEVICE"))
    args = parser.parse_args(argv)
    if args.peak:
        provider, n, v, device = args.peak
        print(json.dumps(_peak_in_this_process(provider, int(n), int(v), device)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = 1 if args.quick else (None if device.type == "cuda" else 2)
    providers, numel = teacher_update_cases(device, layers=layers)
    times = {k: measure(fn, device, reps=5 if args.quick else 15) for k, fn in providers.items()}
    depth = layers or SHAPES["llama3-8b"][3]
    print(f"SDFT teacher update, llama3-8b LoRA r=16 all-linear, {depth} layers, {numel:,} fp32")
    for k, t in times.items():
        print(f"  {k:14s} {t * 1e3:9.2f} ms   x{times['trl_callback'] / t:6.1f} vs TRL")
    n = 256 if args.quick else (4096 if device.type == "cuda" else 512)
    vocabs = (49152,) if device.type == "cpu" or args.quick else (49152, 128256)
    for v in vocabs:
        print(f"generalized_jsd_loss step (fwd+bwd), fp32 logits [{n}, {v}], beta 0.5")
        res = {}
        for p in ("trl", "emalora"):
            t = measure(loss_step_case(p, n, v, device), device, reps=3, warmup=1)
            peak = loss_peak(p, n, v, device.type)["extra_peak_bytes"]
            res[p] = (t, peak)
        for p, (t, peak) in res.items():
            pct = 100 * peak / max(res["trl"][1], 1)
            speed = res["trl"][0] / t
            print(f"  {p:8s} {t * 1e3:9.1f} ms  extra peak {peak / 2**20:9.1f} MiB"
                  f"  ({pct:5.1f}% of TRL's)  x{speed:5.2f} time vs TRL")  # fmt: skip


if __name__ == "__main__":
    main()
