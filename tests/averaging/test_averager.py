"""The fused averager against a float64 implementation of the formulas, on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FP32_RTOL, Oracle, assert_close, backend_or_skip, one_ulp_bound, rounding_bound
from torch import nn

from emalora_fast import BEMA, EMA, BackendUnavailableError
from emalora_fast import _dispatch as dispatch

BACKENDS = ["cpp", "triton", "torch"]
ALL = lambda name, p: True  # noqa: E731  (select every parameter of the toy modules)


class Bag(nn.Module):
    """A module holding tensors of the given sizes and dtype."""

    def __init__(self, sizes: list[int], dtype: torch.dtype, scale: float = 1.0):
        super().__init__()
        self.ps = nn.ParameterList(
            [nn.Parameter((torch.randn(n) * scale).to(dtype)) for n in sizes]
        )

    def perturb(self, scale: float) -> None:
        with torch.no_grad():
            for p in self.ps:
                p.add_((torch.randn(p.shape) * scale).to(p.dtype))

    def values(self) -> list[torch.Tensor]:
        return [p.detach().double().clone() for p in self.ps]


OPTIONS = {
    "ema": {
        "plain": dict(decay=0.9),
        "after_every": dict(decay=0.8, update_after=3, update_every=2),
        "warmup": dict(decay=0.95, warmup=True, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.1),
    },
    "bema": {
        "plain": dict(),
        "after_every": dict(update_after=3, update_every=2, lag=4.0, multiplier=0.5),
        "warmup": dict(schedule="paper", min_ema_multiplier=0.05, ema_power=0.7, bias_power=0.4),
    },
}
SIZES = {"odd": [0, 1, 3, 1000, 4097], "many": None}


def make_sizes(name: str) -> list[int]:
    if SIZES[name] is not None:
        return SIZES[name]
    return torch.randint(1, 97, (310,)).tolist()


def make(kind: str, model: nn.Module, backend: str, **hp):
    cls = BEMA if kind == "bema" else EMA
    return cls(model, param_filter=ALL, backend=backend, **hp)


def poison(avg, action: str | None) -> None:
    """NaN-fill what the coming update must write entirely (BEMA output, or all on reset)."""
    if action is None:
        return
    for g in avg._groups:
        if g.out is not None:
            g.out.fill_(math.nan)
        if action == "reset":
            g.ema.fill_(math.nan)
            if g.theta0 is not None:
                g.theta0.fill_(math.nan)


def oracle_action(oracle: Oracle, t: int) -> str | None:
    """What step t will do, without applying it."""
    probe = Oracle.__new__(Oracle)
    probe.__dict__.update(oracle.__dict__)
    return Oracle.step(probe, t, oracle.ema)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ema", "bema"])
@pytest.mark.parametrize("option", ["plain", "after_every", "warmup"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", ["odd", "many"])
def test_matches_float64_formulas(backend, kind, option, dtype, sizes):
    backend_or_skip(backend)
    if backend == "triton" and sizes == "many" and option != "plain":
        pytest.skip("interpreter time: the 310-tensor set runs the plain options only")
    scale = [1e-3, 1.0, 30.0][torch.randint(0, 3, ()).item()]
    model = Bag(make_sizes(sizes), dtype, scale)
    hp = OPTIONS[kind][option]
    avg = make(kind, model, backend, **hp)
    oracle = Oracle(kind, model.values(), **hp)
    steps = 6 if (backend == "triton" and sizes == "many") else 22
    for t in range(1, steps + 1):
        model.perturb(0.1 * scale)
        action = oracle_action(oracle, t)
        poison(avg, action)
        avg.update()
        oracle.step(t, model.values())
        if t % 7 == 0 or t == steps:
            ours = avg.averaged_state_dict(torch.float32)
            got = torch.cat([ours[f"ps.{i}"] for i in range(len(oracle.averaged))])
            assert_close(got, torch.cat(oracle.averaged), FP32_RTOL, f"step {t}")
    assert avg.step == steps
    assert not avg.nonfinite_detected()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,follows", [("ema", "ema"), ("bema", "ema"), ("bema", "bema")])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_teacher_tensors_written_in_the_same_pass(backend, kind, follows, teacher_dtype):
    """The kernel's teacher output (here: tensors reached through param twins) equals the average
    it follows (a BEMA's ema part or its output) rounded to the teacher's dtype; the teachers are
    poisoned before each update."""
    backend_or_skip(backend)
    sizes = [5, 1000, 2049, 1]
    model = Bag(sizes, torch.float32)
    extra = {"teacher_weights": follows} if kind == "bema" else {}
    avg = make(kind, model, backend, **OPTIONS[kind]["plain"], **extra)
    oracle = Oracle(kind, model.values(), **OPTIONS[kind]["plain"])
    # Attach teachers to the group the way a teacher adapter does, then rebuild its plan.
    teachers = [torch.empty(n, dtype=teacher_dtype) for n in sizes]
    g = avg._groups[0]
    g.teachers = teachers
    avg._prepare(g)
    for t in range(1, 9):
        model.perturb(0.05)
        for x in teachers:
            x.fill_(math.nan)
        avg.update()
        oracle.step(t, model.values())
        for i, ref in enumerate(oracle.ema if follows == "ema" else oracle.averaged):
            if teacher_dtype == torch.float32:
                tol = FP32_RTOL
            elif backend == "triton":
                tol = one_ulp_bound(ref, teacher_dtype)  # the interpreter truncates
            else:
                tol = rounding_bound(ref, teacher_dtype)
            assert_close(teachers[i], ref, tol, f"teacher {i} at step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_weights_are_skipped_and_flagged(backend):
    backend_or_skip(backend)
    model = Bag([7, 3000], torch.float32)
    avg = make("bema", model, backend)
    oracle = Oracle("bema", model.values())
    model.perturb(0.1)
    avg.update()
    oracle.step(1, model.values())
    before = avg.averaged_state_dict(torch.float32)
    with torch.no_grad():
        model.ps[1][2500] = math.nan
        model.ps[0][3] = math.inf
    theta = model.values()
    avg.update()
    after = avg.averaged_state_dict(torch.float32)
    assert avg.nonfinite_detected()
    assert torch.isfinite(after["ps.0"]).all() and torch.isfinite(after["ps.1"]).all()
    # Non-finite elements kept their previous average; the others moved as the formula says.
    assert after["ps.1"][2500] == before["ps.1"][2500] and after["ps.0"][3] == before["ps.0"][3]
    beta, alpha = oracle.beta_alpha(2)
    for name, i, bad in (("ps.0", 0, 3), ("ps.1", 1, 2500)):
        keep = torch.ones_like(theta[i], dtype=torch.bool)
        keep[bad] = False
        ema = (1 - beta) * oracle.ema[i] + beta * theta[i]
        ref = ema + alpha * (theta[i] - oracle.theta0[i])
        assert_close(after[name][keep], ref[keep], FP32_RTOL, name)
    avg.reset_nonfinite()
    assert not avg.nonfinite_detected()


# kind, the averager's options, the decays of its oracles, what the teacher follows (a profile
# index, or the BEMA output).
NONFINITE_SETTINGS = {
    "ema-profiles": ("ema", dict(decay=(0.5, 0.9, 0.99), teacher_profile=2), (0.5, 0.9, 0.99), 2),
    "bema-teaches-ema": ("bema", dict(teacher_weights="ema"), (None,), 0),
    "bema-teaches-bema": ("bema", dict(teacher_weights="bema"), (None,), "bema"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(NONFINITE_SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_elements_keep_every_state_value(backend, setting, dtype):
    """A non-finite theta (first element, both sides of a 1024-element chunk boundary, a tail)
    leaves every state value of its element bit-identical: each profile's shadow, BEMA's
    theta_0 and output, the teacher; every other element, including those sharing a chunk with
    a non-finite one, moves as the float64 formulas say."""
    backend_or_skip(backend)
    sizes = [3, 2500, 1030]
    bad = {0: [0], 1: [1023, 1024, 2499], 2: [1029]}
    kind, hp, decays, follows = NONFINITE_SETTINGS[setting]
    model = Bag(sizes, dtype)
    avg = make(kind, model, backend, **hp)
    teachers = [torch.empty(n, dtype=torch.float32) for n in sizes]
    g = avg._groups[0]
    g.teachers = teachers
    avg._prepare(g)
    oracles = [Oracle(kind, model.values(), **({"decay": d} if d else {})) for d in decays]
    for t in (1, 2):
        model.perturb(0.1)
        avg.update()
        for o in oracles:
            o.step(t, model.values())

    def state() -> list[torch.Tensor]:
        kept = [g.ema] + [x for x in (g.theta0, g.out) if x is not None]
        return [x.reshape(-1, sum(sizes)).clone() for x in kept] + [torch.cat(teachers)[None]]

    before = state()
    model.perturb(0.1)
    with torch.no_grad():
        for i, positions in bad.items():
            for j, pos in enumerate(positions):
                model.ps[i][pos] = (math.nan, math.inf, -math.inf)[j % 3]
    theta = model.values()
    avg.update()
    for o in oracles:
        o.step(3, theta)
    assert avg.nonfinite_detected()
    mask = torch.cat([~torch.isfinite(x) for x in theta])
    assert int(mask.sum()) == sum(len(v) for v in bad.values())
    for b, a in zip(before, state(), strict=True):
        assert torch.equal(a[:, mask], b[:, mask])  # bit for bit, NaN-free: nothing was written
        assert torch.isfinite(a).all()
    shadows = state()[0]
    for k, o in enumerate(oracles):
        assert_close(shadows[k][~mask], torch.cat(o.ema)[~mask], FP32_RTOL, f"profile {k}")
    if kind == "bema":
        out = avg.averaged_state_dict(torch.float32)
        got = torch.cat([out[f"ps.{i}"] for i in range(len(sizes))])
        assert_close(got[~mask], torch.cat(oracles[0].averaged)[~mask], FP32_RTOL, "bema output")
    ref = oracles[0].averaged if follows == "bema" else oracles[follows].ema
    assert_close(torch.cat(teachers)[~mask], torch.cat(ref)[~mask], FP32_RTOL, "teacher")


def test_matches_trl_bema_callback():
    """Same hyperparameters and weight sequence: our bema equals TRL's BEMACallback's."""
    trl_callbacks = pytest.importorskip("trl.trainer.callbacks")
    from types import SimpleNamespace

    model = Bag([17, 300, 64], torch.float32)
    hp = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, update_after=2)
    ours = BEMA(
        model,
        param_filter=ALL,
        update_every=1,
        backend="cpp" if dispatch.cpp_available() else "torch",
        **hp,
    )
    cb = trl_callbacks.BEMACallback(update_freq=1, **hp)
    running = Bag([17, 300, 64], torch.float32)
    cb.running_model = running
    cb.thetat_params = list(model.ps)
    cb.theta0_params = [p.detach().clone() for p in model.ps]
    cb.ema_params = [p.detach().clone() for p in model.ps]
    for t in range(1, 26):
        model.perturb(0.1)
        ours.update(step=t)
        with torch.no_grad():
            cb.on_step_end(None, SimpleNamespace(global_step=t), None, model)
        if t > hp["update_after"]:  # at the reset step TRL leaves its running model as it was
            got = ours.averaged_state_dict()
            for i, p in enumerate(running.ps):
                assert_close(got[f"ps.{i}"], p.detach(), 1e-6, f"step {t} tensor {i}")


def test_backend_errors():
    model = Bag([3], torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        EMA(model, param_filter=ALL, backend="cuda")


def test_forced_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        EMA(Bag([3], torch.float32), param_filter=ALL, backend="triton")


def test_auto_picks_cpp_on_cpu():
    if not dispatch.cpp_available():
        pytest.skip("emalora_fast._C is not built")
    avg = EMA(Bag([3], torch.float32), param_filter=ALL)
    assert {g.backend for g in avg._groups} == {"cpp"}


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_one_launch_per_group(backend, monkeypatch):
    backend_or_skip(backend)
    model = Bag([3, 1000, 5000], torch.float32)
    model.extra = nn.Parameter(torch.randn(2049).to(torch.bfloat16))  # a second group
    avg = BEMA(model, param_filter=ALL, backend=backend)
    assert len(avg._groups) == 2
    calls = []
    if backend == "triton":
        from emalora_fast.kernels import averager as kernels

        real = kernels._averager_kernel

        class Counting:
            def __getitem__(self, grid):
                calls.append(grid)
                return real[grid]

        monkeypatch.setattr(kernels, "_averager_kernel", Counting())
        for _ in range(3):
            avg.update()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                avg.update()
        calls = [e for e in prof.events() if e.name == "emalora_fast::averager_update"]
    assert len(calls) == 3 * 2


def test_update_does_not_sync_or_allocate(monkeypatch):
    """No .item()/.cpu()/tensor construction inside update() (cpp backend, CPU)."""
    if not dispatch.cpp_available():
        pytest.skip("emalora_fast._C is not built")
    model = Bag([100, 4097], torch.float32)
    avg = BEMA(model, param_filter=ALL)
    avg.update()

    def forbidden(*a, **k):
        raise AssertionError("host sync or allocation in update()")

    from torch.profiler import ProfilerActivity, profile

    for name in ("item", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            avg.update()
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert allocated == 0


def test_storage_move_is_detected(seed):
    model = Bag([10, 3000], torch.float32)
    avg = EMA(model, 0.5, param_filter=ALL, backend="cpp" if dispatch.cpp_available() else "torch")
    model.perturb(1.0)
    avg.update()
    expected = {k: v.double() for k, v in avg.averaged_state_dict().items()}
    # Replace every parameter with a new tensor elsewhere in memory (as assign=True loading does).
    new_state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)
    avg.update()
    got = avg.averaged_state_dict()
    for k in got:
        ref = 0.5 * expected[k] + 0.5 * new_state[k].double()
        assert_close(got[k], ref, FP32_RTOL, k)
    # swapped() writes into the new parameters, not the old ones
    with avg.swapped():
        assert torch.equal(model.ps[0].detach(), got["ps.0"])
    assert torch.equal(model.ps[0].detach(), new_state["ps.0"])


def test_swapped_restores_even_on_error():
    model = Bag([10, 300], torch.bfloat16)
    avg = BEMA(model, param_filter=ALL)
    for _ in range(4):
        model.perturb(0.5)
        avg.update()
    live = [p.detach().clone() for p in model.ps]
    averaged = avg.averaged_state_dict()
    with pytest.raises(RuntimeError, match="boom"), avg.swapped():
        for i, p in enumerate(model.ps):
            assert torch.equal(p.detach(), averaged[f"ps.{i}"])
        raise RuntimeError("boom")
    for p, x in zip(model.ps, live):
        assert torch.equal(p.detach(), x)


def test_state_dict_resumes_bit_identically():
    torch.manual_seed(1234)
    deltas = [[torch.randn(n) * 0.1 for n in (10, 4097)] for _ in range(12)]

    def run(model, avg, steps):
        for d in steps:
            with torch.no_grad():
                for p, x in zip(model.ps, d):
                    p.add_(x)
            avg.update()

    a_model = Bag([10, 4097], torch.float32)
    b_model = Bag([10, 4097], torch.float32)
    b_model.load_state_dict(a_model.state_dict())
    a = BEMA(a_model, param_filter=ALL, update_after=2, update_every=2)
    run(a_model, a, deltas[:5])
    state = a.state_dict()
    b_model.load_state_dict(a_model.state_dict())
    b = BEMA(b_model, param_filter=ALL, update_after=2, update_every=2)
    b.load_state_dict(state)
    run(a_model, a, deltas[5:])
    run(b_model, b, deltas[5:])
    assert a.step == b.step == 12
    for k, v in a.averaged_state_dict().items():
        assert torch.equal(v, b.averaged_state_dict()[k])


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    model = Bag([10, 20], torch.float32)
    avg = BEMA(model, param_filter=ALL)
    model.perturb(0.1)
    avg.update()
    before = avg.state_dict()
    other = BEMA(Bag([10, 21], torch.float32), param_filter=ALL).state_dict()
    with pytest.raises(ValueError, match="expected a floating tensor of shape"):
        avg.load_state_dict(other)
    other_hp = BEMA(Bag([10, 20], torch.float32), param_filter=ALL, lag=3.0).state_dict()
    with pytest.raises(ValueError, match="lag"):
        avg.load_state_dict(other_hp)
    ema_state = EMA(Bag([10, 20], torch.float32), param_filter=ALL).state_dict()
    with pytest.raises(ValueError, match="'ema' averager"):
        avg.load_state_dict(ema_state)
    after = avg.state_dict()
    assert after["step"] == before["step"]
    for key in ("ema", "theta0", "out"):
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decay=1.0), "decay"),
        (dict(decay=0.0), "decay"),
        (dict(decay=float("nan")), "decay"),
        (dict(warmup_power=-1.0), "warmup_power"),
        (dict(min_decay=0.9999), "min_decay"),
        (dict(update_every=0), "update_every"),
        (dict(update_after=-1), "update_after"),
    ],
)
def test_bad_ema_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(Bag([3], torch.float32), param_filter=ALL, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ema_power=-0.5), "ema_power"),
        (dict(bias_power=-1.0), "bias_power"),
        (dict(lag=0.0), "lag"),
        (dict(multiplier=-1.0), "multiplier"),
        (dict(min_ema_multiplier=1.5), "min_ema_multiplier"),
        (dict(schedule="other"), "schedule"),
    ],
)
def test_bad_bema_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BEMA(Bag([3], torch.float32), param_filter=ALL, **kwargs)


def test_bad_parameters():
    frozen = Bag([3], torch.float32).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to average"):
        EMA(frozen)  # nothing trainable
    with pytest.raises(ValueError, match="no parameters to average"):
        EMA(Bag([3], torch.float32), param_filter=lambda n, p: False)
    assert EMA(Bag([3, 4], torch.float32)).parameter_names == ["ps.0", "ps.1"]
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="not contiguous"):
        EMA(m, param_filter=ALL)
    m = nn.Module()
    m.w = nn.Parameter(torch.arange(4), requires_grad=False)
    with pytest.raises(TypeError, match="floating"):
        EMA(m, param_filter=ALL)
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="NaN/Inf"):
        EMA(m, param_filter=ALL)


def test_bad_step():
    avg = EMA(Bag([3], torch.float32), param_filter=ALL)
    with pytest.raises(ValueError, match="step"):
        avg.update(step=-1)
    with pytest.raises(ValueError, match="step"):
        avg.update(step=1.5)
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        avg.update(step=0)  # no optimizer step taken: nothing to fold in
    assert avg.step == 0
    avg.update(step=1)
    with pytest.raises(ValueError, match="does not follow"):
        avg.update(step=1)
    assert avg.step == 1


def test_forced_cpp_without_extension_names_the_import_error(monkeypatch):
    def failing(name):
        return None, ImportError(f"no module named {name} (simulated)")

    monkeypatch.setattr(dispatch, "_try_import", failing)
    with pytest.raises(BackendUnavailableError, match="simulated"):
        EMA(Bag([3], torch.float32), param_filter=ALL, backend="cpp")
    # auto falls back to the pure-PyTorch path
    avg = EMA(Bag([3], torch.float32), param_filter=ALL)
    assert {g.backend for g in avg._groups} == {"torch"}


def test_failed_update_changes_nothing(monkeypatch):
    model = Bag([10, 300], torch.float32)
    avg = BEMA(model, param_filter=ALL, update_after=2)
    avg.update()
    model.perturb(1.0)

    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(avg, "_launch", broken)
    with pytest.raises(RuntimeError, match="launch failed"):
        avg.update()  # step 2: the reset that takes theta_0
    assert avg.step == 1 and not avg._anchored
    monkeypatch.undo()
    avg.update()  # the retry takes theta_0 now
    assert avg.step == 2 and avg._anchored
    theta = {f"ps.{i}": p.detach() for i, p in enumerate(model.ps)}
    for k, v in avg.averaged_state_dict().items():
        assert torch.equal(v, theta[k])


def test_steps_must_increase():
    avg = EMA(Bag([3], torch.float32), param_filter=ALL)
    avg.update(step=5)
    with pytest.raises(ValueError, match="does not follow"):
        avg.update(step=5)
    with pytest.raises(ValueError, match="does not follow"):
        avg.update(step=4)
    assert avg.step == 5


@pytest.mark.parametrize("kind", ["ema", "bema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_aligned_blocks_match_the_masked_path(kind, dtype):
    """Aligned tensors take the unmasked full-block path; a non-finite element in a full block
    and one in a tail block still keep their average and set the flag, and every value equals
    that of the masked path (the plan forced unaligned) bit for bit, and the float64 formulas."""
    backend_or_skip("triton")

    sizes = [4096, 2048, 4100, 8]  # full blocks, a tail of 4, a tensor smaller than a block
    results = []
    for aligned in (True, False):
        torch.manual_seed(1234)
        model = Bag(sizes, dtype)
        avg = make(kind, model, "triton", **OPTIONS[kind]["plain"])
        teachers = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
        g = avg._groups[0]
        g.teachers = teachers
        avg._prepare(g)
        assert g.plan.aligned
        g.plan.aligned = aligned
        oracle = Oracle(kind, model.values(), **OPTIONS[kind]["plain"])
        for t in range(1, 4):
            model.perturb(0.1)
            if t == 3:
                with torch.no_grad():
                    model.ps[0][1000] = math.nan  # inside a full block
                    model.ps[2][4098] = math.inf  # inside the tail block
            theta = model.values()
            before = avg.averaged_state_dict(torch.float32)
            for x in teachers:
                x.fill_(math.nan)
            avg.update()
            oracle.step(t, theta)
        after = avg.averaged_state_dict(torch.float32)
        assert avg.nonfinite_detected()
        assert after["ps.0"][1000] == before["ps.0"][1000]
        assert after["ps.2"][4098] == before["ps.2"][4098]
        for i, ref in enumerate(oracle.averaged):
            keep = torch.isfinite(theta[i])
            assert_close(after[f"ps.{i}"][keep], ref[keep], FP32_RTOL, f"tensor {i}")
            assert not torch.isnan(teachers[i][keep]).any()
        results.append([after[f"ps.{i}"] for i in range(len(sizes))] + teachers)
    for fast, masked in zip(*results):
        # The unwritten (poisoned) teacher elements are NaN in both.
        assert torch.equal(fast.nan_to_num(7.0), masked.nan_to_num(7.0))
