"""Fused-linear distillation loss benchmark cases and the peak-memory probe.

Providers, each one forward + backward of the forward-KL loss from hidden states [N, H] through a
head [V, H] shared by student and teacher (self-distillation), the student's hidden states and
the head requiring grad:

- ``emalora``: :func:`~emalora_fast.fused_linear_distillation_loss` (logits never in memory);
- ``materialize``: ``F.linear`` logits of both models, then
  :func:`~emalora_fast.distillation_loss` (the streaming logits loss);
- ``naive``: ``F.linear`` logits, then ``kl_div(log_softmax(s), log_softmax(t))``;
- ``reference``: ``F.linear`` logits, then the pure-PyTorch reference formulas;
- ``matmul``: only the four matmuls a materializing method cannot avoid (student and teacher
  logits, grad_h = g W, grad_W = g^T h): the floor for the time on a GPU.

Run ``python -m emalora_fast.benchmarks.fused_linear memory PROVIDER N H V [DTYPE]`` for one
provider's extra peak memory in a fresh process (CPU: ru_maxrss; CUDA: the allocator's peak).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..distill.fused_linear import fused_linear_distillation_loss
from ..distill.loss import distillation_loss
from ..reference import distillation_loss_reference

PROVIDERS = ("emalora", "materialize", "naive", "reference", "matmul")

# (N, H, V): the CPU shape of the issue, Llama-3-8B's head at 8192 tokens, a smoke shape.
SHAPES = {
    "cpu": (2048, 512, 32000),
    "llama3-8b": (8192, 4096, 128256),
    "tiny": (64, 32, 500),
}


def make_inputs(
    device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Student/teacher hidden states, a shared head (requiring grad) and labels (10% ignored)."""
    n, h, v = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    hs = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    ht = (hs.float().cpu() + 0.1 * torch.randn(n, h, generator=gen)).to(device=device, dtype=dtype)
    w = (torch.randn(v, h, generator=gen) * (2.0 / h**0.5)).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.1] = -100
    return dict(
        hs=hs.requires_grad_(True), ht=ht, w=w.requires_grad_(True), labels=labels.to(device)
    )


def _fused(x, backend):
    return fused_linear_distillation_loss(
        x["hs"], x["w"], x["ht"], x["w"], labels=x["labels"], backend=backend
    )


def _logits(x):
    with torch.no_grad():
        t = F.linear(x["ht"], x["w"]).float()
    return F.linear(x["hs"], x["w"]).float(), t


def _materialize(x, backend):
    s, t = _logits(x)
    return distillation_loss(s, t, labels=x["labels"], backend=backend)


def _naive(x):
    s, t = _logits(x)
    valid = x["labels"] != -100
    rows = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none")
    return (rows.sum(-1) * valid).sum() / valid.sum().clamp_min(1)


def _reference(x):
    s, t = _logits(x)
    return distillation_loss_reference(s, t, labels=x["labels"])


def _matmul(x):
    """The four [N, V]-sized matmuls of a materializing method, nothing else."""
    hs, w, ht = x["hs"].detach(), x["w"].detach(), x["ht"]
    s = hs @ w.t()
    t = ht @ w.t()
    g = s - t
    return g @ w, g.t() @ hs


def _step(x, loss_fn) -> Callable[[], object]:
    def step():
        x["hs"].grad = None
        x["w"].grad = None
        loss = loss_fn(x)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        return loss

    return step


def cases(
    device: torch.device,
    shape: tuple[int, int, int] | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> dict[str, Callable[[], object]]:
    """Providers -> zero-argument callables running one forward + backward on shared inputs."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    x = make_inputs(device, shape, dtype)
    return {
        "emalora": _step(x, lambda x: _fused(x, backend)),
        "materialize": _step(x, lambda x: _materialize(x, backend)),
        "naive": _step(x, _naive),
        "reference": _step(x, _reference),
        "matmul": _step(x, _matmul),
    }


def flops(shape: tuple[int, int, int]) -> int:
    """FLOPs of the four matmuls of the ``matmul`` provider (2 N V H each)."""
    n, h, v = shape
    return 4 * 2 * n * v * h


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def extra_peak_bytes(
    provider: str,
    device: torch.device,
    shape: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
) -> tuple[int, int]:
    """(lower, upper) bounds of one provider's peak memory during forward + backward beyond its
    inputs and the gradients every method returns (grad_h [N, H], grad_W [V, H]).

    CUDA: both are the allocator's peak above the memory in use before the call. CPU (call it in
    a fresh process, after nothing large ran): lower = growth of ru_maxrss during the call, upper
    = ru_maxrss after the call minus the resident set size right before it.
    """
    step = cases(device, shape, dtype)[provider]
    x_small = cases(device, (8, 16, 64), dtype)[provider]
    x_small()  # warm-up: libraries, thread pools, kernels
    n, h, v = shape
    grad_bytes = (n * h + v * h) * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before - grad_bytes
        return extra, extra
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_before = _rss_bytes()
    step()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lower = peak_after - peak_before - grad_bytes
    upper = peak_after - rss_before - grad_bytes
    return lower, upper


def _main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[0] != "memory":
        raise SystemExit(
            "usage: python -m emalora_fast.benchmarks.fused_linear memory PROVIDER N H V "
            "[float32|bfloat16] [cpu|cuda]"
        )
    provider, shape = argv[1], tuple(int(a) for a in argv[2:5])
    dtype = getattr(torch, argv[5]) if len(argv) > 5 else torch.float32
    device = torch.device(argv[6] if len(argv) > 6 else "cpu")
    lower, upper = extra_peak_bytes(provider, device, shape, dtype)
    print(lower, upper)


if __name__ == "__main__":
    _main(sys.argv[1:])
