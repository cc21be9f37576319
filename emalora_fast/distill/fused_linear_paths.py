"""The two paths of the fused-linear loss: the chunked path (the cpp / torch row ops over
[rows, V] chunks of logits) and the Triton path (kernels for the passes, O(N) torch ops to merge
their vocabulary splits). :mod:`emalora_fast.distill.fused_linear` holds the autograd Function and
the public API that choose between them; its docstring says what each path computes.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType

import torch

from .loss import (
    FORWARD_KL,
    JSD,
    NUM_STATS,
    REVERSE_KL,
    _backward,
    _forward,
    _shift,
)

_OP = "fused_linear"
_CHUNK_ELEMENTS = 1 << 22  # logits elements per chunk on the chunked (cpp / torch) path
_FILTER_BLOCK_V = 256  # vocabulary columns per gradient-filter tile on the chunked path
_TRITON: dict[str, ModuleType] = {}


def _new_empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffers that the chunk loop must fill entirely (tests poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class _Config:
    """The non-tensor arguments of one call."""

    backend: str  # "triton", or the row backend of the chunked path ("cpp" | "torch")
    vocab: int
    shared: bool  # the teacher uses the student's weight tensor
    divergence: int
    beta: float
    temperature: float
    div_scale: float  # (1 - w) c: weight of the divergence in the row loss
    ce_scale: float  # w: weight of the cross-entropy term
    ignore_index: int
    softcap: float | None
    eps: float | None
    has_ce: bool
    need: tuple[bool, bool, bool] = (False, False, False)  # grads of h_s, W_s, b_s required
    grads_in_forward: bool = False  # chunked path: form the gradient in the forward sweep

    @property
    def row_args(self) -> tuple:
        """The arguments of the logits loss's row ops."""
        return (self.divergence, self.beta, self.temperature, self.div_scale, self.ce_scale,
                self.ignore_index)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The chunked path (cpp / torch row ops): [rows, V] chunks, matmuls in the accumulation dtype.
