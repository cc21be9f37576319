"""Averager benchmark cases: ours vs the per-tensor loop (TRL's form) vs torch foreach forms."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..averaging.ema import BEMA, EMA

# (hidden, intermediate, kv_dim, layers) of the model shapes; LoRA on all 7 linear layers.
SHAPES = {
    "llama3-8b": (4096, 14336, 1024, 32),
    "llama3-70b": (8192, 28672, 1024, 80),
    "tiny": (64, 128, 32, 2),
}

# Bytes moved per element by a fused update on fp32 tensors (reads + writes).
FLOOR_BYTES = {"ema": 3 * 4, "bema": 5 * 4}


def lora_shapes(model: str, r: int = 16, layers: int | None = None) -> list[tuple[int, int]]:
    """Shapes of the LoRA A/B tensors of an all-linear adapter on a Llama-shaped model."""
    h, inter, kv, n_layers = SHAPES[model]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    shapes = []
    for _ in range(layers or n_layers):
        for fan_in, fan_out in linears:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


class TensorSet(nn.Module):
    def __init__(self, shapes: list[tuple[int, int]], device, dtype=torch.float32):
        super().__init__()
        self.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
        )


def _loop(kind: str, params, ema, theta0, out) -> Callable[[], None]:
    """TRL BEMACallback's per-tensor loop (and its EMA analogue)."""
    beta, alpha = 0.05, 0.3

    @torch.no_grad()
    def step():
        for p, e, t0, o in zip(params, ema, theta0, out):
            e.mul_(1 - beta).add_(p, alpha=beta)
            if kind == "bema":
                o.copy_(e + alpha * (p - t0))

    return step


def _foreach(kind: str, params, ema, theta0, out) -> Callable[[], None]:
    """The fewest-passes torch._foreach form (timm ModelEmaV3 / AveragedModel style)."""
    beta, alpha = 0.05, 0.3

    @torch.no_grad()
    def step():
        torch._foreach_lerp_(ema, params, beta)
        if kind == "bema":
            torch._foreach_copy_(out, ema)
            torch._foreach_add_(out, params, alpha=alpha)
            torch._foreach_add_(out, theta0, alpha=-alpha)

    return step


def _averaged_model(params, device) -> Callable[[], None]:
    """torch.optim.swa_utils.AveragedModel with the foreach EMA function (EMA only)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    module = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params])
    live = nn.ParameterList(list(params))
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=False)
    averaged.n_averaged.fill_(1)
    return lambda: averaged.update_parameters(live)


def cases(
    kind: str, model: str, device: torch.device, layers: int | None = None, backend: str = "auto"
) -> tuple[dict[str, Callable[[], object]], int]:
    """Providers -> one-update callables, and the element count, for a LoRA tensor set."""
    shapes = lora_shapes(model, layers=layers)
    live = TensorSet(shapes, device)
    params = list(live.ps)
    ema = [p.detach().clone() for p in params]
    theta0 = [p.detach().clone() for p in params]
    out = [p.detach().clone() for p in params]
    if kind == "bema":
        ours = BEMA(live, param_filter=lambda n, p: True, backend=backend)
    else:
        ours = EMA(live, 0.95, param_filter=lambda n, p: True, backend=backend)
    ours.update()
    providers: dict[str, Callable[[], object]] = {
        "emalora": ours.update,
        "loop": _loop(kind, params, ema, theta0, out),
        "foreach": _foreach(kind, params, ema, theta0, out),
    }
    if kind == "ema":
        providers["averaged_model"] = _averaged_model(params, device)
    return providers, sum(p.numel() for p in params)


def profile_floor_bytes(k: int) -> int:
    """Bytes per fp32 element of one update of K EMA profiles: theta once, each shadow read
    and written."""
    return 4 + 8 * k


def profile_cases(
    k: int, model: str, device: torch.device, layers: int | None = None, backend: str = "auto"
) -> tuple[dict[str, Callable[[], object]], int]:
    """K EMA profiles of a LoRA tensor set: one launch for all (ours), K separate averagers,
    and K torch foreach lerps."""
    shapes = lora_shapes(model, layers=layers)
    live = TensorSet(shapes, device)
    params = list(live.ps)
    decays = tuple(1 - 10 ** -(1 + i / 2) for i in range(k))  # 0.9, 0.968, 0.99, ...
    every = lambda n, p: True  # noqa: E731
    ours = EMA(live, decays if k > 1 else decays[0], param_filter=every, backend=backend)
    separate = [EMA(live, d, param_filter=every, backend=backend) for d in decays]
    shadows = [[p.detach().clone() for p in params] for _ in decays]

    def k_averagers():
        for a in separate:
            a.update()

    @torch.no_grad()
    def k_foreach():
        for s, d in zip(shadows, decays, strict=True):
            torch._foreach_lerp_(s, params, 1 - d)

    ours.update()  # past the first step's copy
    k_averagers()
    providers = {"emalora": ours.update, "k_averagers": k_averagers, "k_foreach": k_foreach}
    return providers, sum(p.numel() for p in params)
