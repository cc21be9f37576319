"""PostHocEMA against float64 references written here from EDM2 (arXiv 2312.02696): updates at
any steps, synthesis exact for the update pattern, honest warnings, one step numbering, and
snapshot files that never lie (failures, two runs, bounded queue, leftovers, file modes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import FP32_RTOL, assert_close, backend_or_skip, rel_err
from safetensors import safe_open
from torch import nn

from emalora_fast import PostHocEMA, ReconstructionWarning, SnapshotWriteError
from emalora_fast.averaging import posthoc_io as io

ALL = lambda name, p: True  # noqa: E731
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Bag(nn.Module):
    def __init__(self, sizes=(37, 129)):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(n) + 1.0) for n in sizes])

    def walk(self, drift, scale=0.1):
        with torch.no_grad():
            for p, d in zip(self.ps, drift, strict=True):
                p.add_(d + torch.randn(p.shape) * scale)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in self.ps])


def gamma_of(sigma_rel: float) -> float:
    """EDM2 eq. 3 inverted by bisection: sigma_rel**2 = (g+1) / ((g+2)**2 (g+3))."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        width = np.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3)))
        lo, hi = (mid, hi) if width > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def masses(updates: np.ndarray, t: float, g: float) -> np.ndarray:
    """EDM2's weights of the update at s_k in the average at update time t:
    ((s_k/t)**(g+1) - (s_(k-1)/t)**(g+1)) for s_k <= t, 0 after."""
    prev = np.concatenate([[0.0], updates[:-1]])
    m = (np.minimum(updates, t) / t) ** (g + 1) - (np.minimum(prev, t) / t) ** (g + 1)
    return np.where(updates <= t, m, 0.0)


PATTERNS = {
    "every3": (0, list(range(3, 181, 3))),
    "irregular": (0, None),
    "irregular_after": (7, None),
}


def pattern(name: str) -> tuple[int, list[int]]:
    after, steps = PATTERNS[name]
    if steps is None:
        gaps = torch.randint(1, 8, (50,)).tolist()
        steps = np.cumsum(gaps).tolist()
    return after, [int(s) for s in steps]


def train(model, ph, steps, sigmas, after, record=()):
    """Random walk; ``ph.update(step=t)`` at each of ``steps``; float64 EDM2 profiles alongside
    (beta = (1 - delta/s)**(g+1), a copy at or before the origin). Returns (profiles, thetas,
    recorded live values)."""
    drift = [torch.randn(p.shape) * 0.05 for p in model.ps]
    ref = {s: None for s in sigmas}
    thetas, seen, prev = [], {}, 0
    for t in range(1, steps[-1] + 1):
        model.walk(drift)
        if t not in steps:
            continue
        ph.update(step=t)
        theta, s = model.flat(), t - after
        for sig in sigmas:
            if s <= 0 or prev == 0 or ref[sig] is None:
                ref[sig] = theta.clone()
            else:
                beta = (1 - (s - prev) / s) ** (gamma_of(sig) + 1)
                ref[sig] = beta * ref[sig] + (1 - beta) * theta
        if s > 0:
            thetas.append(theta)
            prev = s
        if t in record:
            seen[t] = ph.averaged_state_dict(torch.float32, profile=0)
    return ref, thetas, seen


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d["ps.0"].double().reshape(-1), d["ps.1"].double().reshape(-1)])


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_live_profiles_follow_edm2_for_any_update_pattern(backend, name):
    backend_or_skip(backend)
    after, steps = pattern(name)
    if backend == "triton":
        steps = steps[:25]
    model = Bag()
    ph = PostHocEMA(model, (0.05, 0.28), update_after=after, param_filter=ALL, backend=backend)
    ref, _, _ = train(model, ph, steps, (0.05, 0.28), after)
    for k, sig in enumerate((0.05, 0.28)):
        got = flat(ph.averaged_state_dict(torch.float32, profile=k))
        assert_close(got, ref[sig], FP32_RTOL, f"profile {sig}")
        # The error that matters: relative to the average's distance from the weights.
        assert rel_err(got - model.flat(), ref[sig] - model.flat()) < 1e-4


