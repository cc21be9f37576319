"""Pilot: does plain LoRA on the fictional-facts task forget on the probes? (SmolLM2-135M)

One run = one learning rate and seed: LoRA (all-linear, r=8) trained on the facts in their training
phrasing (loss on the answer only), then the task and the probes measured against the base model:

- task: exact match (greedy) and answer log-probability, training phrasing and held-out paraphrases;
- (a) KL(pi_0 || pi) and NLL on the base model's greedy continuations of general prompts;
- (b) accuracy and answer log-probability on the cloze items the base model answers correctly;
- (c) NLL and KL on 64 held-out text windows (64 tokens, us_founding).

Each change from the base is given with a 95% t interval over the probe's items (paired).

    python scripts/forgetting_pilot.py --lr 1e-3 --seed 0 --out DIR [--epochs 5 --train-minutes 25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from emalora_fast.experiments import forgetting_task as ft
from emalora_fast.experiments.data import load_text
from emalora_fast.experiments.forgetting_build import load_smollm2
from emalora_fast.experiments.runs import eval_windows
from emalora_fast.experiments.stats import describe, paired
from emalora_fast.integrations.forgetting import (
    answer_scores,
    probe_from_pairs,
    probe_from_windows,
    sequence_scores,
)


def interval(values: torch.Tensor, baseline: torch.Tensor | None = None) -> dict:
    v = values.tolist()
    return (paired(v, baseline.tolist()) if baseline is not None else describe(v)).as_dict()


def wait_for(name: str, minutes: float = 30.0) -> list[dict]:
    """The rows of a shipped data file, waiting while its build is still running."""
    deadline = time.time() + 60 * minutes
    while True:
        try:
            return ft.load_jsonl(name)
        except (FileNotFoundError, EOFError, OSError):
            if time.time() > deadline:
                raise
            time.sleep(20)


def task_scores(model, tok, facts) -> dict:
    out = {}
    for split, (prompts, answers) in {
        "train_phrasing": ft.fact_examples(facts),
        "paraphrase": ft.paraphrase_examples(facts),
    }.items():
        s = answer_scores(model, tok, prompts, answers, match="exact")
        out[split] = {k: v.tolist() for k, v in s.items()}
    return out


def summarize_task(scores: dict) -> dict:
    return {
        split: {k: interval(torch.tensor(v)) for k, v in s.items()} for split, s in scores.items()
    }


def train(model, tok, facts, args, result: dict, say):
    """Plain LoRA on the facts (training phrasing, loss on the answer); fills ``result``."""
    import peft

    torch.manual_seed(args.seed)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"),
    )
    opt = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0
    )
    model.train()
    losses, step, t = [], 0, time.perf_counter()
    stopped = False
    for epoch in range(args.epochs):
        for batch in ft.training_batches(
            tok, facts, args.batch_size, seed=1000 * args.seed + epoch
        ):
            warm = min(1.0, (step + 1) / 5)
            for g in opt.param_groups:
                g["lr"] = args.lr * warm
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % 5 == 0:
                say(f"step {step} epoch {epoch} loss {sum(losses[-5:]) / 5:.4f}")
            if time.perf_counter() - t > 60 * args.train_minutes:
                stopped = True
                break
        if stopped:
            break
    result.update(
        steps=step,
        epochs_done=step * args.batch_size / len(facts),
        train_loss=losses,
        seconds_train=time.perf_counter() - t,
        stopped_by_time=stopped,
    )
    say(f"trained {step} steps in {result['seconds_train']:.0f} s")
    return model


def probe_kl(model, name: str, probe, result: dict, save, say) -> None:
    """KL(pi_0 || pi) and NLL per sequence (token means) on one probe, into ``result``."""
    s = sequence_scores(model, probe, batch_size=16)
    per_tok = {k: s[k] / s["tokens"] for k in ("kl", "nll", "base_nll")}
    result["probes"][name] = {
        "n": len(probe),
        "tokens": int(s["tokens"].sum()),
        "kl": interval(per_tok["kl"]),
        "nll_after": interval(per_tok["nll"]),
        "nll_base": interval(per_tok["base_nll"]),
        "nll_change": interval(per_tok["nll"], per_tok["base_nll"]),
        "raw": {k: v.tolist() for k, v in s.items()},
    }
    save(result)
    say(f"{name} kl {result['probes'][name]['kl']} dnll {result['probes'][name]['nll_change']}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-facts", type=int, default=ft.N_FACTS, help="train on the first N facts")
    p.add_argument("--probe-n", type=int, default=200, help="continuations scored (the first N)")
    p.add_argument("--text-seq", type=int, default=64, help="tokens per held-out text window")
    p.add_argument("--train-minutes", type=float, default=25.0)
    p.add_argument("--base-eval", action="store_true", help="also score the task on the base")
    p.add_argument("--base-only", action="store_true", help="score the base on the task, stop")
    p.add_argument("--eval-adapter", help="skip training: score this saved adapter of the run")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tag = "base" if args.base_only else f"lr{args.lr:g}-seed{args.seed}"
    log = open(os.path.join(args.out, f"{tag}.log"), "a")

    def save(result: dict) -> None:
        with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
            json.dump(result, f, indent=1)

    def say(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    import peft
    import transformers

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    say(f"loaded in {time.perf_counter() - t0:.0f} s")
    facts = ft.load_jsonl(ft.FACTS_FILE)[: args.n_facts]
    result = {
        "lr": args.lr, "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "targets": "all-linear"},
        "n_facts": len(facts),
        "versions": {"torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    if args.base_eval or args.base_only:
        t = time.perf_counter()
        base_task = task_scores(model, tok, facts)
        result["base_task"] = summarize_task(base_task)
        result["base_task_raw"] = base_task
        result["seconds_base_task"] = time.perf_counter() - t
        say(f"base task {json.dumps(result['base_task'])}")
    if args.base_only:
        save(result)
        return

    if args.eval_adapter:
        model = peft.PeftModel.from_pretrained(model, args.eval_adapter)
        with open(os.path.join(args.out, f"{tag}.json")) as f:
            result = {**json.load(f), **{k: v for k, v in result.items() if k != "versions"}}
    else:
        model = train(model, tok, facts, args, result, say)
        model.save_pretrained(os.path.join(args.out, f"{tag}-adapter"))
    save(result)

    t = time.perf_counter()
    if "task" not in result:
        after_task = task_scores(model, tok, facts)
        result["task"] = summarize_task(after_task)
        result["task_raw"] = after_task
        say(f"task {json.dumps(result['task'])}")
        save(result)

    result.setdefault("probes", {})
    cloze = ft.load_jsonl(ft.CLOZE_FILE)
    prompts, answers = [c["prompt"] for c in cloze], [c["answer"] for c in cloze]
    after = answer_scores(model, tok, prompts, answers, match="prefix")
    with model.disable_adapter():
        base = answer_scores(model, tok, prompts, answers, match="prefix")
    result["probes"]["cloze"] = {
        "n": len(cloze),
        **{f"{k}_{w}": interval(s[k]) for w, s in (("base", base), ("after", after))
           for k in ("correct", "logprob")},
        "accuracy_change": interval(after["correct"], base["correct"]),
        "logprob_change": interval(after["logprob"], base["logprob"]),
        "raw": {"base": {k: v.tolist() for k, v in base.items()},
                "after": {k: v.tolist() for k, v in after.items()}},
    }  # fmt: skip
    save(result)
    say(f"cloze {result['probes']['cloze']['accuracy_change']}")

    windows = eval_windows(
        torch.tensor(tok(load_text("us_founding"))["input_ids"]), args.text_seq, 64
    )
    probe_kl(model, "text", probe_from_windows(windows), result, save, say)
    cont = wait_for(ft.CONTINUATIONS_FILE)[: args.probe_n]
    pairs = [c["prompt_ids"] for c in cont], [c["continuation_ids"] for c in cont]
    probe_kl(model, "continuations", probe_from_pairs(*pairs, tok.pad_token_id), result, save, say)
    result["seconds_eval"] = time.perf_counter() - t
    save(result)
    say("done")


if __name__ == "__main__":
    main()
