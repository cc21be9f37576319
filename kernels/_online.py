"""Triton helpers shared by the logits loss and the fused-linear loss: the online log-sum-exp
step, the JSD terms and the per-entry gradients of the divergences.

Notation of ``kernels/distill_loss.py``: a = s / T, b = t / T, log q = (a - m_a) - ld_a (student),
log p = (b - m_b) - ld_b (teacher). Every helper is guarded so that -inf logits (masked lanes,
masked vocabulary entries) never form (-inf) - (-inf).
"""

from __future__ import annotations

import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


@triton.jit
def _shift(m):
    """Online-LSE shift: the running max, or 0 while every entry seen is -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log1p(u):
    """log(1 + u), u >= 0, keeping u's low bits: log(w) * u / (w - 1) with w = 1 + u rounded."""
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _logaddexp(x, y):
    """log(e^x + e^y); -inf when both are -inf, with no NaN formed on the way."""
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    return mx + _log1p(tl.exp(mn - _shift(mx)))


@triton.jit
def _lse_step(x, m, AXIS: tl.constexpr):
    """One online log-sum-exp step over a block x, reduced along AXIS (0: x is [BLOCK] and the
    state scalar; 1: x is [ROWS, BLOCK] and the state [ROWS]).

    Returns the new max m', its shift sh = _shift(m'), e = e^(x - sh) and the rescale factor
    c = e^(m - sh) (fp64) of the running sum; :func:`_fold` then gives the new sum. (The sum is
    left to the caller: where a reduction sits decides the registers a kernel needs.)
    """
    new = tl.maximum(m, tl.max(x, axis=AXIS))
    sh = _shift(new)
    if AXIS == 0:
        e = tl.exp(x - sh)
    else:
        e = tl.exp(x - sh[:, None])
    return new, sh, e, tl.exp(m - sh).to(tl.float64)


@triton.jit
def _fold(d, c, e, AXIS: tl.constexpr):
    """The running sum d rescaled by c plus the block's sum of e (fp32 tree sum, fp64 total)."""
    return d * c + tl.sum(e, axis=AXIS).to(tl.float64)


@triton.jit
def _jsd_terms(lq, lp, log_beta, log_1mbeta):
    """The entries p (log p - log M) and q (log q - log M), M = beta p + (1 - beta) q."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
    p_live = p > 0.0
    q_live = q > 0.0
    t_pm = p * (tl.where(p_live, lp, 0.0) - tl.where(p_live, lm, 0.0))
    t_qm = q * (tl.where(q_live, lq, 0.0) - tl.where(q_live, lm, 0.0))
    return t_pm, t_qm


@triton.jit
def _div_grad(lq, lp, aux, beta, log_beta, log_1mbeta, DIVERGENCE: tl.constexpr):
    """T dD/da per entry: q - p (forward KL), q ((log q - log p) - KL(q||p)) (reverse KL),
    (1 - beta) q ((log q - log M) - KL(q||M)) (JSD); aux is the KL of the row."""
    q = tl.exp(lq)
    live = q > 0.0
    if DIVERGENCE == 0:
        gd = q - tl.exp(lp)
    elif DIVERGENCE == 1:
        gd = q * ((tl.where(live, lq, 0.0) - tl.where(live, lp, 0.0)) - aux)
    else:
        lm = _logaddexp(log_beta + lp, log_1mbeta + lq)
        gd = (1.0 - beta) * q * ((tl.where(live, lq, 0.0) - tl.where(live, lm, 0.0)) - aux)
    return gd


@triton.jit
def _ce_grad(r, m_r, ld_r, hit):
    """d CE / ds per entry: softmax(s) - onehot(label), from the raw logits r."""
    return tl.exp((r - m_r) - ld_r) - tl.where(hit, 1.0, 0.0)
