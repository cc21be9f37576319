"""The 0.1 module paths still import for one release, warn, and reach the same objects."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import emalora_fast
from emalora_fast._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_forwards_to_the_new_module(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert any(
        issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught
    ), [str(w.message) for w in caught]
    public = [n for n in dir(new) if not n.startswith("__")]
    assert public, new
    for name in public:
        assert getattr(mod, name) is getattr(new, name), name


def test_the_public_api_is_unchanged():
    from emalora_fast.averaging.ema import BEMA, EMA
    from emalora_fast.distill.loss import distillation_loss

    assert emalora_fast.EMA is EMA and emalora_fast.BEMA is BEMA
    assert emalora_fast.distillation_loss is distillation_loss
    for name in emalora_fast.__all__:
        assert getattr(emalora_fast, name) is not None, name


def test_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("emalora_fast.no_such_module")
