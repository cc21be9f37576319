"""The main job, ``emalora-fast distill``: one seed of LoRA with and without a self-teacher.

It trains the same LoRA run (same seed, same data order) three ways and reads four curves off
them:

- ``lora``: plain LoRA on the next-token cross-entropy;
- ``lora+bema-weights``: the BEMA of that same run, evaluated without any distillation (cheap);
- ``lora+ema-teacher``: LoRA distilled from its own EMA adapter (plus the cross-entropy);
- ``lora+bema-teacher``: LoRA distilled from its own BEMA adapter (plus the cross-entropy).

Every evaluation step records the held-out losses of the student and of its averaged weights on
the validation and test splits of the adaptation text and on the pre-training domain
(forgetting); see :mod:`.runs`. Outputs go to ``<output-dir>/<run-name>/``: ``curves.json``,
``curves.csv``, ``curves.png``, ``summary.md``, ``config.json`` and the final adapters (peft
format) under ``adapters/``. The run checkpoints after every evaluation and on Ctrl-C;
``--resume`` continues it. One seed says nothing about seed-to-seed noise: ``--study``
(:mod:`.study`) answers the question with seeds, tuned learning rates and intervals.

By default everything is offline: a small Llama-architecture model is built from a config,
pre-trained briefly on an embedded public-domain corpus (Genesis and Exodus, KJV, byte-level
tokens), then LoRA-adapted to another (Psalms).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import time
from typing import Any

import torch

from .runs import (
    SPLITS,
    VARIANTS,
    Config,
    ExperimentError,
    Interrupted,
    LoraRun,
    atomic_save,
    load_base,
    load_texts,
    make_data,
    progress_bar,
)

__all__ = ["Config", "ExperimentError", "Interrupted", "VARIANTS", "run_experiment"]

DERIVED = {"lora+bema-weights": ("lora", "averaged")}  # a curve read off another run
CHECKPOINT = "checkpoint.pt"


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _train_variant(name, cfg, base, data, state, progress, stop):
    """Train one variant from scratch or from ``state['current']``; returns its curve."""
    run = LoraRun(cfg, name, base, data)
    cur = state.get("current")
    if cur and cur["variant"] == name:
        run.load_state_dict(cur)

    def checkpoint(r: LoraRun) -> None:
        state["current"] = r.state_dict()
        atomic_save(state, os.path.join(cfg.run_dir, CHECKPOINT))

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress(total=cfg.steps, initial=run.step, desc=f"{name:>18s}")

    def on_step(r: LoraRun, seconds: float) -> None:
        # refresh=False: the bar redraws on update() at its own rate (rarely off a terminal).
        bar.set_postfix(
            loss=f"{r.last_loss:.3f}", tok_s=f"{tokens_per_step / seconds:.0f}", refresh=False
        )
        bar.update(1)

    def should_stop() -> bool:
        if stop.requested:
            checkpoint(run)
            return True
        return False

    try:
        curve = run.run(on_step=on_step, on_eval=checkpoint, stop=should_stop)
    finally:
        bar.close()
    out = os.path.join(cfg.run_dir, "adapters", name)
    run.model.save_pretrained(os.path.join(out, "student"), selected_adapters=["default"])
    run.avg.save_pretrained(os.path.join(out, "averaged"))
    return curve


def run_experiment(cfg: Config, *, resume: bool = False, progress=None) -> dict[str, Any]:
    """Run (or resume) the main job; returns the curves and the summary rows."""
    cfg.validate()
    if progress is None:
        progress = progress_bar
    ck_path = os.path.join(cfg.run_dir, CHECKPOINT)
    state: dict[str, Any] = {"config": dataclasses.asdict(cfg), "curves": {}, "times": {}}
    if resume:
        if not os.path.isfile(ck_path):
            raise ExperimentError(f"nothing to resume: {ck_path} does not exist")
        state = torch.load(ck_path, weights_only=True)
        keep = {"output_dir": cfg.output_dir, "run_name": cfg.run_name}
        cfg = Config(**{**state["config"], **keep})
    check_writable(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    texts = load_texts(cfg)
    base, encode = load_base(
        cfg, texts.pretrain, os.path.join(cfg.run_dir, "base_model.pt"), progress
    )
    data = make_data(cfg, texts, encode)
    with StopFlag() as stop:
        for name in cfg.variants:
            if name in state["curves"]:
                continue
            t0 = time.perf_counter()
            curve = _train_variant(name, cfg, base, data, state, progress, stop)
            state["curves"][name] = curve
            state["times"][name] = state["times"].get(name, 0.0) + time.perf_counter() - t0
            state.pop("current", None)
            atomic_save(state, ck_path)
    curves = _with_derived(state["curves"])
    rows = write_outputs(cfg, curves, state["times"])
    return {"curves": curves, "summary": rows, "run_dir": cfg.run_dir}


def check_writable(path: str) -> None:
    """Create ``path`` if needed; a one-line error when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ExperimentError(f"output directory {path} is not writable ({exc.strerror})") from exc


