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
from .timing import copy_case, measure, measure_rounds

# Goals of the project, per row kind (see ARCHITECTURE.md, performance section).
GOAL_COPY_FRACTION = {"cuda": 0.90, "cpu": 0.70}
GOAL_SPEEDUP_BEMA = {"cuda": 2.0, "cpu": 1.8}
GOAL_LOSS_COPY_FRACTION = 0.80  # GPU: of copy bandwidth over the bytes the passes move
GOAL_LOSS_SPEEDUP_CPU = 3.0  # CPU: times faster than naive


@dataclass
class Row:
    bench: str
    case: str
    provider: str
    time_ms: float
    gbps: float | None = None  # floor bytes / time
    copy_fraction: float | None = None  # gbps / copy bandwidth of the same run
    speedup: float | None = None  # baseline time / this time (ours only)
    speedup_lo: float | None = None  # the spread of the speed-up: lowest of one round
    speedup_hi: float | None = None  # highest of one round
    baseline: str | None = None  # what the speed-up is against
    extra_mem_mib: float | None = None  # extra peak memory of one forward + backward
    mem_vs_naive: float | None = None  # extra memory / naive's
    goal_ratio: float | None = None  # achieved / goal, worst of the goals (>= 1 meets them)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _metadata(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
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


def _bandwidth_rows(
    bench: str,
    case: str,
    providers: dict,
    numel: int,
    floor_bytes: int,
    baseline: str,
    device: torch.device,
    rounds: int,
    reps: int,
) -> list[Row]:
    """One row per provider and one for the copy of the same bytes, timed side by side in
    interleaved rounds (:func:`~.timing.measure_rounds`): the least disturbed round's time,
    the floor bytes per element over it as a fraction of the copy's bandwidth, and our
    speed-up over the best alternative with its lowest and highest value in one round."""
    fns = {**providers, "copy": copy_case(numel, device)}
    timed = measure_rounds(fns, device, rounds=rounds, reps=reps)
    copy_t = timed.best("copy")
    copy_gbps = 8 * numel / copy_t / 1e9
    alternatives = [p for p in providers if p != "emalora"]
    rows = []
    for p in providers:
        t = timed.best(p)
        gbps = floor_bytes * numel / t / 1e9
        row = Row(bench, case, p, t * 1e3, gbps, gbps / copy_gbps)
        if p == "emalora":
            row.speedup, row.speedup_lo, row.speedup_hi = timed.ratio(alternatives, p)
            row.baseline = baseline
        rows.append(row)
    rows.append(Row(bench, case, "copy", copy_t * 1e3, copy_gbps, 1.0))
    return rows


