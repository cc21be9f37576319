"""EMA and BEMA weight averaging of the LoRA tensors of a model, one kernel launch per update.

The averaged tensors ("shadows") are fp32 and live in one flat buffer per group of parameters
sharing (device, dtype); a normal peft model has one group, so :meth:`update` is one launch of the
fused kernel (Triton on CUDA, the C++ op on CPU). Step-dependent scalars are Python floats computed
on the host: an update allocates nothing and never synchronizes with the device.

Note: these average the LoRA *factors* A and B, as every weight-averaging tool in use does; the
product of averaged factors is not the average of the products (EMA(B)·EMA(A) != EMA(B·A)).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _dispatch, peft_utils, reference
from .integrations import distributed
from .schedules import BemaSchedule, bema_coefficients, ema_decay

__all__ = ["EMA", "BEMA"]

_STATE_FORMAT = 1


@dataclass
class _Group:
    """Parameters sharing (device, dtype, teacher dtype), with flat fp32 state buffers."""

    names: list[str]
    params: list[nn.Parameter]
    teachers: list[nn.Parameter] | None
    ema: torch.Tensor  # [P] fp32
    theta0: torch.Tensor | None  # [P] fp32, BEMA only
    out: torch.Tensor | None  # [P] fp32, BEMA only
    flag: torch.Tensor  # [1] int32, 1 once a non-finite theta was seen
    backend: str
    # Derived, rebuilt by _prepare(): per-tensor views and the backend's launch arguments.
    locals: list[torch.Tensor] = field(default_factory=list)
    teacher_locals: list[torch.Tensor] = field(default_factory=list)
    views: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    plan: Any = None
    slots: list[tuple[dict, str]] = field(default_factory=list)  # first and last parameter
    fingerprint: tuple = ()

    @property
    def averaged(self) -> torch.Tensor:
        return self.out if self.out is not None else self.ema


def _fingerprint(slots: list[tuple[dict, str]]) -> tuple:
    """Identity and storage of the parameters in the given (``module._parameters``, key) slots.

    Two dictionary look-ups and two ``data_ptr`` reads: cheap enough for every update, and it
    changes when the model moves (``model.to``) or its parameters are replaced
    (``load_state_dict(assign=True)``).
    """
    out = []
    for params, key in slots:
        p = params.get(key)
        out += [id(p), peft_utils.local_tensor(p).data_ptr() if p is not None else 0]
    return tuple(out)


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [v.view(s) for v, s in zip(flat.split(sizes), shapes, strict=True)]


class _Averager:
    """Common machinery of :class:`EMA` and :class:`BEMA`; not used directly."""

    _kind: str = ""
    _is_bema: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        update_after: int,
        update_every: int,
        param_filter: peft_utils.ParamFilter | None,
        teacher_adapter: str | None,
        backend: _dispatch.Backend,
    ) -> None:
        _check_int("update_after", update_after, minimum=0)
        _check_int("update_every", update_every, minimum=1)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.model = model = distributed.unwrap_model(model)
        self.update_after = update_after
        self.update_every = update_every
        self.backend = backend
        self.teacher_adapter = teacher_adapter
        self._param_filter = param_filter
        self.step = 0
        self._anchored = update_after == 0

        named = peft_utils.select_parameters(model, param_filter)
        if not named:
            raise ValueError(
                "no parameters to average: the model has no trainable LoRA tensors "
                "(names holding 'lora_A'/'lora_B' with requires_grad=True); "
                "pass param_filter= to choose others"
            )
        for name, p in named:
            _check_param(name, p)
        self._names = [n for n, _ in named]
        self._live_adapter = None
        teachers: dict[str, nn.Parameter] = {}
        if teacher_adapter is not None:
            if not peft_utils.is_peft_model(model):
                raise TypeError("teacher_adapter needs a peft model (PeftModel) to add it to")
            self._live_adapter = peft_utils.live_adapter_of(self._names)
            teachers = peft_utils.add_teacher_adapter(model, self._names, teacher_adapter)
        with torch.no_grad():
            initial = {n: peft_utils.local_tensor(p).float() for n, p in named}
            bad = [n for n, t in initial.items() if not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"parameters hold NaN/Inf values, cannot start an average: {bad[:3]}"
                )
            self._groups = self._make_groups(dict(named), teachers, initial, initial, initial)
            if teachers:
                for n, tp in teachers.items():
                    peft_utils.local_tensor(tp).copy_(peft_utils.local_tensor(dict(named)[n]))

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
        """Group ``params`` by (device, dtype, teacher dtype); fill flat buffers from the dicts."""
        keys: dict[tuple, list[str]] = {}
        for n in self._names:
            local = peft_utils.local_tensor(params[n])
            tdt = peft_utils.local_tensor(teachers[n]).dtype if teachers else None
            keys.setdefault((local.device, local.dtype, tdt), []).append(n)
        groups = []
        for (device, _, _), names in keys.items():
            shapes = [peft_utils.local_tensor(params[n]).shape for n in names]

            def flat(src: dict[str, torch.Tensor], names=names, device=device) -> torch.Tensor:
                return torch.cat([src[n].reshape(-1).to(device, torch.float32) for n in names])

            flag = torch.zeros(1, dtype=torch.int32, device=device)
            if flags is not None and any(bool(flags[n].any()) for n in names):
                flag.fill_(1)
            g = _Group(
                names=names,
                params=[params[n] for n in names],
                teachers=[teachers[n] for n in names] if teachers else None,
                ema=flat(ema),
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
        g.teacher_locals = [peft_utils.local_tensor(p) for p in g.teachers] if g.teachers else []
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
        g.slots = []
        names = [g.names[0], g.names[-1]]
        if g.teachers and self.teacher_adapter is not None:
            names += [
                peft_utils.teacher_name_for(n, self._live_adapter, self.teacher_adapter)
                for n in names
            ]
        for name in names:
            owner, _, key = name.rpartition(".")
            g.slots.append((self.model.get_submodule(owner)._parameters, key))
        g.fingerprint = _fingerprint(g.slots)

    def refresh(self) -> None:
        """Re-read the model's parameters after their storage moved (``model.to(...)``,
        ``load_state_dict(assign=True)``, replaced parameters) and rebuild the launch tables.

        :meth:`update` calls this itself when the first or last parameter of a group changed
        identity or storage, which covers moves of the whole model; call it by hand after
        replacing individual parameters in the middle of the model.
        """
        params = dict(self.model.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise RuntimeError(f"the model no longer has averaged parameters {missing[:3]}...")
        teachers = {}
        if self.teacher_adapter is not None:
            teachers = {
                n: params[peft_utils.teacher_name_for(n, self._live_adapter, self.teacher_adapter)]
                for n in self._names
            }
        state = self._state_tensors()
        for n in self._names:
            p = params[n]
            _check_param(n, p)
            if peft_utils.local_tensor(p).shape == state["ema"][n].shape:
                continue
            if distributed.is_dtensor(p) and p.shape == state["ema"][n].shape:
                # Created before fully_shard: keep this rank's part of the full state.
                for key in ("ema", "theta0", "out"):
                    if key in state:
                        state[key][n] = distributed.shard_like(state[key][n], p)
                continue
            raise RuntimeError(f"parameter {n} changed shape; create a new averager")
        self._groups = self._make_groups(
            params, teachers, state["ema"], state.get("theta0"), state.get("out"), state["flag"]
        )

    def _stale(self) -> bool:
        return any(_fingerprint(g.slots) != g.fingerprint for g in self._groups)

    def _ensure_current(self) -> None:
        if self._stale():
            # FSDP2 registers unsharded copies of the parameters after a forward (the root
            # module until the backward ends): put the sharded ones back before concluding.
            if not distributed.reshard_fsdp(self.model) or self._stale():
                self.refresh()

    # ----------------------------------------------------------------------------------------
    # The update

    def _coefficients(self, t: int) -> tuple[float, float, float, bool] | None:
        """(c_ema, c_theta, alpha, reset) of step t, or None when step t does nothing."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into the average: one launch per group.

        Args:
            step: the global optimizer step after which this is called (1 after the first
                step). When omitted, an internal counter counts the calls.
        """
        if step is None:
            t = self.step + 1
        else:
            _check_int("step", step, minimum=0)
            t = int(step)
            if t < self.step or (t == self.step and t > 0):
                raise ValueError(
                    f"step {t} does not follow the last update's step {self.step}: each optimizer "
                    "step is folded in once"
                )
        coeffs = self._coefficients(t)
        if coeffs is not None:
            self._ensure_current()
            c_ema, c_theta, alpha, reset = coeffs
            for g in self._groups:
                self._launch(g, c_ema, c_theta, alpha, reset)
            if reset:
                self._anchored = True
        self.step = t  # only once every launch went through: a failed update changes nothing

    def _launch(self, g: _Group, c_ema: float, c_theta: float, alpha: float, reset: bool) -> None:
        if g.backend == "triton":
            _dispatch.load_triton("averager").averager_update(
                g.plan, g.ema, g.theta0, g.out, g.flag, c_ema, c_theta, alpha, reset
            )
        elif g.backend == "cpp":
            torch.ops.emalora_fast.averager_update(
                g.locals, g.teacher_locals, g.ema, g.theta0, g.out, g.flag,
                c_ema, c_theta, alpha, reset,
            )  # fmt: skip
        else:
            reference.averager_update_(
                g.locals,
                g.views["ema"],
                g.views.get("theta0"),
                g.views.get("out"),
                g.teacher_locals or None,
                g.flag,
                c_ema,
                c_theta,
                alpha,
                reset,
            )

    # ----------------------------------------------------------------------------------------
    # Reading and using the average

    @property
    def parameter_names(self) -> list[str]:
        """Names (the model's own) of the averaged parameters, in update order."""
        return list(self._names)

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

    def _iter_averaged(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        for g in self._groups:
            views = g.views["out" if self._is_bema else "ema"]
            yield from zip(g.names, g.params, views, strict=True)

    def averaged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{parameter name: averaged tensor}`` with the model's names.

        Args:
            dtype: dtype of the returned tensors; default the parameter's own dtype (the fp32
                shadow itself is returned as a copy when ``dtype=torch.float32``).
        Under FSDP2 the tensors are DTensors placed like the parameters.
        """
        self._ensure_current()
        result = {}
        for name, p, avg in self._iter_averaged():
            t = avg.to(dtype or p.dtype, copy=True)
            if distributed.is_dtensor(p):
                from torch.distributed.tensor import DTensor

                t = DTensor.from_local(
                    t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
            result[name] = t
        return result

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model``'s parameters of the same names (default:
        the averaged model itself)."""
        model = None if model is None else distributed.unwrap_model(model)
        if model is None or model is self.model:
            self._ensure_current()
            for g in self._groups:
                torch._foreach_copy_(g.locals, g.views["out" if self._is_bema else "ema"])
            distributed.reshard_fsdp(self.model)  # FSDP2: the next forward gathers the shards
            return
        params = dict(model.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ValueError(f"model has no parameters named {missing[:3]}")
        for name, _, avg in self._iter_averaged():
            peft_utils.local_tensor(params[name]).copy_(avg)
        distributed.reshard_fsdp(model)

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Run the body with the averaged weights in the model; the live weights come back
        afterwards, bit for bit, also when the body raises. Under FSDP2 each rank swaps its
        shards, and forwards in the body gather the averaged weights."""
        self._ensure_current()
        with torch.no_grad():
            backups = [[t.clone() for t in g.locals] for g in self._groups]
            self.copy_to()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for g, b in zip(self._groups, backups, strict=True):
                    torch._foreach_copy_(g.locals, b)
            distributed.reshard_fsdp(self.model)  # FSDP2: drop copies gathered in the body

    @contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """Run the body with the frozen teacher adapter active (holding the averaged weights);
        the active adapter and every ``requires_grad`` flag are restored afterwards."""
        if self.teacher_adapter is None:
            raise RuntimeError("this averager was created without teacher_adapter=...")
        with peft_utils.adapter_active(self.model, self.teacher_adapter) as m:
            yield m

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the averaged weights: a peft adapter (``adapter_model.safetensors`` and
        ``adapter_config.json``, loadable with ``PeftModel.from_pretrained``) for a peft model,
        else ``averaged.safetensors`` with :meth:`averaged_state_dict`.

        Under FSDP2 call it on every rank: they all take part in one gather of the averaged
        tensors (the only communication of the averager), rank 0 writes, and every rank returns
        once the files are written. Otherwise (DDP included) it writes where it is called.
        """
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        if peft_utils.is_peft_model(self.model):
            adapter = self._live_adapter or peft_utils.live_adapter_of(self._names)
            with self.swapped():
                peft_utils.save_adapter(self.model, save_directory, adapter, **kwargs)
            return
        from safetensors.torch import save_file

        path = os.path.join(save_directory, "averaged.safetensors")
        tensors = self.averaged_state_dict()
        if not any(distributed.is_dtensor(t) for t in tensors.values()):
            save_file({n: t.contiguous() for n, t in tensors.items()}, path)
            return
        tensors = distributed.full_tensors(tensors)  # FSDP2: every rank gathers, rank 0 writes
        if distributed.is_main_process():
            save_file({n: t.contiguous() for n, t in tensors.items()}, path)
        distributed.barrier()

    # ----------------------------------------------------------------------------------------
    # State

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define the average (compared on :meth:`load_state_dict`)."""
        return {"update_after": self.update_after, "update_every": self.update_every}

    def _state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        state: dict[str, dict[str, torch.Tensor]] = {"ema": {}, "flag": {}}
        if self._is_bema:
            state["theta0"], state["out"] = {}, {}
        for g in self._groups:
            for key, views in g.views.items():
                for n, v in zip(g.names, views, strict=True):
                    state[key][n] = v
            for n in g.names:
                state["flag"][n] = g.flag
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically (tensors are copies)."""
        tensors = self._state_tensors()
        return {
            "format": _STATE_FORMAT,
            "kind": self._kind,
            "hyperparameters": self.hyperparameters(),
            "step": self.step,
            "anchored": self._anchored,
            "names": list(self._names),
            **{
                key: {n: t.detach().clone() for n, t in d.items()}
                for key, d in tensors.items()
                if key != "flag"
            },
            "nonfinite": any(bool(g.flag.any()) for g in self._groups),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing on error."""
        problems = []
        if state.get("format") != _STATE_FORMAT:
            problems.append(f"unknown state format {state.get('format')!r}")
        if state.get("kind") != self._kind:
            problems.append(f"state is of a {state.get('kind')!r} averager, this is {self._kind!r}")
        theirs = state.get("hyperparameters", {})
        ours = self.hyperparameters()
        for k in sorted(set(theirs) | set(ours)):
            if theirs.get(k) != ours.get(k):
                problems.append(f"{k} is {theirs.get(k)!r} in the state, {ours.get(k)!r} here")
        if list(state.get("names", [])) != self._names:
            theirs_n, ours_n = set(state.get("names", [])), set(self._names)
            problems.append(
                f"parameter names differ: {len(theirs_n - ours_n)} only in the state "
                f"(e.g. {sorted(theirs_n - ours_n)[:2]}), {len(ours_n - theirs_n)} only in the "
                f"model (e.g. {sorted(ours_n - theirs_n)[:2]})"
                if theirs_n != ours_n
                else "parameter order differs"
            )
        current = self._state_tensors()
        keys = ["ema", "theta0", "out"] if self._is_bema else ["ema"]
        if not problems:
            for key in keys:
                src = state.get(key)
                if not isinstance(src, dict):
                    problems.append(f"state has no {key!r} tensors")
                    continue
                for n in self._names:
                    t = src.get(n)
                    if (
                        not isinstance(t, torch.Tensor)
                        or t.shape != current[key][n].shape
                        or not t.is_floating_point()
                    ):
                        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                        problems.append(
                            f"{key}[{n}]: expected a floating tensor of shape "
                            f"{tuple(current[key][n].shape)}, got {got}"
                        )
                        break
        if not _is_int(state.get("step")) or state["step"] < 0:
            problems.append(f"bad step {state.get('step')!r}")
        if not isinstance(state.get("anchored"), bool):
            problems.append(f"bad 'anchored' flag {state.get('anchored')!r}")
        if problems:
            raise ValueError("cannot load averager state: " + "; ".join(problems))
        for key in keys:
            for n in self._names:
                current[key][n].copy_(state[key][n])
        for g in self._groups:
            g.flag.fill_(int(bool(state.get("nonfinite", False))))
        self.step = int(state["step"])
        self._anchored = bool(state["anchored"])
        if self.teacher_adapter is not None:
            for g in self._groups:
                torch._foreach_copy_(g.teacher_locals, g.views["out" if self._is_bema else "ema"])

    def __repr__(self) -> str:
        n = sum(g.ema.numel() for g in self._groups)
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        backends = sorted({g.backend for g in self._groups})
        return (
            f"{type(self).__name__}({len(self._names)} tensors, {n:,} elements, "
            f"{len(self._groups)} group(s), backend={'/'.join(backends)}, step={self.step}, {hp})"
        )


class EMA(_Averager):
    """Exponential moving average of the LoRA tensors: ``shadow <- d*shadow + (1 - d)*theta``.

    With ``s = t - update_after`` for global step t: for ``s <= 0`` the shadow copies theta; then
    it updates when ``s % update_every == 0`` with ``d = decay``, or with warmup
    ``d = clip(1 - (1 + s/warmup_gamma) ** -warmup_power, min_decay, decay)`` (timm, ema-pytorch).

    Args:
        model: a ``PeftModel`` or any module; a DDP, DataParallel, FSDP1, DeepSpeed or
            ``torch.compile`` wrapper is unwrapped (names are the inner module's).
        decay: the decay, in (0, 1).
        update_after: steps during which the shadow copies the weights.
        update_every: update every this many steps.
        warmup: use the warmup rule above.
        warmup_gamma: warmup's gamma (> 0).
        warmup_power: warmup's power (> 0).
        min_decay: lower clip of the warmup decay, in [0, decay].
        param_filter: ``(name, param) -> bool``; default: trainable LoRA factors.
        teacher_adapter: name of a frozen peft adapter to create and keep equal to the average.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Non-finite weights: elements whose weight is NaN/Inf keep their average and set a device
    flag (:meth:`nonfinite_detected`), like apex's noop flag; the shadow is never poisoned.
    """

    _kind = "ema"

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        update_after: int = 0,
        update_every: int = 1,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        param_filter: peft_utils.ParamFilter | None = None,
        teacher_adapter: str | None = None,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        _check_float("decay", decay, low=0.0, high=1.0, open_low=True, open_high=True)
        _check_float("warmup_gamma", warmup_gamma, low=0.0, open_low=True)
        _check_float("warmup_power", warmup_power, low=0.0, open_low=True)
        _check_float("min_decay", min_decay, low=0.0, high=decay)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.min_decay = float(min_decay)
        super().__init__(
            model,
            update_after=update_after,
            update_every=update_every,
            param_filter=param_filter,
            teacher_adapter=teacher_adapter,
            backend=backend,
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "min_decay": self.min_decay,
        }

    def current_decay(self, step: int | None = None) -> float:
        """The decay d used at ``step`` (default: the last step)."""
        s = (self.step if step is None else step) - self.update_after
        return ema_decay(
            s,
            self.decay,
            warmup=self.warmup,
            warmup_gamma=self.warmup_gamma,
            warmup_power=self.warmup_power,
            min_decay=self.min_decay,
        )

    def _coefficients(self, t: int) -> tuple[float, float, float, bool] | None:
        s = t - self.update_after
        if s <= 0:
            return 1.0, 0.0, 0.0, True
        if s % self.update_every:
            return None
        d = self.current_decay(t)
        return d, 1.0 - d, 0.0, False


class BEMA(_Averager):
    """Bias-corrected EMA (arXiv 2508.00180) of the LoRA tensors.

    At global step t (TRL's BEMACallback schedule, ``schedule="trl"``)::

        beta_t  = max((lag + multiplier*t) ** -ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier*t) ** -bias_power
        ema    <- (1 - beta_t) * ema + beta_t * theta_t
        bema    = ema + alpha_t * (theta_t - theta_0)

    At ``t == update_after`` (the first update at or after it), theta_0 and ema are reset to
    theta_t; afterwards it updates when ``(t - update_after) % update_every == 0``. With
    ``update_after=0`` the weights at construction are theta_0. ``schedule="paper"`` uses the
    paper's offline code instead: ``t_e = max(t - update_after + lag, 1)``,
    ``beta = max((1 + multiplier*t_e) ** -ema_power, min_ema_multiplier)``,
    ``alpha = (1 + t_e) ** -bias_power``. The averaged weights are ``bema``.

    Args:
        model: a ``PeftModel`` or any module; a DDP, DataParallel, FSDP1, DeepSpeed or
            ``torch.compile`` wrapper is unwrapped (names are the inner module's).
        ema_power: kappa (>= 0).
        bias_power: eta (>= 0; 0 keeps alpha at 1).
        lag: rho (> 0).
        multiplier: gamma (> 0).
        update_after: tau, burn-in steps before theta_0 is taken.
        update_every: phi; TRL and the paper use 400 because their update is slow, ours is not.
        min_ema_multiplier: lower bound of beta, in [0, 1].
        schedule: ``"trl"`` or ``"paper"``.
        param_filter, teacher_adapter, backend: as for :class:`EMA`.
    """

    _kind = "bema"
    _is_bema = True

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_after: int = 0,
        update_every: int = 1,
        min_ema_multiplier: float = 0.0,
        schedule: BemaSchedule = "trl",
        param_filter: peft_utils.ParamFilter | None = None,
        teacher_adapter: str | None = None,
        backend: _dispatch.Backend = "auto",
    ) -> None:
        _check_float("ema_power", ema_power, low=0.0)
        _check_float("bias_power", bias_power, low=0.0)
        _check_float("lag", lag, low=0.0, open_low=True)
        _check_float("multiplier", multiplier, low=0.0, open_low=True)
        _check_float("min_ema_multiplier", min_ema_multiplier, low=0.0, high=1.0)
        if schedule not in ("trl", "paper"):
            raise ValueError(f"schedule must be 'trl' or 'paper', got {schedule!r}")
        self.ema_power = float(ema_power)
        self.bias_power = float(bias_power)
        self.lag = float(lag)
        self.multiplier = float(multiplier)
        self.min_ema_multiplier = float(min_ema_multiplier)
        self.schedule = schedule
        super().__init__(
            model,
            update_after=update_after,
            update_every=update_every,
            param_filter=param_filter,
            teacher_adapter=teacher_adapter,
            backend=backend,
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "ema_power": self.ema_power,
            "bias_power": self.bias_power,
            "lag": self.lag,
            "multiplier": self.multiplier,
            "min_ema_multiplier": self.min_ema_multiplier,
            "schedule": self.schedule,
        }

    def coefficients(self, step: int) -> tuple[float, float]:
        """(beta_t, alpha_t) at global step ``step``."""
        return bema_coefficients(
            step,
            ema_power=self.ema_power,
            bias_power=self.bias_power,
            lag=self.lag,
            multiplier=self.multiplier,
            min_ema_multiplier=self.min_ema_multiplier,
            update_after=self.update_after,
            schedule=self.schedule,
        )

    def _coefficients(self, t: int) -> tuple[float, float, float, bool] | None:
        if t < self.update_after:
            return None
        if not self._anchored:
            return 1.0, 0.0, 0.0, True
        if (t - self.update_after) % self.update_every:
            return None
        beta, alpha = self.coefficients(t)
        return 1.0 - beta, beta, alpha, False


@functools.cache
def _register_cpp_fake() -> None:
    """A fake (meta) implementation of the C++ op, so that torch.compile can trace an update."""
    _dispatch.load_cpp()

    @torch.library.register_fake("emalora_fast::averager_update")
    def _(params, teachers, ema, theta0, out, flag, c_ema, c_theta, alpha, reset):
        return None


# --------------------------------------------------------------------------------------------
# Argument checks: one clear line that names the problem.


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


def _check_param(name: str, p: torch.Tensor) -> None:
    if not p.is_floating_point():
        raise TypeError(f"parameter {name} has dtype {p.dtype}; only floating tensors average")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"parameter {name} has unsupported dtype {p.dtype}")
    if not peft_utils.local_tensor(p).is_contiguous():
        raise ValueError(f"parameter {name} is not contiguous; the averager needs it to be")
