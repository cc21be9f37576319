"""The main job end to end: `distill --quick` into a temporary folder, user errors, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from emalora_fast import cli
from emalora_fast.experiments import data, runs
from emalora_fast.experiments import main_job as experiment

peft = pytest.importorskip("peft")

# --quick, shortened further so that the whole file stays within CI's budget.
SMALL = ["--steps", "8", "--pretrain-steps", "10", "--eval-every", "4", "--seq-len", "32"]


def run_cli(tmp_path, *extra):
    return cli.main(["distill", "--quick", "--output-dir", str(tmp_path), *SMALL, *extra])


def test_quick_run_writes_curves_plot_summary_and_adapters(tmp_path, capsys):
    assert run_cli(tmp_path, "--run-name", "r") == 0
    run = tmp_path / "r"
    for f in ("curves.json", "curves.csv", "curves.png", "summary.md", "config.json"):
        assert (run / f).is_file(), f
    curves = json.loads((run / "curves.json").read_text())["curves"]
    assert set(curves) == {"lora", "lora+ema-teacher", "lora+bema-teacher", "lora+bema-weights"}
    for name, c in curves.items():
        assert c["step"] == [0, 4, 8], name
        for split in ("val", "test", "forget"):
            values = c[f"student/{split}"] + c[f"averaged/{split}"]
            assert len(values) == 6 and all(0 < x < 10 for x in values), (name, split)
    # the same seed and data order: every variant starts from the same held-out loss
    assert len({c["student/test"][0] for c in curves.values()}) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "| lora+bema-teacher |" in out
    # stderr is not a terminal here: each progress bar draws a few times, not once per step
    for name in curves:
        if name != "lora+bema-weights":
            assert 1 <= captured.err.count(f"{name:>18s}:") <= 3, (name, captured.err[-500:])
    # Each summary row shows its own numbers: the derived row has no student, the plain row
    # does not repeat the derived row's averaged weights, forgetting is given for both.
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for line in out.splitlines()
        if line.startswith("| lora") and len(cells := line.split("|")) > 8
    }
    fmt = lambda v: format(v, ".4f")  # noqa: E731
    lora, derived, ema = rows["lora"], rows["lora+bema-weights"], rows["lora+ema-teacher"]
    assert lora[:4] == [fmt(curves["lora"]["student/test"][-1]),
                        fmt(curves["lora"]["student/forget"][-1]), "—", "—"]  # fmt: skip
    assert derived[:4] == ["—", "—", fmt(curves["lora"]["averaged/test"][-1]),
                           fmt(curves["lora"]["averaged/forget"][-1])]  # fmt: skip
    assert ema[2:4] == [fmt(curves["lora+ema-teacher"]["averaged/test"][-1]),
                        fmt(curves["lora+ema-teacher"]["averaged/forget"][-1])]  # fmt: skip

    # the adapters load with peft and reproduce the recorded held-out losses
    from transformers import LlamaForCausalLM

    cfg = experiment.Config.quick_defaults(output_dir=str(tmp_path), run_name="r", seq_len=32)
    splits = runs.make_data(cfg, runs.load_texts(cfg), data.encode_bytes).splits
    for name in experiment.VARIANTS:
        for kind in ("student", "averaged"):
            base = LlamaForCausalLM(runs.tiny_llama_config())
            base.load_state_dict(torch.load(run / "base_model.pt", weights_only=True))
            model = peft.PeftModel.from_pretrained(base, run / "adapters" / name / kind)
            for split in ("test", "forget"):
                loss = runs.held_out_loss(model, splits[split])
                expected = curves[name][f"{kind}/{split}"][-1]
                assert loss == pytest.approx(expected, rel=1e-5), (name, kind, split)


def test_interrupted_run_resumes_to_the_same_curves(tmp_path, monkeypatch):
    assert run_cli(tmp_path, "--run-name", "full", "--variants", "lora+bema-teacher") == 0
    full = json.loads((tmp_path / "full" / "curves.json").read_text())["curves"]

    real = experiment.StopFlag

    class StopAfterFive(real):
        """Ctrl-C arrives during step 5 of the first variant."""

        @property
        def requested(self):
            return self._requested or StopAfterFive.steps_seen >= 5

        @requested.setter
        def requested(self, v):
            self._requested = v

    StopAfterFive.steps_seen = 0
    orig_update = runs.BEMA.update

    def counting_update(self, step=None):
        StopAfterFive.steps_seen += 1
        return orig_update(self, step)

    monkeypatch.setattr(experiment, "StopFlag", StopAfterFive)
    monkeypatch.setattr(runs.BEMA, "update", counting_update)
    rc = run_cli(tmp_path, "--run-name", "cut", "--variants", "lora+bema-teacher")
    assert rc == 130
    ck = torch.load(tmp_path / "cut" / experiment.CHECKPOINT, weights_only=True)
    assert ck["current"]["step"] == 5
    monkeypatch.setattr(experiment, "StopFlag", real)
    assert run_cli(tmp_path, "--run-name", "cut", "--resume") == 0
    cut = json.loads((tmp_path / "cut" / "curves.json").read_text())["curves"]
    for key in full["lora+bema-teacher"]:  # bit for bit
        assert cut["lora+bema-teacher"][key] == full["lora+bema-teacher"][key], key


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no/such/file.txt"], "dataset file not found"),
        (["--steps", "0"], "--steps must be"),
        (["--lr", "-1"], "--lr must be"),
        (["--hard-label-weight", "2"], "--hard-label-weight"),
        (["--resume", "--run-name", "never"], "nothing to resume"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    rc = cli.main(["distill", "--quick", "--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["distill", "--quick", "--output-dir", str(blocker)])
    assert rc == 2
    assert "not writable" in capsys.readouterr().err


def test_text_dataset_and_module_entry_point(tmp_path):
    text = tmp_path / "data.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "emalora_fast", "distill", "--quick", "--output-dir",
         str(tmp_path / "runs"), "--dataset", str(text), "--variants", "lora", *SMALL],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "quick" / "curves.png").is_file()


def test_progress_bars_refresh_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    import io

    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = runs.progress_bar(total=10)
    assert bar.mininterval == runs.NON_TTY_REFRESH_S
    bar.close()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = runs.progress_bar(total=10)
    assert bar.mininterval < 1.0  # tqdm's own default on a terminal
    bar.close()


def test_quick_on_a_pretrained_model_is_a_short_smoke_run():
    embedded = experiment.Config.quick_defaults()
    real = experiment.Config.quick_defaults(model="smollm2-135m")
    assert (embedded.steps, embedded.batch_size, embedded.seq_len) == (120, 8, 96)
    assert (real.steps, real.batch_size, real.seq_len, real.eval_windows) == (8, 2, 32, 4)
    assert experiment.Config.quick_defaults(model="smollm2-135m", steps=3).steps == 3
