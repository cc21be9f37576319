"""Cheap, per-step checks on a model's structure and a fast eval-mode switch.

:func:`generation` counts the parameter and module registrations of the whole process (through
torch's global registration hooks): replacing a parameter anywhere in a model
(``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``) or a module
(``merge_and_unload``, ``add_adapter``) changes it, so an O(1) comparison on every step tells
when a full check of the model is due.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_count = 0
_hooks = None


def _bump(*_args) -> None:  # returns None: the registered object is kept as it is
    global _count
    _count += 1


def generation() -> int:
    """Number of parameter/module registrations seen since the hooks went in."""
    global _hooks
    if _hooks is None:
        from torch.nn.modules import module

        _hooks = (
            module.register_module_parameter_registration_hook(_bump),
            module.register_module_module_registration_hook(_bump),
        )
    return _count


class EvalMode:
    """Puts every module of a model in eval mode for a block and restores each one's mode.

    The module list is built once and again only when :func:`generation` moved, so entering the
    block costs a pass over a cached list (no walk of the module tree, no parameter scan).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._generation = -1
        self._modules: list[nn.Module] = []

    def _current(self) -> list[nn.Module]:
        gen = generation()
        if gen != self._generation:
            self._modules = list(self.model.modules())
            self._generation = gen
        return self._modules

    @contextmanager
    def __call__(self) -> Iterator[None]:
        training = [m for m in self._current() if m.training]
        # The attribute nn.Module.train() sets, written without nn.Module.__setattr__'s checks.
        for m in training:
            object.__setattr__(m, "training", False)
        try:
            yield
        finally:
            for m in training:
                object.__setattr__(m, "training", True)