# ------------------------------------------------------------------------------------------------
def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _chunk_rows(n: int, vocab: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // max(vocab, 1)))


def _as(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _chunk_logits(hs_c, ht_c, ws, bs, wt, bt, cfg: _Config):
    """Student and teacher logits [rows, V] of one chunk, in the accumulation dtype.

    A shared weight is read once for both models: one matmul of the stacked hidden states.
    """
    rows = hs_c.shape[0]
    if cfg.shared:
        z = torch.mm(torch.cat([hs_c, ht_c]), ws.t())
        s, t = z[:rows], z[rows:]
        if bs is not None:
            s.add_(bs)
        if bt is not None:
            t.add_(bt)
    else:
        s = torch.mm(hs_c, ws.t()) if bs is None else torch.addmm(bs, hs_c, ws.t())
        t = torch.mm(ht_c, wt.t()) if bt is None else torch.addmm(bt, ht_c, wt.t())
    if cfg.softcap is not None:
        for x in (s, t):
            x.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
    return s, t


def _filter_(g: torch.Tensor, grad_rows: torch.Tensor, eps: float) -> None:
    """Zero every [rows, _FILTER_BLOCK_V] block of g whose |dl_i/dz_ij| <= eps throughout
    (g_ij = grad_rows_i dl_i/dz_ij)."""
    rows, vocab = g.shape
    excess = g.abs() - eps * grad_rows.abs()[:, None]
    n_blocks = -(-vocab // _FILTER_BLOCK_V)
    pad = n_blocks * _FILTER_BLOCK_V - vocab
    excess = torch.nn.functional.pad(excess, (0, pad), value=-1.0)
    keep = excess.view(rows, n_blocks, _FILTER_BLOCK_V).amax(dim=(0, 2)) > 0
    keep = keep.repeat_interleave(_FILTER_BLOCK_V)[:vocab]
    g.mul_(keep.to(g.dtype))


def _take(x: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _put(out: torch.Tensor, sel: slice | torch.Tensor, x: torch.Tensor) -> None:
    if isinstance(sel, slice):
        out[sel] = x
    else:
        out.index_copy_(0, sel, x.to(out.dtype))


def _sweep(hs, ws, bs, ht, wt, bt, labels, cfg: _Config, need, stats=None, grad_rows=None):
    """One sweep over chunks of the rows that count; returns (loss, stats, grads).

    Without ``stats`` it runs the row ops' statistics pass on each chunk (loss [N] and stats
    [N, 7] returned); with ``grad_rows`` [N] it also runs their gradient pass on the same chunk
    of logits and multiplies g = dL/dz into the gradients (grad_h, grad_W, grad_b; None where
    ``need`` says so). Rows whose label is ``ignore_index`` are skipped: they get zeros.
    """
    acc = _acc_dtype(hs, ht)
    n, hidden = hs.shape
    dev = hs.device
    need_gh, need_gw, need_gb = need if grad_rows is not None else (False, False, False)
    # Chunks of the rows that count (all rows without labels): ignored rows are never read.
    idx = None
    if labels is not None:
        idx = torch.nonzero(labels != cfg.ignore_index).squeeze(1)
    count = n if idx is None else idx.numel()
    new = _new_empty if idx is None else torch.zeros
    loss = None
    if stats is None:
        loss = new((n,), dtype=acc, device=dev)
        stats = new((n, NUM_STATS), dtype=acc, device=dev)
        fwd = True
    else:
        fwd = False
    gh = new((n, hidden), dtype=acc, device=dev) if need_gh else None
    gw = torch.zeros((cfg.vocab, hidden), dtype=acc, device=dev) if need_gw else None
    gb = torch.zeros((cfg.vocab,), dtype=acc, device=dev) if need_gb else None
    ws_a, bs_a, wt_a, bt_a = _as(ws, acc), _as(bs, acc), _as(wt, acc), _as(bt, acc)
    step = _chunk_rows(count, cfg.vocab)
    for c0 in range(0, count, step):
        c1 = min(c0 + step, count)
        sel = slice(c0, c1) if idx is None else idx[c0:c1]
        hs_c = _as(_take(hs, sel), acc)
        lab = _take(labels, sel) if labels is not None else None
        s, t = _chunk_logits(hs_c, _as(_take(ht, sel), acc), ws_a, bs_a, wt_a, bt_a, cfg)
        if fwd:
            loss_c, stats_c = _forward(cfg.backend, s, t, lab, cfg.row_args)
            _put(loss, sel, loss_c)
            _put(stats, sel, stats_c)
        else:
            stats_c = _take(stats, sel)
        if not (need_gh or need_gw or need_gb):
            del s, t
            continue
        if cfg.softcap is not None:  # d softcap(z) / dz = 1 - (s / c)^2
            deriv = s.div(cfg.softcap).square_().neg_().add_(1.0)
        rows_c = _take(grad_rows, sel).contiguous()
        g = _backward(cfg.backend, s, t, lab, stats_c, rows_c, cfg.row_args, True)
        if cfg.softcap is not None:
            g.mul_(deriv)
            del deriv
        if cfg.eps is not None:
            _filter_(g, rows_c, cfg.eps)
        if need_gh:
            _put(gh, sel, torch.mm(g, ws_a))
        if need_gw:
            gw.addmm_(g.t(), hs_c)
        if need_gb:
            gb += g.sum(0)
        del s, t, g  # the next chunk's logits can take this chunk's memory
    return loss, stats, (gh, gw, gb)


# ------------------------------------------------------------------------------------------------
# The Triton path: kernels for the passes, O(N) torch ops to merge the vocabulary splits.
# ------------------------------------------------------------------------------------------------
def _merge_stats(part: torch.Tensor, labels, cfg: _Config):
    """Per-row loss (fp32, without the JSD term) and statistics [N, 7] from the partial
    statistics [8, SPLITS, N] (fp64) of the Triton pass 1."""
    m_a, d_a, m_b, d_b, m_r, d_r, acc, s_lab = part.unbind(0)
    top_a, top_b, top_r = m_a.amax(0), m_b.amax(0), m_r.amax(0)
    c_a = torch.exp(m_a - _shift(top_a))
    c_b = torch.exp(m_b - _shift(top_b))
    d_a, d_b = (d_a * c_a).sum(0), (d_b * c_b).sum(0)
    ld_a, ld_b = torch.log(d_a), torch.log(d_b)
    dlse = (top_a - top_b) + (ld_a - ld_b)  # LSE(a) - LSE(b), differences first
    aux = torch.zeros_like(ld_a)
    if cfg.divergence == FORWARD_KL:
        div = (acc * c_b).sum(0) / d_b + dlse
    elif cfg.divergence == REVERSE_KL:
        div = (acc * c_a).sum(0) / d_a - dlse
        aux = div
    else:
        div = torch.zeros_like(ld_a)  # pass 2 adds it
    if cfg.has_ce and cfg.temperature != 1.0:
        ld_r = torch.log((d_r * torch.exp(m_r - _shift(top_r))).sum(0))
    else:  # a == s when T == 1 (or unused)
        top_r, ld_r = top_a, ld_a
    loss = cfg.div_scale * div
    if cfg.has_ce:
        loss = loss + cfg.ce_scale * ((top_r - s_lab.sum(0)) + ld_r)
        bad = (labels < 0) | (labels >= cfg.vocab)
        loss = torch.where(bad, torch.full_like(loss, math.nan), loss)
    stats = torch.stack([top_a, ld_a, top_b, ld_b, top_r, ld_r, aux], dim=1).float()
    return loss, stats


def _triton_fwd(hs, ws, bs, ht, wt, bt, labels, cfg: _Config):
    k = _TRITON[_OP]
    common = (hs, ws, bs, ht, wt, bt, labels)
    part = k.fused_linear_fwd(
        *common, cfg.vocab, cfg.shared, cfg.divergence, cfg.temperature, cfg.softcap,
        cfg.has_ce, cfg.ignore_index,
    )  # fmt: skip
    loss, stats = _merge_stats(part, labels, cfg)
    if cfg.divergence == JSD:
        kl = k.fused_linear_jsd(
            *common, stats, cfg.vocab, cfg.shared, cfg.beta, cfg.temperature, cfg.softcap,
            cfg.ignore_index,
        ).sum(1)  # fmt: skip
        loss = loss + cfg.div_scale * (cfg.beta * kl[0] + (1.0 - cfg.beta) * kl[1])
        stats[:, 6] = kl[1]
    if labels is not None:
        loss = torch.where(labels != cfg.ignore_index, loss, torch.zeros_like(loss))
    return loss.float(), stats


def _triton_bwd(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, cfg: _Config, need):
    return _TRITON[_OP].fused_linear_bwd(
        hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, cfg.vocab, cfg.shared, cfg.divergence,
        cfg.beta, cfg.temperature, cfg.div_scale, cfg.ce_scale, cfg.softcap, cfg.ignore_index,
        need, eps=cfg.eps,
    )  # fmt: skip
