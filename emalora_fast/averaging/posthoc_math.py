"""Power-function EMA profiles and their post-hoc reconstruction (Karras et al., "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696, section 3 and appendix C).

A power-function EMA with exponent gamma averages, at time t, the weights of times tau in
[0, t] with the density ``p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)``. Its relative
width is ``sigma_rel = std(tau) / t = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``.

**Updates at any times** (every step, every 3rd step, irregular gaps). Let the updates happen at
times ``0 < s_1 < s_2 < ... `` (optimizer steps since the profiles' origin) and set ``s_0 = 0``,
``delta_k = s_k - s_(k-1)``. EDM2's decay for an update after a gap is::

    beta_k = (1 - delta_k / s_k) ** (gamma + 1) = (s_(k-1) / s_k) ** (gamma + 1)

(``beta_1 = 0``: the first update copies the weights). The product of the betas telescopes, so
the average after the update at ``T = s_n`` gives the weights theta_k of update k the mass::

    m_k(T, gamma) = (1 - beta_k) * prod_(j > k) beta_j = (s_k**(g+1) - s_(k-1)**(g+1)) / T**(g+1)

exactly the integral of ``p_T`` over ``(s_(k-1), s_k]``: the average is the continuous profile
applied to the step function ``theta~(tau) = theta_k`` on ``(s_(k-1), s_k]``. A snapshot of any
profile, and the target profile itself (at an update time T), are therefore mass vectors over the
same updates, and a combination ``sum_i x_i snapshot_i`` misses the target by
``sum_k r_k theta_k`` with ``r_k = m_k(T, gamma_T) - sum_i x_i m_k(t_i, gamma_i)``.

**The least squares used here** minimizes ``sum_k r_k**2 / delta_k``: the squared L2 norm of the
residual profile projected onto step functions of the update intervals (the only part of it that
the step function theta~ can see). So the inner product of two profiles is::

    <p_a, p_b> = sum_k m_k(t_a, gamma_a) * m_k(t_b, gamma_b) / delta_k

exact for the update pattern taken. It tends to EDM2's continuous inner product
``integral p_a p_b dtau`` (:func:`profile_inner`) when the intervals shrink, and never exceeds it
(Cauchy-Schwarz on each interval). :func:`discrete_gram` computes it in one pass over the updates,
``O(n_updates * L**2)`` for L distinct exponents, with every term in [0, 1] (no overflow at large
gamma).

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


def power_beta(t: float, gamma: float, delta: float = 1.0) -> float:
    """The decay of an update at time t (> 0) that follows the previous one by ``delta`` (in
    (0, t]): ``(1 - delta/t) ** (gamma + 1)``, computed as ``((t - delta)/t) ** (gamma + 1)``
    (0 for ``delta = t``: the first update copies the weights)."""
    return ((t - delta) / t) ** (gamma + 1.0)


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


def discrete_gram(updates, times, gammas, chunk: int = 1 << 16) -> np.ndarray:
    """Inner products ``<p_i, p_j> = sum_k m_k(t_i, g_i) m_k(t_j, g_j) / delta_k`` of the profiles
    (``times[i]``, ``gammas[i]``) under the update pattern ``updates`` (module docstring).

    Args:
        updates: [n] update times ``s_1 < s_2 < ...``, all > 0 (``s_0 = 0`` is implied).
        times: [E] profile times, each one of ``updates``.
        gammas: [E] profile exponents, each > -1.
        chunk: updates processed at once (bounds the temporary memory to ``chunk * L`` floats).

    Returns:
        [E, E] float64 Gram matrix.

    With ``D_c(a, b) = <p_(c, a), p_(c, b)>`` for two exponents at one time c, a profile at a later
    time T is the one at c scaled by ``(c/T)**(g+1)`` on the updates up to c, so
    ``D_T = (c/T)**(a+b+2) D_c + sum over the updates in (c, T]``; and for ``t_i <= t_j``,
    ``<p_i, p_j> = (t_i/t_j)**(g_j+1) D_(t_i)(g_i, g_j)``. Each mass is computed as
    ``(s_k/c)**(g+1) * -expm1((g+1) log(s_(k-1)/s_k))``, accurate for small gaps.
    """
    u = np.asarray(updates, dtype=np.float64).reshape(-1)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if not u.size or u[0] <= 0 or np.any(np.diff(u) <= 0):
        raise ValueError("updates must be a non-empty, strictly increasing list of times > 0")
    if times.shape != gammas.shape or not times.size:
        raise ValueError("times and gammas must be non-empty and of the same length")
    checkpoints, where = np.unique(times, return_inverse=True)
    ends = np.searchsorted(u, checkpoints)
    if np.any(ends >= u.size) or np.any(u[np.minimum(ends, u.size - 1)] != checkpoints):
        bad = checkpoints[(ends >= u.size) | (u[np.minimum(ends, u.size - 1)] != checkpoints)]
        raise ValueError(f"profile times {bad[:3].tolist()} are not update times")
    exps, which = np.unique(gammas + 1.0, return_inverse=True)  # [L] exponents g + 1
    prev_all = np.concatenate([[0.0], u[:-1]])
    d = np.zeros((exps.size, exps.size))
    per_time = np.empty((checkpoints.size, exps.size, exps.size))
    done, last = 0, None
    with np.errstate(divide="ignore"):
        for c_i, (c, end) in enumerate(zip(checkpoints, ends + 1, strict=True)):
            if last is not None:
                d *= (last / c) ** (exps[:, None] + exps[None, :])
            for lo in range(done, end, chunk):
                s_k, s_prev = u[lo : min(end, lo + chunk)], prev_all[lo : min(end, lo + chunk)]
                log_step = np.log(s_prev / s_k)  # -inf for the first update: mass (s_1/c)**e
                v = np.exp(exps[:, None] * np.log(s_k / c)) * -np.expm1(exps[:, None] * log_step)
                d += (v / (s_k - s_prev)) @ v.T
            per_time[c_i] = d
            done, last = end, c
    t_i, t_j = times[:, None], times[None, :]
    first = np.where(t_i <= t_j, where[:, None], where[None, :])
    later_exp = np.where(t_i <= t_j, exps[which][None, :], exps[which][:, None])
    scale = (np.minimum(t_i, t_j) / np.maximum(t_i, t_j)) ** later_exp
    return scale * per_time[first, which[:, None], which[None, :]]


def _system(times, gammas, target_time, target_gamma, updates):
    """(A, b, <p_T, p_T>) of the least squares, discrete (``updates`` given) or continuous."""
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if times.shape != gammas.shape or not times.size:
        raise ValueError("times and gammas must be non-empty and of the same length")
    if updates is not None:
        g = discrete_gram(updates, np.append(times, target_time), np.append(gammas, target_gamma))
        return g[:-1, :-1], g[:-1, -1], float(g[-1, -1])
    a = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner(times, gammas, target_time, target_gamma)
    return a, b, float(profile_inner(target_time, target_gamma, target_time, target_gamma))


def reconstruct(
    times: np.ndarray,
    gammas: np.ndarray,
    target_time: float,
    target_gamma: float,
    updates: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """(:func:`reconstruction_weights`, :func:`reconstruction_error`) from one Gram matrix."""
    a, b, tt = _system(times, gammas, target_time, target_gamma, updates)
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    err2 = max(tt - 2 * float(x @ b) + float(x @ a @ x), 0.0)
    return x, math.sqrt(err2 / tt)


def reconstruction_weights(
    times: np.ndarray,
    gammas: np.ndarray,
    target_time: float,
    target_gamma: float,
    updates: np.ndarray | None = None,
) -> np.ndarray:
    """Weights x of snapshots (``times[i]``, ``gammas[i]``) whose sum ``sum_i x_i p_i`` is the
    least-squares approximation of the target profile: the solution of ``A x = b`` with
    ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``.

    Args:
        times, gammas: [E] the snapshots' times (since the profiles' origin) and exponents.
        target_time, target_gamma: the profile wanted.
        updates: [n] the update times (:func:`discrete_gram`): the inner product exact for that
            pattern. None: EDM2's continuous inner product (:func:`profile_inner`), its limit.
    """
    return reconstruct(times, gammas, target_time, target_gamma, updates)[0]


def reconstruction_error(
    times: np.ndarray,
    gammas: np.ndarray,
    target_time: float,
    target_gamma: float,
    updates: np.ndarray | None = None,
) -> float:
    """Relative L2 error of the least-squares profile: ``||p_target - sum x_i p_i|| /
    ||p_target||`` in the inner product of :func:`reconstruction_weights`, a property of the
    snapshot and update schedule alone (no weights involved)."""
    return reconstruct(times, gammas, target_time, target_gamma, updates)[1]
