"""Correctness smoke of each Triton kernel on a real GPU, one step at a time (run by
``bench/gpu_check.sh``). Every step compares with the float64 reference on the device and prints
one ``PASS`` / ``FAIL`` line; a failing step does not stop the others. The last step times the two
backward forms of the fused-linear loss side by side (device events, medians).

    python bench/gpu_smoke.py            # exit status 1 if any step failed
"""

from __future__ import annotations

import os
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

from emalora_fast import BEMA, EMA, distillation_loss, fused_linear_distillation_loss  # noqa: E402
from emalora_fast.benchmarks.averager import TensorSet, lora_shapes  # noqa: E402
from emalora_fast.reference import (  # noqa: E402
    distillation_loss_reference,
    fused_linear_distillation_loss_reference,
)

DEV = torch.device("cuda")
ALL = lambda name, p: True  # noqa: E731


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def averager(kind: str, dtype: torch.dtype, profiles: int = 1) -> str:
    """Triton against the torch backend (the reference formulas) on the same weights; an EMA
    with several profiles compares every profile."""
    results = []
    decays = tuple(1 - 0.5**k for k in range(1, profiles + 1)) if profiles > 1 else 0.999
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = TensorSet(lora_shapes("llama3-8b", layers=4), DEV, dtype)
        if kind == "bema":
            avg = BEMA(model, param_filter=ALL, backend=backend)
        else:
            avg = EMA(model, decay=decays, param_filter=ALL, backend=backend)
        for _ in range(5):
            with torch.no_grad():
                for p in model.ps:
                    p.add_(torch.randn_like(p) * 0.01)
            avg.update()
        parts = []
        for k in range(profiles):
            state = avg.averaged_state_dict(torch.float32, profile=k)
            parts += [v.flatten() for v in state.values()]
        results.append(torch.cat(parts))
    err = rel(*results)
    assert err <= 1e-5 and torch.isfinite(results[0]).all(), f"rel err {err:.2e}"
    return f"rel err {err:.1e}"


def loss(divergence: str, vocab: int) -> str:
    torch.manual_seed(1)
    n = 512
    s = (torch.randn(n, vocab, device=DEV) * 2).bfloat16()
    t = (torch.randn(n, vocab, device=DEV) * 2).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=DEV)
    labels[::5] = -100
    kw = dict(divergence=divergence, beta=0.4, temperature=2.0, hard_label_weight=0.1,
              labels=labels)  # fmt: skip
    out = {}
    for name, dtype in (("ours", None), ("ref", torch.float64), ("torch", torch.bfloat16)):
        x = s.detach().clone().to(dtype or s.dtype).requires_grad_(True)
        if name == "ours":
            val = distillation_loss(x, t, backend="triton", **kw)
        else:
            val = distillation_loss_reference(x, t.to(dtype), **kw)
        val.backward()
        out[name] = (val.detach(), x.grad)
    e_loss, e_grad = rel(out["ours"][0], out["ref"][0]), rel(out["ours"][1], out["ref"][1])
    t_loss, t_grad = rel(out["torch"][0], out["ref"][0]), rel(out["torch"][1], out["ref"][1])
    assert e_loss <= max(1e-4, 2 * t_loss) and e_grad <= max(1e-2, 2 * t_grad), (
        f"loss {e_loss:.1e} (torch bf16 {t_loss:.1e}), grad {e_grad:.1e} (torch {t_grad:.1e})"
    )
    return f"loss rel err {e_loss:.1e}, grad {e_grad:.1e} (torch bf16: {t_loss:.1e}, {t_grad:.1e})"


def _fused_problem(n: int, h: int, v: int, seed: int = 2):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hs = torch.randn(n, h, device=DEV, generator=g).bfloat16()
    ht = torch.randn(n, h, device=DEV, generator=g).bfloat16()
    w = (torch.randn(v, h, device=DEV, generator=g) * (2.0 / h**0.5)).bfloat16()
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[::7] = -100
    return hs, ht, w, labels


