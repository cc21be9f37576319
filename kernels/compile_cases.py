"""The cases of the compile check: every kernel, in the compile-time configurations its launcher
can choose, at realistic sizes (meta tensors: nothing is allocated).

Each kernel family has a *space*: launcher-level options (dtypes, divergence, labels, bias, ...)
and their values. A case is one point of the space; its builder creates meta tensors and calls
the launcher's own ``*_launch`` function, so the compile-time constants, the grid, the warps and
the argument specialization are what a real launch on that GPU chooses. Options whose name is a
parameter of the ``*_launch`` function are passed to it as they are: a new launcher switch is
covered by adding its name and values to the space.

A space is covered as follows: the full product of its ``full`` options (the feature flags) with
the others at their first value, plus a greedy set of points that covers every pair of values of
any two options (all-pairs testing). So every value of every option, every pair of values, and
every combination of the flags is compiled; the full product of everything (thousands of points
for the fused-linear kernels) is not, to keep the check within minutes on two cores.

Tags: ``default`` (the hot configurations of real training: the subset compiled under the older
triton too, and held to "no spills on sm_90"), ``vec`` (aligned memory-bound case: its unmasked
path must use 128-bit global accesses, at least ``min_ldg128``/``min_stg128`` per thread), ``dot``
(bf16/fp16 dot products: tensor-core instructions required).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterator

import torch

from . import averager, distill_loss, fused_linear
from ._launch import A100, H100, Launch, Target

TARGETS = {90: H100, 80: A100}
META = torch.device("meta")
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kernel: str
    build: Callable[[Target], Launch]
    tags: tuple[str, ...] = ()
    min_ldg128: int = 0  # 128-bit global loads per thread the unmasked path needs ("vec")
    min_stg128: int = 0

    def launch(self, arch: int) -> Launch:
        return self.build(TARGETS[arch])


# ------------------------------------------------------------------------------------------------
# Covering a space.
# ------------------------------------------------------------------------------------------------
def cover(space: dict[str, list], full: tuple[str, ...] = (),
          valid: Callable[[dict], bool] = lambda p: True) -> list[dict]:  # fmt: skip
    """Points of ``space``: the full product over ``full`` (others at their first value), then
    greedily chosen points until every pair of values of two options that some valid point
    holds is covered."""
    keys = list(space)
    sizes = [len(space[k]) for k in keys]

    def point(idx: tuple[int, ...]) -> dict:
        return {k: space[k][i] for k, i in zip(keys, idx)}

    def pairs(idx: tuple[int, ...]) -> frozenset:
        return frozenset(
            (a, idx[a], b, idx[b]) for a, b in itertools.combinations(range(len(keys)), 2)
        )

    every = [i for i in itertools.product(*map(range, sizes)) if valid(point(i))]
    chosen: list[tuple[int, ...]] = []
    pos = [keys.index(k) for k in full]
    for values in itertools.product(*(range(sizes[j]) for j in pos)):
        idx = [0] * len(keys)
        for j, v in zip(pos, values):
            idx[j] = v
        if tuple(idx) in every and tuple(idx) not in chosen:
            chosen.append(tuple(idx))
    held = {i: pairs(i) for i in every}
    todo = set().union(*held.values()) - set().union(set(), *(held[i] for i in chosen))
    while todo:
        best = max(every, key=lambda i: len(held[i] & todo))
        todo -= held[best]
        chosen.append(best)
    return [point(i) for i in chosen]


def _label(p: dict) -> str:
    return ",".join(f"{k}={getattr(v, 'name', None) or str(v).replace('torch.', '')}"
                    for k, v in p.items())  # fmt: skip


def _launcher_kwargs(fn: Callable, p: dict) -> dict:
    names = inspect.signature(fn).parameters
    return {k: v for k, v in p.items() if k in names}


def _meta(*shape, dtype=FP32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


# ------------------------------------------------------------------------------------------------
# The averager: Llama-3-8B all-linear LoRA r=16 (448 tensors).
# ------------------------------------------------------------------------------------------------
def _lora_shapes() -> list[tuple[int, int]]:
    h, inter, kv, layers = 4096, 14336, 1024, 32
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return [s for _ in range(layers) for i, o in linears for s in ((16, i), (o, 16))]


AVERAGER_SPACE = {
    "dtype": [BF16, FP32, FP16, FP64],
    "teacher": ["same", None, BF16, FP32],
    "kind": ["bema", "ema"],
    "reset": [False, True],
    "aligned": [True, False],
    "teacher_ema": [False, True],  # BEMA: the teachers receive the ema part
    "profiles": [1, 3, 8],  # EMA profiles in one launch (BEMA: 1)
    "teacher_profile": [0, 2],  # the profile the teachers receive
}


def _averager_valid(p: dict) -> bool:
    if p["kind"] == "bema" and p["profiles"] != 1:
        return False
    return p["teacher_profile"] < p["profiles"]


def _averager_case(p: dict) -> Case:
    def build(target: Target) -> Launch:
        shapes = ([] if p["aligned"] else [(3,)]) + _lora_shapes()  # starts off 4 elements
        params = [_meta(*s, dtype=p["dtype"]) for s in shapes]
        tdt = p["dtype"] if p["teacher"] == "same" else p["teacher"]
        teachers = [_meta(*s, dtype=tdt) for s in shapes] if tdt is not None else None
        plan = averager.AveragerPlan(params, teachers)
        k = p["profiles"]
        ema = _meta(k, plan.numel)
        bema = p["kind"] == "bema"
        flag = _meta(1, dtype=torch.int32)
        extra = _launcher_kwargs(averager.averager_launch, p)  # reset, and any new switch
        return averager.averager_launch(plan, ema, _meta(plan.numel) if bema else None,
                                        _meta(plan.numel) if bema else None, flag, [0.1] * k,
                                        0.3, **extra)  # fmt: skip

    per_thread = averager.BLOCK // (32 * 4)
    size = {BF16: 2, FP16: 2, FP32: 4, FP64: 8}
    k = p["profiles"]
    loads = size[p["dtype"]] + (0 if p["reset"] else 4 * (k + (p["kind"] == "bema")))
    tdt = p["dtype"] if p["teacher"] == "same" else p["teacher"]
    stores = 4 * k + (8 if p["kind"] == "bema" and p["reset"] else 4 * (p["kind"] == "bema"))
    stores += size[tdt] if tdt is not None else 0
    tags = ("vec",) * p["aligned"]
    return Case(f"averager[{_label(p)}]", "_averager_kernel", build, tags,
                loads * per_thread // 16, stores * per_thread // 16)  # fmt: skip


def averager_cases() -> Iterator[Case]:
    for p in cover(AVERAGER_SPACE, full=("kind", "reset", "aligned"), valid=_averager_valid):
        yield _averager_case(p)


# ------------------------------------------------------------------------------------------------
# The logits loss: N = 8192 rows (one program each), Llama-3 vocabularies.
# ------------------------------------------------------------------------------------------------
DIVERGENCE = {"fkl": 0, "rkl": 1, "jsd": 2}
LOSS_SPACE = {
    "divergence": ["fkl", "rkl", "jsd"],
    "labels": ["ce", "none", "labels", "ce_t1"],  # ce: CE at T = 2 (raw LSE); ce_t1: at T = 1
    # 128256: V % 16 == 0; 128264: V % 16 == 8, rows still on 16 bytes; 32001: unaligned rows.
    "vocab": [128256, 128264, 32001, 1000],
    "dtypes": [(BF16, BF16), (FP32, FP32), (FP16, FP32)],
    "pass": ["fwd", "bwd"],
    "stages": [1, 2],  # the forward kernel's pipelining switch
}


def _loss_case(p: dict) -> Case:
    n, v = 8192, p["vocab"]
    sd, td = p["dtypes"]
    temperature = 1.0 if p["labels"] == "ce_t1" else 2.0
    ce_scale = 0.1 if p["labels"] in ("ce", "ce_t1") else 0.0

    def build(target: Target) -> Launch:
        s, t = _meta(n, v, dtype=sd), _meta(n, v, dtype=td)
        labels = None if p["labels"] == "none" else _meta(n, dtype=torch.int64)
        common = (DIVERGENCE[p["divergence"]], 0.5, temperature, 1.0, ce_scale, -100)
        if p["pass"] == "fwd":
            return distill_loss.distill_loss_fwd_launch(s, t, labels, _meta(n), _meta(n, 7),
                                                        *common, stages=p["stages"])  # fmt: skip
        return distill_loss.distill_loss_bwd_launch(s, t, labels, _meta(n, 7), _meta(n), s,
                                                    *common)  # fmt: skip

    block, warps = distill_loss._block_v(v)
    per_thread = block // (32 * warps)
    size = {BF16: 2, FP16: 2, FP32: 4}
    chunk = per_thread * (size[sd] + size[td]) // 16
    loads = chunk * (2 if p["divergence"] == "jsd" and p["pass"] == "fwd" else 1)
    stores = per_thread * size[sd] // 16 if p["pass"] == "bwd" else 0
    aligned = (v * size[sd]) % 16 == 0 and (v * size[td]) % 16 == 0
    tags = ("vec",) * aligned
    kernel = f"_distill_loss_{p['pass']}_kernel"
    return Case(f"loss[{_label(p)}]", kernel, build, tags, loads, stores)


def loss_cases() -> Iterator[Case]:
    def valid(p: dict) -> bool:
        if p["pass"] == "bwd":  # the same kernel as "ce" / one without stages
            return p["labels"] != "ce_t1" and p["stages"] == 1
        return True

    for p in cover(LOSS_SPACE, full=("pass", "divergence"), valid=valid):
        yield _loss_case(p)


# ------------------------------------------------------------------------------------------------
# The fused-linear loss: N = 8192 tokens, H = 4096, V = 128256 (Llama-3-8B head).
# ------------------------------------------------------------------------------------------------
FUSED_SPACE = {
    "pass": ["stats", "jsd", "grad", "bwd"],
    "divergence": ["fkl", "rkl", "jsd"],
    "labels": ["ce", "none", "labels", "ce_t1"],
    "shared": [True, False],
    "bias": [False, True],  # student and teacher bias
    "softcap": [None, 30.0],
    "dtype": [BF16, FP32],
    # grads of (h_s, W_s, b_s): the usual pair, then each flag off once and grad_b on
    "need": [(True, True, False), (False, True, True), (True, False, False)],
    "eps": [None, 1e-6],
}


def _fused_case(p: dict) -> Case:
    n, h, v = 8192, 4096, 128256
    dt = p["dtype"]
    temperature = 1.0 if p["labels"] == "ce_t1" else 2.0
    has_ce = p["labels"] in ("ce", "ce_t1")
    div = DIVERGENCE[p["divergence"]]

    def build(target: Target) -> Launch:
        hs, ht, ws = _meta(n, h, dtype=dt), _meta(n, h, dtype=dt), _meta(v, h, dtype=dt)
        wt = ws if p["shared"] else _meta(v, h, dtype=dt)
        bs = _meta(v, dtype=dt) if p["bias"] else None
        bt = bs if p["shared"] else (_meta(v, dtype=dt) if p["bias"] else None)
        labels = None if p["labels"] == "none" else _meta(n, dtype=torch.int64)
        common = (hs, ws, bs, ht, wt, bt, labels)
        stats, rows = _meta(n, 7), _meta(n)
        kind = p["pass"]
        if kind == "stats":
            return fused_linear.fused_linear_fwd_launch(
                *common, v, p["shared"], div, temperature, p["softcap"], has_ce, -100,
                target=target,
            )[0]  # fmt: skip
        if kind == "jsd":
            return fused_linear.fused_linear_jsd_launch(
                *common, stats, v, p["shared"], 0.5, temperature, p["softcap"], -100,
                target=target,
            )[0]  # fmt: skip
        grad = (div, 0.5, temperature, 0.9, 0.1 if has_ce else 0.0, p["softcap"], -100, p["eps"])
        if kind == "grad":
            g = _meta(n, v, dtype=FP32 if dt == FP32 else dt)
            return fused_linear.fused_linear_grad_launch(
                *common, stats, rows, g, v, p["shared"], *grad, target=target
            )  # fmt: skip
        outs = [_meta(n, h), _meta(v, h), _meta(v)]
        outs = [x if need else None for x, need in zip(outs, p["need"])]
        return fused_linear.fused_linear_bwd_launch(
            *common, stats, rows, *outs, v, p["shared"], *grad, target=target
        )  # fmt: skip

    tags = ("dot",) * (dt != FP32)
    kernel = {
        "stats": "_fused_linear_stats_kernel",
        "jsd": "_fused_linear_jsd_kernel",
        "grad": "_fused_linear_grad_kernel",
        "bwd": "_fused_linear_bwd_kernel",
    }[p["pass"]]
    return Case(f"fused[{_label(p)}]", kernel, build, tags)  # fmt: skip


def _fused_valid(p: dict) -> bool:
    kind = p["pass"]
    if kind in ("stats", "jsd") and (p["eps"] is not None or p["need"] != (True, True, False)):
        return False  # backward options
    if kind == "jsd" and (p["divergence"] != "jsd" or p["labels"] in ("ce", "ce_t1")):
        return False  # pass 2 runs for interior-beta JSD only; it has no CE term
    if kind == "grad" and p["need"] != (True, True, False):
        return False  # the gemm form computes g whatever is needed
    if kind in ("grad", "bwd") and p["labels"] == "ce_t1":
        return False  # the gradient kernels take the same flags at T = 1
    return not (p["need"][2] and not p["bias"])


def fused_cases() -> Iterator[Case]:
    for kind in FUSED_SPACE["pass"]:
        space = dict(FUSED_SPACE, **{"pass": [kind]})
        if kind == "jsd":
            space.update(divergence=["jsd"], labels=["labels", "none"])
        for p in cover(space, full=("divergence",), valid=_fused_valid):
            yield _fused_case(p)


# ------------------------------------------------------------------------------------------------
# The default configurations: the realistic shapes of the compile report (Llama-3-8B r=16
# averager; logits loss N = 8192, V = 128256 and 128264; fused linear N = 8192, H = 4096,
# V = 128256), bf16 unless said, labels with a CE term at T = 2.
# ------------------------------------------------------------------------------------------------
def _tagged(case: Case, name: str) -> Case:
    return dataclasses.replace(case, name=name, tags=(*case.tags, "default"))


def default_cases() -> Iterator[Case]:
    base = {k: v[0] for k, v in AVERAGER_SPACE.items()}
    yield _tagged(_averager_case(base), "averager bema bf16 + teacher")
    yield _tagged(_averager_case(dict(base, dtype=FP32)), "averager bema fp32 + teacher")
    yield _tagged(_averager_case(dict(base, kind="ema", teacher=None)), "averager ema bf16")
    base = {k: v[0] for k, v in LOSS_SPACE.items()}
    for v in (128256, 128264):
        for div in ("fkl", "jsd"):
            for kind in ("fwd", "bwd"):
                p = dict(base, vocab=v, divergence=div, **{"pass": kind})
                yield _tagged(_loss_case(p), f"loss {kind} {div} V={v}")
    base = {k: v[0] for k, v in FUSED_SPACE.items()}
    yield _tagged(_fused_case(base), "fused stats fkl + CE (T=2)")
    p = dict(base, labels="labels")
    yield _tagged(_fused_case(p), "fused stats fkl, labels, no CE")
    p = dict(base, divergence="jsd", labels="labels", **{"pass": "jsd"})
    yield _tagged(_fused_case(p), "fused jsd pass 2")
    yield _tagged(_fused_case(dict(base, **{"pass": "grad"})), "fused grad (gemm form) fkl + CE")
    yield _tagged(_fused_case(dict(base, **{"pass": "bwd"})), "fused bwd (atomic form) fkl + CE")


def cases(subset: str = "all") -> list[Case]:
    """Every case (``"all"``: the default ones, then the covering ones) or the default
    configurations only (``"default"``)."""
    first = list(default_cases())
    if subset == "default":
        return first
    if subset == "all":
        return [*first, *averager_cases(), *loss_cases(), *fused_cases()]
    raise ValueError(f"unknown subset {subset!r}")