def bench_averager(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    if device.type == "cuda":
        sets = [("tiny", None), ("llama3-8b", None)] + ([] if quick else [("llama3-70b", None)])
    else:
        sets = [("tiny", None), ("llama3-8b", 8)]
    rounds, reps = (5, 3) if quick else (15, 5)
    for model, layers in sets:
        case = model + (f"[{layers} layers]" if layers else "")
        for kind in ("ema", "bema"):
            providers, numel = averager_cases.cases(kind, model, device, layers=layers)
            floor = averager_cases.FLOOR_BYTES[kind]
            new = _bandwidth_rows(
                f"averager-{kind}", case, providers, numel, floor, "best torch form", device,
                rounds, reps,
            )  # fmt: skip
            ours = new[list(providers).index("emalora")]
            ours.goal_ratio = ours.copy_fraction / GOAL_COPY_FRACTION[device.type]
            if kind == "bema":
                ours.goal_ratio = min(
                    ours.goal_ratio, ours.speedup / GOAL_SPEEDUP_BEMA[device.type]
                )
            rows += new
    return rows


def bench_profiles(device: torch.device, quick: bool) -> list[Row]:
    """K EMA profiles in one launch vs K separate updates; bytes per element 4 + 8K."""
    rows = []
    model, layers = ("llama3-8b", None) if device.type == "cuda" else ("llama3-8b", 8)
    case = model + (f"[{layers} layers]" if layers else "")
    for k in (1, 3, 8):
        providers, numel = averager_cases.profile_cases(k, model, device, layers=layers)
        floor = averager_cases.profile_floor_bytes(k)
        rows += _bandwidth_rows(
            f"profiles-k{k}", case, providers, numel, floor, "best of K separate updates",
            device, *((5, 3) if quick else (15, 5)),
        )  # fmt: skip
    return rows


def bench_lightning(device: torch.device, quick: bool) -> list[Row]:
    """One update of the Lightning callback vs Lightning's EMAWeightAveraging and WeightAveraging
    (torch's and our multi_avg_fn) on the same peft model; extra memory = what each holds."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning")):
        print("lightning rows skipped: install the 'lightning' extra")
        return []
    from . import lightning as lightning_cases

    size = "tiny" if quick else "small"
    steps, held, sizes = lightning_cases.cases(size, device)
    mib = {k: v / 2**20 for k, v in sizes.items()}
    case = f"{size}: adapter {mib['adapter_bytes']:.1f} MiB, model {mib['model_bytes']:.1f} MiB"
    times = {p: measure(fn, device, reps=5 if quick else 20) for p, fn in steps.items()}
    rows = []
    for p, t in times.items():
        row = Row("lightning-update", case, p, t * 1e3, extra_mem_mib=held[p] / 2**20)
        if p == "emalora":
            base = "ema_weight_averaging"
            row.speedup, row.baseline = times[base] / t, base
            row.mem_vs_naive = held[p] / held[base]
        rows.append(row)
    return rows


def bench_loss(device: torch.device, quick: bool) -> list[Row]:
    """Forward KL forward + backward: ours vs naive vs token-chunked, time and extra memory."""
    from . import distill_loss as loss_cases

    dev = device.type
    if dev == "cuda":
        n, v, dtype = (8192, 32000 if quick else 128256, torch.bfloat16)
    else:
        n, v, dtype = (1024 if quick else 4096, 32000, torch.float32)
    s, t = loss_cases.make_inputs(n, v, dtype, dev)
    reps = 3 if quick else 7
    elem = s.element_size()
    copy_t = measure(copy_case(n * v * elem // 4, device), device, reps=reps)
    copy_gbps = 8 * (n * v * elem // 4) / copy_t / 1e9
    floor = 5 * elem * n * v  # fwd and bwd read s and t; bwd writes the gradient
    providers = ["emalora", "naive", "chunked"]
    if loss_cases.liger_available(dev):
        providers.append("liger")
    times, mems = {}, {}
    for p in providers:
        try:
            times[p] = measure(lambda p=p: loss_cases.step(p, s, t), device, reps=reps)
            mems[p] = loss_cases.peak_memory(p, dev, (n, v, dtype))["extra_peak_bytes"]
        except Exception as exc:  # an optional baseline must not stop the run
            if p in ("emalora", "naive"):
                raise
            print(f"distill-loss: provider {p} skipped ({type(exc).__name__}: {exc})")
    providers = [p for p in providers if p in times]
    case = f"N={n} V={v} {str(dtype).removeprefix('torch.')}"
    rows = []
    for p in providers:
        gbps = floor / times[p] / 1e9
        row = Row("distill-loss", case, p, times[p] * 1e3, gbps, gbps / copy_gbps)
        row.extra_mem_mib = mems[p] / 2**20
        row.mem_vs_naive = mems[p] / max(mems["naive"], 1)
        if p == "emalora":
            row.speedup, row.baseline = times["naive"] / times[p], "naive"
            mem_goal = 0.05 / max(row.mem_vs_naive, 1e-9)
            speed_goal = (
                row.copy_fraction / GOAL_LOSS_COPY_FRACTION
                if dev == "cuda"
                else row.speedup / GOAL_LOSS_SPEEDUP_CPU
            )
            row.goal_ratio = min(mem_goal, speed_goal)
        rows.append(row)
    rows.append(Row("distill-loss", case, "copy", copy_t * 1e3, copy_gbps, 1.0))
    return rows


def bench_fused_linear(device: torch.device, quick: bool) -> list[Row]:
    """Fused-linear loss vs materialize-then-loss vs naive, and the bare matmuls (the floor)."""
    from . import fused_linear as fl

    if device.type == "cuda":
        shape, dtype = (fl.SHAPES["llama3-8b"], torch.bfloat16)
        if quick:
            shape = (4096, 4096, 128256)
    else:
        shape, dtype = ((512, 512, 32000) if quick else fl.SHAPES["cpu"], torch.float32)
    providers = fl.cases(device, shape, dtype)
    reps = 3 if quick else 5
    names = ("emalora", "materialize", "naive", "matmul")
    times = {p: measure(providers[p], device, reps=reps) for p in names}
    case = "N={} H={} V={} {}".format(*shape, str(dtype).removeprefix("torch."))
    rows = []
    for p in names:
        row = Row("fused-linear", case, p, times[p] * 1e3)
        if p == "emalora":
            row.speedup, row.baseline = times["materialize"] / times[p], "materialize"
            row.goal_ratio = times["matmul"] / times[p]  # the matmuls of the same FLOPs
        rows.append(row)
    return rows


def bench_scaling(device: torch.device, output_dir: str) -> list[dict]:
    """Time vs size on log axes: the averager vs the number of tensors (BEMA, ours vs foreach)
    and the loss vs N·V (ours vs naive). Returns the points and writes scaling.png."""
    from . import distill_loss as loss_cases

    points = []
    layer_counts = [1, 2, 4, 8] + ([16, 32] if device.type == "cuda" else [])
    for layers in layer_counts:
        providers, numel = averager_cases.cases("bema", "llama3-8b", device, layers=layers)
        for p in ("emalora", "foreach"):
            t = measure(providers[p], device, reps=7)
            points.append(dict(bench="averager-bema", provider=p, size=14 * layers, seconds=t))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for n, v in [(256, 8000), (1024, 16000), (2048, 32000)]:
        s, t_ = loss_cases.make_inputs(n, v, dtype, device.type)
        for p in ("emalora", "naive"):
            t = measure(lambda p=p, s=s, t_=t_: loss_cases.step(p, s, t_), device, reps=3)
            points.append(dict(bench="distill-loss", provider=p, size=n * v, seconds=t))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, bench, xlabel in zip(
        axes, ("averager-bema", "distill-loss"), ("LoRA tensors", "N·V (logits per input)")
    ):
        for p in sorted({q["provider"] for q in points if q["bench"] == bench}):
            pts = [q for q in points if q["bench"] == bench and q["provider"] == p]
            ax.plot([q["size"] for q in pts], [q["seconds"] * 1e3 for q in pts], marker="o",
                    label=p)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time (ms)")
        ax.set_title(bench, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "scaling.png"), dpi=120)
    plt.close(fig)
    return points


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _cells(row: Row) -> dict[str, str]:
    """A row as printed: the speed-up followed by its spread over the rounds, (low-high)."""
    values = asdict(row)
    lo, hi = values.pop("speedup_lo"), values.pop("speedup_hi")
    cells = {k: _fmt(v) for k, v in values.items()}
    if lo is not None:
        cells["speedup"] += f" ({_fmt(lo)}-{_fmt(hi)})"
    return cells


def print_table(rows: list[Row]) -> str:
    cols = list(_cells(rows[0]))
    body = [list(_cells(r).values()) for r in rows]
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
    ax.bar(range(len(rows)), [r.time_ms for r in rows], color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("time per call (ms, log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_device(device: str | None) -> torch.device:
    """The device to benchmark on (default: cuda if present, else cpu); a ValueError with one
    line saying why when it cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: give cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the benchmarks run on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU"
            raise ValueError(f"no CUDA device is available ({why}); run with --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"no CUDA device {dev.index}: {torch.cuda.device_count()} present")
    return dev


def run_bench(
    quick: bool = False, output_dir: str = "emalora-runs/bench", device: str | None = None
) -> list[Row]:
    dev = bench_device(device)
    meta = _metadata(dev)
    print(f"emalora-fast bench on {meta['device']} ({dev.type}), torch {meta['torch']}, "
          f"triton {meta['triton']}, {meta['threads']} threads")  # fmt: skip
    rows = bench_averager(dev, quick) + bench_profiles(dev, quick)
    rows += bench_loss(dev, quick) + bench_fused_linear(dev, quick) + bench_lightning(dev, quick)
    print_table(rows)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    with open(os.path.join(output_dir, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)

    def family(r: Row) -> str:  # averager-ema/-bema share one plot, profiles-k1/-k3/-k8 one
        return r.bench.split("-")[0] if r.bench.startswith(("averager", "profiles")) else r.bench

    for bench in sorted({family(r) for r in rows}):
        picked = [r for r in rows if family(r) == bench]
        _plot(picked, os.path.join(output_dir, f"{bench}.png"), f"{bench} on {meta['device']}")
    if not quick:
        scaling = bench_scaling(dev, output_dir)
        with open(os.path.join(output_dir, "scaling.json"), "w") as f:
            json.dump({"meta": meta, "points": scaling}, f, indent=1)
    print(f"written to {output_dir}: bench.csv, bench.json and one PNG per benchmark")
    return rows
