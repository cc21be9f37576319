"""fused_linear_distillation_loss on every backend against the float64 reference and against
distillation_loss on materialized logits.

The oracle is ``emalora_fast.reference.fused_linear_distillation_loss_reference`` in float64 on the
same (exactly representable) inputs, its gradients from autograd. Tolerances come from the dtype:

- fp32 inputs: relative error (norm and max-abs) of the loss and of each gradient (hidden states,
  weight, bias) <= 1e-5, or <= 2.5x the error of torch's own fp32 evaluation (materialized logits,
  then the reference formulas) where that is larger;
- bf16 inputs: <= 2x torch's own bf16 error (bf16 logits, bf16 formulas), and the loss at fp32
  accuracy (our logits are fp32 dot products of the bf16 inputs).

The comparison with ``distillation_loss`` allows the sum of both paths' bounds. Triton runs under
its interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), on small shapes.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err as _rel_err

import emalora_fast.distill.fused_linear as fl_mod
import emalora_fast.distill.fused_linear_paths as fl_paths
from emalora_fast import (
    FusedLinearDistillationLoss,
    distillation_loss,
    fused_linear_distillation_loss,
)
from emalora_fast._dispatch import cpp_available
from emalora_fast.reference import fused_linear_distillation_loss_reference

BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(not cpp_available(), reason="emalora_fast._C is not built"),
    ),
    "triton",
]
CHUNKED = [b for b in BACKENDS if b != "triton"]

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
DIV_IDS = ["fkl", "rkl", "jsd0.3", "jsd0", "jsd1"]

FP32_TOL = 1e-5
TORCH_ERR_FACTOR = 2.5


def _ready(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")


# ------------------------------------------------------------------------------------------------
# Error measures.
# ------------------------------------------------------------------------------------------------
def _max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| relative to max |ref|."""
    if out.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    diff = (out.double() - ref.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def _bounds(ref, tol, baselines=()):
    """(relative-norm, max-abs) bounds: tol, or TORCH_ERR_FACTOR x the largest error of the
    baseline fp32 evaluations."""
    rel = abs_ = tol
    for base in baselines:
        rel = max(rel, TORCH_ERR_FACTOR * _rel_err(base, ref))
        abs_ = max(abs_, TORCH_ERR_FACTOR * _max_abs_err(base, ref))
    return rel, abs_


def assert_close(out, ref, bounds, what=""):
    """Relative-norm and max-abs check; NaN never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    rel, max_abs = _rel_err(out, ref), _max_abs_err(out, ref)
    assert rel <= bounds[0], f"{what}: relative error {rel:.3e} > {bounds[0]:.1e}"
    assert max_abs <= bounds[1], f"{what}: max abs error {max_abs:.3e} > {bounds[1]:.1e}"


# ------------------------------------------------------------------------------------------------
# Problems and runners.
# ------------------------------------------------------------------------------------------------
def make_problem(n, h, v, head="separate", bias=True, kind="unit", h_t=None, v_t=None, lead=None):
    """Hidden states, heads and biases; ``head`` is "shared" (one weight tensor, one bias) or
    "separate"; ``kind`` sets the logits' character."""
    h_t = h_t or h
    v_t = v_t or v
    scale = {"unit": 2.0, "wide": 12.0, "sharp": 1.0, "near": 2.0}[kind]
    hs = torch.randn(n, h)
    ws = torch.randn(v, h) * (scale / math.sqrt(h))
    bs = torch.randn(v) if bias else None
    if head == "shared":
        ht, wt, bt = torch.randn(n, h), ws, bs
    else:
        ht = torch.randn(n, h_t)
        wt = torch.randn(v_t, h_t) * (scale / math.sqrt(h_t))
        bt = torch.randn(v_t) if bias else None
    if kind == "wide" and bias:
        bs += 30.0
    if kind == "sharp":  # a confident teacher: one vocabulary entry dominates each row
        top = torch.randint(0, min(v, v_t), (n,))
        wt = wt.clone() if head == "shared" else wt
        ht = ht.clone()
        ht[torch.arange(n), 0] += 25.0 * math.sqrt(h_t)
        wt[:, 0] = 0.0
        wt[top, 0] = 1.0 / math.sqrt(h_t)
        if head == "shared":
            ws = wt
    if kind == "near":  # self-distillation: teacher close to student
        ht = hs + 0.05 * torch.randn(n, h)
        if head != "shared":
            wt = ws + 0.01 * torch.randn(v, h)
    p = dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, bt=bt)
    if lead is not None:
        p["hs"] = p["hs"].reshape(*lead, h)
        p["ht"] = p["ht"].reshape(*lead, h_t)
    return p