@pytest.mark.parametrize("name", list(PATTERNS))
def test_synthesis_is_exact_least_squares_for_the_update_pattern(name, tmp_path):
    """The rebuilt 0.1 / 0.2 averages equal the float64 least squares over EDM2 masses of the
    updates taken (weights 1/delta: the L2 norm of step functions), within fp32 rounding of the
    snapshots; and they are within 1% of those profiles run directly."""
    after, steps = pattern(name)
    model = Bag()
    kept = (0.05, 0.28)
    ph = PostHocEMA(model, kept, snapshot_every=10, snapshot_dir=tmp_path, update_after=after,
                    param_filter=ALL)  # fmt: skip
    ref, thetas, _ = train(model, ph, steps, (*kept, 0.1, 0.2), after)
    ph.flush()
    u = np.array([t - after for t in steps if t > after], dtype=np.float64)
    delta = np.diff(np.concatenate([[0.0], u]))
    theta = torch.stack(thetas)  # [n, P] float64
    snaps = [t - after for t in ph.snapshots]
    if u[-1] not in snaps:
        snaps.append(u[-1])  # the live profiles
    rows = [(s, g) for s in snaps for g in (gamma_of(0.05), gamma_of(0.28))]
    basis = np.stack([masses(u, s, g) for s, g in rows])  # [E, n]
    live = model.flat()
    for sig in (0.1, 0.2):
        target = masses(u, u[-1], gamma_of(sig))
        w = 1 / np.sqrt(delta)
        x, *_ = np.linalg.lstsq((basis * w).T, target * w, rcond=None)
        want = torch.from_numpy(x @ basis) @ theta
        got = flat(ph.synthesize(sig))
        assert rel_err(got - live, want - live) < 1e-4, sig
        resid = target - x @ basis
        err = np.sqrt((resid**2 / delta).sum() / (target**2 / delta).sum())
        assert ph.reconstruction_error(sig) == pytest.approx(err, rel=1e-4, abs=1e-7)
        assert rel_err(got - live, ref[sig] - live) < 0.01, sig
        assert ph.reconstruction_error(sig) < 0.06


