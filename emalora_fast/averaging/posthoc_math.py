"""Power-function EMA profiles and their post-hoc reconstruction (Karras et al., "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696, section 3 and appendix C).

A power-function EMA with exponent gamma averages, at training time t, the weights of times
tau in [0, t] with the density ``p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)``. Its
relative width is ``sigma_rel = std(tau) / t = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``.

Run step by step with ``beta_t = (1 - 1/t) ** (gamma + 1)`` (t = 1, 2, ... optimizer steps;
``beta_1 = 0`` copies the weights), the average after step t gives the weights of step tau the
mass ``(tau**(gamma+1) - (tau-1)**(gamma+1)) / t**(gamma+1)``: exactly the integral of ``p_t``
over ``(tau - 1, tau]``. So the profiles' inner products below are exact for weights held
constant over each step, and a profile not trained can be rebuilt from snapshots of others by
least squares in that inner product.

Everything here is float64 numpy on the host: no tensors.
"""

from __future__ import annotations

import math

import numpy as np


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma``."""
    if not gamma > -1:
        raise ValueError(f"gamma must be > -1, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative width ``sigma_rel``.

    ``sigma_rel**2 * (gamma + 2)**2 * (gamma + 3) = gamma + 1``, a cubic in gamma whose largest
    real root is the answer; widths in (0, sigma_rel_of(0)] = (0, 0.2887] have a root >= 0.
    """
    top = sigma_rel_of(0.0)
    if not 0 < sigma_rel <= top:
        raise ValueError(f"sigma_rel must be in (0, {top:.4f}], got {sigma_rel!r}")
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def power_beta(t: int, gamma: float) -> float:
    """The decay of step t (>= 1) of a power-function EMA: ``(1 - 1/t) ** (gamma + 1)``."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """``<p_a, p_b> = integral of p_{t_a}(tau; gamma_a) * p_{t_b}(tau; gamma_b) d tau``.

    Broadcasts over numpy arrays. With m = min(t_a, t_b):
    ``(g_a + 1)(g_b + 1) m**(g_a + g_b + 1) / ((g_a + g_b + 1) t_a**(g_a + 1) t_b**(g_b + 1))``,
    computed in ratios (t_a/t_b)**g so that large exponents do not overflow.
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    power = np.where(a_first, g_b, g_a)
    later = np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * ratio**power / ((g_a + g_b + 1) * later)


def reconstruction_weights(
    times: np.ndarray, gammas: np.ndarray, target_time: float, target_gamma: float
) -> np.ndarray:
    """Weights x of snapshots (``times[i]``, ``gammas[i]``) whose sum ``sum_i x_i p_i`` is the
    least-squares approximation of the target profile: the solution of ``A x = b`` with
    ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``."""
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if times.shape != gammas.shape or not times.size:
        raise ValueError("times and gammas must be non-empty and of the same length")
    a = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner(times, gammas, target_time, target_gamma)
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return x


def reconstruction_error(
    times: np.ndarray, gammas: np.ndarray, target_time: float, target_gamma: float
) -> float:
    """Relative L2 error of the least-squares profile: ``||p_target - sum x_i p_i|| /
    ||p_target||``, a property of the snapshot schedule alone (no weights involved)."""
    x = reconstruction_weights(times, gammas, target_time, target_gamma)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    a = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner(times, gammas, target_time, target_gamma)
    tt = float(profile_inner(target_time, target_gamma, target_time, target_gamma))
    err2 = max(tt - 2 * float(x @ b) + float(x @ a @ x), 0.0)
    return math.sqrt(err2 / tt)
