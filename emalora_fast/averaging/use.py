"""Reading and using an average: the averaged tensors by name, copies into the model, swaps for
evaluation and for the teacher, export as a peft adapter.

:class:`UseMixin` is the half of :class:`~emalora_fast.averaging.core.Averager` that reads the
flat fp32 state which :mod:`.core` keeps and updates; nothing here changes that state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from .._checks import real_scalar
from . import peft_utils

if TYPE_CHECKING:
    from .state import _Group


class UseMixin:
    """Reads, swaps and exports the average (a mixin of ``Averager``)."""

    @property
    def parameter_names(self) -> list[str]:
        """Names (the model's own) of the averaged parameters, in update order."""
        return list(self._names)

    def kinds(self) -> dict[str, int]:
        """How many averaged tensors of each kind: ``lora_A``, ``lora_magnitude_vector``,
        ``modules_to_save``... (``other`` for parameters outside the adapter)."""
        return dict(sorted(self._selection.kinds().items()))

    @property
    def nonfinite_flag(self) -> list[torch.Tensor]:
        """Per group, an int32 device tensor set to 1 once a non-finite weight was skipped."""
        return [g.flag for g in self._groups]

    def nonfinite_detected(self) -> bool:
        """Whether any update met a NaN/Inf weight (those elements kept their average).

        Reads a device flag: a host-device sync, so call it at logging time, not every step.
        """
        return any(bool(g.flag.item()) for g in self._groups)

    def reset_nonfinite(self) -> None:
        for g in self._groups:
            g.flag.zero_()

    _profile_values: tuple[float, ...] = ()  # what names a profile: EMA decays, sigma_rels

    def _profile_index(self, profile: int | float | None) -> int:
        """A profile given by index or by its value (a decay; None: profile 0)."""
        if profile is None:
            return 0
        values = self._profile_values
        value = real_scalar(profile)
        if isinstance(profile, int | np.integer) and not isinstance(profile, bool):
            if 0 <= profile < self._profiles:
                return int(profile)
        elif value is not None and value in values:
            return values.index(value)
        raise ValueError(
            f"profile must be an index in [0, {self._profiles}) or one of {list(values)}, "
            f"got {profile!r}"
        )

    def _averaged_views(self, g: _Group, profile: int = 0) -> list[torch.Tensor]:
        if self._is_bema:
            return g.views["out"]
        return [v[profile] for v in g.views["ema"]]

    def _teacher_views(self, g: _Group) -> list[torch.Tensor]:
        if self._teacher_view == "out":
            return g.views["out"]
        return [v[self.teacher_profile] for v in g.views["ema"]]

    def averaged_state_dict(
        self, dtype: torch.dtype | None = None, profile: int | float | None = None
    ) -> dict[str, torch.Tensor]:
        """``{parameter name: averaged tensor}`` with the model's names.

        Args:
            dtype: dtype of the returned tensors; default the parameter's own dtype (the fp32
                shadow itself is returned as a copy when ``dtype=torch.float32``).
            profile: the EMA profile, by index or decay (default: the first).
        Under FSDP2 the tensors are DTensors placed like the parameters.
        """
        self._ensure_current()
        k = self._profile_index(profile)
        result = {}
        for g in self._groups:
            for name, p, avg in zip(g.names, g.params, self._averaged_views(g, k), strict=True):
                t = avg.to(dtype or p.dtype, copy=True)
                if distributed.is_dtensor(p):
                    from torch.distributed.tensor import DTensor

                    t = DTensor.from_local(
                        t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
                result[name] = t
        return result

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None, profile: int | float | None = None) -> None:
        """Write the averaged weights (of ``profile``, default the first) into ``model``'s
        parameters of the same names (default: the averaged model itself)."""
        model = None if model is None else distributed.unwrap_model(model)
        k = self._profile_index(profile)
        if model is None or model is self.model:
            self._ensure_current()
            for g in self._groups:
                torch._foreach_copy_(g.locals, self._averaged_views(g, k))
            self._reshard()  # FSDP2: the next forward gathers the shards
            return
        params = dict(model.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ValueError(f"model has no parameters named {missing[:3]}")
        for g in self._groups:
            for name, avg in zip(g.names, self._averaged_views(g, k), strict=True):
                peft_utils.local_tensor(params[name]).copy_(avg)
        distributed.reshard_fsdp(model)

    @contextmanager
    def _values_in_place(self, sources: list[list[torch.Tensor]], eval_mode: bool):
        """Run the body with ``sources[i]`` (per group) in place of the live values; the live
        values come back bit for bit afterwards, also when the body raises.

        The writes go through ``.data``: a student forward taken before the body keeps a valid
        graph (its tensors hold the live values again when its backward runs).
        """
        if self._swapping:
            raise RuntimeError("the averaged weights are already swapped in (nested swap)")
        with torch.no_grad():
            for g, src in zip(self._groups, sources, strict=True):
                if g.backup is None:
                    g.backup = [torch.empty_like(t) for t in g.untracked]
                torch._foreach_copy_(g.backup, g.untracked)
                torch._foreach_copy_(g.untracked, src)
        self._reshard()  # FSDP2: forwards in the body gather the shards
        self._swapping = True
        try:
            with self._eval() if eval_mode else nullcontext():
                yield self.model
        finally:
            with torch.no_grad():
                for g in self._groups:
                    torch._foreach_copy_(g.untracked, g.backup)
            self._swapping = False
            self._reshard()  # FSDP2: drop copies gathered in the body

    @contextmanager
    def swapped(self, profile: int | float | None = None) -> Iterator[nn.Module]:
        """Run the body with the averaged weights (of ``profile``, by index or decay; default
        the first) in the model; the live weights come back afterwards, bit for bit, also when
        the body raises. Modes (train/eval) are left to the caller. Under FSDP2 each rank swaps
        its shards, and forwards in the body gather the averaged weights."""
        self._ensure_current()
        k = self._profile_index(profile)
        with self._values_in_place([self._averaged_views(g, k) for g in self._groups], False):
            yield self.model

    @contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """Run the body as the teacher: the teacher's weights in place of the live adapter's,
        every module in eval mode (no dropout). Afterwards the live weights, each module's mode,
        the active adapter and every ``requires_grad`` flag are as before.

        The teacher's weights are those of the teacher adapter when there is one (the kernel
        keeps it current), else the averaged shadows; for :class:`BEMA` they follow
        ``teacher_weights``. Cost: three multi-tensor copies of the averaged tensors and one
        pass over a cached module list; no adapter switching, no parameter scan.
        """
        self._ensure_current()
        sources = [g.teacher_locals or self._teacher_views(g) for g in self._groups]
        with self._values_in_place(sources, True) as m:
            yield m

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        profile: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        """Save the averaged weights (of ``profile``, default the first): a peft adapter
        (``adapter_model.safetensors`` and ``adapter_config.json``, loadable with
        ``PeftModel.from_pretrained``) for a peft model, else ``averaged.safetensors`` with
        :meth:`averaged_state_dict`.

        Under FSDP2 call it on every rank: they all take part in one gather of the averaged
        tensors (the only communication of the averager), rank 0 writes, and every rank returns
        once the files are written. Otherwise (DDP included) it writes where it is called.
        """
        self._ensure_current()
        save_directory = os.fspath(save_directory)
        if peft_utils.is_peft_model(self.model):
            outside = self._selection.outside_adapter()
            if outside:
                raise ValueError(
                    f"{len(outside)} averaged parameters are not tensors of adapter "
                    f"{self.adapter!r} (e.g. {outside[:2]}), and a peft adapter cannot hold "
                    "them: save averaged_state_dict() instead"
                )
            os.makedirs(save_directory, exist_ok=True)
            with self.swapped(profile):
                peft_utils.save_adapter(self.model, save_directory, self.adapter, **kwargs)
            return
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, "averaged.safetensors")
        tensors = self.averaged_state_dict(profile=profile)
        if not any(distributed.is_dtensor(t) for t in tensors.values()):
            save_file({n: t.contiguous() for n, t in tensors.items()}, path)
            return
        tensors = distributed.full_tensors(tensors)  # FSDP2: every rank gathers, rank 0 writes
        if distributed.is_main_process():
            save_file({n: t.contiguous() for n, t in tensors.items()}, path)
        distributed.barrier()

    def __repr__(self) -> str:
        n = sum(g.ema.shape[-1] for g in self._groups)
        kinds = ", ".join(f"{c} {k}" for k, c in self.kinds().items())
        where = f" of adapter {self.adapter!r}" if self.adapter else ""
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        backends = sorted({g.backend for g in self._groups})
        return (
            f"{type(self).__name__}({len(self._names)} tensors{where} [{kinds}], {n:,} elements, "
            f"{len(self._groups)} group(s), backend={'/'.join(backends)}, step={self.step}, {hp})"
        )
