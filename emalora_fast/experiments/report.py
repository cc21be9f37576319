"""The results folder of a study: tables with intervals, per-run curves, plots.

Writes, next to ``study.json`` and ``runs/`` (one ``result.json`` per run):

- ``summary.md``: the learning-rate sweep, the main table (each variant at its chosen learning
  rate: mean ± std, 95% t interval, paired difference to the baseline with its 95% interval),
  the averaged weights, the teacher-settings grid, diverged runs, and a reading of the numbers;
- ``results.json``: the same numbers, machine-readable; ``runs.csv``: one row per run;
  ``curves.csv``: every held-out loss of every run (long format);
- ``curves.png``: loss curves with seed bands (diverged runs in their own panel),
  ``intervals.png``: paired differences to the baseline (new task and forgetting) with 95%
  intervals, ``lr_sweep.png``: validation loss against learning rate.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from typing import Any

from .runs import atomic_write_json
from .stats import Interval, describe, paired

LEVEL = 0.95


def _hardware() -> str:
    import torch

    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores visible, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def _final_runs(spec, runs, results, variant, lr, seeds, point=None):
    by_seed = {
        r.seed: results[r.key]
        for r in runs
        if r.variant == variant and r.lr == lr and r.point == point and r.key in results
    }
    return [by_seed[s] for s in seeds if s in by_seed]


def _row(label, lr, rs, base, who="student", point=None) -> dict[str, Any]:
    """Statistics of runs ``rs`` against baseline runs ``base`` (same seeds, same order)."""
    test = [r["metrics"][who]["test"] for r in rs]
    forget = [r["metrics"][who]["forget"] for r in rs]
    b_test = [r["metrics"]["student"]["test"] for r in base]
    b_forget = [r["metrics"]["student"]["forget"] for r in base]
    div_key = "diverged" if who == "student" else "averaged_diverged"
    osc = "oscillation" if who == "student" else "averaged_oscillation"
    return {
        "label": label,
        "point": point,
        "who": who,
        "lr": lr,
        "seeds": [r["seed"] for r in rs],
        "test": describe(test, LEVEL),
        "forget": describe(forget, LEVEL),
        "d_test": paired(test, b_test, LEVEL),
        "d_forget": paired(forget, b_forget, LEVEL),
        "oscillation": math.fsum(r["metrics"][osc] for r in rs) / max(len(rs), 1),
        "diverged": [r["seed"] for r in rs if r["metrics"][div_key]],
        "seconds": math.fsum(r["seconds"] for r in rs) / max(len(rs), 1),
    }


def build_tables(spec, runs, results, chosen) -> dict[str, Any]:
    base_lr = chosen[spec.baseline]
    base_runs = _final_runs(spec, runs, results, spec.baseline, base_lr, spec.seeds)
    main, averaged = [], []
    for v in spec.variants:
        rs = _final_runs(spec, runs, results, v, chosen[v], spec.seeds)
        main.append(_row(v, chosen[v], rs, base_runs))
        if v == spec.baseline:
            main[-1]["d_test"] = main[-1]["d_forget"] = None
        teacher = spec.variants[v]["variant"]
        kind = "EMA weights = its teacher" if teacher == "lora+ema-teacher" else "BEMA weights"
        averaged.append(_row(f"{v} ({kind})", chosen[v], rs, base_runs, who="averaged"))
    grid, grid_averaged = [], []
    if spec.grid:
        gb = _final_runs(spec, runs, results, spec.baseline, base_lr, spec.grid_seeds)
        lr = chosen[spec.grid_around]
        default = _final_runs(spec, runs, results, spec.grid_around, lr, spec.grid_seeds)
        grid.append(_row(f"{spec.grid_around} (default)", lr, default, gb))
        for p in spec.grid:
            rs = _final_runs(spec, runs, results, spec.grid_around, lr, spec.grid_seeds, p)
            grid.append(_row(p, lr, rs, gb, point=p))
            grid_averaged.append(_row(f"{p} (its averaged weights)", lr, rs, gb, "averaged", p))
    sweep = []
    for v in spec.variants:
        for lr in spec.lrs:
            rs = _final_runs(spec, runs, results, v, lr, spec.sweep_seeds)
            vals = [r["metrics"]["student"]["val"] for r in rs]
            sweep.append(
                {
                    "variant": v,
                    "lr": lr,
                    "val": describe(vals, LEVEL),
                    "values": vals,
                    "diverged": sum(r["metrics"]["val_diverged"] for r in rs),
                    "chosen": lr == chosen[v],
                }
            )
    return {
        "main": main,
        "averaged": averaged,
        "grid": grid,
        "grid_averaged": grid_averaged,
        "sweep": sweep,
        "posthoc": _posthoc_rows(spec, runs, results, base_lr),
    }


def _posthoc_rows(spec, runs, results, lr) -> list[dict[str, Any]]:
    """Per width: the rebuilt post-hoc average's losses over seeds, paired against the live
    weights of the same runs (the baseline at its learning rate)."""
    rs = _final_runs(spec, runs, results, spec.baseline, lr, spec.seeds, "posthoc")
    rs = [r for r in rs if "posthoc" in r["curve"]]
    rows = []
    for sigma in spec.posthoc if rs else []:
        key = f"{sigma:g}"
        test = [r["curve"]["posthoc"][key]["test"] for r in rs]
        forget = [r["curve"]["posthoc"][key]["forget"] for r in rs]
        steps = rs[0]["config"]["steps"]
        rows.append(
            {
                "sigma_rel": sigma,
                # the plain EMA of the same width at the last step (none below one step)
                "ema_decay_at_end": 1 - 1 / (sigma * steps) if sigma * steps > 1 else None,
                "seeds": [r["seed"] for r in rs],
                "test": describe(test, LEVEL),
                "forget": describe(forget, LEVEL),
                "d_test": paired(test, [r["metrics"]["student"]["test"] for r in rs], LEVEL),
                "d_forget": paired(forget, [r["metrics"]["student"]["forget"] for r in rs], LEVEL),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------
# Markdown


def _f(x: float, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ms(i: Interval) -> str:
    return f"{_f(i.mean)} ± {_f(i.std)}" if i.n > 1 else _f(i.mean)


def _ci(i: Interval) -> str:
    return f"[{_f(i.low)}, {_f(i.high)}]" if i.n > 1 else "—"


def _delta(i: Interval | None) -> str:
    if i is None:
        return "(baseline)"
    if i.n < 2:
        return f"{_f(i.mean, '+.4f')} (n=1, no interval)"
    verdict = "**significant**" if i.excludes_zero else "n.s."
    return f"{_f(i.mean, '+.4f')} [{_f(i.low, '+.4f')}, {_f(i.high, '+.4f')}] {verdict}"


def _table(rows: list[dict], baseline: str) -> list[str]:
    out = [
        f"| variant | LR | n | new task: test loss, mean ± std | 95% CI | Δ vs {baseline} [95% CI] "
        f"| forgetting: loss, mean ± std | Δ forgetting vs {baseline} [95% CI] | worst seed "
        "(test) | oscillation | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        div = (
            f"**{len(r['diverged'])}/{r['test'].n}** (seeds {r['diverged']})"
            if r["diverged"]
            else "0"
        )
        out.append(
            f"| {r['label']} | {r['lr']:g} | {r['test'].n} | {_ms(r['test'])} | {_ci(r['test'])} "
            f"| {_delta(r['d_test'])} | {_ms(r['forget'])} | {_delta(r['d_forget'])} "
            f"| {_f(r['test'].worst)} | {_f(r['oscillation'])} | {div} |"
        )
    return out


def _verdict(d: Interval, what: str) -> str:
    if d.n < 2:
        return f"{what}: Δ = {_f(d.mean, '+.4f')} from one seed (no interval)"
    span = f"Δ = {_f(d.mean, '+.4f')} nats [{_f(d.low, '+.4f')}, {_f(d.high, '+.4f')}]"
    if not d.excludes_zero:
        return f"{what}: {span}, no significant difference"
    better = "lower (better)" if d.high < 0 else "higher (worse)"
    return f"{what}: {span}, significantly {better}"


def reading(spec, tables) -> list[str]:
    """Plain sentences generated from the intervals (no rounding of a non-significant result)."""
    lines = []
    for r in tables["main"] + tables["averaged"] + tables["grid"] + tables["grid_averaged"]:
        if r["label"] == spec.baseline or not r["seeds"]:
            continue
        n = r["test"].n
        div = f"; **{len(r['diverged'])} of {n} seeds diverged**" if r["diverged"] else ""
        lines.append(
            f"- **{r['label']}** vs {spec.baseline} (paired, n={n}): "
            f"{_verdict(r['d_test'], 'new task')}; {_verdict(r['d_forget'], 'forgetting')}{div}."
        )
    return lines


def summary_markdown(
    spec, tables, chosen, seconds: float, n_runs: int, train_seconds: float
) -> str:
    b = spec.config(spec.baseline, lr=chosen[spec.baseline], seed=spec.seeds[0])
    model = b.model or "embedded tiny Llama (4 layers, hidden 128, byte tokens)"
    L = [
        f"# Study: {spec.name}",
        "",
        f"Model {model}; adaptation data {b.dataset or 'KJV Psalms (embedded)'}; "
        f"LoRA r={b.lora_r} on {b.lora_targets}; {b.steps} steps of batch {b.batch_size} x "
        f"{b.seq_len} tokens, AdamW. "
        f"Teacher variants: {b.divergence} at T={b.temperature}, hard-label weight "
        f"{b.hard_label_weight}, distillation from step {b.distill_from_step}, EMA decay "
        f"{b.ema_decay} (warm-up {b.ema_warmup}). Held-out losses in nats per token "
        f"({b.eval_windows} windows of {b.seq_len} tokens per split), lower is better: "
        "**new task** = the test split of the adaptation text; **forgetting** = held-out text of "
        "the pre-training domain. Learning rates chosen per variant on the validation split over "
        f"seeds {spec.sweep_seeds} from {spec.lrs}; final numbers over seeds {spec.seeds} "
        "(a seed fixes the LoRA initialisation and the data order, shared by all variants, so "
        "differences are paired). Intervals: 95% Student t. A run is **diverged** when its "
        "test loss is not finite or ends more than half of its improvement above its best.",
        "",
        f"{n_runs} runs, {train_seconds / 60:.1f} min of training and evaluation in all (the sum "
        f"over runs; {seconds / 60:.1f} min of wall time in the invocation that wrote this); "
        f"{_hardware()}.",
    ]
    if spec.notes:
        L += ["", spec.notes]
    L += ["", "## Main comparison (each variant at its chosen learning rate)", ""]
    L += _table(tables["main"], spec.baseline)
    L += ["", "## Averaged weights evaluated directly (no extra training)", ""]
    L += _table(tables["averaged"], spec.baseline)
    if tables["grid"]:
        L += ["", f"## Teacher settings, one at a time around {spec.grid_around}", ""]
        L += [
            f"Every grid run uses {spec.grid_around}'s learning rate and seeds "
            f"{spec.grid_seeds}; Δ is paired against {spec.baseline} at its own learning rate on "
            f"the same seeds. Settings changed: "
            f"{'; '.join(f'{k}: {json.dumps(v)}' for k, v in spec.grid.items())}.",
            "",
        ]
        L += _table(tables["grid"], spec.baseline)
        L += [
            "",
            "Averaged weights of the grid runs (EMA: the teacher; BEMA: the BEMA weights):",
            "",
        ]
        L += _table(tables["grid_averaged"], spec.baseline)
    if tables["posthoc"]:
        L += ["", f"## Post-hoc EMA: every averaging width from one run ({spec.baseline})", ""]
        L += [
            f"Each {spec.baseline} run at its chosen learning rate also kept a PostHocEMA "
            "(power-function profiles of relative width 0.05 and 0.28, snapshotted every "
            "evaluation); after training the average of each width below was rebuilt from the "
            "snapshots by least squares and evaluated. Δ is paired against the same runs' live "
            "weights at the last step. `≈ EMA decay` is the plain EMA whose width matches at "
            "the last step (1 - 1/(sigma_rel x steps)).",
            "",
            "| sigma_rel | ≈ EMA decay | n | new task: test loss | Δ vs live weights [95% CI] "
            "| forgetting | Δ forgetting [95% CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in tables["posthoc"]:
            L.append(
                f"| {r['sigma_rel']:g} | {_f(r['ema_decay_at_end'], '.3f')} | {r['test'].n} "
                f"| {_ms(r['test'])} | {_delta(r['d_test'])} | {_ms(r['forget'])} "
                f"| {_delta(r['d_forget'])} |"
            )
    L += ["", "## Learning-rate sweep (validation loss, final step)", ""]
    L += [
        "| variant | LR | n | val loss, mean ± std | diverged | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for s in tables["sweep"]:
        edge = s["chosen"] and s["lr"] in (min(spec.lrs), max(spec.lrs)) and len(spec.lrs) > 1
        mark = "**yes** (edge of the sweep)" if edge else ("**yes**" if s["chosen"] else "")
        L.append(
            f"| {s['variant']} | {s['lr']:g} | {s['val'].n} | {_ms(s['val'])} | {s['diverged']} "
            f"| {mark} |"
        )
    L += ["", "## Reading", ""] + reading(spec, tables)
    plots = "`curves.png`, `intervals.png`, `lr_sweep.png`"
    L += ["", f"Plots: {plots}" + (", `posthoc.png`." if tables["posthoc"] else ".")]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------
# Files


def _interval_json(i: Interval) -> dict:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in i.as_dict().items()
    }


def _jsonable(rows: list[dict]) -> list[dict]:
    return [
        {k: _interval_json(v) if isinstance(v, Interval) else v for k, v in r.items()} for r in rows
    ]


def write_report(study_dir, spec, runs, results, chosen, seconds) -> dict[str, Any]:

    tables = build_tables(spec, runs, results, chosen)
    done = [results[r.key] for r in runs if r.key in results]
    with open(os.path.join(study_dir, "summary.md"), "w") as f:
        train = math.fsum(r["seconds"] for r in done)
        f.write(summary_markdown(spec, tables, chosen, seconds, len(done), train))
    atomic_write_json(
        os.path.join(study_dir, "results.json"),
        {"study": spec.name, "chosen_lrs": chosen, "seconds": seconds, "hardware": _hardware()}
        | {k: _jsonable(v) for k, v in tables.items()},
    )
    with open(os.path.join(study_dir, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["label", "variant", "point", "lr", "seed", "val", "test", "forget", "averaged_test",
             "averaged_forget", "best_test", "oscillation", "diverged", "val_diverged", "seconds"]
        )  # fmt: skip
        for r in done:
            m = r["metrics"]
            w.writerow(
                [r["label"], r["variant"], r["point"] or "", r["lr"], r["seed"],
                 m["student"]["val"], m["student"]["test"], m["student"]["forget"],
                 m["averaged"]["test"], m["averaged"]["forget"], m["best_test"],
                 m["oscillation"], int(m["diverged"]), int(m["val_diverged"]),
                 round(r["seconds"], 2)]
            )  # fmt: skip
    with open(os.path.join(study_dir, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "variant", "point", "lr", "seed", "step", "weights", "split", "loss"])
        for r in done:
            c = r["curve"]
            for k, vals in c.items():
                if "/" not in k:
                    continue
                who, split = k.split("/", 1)
                for step, v in zip(c["step"], vals):
                    w.writerow(
                        [r["label"], r["variant"], r["point"] or "", r["lr"], r["seed"], step, who,
                         split, v]
                    )  # fmt: skip
    from .plots import plot_all

    plot_all(study_dir, spec, runs, results, chosen, tables)
    return {"tables": tables, "chosen": chosen, "study_dir": study_dir, "runs": done}
