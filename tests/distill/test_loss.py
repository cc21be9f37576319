"""distillation_loss / DistillationLoss on every backend against the float64 reference.

The oracle is ``emalora_fast.reference.distillation_loss_reference`` run in float64 on the same
(exactly representable) inputs; its gradient comes from autograd. Tolerances come from the dtype:

- fp32 math: every loss value and gradient entry within 1e-5 (about 170 fp32 ulp) of its
  rounding scale (see ``rounding_scales``): the magnitudes an fp32 evaluation must round, which
  do not shrink when the result does. A plain relative bound on the result fails torch's own
  fp32 evaluation of the same formulas where large terms cancel (near-identical teacher and
  student, a small JSD, sharp logits: torch itself reaches relative errors of 1e-4 there);
- bf16/fp16 logits: within 2x torch's own error in that dtype, and within the fp32 bound plus one
  rounding of each gradient entry to the storage dtype (one ulp more under the interpreter).

Triton runs under its interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), so its
shapes stay small.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import rel_err as _rel_err

from emalora_fast import DistillationLoss, distillation_loss
from emalora_fast._dispatch import cpp_available
from emalora_fast.reference import distillation_loss_reference

BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built"),
    ),
    "triton",
]

# (divergence, beta): the two KLs, interior JSD, and JSD at its end points.
DIVERGENCES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.3),
    ("jsd", 0.0),
    ("jsd", 1.0),
]
DIV_IDS = ["fkl", "rkl", "jsd0.3", "jsd0", "jsd1"]

FP32_TOL = 1e-5  # relative agreement of two fp32 evaluations of the same quantity
SCALE_TOL = 1e-5  # fp32 error allowed per unit of rounding scale (about 170 ulp)
BF16_HALF_ULP = 2.0**-8
TINY = torch.finfo(torch.float32).tiny


def _backend_ready(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")


def rounding_scales(
    s,
    t,
    go,
    *,
    divergence="forward_kl",
    beta=0.5,
    temperature=1.0,
    scale_by_temperature_squared=False,
    labels=None,
    ignore_index=-100,
    reduction="batchmean",
    num_items_in_batch=None,
    hard_label_weight=0.0,
    **_,
):
    """The scales of fp32 rounding error in the loss and in dL/ds, in float64.

    An fp32 sum errs by a few ulp of the sum of its terms' magnitudes, and a log-probability by
    a few ulp of its own magnitude; neither shrinks when the result does (a small KL between
    near-identical distributions, a small JSD, gradient entries where q = p, all cancel large
    terms). So the loss of a row scales with sum_v w_v (|log x_v| + |log y_v|) over its weighted
    log-probabilities, plus |LSE(s)| + |s_label| for cross-entropy, and the gradient entry j with
    (q_j + p_j)(1 + |log q_j| + |log p_j| + row scale) / T, plus (softmax_j + onehot_j)(1 +
    |log softmax_j|) for cross-entropy; both times the reduction weight and |grad_output|.

    Returns:
        (loss scale like the loss, gradient scale like s, gradient floor like s): the floor covers
        probabilities below fp32's smallest normal number, which may flush to 0.
    """
    v = s.shape[-1]
    s64 = s.detach().double().reshape(-1, v)
    t64 = t.detach().double().reshape(-1, v)[:, :v]
    n = s64.shape[0]
    lq = torch.log_softmax(s64 / temperature, -1)
    lp = torch.log_softmax(t64 / temperature, -1)
    q, p = lq.exp(), lp.exp()

    def mag(w, x):  # |x| where w > 0, else 0 (no 0 * inf)
        return torch.where(w > 0, torch.where(w > 0, x, 0.0).abs(), 0.0)

    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "jsd":
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        terms = beta * p * (mag(p, lp) + mag(p, lm)) + (1 - beta) * q * (mag(q, lq) + mag(q, lm))
    else:
        terms = (p if divergence == "forward_kl" else q) * (mag(p, lp) + mag(q, lq))
    mass = terms.sum(-1)
    c = (1 - hard_label_weight) * (temperature**2 if scale_by_temperature_squared else 1.0)
    w = hard_label_weight
    logs = 1.0 + mag(q, lq) + mag(p, lp) + mass[:, None]
    g_terms = c / temperature * (q + p) * logs
    g_floor = (c / temperature + w) * TINY * logs
    row = c * mass
    valid = torch.ones(n, dtype=torch.bool)
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if w > 0:
            target = torch.where(valid, flat, 0)
            log_sm = torch.log_softmax(s64, -1)
            s_label = s64.gather(1, target[:, None])[:, 0]
            row = row + w * (torch.logsumexp(s64, -1).abs() + s_label.abs())
            onehot = torch.nn.functional.one_hot(target, v).double()
            g_terms = g_terms + w * (log_sm.exp() + onehot) * (1.0 + mag(log_sm.exp(), log_sm))
    n_valid = max(int(valid.sum()), 1)
    if reduction in ("none", "sum"):
        weight = torch.ones(n, dtype=torch.float64)
    elif reduction == "mean":
        weight = torch.full((n,), 1.0 / (n_valid * v), dtype=torch.float64)
    else:
        denom = n_valid if num_items_in_batch is None else max(int(num_items_in_batch), 1)
        weight = torch.full((n,), 1.0 / denom, dtype=torch.float64)
    weight = torch.where(valid, weight, 0.0)
    row = torch.where(valid, row, 0.0)
    loss_scale = row.reshape(s.shape[:-1]) if reduction == "none" else (weight * row).sum()
    g_row = (go.double().reshape(-1) * weight).abs()[:, None]
    return loss_scale, (g_row * g_terms).reshape(s.shape), (g_row * g_floor).reshape(s.shape)


def assert_within(out, ref, scale, floor=0.0, what="", rel=0.0):
    """|out - ref| <= SCALE_TOL * scale + floor + rel * |ref| everywhere; NaN never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(out).all(), f"{what}: non-finite values {out[~torch.isfinite(out)][:5]}"
    err = (out - ref).abs()
    bound = SCALE_TOL * scale + floor + rel * ref.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} entries off; worst error "
        f"{err[bad].max().item():.3e} against bound {bound[bad][err[bad].argmax()].item():.3e}"
    )


