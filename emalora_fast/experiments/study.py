"""The study, ``emalora-fast distill --study``: does an EMA/BEMA self-teacher help LoRA?

A study runs every variant over several seeds, each at its own best learning rate, and a grid of
teacher settings around one variant; it writes one results folder (see :mod:`.study_report`).

1. **Sweep**: every variant x learning rate x sweep seed. Each variant's learning rate is the one
   with the lowest mean final validation loss over the sweep seeds (a learning rate with a
   diverged seed loses to one without).
2. **Final**: every variant at its chosen learning rate over all ``seeds`` (sweep runs are
   reused). Reported on the test split and the forgetting split; paired against the baseline on
   the same seeds (same LoRA initialisation and data order).
3. **Grid**: each grid point (settings changed one at a time around ``grid_around``) at the
   chosen learning rate of ``grid_around``, over ``grid_seeds``.

A run is the unit of resumption: a finished run writes ``runs/<label>/result.json`` and is never
re-run; an interrupted one starts again. Runs are identified by their full settings, so a run
shared by two phases (or by a grid point equal to the default, or by a changed study in the same
folder: another learning rate, more seeds) is trained once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .main_job import StopFlag, check_writable
from .runs import (
    SMOLLM2,
    VARIANTS,
    Config,
    ExperimentError,
    Interrupted,
    LoraRun,
    atomic_write_json,
    load_base,
    load_texts,
    make_data,
    progress_bar,
)
from .stats import diverged, oscillation

__all__ = ["PRESETS", "StudySpec", "load_spec", "run_study"]

# Settings every run of a study shares (they define the base model and the held-out windows).
SHARED = ("model", "dataset", "pretrain_steps", "base_seed", "seq_len", "eval_windows", "device")
NOT_SETTINGS = ("output_dir", "run_name", "quick", "variants")
# Settings added after results were first kept: left out of a run's key while they hold their
# default (which reproduces the earlier behaviour), so that earlier results stay valid.
LATER_SETTINGS = {"plain_averager": "bema", "posthoc_sigma_rels": []}


@dataclass
class StudySpec:
    """What a study runs. JSON files given to ``--study-config`` hold these keys.

    Attributes:
        name: the results folder's default name.
        base: :class:`~emalora_fast.experiments.runs.Config` settings of every run.
        variants: label -> ``{"variant": one of runs.VARIANTS, **Config settings}``.
        baseline: the label every other variant is paired against.
        lrs: the learning rates of the sweep.
        sweep_seeds: seeds of the sweep.
        seeds: seeds of the final comparison at the chosen learning rates.
        grid_around: the variant whose settings the grid varies (None: no grid).
        grid: label -> Config settings changed from ``grid_around``'s (``"variant"`` among them
            switches the teacher kind, at ``grid_around``'s learning rate).
        grid_seeds: seeds of every grid point.
        posthoc: widths (sigma_rel) of post-hoc EMAs rebuilt from the baseline's runs at its
            chosen learning rate over ``seeds`` (one training run per seed gives every width).
        notes: free text copied into the summary.
    """

    name: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    lrs: list[float]
    sweep_seeds: list[int]
    seeds: list[int]
    baseline: str = "lora"
    grid_around: str | None = None
    grid: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid_seeds: list[int] = field(default_factory=list)
    posthoc: list[float] = field(default_factory=list)
    notes: str = ""

    def validate(self) -> None:
        if not self.variants:
            raise ExperimentError("study config: 'variants' is empty")
        if self.baseline not in self.variants:
            raise ExperimentError(f"study config: baseline {self.baseline!r} is not a variant")
        for key in ("lrs", "sweep_seeds", "seeds"):
            if not isinstance(getattr(self, key), list) or not getattr(self, key):
                raise ExperimentError(f"study config: {key!r} must be a non-empty list")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.lrs)) != len(self.lrs):
            raise ExperimentError("study config: 'seeds' and 'lrs' must not repeat values")
        if self.grid and self.grid_around not in self.variants:
            raise ExperimentError(
                f"study config: grid_around {self.grid_around!r} must name a variant"
            )
        if self.grid and not self.grid_seeds:
            raise ExperimentError("study config: a grid needs 'grid_seeds'")
        _check_settings("base", self.base, allow_shared=True)
        for label, v in self.variants.items():
            if not isinstance(v, dict) or v.get("variant") not in VARIANTS:
                raise ExperimentError(
                    f"study config: variant {label!r} needs 'variant': one of {list(VARIANTS)}"
                )
            _check_settings(f"variant {label!r}", {k: x for k, x in v.items() if k != "variant"})
        for label, point in self.grid.items():
            if isinstance(point, dict):
                point = {k: x for k, x in point.items() if k != "variant"}
            _check_settings(f"grid point {label!r}", point)
        for lr in self.lrs:  # every setting validates before anything runs
            for label in self.variants:
                self.config(label, lr=lr, seed=self.seeds[0])
        if "posthoc" in self.grid:
            raise ExperimentError("study config: 'posthoc' is a reserved grid label")
        for label in self.grid:
            self.config(self.grid_around, lr=self.lrs[0], seed=self.seeds[0], point=label)
        if self.posthoc:
            self.config(self.baseline, lr=self.lrs[0], seed=self.seeds[0], point="posthoc")

    def config(self, label: str, *, lr: float, seed: int, point: str | None = None) -> Config:
        """The run's settings: base, then the variant's, then the grid point's (``"posthoc"``:
        the post-hoc EMA widths)."""
        extra = {"posthoc_sigma_rels": list(self.posthoc)} if point == "posthoc" else {}
        point_settings = self.grid[point] if point and point != "posthoc" else {}
        settings = {**self.base, **self.variants[label], **point_settings, **extra}
        teacher = settings.pop("variant")  # a grid point may switch the teacher kind
        settings.update(lr=lr, seed=seed)
        try:
            if teacher not in VARIANTS:
                raise ExperimentError(f"'variant' must be one of {list(VARIANTS)}, got {teacher!r}")
            cfg = Config(**settings, variants=[teacher])
            cfg.validate()
        except ExperimentError as exc:
            where = f"grid point {point!r}" if point else f"variant {label!r}"
            raise ExperimentError(f"study config, {where}: {exc}") from exc
        return cfg


def _check_settings(where: str, settings: Any, allow_shared: bool = False) -> None:
    if not isinstance(settings, dict):
        raise ExperimentError(f"study config: {where} must be a mapping of settings")
    names = {f.name for f in dataclasses.fields(Config)} - set(NOT_SETTINGS)
    for key in settings:
        if key not in names:
            raise ExperimentError(f"study config: {where}: unknown setting {key!r}")
        if key in SHARED and not allow_shared:
            raise ExperimentError(f"study config: {where}: {key!r} can only be set in 'base'")
        if key in ("lr", "seed"):
            raise ExperimentError(f"study config: {where}: {key!r} is set by 'lrs'/'seeds'")


def load_spec(path: str) -> StudySpec:
    """A study from a JSON file; one-line errors for a missing file, bad JSON, unknown keys."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError as exc:
        raise ExperimentError(f"study config not found: {path}") from exc
    except json.JSONDecodeError as exc:
        msg = f"study config {path}: invalid JSON ({exc.msg}, line {exc.lineno})"
        raise ExperimentError(msg) from exc
    return spec_from_dict(raw, default_name=os.path.splitext(os.path.basename(path))[0])


