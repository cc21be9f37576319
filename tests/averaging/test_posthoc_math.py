"""Power-function EMA profiles and post-hoc reconstruction, against formulas written here."""

from __future__ import annotations

import numpy as np
import pytest

from emalora_fast.averaging import posthoc_math as pm


def test_gamma_and_sigma_rel_are_inverse_and_match_the_paper():
    # The paper's pair: sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94.
    assert pm.gamma_of(0.05) == pytest.approx(16.97, abs=0.01)
    assert pm.gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.28):
        assert pm.sigma_rel_of(pm.gamma_of(s)) == pytest.approx(s, rel=1e-12)
    g = 3.5  # the width from its definition: std of tau under density ~ tau**g on [0, 1]
    mean, second = (g + 1) / (g + 2), (g + 1) / (g + 3)
    assert pm.sigma_rel_of(g) == pytest.approx(np.sqrt(second - mean**2), rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        pm.gamma_of(0.3)


def step_masses(t: int, gamma: float) -> np.ndarray:
    """Mass of theta_1..theta_t in a power EMA run step by step with power_beta."""
    w = np.zeros(t)
    for s in range(1, t + 1):
        b = pm.power_beta(s, gamma)
        w *= b
        w[s - 1] = 1 - b
    return w


def test_step_recursion_integrates_the_continuous_profile():
    for t, g in ((1, 5.0), (7, 0.0), (40, 6.94), (300, 16.97)):
        tau = np.arange(1, t + 1, dtype=np.float64)
        exact = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
        np.testing.assert_allclose(step_masses(t, g), exact, rtol=1e-9, atol=1e-15)


def test_profile_inner_matches_numerical_integration():
    for t_a, g_a, t_b, g_b in ((100, 6.9, 60, 17.0), (50, 0.5, 80, 2.0), (30, 4.0, 30, 4.0)):
        tau = np.linspace(0, min(t_a, t_b), 200001)  # the product is 0 beyond the earlier end
        pa = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
        pb = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        numeric = getattr(np, "trapezoid", getattr(np, "trapz", None))(pa * pb, tau)
        assert pm.profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-5)
        assert pm.profile_inner(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-5)


def test_reconstruction_of_an_untrained_profile_from_snapshots():
    """Snapshots of two profiles every 20 steps of a random walk rebuild a third profile's
    average at the end: close to that profile run directly alongside."""
    rng = np.random.default_rng(0)
    steps, every, dim = 400, 20, 64
    theta = np.cumsum(rng.normal(size=(steps, dim)), axis=0) + 5.0
    gammas = [pm.gamma_of(0.05), pm.gamma_of(0.28)]
    target = pm.gamma_of(0.12)
    averages = {g: np.zeros(dim) for g in [*gammas, target]}
    times, kinds, snaps = [], [], []
    for t in range(1, steps + 1):
        for g in averages:
            b = pm.power_beta(t, g)
            averages[g] = b * averages[g] + (1 - b) * theta[t - 1]
        if t % every == 0:
            for g in gammas:
                times.append(t)
                kinds.append(g)
                snaps.append(averages[g].copy())
    x = pm.reconstruction_weights(np.array(times), np.array(kinds), steps, target)
    rebuilt = np.tensordot(x, np.array(snaps), axes=1)
    direct = averages[target]
    err = np.linalg.norm(rebuilt - direct) / np.linalg.norm(direct - theta.mean(0))
    assert err < 0.02, err
    assert pm.reconstruction_error(times, kinds, steps, target) < 0.05
    # A snapshot profile itself is rebuilt exactly.
    assert pm.reconstruction_error(times, kinds, steps, gammas[0]) < 1e-6


def edm2_masses(updates: np.ndarray, t: float, g: float) -> np.ndarray:
    """Weights of the updates at ``updates`` in the average at update time t, run step by step
    with EDM2's beta = (1 - delta/s)**(g+1) on unit vectors (float64)."""
    w, prev = np.zeros(updates.size), 0.0
    for k, s in enumerate(updates[updates <= t]):
        b = (1 - (s - prev) / s) ** (g + 1)
        w *= b
        w[k] = 1 - b
        prev = s
    return w


@pytest.mark.parametrize("kind", ["every3", "irregular", "dense"])
def test_discrete_gram_is_the_inner_product_of_the_edm2_masses(kind):
    rng = np.random.default_rng()
    u = {
        "every3": np.arange(3.0, 301.0, 3.0),
        "irregular": np.cumsum(rng.integers(1, 9, size=120)).astype(np.float64),
        "dense": np.arange(1.0, 2001.0),
    }[kind]
    pick = rng.choice(u.size, size=5, replace=False)
    times = np.append(u[pick], u[-1])
    gammas = np.array([16.97, 0.3, 6.94, 16.97, 250.0, 2.0])
    delta = np.diff(np.concatenate([[0.0], u]))
    m = np.stack([edm2_masses(u, t, g) for t, g in zip(times, gammas, strict=True)])
    want = (m / delta) @ m.T
    got = pm.discrete_gram(u, times, gammas, chunk=17)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15 * np.abs(want).max())
    # The masses of a profile sum to 1 whatever the pattern.
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)
    if kind == "dense":  # many small steps: EDM2's continuous inner product
        cont = pm.profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
        keep = gammas < 100  # g = 250 is a few steps wide: still discrete at 2,000 steps
        np.testing.assert_allclose(got[np.ix_(keep, keep)], cont[np.ix_(keep, keep)], rtol=0.02)
        assert np.all(got <= cont * (1 + 1e-12))  # Cauchy-Schwarz on each interval


def test_discrete_reconstruction_is_the_weighted_least_squares_of_the_masses():
    rng = np.random.default_rng()
    u = np.cumsum(rng.integers(1, 6, size=150)).astype(np.float64)
    delta = np.diff(np.concatenate([[0.0], u]))
    snaps = u[14::15]
    times = np.repeat(snaps, 2)
    gammas = np.tile([pm.gamma_of(0.05), pm.gamma_of(0.28)], snaps.size)
    basis = np.stack([edm2_masses(u, t, g) for t, g in zip(times, gammas, strict=True)])
    for sig in (0.1, 0.2, 0.02):
        target = edm2_masses(u, u[-1], pm.gamma_of(sig))
        w = 1 / np.sqrt(delta)
        x_ref, *_ = np.linalg.lstsq((basis * w).T, target * w, rcond=None)
        x, err = pm.reconstruct(times, gammas, u[-1], pm.gamma_of(sig), updates=u)
        np.testing.assert_allclose(x @ basis, x_ref @ basis, atol=1e-9)
        r = target - x_ref @ basis
        assert err == pytest.approx(np.sqrt((r**2 / delta).sum() / (target**2 / delta).sum()),
                                    rel=1e-6, abs=1e-9)  # fmt: skip
    with pytest.raises(ValueError, match="not update times"):
        pm.discrete_gram(u, [u[3] + 0.5], [1.0])


def test_power_beta_after_a_gap():
    assert pm.power_beta(12, 3.0, 3) == pytest.approx((1 - 3 / 12) ** 4, rel=1e-15)
    assert pm.power_beta(7, 5.0, 7) == 0.0  # the first update copies
    assert pm.power_beta(9, 2.0) == pytest.approx((8 / 9) ** 3, rel=1e-15)
