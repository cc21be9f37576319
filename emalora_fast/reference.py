"""Pure-PyTorch formulas of every op: the test oracle (run in float64) and the fallback backend.

Readability over speed; every function works in whatever floating dtype its state tensors have.
"""

from __future__ import annotations

import torch

__all__ = ["averager_update_"]


@torch.no_grad()
def averager_update_(
    params: list[torch.Tensor],
    ema: list[torch.Tensor],
    theta0: list[torch.Tensor] | None,
    out: list[torch.Tensor] | None,
    teachers: list[torch.Tensor] | None,
    flag: torch.Tensor,
    c_ema: float,
    c_theta: float,
    alpha: float,
    reset: bool,
) -> None:
    """Fused EMA / BEMA update, in place, tensor by tensor.

    For each tensor (theta cast to the state dtype)::

        reset:  ema = theta0 = out = theta
        update: ema  = c_ema * ema + c_theta * theta
                out  = ema + alpha * (theta - theta0)          (BEMA: theta0/out given)
        teacher = (out if BEMA else ema), cast to the teacher's dtype

    Elements whose theta is not finite keep all their state and set ``flag`` to 1.

    Args:
        params: live tensors theta.
        ema: shadow tensors, shapes of ``params``.
        theta0: BEMA anchors, or None for EMA.
        out: BEMA outputs, or None for EMA (given together with ``theta0``).
        teachers: tensors to receive the averaged value, or None.
        flag: int32 tensor of one element, set to 1 on a non-finite theta.
        c_ema: weight of the old shadow (EMA: d; BEMA: 1 - beta).
        c_theta: weight of theta (EMA: 1 - d; BEMA: beta).
        alpha: BEMA bias-correction weight.
        reset: copy theta into the state instead of averaging.
    """
    is_bema = theta0 is not None
    for i, p in enumerate(params):
        theta = p.detach().reshape(ema[i].shape).to(ema[i].dtype)
        ok = torch.isfinite(theta)
        flag.copy_(torch.maximum(flag, (~ok.all()).to(flag.dtype)))
        if reset:
            new_ema = theta
        else:
            new_ema = c_ema * ema[i] + c_theta * theta
        ema[i].copy_(torch.where(ok, new_ema, ema[i]))
        avg = ema[i]
        if is_bema:
            if reset:
                theta0[i].copy_(torch.where(ok, theta, theta0[i]))
                new_out = theta
            else:
                new_out = ema[i] + alpha * (theta - theta0[i])
            out[i].copy_(torch.where(ok, new_out, out[i]))
            avg = out[i]
        if teachers is not None:
            t = teachers[i]
            t.copy_(torch.where(ok, avg, t.to(avg.dtype)).reshape(t.shape))
