"""The study's statistics against hand-computed values and published t-table quantiles."""

from __future__ import annotations

import math

import pytest

from emalora_fast.experiments import stats

# Two-sided 95% (p = 0.975) and other quantiles of Student's t, from standard t tables.
T_TABLE = [
    (0.975, 1, 12.706),
    (0.975, 2, 4.303),
    (0.975, 3, 3.182),
    (0.975, 4, 2.776),
    (0.975, 5, 2.571),
    (0.975, 9, 2.262),
    (0.975, 30, 2.042),
    (0.95, 1, 6.314),
    (0.95, 4, 2.132),
    (0.995, 4, 4.604),
    (0.9, 10, 1.372),
]


@pytest.mark.parametrize("p, df, expected", T_TABLE)
def test_t_quantile_matches_the_t_table(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=6e-4)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=6e-4)


def test_t_quantile_tends_to_the_normal_one_and_inverts_the_cdf():
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    for df in (1, 2, 7, 40):
        t = stats.t_quantile(0.975, df)
        assert stats.t_cdf(t, df) == pytest.approx(0.975, abs=1e-10)
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    assert stats.t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2.0) / math.pi, abs=1e-12)
    # df = 2 has a closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert stats.t_cdf(-1.3, 2) == pytest.approx(0.5 - 1.3 / (2 * math.sqrt(2 + 1.69)), abs=1e-12)


def test_describe_by_hand():
    # x = 1, 2, 3, 4: mean 2.5, s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # half width = t(0.975, 3) * s / 2 = 3.182446 * 1.290994 / 2 = 2.054260
    i = stats.describe([1.0, 2.0, 3.0, 4.0])
    assert (i.n, i.mean, i.worst) == (4, 2.5, 4.0)
    assert i.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert i.low == pytest.approx(2.5 - 2.054260, abs=2e-6)
    assert i.high == pytest.approx(2.5 + 2.054260, abs=2e-6)
    assert i.excludes_zero  # [0.446, 4.554]


def test_one_value_has_no_interval():
    i = stats.describe([1.5])
    assert i.mean == 1.5 and math.isnan(i.std) and math.isnan(i.low)
    assert not i.excludes_zero


def test_paired_differences_by_hand():
    # differences 0.1, 0.3, 0.2: mean 0.2, s = 0.1, half width = 4.302653 * 0.1 / sqrt(3) = 0.248414
    d = stats.paired([1.1, 2.3, 3.2], [1.0, 2.0, 3.0])
    assert d.mean == pytest.approx(0.2, abs=1e-12)
    assert d.std == pytest.approx(0.1, abs=1e-12)
    assert d.low == pytest.approx(0.2 - 0.248414, abs=2e-6)
    assert d.high == pytest.approx(0.2 + 0.248414, abs=2e-6)
    assert not d.excludes_zero  # the interval contains 0: no significant difference
    # a consistent difference with little spread is significant although each value is noisy
    d = stats.paired([5.01, 3.02, 7.01, 1.02], [5.0, 3.0, 7.0, 1.0])
    assert d.excludes_zero and d.low > 0
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired([1.0], [1.0, 2.0])


def test_divergence_and_oscillation():
    assert stats.diverged([2.0, 1.5, 1.2, 1.1]) is False
    assert stats.diverged([2.0, 1.5, 1.2, 1.8])  # gave back 0.7 of a 0.8 gain
    assert stats.diverged([2.0, 1.5, float("nan")])
    assert stats.diverged([2.0, 1.99, 1.995]) is False  # within min_rise
    assert stats.oscillation([2.0, 1.5, 1.7, 1.6, 1.9]) == pytest.approx(0.2 + 0.3)
    assert stats.oscillation([3.0, 2.0, 1.0]) == 0.0
