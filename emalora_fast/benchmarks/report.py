"""``emalora-fast bench``: run the benchmark cases side by side, print and save a table.

Every row is timed in the same process on the same device as the copy that sets its floor, so
the ratios (bandwidth / copy bandwidth, speed-up over the best alternative) are comparable;
absolute times are only meaningful with the device named, which the outputs record.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass

import torch

from . import averager as averager_cases
from .timing import copy_case, measure

# Goals of the project, per row kind (see ARCHITECTURE.md, performance section).
GOAL_COPY_FRACTION = {"cuda": 0.90, "cpu": 0.70}
GOAL_SPEEDUP_BEMA = {"cuda": 2.0, "cpu": 1.8}


@dataclass
class Row:
    bench: str
    case: str
    provider: str
    time_ms: float
    gbps: float  # floor bytes / time
    copy_fraction: float  # gbps / copy bandwidth of the same run
    speedup_vs_best_alternative: float | None
    goal_ratio: float | None  # achieved / goal (>= 1 meets the goal)


def _metadata(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": name or platform.machine(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_averager(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    if device.type == "cuda":
        sets = [("tiny", None), ("llama3-8b", None)] + ([] if quick else [("llama3-70b", None)])
    else:
        sets = [("tiny", None), ("llama3-8b", 8)]
    reps = 5 if quick else 20
    for model, layers in sets:
        case = model + (f"[{layers} layers]" if layers else "")
        for kind in ("ema", "bema"):
            providers, numel = averager_cases.cases(kind, model, device, layers=layers)
            copy_t = measure(copy_case(numel, device), device, reps=reps)
            copy_gbps = 8 * numel / copy_t / 1e9
            floor = averager_cases.FLOOR_BYTES[kind] * numel
            times = {p: measure(fn, device, reps=reps) for p, fn in providers.items()}
            best_alt = min(t for p, t in times.items() if p != "emalora")
            for p, t in times.items():
                gbps = floor / t / 1e9
                speedup = best_alt / t if p == "emalora" else None
                goal = None
                if p == "emalora":
                    goal = gbps / copy_gbps / GOAL_COPY_FRACTION[device.type]
                    if kind == "bema":
                        goal = min(goal, speedup / GOAL_SPEEDUP_BEMA[device.type])
                rows.append(
                    Row(f"averager-{kind}", case, p, t * 1e3, gbps, gbps / copy_gbps, speedup, goal)
                )
            rows.append(
                Row(f"averager-{kind}", case, "copy", copy_t * 1e3, copy_gbps, 1.0, None, None)
            )
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def print_table(rows: list[Row]) -> str:
    cols = list(asdict(rows[0]).keys())
    body = [[_fmt(v) for v in asdict(r).values()] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    text = "\n".join(lines)
    print(text)
    return text


def _plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.bench}\n{r.case}\n{r.provider}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    colors = ["tab:green" if r.provider == "emalora" else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r.copy_fraction for r in rows], color=colors)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("bandwidth / copy bandwidth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(
    quick: bool = False, output_dir: str = "emalora-runs/bench", device: str | None = None
) -> list[Row]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = _metadata(dev)
    print(f"emalora-fast bench on {meta['device']} ({dev.type}), torch {meta['torch']}, "
          f"triton {meta['triton']}, {meta['threads']} threads")  # fmt: skip
    rows = bench_averager(dev, quick)
    print_table(rows)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    with open(os.path.join(output_dir, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    _plot(rows, os.path.join(output_dir, "averager.png"), f"averager on {meta['device']}")
    print(f"written to {output_dir}/bench.csv, bench.json, averager.png")
    return rows
