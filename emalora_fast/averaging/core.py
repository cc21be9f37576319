"""The machinery shared by the averagers (EMA, BEMA, PostHocEMA): parameter selection, flat
fp32 state per (device, dtype) group, one kernel launch per group and update, swaps, export.
See :mod:`emalora_fast.averaging.ema` for what is averaged and how.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from .. import _dispatch, _watch, distributed, reference
from .._checks import check_choice, check_int, check_param
from . import peft_utils
from .state import StateMixin, _Group
from .use import UseMixin


def _fingerprint(slots: list[tuple[dict, str]]) -> tuple:
    """Identity and storage of the parameters in the given (``module._parameters``, key) slots.

    Two dictionary look-ups and two ``data_ptr`` reads: cheap enough for every update, and it
    changes when the model moves (``model.to``) or FSDP2 swaps in unsharded parameters.
    """
    out = []
    for params, key in slots:
        p = params.get(key)
        out += [id(p), peft_utils.local_tensor(p).data_ptr() if p is not None else 0]
    return tuple(out)


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Per-tensor views of a flat [P] buffer, or [K, *shape] views of a [K, P] one."""
    sizes = [math.prod(s) for s in shapes]
    lead = tuple(flat.shape[:-1])
    return [v.view(*lead, *s) for v, s in zip(flat.split(sizes, dim=-1), shapes, strict=True)]


def _gone(name: str) -> RuntimeError:
    return RuntimeError(
        f"averaged parameter {name} is no longer in the model (merged into the base weights by "
        "merge_and_unload, or its adapter deleted?); create a new averager for the new model"
    )


