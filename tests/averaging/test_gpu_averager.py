"""GPU checks of the fused averager (run by bench/gpu_check.sh; skipped without CUDA).

Real sizes, every storage dtype against the float64 formulas, one launch per update, and no host
synchronization in update(): the update is captured in a CUDA graph, which fails on any sync.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, assert_close, rounding_bound
from test_averager import ALL, OPTIONS, Oracle

from emalora_fast import BEMA, EMA
from emalora_fast.benchmarks.averager import TensorSet, lora_shapes

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("kind", ["ema", "bema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_llama8b_set_matches_float64(kind, dtype):
    """All 448 tensors of the Llama-3-8B r=16 set (41.9 M elements), with a teacher copy."""
    model = TensorSet(lora_shapes("llama3-8b"), CUDA, dtype)
    hp = OPTIONS[kind]["after_every"]
    avg = (BEMA if kind == "bema" else EMA)(model, param_filter=ALL, backend="triton", **hp)
    teachers = [torch.empty_like(p) for p in model.ps]
    g = avg._groups[0]
    g.teachers = teachers
    avg._prepare(g)
    oracle = Oracle(kind, [p.detach().double() for p in model.ps], **hp)
    for t in range(1, 9):
        with torch.no_grad():
            for p in model.ps:
                p.add_(torch.randn_like(p) * 0.01)
        for x in teachers:
            x.fill_(float("nan"))
        avg.update()
        oracle.step(t, [p.detach().double() for p in model.ps])
    got = avg.averaged_state_dict(torch.float32)
    ref = torch.cat([r.flatten() for r in oracle.averaged])
    ours = torch.cat([got[f"ps.{i}"].flatten() for i in range(len(model.ps))])
    assert_close(ours, ref, FP32_RTOL, "averaged")
    teach = torch.cat([x.flatten() for x in teachers])
    tol = FP32_RTOL if dtype == torch.float32 else rounding_bound(ref, dtype)
    assert_close(teach, ref, tol, "teacher")


def test_one_launch_per_update_and_no_host_sync():
    model = TensorSet(lora_shapes("llama3-8b", layers=4), CUDA, torch.bfloat16)
    avg = BEMA(model, param_filter=ALL, backend="triton")
    avg.update()  # compiles the kernel outside the capture
    avg.update()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        avg.update()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 1, [e.name for e in kernels]

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        avg.update()  # raises if update() synchronizes with the host
    before = avg.averaged_state_dict()
    with torch.no_grad():
        for p in model.ps:
            p.add_(torch.randn_like(p) * 0.01)
    graph.replay()
    torch.cuda.synchronize()
    after = avg.averaged_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_elements_skipped_on_gpu():
    model = TensorSet([(16, 300), (300, 16)], CUDA, torch.bfloat16)
    avg = BEMA(model, param_filter=ALL, backend="triton")
    avg.update()
    before = avg.averaged_state_dict(torch.float32)
    with torch.no_grad():
        model.ps[0][3, 7] = float("nan")
        model.ps[1][5, 2] = float("inf")
        model.ps[1][6, 2] = float("-inf")
    avg.update()
    after = avg.averaged_state_dict(torch.float32)
    assert avg.nonfinite_detected()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert after["ps.0"][3, 7] == before["ps.0"][3, 7]
    assert after["ps.1"][5, 2] == before["ps.1"][5, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_profiles_in_one_launch_match_float64(dtype):
    """K = 8 EMA profiles of the Llama-3-8B set: one kernel per update, no host sync (captured
    in a CUDA graph), every profile against the float64 formulas."""
    model = TensorSet(lora_shapes("llama3-8b", layers=8), CUDA, dtype)
    decays = tuple(1 - 0.5**k for k in range(1, 9))
    avg = EMA(model, decay=decays, param_filter=ALL, backend="triton")
    oracles = [Oracle("ema", [p.detach().double() for p in model.ps], decay=d) for d in decays]
    from torch.profiler import ProfilerActivity, profile

    for t in range(1, 6):
        with torch.no_grad():
            for p in model.ps:
                p.add_(torch.randn_like(p) * 0.01)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            avg.update()
            torch.cuda.synchronize()
        assert len([e for e in prof.events() if e.device_type.name == "CUDA"]) == 1
        for o in oracles:
            o.step(t, [p.detach().double() for p in model.ps])
    for k, o in enumerate(oracles):
        got = avg.averaged_state_dict(torch.float32, profile=k)
        ours = torch.cat([got[f"ps.{i}"].flatten() for i in range(len(model.ps))])
        assert_close(ours, torch.cat([r.flatten() for r in o.averaged]), FP32_RTOL, f"profile {k}")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        avg.update()  # raises if update() synchronizes with the host
