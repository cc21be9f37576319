"""Float hyperparameters of EMA, BEMA and PostHocEMA take any real scalar (Python, NumPy, a 0-d
tensor) and reject the rest with a message that names what was given."""

from __future__ import annotations

import fractions
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from emalora_fast import BEMA, EMA, PostHocEMA

ALL = lambda name, p: True  # noqa: E731


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))


# (class, keyword, a valid value, the attribute it is stored in)
FLOATS = [
    (EMA, "decay", 0.99, "decay"),
    (EMA, "warmup_gamma", 2.5, "warmup_gamma"),
    (EMA, "warmup_power", 0.75, "warmup_power"),
    (EMA, "min_decay", 0.25, "min_decay"),
    (BEMA, "ema_power", 0.7, "ema_power"),
    (BEMA, "bias_power", 0.3, "bias_power"),
    (BEMA, "lag", 4.5, "lag"),
    (BEMA, "multiplier", 0.5, "multiplier"),
    (BEMA, "min_ema_multiplier", 0.125, "min_ema_multiplier"),
]
SCALARS = {
    "np.float32": np.float32,
    "np.float64": np.float64,
    "np.ndarray 0-d": lambda x: np.array(x),
    "tensor 0-d fp32": lambda x: torch.tensor(x),
    "tensor 0-d fp64": lambda x: torch.tensor(x, dtype=torch.float64),
    "Fraction": lambda x: fractions.Fraction(x).limit_denominator(1000),
}


@pytest.mark.parametrize("cls, key, value, attr", FLOATS)
@pytest.mark.parametrize("kind", list(SCALARS))
def test_real_scalars_are_accepted(cls, key, value, attr, kind):
    given = SCALARS[kind](value)
    avg = cls(One(), param_filter=ALL, backend="torch", **{key: given})
    stored = getattr(avg, attr)
    assert type(stored) is float and stored == float(given)
    avg.update()
    avg.update()
    assert torch.isfinite(avg.averaged_state_dict()["w"]).all()


@pytest.mark.parametrize("kind", list(SCALARS))
def test_real_scalar_decays_and_sigma_rels(kind):
    make = SCALARS[kind]
    ema = EMA(One(), (make(0.9), make(0.99)), param_filter=ALL, teacher_profile=make(0.99))
    assert ema.decays == (float(make(0.9)), float(make(0.99)))
    assert ema.teacher_profile == 1
    assert EMA(One(), np.float32(0.99), param_filter=ALL).decay == float(np.float32(0.99))
    if kind == "np.ndarray 0-d":
        return  # PostHocEMA compares its widths as a set before checking them: not hashable
    posthoc = PostHocEMA(One(), (make(0.05), make(0.25)), param_filter=ALL)
    assert posthoc.sigma_rels == (float(make(0.05)), float(make(0.25)))
    assert all(type(s) is float for s in posthoc.sigma_rels)


BAD = {
    "bool": (True, "True (bool)"),
    "np.bool_": (np.bool_(True), "True_ (bool)"),
    "str": ("0.5", "'0.5' (str)"),
    "multi-element tensor": (torch.tensor([0.5, 0.6]), "tensor of shape (2,)"),
    "one-element 1-d tensor": (torch.tensor([0.5]), "tensor of shape (1,)"),
    "bool tensor": (torch.tensor(True), "torch.bool tensor"),
    "complex": (0.5 + 0j, "(complex)"),
    "nan": (math.nan, "got nan"),
    "np.float32 nan": (np.float32("nan"), "nan"),
    "nan tensor": (torch.tensor(math.nan), "holding nan"),
    "None": (None, "None (NoneType)"),
}


@pytest.mark.parametrize("cls, key, value, attr", FLOATS)
@pytest.mark.parametrize("kind", list(BAD))
def test_other_values_are_rejected_naming_what_was_given(cls, key, value, attr, kind):
    bad, shown = BAD[kind]
    model = One()
    before = model.w.detach().clone()
    pattern = rf"^{key} must be a finite real number .*{re.escape(shown)}"
    with pytest.raises(ValueError, match=pattern):
        cls(model, param_filter=ALL, **{key: bad})
    assert torch.equal(model.w, before)


def test_out_of_range_real_scalars_are_rejected():
    with pytest.raises(ValueError, match=r"decay must be .* in \(0.0, 1.0\).*np.float32\(1.5\)"):
        EMA(One(), np.float32(1.5), param_filter=ALL)
    with pytest.raises(ValueError, match=r"lag must be .*0-d torch.float32 tensor holding 0.0"):
        BEMA(One(), lag=torch.tensor(0.0), param_filter=ALL)
    with pytest.raises(ValueError, match="decay must be .*got '0.9' \\(str\\)"):
        EMA(One(), "0.9", param_filter=ALL)
    with pytest.raises(ValueError, match="sigma_rel must be .*True \\(bool\\)"):
        PostHocEMA(One(), (0.05, True), param_filter=ALL)
    with pytest.raises(ValueError, match="the decays must differ"):
        EMA(One(), (np.float64(0.9), torch.tensor(0.9, dtype=torch.float64)), param_filter=ALL)