def make_labels(shape, v, ignored=0.25, ignore_index=-100):
    labels = torch.randint(0, v, shape)
    labels[torch.rand(shape) < ignored] = ignore_index
    if labels.numel() > 1:  # at least one valid row and one ignored row
        labels.view(-1)[0] = torch.randint(0, v, ()).item()
        labels.view(-1)[-1] = ignore_index
    return labels


def grad_output(shape) -> torch.Tensor:
    """A grad_output away from 1: random magnitude and sign."""
    return torch.randn(shape, dtype=torch.float64) * 3.0


def _leaves(p, dtype=None, grad=True):
    """Copies of the problem's tensors (cast to ``dtype``); the shared weight stays one tensor."""
    out = {}
    for k in ("hs", "ws", "bs", "ht"):
        x = p[k]
        if x is not None:
            x = x.detach().to(dtype or x.dtype).clone().requires_grad_(grad)
        out[k] = x
    shared = p["wt"] is p["ws"]
    out["wt"] = out["ws"] if shared else p["wt"].detach().to(dtype or p["wt"].dtype).clone()
    bt = p["bt"]
    if bt is p["bs"]:
        out["bt"] = out["bs"]
    elif bt is not None:
        out["bt"] = bt.detach().to(dtype or bt.dtype).clone()
    else:
        out["bt"] = None
    if not shared:  # the teacher's tensors require grad too: they must get none
        out["wt"].requires_grad_(grad)
        if out["bt"] is not None:
            out["bt"].requires_grad_(grad)
    out["ht"].requires_grad_(grad)
    return out


def _grads(x):
    return {k: x[k].grad for k in ("hs", "ws", "bs") if x[k] is not None}


def run_ours(p, go, backend, **kw):
    x = _leaves(p)
    out = fused_linear_distillation_loss(
        x["hs"], x["ws"], x["ht"], x["wt"], student_bias=x["bs"], teacher_bias=x["bt"],
        backend=backend, **kw,
    )  # fmt: skip
    out.backward(go.to(out.dtype))
    assert x["ht"].grad is None, "the teacher hidden states got a gradient"
    if x["wt"] is not x["ws"]:
        assert x["wt"].grad is None, "the teacher weight got a gradient"
    if x["bt"] is not None and x["bt"] is not x["bs"]:
        assert x["bt"].grad is None, "the teacher bias got a gradient"
    return out.detach(), _grads(x)


def run_reference(p, go, dtype=torch.float64, **kw):
    x = _leaves(p, dtype)
    out = fused_linear_distillation_loss_reference(
        x["hs"], x["ws"], x["ht"], x["wt"], student_bias=x["bs"], teacher_bias=x["bt"], **kw
    )
    out.backward(go.to(dtype))
    return out.detach(), _grads(x)


def run_materialized(p, go, backend, softcap=None, teacher_vocab="error", **kw):
    """distillation_loss on logits built with F.linear (fp32), through autograd."""
    x = _leaves(p)
    with torch.no_grad():
        t = F.linear(x["ht"], x["wt"], x["bt"])
        if softcap is not None:
            t = softcap * torch.tanh(t / softcap)
    s = F.linear(x["hs"], x["ws"], x["bs"])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    out = distillation_loss(s, t, backend=backend, teacher_vocab=teacher_vocab, **kw)
    out.backward(go.to(out.dtype))
    return out.detach(), _grads(x)


