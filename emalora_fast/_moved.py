"""Module paths of the flat 0.1 layout, still importable (with a DeprecationWarning) in 0.2.

0.2 split the package into parts (``averaging``, ``distill``, ``integrations``,
``experiments``). ``import emalora_fast.averager`` and ``from emalora_fast.loss import ...`` keep
working for this release: a finder on ``sys.meta_path`` answers the old names with a module
that forwards every attribute to the new one and warns once at import. Removed in 0.3; the table
is also in CHANGELOG.md. Everything ``emalora_fast`` itself exports is unaffected.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "emalora_fast.averager": "emalora_fast.averaging.ema",
    "emalora_fast._averager_core": "emalora_fast.averaging.core",
    "emalora_fast._averager_state": "emalora_fast.averaging.state",
    "emalora_fast.posthoc": "emalora_fast.averaging.posthoc",
    "emalora_fast.posthoc_math": "emalora_fast.averaging.posthoc_math",
    "emalora_fast._posthoc_io": "emalora_fast.averaging.posthoc_io",
    "emalora_fast.schedules": "emalora_fast.averaging.schedules",
    "emalora_fast.peft_utils": "emalora_fast.averaging.peft_utils",
    "emalora_fast.loss": "emalora_fast.distill.loss",
    "emalora_fast.fused_linear": "emalora_fast.distill.fused_linear",
    "emalora_fast.self_distill": "emalora_fast.distill.self_distill",
    "emalora_fast.integrations.distributed": "emalora_fast.distributed",
    "emalora_fast.experiment": "emalora_fast.experiments.main_job",
    "emalora_fast.runs": "emalora_fast.experiments.runs",
    "emalora_fast.study": "emalora_fast.experiments.study",
    "emalora_fast.study_report": "emalora_fast.experiments.report",
    "emalora_fast.study_plots": "emalora_fast.experiments.plots",
    "emalora_fast.stats": "emalora_fast.experiments.stats",
    "emalora_fast.data": "emalora_fast.experiments.data",
}


class _Forward(types.ModuleType):
    """Stands under an old name; reads (and writes) go to the module at the new name."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, target.__doc__)
        object.__setattr__(self, "_target", target)

    def __getattr__(self, attr: str):
        return getattr(object.__getattribute__(self, "_target"), attr)

    def __setattr__(self, attr: str, value) -> None:
        if attr.startswith("__") and attr.endswith("__"):  # the import system's own attributes
            object.__setattr__(self, attr, value)
        else:
            setattr(object.__getattribute__(self, "_target"), attr, value)

    def __dir__(self) -> list[str]:
        return dir(object.__getattribute__(self, "_target"))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in emalora-fast 0.2; the old path goes in 0.3 (the "
            "public API, `from emalora_fast import ...`, is unchanged)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _Forward(spec.name, importlib.import_module(new))

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
