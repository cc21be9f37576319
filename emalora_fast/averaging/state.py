"""An averager's state: the flat fp32 buffers of each parameter group, and their save and
restore (:meth:`state_dict` / :meth:`load_state_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import is_int

STATE_FORMAT = 1


@dataclass
class _Group:
    """Parameters sharing (device, dtype, teacher dtype), with flat fp32 state buffers."""

    names: list[str]
    params: list[nn.Parameter]
    teachers: list[nn.Parameter] | None
    ema: torch.Tensor  # [K, P] fp32: K EMA profiles (BEMA: K = 1)
    theta0: torch.Tensor | None  # [P] fp32, BEMA only
    out: torch.Tensor | None  # [P] fp32, BEMA only
    flag: torch.Tensor  # [1] int32, 1 once a non-finite theta was seen
    backend: str
    # Derived, rebuilt by _prepare(): per-tensor views and the backend's launch arguments.
    locals: list[torch.Tensor] = field(default_factory=list)
    untracked: list[torch.Tensor] = field(default_factory=list)  # the same, via .data
    teacher_locals: list[torch.Tensor] = field(default_factory=list)
    views: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    plan: Any = None
    slots: list[tuple[dict, str]] = field(default_factory=list)  # first and last parameter
    fingerprint: tuple = ()
    # Allocated on first use, then reused: the live values during a swap, the state during a
    # multi-group update.
    backup: list[torch.Tensor] | None = None
    undo: list[torch.Tensor] | None = None

    def state_buffers(self) -> list[torch.Tensor]:
        """Every tensor an update writes."""
        extra = [self.theta0, self.out] if self.theta0 is not None else []
        return [self.ema, *extra, self.flag, *self.teacher_locals]


class StateMixin:
    """The state half of the averagers; expects ``_groups``, ``_names``, ``_kind``, ``_is_bema``,
    ``step``, ``_anchored``, ``_teacher_view`` and ``update_after``/``update_every``."""

    # The attributes that define the average; a subclass extends the tuple with its own.
    _hyperparameters: tuple[str, ...] = ("update_after", "update_every")

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define the average (compared on :meth:`load_state_dict`)."""
        return {name: getattr(self, name) for name in self._hyperparameters}

    def _state_tensors(self, profiles_first: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Views of the state by key and parameter name. ``ema`` views are [K, *shape] with
        several profiles (or ``profiles_first``), else the parameter's shape."""
        state: dict[str, dict[str, torch.Tensor]] = {"ema": {}, "flag": {}}
        if self._is_bema:
            state["theta0"], state["out"] = {}, {}
        squeeze = self._profiles == 1 and not profiles_first
        for g in self._groups:
            for key, views in g.views.items():
                for n, v in zip(g.names, views, strict=True):
                    state[key][n] = v[0] if key == "ema" and squeeze else v
            for n in g.names:
                state["flag"][n] = g.flag
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically (tensors are copies)."""
        tensors = self._state_tensors()
        return {
            "format": STATE_FORMAT,
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

    def _state_problems(self, state: dict[str, Any]) -> list[str]:
        problems = []
        if state.get("format") != STATE_FORMAT:
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
        if not is_int(state.get("step")) or state["step"] < 0:
            problems.append(f"bad step {state.get('step')!r}")
        if not isinstance(state.get("anchored"), bool):
            problems.append(f"bad 'anchored' flag {state.get('anchored')!r}")
        if problems:
            return problems
        current = self._state_tensors()
        for key in self._state_keys():
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
                if not bool(torch.isfinite(t).all()):
                    problems.append(f"{key}[{n}] holds NaN/Inf values")
                    break
        return problems

    def _state_keys(self) -> list[str]:
        return ["ema", "theta0", "out"] if self._is_bema else ["ema"]

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing on error."""
        problems = self._state_problems(state)
        if problems:
            raise ValueError("cannot load averager state: " + "; ".join(problems))
        current = self._state_tensors()
        for key in self._state_keys():
            for n in self._names:
                current[key][n].copy_(state[key][n])
        for g in self._groups:
            g.flag.fill_(int(bool(state.get("nonfinite", False))))
        self.step = int(state["step"])
        self._anchored = bool(state["anchored"])
        for g in self._groups:
            if g.teacher_locals:
                torch._foreach_copy_(g.teacher_locals, self._teacher_views(g))
