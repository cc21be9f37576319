"""Post-hoc EMA of an adapter: choose the averaging profile after training.

:class:`PostHocEMA` keeps a few power-function EMA profiles of the adapter (Karras et al.,
arXiv 2312.02696), all updated in the one fused launch of the averagers, and saves them as
safetensors snapshots as training goes. After training, :meth:`PostHocEMA.synthesize` rebuilds
the average of any other profile (any relative width ``sigma_rel``, at any step) as the
least-squares combination of the snapshots (:mod:`emalora_fast.averaging.posthoc_math`), says
when that combination is poor, and can swap it into the model or save it as a peft adapter like
any average. LoRA adapters are small (41.9 M values for Llama-3-8B r=16 all-linear), so a snapshot
costs little next to the model.
"""

from __future__ import annotations

import os
import uuid
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _dispatch, distributed
from .._checks import check_float, check_int, is_int
from . import peft_utils, posthoc_io, posthoc_math
from .core import Averager, _split
from .posthoc_io import SnapshotWriteError

__all__ = ["PostHocEMA", "ReconstructionWarning", "SnapshotWriteError"]


class ReconstructionWarning(UserWarning):
    """A synthesized average whose profile the snapshots rebuild poorly (above ``max_error``)."""


class PostHocEMA(Averager):
    """Power-function EMA profiles of an adapter, snapshots, and any profile rebuilt afterwards.

    **Steps.** Every step here is the global optimizer step ``t`` given to :meth:`update`
    (snapshot file names, :attr:`snapshots`, ``synthesize(step=)``, the state). The profiles'
    clock is ``s = t - update_after``; updates at ``s <= 0`` only copy the weights.

    **Update.** Profile k (exponent ``gamma_k`` from ``sigma_rels[k]``) updates
    ``shadow_k <- shadow_k + (1 - beta) * (theta - shadow_k)`` (the lerp form: a constant theta
    is kept exactly) with EDM2's decay for an update that
    follows the previous one by ``delta`` steps: ``beta = (1 - delta/s) ** (gamma_k + 1)``
    (``delta = s`` for the first update after ``update_after``: a copy). Updates may come at
    any steps (every step, every 3rd, irregular): the average after the update at s gives the
    weights of each update the integral of the power profile ``tau**gamma_k`` over the steps
    since the update before it, normalised (:mod:`~emalora_fast.posthoc_math`).

    **Snapshots.** The first update at or after each multiple of ``snapshot_every`` (a global
    step; multiples at or before ``update_after`` are skipped) writes every profile to
    ``snapshot_dir/snapshot-<global step>.safetensors``: updates every 3 steps with
    ``snapshot_every=10`` snapshot at 12, 21, 30, 42, ... A background thread writes each file
    from a host copy, atomically. At most ``max_pending`` writes are in flight: the next snapshot
    waits for room before copying, so the host memory held by snapshots is at most
    ``max_pending * K * P * 4`` bytes (K profiles, P averaged elements): host buffers allocated
    once, reused from one snapshot to the next and freed by :meth:`close`; the file is written
    from them without another copy. :attr:`snapshots` lists only files written; a failed write is
    raised (:class:`SnapshotWriteError`, every failure listed) by the next :meth:`update` (before
    it changes anything), or at the latest by :meth:`flush`, :meth:`close`, :meth:`synthesize`,
    :meth:`state_dict`, or at interpreter exit (printed, exit status 1).

    **The directory belongs to one run.** A run id (random, in :attr:`run_id` and the state) is
    written to ``snapshot_dir/posthoc-run.json`` and into every snapshot. A directory holding
    another run's snapshots is refused at the first :meth:`update` unless that run is resumed
    (:meth:`load_state_dict` of its state, first) or ``overwrite=True`` (its snapshots are then
    deleted). Resuming or taking a directory over removes the ``.tmp`` files a killed run left.

    **Synthesis.** :meth:`synthesize` solves the least squares over the snapshots at or before
    the step asked for, in the inner product exact for the updates actually taken, and warns
    (:class:`ReconstructionWarning`; raises with ``strict=True``) when the rebuilt profile's
    relative error (:meth:`reconstruction_error`) is above ``max_error``, naming the nearest
    snapshot steps. BEMA-style profiles are not offered: a BEMA output is an extrapolation, not an
    average of past weights, so least squares over snapshots does not rebuild it.

    Args:
        model: as for :class:`~emalora_fast.EMA`.
        sigma_rels: relative widths of the profiles kept, 1 to 8 in (0, 0.2887]; the paper
            keeps 0.05 and 0.28 and rebuilds any width in between.
        snapshot_every: global steps between snapshots; None: no automatic snapshots.
        snapshot_dir: where snapshots go (needed with ``snapshot_every``).
        update_after: steps before the profiles start (their time origin).
        teacher_profile: the profile the teacher follows (an index or one of the widths).
        overwrite: take over a ``snapshot_dir`` that holds another run's snapshots (deleting
            them at the first update) instead of refusing it.
        max_pending: snapshot writes in flight before :meth:`update` waits (>= 1).
        max_error: default threshold of :meth:`synthesize`'s warning, a relative error in
            profile space (0.1 by default: 0.05/0.28 snapshots every 10% of the run rebuild any
            width in between within about 0.03).
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
        overwrite: bool = False,
        max_pending: int = 2,
        max_error: float = 0.1,
        param_filter: peft_utils.ParamFilter | None = None,
        adapter: str | None = None,
        teacher_adapter: str | None = None,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        given = tuple(sigma_rels)
        top = posthoc_math.sigma_rel_of(0.0)
        sigma_rels = tuple(
            check_float("sigma_rel", s, low=0.0, high=top, open_low=True) for s in given
        )
        if not 1 <= len(sigma_rels) <= 8 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be 1 to 8 distinct widths, got {given!r}")
        if snapshot_every is not None:
            check_int("snapshot_every", snapshot_every, minimum=1)
            if snapshot_dir is None:
                raise ValueError("snapshot_every needs snapshot_dir= (where snapshots go)")
        check_int("max_pending", max_pending, minimum=1)
        check_float("max_error", max_error, low=0.0, high=1.0, open_low=True)
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
        self.sigma_rels = self._profile_values = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(posthoc_math.gamma_of(s) for s in self.sigma_rels)
        self.snapshot_every = snapshot_every
        self.snapshot_dir = None if snapshot_dir is None else os.fspath(snapshot_dir)
        self.overwrite = overwrite
        self.max_error = float(max_error)
        self._profiles = len(self.sigma_rels)
        self.teacher_profile = self._profile_index(teacher_profile)
        self.run_id = uuid.uuid4().hex
        self._snapshots: dict[int, str] = {}  # global step -> file name, files written only
        self._updates: list[list[int]] = []  # runs [first, gap, count] of steps > update_after
        self._writer = posthoc_io.SnapshotWriter(max_pending)
        weakref.finalize(self, self._writer.shutdown).atexit = False
        self._foreign: tuple[str, list[int]] | None = None  # (run id, steps) of another run
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
            self._suffix = posthoc_io.rank_suffix()
            owner = posthoc_io.read_run_id(self.snapshot_dir, self._suffix)
            steps, _ = posthoc_io.listing(self.snapshot_dir, self._suffix)
            if owner is None and not steps:
                self._claim()
            else:
                self._foreign = (owner or "<unknown: no run file>", steps)

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
        return [1.0 - b for b in self._betas(t)], 0.0, False

    def _betas(self, t: int) -> list[float]:
        """EDM2's decays of an update at global step t, per profile: ``(1 - delta/s)**(g + 1)``
        with ``s = t - update_after`` and ``delta`` the steps since the previous update (or
        since the origin: ``delta = s``, a copy)."""
        s = t - self.update_after
        previous = max(self.step - self.update_after, 0)
        return [posthoc_math.power_beta(s, g, s - previous) for g in self.gammas]

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """As :meth:`EMA.update <emalora_fast.EMA.update>`; raises first, changing nothing, when
        a snapshot write failed (:class:`SnapshotWriteError`) or ``snapshot_dir`` belongs to
        another run."""
        self._check_ready()
        super().update(step)

    # ----------------------------------------------------------------------------------------
    # The snapshot directory and its run

    def _claim(self) -> None:
        """Make the directory this run's: run file, no leftover ``.tmp`` files."""
        _, tmps = posthoc_io.listing(self.snapshot_dir, self._suffix)
        posthoc_io.remove_files(self.snapshot_dir, tmps)
        posthoc_io.write_run_id(self.snapshot_dir, self._suffix, self.run_id)
        self._foreign = None

    def _foreign_error(self, what: str) -> ValueError:
        theirs, steps = self._foreign
        shown = steps[:3] + (["..."] if len(steps) > 3 else [])
        return ValueError(
            f"{what}: snapshot_dir {self.snapshot_dir} holds the snapshots of another run (run "
            f"{theirs}, steps {shown}); this averager is run {self.run_id}. To resume that run, "
            "call load_state_dict() with its saved state before the first update; to replace "
            "its snapshots, create the averager with overwrite=True; or give each run its own "
            "snapshot_dir"
        )

    def _check_ready(self) -> None:
        """Before an update: the directory is ours, and no write failed unreported."""
        self._own_directory()
        self._collect(self._writer.reap())

    def _own_directory(self) -> None:
        if self._foreign is not None:
            if not self.overwrite:
                raise self._foreign_error("cannot update")
            steps, _ = posthoc_io.listing(self.snapshot_dir, self._suffix)
            names = [posthoc_io.snapshot_name(s, self._suffix) for s in steps]
            posthoc_io.remove_files(self.snapshot_dir, names)
            self._claim()

    def _index(self, written: list[tuple[int, str]]) -> None:
        for step, path in written:
            self._snapshots[step] = os.path.basename(path)

    def _collect(self, written: list[tuple[int, str]]) -> None:
        """Index the writes that finished; raise every failure not reported yet."""
        self._index(written)
        failures = self._writer.take_failures()
        if failures:
            raise SnapshotWriteError(failures, self.snapshots)

    # ----------------------------------------------------------------------------------------
    # Snapshots

    def _after_update(self, t: int) -> None:
        if t <= self.update_after:
            return
        previous = self._last_update()
        previous = self.update_after if previous is None else previous
        runs = self._updates
        if runs and runs[-1][2] == 1:
            runs[-1][1:] = [t - runs[-1][0], 2]
        elif runs and t - (runs[-1][0] + runs[-1][1] * (runs[-1][2] - 1)) == runs[-1][1]:
            runs[-1][2] += 1
        else:
            runs.append([t, 1, 1])
        every = self.snapshot_every
        if every and t // every > previous // every:
            self.snapshot()

    def _last_update(self) -> int | None:
        """The global step of the last update after ``update_after`` (None: none yet)."""
        if not self._updates:
            return None
        first, gap, count = self._updates[-1]
        return first + gap * (count - 1)

    def _update_steps(self, until: int) -> np.ndarray:
        """The global steps of the updates after ``update_after``, up to ``until``."""
        parts = [f + g * np.arange(c, dtype=np.int64) for f, g, c in self._updates if f <= until]
        steps = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return steps[steps <= until]

    def snapshot(self) -> None:
        """Write every profile now (``snapshot_dir/snapshot-<global step>.safetensors``): waits
        while ``max_pending`` writes are in flight, takes the host copy, and leaves the write to
        the background thread (:meth:`flush` waits for it)."""
        if self.snapshot_dir is None:
            raise RuntimeError("snapshot() needs the averager created with snapshot_dir=...")
        if self._last_update() != self.step:
            raise RuntimeError(
                f"no update since the profiles started (update_after={self.update_after}): "
                "nothing to save"
            )
        self._own_directory()
        self._index(self._writer.reap())  # failures wait for the next update or flush()
        self._writer.wait_for_room()
        buffers = self._writer.host_buffers([g.ema for g in self._groups])
        tensors = {}
        for g, host in zip(self._groups, buffers, strict=True):
            host.copy_(g.ema.detach())  # [K, P], one copy per group
            shapes = [v.shape[1:] for v in g.views["ema"]]
            for k in range(self._profiles):
                for name, view in zip(g.names, _split(host[k], shapes), strict=True):
                    tensors[f"{k}/{name}"] = view
        meta = {
            "format": str(posthoc_io.SNAPSHOT_FORMAT),
            "step": str(self.step),
            "update_after": str(self.update_after),
            "run_id": self.run_id,
            "sigma_rels": ",".join(repr(s) for s in self.sigma_rels),
        }
        path = os.path.join(self.snapshot_dir, posthoc_io.snapshot_name(self.step, self._suffix))
        self._writer.submit(
            self.step, path, buffers, posthoc_io.write_snapshot, tensors, meta, path, self._suffix
        )

    def flush(self) -> None:
        """Wait until every snapshot is written; raises :class:`SnapshotWriteError` listing
        every write that failed (the index keeps only the files written)."""
        self._collect(self._writer.wait_all())

    def close(self) -> None:
        """:meth:`flush`, then stop the writer thread (a later snapshot starts another)."""
        try:
            self.flush()
        finally:
            self._writer.shutdown()

    @property
    def snapshots(self) -> list[int]:
        """The global steps of the snapshots written (files on disk), in order."""
        self._index(self._writer.reap())
        return sorted(self._snapshots)

    @property
    def pending_snapshots(self) -> list[int]:
        """The global steps of the snapshots still being written."""
        return self._writer.pending_steps

    # ----------------------------------------------------------------------------------------
    # Reconstruction

    def _target(self, step: int | None) -> int:
        """The global step of the average asked for: that of the last update at or before
        ``step`` (what a profile run live holds then; default: the last update)."""
        last = self._last_update()
        if last is None:
            raise ValueError(
                f"no update since the profiles started (update_after={self.update_after}): "
                "nothing to synthesize"
            )
        if step is None:
            return last
        first = self._updates[0][0]
        if not is_int(step) or not first <= step <= self.step:
            raise ValueError(
                f"step must be a global step in [{first}, {self.step}] (the first update after "
                f"update_after={self.update_after}, the last update), got {step!r}"
            )
        return int(self._update_steps(int(step))[-1])

    def _plan(
        self, sigma_rel: float, step: int | None
    ) -> tuple[int, list[tuple[int, int, str | None]], np.ndarray, float]:
        """(target step, entries (step, profile, file or None for the live shadows), weights,
        relative error) of the least squares for ``sigma_rel`` at ``step``."""
        gamma = posthoc_math.gamma_of(sigma_rel)
        target = self._target(step)
        entries = [
            (s, k, f)
            for s, f in sorted(self._snapshots.items())
            if s <= target
            for k in range(self._profiles)
        ]
        if target == self.step and target not in self._snapshots:
            entries += [(target, k, None) for k in range(self._profiles)]
        if not entries:
            raise ValueError(
                f"no snapshot at or before step {step} (snapshots: {self.snapshots}); "
                "synthesize at the last update or at a later snapshot"
            )
        origin = self.update_after
        weights, error = posthoc_math.reconstruct(
            [s - origin for s, _, _ in entries],
            [self.gammas[k] for _, k, _ in entries],
            target - origin,
            gamma,
            updates=self._update_steps(target) - origin,
        )
        return target, entries, weights, error

    def reconstruction_error(self, sigma_rel: float, step: int | None = None) -> float:
        """Relative L2 error, in profile space, of the profile of width ``sigma_rel`` at global
        ``step`` (default: the last update) rebuilt from the snapshots: a property of the
        snapshot and update schedule, not of the weights (:mod:`~emalora_fast.posthoc_math`)."""
        self.flush()
        return self._plan(sigma_rel, step)[3]

    def _check_error(
        self, sigma_rel: float, step: int | None, target: int, error: float, max_error, strict
    ) -> None:
        limit = self.max_error if max_error is None else float(max_error)
        if error <= limit:
            return
        asked = target if step is None else step
        before = [s for s in self._snapshots if s <= asked]
        after = [s for s in self._snapshots if s > asked]
        near = [max(before)] if before else []
        near += [min(after)] if after else []
        live = f", the live profiles at step {self.step}" if asked != self.step else ""
        message = (
            f"the average of sigma_rel={sigma_rel} at step {asked} is rebuilt with a relative "
            f"error of {error:.3g} in profile space (above max_error={limit:g}): nearest "
            f"snapshots at steps {near or 'none'}{live}; kept widths {list(self.sigma_rels)}. "
            "Synthesize at a snapshot step and a width between the kept ones, or keep more "
            "widths / snapshot more often"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, ReconstructionWarning, stacklevel=3)

    def synthesize(
        self,
        sigma_rel: float,
        step: int | None = None,
        *,
        max_error: float | None = None,
        strict: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The average of the profile of width ``sigma_rel`` at global ``step`` (default: the
        last update; otherwise the last update at or before ``step``), rebuilt from the snapshots
        at or before it (and the live profiles when that is the last update).

        Rule: when :meth:`reconstruction_error` of that profile exceeds ``max_error`` (default:
        the averager's), a :class:`ReconstructionWarning` (``strict=True``: a ValueError, raised
        before anything is read) names the error and the nearest snapshot steps.

        Returns:
            ``{parameter name: fp32 tensor}`` on the parameters' devices (this rank's shards
            under FSDP2), summed in float64 on the host.
        """
        self.flush()
        with torch.no_grad():
            target, entries, weights, error = self._plan(sigma_rel, step)
            self._check_error(sigma_rel, step, target, error, max_error, strict)
            sums = {n: None for n in self._names}
            by_file: dict[str | None, list[tuple[int, float]]] = {}
            for (_, k, f), w in zip(entries, weights, strict=True):
                by_file.setdefault(f, []).append((k, float(w)))
            live = {
                n: v for g in self._groups for n, v in zip(g.names, g.views["ema"], strict=True)
            }
            for f, ks in by_file.items():
                loaded = None
                if f is not None:
                    path = os.path.join(self.snapshot_dir, f)
                    loaded = posthoc_io.read_snapshot(path, self.run_id)
                for n in self._names:
                    for k, w in ks:
                        src = live[n][k].cpu() if loaded is None else loaded[f"{k}/{n}"]
                        term = src.double() * w
                        sums[n] = term if sums[n] is None else sums[n].add_(term)
            devices = {n: v.device for n, v in live.items()}
            return {n: t.to(devices[n], torch.float32) for n, t in sums.items()}

    def _synthesized_views(self, sigma_rel: float, step: int | None, **kw) -> list:
        tensors = self.synthesize(sigma_rel, step, **kw)
        return [[tensors[n] for n in g.names] for g in self._groups]

    @contextmanager
    def swapped(
        self,
        profile: int | None = None,
        *,
        sigma_rel: float | None = None,
        step: int | None = None,
        max_error: float | None = None,
        strict: bool = False,
    ) -> Iterator[nn.Module]:
        """As :meth:`EMA.swapped` for a kept profile (``profile``), or with the average
        rebuilt for ``sigma_rel`` (at ``step``, default now; ``max_error``/``strict`` as for
        :meth:`synthesize`) in the model."""
        if sigma_rel is None:
            with super().swapped(profile) as m:
                yield m
            return
        self._ensure_current()
        views = self._synthesized_views(sigma_rel, step, max_error=max_error, strict=strict)
        with self._values_in_place(views, False):
            yield self.model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        profile: int | None = None,
        *,
        sigma_rel: float | None = None,
        step: int | None = None,
        max_error: float | None = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> None:
        """As :meth:`EMA.save_pretrained` for a kept profile, or for the average rebuilt for
        ``sigma_rel`` (at ``step``; ``max_error``/``strict`` as for :meth:`synthesize`): a peft
        adapter for a peft model."""
        if sigma_rel is None:
            super().save_pretrained(save_directory, profile, **kwargs)
            return
        check = dict(max_error=max_error, strict=strict)
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
            tensors = self.synthesize(sigma_rel, step, **check)
            save_file(tensors, os.path.join(os.fspath(save_directory), "averaged.safetensors"))
            return
        os.makedirs(save_directory, exist_ok=True)
        with self.swapped(sigma_rel=sigma_rel, step=step, **check):
            peft_utils.save_adapter(self.model, os.fspath(save_directory), self.adapter, **kwargs)

    # ----------------------------------------------------------------------------------------
    # State: the run id, the update steps and the snapshots written (resume continues the same
    # snapshot series in the same directory)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`EMA.state_dict`, after :meth:`flush` (a failed write raises here), with
        ``run_id``, ``updates`` (runs ``[first step, gap, count]``), ``snapshots``
        (``[global step, file]``, files written only) and ``snapshot_dir``."""
        self.flush()
        state = super().state_dict()
        state["run_id"] = self.run_id
        state["updates"] = [list(r) for r in self._updates]
        state["snapshots"] = [[s, f] for s, f in sorted(self._snapshots.items())]
        state["snapshot_dir"] = self.snapshot_dir
        return state

    def _posthoc_problems(self, state: dict[str, Any]) -> list[str]:
        run_id, runs, snaps = state.get("run_id"), state.get("updates"), state.get("snapshots")
        if not isinstance(run_id, str) or not isinstance(runs, list):
            return ["no run id or update list: state of an older PostHocEMA, which counted steps "
                    "from update_after; start a new run"]  # fmt: skip
        problems = []
        last = self.update_after
        for r in runs:
            ok = isinstance(r, (list, tuple)) and len(r) == 3 and all(is_int(x) for x in r)
            if not ok or r[1] < 1 or r[2] < 1 or r[0] <= last:
                problems.append(f"bad update list entry {r!r}")
                break
            last = r[0] + r[1] * (r[2] - 1)
        if runs and last != state.get("step"):
            problems.append(
                f"the update list ends at step {last}, the state at {state.get('step')}"
            )
        if not isinstance(snaps, list) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and is_int(x[0]) for x in snaps
        ):
            return [*problems, f"bad snapshot list {snaps!r}"]
        if snaps and self.snapshot_dir is None:
            problems.append("it has snapshots and this averager no snapshot_dir")
        elif snaps:
            missing = [
                f for _, f in snaps if not os.path.isfile(os.path.join(self.snapshot_dir, f))
            ]
            if missing:
                problems.append(f"snapshots {missing[:3]} are not in {self.snapshot_dir}")
        if self.snapshot_dir is not None:
            theirs = self._foreign[0] if self._foreign else self.run_id
            if theirs != run_id and (self._foreign or self._snapshots or self.pending_snapshots):
                problems.append(
                    f"snapshot_dir {self.snapshot_dir} holds the snapshots of run {theirs}, the "
                    f"state is of run {run_id}: resume with the snapshot_dir of that run"
                )
        return problems

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`EMA.load_state_dict`; the state must be of the run whose snapshots the
        directory holds (or the directory empty). Checks everything first."""
        problems = self._posthoc_problems(state) or self._state_problems(state)
        if problems:
            raise ValueError("cannot load averager state: " + "; ".join(problems))
        super().load_state_dict(state)
        self.run_id = state["run_id"]
        self._updates = [list(map(int, r)) for r in state["updates"]]
        self._snapshots = {int(s): str(f) for s, f in state["snapshots"]}
        if self.snapshot_dir is not None:
            self._claim()
