"""Forgetting probes and the forgetting monitor: KL(pi_0 || pi) and NLL on a probe set.

A probe set is a batch of token sequences with the scored positions marked (:class:`ProbeSet`).
:func:`forgetting_metrics` runs the model twice on it, once as it is (pi) and once with its peft
adapter disabled (the base model pi_0), and returns, over the scored target tokens y_t::

    kl  = mean_t KL(pi_0(. | y_<t) || pi(. | y_<t))   (streamed: distillation_loss, forward_kl)
    nll = mean_t -log pi(y_t | y_<t)                   (and base_nll, the same under pi_0)

KL(pi_0 || pi) on the model's own data is what tracks forgetting (arXiv 2509.04259); on the base
model's own greedy continuations it measures how far fine-tuning moved the model off what it
used to say. :class:`ForgettingMonitor` is the Hugging Face ``TrainerCallback`` that logs these
every N optimizer steps. :func:`answer_scores` is the task metric: teacher-forced answer
log-probability and greedy exact match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..distill.loss import distillation_loss
from ..distributed import unwrap_model

__all__ = [
    "ForgettingMonitor",
    "ProbeSet",
    "answer_scores",
    "forgetting_metrics",
    "probe_from_pairs",
    "probe_from_windows",
    "sequence_scores",
]

IGNORE = -100


@dataclass
class ProbeSet:
    """Right-padded sequences with the scored tokens marked.

    Attributes:
        input_ids: [n, S] token ids (padding: any id, masked out).
        attention_mask: [n, S] 1 on real tokens, 0 on padding.
        labels: [n, S] the token to score at position t (predicted from positions < t), or -100
            where nothing is scored (prompt, padding); ``labels[:, 0]`` is never scored.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {self.input_ids.shape, self.attention_mask.shape, self.labels.shape}
        if self.input_ids.dim() != 2 or len(shapes) != 1:
            raise ValueError(
                "ProbeSet needs input_ids, attention_mask and labels of one [n, S] shape, got "
                f"{[tuple(s) for s in shapes]}"
            )
        if not bool((self.labels[:, 1:] != IGNORE).any()):
            raise ValueError("ProbeSet has no scored token: every label is -100")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, idx: slice | torch.Tensor) -> ProbeSet:
        return ProbeSet(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def probe_from_pairs(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int = 0
) -> ProbeSet:
    """Probe of ``prompt + target`` sequences scoring the target tokens only.

    Args:
        prompts: per sequence, the prompt's token ids (at least one).
        targets: per sequence, the scored continuation's token ids (at least one).
        pad_id: id written on padding (never scored nor attended).
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(
            f"probe_from_pairs needs equal, non-zero counts, got {len(prompts)} "
            f"prompts and {len(targets)} targets"
        )
    if any(len(p) == 0 for p in prompts) or any(len(t) == 0 for t in targets):
        raise ValueError("probe_from_pairs needs a non-empty prompt and target in every pair")
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    n = len(prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        seq = torch.tensor(list(p) + list(t), dtype=torch.long)
        ids[i, : seq.numel()] = seq
        mask[i, : seq.numel()] = 1
        labels[i, len(p) : seq.numel()] = seq[len(p) :]
    return ProbeSet(ids, mask, labels)


def probe_from_windows(windows: torch.Tensor) -> ProbeSet:
    """Probe of [n, S] text windows scoring every token after the first (held-out text)."""
    labels = windows.clone()
    labels[:, 0] = IGNORE
    return ProbeSet(windows, torch.ones_like(windows), labels)


def _check_peft(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            "forgetting_metrics needs a peft model: the base model pi_0 is the model with its "
            f"adapter disabled (model.disable_adapter()); got {type(model).__name__}"
        )
    return model


def _logits(model: nn.Module, batch: ProbeSet) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _batches(model: nn.Module, probe: ProbeSet, batch_size: int):
    device = next(model.parameters()).device
    for i in range(0, len(probe), batch_size):
        b = probe.subset(slice(i, i + batch_size))
        yield ProbeSet(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))


class _EvalMode:
    """Eval mode and no grad inside; the model's train/eval flags restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [m.training for m in self.model.modules()]
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode
        torch.set_grad_enabled(self.grad)


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, S-1] -log softmax(logits[:, t])[labels[:, t+1]], 0 where the label is ignored."""
    s, y = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view_as(y)


def sequence_scores(
    model: nn.Module, probe: ProbeSet, *, batch_size: int = 16, with_base: bool = True
) -> dict[str, torch.Tensor]:
    """Per-sequence sums over the scored tokens: ``kl``, ``nll``, ``base_nll`` and ``tokens``.

    Each value is an [n] float64 tensor on the CPU. ``kl`` is sum_t KL(pi_0 || pi) at the scored
    positions, with pi_0 the model with its adapter disabled (``with_base=False``: only ``nll``
    and ``tokens``, and the model need not be a peft model). The model's train/eval flags,
    requires_grad flags and active adapter are unchanged afterwards.
    """
    if with_base:
        model = _check_peft(model)
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "tokens": []}
    if with_base:
        parts.update(kl=[], base_nll=[])
    with _EvalMode(model):
        for b in _batches(model, probe, batch_size):
            logits = _logits(model, b)
            y = b.labels[:, 1:]
            parts["nll"].append(_token_nll(logits, b.labels).sum(1))
            parts["tokens"].append((y != IGNORE).sum(1))
            if with_base:
                with model.disable_adapter():
                    base = _logits(model, b)
                kl = distillation_loss(
                    logits[:, :-1],
                    base[:, :-1],
                    divergence="forward_kl",
                    labels=y,
                    reduction="none",
                )
                parts["kl"].append(kl.sum(1))
                parts["base_nll"].append(_token_nll(base, b.labels).sum(1))
    return {k: torch.cat(v).double().cpu() for k, v in parts.items()}


def forgetting_metrics(
    model: nn.Module, probe: ProbeSet, *, batch_size: int = 16
) -> dict[str, float]:
    """Token means of KL(pi_0 || pi), NLL under pi and under pi_0 on ``probe``.

    Args:
        model: a peft model (its adapter is the fine-tuning; disabled, it is pi_0).
        probe: the probe set.
        batch_size: sequences per forward.

    Returns:
        ``{"kl", "nll", "base_nll", "tokens"}``: sums over all scored tokens / their count.
    """
    s = sequence_scores(model, probe, batch_size=batch_size)
    n = s["tokens"].sum()
    out = {k: float(s[k].sum() / n) for k in ("kl", "nll", "base_nll")}
    out["tokens"] = int(n)
    return out


class ForgettingMonitor(TrainerCallback):
    """Logs KL(pi_0 || pi) and NLL on a probe set every ``every_n_steps`` optimizer steps.

    Works with ``transformers.Trainer`` and its subclasses (the project's AveragingTrainer and
    SelfDistillationTrainer, TRL's trainers) on a peft model. Each measurement is appended to
    ``state.log_history`` and to :attr:`history` as ``{"step", "<prefix>kl", "<prefix>nll",
    "<prefix>base_nll"}``; it is also measured once before the first step with ``at_start``.

    Args:
        probe: the probe set (e.g. the base model's own continuations of general prompts).
        every_n_steps: measure when ``global_step % every_n_steps == 0``.
        batch_size: sequences per forward.
        prefix: key prefix of the logged values.
        at_start: also measure at step 0 (KL is then 0 for a fresh LoRA adapter).
    """

    def __init__(
        self,
        probe: ProbeSet,
        every_n_steps: int = 50,
        *,
        batch_size: int = 16,
        prefix: str = "forgetting/",
        at_start: bool = True,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.prefix = prefix
        self.at_start = at_start
        self.history: list[dict[str, float]] = []

    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        m = forgetting_metrics(model, self.probe, batch_size=self.batch_size)
        entry = {"step": step, **{self.prefix + k: m[k] for k in ("kl", "nll", "base_nll")}}
        self.history.append(entry)
        return entry

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start and state.global_step == 0:
            state.log_history.append(self.measure(model, 0))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            state.log_history.append(self.measure(model, state.global_step))


Match = Literal["exact", "prefix"]


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()") if words else ""


def answer_scores(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    match: Match = "exact",
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per item: teacher-forced log-probability of `` answer`` after the prompt, and greedy match.

    Args:
        model: a causal LM (peft or not), scored as it is.
        tokenizer: its Hugging Face tokenizer.
        prompts: the items' prompts (the answer follows after a space).
        answers: the answers (one word each).
        match: ``"exact"``: the greedy completion's first word, stripped of punctuation, equals
            the answer; ``"prefix"``: it starts with the answer (case-insensitive).

    Returns:
        ``{"logprob": [n] float64 (sum over the answer's tokens), "correct": [n] float64 0/1}``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    a_ids = [tokenizer(" " + a)["input_ids"] for a in answers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = probe_from_pairs(p_ids, a_ids, pad_id=pad)
    logprob = -sequence_scores(model, probe, batch_size=batch_size, with_base=False)["nll"]
    correct = []
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    with _EvalMode(model):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            width = max(len(a) for a in a_ids[i : i + batch_size]) + 2
            gen = model.generate(**enc, max_new_tokens=width, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for text, ans in zip(texts, answers[i : i + batch_size]):
                word = _first_word(text)
                ok = word == ans if match == "exact" else word.lower().startswith(ans.lower())
                correct.append(float(ok))
    tokenizer.padding_side = side
    return {"logprob": logprob, "correct": torch.tensor(correct, dtype=torch.float64)}