def fused(mode: str, divergence: str) -> str:
    os.environ["EMALORA_FUSED_LINEAR_BACKWARD"] = mode
    hs, ht, w, labels = _fused_problem(512, 1024, 32011)
    kw = dict(divergence=divergence, beta=0.4, temperature=2.0, hard_label_weight=0.1,
              labels=labels, softcap=30.0)  # fmt: skip
    out = {}
    for name, dtype in (("ours", None), ("ref", torch.float64)):
        h = hs.detach().clone().to(dtype or hs.dtype).requires_grad_(True)
        ww = w.detach().clone().to(dtype or w.dtype).requires_grad_(True)
        if name == "ours":
            val = fused_linear_distillation_loss(h, ww, ht, ww, backend="triton", **kw)
        else:
            val = fused_linear_distillation_loss_reference(h, ww, ht.to(dtype), ww, **kw)
        val.backward()
        out[name] = (val.detach(), h.grad, ww.grad)
    errs = [rel(a, b) for a, b in zip(out["ours"], out["ref"])]
    assert errs[0] <= 1e-3 and max(errs[1:]) <= 3e-2, f"rel errs {errs}"
    return "rel errs loss {:.1e}, grad_h {:.1e}, grad_W {:.1e}".format(*errs)


def fused_backward_timing() -> str:
    """Forward + backward at N = 4096, H = 4096, V = 128256 (bf16, shared head), both forms."""
    import triton.testing

    hs, ht, w, labels = _fused_problem(4096, 4096, 128256)
    h = hs.requires_grad_(True)
    ww = w.requires_grad_(True)
    times = {}
    for mode in ("gemm", "atomic"):
        os.environ["EMALORA_FUSED_LINEAR_BACKWARD"] = mode

        def step():
            h.grad = ww.grad = None
            kw = dict(labels=labels, hard_label_weight=0.1, temperature=2.0, backend="triton")
            fused_linear_distillation_loss(h, ww, ht, ww, **kw).backward()

        times[mode] = triton.testing.do_bench(step, warmup=2, rep=20)
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        times[mode + "_peak_gib"] = peak
    os.environ.pop("EMALORA_FUSED_LINEAR_BACKWARD")
    return ", ".join(f"{k} {v:.2f}" + ("" if "peak" in k else " ms") for k, v in times.items())


def loss_pipelining_timing() -> str:
    """Forward + backward at N = 4096, V = 128256 (bf16): pass 1 plain, then pipelined."""
    import triton.testing

    from emalora_fast.kernels import distill_loss as kernels

    torch.manual_seed(3)
    s = (torch.randn(4096, 128256, device=DEV) * 2).bfloat16().requires_grad_(True)
    t = (torch.randn(4096, 128256, device=DEV) * 2).bfloat16()
    times = {}
    for stages in (1, 2):
        kernels.FWD_STAGES = stages

        def step():
            s.grad = None
            distillation_loss(s, t, temperature=2.0, backend="triton").backward()

        times[f"stages={stages}"] = triton.testing.do_bench(step, warmup=2, rep=20)
    kernels.FWD_STAGES = 1
    return ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())


STEPS = [
    ("averager bema bf16", lambda: averager("bema", torch.bfloat16)),
    ("averager ema fp32", lambda: averager("ema", torch.float32)),
    ("averager ema 8 profiles bf16", lambda: averager("ema", torch.bfloat16, profiles=8)),
    ("loss fkl V=128256", lambda: loss("forward_kl", 128256)),
    ("loss jsd V=128264", lambda: loss("jsd", 128264)),
    ("loss rkl V=32001", lambda: loss("reverse_kl", 32001)),
    ("fused gemm fkl", lambda: fused("gemm", "forward_kl")),
    ("fused gemm jsd", lambda: fused("gemm", "jsd")),
    ("fused atomic fkl", lambda: fused("atomic", "forward_kl")),
    ("loss forward pipelining timing (measured)", loss_pipelining_timing),
    ("fused backward timing (measured)", fused_backward_timing),
]


def main() -> int:
    failed = 0
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(name, torch.__version__, flush=True)
    for name, fn in STEPS:
        t0 = time.perf_counter()
        try:
            msg = fn()
            print(f"PASS {name} ({time.perf_counter() - t0:.1f} s): {msg}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name} ({time.perf_counter() - t0:.1f} s): {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