def test_snapshot_cadence_with_gaps_and_global_step_numbering(tmp_path):
    """Updates every 3 steps, snapshot_every=10: the first update at or after each multiple
    snapshots; steps are global everywhere, also with update_after."""
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path, update_after=4,
                    param_filter=ALL)  # fmt: skip
    steps = list(range(3, 64, 3))
    _, _, seen = train(model, ph, steps, (0.05,), 4, record={30, 42})
    ph.flush()
    assert ph.snapshots == [12, 21, 30, 42, 51, 60]
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith("snapshot-"))
    assert files == [f"snapshot-{s:09d}.safetensors" for s in ph.snapshots]
    with safe_open(str(tmp_path / "snapshot-000000030.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "30" and f.metadata()["run_id"] == ph.run_id
        assert_close(flat({n[2:]: f.get_tensor(n) for n in f.keys() if n.startswith("0/")}),
                     flat(seen[30]), 0.0, "file at 30")  # fmt: skip
    # A kept profile at a snapshot step is that snapshot: the live average at global step 30.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in (30, 31, 32):  # 31, 32: the last update at or before them is 30
            assert_close(flat(ph.synthesize(0.05, step=s)), flat(seen[30]), 1e-6, f"step {s}")
        assert ph.reconstruction_error(0.05, step=42) < 1e-6
    state = ph.state_dict()
    assert [s for s, _ in state["snapshots"]] == ph.snapshots
    assert state["updates"] == [[6, 3, 20]] and state["step"] == 63
    with pytest.raises(ValueError, match=r"global step in \[6, 63\]"):
        ph.synthesize(0.05, step=5)


def test_synthesize_warns_or_raises_with_the_nearest_snapshots(tmp_path):
    model = Bag()
    ph = PostHocEMA(model, (0.05, 0.28), snapshot_every=10, snapshot_dir=tmp_path,
                    param_filter=ALL)  # fmt: skip
    train(model, ph, list(range(1, 107)), (0.05,), 0)
    ph.flush()
    err = ph.reconstruction_error(0.05, step=95)
    assert err > 0.1
    with pytest.warns(ReconstructionWarning, match=r"step 95 .* error of .* \[90, 100\]") as w:
        ph.synthesize(0.05, step=95)
    assert f"{err:.3g}" in str(w[0].message)
    with pytest.raises(ValueError, match=r"nearest snapshots at steps \[90, 100\]"):
        ph.synthesize(0.05, step=95, strict=True)
    narrow = ph.reconstruction_error(0.01)  # narrower than every kept width
    assert narrow > 0.3
    with pytest.warns(ReconstructionWarning, match=f"{narrow:.3g}.*kept widths"):
        ph.synthesize(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ph.synthesize(0.05, step=95, max_error=0.999)
        ph.synthesize(0.15, step=100)  # between the kept widths, at a snapshot: no warning
    with (
        pytest.raises(ValueError, match="above max_error"),
        ph.swapped(sigma_rel=0.01, strict=True),
    ):
        pass


def fail_at(monkeypatch, bad_steps: set[int], gate: threading.Event | None = None):
    real = io.write_atomic

    def writer(tensors, meta, path):
        if gate is not None:
            gate.wait(60)
        if int(meta["step"]) in bad_steps:
            with open(path + ".tmp", "wb") as f:  # a partial file, as a full disk leaves
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        real(tensors, meta, path)

    monkeypatch.setattr(io, "write_atomic", writer)


def wait_written(ph):
    deadline = time.monotonic() + 30
    while ph.pending_snapshots and time.monotonic() < deadline:
        time.sleep(0.01)


def test_failed_write_surfaces_at_the_next_update_and_the_run_resumes(tmp_path, monkeypatch):
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    fail_at(monkeypatch, {10})
    train(model, ph, list(range(1, 11)), (0.05,), 0)
    wait_written(ph)
    before = flat(ph.averaged_state_dict(torch.float32))
    with pytest.raises(SnapshotWriteError, match=r"step 10 -> .*snapshot-000000010\.safetensors"):
        ph.update(step=11)
    assert ph.step == 10 and torch.equal(flat(ph.averaged_state_dict(torch.float32)), before)
    assert ph.snapshots == [5]
    on_disk = sorted(f for f in os.listdir(tmp_path) if f.startswith("snapshot-"))
    assert on_disk == ["snapshot-000000005.safetensors"]  # and no .tmp left
    monkeypatch.undo()  # the directory is fixed
    train(model, ph, list(range(11, 21)), (0.05,), 0)
    state = ph.state_dict()
    assert [s for s, _ in state["snapshots"]] == [5, 15, 20]
    resumed = PostHocEMA(Bag(), snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    resumed.load_state_dict(state)
    again = resumed.synthesize(0.1, step=15, max_error=1.0)
    assert_close(flat(again), flat(ph.synthesize(0.1, step=15, max_error=1.0)), 0.0)


def test_every_failure_is_reported_once(tmp_path, monkeypatch):
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path, max_pending=8,
                    param_filter=ALL)  # fmt: skip
    gate = threading.Event()  # the writes finish only once every update is done
    fail_at(monkeypatch, {2, 6}, gate)
    train(model, ph, list(range(1, 7)), (0.05,), 0)
    gate.set()
    with pytest.raises(SnapshotWriteError) as info:
        ph.flush()
    assert [s for s, _, _ in info.value.failures] == [2, 6]
    assert "step 2 ->" in str(info.value) and "step 6 ->" in str(info.value)
    assert ph.snapshots == [4]
    ph.flush()  # reported: nothing left to raise
    assert ph.state_dict()["snapshots"] == [[4, "snapshot-000000004.safetensors"]]


SCRIPT = """
import sys, torch
from torch import nn
from emalora_fast import PostHocEMA
from emalora_fast.averaging import posthoc_io as io
real = io.write_atomic
def writer(tensors, meta, path):
    if meta["step"] == "{bad}":
        raise PermissionError(13, "Permission denied", path)
    real(tensors, meta, path)
io.write_atomic = writer
model = nn.Linear(4, 3)
ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=sys.argv[1], param_filter=lambda n, p: True)
for t in range(1, 11):
    with torch.no_grad():
        model.weight.add_(0.1)
    ph.update(step=t)
print("training done")
"""


@pytest.mark.parametrize("bad", [10, 0], ids=["final_write_fails", "all_written"])
def test_a_run_whose_final_write_fails_exits_nonzero(tmp_path, bad):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.replace("{bad}", str(bad))))
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "snaps")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "training done" in out.stdout, out.stderr
    snaps = sorted(f for f in os.listdir(tmp_path / "snaps") if f.startswith("snapshot-"))
    if bad:
        assert out.returncode == 1, out.stderr
        assert "snapshot write(s) failed: step 10 ->" in out.stderr
        assert snaps == ["snapshot-000000005.safetensors"]
    else:
        assert out.returncode == 0, out.stderr
        assert snaps == ["snapshot-000000005.safetensors", "snapshot-000000010.safetensors"]


