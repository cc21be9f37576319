"""The forgetting monitor: KL(pi_0 || pi) and NLL against float64 references, in a real Trainer."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_peft_llama

from emalora_fast.experiments import forgetting_task as ft
from emalora_fast.integrations.forgetting import (
    ForgettingMonitor,
    ProbeSet,
    answer_scores,
    forgetting_metrics,
    probe_from_pairs,
    probe_from_windows,
    sequence_scores,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def random_probe(n=7, vocab=VOCAB):
    """Pairs of random prompts and targets of irregular lengths (padding in every batch)."""
    lens = torch.randint(1, 6, (n, 2))
    prompts = [torch.randint(0, vocab, (int(a),)).tolist() for a, _ in lens]
    targets = [torch.randint(0, vocab, (int(b),)).tolist() for _, b in lens]
    return probe_from_pairs(prompts, targets, pad_id=vocab - 1), prompts, targets


def reference(model, prompts, targets):
    """Per-sequence float64 sums of KL(pi_0 || pi), -log pi and -log pi_0 on the targets, each
    sequence run alone (no padding), from full log-softmaxes."""
    kl, nll, base_nll = [], [], []
    model.eval()
    with torch.no_grad():
        for p, t in zip(prompts, targets):
            ids = torch.tensor([p + t])
            lq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            with model.disable_adapter():
                lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            rows = slice(len(p) - 1, len(p) + len(t) - 1)  # logits predicting the targets
            y = torch.tensor(t)
            kl.append((lp[rows].exp() * (lp[rows] - lq[rows])).sum())
            nll.append(-lq[rows].gather(1, y[:, None]).sum())
            base_nll.append(-lp[rows].gather(1, y[:, None]).sum())
    return torch.stack(kl), torch.stack(nll), torch.stack(base_nll)


def adapter_state(model):
    return (
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.active_adapter,
        {n: m.training for n, m in model.named_modules()},
    )


def test_zero_lora_has_zero_kl_and_base_nll(seed):
    model = tiny_peft_llama(vocab=VOCAB, b_std=0.0, seed=seed)
    probe, prompts, targets = random_probe()
    s = sequence_scores(model, probe, batch_size=3)
    _, nll, base_nll = reference(model, prompts, targets)
    assert s["kl"].abs().max() < 1e-6
    torch.testing.assert_close(s["nll"], nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["base_nll"], nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["base_nll"], base_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b_std", [0.05, 0.5])
def test_kl_and_nll_match_float64_reference(seed, b_std):
    model = tiny_peft_llama(vocab=VOCAB, b_std=b_std, seed=seed)
    probe, prompts, targets = random_probe()
    s = sequence_scores(model, probe, batch_size=4)
    kl, nll, base_nll = reference(model, prompts, targets)
    assert bool((kl > 1e-6).all())
    torch.testing.assert_close(s["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["nll"], nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["base_nll"], base_nll, rtol=1e-5, atol=1e-5)
    assert s["tokens"].tolist() == [len(t) for t in targets]
    m = forgetting_metrics(model, probe, batch_size=5)
    n = sum(len(t) for t in targets)
    assert m["tokens"] == n
    assert m["kl"] == pytest.approx(float(kl.sum()) / n, rel=1e-4)
    assert m["nll"] == pytest.approx(float(nll.sum()) / n, rel=1e-5)


def test_windows_probe_scores_every_token_after_the_first(seed):
    model = tiny_peft_llama(vocab=VOCAB, b_std=0.1, seed=seed)
    windows = torch.randint(0, VOCAB, (5, 9))
    s = sequence_scores(model, probe_from_windows(windows), batch_size=2)
    kl, nll, _ = reference(
        model, [w[:1].tolist() for w in windows], [w[1:].tolist() for w in windows]
    )
    torch.testing.assert_close(s["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["nll"], nll, rtol=1e-5, atol=1e-5)
    assert s["tokens"].tolist() == [8] * 5


def test_state_is_restored(seed):
    model = tiny_peft_llama(vocab=VOCAB, b_std=0.1, seed=seed)
    model.add_adapter("ema", peft.LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    model.base_model.model.model.layers[0].eval()  # a mixed train/eval state must survive
    before = adapter_state(model)
    grad = torch.is_grad_enabled()
    probe, _, _ = random_probe()
    out = torch.full((1,), float("nan"))
    out[0] = forgetting_metrics(model, probe)["kl"]
    assert torch.isfinite(out).all() and out[0] > 0
    assert adapter_state(model) == before
    assert torch.is_grad_enabled() == grad


def test_bad_input():
    with pytest.raises(TypeError, match="peft model"):
        forgetting_metrics(torch.nn.Linear(2, 2), random_probe()[0])
    with pytest.raises(ValueError, match="every_n_steps"):
        ForgettingMonitor(random_probe()[0], every_n_steps=0)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="no scored token"):
        ProbeSet(ids, ids, torch.full_like(ids, -100))
    with pytest.raises(ValueError, match="one \\[n, S\\] shape"):
        ProbeSet(ids, ids[:, :2], ids)
    with pytest.raises(ValueError, match="non-empty"):
        probe_from_pairs([[1], []], [[2], [3]])


def test_probe_layout():
    probe = probe_from_pairs([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert probe.input_ids.tolist() == [[5, 6, 8, 0], [7, 9, 10, 11]]
    assert probe.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert probe.labels.tolist() == [[-100, -100, 8, -100], [-100, 9, 10, 11]]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        self.ids = torch.randint(0, VOCAB, (n, seq))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_monitor_logs_inside_a_trainer(tmp_path, seed):
    model = tiny_peft_llama(vocab=VOCAB, layers=1, b_std=0.0, seed=seed)
    probe, prompts, targets = random_probe()
    monitor = ForgettingMonitor(probe, every_n_steps=2, batch_size=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=100, save_strategy="no",
        disable_tqdm=True, seed=seed % 1000,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[monitor]
    )
    trainer.train()
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    logged = [e for e in trainer.state.log_history if "forgetting/kl" in e]
    assert logged == monitor.history
    assert monitor.history[0]["forgetting/kl"] == pytest.approx(0.0, abs=1e-6)
    kl, nll, _ = reference(model, prompts, targets)  # the trained model, after the last step
    n = sum(len(t) for t in targets)
    last = monitor.history[-1]
    assert last["forgetting/kl"] > 1e-4
    assert last["forgetting/kl"] == pytest.approx(float(kl.sum()) / n, rel=1e-4)
    assert last["forgetting/nll"] == pytest.approx(float(nll.sum()) / n, rel=1e-5)


def test_facts_are_deterministic_and_unique():
    a, b = ft.generate_facts(), ft.generate_facts()
    assert a == b and len(a) == ft.N_FACTS
    assert len({f["name"] for f in a}) == len(a) == len({f["answer"] for f in a})
    assert {f["relation"] for f in a} == set(ft.RELATIONS)
    assert ft.load_jsonl(ft.FACTS_FILE) == a  # the shipped file is the generator's output
    assert ft.generate_facts(seed=1) != a


def word_tokenizer(vocab=VOCAB):
    """A word-level Hugging Face tokenizer over the words w2..w{vocab-1} (ids 0, 1: pad, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def test_answer_scores_match_float64_reference_and_greedy(seed):
    model = tiny_peft_llama(vocab=VOCAB, b_std=0.2, seed=seed)
    tok = word_tokenizer()
    prompts, answers, expected = [], [], []
    for i in range(10):
        ids = torch.randint(2, VOCAB, (int(torch.randint(1, 5, ())),)).tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        best = int(logits[2:].argmax()) + 2  # greedy's word (pad and unk never win here)
        if int(logits.argmax()) != best:
            continue
        other = best + 1 if best + 1 < VOCAB else 2
        answer = best if i % 2 == 0 else other
        prompts.append(" ".join(f"w{j}" for j in ids))
        answers.append(f"w{answer}")
        expected.append((float(torch.log_softmax(logits, -1)[answer]), float(answer == best)))
    assert len(prompts) >= 4
    s = answer_scores(model, tok, prompts, answers, match="exact", batch_size=3)
    ref = torch.tensor([e[0] for e in expected], dtype=torch.float64)
    torch.testing.assert_close(s["logprob"], ref, rtol=1e-5, atol=1e-5)
    assert s["correct"].tolist() == [e[1] for e in expected]
    assert tok.padding_side == "right"