def check(p, backend, go_shape=(), **kw):
    """Loss and gradients against float64 and against the materialized logits loss."""
    go = grad_output(go_shape)
    ref, ref_g = run_reference(p, go, **kw)
    base, base_g = run_reference(p, go, dtype=torch.float32, **kw)
    out, g = run_ours(p, go, backend, **kw)
    mat, mat_g = run_materialized(p, go, backend, **kw)
    assert out.dtype == torch.float32
    # fp32's own error varies with the draw and the summation order: bound by the larger of two
    # independent fp32 evaluations (torch's, and the logits loss on materialized logits).
    b = _bounds(ref, FP32_TOL, [base, mat])
    assert_close(out, ref, b, "loss")
    assert_close(out, mat, (b[0] + _rel_err(mat, ref), b[1] + _max_abs_err(mat, ref)), "loss/mat")
    assert set(g) == set(ref_g)
    for k in g:
        assert g[k].dtype == p[k].dtype
        b = _bounds(ref_g[k], FP32_TOL, [base_g[k], mat_g[k]])
        assert_close(g[k], ref_g[k], b, f"grad {k}")
        mb = (b[0] + _rel_err(mat_g[k], ref_g[k]), b[1] + _max_abs_err(mat_g[k], ref_g[k]))
        assert_close(g[k], mat_g[k], mb, f"grad {k}/mat")
    return out, g


# ------------------------------------------------------------------------------------------------
# Values and gradients.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("n", "h", "v"), [(13, 19, 97), (37, 40, 300)])
def test_matches_reference(backend, divergence, beta, temperature, n, h, v):
    _ready(backend)
    p = make_problem(n, h, v)
    labels = make_labels((n,), v)
    check(p, backend, divergence=divergence, beta=beta, temperature=temperature, labels=labels)