def check_values(out, grad, s, t, go, grad_rel=0.0, grad_abs=0.0, **kw):
    """Loss and gradient from fp32 math against the float64 reference on the same inputs;
    ``grad_rel`` / ``grad_abs`` add the rounding of a low-precision gradient dtype."""
    ref, ref_grad = run_reference(s, t, go, **kw)
    loss_scale, grad_scale, grad_floor = rounding_scales(s, t, go, **kw)
    assert_within(out, ref, loss_scale, what="loss")
    assert_within(grad, ref_grad, grad_scale, grad_floor + grad_abs, what="grad", rel=grad_rel)


def _logits(n: int, v: int, kind: str = "unit") -> tuple[torch.Tensor, torch.Tensor]:
    """Random student and teacher logits [n, v] of one of several characters."""
    s = torch.randn(n, v) * 2.0
    if kind == "unit":
        t = torch.randn(n, v) * 2.0
    elif kind == "wide":  # large logits: LSE far from 0
        s = s * 8.0 + 30.0
        t = torch.randn(n, v) * 16.0 - 20.0
    elif kind == "sharp":  # a confident teacher: one entry dominates each row
        t = torch.randn(n, v)
        t[torch.arange(n), torch.randint(0, v, (n,))] += 25.0
    elif kind == "near":  # self-distillation: teacher close to student
        t = s + 0.05 * torch.randn(n, v)
    else:
        raise ValueError(kind)
    return s, t


def _labels(shape, v: int, ignored: float = 0.25) -> torch.Tensor:
    labels = torch.randint(0, v, shape)
    drop = torch.rand(shape) < ignored
    labels[drop] = -100
    if labels.numel() > 1:  # at least one valid and, with more rows, one ignored
        labels.view(-1)[0] = torch.randint(0, v, ()).item()
        labels.view(-1)[-1] = -100
    return labels


def _grad_output(shape) -> torch.Tensor:
    """A grad_output away from 1: random magnitude and sign."""
    return torch.randn(shape, dtype=torch.float64) * 3.0


def run_ours(s, t, go, backend, **kw):
    """Loss and dL/ds through the public API (autograd), with grad_output ``go``."""
    s = s.detach().clone().requires_grad_(True)
    out = distillation_loss(s, t, backend=backend, **kw)
    out.backward(go.to(out.dtype))
    return out.detach(), s.grad


def run_reference(s, t, go, dtype=torch.float64, **kw):
    """The reference loss and its autograd gradient, computed in ``dtype``."""
    sd = s.detach().to(dtype).requires_grad_(True)
    out = distillation_loss_reference(sd, t.detach().to(dtype), **kw)
    out.backward(go.to(dtype))
    return out.detach(), sd.grad


