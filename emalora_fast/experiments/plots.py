"""Plots of a study: seed-band curves, paired-difference intervals, the learning-rate sweep.

A diverged run never sets an axis: curves of diverged runs go to their own panel, and interval
or sweep points beyond the axis range are drawn at its edge with their value written beside.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    vs = [v for v in values if math.isfinite(v)]
    if not vs:
        return 0.0, 1.0
    lo, hi = min(vs), max(vs)
    span = hi - lo or max(abs(hi), 1e-3) * 0.05
    return lo - pad * span, hi + pad * span


def plot_curves(path, spec, runs, results, chosen) -> None:
    """New-task (test) and forgetting loss against step: mean ± std over seeds per variant."""
    plt = _plt()
    groups = {}
    for v in spec.variants:
        rs = [results[r.key] for r in runs
              if r.variant == v and r.lr == chosen[v] and r.point is None and r.seed in spec.seeds
              and r.key in results]  # fmt: skip
        groups[v] = rs
    any_div = any(r["metrics"]["diverged"] for rs in groups.values() for r in rs)
    ncols = 3 if any_div else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, split, title in ((axes[0], "test", "new task (test split)"),
                             (axes[1], "forget", "forgetting (pre-training domain)")):  # fmt: skip
        seen = []
        for i, (v, rs) in enumerate(groups.items()):
            ok = [r for r in rs if not r["metrics"]["diverged"]]
            if not ok:
                continue
            steps = ok[0]["curve"]["step"]
            ys = np.array([r["curve"][f"student/{split}"] for r in ok], dtype=float)
            m, s = ys.mean(0), ys.std(0, ddof=1) if len(ok) > 1 else np.zeros(ys.shape[1])
            c = colors[i % len(colors)]
            ax.plot(steps, m, color=c, label=f"{v} (lr {chosen[v]:g}, n={len(ok)})")
            ax.fill_between(steps, m - s, m + s, color=c, alpha=0.2, lw=0)
            seen += list(m[len(m) // 4 :] - s[len(m) // 4 :]) + list(
                m[len(m) // 4 :] + s[len(m) // 4 :]
            )
        ax.set_ylim(*_limits(seen))  # the last three quarters of the curves set the axis
        ax.set_title(f"{title}; band = ±1 std over seeds", fontsize=9)
        ax.set_xlabel("LoRA optimizer step")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if any_div:
        ax = axes[2]
        for i, (v, rs) in enumerate(groups.items()):
            for r in rs:
                if r["metrics"]["diverged"]:
                    c = r["curve"]
                    ys = [y if math.isfinite(y) else np.nan for y in c["student/test"]]
                    ax.plot(c["step"], ys, color=colors[i % len(colors)], lw=1,
                            label=f"{v} seed {r['seed']}")  # fmt: skip
        ax.set_title("diverged runs (own scale), new task", fontsize=9)
        ax.set_xlabel("LoRA optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"{spec.name}: held-out loss, each variant at its chosen learning rate", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_intervals(path, spec, tables) -> None:
    """Paired differences to the baseline with 95% intervals: new task and forgetting."""
    plt = _plt()
    rows = [
        r
        for r in tables["main"] + tables["averaged"] + tables["grid"]
        if r["label"] != spec.baseline
    ]
    rows = [r for r in rows if r["seeds"]]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))[::-1]
    panels = (
        (axes[0], "d_test", "new task: Δ test loss"),
        (axes[1], "d_forget", "forgetting: Δ pre-training-domain loss"),
    )
    for ax, key, title in panels:
        ok = [r for r in rows if not r["diverged"]]
        vals = [v for r in ok for v in (r[key].low, r[key].high, r[key].mean)] + [0.0]
        lo, hi = _limits(vals, pad=0.15)
        for yi, r in zip(y, rows):
            d = r[key]
            m, low, high = d.mean, d.low, d.high
            color = "tab:red" if r["diverged"] else ("tab:blue" if d.excludes_zero else "0.35")
            if not math.isfinite(low):
                low = high = m
            cm, cl, ch = (min(max(x, lo), hi) for x in (m, low, high))
            ax.plot([cl, ch], [yi, yi], color=color, lw=2)
            ax.plot([cm], [yi], "o", color=color)
            if m > hi or m < lo or high > hi or low < lo:
                ax.annotate(f"{m:+.3f} (clipped)", (cm, yi), xytext=(4, 4),
                            textcoords="offset points", fontsize=7, color=color)  # fmt: skip
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_title(f"{title} vs {spec.baseline} (95% paired CI)", fontsize=9)
        ax.set_xlabel("nats/token (negative = better than the baseline)")
        ax.grid(alpha=0.3, axis="x")
    labels = [
        ("grid: " if r in tables["grid"] else "")
        + r["label"]
        + (" (diverged)" if r["diverged"] else "")
        for r in rows
    ]
    axes[0].set_yticks(y, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sweep(path, spec, tables) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ok = [s for s in tables["sweep"] if not s["diverged"]]
    lo, hi = _limits(
        [s["val"].mean + k * (s["val"].std if s["val"].n > 1 else 0) for s in ok for k in (-1, 1)]
    )
    for v in spec.variants:
        ss = [s for s in tables["sweep"] if s["variant"] == v]
        xs = [s["lr"] for s in ss]
        ms = [min(max(s["val"].mean, lo), hi) if math.isfinite(s["val"].mean) else hi for s in ss]
        es = [0.0 if not math.isfinite(s["val"].std) else s["val"].std for s in ss]
        line = ax.errorbar(xs, ms, yerr=es, marker="o", capsize=3, label=v)
        for s, m in zip(ss, ms):
            if s["chosen"]:
                ax.plot([s["lr"]], [m], "*", ms=14, color=line[0].get_color())
            if s["diverged"] or m in (lo, hi):
                ax.annotate(f"{s['val'].mean:.2f} ({s['diverged']} diverged)", (s["lr"], m),
                            xytext=(4, -10), textcoords="offset points", fontsize=7)  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss at the last step (nats/token)")
    ax.set_title(f"{spec.name}: learning-rate sweep (mean ± std over seeds {spec.sweep_seeds}; "
                 "★ chosen)", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_posthoc(path, spec, tables) -> None:
    """Paired differences of the post-hoc averages to the same runs' live weights, against the
    averages' width (one training run per seed gives every point), with 95% intervals."""
    plt = _plt()
    rows = tables["posthoc"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["sigma_rel"] for r in rows]
    for ax, split, what in ((axes[0], "test", "new task"), (axes[1], "forget", "forgetting")):
        d = [r[f"d_{split}"] for r in rows]
        ms = np.array([x.mean for x in d])
        lo = np.array([x.mean - x.low if x.n > 1 else 0.0 for x in d])
        hi = np.array([x.high - x.mean if x.n > 1 else 0.0 for x in d])
        ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=3, label="rebuilt average")
        ax.axhline(0.0, color="gray", ls="--", label="live weights")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("relative width sigma_rel of the average (log)")
        ax.set_ylabel(f"{what}: Δ held-out loss vs live weights (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{spec.name}: post-hoc EMA of {spec.baseline}, every width from one run per "
                 f"seed (paired, 95% intervals, seeds {rows[0]['seeds']})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(study_dir, spec, runs, results, chosen, tables) -> None:
    plot_curves(os.path.join(study_dir, "curves.png"), spec, runs, results, chosen)
    plot_intervals(os.path.join(study_dir, "intervals.png"), spec, tables)
    plot_lr_sweep(os.path.join(study_dir, "lr_sweep.png"), spec, tables)
    if tables["posthoc"]:
        plot_posthoc(os.path.join(study_dir, "posthoc.png"), spec, tables)