HEADS = [
    dict(head="shared"),
    dict(head="shared", bias=False),
    dict(head="separate", bias=False),
    dict(head="separate", h_t=27),  # a teacher of another hidden size
    dict(head="separate", v_t=161),  # a padded teacher vocabulary, truncated
]
HEAD_IDS = ["shared", "shared_nobias", "separate_nobias", "teacher_h27", "truncate"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("head", range(len(HEADS)), ids=HEAD_IDS)
def test_heads(backend, divergence, beta, head):
    """Shared vs separate heads: the teacher gets no gradient (run_ours asserts it); a shared
    weight gets exactly the student's gradient."""
    _ready(backend)
    cfg = HEADS[head]
    p = make_problem(21, 24, 150, **cfg)
    kw = dict(divergence=divergence, beta=beta, temperature=1.5, labels=make_labels((21,), 150))
    if "v_t" in cfg:
        kw["teacher_vocab"] = "truncate"
    check(p, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_head_is_detected_for_views(backend):
    """A second view of the same storage counts as the same head (one load per tile)."""
    _ready(backend)
    p = make_problem(9, 16, 70, head="shared")
    alias = p["ws"].view(p["ws"].shape)
    assert fl_mod._same(p["ws"], alias) and not fl_mod._same(p["ws"], p["ws"].clone())
    go = grad_output(())
    ref, ref_g = run_reference(p, go)
    x = _leaves(p)
    out = fused_linear_distillation_loss(
        x["hs"], x["ws"], x["ht"], x["ws"].view(x["ws"].shape), student_bias=x["bs"],
        teacher_bias=x["bs"], backend=backend,
    )  # fmt: skip
    out.backward(go.float())
    assert_close(out, ref, (FP32_TOL, FP32_TOL), "loss")
    base, base_g = run_reference(p, go, dtype=torch.float32)
    assert_close(x["ws"].grad, ref_g["ws"], _bounds(ref_g["ws"], FP32_TOL, [base_g["ws"]]), "W")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no_labels"])
def test_reductions(backend, reduction, with_labels):
    _ready(backend)
    p = make_problem(10, 12, 80, lead=(2, 5))
    labels = make_labels((2, 5), 80, ignore_index=-1) if with_labels else None
    kw = dict(divergence="jsd", beta=0.3, reduction=reduction, labels=labels, ignore_index=-1)
    out, _ = check(p, backend, go_shape=(2, 5) if reduction == "none" else (), **kw)
    if reduction == "none":
        assert out.shape == (2, 5)
        if with_labels:
            assert (out[labels == -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(backend, as_tensor):
    _ready(backend)
    p = make_problem(12, 16, 90)
    labels = make_labels((12,), 90)
    num = 37
    kw = dict(labels=labels, num_items_in_batch=torch.tensor(num) if as_tensor else num)
    out, _ = check(p, backend, **kw)
    total, _ = run_ours(p, grad_output(()), backend, labels=labels, reduction="sum")
    torch.testing.assert_close(out, total / num, rtol=FP32_TOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("t_squared", [False, True], ids=["plain", "T2"])
def test_hard_label_weight(backend, weight, temperature, t_squared):
    _ready(backend)
    p = make_problem(11, 16, 130)
    check(
        p,
        backend,
        divergence="reverse_kl",
        temperature=temperature,
        scale_by_temperature_squared=t_squared,
        labels=make_labels((11,), 130),
        hard_label_weight=weight,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("head", ["shared", "separate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_softcap(backend, divergence, beta, head, bias):
    """Gemma's c tanh(z / c) on logits well beyond c (the cap bites)."""
    _ready(backend)
    p = make_problem(14, 20, 110, head=head, bias=bias, kind="wide")
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, softcap=15.0)
    check(p, backend, labels=make_labels((14,), 110), hard_label_weight=0.1, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("kind", ["wide", "sharp", "near"])
def test_logit_scales(backend, divergence, beta, kind):
    _ready(backend)
    p = make_problem(16, 24, 200, head="shared" if kind == "near" else "separate", kind=kind)
    check(p, backend, divergence=divergence, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_bf16_inputs(backend, divergence, beta, head):
    """bf16 hidden states and heads: fp32 logits and math. Loss and gradients within 2x torch's
    own bf16 error; the loss at fp32 accuracy."""
    _ready(backend)
    p = make_problem(16, 32, 200, head=head)
    p = {k: (x if x is None else x.bfloat16()) for k, x in p.items()}
    if head == "shared":
        p["wt"], p["bt"] = p["ws"], p["bs"]
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, labels=make_labels((16,), 200))
    go = grad_output(())
    ref, ref_g = run_reference(p, go, **kw)
    base, base_g = run_reference(p, go, dtype=torch.bfloat16, **kw)
    out, g = run_ours(p, go, backend, **kw)
    assert out.dtype == torch.float32
    loss_err = _rel_err(out, ref)
    assert loss_err <= 2 * _rel_err(base, ref)
    assert loss_err <= 10 * FP32_TOL
    for k in g:
        assert g[k].dtype == torch.bfloat16
        assert torch.isfinite(g[k]).all()
        err, torch_err = _rel_err(g[k], ref_g[k]), _rel_err(base_g[k], ref_g[k])
        assert err <= 2 * torch_err, f"grad {k}: {err:.2e} > 2 x {torch_err:.2e}"


# ------------------------------------------------------------------------------------------------
# Masks, tiling, buffers.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_all_masked_batch(backend, reduction):
    """Every row ignored: loss 0 and gradients exactly 0, even with NaN hidden states."""
    _ready(backend)
    p = make_problem(6, 16, 70)
    p["hs"][1] = float("nan")
    p["ht"][2] = float("nan")
    labels = torch.full((6,), -100)
    for kw in ({"hard_label_weight": 0.5, "softcap": 5.0}, {"divergence": "jsd"}):
        go = grad_output((6,) if reduction == "none" else ())
        out, g = run_ours(p, go, backend, labels=labels, reduction=reduction, **kw)
        assert (out == 0).all()
        for k in g:
            assert (g[k] == 0).all(), k
    out, g = run_ours(p, grad_output(()), backend, labels=labels, num_items_in_batch=0)
    assert out == 0 and all((x == 0).all() for x in g.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_ignored_rows_are_never_read(backend, divergence, beta):
    _ready(backend)
    p = make_problem(20, 16, 120)
    labels = make_labels((20,), 120)
    kw = dict(labels=labels, divergence=divergence, beta=beta, hard_label_weight=0.2, softcap=8.0)
    go = grad_output(())
    ref, ref_g = run_reference(p, go, **kw)
    base, base_g = run_reference(p, go, dtype=torch.float32, **kw)
    poisoned = dict(p)
    for k in ("hs", "ht"):
        poisoned[k] = p[k].clone()
        poisoned[k][labels == -100] = float("nan")
    out, g = run_ours(poisoned, go, backend, **kw)
    assert_close(out, ref, _bounds(ref, FP32_TOL, [base]), "loss")
    for k in g:
        assert_close(g[k], ref_g[k], _bounds(ref_g[k], FP32_TOL, [base_g[k]]), k)
    assert (g["hs"][labels == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_masked_vocabulary_bias(backend, divergence, beta):
    """-inf bias entries (a masked or padded vocabulary) in both heads: finite loss and
    gradients, equal to the reference's (zero for the masked entries)."""
    _ready(backend)
    p = make_problem(11, 16, 150, head="shared")
    p["bs"][::7] = float("-inf")
    labels = make_labels((11,), 150)
    labels[labels % 7 == 0] = 1  # no label on a masked entry
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, hard_label_weight=0.2)
    _, g = check(p, backend, labels=labels, **kw)
    assert (g["bs"][::7] == 0).all() and (g["ws"][::7] == 0).all()


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_chunking(backend, head, monkeypatch):
    """Several row chunks with a remainder (3 rows per chunk of 20) give the same result."""
    monkeypatch.setattr(fl_paths, "_CHUNK_ELEMENTS", 3 * 150 + 7)
    assert fl_paths._chunk_rows(20, 150) == 3
    p = make_problem(20, 16, 150, head=head)
    kw = dict(divergence="jsd", beta=0.3, labels=make_labels((20,), 150), hard_label_weight=0.2)
    check(p, backend, softcap=6.0, **kw)


TILINGS = [(16, 16, 16, 1), (16, 32, 32, 3), (32, 64, 16, 7), (16, 128, 64, 2)]


@pytest.mark.parametrize("tiling", TILINGS, ids=["-".join(map(str, t)) for t in TILINGS])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_triton_tilings(tiling, divergence, beta, monkeypatch):
    """Block sizes (BLOCK_N, BLOCK_V, BLOCK_K) and vocabulary splits of pass 1: partial blocks
    on every axis (N = 40, H = 33, V = 200), more splits than a program's tiles, one split."""
    kernels = pytest.importorskip("emalora_fast.kernels.fused_linear")
    block_n, block_v, block_k, splits = tiling
    monkeypatch.setattr(kernels, "default_blocks", lambda *a: (block_n, block_v, block_k))
    monkeypatch.setattr(kernels, "_splits", lambda *a: splits)
    p = make_problem(40, 33, 200)
    kw = dict(divergence=divergence, beta=beta, temperature=0.7, labels=make_labels((40,), 200))
    check(p, "triton", hard_label_weight=0.3, **kw)


@pytest.mark.parametrize(("mode", "chunk"), [("atomic", None), ("gemm", 16)])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_triton_backward_forms(mode, chunk, divergence, beta, head, monkeypatch):
    """Both gradient forms against the reference: relaxed atomic adds in grouped program order
    (more token blocks than a group), and g per row chunk then two GEMMs (three chunks of 16
    rows, the last one partial, grad_W accumulated over them)."""
    kernels = pytest.importorskip("emalora_fast.kernels.fused_linear")
    monkeypatch.setenv("EMALORA_FUSED_LINEAR_BACKWARD", mode)
    monkeypatch.setattr(kernels, "GROUP_N", 2)
    calls = []
    for name in ("fused_linear_bwd_launch", "fused_linear_grad_launch"):
        real = getattr(kernels, name)

        def counting(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(kernels, name, counting)
    if chunk:
        monkeypatch.setattr(kernels, "_chunk_rows", lambda *a: chunk)
    p = make_problem(40, 33, 200, head=head)
    kw = dict(divergence=divergence, beta=beta, temperature=0.7, labels=make_labels((40,), 200))
    check(p, "triton", hard_label_weight=0.3, softcap=5.0, **kw)
    # One backward per check (ours; the materialized run uses the logits loss).
    want = ["fused_linear_bwd_launch"] if mode == "atomic" else ["fused_linear_grad_launch"] * 3
    assert calls == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_poisoned_buffers_are_overwritten(backend, divergence, beta, monkeypatch):
    """Every uninitialized buffer the kernels or the chunk loop fill starts as NaN here."""
    _ready(backend)

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fl_paths, "_new_empty", poisoned)
    monkeypatch.setattr(fl_paths, "_CHUNK_ELEMENTS", 4 * 100)
    if backend == "triton":
        kernels = pytest.importorskip("emalora_fast.kernels.fused_linear")
        monkeypatch.setattr(kernels, "_new_empty", poisoned)
        monkeypatch.setattr(kernels, "_splits", lambda *a: 2)
    p = make_problem(18, 16, 100)
    kw = dict(divergence=divergence, beta=beta, labels=make_labels((18,), 100), softcap=4.0)
    check(p, backend, go_shape=(18,), reduction="none", hard_label_weight=0.5, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_backward_twice(backend):
    """A second backward through a retained graph gives the same gradients (the chunked path
    formed the first ones in forward and recomputes for the second)."""
    _ready(backend)
    p = make_problem(15, 16, 90, head="shared")
    x = _leaves(p)
    out = fused_linear_distillation_loss(
        x["hs"], x["ws"], x["ht"], x["ws"], student_bias=x["bs"], teacher_bias=x["bs"],
        labels=make_labels((15,), 90), divergence="jsd", beta=0.3, backend=backend,
    )  # fmt: skip
    out.backward(torch.tensor(0.7), retain_graph=True)
    first = {k: g.clone() for k, g in _grads(x).items()}
    for k in first:
        x[k].grad = None
    out.backward(torch.tensor(-1.9))
    for k, g in _grads(x).items():
        torch.testing.assert_close(g, first[k] * (-1.9 / 0.7), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward(backend):
    """Under no_grad the loss is the same and no gradient work is kept around."""
    _ready(backend)
    p = make_problem(9, 8, 60)
    x = _leaves(p)
    args = (x["hs"], x["ws"], x["ht"], x["wt"])
    kw = dict(student_bias=x["bs"], teacher_bias=x["bt"], backend=backend)
    with torch.no_grad():
        quiet = fused_linear_distillation_loss(*args, **kw)
    loud = fused_linear_distillation_loss(*args, **kw)
    assert quiet.grad_fn is None and loud.grad_fn is not None
    torch.testing.assert_close(quiet, loud.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    _ready(backend)
    p = make_problem(0, 8, 50)
    out, g = run_ours(p, grad_output(()), backend, labels=torch.zeros(0, dtype=torch.long))
    assert out == 0
    assert g["hs"].shape == (0, 8) and (g["ws"] == 0).all() and (g["bs"] == 0).all()


# ------------------------------------------------------------------------------------------------
# Gradient filtering (off by default).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_filter(backend):
    """eps = 0 skips only all-zero tiles (exact); eps = 1e-3 skips the tiles of a vocabulary tail
    that both models all but rule out, and each gradient's error stays within
    eps |grad_output_i| times the skipped |W| (|h|, 1) mass."""
    _ready(backend)
    n, h, v = 24, 16, 1000
    p = make_problem(n, h, v, head="shared")
    p["bs"][:50] += 25.0  # both models put nearly all mass on the first 50 entries
    labels = make_labels((n,), v)
    go = grad_output((n,))
    kw = dict(reduction="none", labels=labels)
    exact_loss, exact = run_ours(p, go, backend, **kw)
    zero_loss, zero = run_ours(p, go, backend, grad_filter_eps=0.0, **kw)
    torch.testing.assert_close(zero_loss, exact_loss, rtol=0, atol=0)
    for k in exact:
        torch.testing.assert_close(zero[k], exact[k], rtol=1e-6, atol=1e-7)
    eps = 1e-3
    _, filt = run_ours(p, go, backend, grad_filter_eps=eps, **kw)
    # Every tile (<= 256 columns wide on every backend) beyond column 256 is skipped.
    assert (filt["ws"][256:] == 0).all() and (filt["bs"][256:] == 0).all()
    assert (exact["ws"][256:] != 0).any()
    w_go = (go.abs() * (labels != -100).double())[:, None]
    bounds = {
        "hs": eps * w_go * p["ws"].double().abs().sum(0)[None, :],
        "ws": eps * (w_go * p["hs"].double().abs()).sum(0)[None, :].expand(v, h),
        "bs": eps * w_go.sum().expand(v),
    }
    for k, bound in bounds.items():
        diff = (filt[k].double() - exact[k].double()).abs()
        assert (diff <= bound + 1e-5 * exact[k].abs().max().item()).all(), k
        rel = _rel_err(filt[k], exact[k])
        assert rel < 1e-2, f"{k}: relative error {rel:.2e}"


# ------------------------------------------------------------------------------------------------
# float64, module, errors.
# ------------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    dict(divergence="forward_kl", temperature=0.7, softcap=2.0),
    dict(divergence="reverse_kl", temperature=2.0, hard_label_weight=0.3),
    dict(divergence="jsd", beta=0.3, hard_label_weight=0.5, softcap=3.0),
    dict(divergence="jsd", beta=0.6, temperature=1.5, reduction="none"),
]


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("case", range(len(GRADCHECK_CASES)))
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_gradcheck_float64(backend, case, head):
    """float64 inputs: float64 math on the chunked path, gradcheck-exact and equal to the
    reference to 1e-12. A shared head (weight and bias) is the teacher's too, so finite
    differences in it would move the teacher: there gradcheck covers the hidden states, and the
    head's gradients are compared with the reference's."""
    kw = GRADCHECK_CASES[case]
    p = make_problem(4, 3, 7, head=head)
    labels = make_labels((4,), 7)
    hs, ws, bs = (p[k].double().requires_grad_(True) for k in ("hs", "ws", "bs"))
    ht = p["ht"].double()
    wt, bt = (ws, bs) if head == "shared" else (p["wt"].double(), p["bt"].double())

    def f(hs, ws, bs, impl=backend):
        loss = fused_linear_distillation_loss_reference if impl == "reference" else partial(
            fused_linear_distillation_loss, backend=impl
        )  # fmt: skip
        twt, tbt = (ws, bs) if head == "shared" else (wt, bt)
        return loss(hs, ws, ht, twt, student_bias=bs, teacher_bias=tbt, labels=labels, **kw)

    out = f(hs, ws, bs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, f(hs, ws, bs, "reference"), rtol=1e-12, atol=1e-14)
    if head == "separate":
        assert torch.autograd.gradcheck(f, (hs, ws, bs))
    else:
        assert torch.autograd.gradcheck(lambda hs: f(hs, ws, bs), (hs,))
        go = torch.randn(out.shape, dtype=torch.float64)
        g_ours = torch.autograd.grad(f(hs, ws, bs), (ws, bs), go)
        g_ref = torch.autograd.grad(f(hs, ws, bs, "reference"), (ws, bs), go)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)


def test_module_matches_function():
    p = make_problem(8, 16, 100)
    labels = make_labels((8,), 100)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.1, softcap=9.0)
    module = FusedLinearDistillationLoss(**kw)
    assert "jsd" in repr(module) and "softcap=9.0" in repr(module)
    args = (p["hs"], p["ws"], p["ht"], p["wt"])
    biases = dict(student_bias=p["bs"], teacher_bias=p["bt"])
    torch.testing.assert_close(
        module(*args, labels=labels, **biases),
        fused_linear_distillation_loss(*args, labels=labels, **biases, **kw),
        rtol=0,
        atol=0,
    )


def _bad(**over):
    base = dict(
        hs=torch.randn(4, 8), ws=torch.randn(10, 8), ht=torch.randn(4, 8), wt=torch.randn(10, 8)
    )
    base.update(over)
    return base


BAD_INPUTS = [
    (_bad(ht=torch.randn(3, 8)), ValueError, "leading shapes"),
    (_bad(hs=torch.randn(4, 7)), ValueError, "hidden size 8"),
    (_bad(ws=torch.randn(10, 8, 1)), ValueError, "2-D"),
    (_bad(wt=torch.randn(12, 8)), ValueError, "teacher vocabulary size 12 .* 10"),
    (_bad(wt=torch.randn(8, 8), teacher_vocab="truncate"), ValueError, "8 .* 10"),
    (_bad(hs=torch.randint(0, 5, (4, 8))), TypeError, "floating point"),
    (_bad(ws=torch.randn(10, 8).double()), TypeError, "dtype"),
    (_bad(student_bias=torch.randn(9)), ValueError, "student_bias"),
    (_bad(teacher_bias=torch.randn(10).double()), ValueError, "teacher_bias"),
    (_bad(student_bias=[0.0] * 10), TypeError, "student_bias"),
    (_bad(ws=torch.randn(0, 8), wt=torch.randn(0, 8)), ValueError, "vocabulary .* empty"),
    (_bad(hs=torch.randn(4, 0), ws=torch.randn(10, 0)), ValueError, "hidden .* empty"),
    (_bad(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels of shape"),
    (_bad(labels=torch.zeros(4)), TypeError, "integer"),
    (_bad(divergence="jsd", beta=1.5), ValueError, "beta"),
    (_bad(temperature=0.0), ValueError, "temperature"),
    (_bad(divergence="kl"), ValueError, "divergence"),
    (_bad(reduction="avg"), ValueError, "reduction"),
    (_bad(softcap=0.0), ValueError, "softcap"),
    (_bad(softcap=math.inf), ValueError, "softcap"),
    (_bad(grad_filter_eps=-1.0), ValueError, "grad_filter_eps"),
    (_bad(hard_label_weight=0.5), ValueError, "needs labels"),
    (_bad(reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch"),
    (_bad(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(kwargs, error, match):
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("hs", "ws", "ht", "wt")]
    with pytest.raises(error, match=match):
        fused_linear_distillation_loss(*args, **kwargs)


def test_triton_rejects_float64():
    pytest.importorskip("triton")
    h, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fused_linear_distillation_loss(h, w, h, w, backend="triton")


# ------------------------------------------------------------------------------------------------
# Peak memory (CPU): ours against the materializing reference, each in a fresh process.
# ------------------------------------------------------------------------------------------------
def _extra_peak_bytes(provider: str, n: int, h: int, v: int) -> tuple[int, int]:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "emalora_fast.benchmarks.fused_linear", "memory", provider]
    proc = subprocess.run(
        [*cmd, str(n), str(h), str(v)], capture_output=True, text=True, env=env, check=True
    )
    lower, upper = proc.stdout.strip().splitlines()[-1].split()
    return int(lower), int(upper)


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="needs ru_maxrss")
def test_peak_memory_vs_reference():
    """N=2048, H=512, V=32000 fp32, shared head requiring grad, forward KL with labels: ours
    needs at most 10% of the materializing reference's extra peak memory beyond the inputs and
    the gradients every method returns (an upper bound for ours, a lower bound for the
    reference; see ``emalora_fast.benchmarks.fused_linear.extra_peak_bytes``)."""
    n, h, v = 2048, 512, 32000
    ref, _ = _extra_peak_bytes("reference", n, h, v)
    _, ours = _extra_peak_bytes("emalora", n, h, v)
    assert ref > 2 * n * v * 4  # the measurement sees the reference's [N, V] tensors
    assert ours <= 0.10 * ref, f"ours {ours / 2**20:.0f} MiB vs reference {ref / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA).
# ------------------------------------------------------------------------------------------------
def _cuda(p):
    out = {k: (None if x is None else x.cuda()) for k, x in p.items()}
    if p["wt"] is p["ws"]:
        out["wt"], out["bt"] = out["ws"], out["bs"]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3], ids=DIV_IDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_triton_cuda(divergence, beta, dtype, head):
    """Real sizes on a GPU: N=1024, H=2048, V=32011 against the float64 reference (on the GPU)."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA device and the compiled (not interpreted) Triton")
    n, h, v = 1024, 2048, 32011
    p = _cuda(make_problem(n, h, v, head=head))
    p = {k: (x if x is None else x.to(dtype)) for k, x in p.items()}
    if head == "shared":
        p["wt"], p["bt"] = p["ws"], p["bs"]
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, hard_label_weight=0.1,
              labels=make_labels((n,), v).cuda(), softcap=30.0)  # fmt: skip
    go = grad_output(()).cuda()
    ref, ref_g = run_reference(p, go, **kw)
    base, base_g = run_reference(p, go, dtype=dtype, **kw)
    out, g = run_ours(p, go, "triton", **kw)
    factor = 1.0 if dtype == torch.float32 else 2.0
    assert _rel_err(out, ref) <= max(1e-4, factor * _rel_err(base, ref))
    for k in g:
        err, torch_err = _rel_err(g[k], ref_g[k]), _rel_err(base_g[k], ref_g[k])
        assert err <= max(1e-4 if dtype == torch.float32 else 0.0, factor * torch_err), k