class Averager(StateMixin, UseMixin):
    """Common machinery of :class:`~emalora_fast.EMA`, :class:`~emalora_fast.BEMA` and
    :class:`~emalora_fast.PostHocEMA`; not used directly."""

    _kind: str = ""
    _is_bema: bool = False
    _teacher_view: str = "ema"  # the state the teacher follows: "ema" or "out"
    _profiles: int = 1  # K, the number of EMA profiles
    teacher_profile: int = 0  # the EMA profile the teacher follows

    def __init__(
        self,
        model: nn.Module,
        *,
        update_after: int,
        update_every: int,
        param_filter: peft_utils.ParamFilter | None,
        adapter: str | None,
        teacher_adapter: str | None,
        backend: _dispatch.Backend,
    ) -> None:
        check_int("update_after", update_after, minimum=0)
        check_int("update_every", update_every, minimum=1)
        check_choice("backend", backend, _dispatch.BACKENDS)
        self.model = model = distributed.unwrap_model(model)
        self.update_after = update_after
        self.update_every = update_every
        self.backend = backend
        self.teacher_adapter = teacher_adapter
        self.step = 0
        self._anchored = update_after == 0
        self._swapping = False

        sel = peft_utils.select(model, param_filter, adapter)
        if not sel.params:
            raise ValueError(
                "no parameters to average: the model has no trainable tensors"
                + (f" in adapter {sel.adapter!r}" if sel.adapter else "")
                + "; pass param_filter= to choose others"
            )
        for name, p in sel.params:
            check_param(name, p, peft_utils.local_tensor(p))
        if sel.left_out and param_filter is None:
            warnings.warn(
                f"{len(sel.left_out)} trainable parameters are not averaged (e.g. "
                f"{sel.left_out[:2]}): they are not tensors of adapter {sel.adapter!r}; pass "
                "param_filter= to average them",
                stacklevel=3,
            )
        self._selection = sel
        self.adapter = sel.adapter
        self._names = [n for n, _ in sel.params]
        named = dict(sel.params)
        teachers: dict[str, nn.Parameter] = {}
        self._teacher_names: dict[str, str] = {}
        if teacher_adapter is not None:
            teachers, copies = peft_utils.add_teacher_adapter(model, sel, teacher_adapter)
            names = {id(p): n for n, p in model.named_parameters()}
            self._teacher_names = {n: names[id(t)] for n, t in teachers.items()}
            with torch.no_grad():  # adapter tensors that are not averaged: copied once
                for src, dst in copies:
                    peft_utils.local_tensor(dst).copy_(peft_utils.local_tensor(src))
        self._eval = _watch.EvalMode(model)
        self._fsdp = distributed.fsdp_modules(model)  # listed again on the slow paths
        with torch.no_grad():
            initial = {n: peft_utils.local_tensor(p).float() for n, p in sel.params}
            bad = [n for n, t in initial.items() if not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"parameters hold NaN/Inf values, cannot start an average: {bad[:3]}"
                )
            profiles = {n: t.expand(self._profiles, *t.shape) for n, t in initial.items()}
            self._groups = self._make_groups(named, teachers, profiles, initial, initial)
            for n, tp in teachers.items():
                peft_utils.local_tensor(tp).copy_(peft_utils.local_tensor(named[n]))
        self._generation = _watch.generation()

    # ----------------------------------------------------------------------------------------
    # Construction of groups and their backend state

    def _make_groups(
        self,
        params: dict[str, nn.Parameter],
        teachers: dict[str, nn.Parameter],
        ema: dict[str, torch.Tensor],
        theta0: dict[str, torch.Tensor] | None,
        out: dict[str, torch.Tensor] | None,
        flags: dict[str, torch.Tensor] | None = None,
    ) -> list[_Group]:
        """Group ``params`` by (device, dtype, teacher dtype); fill flat buffers from the dicts
        (``ema`` values are [K, *shape])."""
        keys: dict[tuple, list[str]] = {}
        for n in self._names:
            local = peft_utils.local_tensor(params[n])
            tdt = peft_utils.local_tensor(teachers[n]).dtype if teachers else None
            keys.setdefault((local.device, local.dtype, tdt), []).append(n)
        groups = []
        for (device, _, _), names in keys.items():
            shapes = [peft_utils.local_tensor(params[n]).shape for n in names]

            def flat(src: dict, lead: int = 0, names=names, device=device) -> torch.Tensor:
                """[P] from per-name values, or [K, P] from [K, *shape] ones (lead=1)."""
                parts = [src[n].to(device, torch.float32) for n in names]
                return torch.cat([t.reshape(*t.shape[:lead], -1) for t in parts], dim=-1)

            flag = torch.zeros(1, dtype=torch.int32, device=device)
            if flags is not None and any(bool(flags[n].any()) for n in names):
                flag.fill_(1)
            g = _Group(
                names=names,
                params=[params[n] for n in names],
                teachers=[teachers[n] for n in names] if teachers else None,
                ema=flat(ema, lead=1).contiguous(),
                theta0=flat(theta0) if self._is_bema else None,
                out=flat(out) if self._is_bema else None,
                flag=flag,
                backend=_dispatch.resolve(self.backend, device, "averager"),
            )
            g.views = {"ema": _split(g.ema, shapes)}
            if self._is_bema:
                g.views["theta0"] = _split(g.theta0, shapes)
                g.views["out"] = _split(g.out, shapes)
            self._prepare(g)
            groups.append(g)
        return groups

    def _prepare(self, g: _Group) -> None:
        """(Re)build what a launch needs from the group's current parameter storage."""
        g.locals = [peft_utils.local_tensor(p) for p in g.params]
        g.untracked = [peft_utils.untracked_local(p) for p in g.params]
        g.teacher_locals = [peft_utils.local_tensor(p) for p in g.teachers] if g.teachers else []
        g.backup = g.undo = None
        for i, (n, t) in enumerate(zip(g.names, g.locals, strict=True)):
            if not t.is_contiguous():
                raise ValueError(f"parameter {n} is not contiguous; the averager needs it to be")
            if g.teacher_locals and not g.teacher_locals[i].is_contiguous():
                raise ValueError(f"teacher twin of {n} is not contiguous")
            if g.teacher_locals and g.teacher_locals[i].shape != t.shape:
                raise ValueError(
                    f"teacher twin of {n} is stored as {tuple(g.teacher_locals[i].shape)}, the "
                    f"parameter as {tuple(t.shape)}: shard both alike (add the teacher adapter, "
                    "or create the averager, before fully_shard)"
                )
        g.plan = None
        if g.backend == "cpp":
            _register_cpp_fake()
        if g.backend == "triton":
            kernels = _dispatch.load_triton("averager")
            g.plan = kernels.AveragerPlan(g.locals, g.teacher_locals or None)
        names = [g.names[0], g.names[-1]]
        names += [self._teacher_names[n] for n in names if n in self._teacher_names]
        g.slots = []
        for name in names:
            owner, _, key = name.rpartition(".")
            g.slots.append((self.model.get_submodule(owner)._parameters, key))
        g.fingerprint = _fingerprint(g.slots)

    def refresh(self) -> None:
        """Re-read the model's parameters after their storage moved and rebuild the launch
        tables.

        :meth:`update` calls this itself when a parameter or module was registered anywhere in
        the model (a replaced parameter, ``load_state_dict(assign=True)``) or when the first or
        last parameter of a group moved (``model.to(...)``). Call it by hand after changing a
        parameter's storage in place in the middle of the model (``p.data = ...``, moving one
        submodule).
        """
        params = dict(self.model.named_parameters())
        for n in [*self._names, *self._teacher_names.values()]:
            if n not in params:
                raise _gone(n)
        teachers = {n: params[tn] for n, tn in self._teacher_names.items()}
        state = self._state_tensors(profiles_first=True)  # ema values are [K, *shape]
        for n in self._names:
            p = params[n]
            check_param(n, p, peft_utils.local_tensor(p))
            shape = state["ema"][n].shape[1:]
            if peft_utils.local_tensor(p).shape == shape:
                continue
            if distributed.is_dtensor(p) and p.shape == shape:
                # Created before fully_shard: keep this rank's part of the full state.
                state["ema"][n] = torch.stack(
                    [distributed.shard_like(x, p) for x in state["ema"][n]]
                )
                for key in ("theta0", "out"):
                    if key in state:
                        state[key][n] = distributed.shard_like(state[key][n], p)
                continue
            raise RuntimeError(f"parameter {n} changed shape; create a new averager")
        self._groups = self._make_groups(
            params, teachers, state["ema"], state.get("theta0"), state.get("out"), state["flag"]
        )
        self._generation = _watch.generation()
        self._fsdp = distributed.fsdp_modules(self.model)

    def _registered_changed(self) -> bool:
        """After some registration in the process: does every averaged name still resolve to
        the parameter and storage the tables were built for? Raises when one is gone."""
        for g in self._groups:
            for name, p, local in zip(g.names, g.params, g.locals, strict=True):
                owner, _, key = name.rpartition(".")
                try:
                    now = self.model.get_submodule(owner)._parameters.get(key)
                except AttributeError:
                    now = None
                if now is None:
                    raise _gone(name)
                if now is not p or peft_utils.local_tensor(now).data_ptr() != local.data_ptr():
                    return True
        return False

    def _stale(self) -> bool:
        return any(_fingerprint(g.slots) != g.fingerprint for g in self._groups)

    def _ensure_current(self) -> None:
        full = _watch.generation() != self._generation  # a registration: check every parameter
        if (full and self._registered_changed()) or self._stale():
            # FSDP2 registers unsharded copies of the parameters after a forward (the root
            # module until the backward ends): put the sharded ones back before concluding.
            self._fsdp = distributed.fsdp_modules(self.model)  # fully_shard may be new
            resharded = distributed.reshard_fsdp(self.model, self._fsdp)
            if not resharded or (full and self._registered_changed()) or self._stale():
                self.refresh()
        self._generation = _watch.generation()

    def _reshard(self) -> None:
        distributed.reshard_fsdp(self.model, self._fsdp)

    # ----------------------------------------------------------------------------------------
    # The update

    def _coefficients(self, t: int) -> tuple[list[float], float, bool] | None:
        """(weights, alpha, reset) of step t, or None when step t does nothing: per profile the
        weight w of theta in ``ema + w * (theta - ema)`` (EMA 1 - d, BEMA beta; a float64 host
        float the kernels round to fp32 once), BEMA's alpha, and whether to copy theta instead."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into the average: one launch per group.

        Args:
            step: the global optimizer step after which this is called: the number of optimizer
                steps taken (1 after the first). Steps must increase; when omitted, an internal
                counter counts the calls.
        """
        if step is None:
            t = self.step + 1
        else:
            check_int("step", step, minimum=1)
            t = int(step)
            if t <= self.step:
                raise ValueError(
                    f"step {t} does not follow the last update's step {self.step}: each optimizer "
                    "step is folded in once"
                )
        coeffs = self._coefficients(t)
        if coeffs is not None:
            self._ensure_current()
            if len(self._groups) == 1:
                self._launch(self._groups[0], *coeffs)
            else:
                self._launch_all_or_none(coeffs)
            if coeffs[2]:
                self._anchored = True
        self.step = t  # only once every launch went through: a failed update changes nothing
        self._after_update(t)

    def _after_update(self, t: int) -> None:
        """Called once step t is folded in (PostHocEMA takes its snapshots here)."""

    def _launch_all_or_none(self, coeffs: tuple) -> None:
        """Several groups: keep a copy of what the launches write, so that a launch failing in
        any group leaves every group as it was (the copy buffers are allocated once)."""
        for g in self._groups:
            bufs = g.state_buffers()
            if g.undo is None:
                g.undo = [torch.empty_like(b) for b in bufs]
            torch._foreach_copy_(g.undo, bufs)
        try:
            for g in self._groups:
                self._launch(g, *coeffs)
        except BaseException:
            for g in self._groups:
                torch._foreach_copy_(g.state_buffers(), g.undo)
            raise

    def _launch(
        self,
        g: _Group,
        weights: list[float],
        alpha: float,
        reset: bool,
    ) -> None:
        teacher_ema = self._is_bema and self._teacher_view == "ema"
        tp = self.teacher_profile
        if g.backend == "triton":
            _dispatch.load_triton("averager").averager_update(
                g.plan, g.ema, g.theta0, g.out, g.flag,
                weights, alpha, reset, teacher_ema, tp,
            )  # fmt: skip
        elif g.backend == "cpp":
            torch.ops.emalora_fast.averager_update(
                g.locals, g.teacher_locals, g.ema, g.theta0, g.out, g.flag,
                weights, alpha, reset, teacher_ema, tp,
            )  # fmt: skip
        else:
            reference.averager_update_(
                g.locals,
                g.views["ema"],
                g.views.get("theta0"),
                g.views.get("out"),
                g.teacher_locals or None,
                g.flag,
                weights,
                alpha,
                reset,
                teacher_from_ema=teacher_ema,
                teacher_profile=tp,
            )


@functools.cache
def _register_cpp_fake() -> None:
    """A fake (meta) implementation of the C++ op, so that torch.compile can trace an update."""
    _dispatch.load_cpp()

    @torch.library.register_fake("emalora_fast::averager_update")
    def _(params, teachers, ema, theta0, out, flag, weights, alpha, reset, teacher_ema, tp):
        return None