def check_against_reference(s, t, backend, **kw):
    """fp32 logits through ``backend``: loss and gradient against float64 (see rounding_scales)."""
    assert s.dtype == torch.float32
    go = _grad_output(s.shape[:-1] if kw.get("reduction") == "none" else ())
    out, grad = run_ours(s, t, go, backend, **kw)
    assert out.dtype == torch.float32
    assert grad.dtype == s.dtype
    check_values(out, grad, s, t, go, **kw)
    return out, grad


# ------------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("n", "v"), [(1, 1), (64, 7), (3, 7), (64, 1000), (1, 4099), (3, 4099)])
def test_matches_reference(backend, divergence, beta, temperature, n, v):
    _backend_ready(backend)
    s, t = _logits(n, v)
    labels = _labels((n,), v)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, labels=labels)
    if v > 1:
        check_against_reference(s, t, backend, **kw)
    else:
        assert_identical_distributions(s, t, backend, **kw)


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize(("n", "v"), [(3, 4100), (2, 8200)])
def test_triton_aligned_rows_main_loop_and_tail(divergence, beta, n, v):
    """Rows on 16 bytes take the unmasked main loop over full chunks plus a masked tail: the
    values match the reference, and equal bit for bit those of the masked loop (the same logits
    in a wider buffer, whose rows are not aligned)."""
    _backend_ready("triton")
    from emalora_fast.kernels import distill_loss as kernels

    s, t = _logits(n, v)
    labels = _labels((n,), v)
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, labels=labels,
              hard_label_weight=0.2)  # fmt: skip
    loss = torch.empty(n)
    stats = torch.empty(n, 7)
    launch = kernels.distill_loss_fwd_launch(s, t, labels, loss, stats, 0, beta, 2.0, 1.0, 0.2,
                                             -100)  # fmt: skip
    assert launch.constexprs["ROW_ALIGNED"] and launch.constexprs["BLOCK_V"] < v
    check_against_reference(s, t, "triton", **kw)
    wide_s, wide_t = torch.empty(n, v + 1), torch.empty(n, v + 1)
    wide_s[:, :v], wide_t[:, :v] = s, t
    s2, t2 = wide_s[:, :v], wide_t[:, :v]
    assert not kernels._row_aligned(s2, t2)
    code = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}[divergence]
    args = (code, beta, 2.0, 1.0, 0.2, -100)
    results = []
    rows = torch.randn(n)
    for x, y in ((s, t), (s2, t2)):
        loss, stats = kernels.distill_loss_fwd(x, y, labels, *args)
        g = kernels.distill_loss_bwd(x, y, labels, stats, rows, *args)
        results.append((loss, stats, g))
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def assert_identical_distributions(s, t, backend, temperature=1.0, **kw):
    """p = q (e.g. V = 1): the loss and gradient are 0 up to fp32 rounding of the logits' size
    (the loss is formed as a difference of log-sum-exps)."""
    go = _grad_output(())
    out, grad = run_ours(s, t, go, backend, temperature=temperature, **kw)
    finite = torch.cat([s[torch.isfinite(s)], t[torch.isfinite(t)]])
    bound = 8 * torch.finfo(torch.float32).eps * (finite.abs().max().item() / temperature + 1)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert out.abs().max() <= bound
    assert grad.abs().max() <= bound * go.abs().item() / temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("kind", ["unit", "wide", "sharp", "near"])
