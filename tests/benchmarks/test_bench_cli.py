"""``emalora-fast bench``: device errors in one line, and the rounds the verdicts rest on."""

from __future__ import annotations

import pytest
import torch

from emalora_fast import cli
from emalora_fast.benchmarks import report, timing


def test_cuda_without_a_device_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["bench", "--quick", "--device", "cuda", "--output-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("emalora-fast bench: error: no CUDA device is available")
    assert "--device cpu" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("device, match", [("tpu", "cpu or cuda"), ("gpu0", "unknown device")])
def test_other_bad_devices_are_one_line(device, match, capsys, tmp_path):
    assert cli.main(["bench", "--device", device, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_default_device_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report.bench_device(None) == torch.device("cpu")
    assert report.bench_device("cpu") == torch.device("cpu")


def test_rounds_interleave_providers_in_rotated_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = timing.measure_rounds(fns, torch.device("cpu"), rounds=3, reps=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == [n for order in ("abc", "bca", "cab") for n in order for _ in range(2)]
    assert all(len(v) == 3 and min(v) >= 0 for v in timed.times.values())


def test_ratio_is_of_the_best_rounds_with_per_round_spread():
    timed = timing.Rounds({"ours": [2.0, 1.0, 4.0], "x": [3.0, 3.0, 5.0], "y": [4.0, 2.0, 9.0]})
    assert timed.best("ours") == 1.0
    value, lo, hi = timed.ratio(["x", "y"], "ours")
    assert value == 2.0  # min(3, 2) / 1
    # per round: min(3, 4)/2 = 1.5, min(3, 2)/1 = 2.0, min(5, 9)/4 = 1.25
    assert (lo, hi) == (1.25, 2.0)


def test_table_prints_the_spread_next_to_the_speedup(capsys):
    rows = [
        report.Row("profiles-k3", "set", "emalora", 1.0, speedup=1.4, speedup_lo=1.2,
                   speedup_hi=1.6, baseline="best"),
        report.Row("profiles-k3", "set", "k_foreach", 1.4),
    ]  # fmt: skip
    text = report.print_table(rows)
    header, _, ours, other = text.splitlines()
    assert "speedup_lo" not in header and "speedup" in header
    assert "1.4 (1.2-1.6)" in ours
    assert "(" not in other