def _with_derived(curves: dict[str, dict]) -> dict[str, dict]:
    out = dict(curves)
    for name, (src, who) in DERIVED.items():
        if src in curves:
            c = curves[src]
            d = {"step": c["step"], "nonfinite_step": c["nonfinite_step"]}
            for split in SPLITS:
                d[f"student/{split}"] = d[f"averaged/{split}"] = c[f"{who}/{split}"]
            out[name] = d
    return out


# ------------------------------------------------------------------------------------------
# Outputs


def write_outputs(cfg: Config, curves: dict[str, dict], times: dict[str, float]) -> list[dict]:
    """``curves.json``, ``curves.csv``, ``curves.png`` and ``summary.md``; returns the rows."""
    from .stats import diverged

    run_dir = cfg.run_dir
    with open(os.path.join(run_dir, "curves.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "curves": curves, "seconds": times}, f)
    with open(os.path.join(run_dir, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step", "split", "student_loss", "averaged_loss"])
        for name, c in curves.items():
            for split in SPLITS:
                for row in zip(c["step"], c[f"student/{split}"], c[f"averaged/{split}"]):
                    w.writerow([name, row[0], split, *row[1:]])
    rows = []
    # A derived row is another run's averaged weights: it has no student. The plain run's own
    # averaged weights are that derived row, so they are not repeated on the plain run's row.
    shown_elsewhere = {src for src, _ in DERIVED.values()}
    for name, c in curves.items():
        derived = name in DERIVED
        averaged = name not in shown_elsewhere
        test = c["student/test"]
        rows.append(
            {
                "variant": name,
                "final_student": None if derived else test[-1],
                "forgetting": None if derived else c["student/forget"][-1],
                "final_averaged": c["averaged/test"][-1] if averaged else None,
                "forgetting_averaged": c["averaged/forget"][-1] if averaged else None,
                "best": min(test + c["averaged/test"]),
                "diverged": diverged(test),
                "seconds": times.get(name),
            }
        )
    _plot(curves, os.path.join(run_dir, "curves.png"), cfg)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(cfg, rows))
    return rows


def summary_markdown(cfg: Config, rows: list[dict]) -> str:
    """The main job's summary table (one seed: for intervals, run ``--study``)."""

    def fmt(v, spec=".4f"):
        return "—" if v is None else format(v, spec)

    lines = [
        f"# emalora-fast distill: {cfg.run_name}",
        "",
        f"Held-out loss (nats per token) after {cfg.steps} LoRA steps, seed {cfg.seed} (one "
        f"seed: differences below seed-to-seed noise mean nothing; `--study` measures it); "
        f"model {cfg.model or 'embedded tiny Llama'}, data {cfg.dataset or 'embedded KJV Psalms'}, "
        f"{cfg.divergence} at T={cfg.temperature}, hard-label weight {cfg.hard_label_weight}. "
        "New task: the test split of the adaptation text; forgetting: held-out text of the "
        "pre-training domain (lower is better for both).",
        "",
        "Averaged weights: the teacher's average for a teacher variant; the plain run's own "
        f"average is the row {', '.join(DERIVED)} (no student of its own).",
        "",
        "| variant | new task (student) | forgetting (student) | new task (averaged weights) "
        "| forgetting (averaged weights) | best seen | diverged | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {fmt(r['final_student'])} | {fmt(r['forgetting'])} | "
            f"{fmt(r['final_averaged'])} | {fmt(r.get('forgetting_averaged'))} | "
            f"{fmt(r['best'])} | {'**yes**' if r['diverged'] else 'no'} "
            f"| {fmt(r['seconds'], '.1f')} |"
        )
    bad = [r["variant"] for r in rows if r["diverged"]]
    if bad:
        lines += ["", f"Diverged (gave back over half of its improvement): {', '.join(bad)}."]
    return "\n".join(lines) + "\n"


def _plot(curves: dict[str, dict], path: str, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        if name in DERIVED:
            ax.plot(c["step"], c["averaged/test"], ls="--", marker=".", label=name)
            continue
        line = ax.plot(c["step"], c["student/test"], marker=".", label=f"{name} (student)")[0]
        if name != "lora":
            ax.plot(c["step"], c["averaged/test"], ls=":", color=line.get_color(),
                    label=f"{name} (averaged)")  # fmt: skip
    ax.set_xlabel("LoRA optimizer step")
    ax.set_ylabel("new-task held-out loss (nats/token)")
    ax.set_title(f"emalora-fast distill: {cfg.run_name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