def test_two_runs_in_one_directory_are_told_apart(tmp_path):
    one = PostHocEMA(m1 := Bag(), snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    train(m1, one, list(range(1, 11)), (0.05,), 0)
    state_one = one.state_dict()
    two = PostHocEMA(m2 := Bag(), snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    with pytest.raises(ValueError, match=f"run {one.run_id}.*load_state_dict.*overwrite=True"):
        two.update(step=1)
    assert two.step == 0
    two = PostHocEMA(m2, snapshot_every=5, snapshot_dir=tmp_path, overwrite=True,
                     param_filter=ALL)  # fmt: skip
    train(m2, two, list(range(1, 6)), (0.05,), 0)
    two.flush()
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("snap")) == [
        "snapshot-000000005.safetensors"
    ]
    # Run one goes on: its writes are refused, and reported.
    train(m1, one, list(range(11, 16)), (0.05,), 0)
    with pytest.raises(SnapshotWriteError, match=f"now belongs to run {two.run_id}"):
        one.flush()
    # A resumed run one is refused rather than reading run two's files.
    again = PostHocEMA(Bag(), snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    with pytest.raises(ValueError, match=f"holds the snapshots of run {two.run_id}"):
        again.load_state_dict(state_one)
    assert state_one["run_id"] == one.run_id != two.run_id


def test_writer_queue_is_bounded(tmp_path, monkeypatch):
    gate = threading.Event()
    real = io.write_atomic
    in_flight = []

    def slow(tensors, meta, path):
        in_flight.append(int(meta["step"]))
        gate.wait(60)
        real(tensors, meta, path)

    monkeypatch.setattr(io, "write_atomic", slow)
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=1, snapshot_dir=tmp_path, max_pending=2,
                    param_filter=ALL)  # fmt: skip
    ph.update(step=1)
    ph.update(step=2)
    assert ph.pending_snapshots == [1, 2]
    third = threading.Thread(target=ph.update, kwargs={"step": 3})
    third.start()
    third.join(0.5)
    assert third.is_alive(), "update(3) must wait for room in the queue"
    assert ph.pending_snapshots == [1, 2]  # no third host copy taken
    gate.set()
    third.join(60)
    ph.flush()
    assert ph.snapshots == [1, 2, 3] and in_flight == [1, 2, 3]


def test_leftover_tmp_files_are_removed_at_the_next_start(tmp_path):
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    train(model, ph, list(range(1, 11)), (0.05,), 0)
    state = ph.state_dict()
    leftover = tmp_path / "snapshot-000000015.safetensors.tmp"  # a write killed by SIGKILL
    leftover.write_bytes(b"half a file")
    resumed = PostHocEMA(Bag(), snapshot_every=5, snapshot_dir=tmp_path, param_filter=ALL)
    assert leftover.exists()  # nothing is touched before the run is known
    resumed.load_state_dict(state)
    assert not leftover.exists()
    leftover.write_bytes(b"half a file")
    PostHocEMA(Bag(), snapshot_every=5, snapshot_dir=tmp_path, overwrite=True,
               param_filter=ALL).update(step=1)  # fmt: skip
    assert not leftover.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("snapshot-")]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_snapshot_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        model = Bag()
        ph = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path, param_filter=ALL)
        train(model, ph, [1, 2], (0.05,), 0)
        ph.close()
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "snapshot-000000002.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~mask


def test_state_of_an_older_version_is_refused(tmp_path):
    model = Bag()
    ph = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path, param_filter=ALL)
    train(model, ph, [1, 2, 3], (0.05,), 0)
    state = ph.state_dict()
    del state["run_id"], state["updates"]
    with pytest.raises(ValueError, match="older PostHocEMA"):
        PostHocEMA(
            Bag(), snapshot_every=2, snapshot_dir=tmp_path / "b", param_filter=ALL
        ).load_state_dict(state)


KILLED = """
import sys, time, torch
from torch import nn
from emalora_fast import PostHocEMA
from emalora_fast.averaging import posthoc_io as io
def hang(tensors, meta, path):
    with open(path + ".tmp", "wb") as f:
        f.write(b"half a file")
    print("writing", flush=True)
    time.sleep(600)
model = nn.Linear(4, 3)
ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=sys.argv[1], param_filter=lambda n, p: True)
for t in range(1, 16):
    with torch.no_grad():
        model.weight.add_(0.1)
    ph.update(step=t)
    if t == 10:
        torch.save({"ph": ph.state_dict(), "weight": model.weight.detach().clone()}, sys.argv[2])
        io.write_atomic = hang
time.sleep(600)
"""


def test_a_killed_run_resumes_and_its_tmp_file_is_removed(tmp_path):
    script, snaps, state = tmp_path / "run.py", tmp_path / "snaps", tmp_path / "state.pt"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, str(script), str(snaps), str(state)], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL: no atexit, no cleanup
        proc.wait(60)
    assert (snaps / "snapshot-000000015.safetensors.tmp").exists()
    saved = torch.load(state, weights_only=True)
    model = nn.Linear(4, 3)
    ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=snaps, param_filter=ALL)
    ph.load_state_dict(saved["ph"])
    assert not (snaps / "snapshot-000000015.safetensors.tmp").exists()
    assert ph.snapshots == [5, 10] and ph.step == 10
    with torch.no_grad():
        model.weight.copy_(saved["weight"])
    for t in range(11, 16):
        with torch.no_grad():
            model.weight.add_(0.1)
        ph.update(step=t)
    ph.flush()
    assert ph.snapshots == [5, 10, 15]
    with safe_open(str(snaps / "snapshot-000000015.safetensors"), "pt") as f:
        assert f.metadata()["run_id"] == saved["ph"]["run_id"]