def spec_from_dict(raw: Any, default_name: str = "study") -> StudySpec:
    if not isinstance(raw, dict):
        raise ExperimentError("study config must be a JSON object")
    known = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ExperimentError(f"study config: unknown keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("variants", "lrs", "sweep_seeds", "seeds") if k not in raw]
    if missing:
        raise ExperimentError(f"study config: missing keys {missing}")
    spec = StudySpec(**{"name": default_name, "base": {}, **raw})
    spec.validate()
    return spec


# ------------------------------------------------------------------------------------------
# Presets

_VARIANTS = {
    "lora": {"variant": "lora"},
    "ema-teacher": {"variant": "lora+ema-teacher"},
    "bema-teacher": {"variant": "lora+bema-teacher"},
}
_KNOBS = {
    "decay=0.995": {"ema_decay": 0.995},
    "decay=0.999": {"ema_decay": 0.999},
    # with warm-up the decay stays below its cap for ~1000 steps: the caps matter only without
    "decay=0.99, no warm-up": {"ema_decay": 0.99, "ema_warmup": False},
    "decay=0.995, no warm-up": {"ema_decay": 0.995, "ema_warmup": False},
    "decay=0.999, no warm-up": {"ema_decay": 0.999, "ema_warmup": False},
    "hard-label-w=0.2": {"hard_label_weight": 0.2},
    "T=2": {"temperature": 2.0},
    "reverse-kl": {"divergence": "reverse_kl"},
    "jsd-0.5": {"divergence": "jsd", "beta": 0.5},
    # BEMA's teacher as its bias-corrected extrapolation ema + alpha (theta_t - theta_0)
    "bema-teacher, teacher_weights=bema": {
        "variant": "lora+bema-teacher",
        "averager_options": {"teacher_weights": "bema"},
    },
    # control: plain LoRA at the teacher's learning rate, its EMA weights read without distilling
    "lora, no teacher (EMA weights read)": {"variant": "lora", "plain_averager": "ema"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {
        "name": "study-embedded",
        "base": {
            "steps": 150,
            "pretrain_steps": 1200,
            "eval_every": 15,
            "eval_windows": 32,
            "batch_size": 8,
            "seq_len": 64,
        },
        "variants": _VARIANTS,
        "lrs": [1e-3, 3e-3, 1e-2, 3e-2],
        "sweep_seeds": [0, 1],
        "seeds": [0, 1, 2, 3, 4],
        "grid_around": "ema-teacher",
        "grid": _KNOBS,
        "grid_seeds": [0, 1, 2],
        "posthoc": [0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.28],
    },
    "smollm2": {
        "name": "study-smollm2",
        "base": {
            "model": SMOLLM2,
            "steps": 40,
            "eval_every": 10,
            "eval_windows": 8,
            "batch_size": 4,
            "seq_len": 64,
            "lora_targets": "q_proj,k_proj,v_proj,o_proj",
        },
        "variants": {"lora": _VARIANTS["lora"], "ema-teacher": _VARIANTS["ema-teacher"]},
        "lrs": [1e-3],
        "sweep_seeds": [0],
        "seeds": [0, 1, 2],
        "notes": (
            "No learning-rate sweep in this study (one value, 1e-3, for both variants): a run of "
            "this model takes minutes on 2 CPU cores. The value comes from an exploratory "
            "plain-LoRA sweep (seed 0, 40 steps; final validation loss 3.108 / 2.979 / 2.962 at "
            "3e-4 / 1e-3 / 3e-3, forgetting-probe loss 3.43 / 3.58 / 3.86 from 3.28): 1e-3 and "
            "3e-3 fit the new task within 0.02 nats and 3e-3 forgets more. The teacher variant "
            "was not tuned separately."
        ),
    },
    "micro": {  # seconds: CI and a smoke test of the whole pipeline
        "name": "study-micro",
        "base": {
            "steps": 4,
            "pretrain_steps": 4,
            "eval_every": 2,
            "eval_windows": 2,
            "batch_size": 2,
            "seq_len": 16,
            "lora_r": 2,
        },
        "variants": {"lora": _VARIANTS["lora"], "ema-teacher": _VARIANTS["ema-teacher"]},
        "lrs": [1e-3],
        "sweep_seeds": [0],
        "seeds": [0],
        "posthoc": [0.1],
    },
}


def preset(name: str) -> StudySpec:
    if name not in PRESETS:
        raise ExperimentError(f"unknown study {name!r}; presets: {sorted(PRESETS)}")
    return spec_from_dict(json.loads(json.dumps(PRESETS[name])), default_name=name)


# ------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunSpec:
    label: str  # e.g. "ema-teacher/lr=0.003/seed=1" or "grid:T=2/seed=0"
    variant: str  # the study's variant label
    point: str | None
    lr: float
    seed: int
    config: Config

    @property
    def key(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in NOT_SETTINGS}
        for k, default in LATER_SETTINGS.items():
            if d.get(k) == default:
                del d[k]
        d["variant"] = self.config.variants[0]
        return _digest(d)

    @property
    def folder(self) -> str:
        safe = self.label.replace("/", "_").replace("=", "").replace(":", "-")
        return f"{safe}-{self.key}"


def _run(spec: StudySpec, variant: str, lr: float, seed: int, point: str | None = None) -> RunSpec:
    head = f"{variant}+posthoc" if point == "posthoc" else f"grid:{point}" if point else variant
    label = f"{head}/lr={lr:g}/seed={seed}"
    return RunSpec(
        label, variant, point, lr, seed, spec.config(variant, lr=lr, seed=seed, point=point)
    )


def plan(
    spec: StudySpec, results: dict[str, dict]
) -> tuple[list[RunSpec], dict[str, float] | None]:
    """The runs known so far and the chosen learning rates (None until the sweep is done).

    ``results`` maps run keys to finished results.
    """
    runs = [
        _run(spec, v, lr, s) for v in spec.variants for lr in spec.lrs for s in spec.sweep_seeds
    ]
    if not all(r.key in results for r in runs):
        return runs, None
    chosen = choose_lrs(spec, runs, results)
    for v in spec.variants:
        runs += [_run(spec, v, chosen[v], s) for s in spec.seeds]
    if spec.grid:
        runs += [_run(spec, spec.baseline, chosen[spec.baseline], s) for s in spec.grid_seeds]
        around = chosen[spec.grid_around]
        for p in spec.grid:
            runs += [_run(spec, spec.grid_around, around, s, p) for s in spec.grid_seeds]
    if spec.posthoc:
        base = chosen[spec.baseline]
        runs += [_run(spec, spec.baseline, base, s, "posthoc") for s in spec.seeds]
    return _unique(runs), chosen


def _unique(runs: list[RunSpec]) -> list[RunSpec]:
    seen, out = set(), []
    for r in runs:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


def choose_lrs(spec: StudySpec, runs: list[RunSpec], results: dict[str, dict]) -> dict[str, float]:
    """Per variant, the learning rate with (fewest seeds whose validation curve diverged, lowest
    mean final validation loss)."""
    chosen = {}
    for v in spec.variants:
        scores = []
        for lr in spec.lrs:
            rs = [results[r.key] for r in runs if r.variant == v and r.lr == lr]
            vals = [x["metrics"]["student"]["val"] for x in rs]
            bad = sum(x["metrics"]["val_diverged"] for x in rs)  # the test split stays unseen
            mean = math.fsum(vals) / len(vals)
            scores.append((bad, mean if math.isfinite(mean) else math.inf, lr))
        chosen[v] = min(scores)[2]
    return chosen


def run_metrics(curve: dict[str, Any]) -> dict[str, Any]:
    """Final losses per split of the student and averaged weights, and stability diagnostics."""
    splits = [k.split("/", 1)[1] for k in curve if k.startswith("student/")]
    test = curve["student/test"]
    return {
        "student": {s: curve[f"student/{s}"][-1] for s in splits},
        "averaged": {s: curve[f"averaged/{s}"][-1] for s in splits},
        "best_test": min(test),
        "oscillation": oscillation(test),
        "averaged_oscillation": oscillation(curve["averaged/test"]),
        "diverged": curve["nonfinite_step"] is not None or diverged(test),
        "val_diverged": curve["nonfinite_step"] is not None or diverged(curve["student/val"]),
        "averaged_diverged": diverged(curve["averaged/test"]),
    }


def _result_path(study_dir: str, r: RunSpec) -> str:
    return os.path.join(study_dir, "runs", r.folder, "result.json")


def _load_results(study_dir: str, runs: list[RunSpec]) -> dict[str, dict]:
    out = {}
    for r in runs:
        path = _result_path(study_dir, r)
        if os.path.isfile(path):
            with open(path) as f:
                out[r.key] = result = json.load(f)
            result["metrics"] = run_metrics(result["curve"])  # the current definitions
    return out


def _base_cache(study_dir: str, cfg: Config) -> str:
    """The embedded base model's file, named by the settings that define it."""
    d = {k: getattr(cfg, k) for k in (*SHARED, "batch_size")}
    return os.path.join(study_dir, f"base_model-{_digest(d)}.pt")


def _digest(d: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_study(
    spec: StudySpec, output_dir: str = "emalora-runs", run_name: str | None = None, *, progress=None
) -> dict[str, Any]:
    """Run (or continue) a study and write its results folder; returns the report's data."""
    from .report import write_report

    if progress is None:
        progress = progress_bar
    study_dir = os.path.join(output_dir, run_name or spec.name)
    check_writable(study_dir)
    # The folder's study.json is the study last run there; runs are keyed by their settings, so
    # a changed study (another learning rate, more seeds) reuses every run it shares.
    atomic_write_json(os.path.join(study_dir, "study.json"), dataclasses.asdict(spec))
    base_cfg = spec.config(spec.baseline, lr=spec.lrs[0], seed=spec.seeds[0])
    texts = load_texts(base_cfg)
    base, encode = load_base(base_cfg, texts.pretrain, _base_cache(study_dir, base_cfg), progress)
    data = make_data(base_cfg, texts, encode)
    steps = base_cfg.steps

    results: dict[str, dict] = {}
    while True:  # every finished run of every phase that the finished runs already decide
        runs, chosen = plan(spec, results)
        found = _load_results(study_dir, runs)
        if found.keys() <= results.keys():
            break
        results.update(found)
    n_later = 0 if chosen else len(spec.variants) * len(set(spec.seeds) - set(spec.sweep_seeds))
    n_later += 0 if chosen else (len(spec.grid) + 1) * len(spec.grid_seeds) * bool(spec.grid)
    n_later += 0 if chosen else len(spec.seeds) * bool(spec.posthoc)
    bar = progress(
        total=sum(r.config.steps for r in runs) + n_later * steps,
        initial=sum(r.config.steps for r in runs if r.key in results),
        desc="study",
        unit="step",
    )
    t0 = time.perf_counter()
    with StopFlag() as stop:
        try:
            while True:
                runs, chosen = plan(spec, results)
                results.update(_load_results(study_dir, runs))
                todo = [r for r in runs if r.key not in results]
                if not todo and chosen is not None:
                    break
                if chosen is not None:
                    bar.total = bar.n + sum(r.config.steps for r in todo)
                for r in todo:
                    results[r.key] = _train(r, base, data, study_dir, bar, stop)
        except Interrupted as exc:
            bar.close()
            raise Interrupted(f"{exc}; finished runs are kept") from exc
    bar.close()
    return write_report(study_dir, spec, runs, results, chosen, time.perf_counter() - t0)


def _train(r: RunSpec, base, data, study_dir: str, bar, stop) -> dict[str, Any]:
    bar.set_postfix_str(r.label, refresh=False)
    workdir = os.path.dirname(_result_path(study_dir, r))
    run = LoraRun(r.config, r.config.variants[0], base, data, workdir=workdir)
    t0 = time.perf_counter()

    def on_step(_run: LoraRun, seconds: float) -> None:
        bar.update(1)

    curve = run.run(on_step=on_step, stop=lambda: stop.requested)
    if curve["nonfinite_step"] is not None:  # count the steps it did not take
        bar.update(r.config.steps - run.step)
    result = {
        "label": r.label,
        "variant": r.variant,
        "teacher": r.config.variants[0],
        "point": r.point,
        "lr": r.lr,
        "seed": r.seed,
        "key": r.key,
        "config": dataclasses.asdict(r.config),
        "seconds": time.perf_counter() - t0,
        "curve": curve,
        "metrics": run_metrics(curve),
    }
    atomic_write_json(_result_path(study_dir, r), result)
    return result