def test_logit_scales(backend, divergence, beta, kind):
    _backend_ready(backend)
    s, t = _logits(16, 1000, kind)
    check_against_reference(s, t, backend, divergence=divergence, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no_labels"])
def test_reductions(backend, reduction, with_labels):
    _backend_ready(backend)
    s, t = _logits(10, 300)
    s, t = s.reshape(2, 5, 300), t.reshape(2, 5, 300)  # leading shape [2, 5]
    labels = _labels((2, 5), 300) if with_labels else None
    out, _ = check_against_reference(
        s, t, backend, divergence="jsd", beta=0.3, reduction=reduction, labels=labels
    )
    if reduction == "none":
        assert out.shape == (2, 5)
        if with_labels:
            assert (out[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(backend, as_tensor):
    _backend_ready(backend)
    s, t = _logits(12, 200)
    labels = _labels((12,), 200)
    num = 37
    kw = dict(labels=labels, num_items_in_batch=torch.tensor(num) if as_tensor else num)
    out, _ = check_against_reference(s, t, backend, **kw)
    total, _ = run_ours(s, t, _grad_output(()), backend, labels=labels, reduction="sum")
    torch.testing.assert_close(out, total / num, rtol=FP32_TOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("t_squared", [False, True], ids=["plain", "T2"])
def test_hard_label_weight(backend, weight, temperature, t_squared):
    _backend_ready(backend)
    s, t = _logits(8, 1000)
    labels = _labels((8,), 1000)
    check_against_reference(
        s,
        t,
        backend,
        divergence="reverse_kl",
        temperature=temperature,
        scale_by_temperature_squared=t_squared,
        labels=labels,
        hard_label_weight=weight,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_squared_scales_divergence_only(backend):
    _backend_ready(backend)
    s, t = _logits(6, 100)
    kw = dict(temperature=3.0, backend=backend)
    plain = distillation_loss(s, t, **kw)
    scaled = distillation_loss(s, t, scale_by_temperature_squared=True, **kw)
    torch.testing.assert_close(scaled, 9.0 * plain, rtol=FP32_TOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32], ids=["t_bf16", "t_fp32"])
def test_bf16_inputs(backend, divergence, beta, teacher_dtype):
    """bf16 logits, fp32 math: within 2x torch's own bf16 error, and within fp32 rounding of
    the float64 truth on the same inputs plus one bf16 rounding per gradient element (one ulp
    more under the interpreter)."""
    _backend_ready(backend)
    s, t = _logits(16, 1000)
    s, t = s.bfloat16(), t.to(teacher_dtype)
    labels = _labels((16,), 1000)
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, labels=labels)
    go = _grad_output(())
    ref, ref_grad = run_reference(s, t, go, **kw)
    torch_loss, torch_grad = run_reference(s, t, go, dtype=torch.bfloat16, **kw)
    out, grad = run_ours(s, t, go, backend, **kw)
    assert grad.dtype == torch.bfloat16
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    assert _rel_err(out, ref) <= 2 * _rel_err(torch_loss, ref)
    assert _rel_err(grad, ref_grad) <= 2 * _rel_err(torch_grad, ref_grad)
    ulps = 2.0 if backend == "triton" else 1.0
    check_values(out, grad, s, t, go, grad_rel=ulps * BF16_HALF_ULP, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_student_fp32_teacher(backend):
    _backend_ready(backend)
    s, t = _logits(8, 500)
    s = s.half()
    go = _grad_output(())
    out, grad = run_ours(s, t, go, backend, divergence="forward_kl")
    assert grad.dtype == torch.float16
    ulps = 2.0 if backend == "triton" else 1.0
    # fp16 storage: half an ulp per element (relative), half the smallest subnormal (absolute).
    check_values(out, grad, s, t, go, grad_rel=ulps * 2.0**-11, grad_abs=2.0**-25)


# ------------------------------------------------------------------------------------------------
# Masks, -inf logits, in-place gradient, teacher vocabulary.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_all_masked_batch(backend, reduction):
    """Every row ignored: loss 0, gradient exactly 0, no NaN, even with NaN logits in them."""
    _backend_ready(backend)
    s, t = _logits(5, 64)
    s[1] = float("nan")  # ignored rows are never read into the result
    t[2] = float("-inf")
    labels = torch.full((5,), -100)
    for kw in ({"hard_label_weight": 0.5}, {"divergence": "jsd"}):
        go = _grad_output((5,) if reduction == "none" else ())
        out, grad = run_ours(s, t, go, backend, labels=labels, reduction=reduction, **kw)
        assert (out == 0).all()
        assert (grad == 0).all()
    out, grad = run_ours(s, t, _grad_output(()), backend, labels=labels, num_items_in_batch=0)
    assert out == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_never_read(backend):
    _backend_ready(backend)
    s, t = _logits(6, 700)
    labels = _labels((6,), 700)
    labels[2] = -100
    kw = dict(labels=labels, divergence="jsd", beta=0.3, hard_label_weight=0.2)
    s_poisoned = s.clone()
    s_poisoned[labels == -100] = float("nan")
    go = _grad_output(())
    out, grad = run_ours(s_poisoned, t, go, backend, **kw)
    check_values(out, grad, s, t, go, **kw)
    assert (grad[labels == -100] == 0).all()


def _neg_inf_case(pattern: str, n: int, v: int):
    s, t = _logits(n, v)
    if pattern == "shared":  # masked vocabulary entries, the same in both
        mask = torch.rand(n, v) < 0.3
        mask[:, 0] = False
        s[mask] = t[mask] = float("-inf")
    elif pattern == "one_finite":  # whole rows -inf except one entry
        keep = torch.randint(0, v, (n,))
        s.fill_(float("-inf"))
        t.fill_(float("-inf"))
        s[torch.arange(n), keep] = torch.randn(n)
        t[torch.arange(n), keep] = torch.randn(n)
    elif pattern == "chunk":  # a whole leading vocabulary chunk -inf in both
        s[:, : v // 2] = float("-inf")
        t[:, : v // 2] = float("-inf")
    elif pattern == "student_only":  # q = 0 where p > 0: finite for reverse KL and JSD
        s[:, 1::3] = float("-inf")
    elif pattern == "teacher_only":  # p = 0 where q > 0: finite for forward KL and JSD
        t[:, 1::3] = float("-inf")
    return s, t


NEG_INF_CASES = [
    (pattern, divergence, beta)
    for pattern in ("shared", "one_finite", "chunk")
    for divergence, beta in DIVERGENCES[:3]
] + [
    ("student_only", "reverse_kl", 0.5),
    ("student_only", "jsd", 0.3),
    ("teacher_only", "forward_kl", 0.5),
    ("teacher_only", "jsd", 0.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("pattern", "divergence", "beta"), NEG_INF_CASES)
def test_neg_inf_logits(backend, pattern, divergence, beta):
    _backend_ready(backend)
    s, t = _neg_inf_case(pattern, 4, 4099 if pattern == "chunk" else 300)
    kw = dict(divergence=divergence, beta=beta, temperature=2.0)
    if pattern == "one_finite":  # p = q = one-hot
        assert_identical_distributions(s, t, backend, **kw)
    else:
        check_against_reference(s, t, backend, reduction="none", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_inplace_grad(backend, divergence, beta):
    """inplace_grad: the same gradients upstream, written over the logits' own buffer."""
    _backend_ready(backend)
    n, d, v = 12, 16, 333
    h = torch.randn(n, d)
    w = (torch.randn(v, d) / 4).requires_grad_(True)
    t = torch.randn(n, v) * 2
    labels = _labels((n,), v)
    kw = dict(divergence=divergence, beta=beta, labels=labels, hard_label_weight=0.25)
    grads = {}
    for inplace in (False, True):
        w.grad = None
        logits = h @ w.t()
        seen = {}
        logits.register_hook(lambda g, seen=seen: seen.update(ptr=g.data_ptr()))
        loss = distillation_loss(logits, t, backend=backend, inplace_grad=inplace, **kw)
        loss.backward(torch.tensor(1.7))
        grads[inplace] = w.grad.clone()
        assert (seen["ptr"] == logits.data_ptr()) == inplace
    assert torch.equal(grads[True], grads[False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_marks_logits_modified(backend):
    """Another user of the logits that saved them for backward fails loudly instead of
    silently reading gradient values."""
    _backend_ready(backend)
    s = torch.randn(4, 50, requires_grad=True)
    logits = s * 1.0
    t = torch.randn(4, 50)
    other = (logits**2).sum()  # saves `logits` for its backward
    loss = distillation_loss(logits, t, backend=backend, inplace_grad=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    _backend_ready(backend)
    s, t = _logits(4, 100)
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t, backend=backend, divergence="jsd").backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_vocab_truncate(backend):
    _backend_ready(backend)
    s, t = _logits(5, 251)
    t_big = torch.cat([t, torch.randn(5, 9) * 2], dim=1)  # e.g. a padded teacher vocabulary
    go = _grad_output(())
    out, grad = run_ours(s, t_big, go, backend, teacher_vocab="truncate")
    check_values(out, grad, s, t, go)
    with pytest.raises(ValueError, match="260.*251"):
        distillation_loss(s, t_big, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    _backend_ready(backend)
    s, t = _logits(6, 130)
    s_nc = s.t().contiguous().t()  # column-major: stride (1, 6)
    t_strided = torch.randn(12, 130)[::2]
    t_strided.copy_(t)
    check_against_reference(s_nc, t_strided, backend, divergence="reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    _backend_ready(backend)
    s, t = _logits(9, 50)
    labels = torch.randint(8, 50, (9,))  # targets other than 7
    labels[::3] = 7  # ignored rows; -100 is not special here
    out, grad = check_against_reference(
        s, t, backend, labels=labels, ignore_index=7, hard_label_weight=0.4, reduction="none"
    )
    assert (out[::3] == 0).all() and (grad[::3] == 0).all()
    assert (out[1::3] != 0).all()


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
def test_auto_backend_on_cpu_is_cpp(monkeypatch):
    import emalora_fast.distill.loss as loss_module

    assert loss_module._choose_backend("auto", "cpu", False) == "cpp"

    def not_this_path(*args, **kwargs):
        raise AssertionError("backend='auto' took the torch path on CPU")

    monkeypatch.setattr(loss_module, "_torch_fwd", not_this_path)
    monkeypatch.setattr(loss_module, "_torch_bwd", not_this_path)
    s, t = _logits(5, 300)
    kw = dict(divergence="reverse_kl", temperature=1.5)
    go = _grad_output(())
    out_auto, grad_auto = run_ours(s, t, go, "auto", **kw)
    out_cpp, grad_cpp = run_ours(s, t, go, "cpp", **kw)
    assert torch.equal(out_auto, out_cpp) and torch.equal(grad_auto, grad_cpp)


def test_module_matches_function():
    s, t = _logits(8, 100)
    labels = _labels((8,), 100)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.1)
    module = DistillationLoss(**kw)
    assert "jsd" in repr(module)
    torch.testing.assert_close(
        module(s, t, labels=labels), distillation_loss(s, t, labels=labels, **kw), rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------------------
# Launchers and ops that write into caller-provided buffers: poisoned buffers must be overwritten.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_triton_backward_overwrites_poisoned_output(divergence):
    kernels = pytest.importorskip("emalora_fast.kernels.distill_loss")
    s, t = _logits(5, 1100)
    labels = _labels((5,), 1100)
    args = (divergence, 0.3, 1.5, 0.8, 0.2, -100)
    _, stats = kernels.distill_loss_fwd(s, t, labels, *args)
    out = torch.full_like(s, float("nan"))
    kernels.distill_loss_bwd(s, t, labels, stats, torch.randn(5), *args, out=out)
    assert torch.isfinite(out).all()
    assert (out[labels == -100] == 0).all()


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
def test_cpp_outputs_are_fully_written():
    """Ignored rows get zeros in loss, stats and gradient even when their logits are NaN."""
    from emalora_fast.distill.loss import _cpp_ops

    ops = _cpp_ops()
    s, t = _logits(6, 1500)
    labels = _labels((6,), 1500)
    s[labels == -100] = float("nan")
    args = (2, 0.3, 1.5, 0.8, 0.2, -100)
    loss, stats = ops.distill_loss_fwd(s, t, labels, *args)
    assert torch.isfinite(loss).all() and torch.isfinite(stats).all()
    grad = ops.distill_loss_bwd(s, t, labels, stats, torch.randn(6), *args)
    assert torch.isfinite(grad).all()
    ops.distill_loss_bwd_(s, t, labels, stats, torch.randn(6), *args)
    assert torch.isfinite(s).all()
    assert (s[labels == -100] == 0).all()


# ------------------------------------------------------------------------------------------------
# float64 gradcheck, opcheck, torch.compile.
# ------------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    dict(divergence="forward_kl", temperature=0.7),
    dict(divergence="reverse_kl", temperature=2.0, hard_label_weight=0.3),
    dict(divergence="jsd", beta=0.3, temperature=1.0, hard_label_weight=0.5),
    dict(divergence="jsd", beta=0.6, temperature=1.5, reduction="none"),
]


@pytest.mark.parametrize("case", range(len(GRADCHECK_CASES)))
def test_gradcheck_reference(case):
    kw = GRADCHECK_CASES[case]
    s, t = _logits(3, 7)
    labels = _labels((3,), 7)
    s = s.double().requires_grad_(True)
    f = lambda x: distillation_loss_reference(x, t.double(), labels=labels, **kw)
    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("backend", [BACKENDS[0], BACKENDS[1]])
@pytest.mark.parametrize("case", range(len(GRADCHECK_CASES)))
def test_gradcheck_float64(backend, case):
    """The C++ op (and the torch path) take float64 logits and compute in float64."""
    kw = GRADCHECK_CASES[case]
    s, t = _logits(3, 7)
    labels = _labels((3,), 7)
    s = s.double().requires_grad_(True)
    f = lambda x: distillation_loss(x, t.double(), labels=labels, backend=backend, **kw)
    assert f(s).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (s,))
    ref = distillation_loss_reference(s, t.double(), labels=labels, **kw)
    torch.testing.assert_close(f(s), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
@pytest.mark.parametrize("divergence", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(divergence, dtype):
    from emalora_fast.distill.loss import _cpp_ops

    ops = _cpp_ops()
    s, t = _logits(5, 300)
    s, t = s.to(dtype), t.to(dtype)
    labels = _labels((5,), 300)
    for lab, ce in ((labels, 0.25), (None, 0.0)):
        args = (divergence, 0.3, 2.0, 0.75, ce, -100)
        torch.library.opcheck(ops.distill_loss_fwd.default, (s, t, lab, *args))
        _, stats = ops.distill_loss_fwd(s, t, lab, *args)
        bargs = (t, lab, stats, torch.randn(5), *args)
        torch.library.opcheck(ops.distill_loss_bwd.default, (s, *bargs))
        torch.library.opcheck(ops.distill_loss_bwd_.default, (s.clone(), *bargs))


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace_grad"])
def test_torch_compile_cpp(inplace):
    torch._dynamo.reset()
    n, d, v = 16, 8, 301
    h = torch.randn(n, d)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randn(n, v) * 2
    labels = _labels((n,), v)

    def step(h, w, t, labels):
        logits = h @ w.t()
        return distillation_loss(
            logits,
            t,
            labels=labels,
            divergence="jsd",
            beta=0.3,
            temperature=2.0,
            hard_label_weight=0.2,
            inplace_grad=inplace,
            backend="cpp",
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h, w, t, labels)
    out.backward()
    g_compiled, w.grad = w.grad, None
    eager = step(h, w, t, labels)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=FP32_TOL, atol=0)
    torch.testing.assert_close(g_compiled, w.grad, rtol=FP32_TOL, atol=1e-7)
    logits64 = h.double() @ w.detach().double().t()
    kw = dict(labels=labels, divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.2)
    ref = distillation_loss_reference(logits64, t.double(), **kw)
    loss_scale, _, _ = rounding_scales(logits64, t, torch.tensor(1.0), **kw)
    assert_within(out, ref, loss_scale, what="compiled loss")


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
def test_torch_compile_inductor_cpp():
    """The default (inductor) backend compiles a function using the loss, and it matches."""
    torch._dynamo.reset()
    s, t = _logits(8, 200)
    s.requires_grad_(True)

    def f(s, t):
        return distillation_loss(s * 1.5, t, divergence="reverse_kl", backend="cpp")

    out = torch.compile(f, fullgraph=True)(s, t)
    (g_compiled,) = torch.autograd.grad(out, s)
    eager = f(s, t)
    (g_eager,) = torch.autograd.grad(eager, s)
    torch.testing.assert_close(out, eager, rtol=FP32_TOL, atol=0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=FP32_TOL, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# TRL's generalized_jsd_loss convention.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_matches_trl_generalized_jsd(beta, temperature, reduction):
    """Our jsd equals TRL's generalized_jsd_loss (beta = 0: forward KL, 1: reverse KL)."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t = _logits(2 * 6, 500)
    s, t = s.reshape(2, 6, 500), t.reshape(2, 6, 500)
    labels = _labels((2, 6), 500)
    kw = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(s.double(), t.double(), **kw)
    ours = distillation_loss(s, t, divergence="jsd", **kw)
    torch.testing.assert_close(ours.double(), trl_loss, rtol=FP32_TOL, atol=0)
    # Without labels on [N, V] logits TRL's batchmean also divides by the N rows.
    trl_rows = gkd.GKDTrainer.generalized_jsd_loss(s[0].double(), t[0].double(), beta=beta)
    ours_rows = distillation_loss(s[0], t[0], divergence="jsd", beta=beta)
    torch.testing.assert_close(ours_rows.double(), trl_rows, rtol=FP32_TOL, atol=0)


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(t=torch.randn(3, 10)), ValueError, "leading shapes"),
    (dict(t=torch.randn(4, 12)), ValueError, "teacher vocabulary size 12 .* student .* 10"),
    (dict(t=torch.randn(4, 8), teacher_vocab="truncate"), ValueError, "8 .* 10"),
    (dict(s=torch.randint(0, 5, (4, 10))), TypeError, "floating point"),
    (dict(t=torch.randint(0, 5, (4, 10))), TypeError, "floating point"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels of shape"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels of shape"),
    (dict(labels=torch.zeros(4)), TypeError, "integer"),
    (dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError, "integer"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(teacher_vocab="pad"), ValueError, "teacher_vocab"),
    (dict(hard_label_weight=0.5), ValueError, "needs labels"),
    (dict(hard_label_weight=1.5, labels=torch.zeros(4, dtype=torch.long)), ValueError, "weight"),
    (dict(reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch"),
    (dict(s=torch.randn(4, 0), t=torch.randn(4, 0)), ValueError, "empty"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(kwargs, error, match):
    kwargs = dict(kwargs)
    s = kwargs.pop("s", torch.randn(4, 10))
    t = kwargs.pop("t", torch.randn(4, 10))
    with pytest.raises(error, match=match):
        distillation_loss(s, t, **kwargs)


def test_triton_rejects_float64():
    pytest.importorskip("triton")
    s = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        distillation_loss(s, s.clone(), backend="triton")


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
def test_cpp_rejects_out_of_range_label():
    s = torch.randn(3, 10)
    labels = torch.tensor([1, 10, -100])
    with pytest.raises(RuntimeError, match="label 10 .* outside"):
        distillation_loss(s, s.clone(), labels=labels, hard_label_weight=0.5, backend="cpp")


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
def test_cpp_baseline_isa_build():
    """The C++ op's row loops exist in an AVX2 + FMA build (chosen at run time) and a baseline
    build; this process tests one of them, a fresh process with EMALORA_DISABLE_AVX2 the other."""
    env = dict(os.environ, EMALORA_DISABLE_AVX2="1", OMP_NUM_THREADS="2")
    probe = "import torch, emalora_fast._C; print(torch.ops.emalora_fast.distill_loss_cpu_isa())"
    isa = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert isa.stdout.strip() == "baseline", isa.stderr
    selected = (
        "cpp and (test_matches_reference or test_neg_inf or test_bf16 or test_hard_label"
        " or test_gradcheck_float64)"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", selected],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


# ------------------------------------------------------------------------------------------------
# Peak memory (CPU): the C++ op against naive torch, each in a fresh process.
# ------------------------------------------------------------------------------------------------
# Peak RSS from /proc/self/status: clear_refs 5 resets the high-water mark (VmHWM) to the current
# RSS right before the call. (ru_maxrss would do on its own only if the parent's resident size,
# which Linux carries into a freshly exec'd child's maxrss, stayed below the child's.)
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.nn.functional as F
    from emalora_fast import distillation_loss
    provider, n, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field + ":"))
    def run(s, t):
        if provider == "naive":
            loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                            reduction="batchmean")
        else:
            loss = distillation_loss(s, t, backend="cpp", inplace_grad=provider == "inplace")
        loss.backward()
        return s.grad
    small = torch.randn(4, 64, requires_grad=True)
    run(small, torch.randn(4, 64))  # warm-up: libraries and thread pools
    s = torch.randn(n, v).requires_grad_(True)
    t = torch.randn(n, v)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    grad = run(s, t)
    after = status("VmHWM")
    assert torch.isfinite(grad).all()
    print(after - before)
    """
)


def _extra_peak_bytes(provider: str, n: int, v: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, provider, str(n), str(v)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_vs_naive():
    """N=4096, V=32000 fp32 forward KL: extra peak memory beyond the inputs and the gradient
    is at most 5% of naive torch's (growth of peak RSS during forward + backward, each provider
    in a fresh process)."""
    n, v = 4096, 32000
    grad_bytes = n * v * 4
    naive = _extra_peak_bytes("naive", n, v) - grad_bytes
    ours = _extra_peak_bytes("cpp", n, v) - grad_bytes
    inplace = _extra_peak_bytes("inplace", n, v)  # no gradient buffer at all
    assert naive > 2 * grad_bytes  # the measurement sees naive's [N, V] temporaries
    assert ours <= 0.05 * naive, f"ours {ours / 2**20:.0f} MiB vs naive {naive / 2**20:.0f} MiB"
    assert inplace <= 0.05 * naive, f"inplace {inplace / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA).
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda(divergence, beta, dtype):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA device and the compiled (not interpreted) Triton")
    s, t = _logits(256, 32011)
    s, t = s.to(dtype), t.to(dtype)
    labels = _labels((256,), 32011)
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, hard_label_weight=0.1)
    go = _grad_output(())
    out, grad = run_ours(s.cuda(), t.cuda(), go.cuda(), "triton", labels=labels.cuda(), **kw)
    grad_rel = 0.0 if dtype == torch.float32 else BF16_HALF_ULP
    check_values(out.cpu(), grad.cpu(), s, t, go, grad_rel=grad_rel, labels=labels, **kw)
