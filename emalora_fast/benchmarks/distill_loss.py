"""Distillation-loss benchmark cases: ours vs naive torch vs token-chunked torch.

Shared by ``bench/bench_distill_loss.py`` (pytest-benchmark) and ``emalora-fast bench``.
Providers (forward KL, batchmean, one forward + backward):

- ``emalora``: :func:`emalora_fast.distillation_loss` (C++ op on CPU, Triton on CUDA);
- ``emalora_inplace``: the same with ``inplace_grad=True`` (gradient written over the logits);
- ``naive``: ``F.kl_div(log_softmax(s), log_softmax(t), log_target=True, reduction="batchmean")``;
- ``chunked``: the same formula over token chunks (torchtune's chunked-loss form);
- ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` on materialized log-softmaxes (CUDA, optional).

Extra peak memory = growth of peak memory during one forward + backward beyond the inputs and
the gradient buffer (CPU: VmHWM of a fresh process after a warm-up; CUDA: max_memory_allocated).
``python -m emalora_fast.benchmarks.distill_loss`` prints medians, the copy floor and ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .._dispatch import load_cpp
from ..distill.loss import distillation_loss

PROVIDERS = ("emalora", "emalora_inplace", "naive", "chunked")
SMOKE = os.environ.get("EMALORA_BENCH_SMOKE", "0") == "1"  # tiny shapes (CI runs each once)
CHUNKS = 8  # token chunks of the chunked provider


def problem(device: str) -> tuple[int, int, torch.dtype]:
    """(N, V, dtype) of the benchmark on ``device``."""
    if SMOKE:
        return 64, 1000, torch.float32
    if device == "cuda":
        return 8192, 128256, torch.bfloat16
    return 4096, 32000, torch.float32


def loss_fn(provider: str):
    """The provider's loss: (student [N, V], teacher [N, V]) -> scalar forward KL, batchmean."""
    if provider in ("emalora", "emalora_inplace"):
        inplace = provider == "emalora_inplace"
        return lambda s, t: distillation_loss(s, t, inplace_grad=inplace)
    if provider == "naive":
        return lambda s, t: F.kl_div(
            F.log_softmax(s.float(), -1),
            F.log_softmax(t.float(), -1),
            log_target=True,
            reduction="batchmean",
        )
    if provider == "liger":  # optional extra: needs liger-kernel and a CUDA device
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        # Liger wants log-probabilities the caller has already materialized
        return lambda s, t: kl(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    if provider == "chunked":

        def chunked(s, t):
            total = s.new_zeros((), dtype=torch.float32)
            for s_c, t_c in zip(s.chunk(CHUNKS), t.chunk(CHUNKS), strict=True):
                log_q = F.log_softmax(s_c.float(), -1)
                log_p = F.log_softmax(t_c.float(), -1)
                total = total + (log_p.exp() * (log_p - log_q)).sum()
            return total / s.shape[0]

        return chunked
    raise ValueError(provider)


def make_inputs(n: int, v: int, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    s = (torch.randn(n, v, device=device) * 2).to(dtype)
    t = (torch.randn(n, v, device=device) * 2).to(dtype)
    return s, t


def step(provider: str, base: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One forward + backward from a student leaf sharing ``base``'s storage; returns the
    gradient (for ``emalora_inplace`` it is ``base``'s storage, overwritten)."""
    s = base.detach().requires_grad_(True)
    loss_fn(provider)(s, t).backward()
    return s.grad


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Peak memory, one provider per fresh process.
# ------------------------------------------------------------------------------------------------
class _CpuPeak:
    """Peak resident memory of this process from /proc/self/status (Linux).

    ``reset()`` moves the high-water mark down to the current RSS (clear_refs 5), so the peak
    of one call is measured alone. Not ru_maxrss: Linux carries the parent's resident size into
    the maxrss of a freshly exec'd child, which can hide the child's own peak.
    """

    @staticmethod
    def _read(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def reset(self) -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._read("VmRSS")

    def peak(self) -> int:
        return self._read("VmHWM")


def _measure_peak(provider: str, device: str, n: int, v: int, dtype: torch.dtype) -> dict:
    """Runs in a fresh process: extra peak bytes of one forward + backward."""
    small_s, small_t = make_inputs(4, 64, dtype, device)
    step(provider, small_s, small_t)  # warm-up: libraries, kernels, thread pools
    s, t = make_inputs(n, v, dtype, device)
    grad_bytes = 0 if provider == "emalora_inplace" else s.numel() * s.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grad = step(provider, s, t)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        meter = _CpuPeak()
        before = meter.reset()
        grad = step(provider, s, t)
        peak = meter.peak() - before
    assert torch.isfinite(grad.float()).all()
    return {"provider": provider, "extra_peak_bytes": peak - grad_bytes, "grad_bytes": grad_bytes}


def peak_memory(
    provider: str, device: str, shape: tuple[int, int, torch.dtype] | None = None
) -> dict:
    """Extra peak memory of ``provider`` on ``shape`` (default :func:`problem`'s), measured in a
    fresh process."""
    n, v, dtype = shape or problem(device)
    dt = str(dtype).removeprefix("torch.")
    proc = subprocess.run(
        [sys.executable, "-m", __name__, "--peak-memory", provider, device, str(n), str(v), dt],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Script entry point: medians, floor and ratios.
# ------------------------------------------------------------------------------------------------
def _median_time(fn, setup, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        args = setup()
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, v, dtype = problem(device)
    s, t = make_inputs(n, v, dtype, device)
    repeats = 3 if SMOKE else 7
    print(f"device {device}, threads {torch.get_num_threads()}, N={n}, V={v}, {dtype}")
    if device == "cpu":
        load_cpp()
        print(f"C++ row loops: {torch.ops.emalora_fast.distill_loss_cpu_isa()}")
    # Floor: forward reads s and t, backward reads them again and writes the gradient.
    dst = torch.empty_like(s)
    copy = _median_time(dst.copy_, lambda: (s,), repeats, device)
    bandwidth = 2 * s.numel() * s.element_size() / copy
    floor = 5 * s.numel() * s.element_size() / bandwidth
    del dst
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; fwd+bwd floor {floor * 1e3:.1f} ms")
    results = {}
    for provider in PROVIDERS:

        def setup(provider=provider):
            return (provider, s.clone() if provider == "emalora_inplace" else s, t)

        seconds = _median_time(step, setup, repeats, device)
        memory = peak_memory(provider, device)["extra_peak_bytes"]
        results[provider] = (seconds, memory)
    naive_s, naive_m = results["naive"]
    print(f"{'provider':<16}{'time ms':>10}{'naive/this':>12}{'extra MiB':>12}{'% of naive':>12}")
    for provider, (seconds, memory) in results.items():
        print(
            f"{provider:<16}{seconds * 1e3:>10.1f}{naive_s / seconds:>12.2f}"
            f"{memory / 2**20:>12.2f}{100 * memory / naive_m:>12.3f}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--peak-memory":
        provider, device, n, v, dt = sys.argv[2:]
        print(json.dumps(_measure_peak(provider, device, int(n), int(v), getattr(torch, dt))))
    else:
        main()


def liger_available(device: str) -> bool:
    """Whether the optional Liger-Kernel provider can run on ``device``."""
    if device != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True
