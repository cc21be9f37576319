"""Post-hoc EMA of an adapter: choose the averaging profile after training.

:class:`PostHocEMA` keeps a few power-function EMA profiles of the adapter (Karras et al.,
arXiv 2312.02696), all updated in the one fused launch of the averagers, and saves them as
safetensors snapshots every N steps. After training, :meth:`PostHocEMA.synthesize` rebuilds the
average of any other profile (any relative width ``sigma_rel``, at any snapshot step) as the
least-squares combination of the snapshots (:mod:`emalora_fast.posthoc_math`); it can be
swapped into the model or saved as a peft adapter like any average. LoRA adapters are small
(41.9 M values for Llama-3-8B r=16 all-linear), so a snapshot costs little next to the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _dispatch, peft_utils, posthoc_math
from ._averager_core import Averager
from ._checks import check_float, check_int
from .integrations import distributed

__all__ = ["PostHocEMA"]

SNAPSHOT_FORMAT = 1


class PostHocEMA(Averager):
    """Power-function EMA profiles of an adapter, snapshots, and any profile rebuilt afterwards.

    With ``s = t - update_after`` steps since the start, profile k (exponent ``gamma_k`` from
    ``sigma_rels[k]``) updates ``shadow_k <- beta * shadow_k + (1 - beta) * theta`` with
    ``beta = (1 - 1/s) ** (gamma_k + 1)`` (a copy at s <= 1): the average of theta over the
    steps so far with weights growing like ``tau ** gamma_k``. Every ``snapshot_every`` steps
    all profiles are written to ``snapshot_dir/snapshot-<s>.safetensors`` (in a background
    thread, from a host copy; atomically). BEMA-style profiles are not offered: a BEMA output is
    an extrapolation, not an average of past weights, so least squares over snapshots does not
    rebuild it.

    Args:
        model: as for :class:`~emalora_fast.EMA`.
        sigma_rels: relative widths of the profiles kept, 1 to 8 in (0, 0.2887]; the paper
            keeps 0.05 and 0.28 and rebuilds any width in between.
        snapshot_every: steps between snapshots; None: no snapshots (the profiles alone).
        snapshot_dir: where snapshots go (needed with ``snapshot_every``).
        update_after: steps before the profiles start (their time origin).
        teacher_profile: the profile the teacher follows (an index or one of the widths).
        param_filter, adapter, teacher_adapter, backend: as for :class:`~emalora_fast.EMA`.
    """

    _kind = "posthoc_ema"

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.28),
        *,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        update_after: int = 0,
        teacher_profile: int | float = 0,
        param_filter: peft_utils.ParamFilter | None = None,
        adapter: str | None = None,
        teacher_adapter: str | None = None,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        sigma_rels = tuple(sigma_rels)
        if not 1 <= len(sigma_rels) <= 8 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be 1 to 8 distinct widths, got {sigma_rels!r}")
        top = posthoc_math.sigma_rel_of(0.0)
        for s in sigma_rels:
            check_float("sigma_rel", s, low=0.0, high=top, open_low=True)
        if snapshot_every is not None:
            check_int("snapshot_every", snapshot_every, minimum=1)
            if snapshot_dir is None:
                raise ValueError("snapshot_every needs snapshot_dir= (where snapshots go)")
        self.sigma_rels = self._profile_values = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(posthoc_math.gamma_of(s) for s in self.sigma_rels)
        self.snapshot_every = snapshot_every
        self.snapshot_dir = None if snapshot_dir is None else os.fspath(snapshot_dir)
        self._profiles = len(self.sigma_rels)
        self.teacher_profile = self._profile_index(teacher_profile)
        self._snapshots: list[tuple[int, str]] = []  # (s, file name)
        self._pending: list[Future] = []
        self._writer: ThreadPoolExecutor | None = None
        super().__init__(
            model,
            update_after=update_after,
            update_every=1,
            param_filter=param_filter,
            adapter=adapter,
            teacher_adapter=teacher_adapter,
            backend=backend,
        )
        if self.snapshot_dir is not None:
            os.makedirs(self.snapshot_dir, exist_ok=True)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
        }

    def _coefficients(self, t: int) -> tuple[list[float], float, bool]:
        s = t - self.update_after
        if s <= 1:
            return [1.0] * self._profiles, 0.0, True
        # The weight of theta in the lerp form, shadow + (1 - beta) * (theta - shadow).
        return [1.0 - posthoc_math.power_beta(s, g) for g in self.gammas], 0.0, False

    # ----------------------------------------------------------------------------------------
    # Snapshots

    def _file(self, s: int) -> str:
        rank = torch.distributed.get_rank() if distributed._initialized() else 0
        return f"snapshot-{s:09d}" + (f"-rank{rank}" if rank else "") + ".safetensors"

    def _after_update(self, t: int) -> None:
        s = t - self.update_after
        if self.snapshot_every and s > 0 and s % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self) -> None:
        """Write every profile now (``snapshot_dir/snapshot-<s>.safetensors``); the host copy is
        taken here, the file is written in a background thread (:meth:`flush` waits for it)."""
        if self.snapshot_dir is None:
            raise RuntimeError("snapshot() needs the averager created with snapshot_dir=...")
        s = self.step - self.update_after
        if s < 1:
            raise RuntimeError("no step folded in since the profiles started: nothing to save")
        tensors = {}
        for g in self._groups:
            for name, view in zip(g.names, g.views["ema"], strict=True):
                host = view.detach().to("cpu", copy=True)
                for k in range(self._profiles):
                    tensors[f"{k}/{name}"] = host[k].contiguous()
        meta = {
            "format": str(SNAPSHOT_FORMAT),
            "step": str(s),
            "sigma_rels": json.dumps(list(self.sigma_rels)),
        }
        name = self._file(s)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posthoc-ema")
        path = os.path.join(self.snapshot_dir, name)
        self._pending.append(self._writer.submit(_write_atomic, tensors, meta, path))
        self._snapshots = [x for x in self._snapshots if x[0] != s] + [(s, name)]

    def flush(self) -> None:
        """Wait until every snapshot is on disk (raises what a failed write raised)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    @property
    def snapshots(self) -> list[int]:
        """The steps (since the profiles started) of the snapshots taken."""
        return [s for s, _ in self._snapshots]

    # ----------------------------------------------------------------------------------------
    # Reconstruction

    def _entries(self, target: int) -> list[tuple[int, int, str | None]]:
        """(s, profile, file or None for the live shadows) usable for a target step."""
        entries = [
            (s, k, f) for s, f in self._snapshots if s <= target for k in range(self._profiles)
        ]
        now = self.step - self.update_after
        if target == now and now >= 1 and now not in self.snapshots:
            entries += [(now, k, None) for k in range(self._profiles)]
        return entries

    def reconstruction_error(self, sigma_rel: float, step: int | None = None) -> float:
        """Relative L2 error, in profile space, of the profile of width ``sigma_rel`` at
        ``step`` rebuilt from the snapshots (a property of the schedule, not of the weights)."""
        target, gamma = self._target(sigma_rel, step)
        entries = self._entries(target)
        times = [e[0] for e in entries]
        gammas = [self.gammas[e[1]] for e in entries]
        return posthoc_math.reconstruction_error(times, gammas, target, gamma)

    def _target(self, sigma_rel: float, step: int | None) -> tuple[int, float]:
        gamma = posthoc_math.gamma_of(sigma_rel)
        now = self.step - self.update_after
        target = now if step is None else step
        if not isinstance(target, int) or not 1 <= target <= now:
            raise ValueError(f"step must be an integer in [1, {now}] (steps so far), got {step!r}")
        if not self._entries(target):
            raise ValueError(
                f"no snapshot at or before step {target} (snapshots: {self.snapshots}); "
                "synthesize at the current step or at a later snapshot"
            )
        return target, gamma

    @torch.no_grad()
    def synthesize(self, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
        """The average of the profile of width ``sigma_rel`` at ``step`` (default: now), rebuilt
        from the snapshots at or before it (and the live profiles when ``step`` is now).

        Returns:
            ``{parameter name: fp32 tensor}`` on the parameters' devices (this rank's shards
            under FSDP2), summed in float64 on the host.
        """
        self.flush()
        target, gamma = self._target(sigma_rel, step)
        entries = self._entries(target)
        weights = posthoc_math.reconstruction_weights(
            np.array([e[0] for e in entries], dtype=np.float64),
            np.array([self.gammas[e[1]] for e in entries], dtype=np.float64),
            target,
            gamma,
        )
        sums = {n: None for n in self._names}
        by_file: dict[str | None, list[tuple[int, float]]] = {}
        for (_, k, f), w in zip(entries, weights, strict=True):
            by_file.setdefault(f, []).append((k, float(w)))
        live = {n: v for g in self._groups for n, v in zip(g.names, g.views["ema"], strict=True)}
        for f, ks in by_file.items():
            loaded = None if f is None else _read(os.path.join(self.snapshot_dir, f))
            for n in self._names:
                for k, w in ks:
                    src = live[n][k].cpu() if loaded is None else loaded[f"{k}/{n}"]
                    term = src.double() * w
                    sums[n] = term if sums[n] is None else sums[n].add_(term)
        devices = {n: v.device for n, v in live.items()}
        return {n: t.to(devices[n], torch.float32) for n, t in sums.items()}

    def _synthesized_views(self, sigma_rel: float, step: int | None) -> list[list[torch.Tensor]]:
        tensors = self.synthesize(sigma_rel, step)
        return [[tensors[n] for n in g.names] for g in self._groups]

    @contextmanager
    def swapped(
        self,
        profile: int | None = None,
        *,
        sigma_rel: float | None = None,
        step: int | None = None,
    ) -> Iterator[nn.Module]:
        """As :meth:`EMA.swapped` for a kept profile (``profile``), or with the average
        rebuilt for ``sigma_rel`` (at ``step``, default now) in the model."""
        if sigma_rel is None:
            with super().swapped(profile) as m:
                yield m
            return
        self._ensure_current()
        with self._values_in_place(self._synthesized_views(sigma_rel, step), False):
            yield self.model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        profile: int | None = None,
        *,
        sigma_rel: float | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """As :meth:`EMA.save_pretrained` for a kept profile, or for the average rebuilt for
        ``sigma_rel`` (at ``step``): a peft adapter for a peft model."""
        if sigma_rel is None:
            super().save_pretrained(save_directory, profile, **kwargs)
            return
        if not peft_utils.is_peft_model(self.model) or distributed.has_dtensor_parameters(
            self.model
        ):
            from safetensors.torch import save_file

            if distributed.has_dtensor_parameters(self.model):
                raise NotImplementedError(
                    "saving a rebuilt average of a sharded (FSDP2) model: call synthesize() on "
                    "every rank and save the shards"
                )
            os.makedirs(save_directory, exist_ok=True)
            tensors = self.synthesize(sigma_rel, step)
            save_file(tensors, os.path.join(os.fspath(save_directory), "averaged.safetensors"))
            return
        os.makedirs(save_directory, exist_ok=True)
        with self.swapped(sigma_rel=sigma_rel, step=step):
            peft_utils.save_adapter(self.model, os.fspath(save_directory), self.adapter, **kwargs)

    # ----------------------------------------------------------------------------------------
    # State: the snapshots are part of it (resume continues the same snapshot series)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        state = super().state_dict()
        state["snapshots"] = [[s, f] for s, f in self._snapshots]
        state["snapshot_dir"] = self.snapshot_dir
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        snaps = state.get("snapshots", [])
        if not isinstance(snaps, list) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 for x in snaps
        ):
            raise ValueError(f"cannot load averager state: bad snapshot list {snaps!r}")
        if snaps:
            if self.snapshot_dir is None:
                raise ValueError(
                    "cannot load averager state: it has snapshots and this averager no snapshot_dir"
                )
            missing = [
                f for _, f in snaps if not os.path.isfile(os.path.join(self.snapshot_dir, f))
            ]
            if missing:
                raise ValueError(
                    f"cannot load averager state: snapshots {missing[:3]} are not in "
                    f"{self.snapshot_dir}"
                )
        super().load_state_dict(state)
        self._snapshots = [(int(s), str(f)) for s, f in snaps]


def _write_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _read(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
