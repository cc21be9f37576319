"""The main job, ``emalora-fast distill``: does an EMA/BEMA self-teacher help a LoRA run?

It trains the same LoRA run (same seed, same data order) three ways and reads four curves off
them:

- ``lora``: plain LoRA on the next-token cross-entropy;
- ``lora+bema-weights``: the BEMA of that same run, evaluated without any distillation (cheap);
- ``lora+ema-teacher``: LoRA distilled from its own EMA adapter (plus the cross-entropy);
- ``lora+bema-teacher``: LoRA distilled from its own BEMA adapter (plus the cross-entropy).

Every evaluation step records the held-out loss of the student and of its averaged weights.
Outputs go to ``<output-dir>/<run-name>/``: ``curves.json``, ``curves.csv``, ``curves.png``,
``summary.md``, ``config.json`` and the final adapters (peft format) under ``adapters/``. The
run checkpoints after every evaluation and on Ctrl-C; ``--resume`` continues it.

By default everything is offline: a small Llama-architecture model is built from a config,
pre-trained briefly on an embedded public-domain corpus (Genesis and Exodus, KJV, byte-level
tokens), then LoRA-adapted to another (Psalms).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import data as corpora
from .averager import BEMA, EMA

VARIANTS = ("lora", "lora+ema-teacher", "lora+bema-teacher")
DERIVED = {"lora+bema-weights": ("lora", "averaged")}  # a curve read off another run
CHECKPOINT = "checkpoint.pt"


class ExperimentError(Exception):
    """A user error: reported as one line, without a traceback."""


class Interrupted(Exception):
    """The run was stopped by Ctrl-C after saving a resumable checkpoint."""


@dataclass
class Config:
    output_dir: str = "emalora-runs"
    run_name: str = "default"
    model: str | None = None  # None: the embedded tiny Llama; else a local path or hub id
    dataset: str | None = None  # None: the embedded corpus; else a .txt/.jsonl path or hub id
    quick: bool = False
    seed: int = 0
    steps: int = 300
    pretrain_steps: int = 1200
    eval_every: int = 25
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    lora_r: int = 8
    divergence: str = "forward_kl"
    temperature: float = 1.0
    hard_label_weight: float = 0.5
    distill_from_step: int | None = None  # None: bema_update_after + 1
    ema_decay: float = 0.99
    bema_update_after: int | None = None  # None: a quarter of the steps (the paper's burn-in)
    device: str = "cpu"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))

    @classmethod
    def quick_defaults(cls, **overrides) -> Config:
        base = dict(
            run_name="quick", steps=120, pretrain_steps=300, eval_every=15, batch_size=8, seq_len=96
        )
        base.update(overrides)
        return cls(quick=True, **base)

    def validate(self) -> None:
        if self.bema_update_after is None and isinstance(self.steps, int):
            self.bema_update_after = self.steps // 4
        if self.distill_from_step is None:  # the first step whose teacher holds an average
            self.distill_from_step = self.bema_update_after + 1
        ints = dict(
            steps=1,
            pretrain_steps=0,
            eval_every=1,
            batch_size=1,
            seq_len=8,
            lora_r=1,
            bema_update_after=0,
            distill_from_step=0,
        )
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ExperimentError(f"--{name.replace('_', '-')} must be an integer >= {lo}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ExperimentError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.hard_label_weight <= 1.0:
            raise ExperimentError("--hard-label-weight must be in [0, 1]")
        if not 0.0 < self.ema_decay < 1.0:
            raise ExperimentError("--ema-decay must be in (0, 1)")
        if not self.temperature > 0:
            raise ExperimentError("--temperature must be > 0")
        if self.divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ExperimentError("--divergence must be forward_kl, reverse_kl or jsd")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ExperimentError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if self.dataset and not _is_hub_id(self.dataset) and not os.path.isfile(self.dataset):
            raise ExperimentError(f"dataset file not found: {self.dataset}")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.run_name)


def _is_hub_id(s: str) -> bool:
    return not os.path.exists(s) and s.count("/") == 1 and not s.startswith((".", "/"))


# ------------------------------------------------------------------------------------------
# Data


def _load_texts(cfg: Config) -> tuple[str | None, str]:
    """(pre-training text of the default model, adaptation text)."""
    pretrain = corpora.load_text("genesis_exodus") if cfg.model is None else None
    if cfg.dataset is None:
        return pretrain, corpora.load_text("psalms")
    path = cfg.dataset
    if _is_hub_id(path):
        try:
            import datasets  # optional, online only
        except ImportError as exc:
            raise ExperimentError(
                f"dataset {path!r} looks like a hub id; install `datasets`"
            ) from exc
        ds = datasets.load_dataset(path, split="train")
        return pretrain, "\n".join(ds["text"])
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            texts = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise ExperimentError(
                            f"{path}:{i}: expected a JSON object with a 'text' field"
                        ) from exc
            return pretrain, "\n".join(texts)
        return pretrain, f.read()


class Batches:
    """Random windows of a token stream, in an order fixed by the seed (resumable)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if tokens.numel() < seq_len + 2:
            raise ExperimentError(
                f"the training text has {tokens.numel()} tokens, fewer than one window of "
                f"{seq_len}; use a larger dataset or a smaller --seq-len"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(
            0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=self.gen
        )
        idx = starts[:, None] + torch.arange(self.seq_len)[None, :]
        return self.tokens[idx]


def _eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int = 16) -> torch.Tensor:
    n = min(max_windows, tokens.numel() // seq_len)
    if n < 1:
        raise ExperimentError("the held-out split is shorter than one window; use more data")
    return tokens[: n * seq_len].view(n, seq_len)


# ------------------------------------------------------------------------------------------
# Model


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=corpora.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def _pretrain(model, tokens: torch.Tensor, cfg: Config, progress) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = Batches(tokens, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    bar = progress(range(cfg.pretrain_steps), desc="pre-training the base model")
    model.train()
    for _ in bar:
        ids = batches.next()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def _load_base(cfg: Config, pretrain_text: str | None, progress):
    """The base model and a tokenizer function; pre-trains (once, cached) the default model."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.model is None:
        path = os.path.join(cfg.run_dir, "base_model.pt")
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(_tiny_llama_config())
        if os.path.isfile(path):
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            _pretrain(model, corpora.encode_bytes(pretrain_text), cfg, progress)
            _atomic_save(model.state_dict(), path)
        return model, corpora.encode_bytes
    try:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cfg.model)
    except OSError as exc:
        raise ExperimentError(f"cannot load model {cfg.model!r}: {exc}".splitlines()[0]) from exc

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)

    return model, encode


def _lora_model(base, cfg: Config):
    from peft import LoraConfig, get_peft_model

    try:
        model = get_peft_model(
            base, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear")
        )
    except ValueError as exc:
        raise ExperimentError(f"the model has no LoRA-able modules: {exc}".splitlines()[0]) from exc
    return model


# ------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def _held_out_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=windows, labels=windows).loss.item()
    model.train()
    return loss


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _StopFlag:
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


def _train_variant(name, cfg, make_model, train_tokens, windows, state, progress, stop):
    """Train one variant from scratch or from ``state['current']``; returns its curve."""
    torch.manual_seed(cfg.seed)
    model = make_model()
    distil = name != "lora"
    if name == "lora+ema-teacher":
        avg = EMA(model, cfg.ema_decay, warmup=True, teacher_adapter="teacher")
    else:
        avg = BEMA(
            model,
            update_after=cfg.bema_update_after,
            teacher_adapter="teacher" if distil else None,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    distiller = None
    if distil:
        from .loss import DistillationLoss
        from .self_distill import SelfDistiller

        loss_fn = DistillationLoss(divergence=cfg.divergence, temperature=cfg.temperature)
        distiller = SelfDistiller(
            model,
            avg,
            loss=loss_fn,
            hard_label_weight=cfg.hard_label_weight,
            distill_from_step=cfg.distill_from_step,
        )
    batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    curve = {"step": [], "student": [], "averaged": []}
    start = 0
    cur = state.get("current")
    if cur and cur["variant"] == name:
        model.load_state_dict(cur["lora"], strict=False)
        opt.load_state_dict(cur["optimizer"])
        avg.load_state_dict(cur["averager"])
        batches.gen.set_state(cur["data_rng"])
        torch.set_rng_state(cur["torch_rng"])
        curve, start = cur["curve"], cur["step"]
        if distiller is not None:
            distiller.step = start

    def checkpoint(step):
        state["current"] = {
            "variant": name,
            "step": step,
            "lora": _lora_state(model),
            "optimizer": opt.state_dict(),
            "averager": avg.state_dict(),
            "data_rng": batches.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "curve": curve,
        }
        _atomic_save(state, os.path.join(cfg.run_dir, CHECKPOINT))

    if start == 0:
        curve["step"].append(0)
        curve["student"].append(_held_out_loss(model, windows))
        curve["averaged"].append(curve["student"][-1])
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress(range(start + 1, cfg.steps + 1), desc=f"{name:>18s}", initial=start,
                   total=cfg.steps)  # fmt: skip
    t_last = time.perf_counter()
    model.train()
    for step in bar:
        ids = batches.next()
        if distiller is not None:
            loss, _ = distiller.compute_loss({"input_ids": ids}, step=step)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg.update(step=step)
        now = time.perf_counter()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_step / (now - t_last):.0f}")
        t_last = now
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve["step"].append(step)
            curve["student"].append(_held_out_loss(model, windows))
            with avg.swapped():
                curve["averaged"].append(_held_out_loss(model, windows))
            checkpoint(step)
        if stop.requested:
            checkpoint(step)
            raise Interrupted(f"{name} at step {step}")
    out = os.path.join(cfg.run_dir, "adapters", name)
    model.save_pretrained(os.path.join(out, "student"), selected_adapters=["default"])
    avg.save_pretrained(os.path.join(out, "averaged"))
    return curve


def run_experiment(cfg: Config, *, resume: bool = False, progress=None) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the curves and the summary rows."""
    cfg.validate()
    if progress is None:
        from tqdm.auto import tqdm as progress
    ck_path = os.path.join(cfg.run_dir, CHECKPOINT)
    state: dict[str, Any] = {"config": dataclasses.asdict(cfg), "curves": {}, "times": {}}
    if resume:
        if not os.path.isfile(ck_path):
            raise ExperimentError(f"nothing to resume: {ck_path} does not exist")
        state = torch.load(ck_path, weights_only=True)
        keep = {"output_dir": cfg.output_dir, "run_name": cfg.run_name}
        cfg = Config(**{**state["config"], **keep})
    _check_writable(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    torch.manual_seed(cfg.seed)
    pretrain_text, text = _load_texts(cfg)
    base, encode = _load_base(cfg, pretrain_text, progress)
    tokens = encode(text)
    split = int(0.9 * tokens.numel())
    train_tokens, windows = tokens[:split], _eval_windows(tokens[split:], cfg.seq_len)

    def make_model():
        return _lora_model(_fresh(base), cfg)

    with _StopFlag() as stop:
        for name in cfg.variants:
            if name in state["curves"]:
                continue
            t0 = time.perf_counter()
            curve = _train_variant(
                name, cfg, make_model, train_tokens, windows, state, progress, stop
            )
            state["curves"][name] = curve
            state["times"][name] = state["times"].get(name, 0.0) + time.perf_counter() - t0
            state.pop("current", None)
            _atomic_save(state, ck_path)
    curves = _with_derived(state["curves"])
    rows = write_outputs(cfg, curves, state["times"])
    return {"curves": curves, "summary": rows, "run_dir": cfg.run_dir}


def _fresh(base):
    """A copy of the base model (peft wraps modules in place)."""
    import copy

    return copy.deepcopy(base)


def _check_writable(path: str) -> None:
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
    for name, (src, key) in DERIVED.items():
        if src in curves:
            c = curves[src]
            out[name] = {"step": c["step"], "student": c[key], "averaged": c[key]}
    return out


# ------------------------------------------------------------------------------------------
# Outputs


def write_outputs(cfg: Config, curves: dict[str, dict], times: dict[str, float]) -> list[dict]:
    run_dir = cfg.run_dir
    with open(os.path.join(run_dir, "curves.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "curves": curves, "seconds": times}, f)
    with open(os.path.join(run_dir, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step", "student_loss", "averaged_loss"])
        for name, c in curves.items():
            for row in zip(c["step"], c["student"], c["averaged"], strict=True):
                w.writerow([name, *row])
    rows = []
    for name, c in curves.items():
        derived = name in DERIVED
        rows.append(
            {
                "variant": name,
                "final_student": None if derived else c["student"][-1],
                "final_averaged": c["averaged"][-1],
                "best": min(c["student"] + c["averaged"]),
                "seconds": times.get(name),
            }
        )
    _plot(curves, os.path.join(run_dir, "curves.png"), cfg)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(cfg, rows))
    return rows


def summary_markdown(cfg: Config, rows: list[dict]) -> str:
    def fmt(v, spec=".4f"):
        return "—" if v is None else format(v, spec)

    lines = [
        f"# emalora-fast distill: {cfg.run_name}",
        "",
        f"Held-out loss (nats per token) after {cfg.steps} LoRA steps; model "
        f"{cfg.model or 'embedded tiny Llama'}, data {cfg.dataset or 'embedded KJV Psalms'}, "
        f"{cfg.divergence} at T={cfg.temperature}, hard-label weight {cfg.hard_label_weight}.",
        "",
        "| variant | final (student) | final (averaged weights) | best seen | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {fmt(r['final_student'])} | {fmt(r['final_averaged'])} | "
            f"{fmt(r['best'])} | {fmt(r['seconds'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(curves: dict[str, dict], path: str, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        if name in DERIVED:
            ax.plot(c["step"], c["averaged"], ls="--", marker=".", label=name)
            continue
        line = ax.plot(c["step"], c["student"], marker=".", label=f"{name} (student)")[0]
        if name != "lora":
            ax.plot(c["step"], c["averaged"], ls=":", color=line.get_color(),
                    label=f"{name} (averaged)")  # fmt: skip
    ax.set_xlabel("LoRA optimizer step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"emalora-fast distill: {cfg.run_name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
