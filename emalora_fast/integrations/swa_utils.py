"""A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` computed by the fused op.

>>> from torch.optim.swa_utils import AveragedModel
>>> from emalora_fast.integrations.swa_utils import get_ema_multi_avg_fn
>>> ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))

:func:`get_ema_multi_avg_fn` has the signature and the result of torch's function of that name:
per tensor of a (device, dtype) group, ``ema <- ema + (1 - decay) * (current - ema)`` in fp32
arithmetic. It also serves Lightning's ``WeightAveraging(multi_avg_fn=...)``, which hands its
arguments to ``AveragedModel``.

How: the averaged model's tensors are gathered into one flat fp32 buffer (``[1, P]``, the op's
EMA state), the op folds the current tensors in and writes the result back into the averaged
tensors as its "teacher" output, in the same pass. The flat buffer, its per-tensor views, the
non-finite flag and (Triton) the device pointer table are built once per list of tensor storages
(the averaged tensors'; on Triton also the current ones', as the table holds both: a model's
parameters, updated in place, keep theirs) and reused: a call allocates nothing and never
synchronizes with the device. The gather re-reads
the averaged tensors on every call, so values written into them by others (``AveragedModel``'s
first copy, ``load_state_dict``, Lightning's swaps) are always taken into account.

One difference from torch: an element whose current value is NaN/Inf keeps its average (the op's
guard; :attr:`FusedEMA.flags` records it) instead of turning the average into NaN.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .. import _dispatch
from .._checks import check_float

__all__ = ["FusedEMA", "get_ema_multi_avg_fn"]

# Storage dtypes the op reads and writes; other dtypes take torch's own path.
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tables kept per function: one per (device, dtype) group of the averaged model, with room.
_CACHE_SIZE = 8


@dataclass
class _Slot:
    """What one launch over a fixed list of averaged tensors needs, built once."""

    flat: torch.Tensor  # [1, P] fp32: the EMA values of the call, gathered
    views: list[torch.Tensor]  # per-tensor views of flat, the averaged tensors' shapes
    flag: torch.Tensor  # [1] int32, 1 once a non-finite current value was seen
    backend: str
    plan: Any = None  # Triton: the pointer table of (current, averaged) tensors


class FusedEMA:
    """``multi_avg_fn(ema_param_list, current_param_list, num_averaged)`` of an EMA.

    Args:
        decay: the decay, in [0, 1] as torch's ``get_ema_multi_avg_fn`` accepts.
        backend: ``"auto" | "triton" | "cpp" | "torch"``; ``"torch"`` (and any group of a dtype
            the op does not store: float64, complex, integer buffers) runs torch's own update.
    """

    def __init__(self, decay: float = 0.999, backend: _dispatch.Backend = "auto") -> None:
        check_float("decay", decay, low=0.0, high=1.0)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.decay = float(decay)
        self.backend = backend
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()

    @property
    def flags(self) -> list[torch.Tensor]:
        """Per cached tensor list, an int32 device tensor set to 1 once a non-finite current
        value was skipped (reading it is a host-device sync)."""
        return [s.flag for s in self._slots.values()]

    @torch.no_grad()
    def __call__(
        self,
        ema_param_list: list[torch.Tensor],
        current_param_list: list[torch.Tensor],
        num_averaged: Any = None,
    ) -> None:
        """Fold ``current_param_list`` into ``ema_param_list`` (one device and dtype, as
        ``AveragedModel`` groups them); ``num_averaged`` is not used (as in torch's EMA)."""
        if not ema_param_list:
            return
        slot = self._slot(ema_param_list, current_param_list)
        if slot is None:
            _torch_update(ema_param_list, current_param_list, self.decay)
            return
        torch._foreach_copy_(slot.views, ema_param_list)
        weights = [1.0 - self.decay]  # the lerp form, as torch's _foreach_lerp_
        if slot.backend == "triton":
            _dispatch.load_triton("averager").averager_update(
                slot.plan, slot.flat, None, None, slot.flag, weights, 0.0, False
            )
        else:
            torch.ops.emalora_fast.averager_update(
                current_param_list, ema_param_list, slot.flat, None, None, slot.flag,
                weights, 0.0, False,
            )  # fmt: skip

    def _slot(self, ema: list[torch.Tensor], current: list[torch.Tensor]) -> _Slot | None:
        """The cached launch state for these storages, built on a miss; None where the op
        cannot run (torch's path then)."""
        e0 = ema[0]
        if e0.dtype not in _FUSED_DTYPES or len(current) != len(ema):
            return None
        backend = _dispatch.resolve(self.backend, e0.device, "averager")
        if backend == "torch":
            return None
        # The pointer table of a Triton launch also holds the current tensors' addresses.
        key = (
            backend,
            e0.device,
            e0.dtype,
            current[0].dtype,
            tuple(map(torch.Tensor.data_ptr, ema)),
            tuple(map(torch.Tensor.numel, ema)),
            tuple(map(torch.Tensor.data_ptr, current)) if backend == "triton" else (),
        )
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        usable = all(
            e.is_contiguous()
            and c.is_contiguous()
            and e.dtype == e0.dtype
            and c.dtype == current[0].dtype
            and e.device == c.device == e0.device
            and e.numel() == c.numel()
            for e, c in zip(ema, current, strict=True)
        )
        if not usable or current[0].dtype not in _FUSED_DTYPES:
            return None
        sizes = [e.numel() for e in ema]
        flat = torch.empty(1, sum(sizes), device=e0.device, dtype=torch.float32)
        views = [v.view(e.shape) for v, e in zip(flat[0].split(sizes), ema, strict=True)]
        plan = None
        if backend == "triton":
            plan = _dispatch.load_triton("averager").AveragerPlan(list(current), list(ema))
        else:
            _dispatch.load_cpp()
        slot = _Slot(flat, views, torch.zeros(1, dtype=torch.int32, device=e0.device), backend)
        slot.plan = plan
        self._slots[key] = slot
        while len(self._slots) > _CACHE_SIZE:
            self._slots.popitem(last=False)
        return slot


def _torch_update(ema: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """torch's own EMA update (``get_ema_multi_avg_fn``), for what the op does not cover."""
    if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
        torch._foreach_lerp_(ema, current, 1 - decay)
    else:
        for e, c in zip(ema, current, strict=True):
            e.copy_(e * decay + c * (1 - decay))


def get_ema_multi_avg_fn(decay: float = 0.999, *, backend: _dispatch.Backend = "auto") -> FusedEMA:
    """The fused counterpart of ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)``.

    Args:
        decay: in [0, 1]: ``ema <- ema + (1 - decay) * (current - ema)``.
        backend: as for :class:`FusedEMA`.

    Returns:
        A :class:`FusedEMA`, callable as ``fn(ema_param_list, current_param_list, num_averaged)``.
    """
    return FusedEMA(decay, backend)
