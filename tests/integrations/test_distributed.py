"""The averager under DDP and FSDP2: two processes on the gloo backend (CPU), a tiny peft Llama,
real optimizer steps. Workers write what they saw to files; the parent checks the values against
the float64 formulas fed with the same (full, unsharded) weight sequence."""

from __future__ import annotations

import collections
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import FP32_RTOL, Oracle, assert_close, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from emalora_fast import BEMA, EMA
from emalora_fast import _dispatch as dispatch
from emalora_fast.averaging import peft_utils
from emalora_fast.distributed import unwrap_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed"
    ),
]

WORLD = 2
STEPS = 4
EMA_HP = dict(decay=0.7)
BEMA_HP = dict(update_after=1, lag=2.0)
PLAIN_HP = dict(decay=0.5, update_every=2)
IDS = torch.arange(24).reshape(2, 12) % 128


def tiny_lora_model(r: int, lora_seed: int):
    """The tiny Llama (seed 0) with LoRA rank r; lora_B drawn from ``lora_seed`` (peft: zeros)."""
    model = peft.get_peft_model(
        tiny_llama(seed=0), peft.LoraConfig(r=r, target_modules="all-linear")
    )
    g = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args) -> None:
    mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=True)


def init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":  # gloo otherwise resolves the host name, which sandboxes lack
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )


class OpCounter(TorchDispatchMode):
    """Counts the averager's kernel launches and every collective run inside the block."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "emalora_fast":
            self.counts["launch"] += 1
        elif func.namespace in ("c10d", "_c10d_functional"):
            self.counts["collective"] += 1
        return func(*args, **(kwargs or {}))


def counting(fn, tally: list):
    def wrapped(*args, **kwargs):
        tally.append(1)
        return fn(*args, **kwargs)

    return wrapped


def full(model, names) -> dict[str, torch.Tensor]:
    """The named parameters as full tensors (a collective for DTensors)."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n].detach()
        out[n] = p.full_tensor() if hasattr(p, "full_tensor") else p.clone()
    return out


def train_step(model, opt, seed: int) -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def reference(kind: str, thetas: list[dict[str, torch.Tensor]], names, **hp) -> dict:
    """The float64 average of the weight sequence thetas[0] (at creation), thetas[1], ..."""
    oracle = Oracle(kind, [thetas[0][n].double() for n in names], **hp)
    for t in range(1, len(thetas)):
        oracle.step(t, [thetas[t][n].double() for n in names])
    return dict(zip(names, oracle.averaged, strict=True))


def check_average(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref), what
    for n in ref:
        assert_close(got[n], ref[n], FP32_RTOL, f"{what}: {n}")


# --------------------------------------------------------------------------------------------
# DDP


def _ddp_worker(rank: int, port: int, out: str, seed: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(rank, port)
    try:
        model = tiny_lora_model(r=4, lora_seed=seed + rank)  # ranks differ until DDP broadcasts
        lora_b_before = sum(p.sum() for n, p in model.named_parameters() if "lora_B" in n)
        ddp = DDP(model)
        ema = EMA(ddp, backend="cpp", **EMA_HP)  # the wrapper is accepted and unwrapped
        bema = BEMA(unwrap_model(ddp), backend="cpp", **BEMA_HP)
        names = ema.parameter_names
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        thetas, counts = [full(model, names)], []
        for t in range(1, STEPS + 1):
            train_step(ddp, opt, seed=seed + 1000 * t + rank)  # each rank its own data
            with OpCounter() as c:
                ema.update()
                bema.update()
            counts.append(dict(c.counts))
            thetas.append(full(model, names))
        with OpCounter() as c:  # the counter sees a collective when there is one
            dist.all_reduce(torch.ones(1))
        torch.save(
            {
                "names": names,
                "model_names": [n for n, p in model.named_parameters() if p.requires_grad],
                "unwrapped": ema.model is model and unwrap_model(ddp) is model,
                "lora_b_before": float(lora_b_before),
                "thetas": thetas,
                "ema": ema.averaged_state_dict(),
                "bema": bema.averaged_state_dict(),
                "counts": counts,
                "probe": dict(c.counts),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dispatch.cpp_available(), reason="emalora_fast._C is not built")
def test_ddp_shadows_identical_on_every_rank_without_communication(tmp_path, seed):
    spawn(_ddp_worker, str(tmp_path), seed)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    names = r0["names"]
    assert names == r0["model_names"] and len(names) == 28
    assert not any(n.startswith("module.") for n in names)
    assert r0["unwrapped"] and r1["unwrapped"]
    assert r0["lora_b_before"] != r1["lora_b_before"]  # DDP's broadcast made them equal
    for t in range(STEPS + 1):
        for n in names:
            assert torch.equal(r0["thetas"][t][n], r1["thetas"][t][n]), (t, n)
    assert not torch.equal(r0["thetas"][0][names[0]], r0["thetas"][-1][names[0]])
    for kind in ("ema", "bema"):
        for n in names:  # bit for bit: same weights, same arithmetic, nothing exchanged
            assert torch.equal(r0[kind][n], r1[kind][n]), (kind, n)
    check_average(r0["ema"], reference("ema", r0["thetas"], names, **EMA_HP), "ddp ema")
    check_average(r0["bema"], reference("bema", r0["thetas"], names, **BEMA_HP), "ddp bema")
    for r in (r0, r1):
        assert r["counts"] == [{"launch": 2}] * STEPS  # one launch per averager, no collective
        assert r["probe"] == {"collective": 1}


def test_unwrap_model_strips_wrappers():
    inner = torch.nn.Linear(3, 3)
    compiled = torch.compile(torch.nn.DataParallel(inner))
    assert unwrap_model(compiled) is inner
    assert unwrap_model(inner) is inner


# --------------------------------------------------------------------------------------------
# FSDP2


def _shard(model, mode: str) -> None:
    from torch.distributed.fsdp import fully_shard

    if mode == "layers":
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
    fully_shard(model)  # "root": LoRA tensors stay unsharded after a forward until the backward


def _fsdp_worker(rank: int, port: int, out: str, seed: int, mode: str, backend: str) -> None:
    from torch.distributed.tensor import DTensor

    init(rank, port)
    try:
        # r=3: the lora_A rows split 2 + 1 over the ranks, uneven shards.
        model = tiny_lora_model(r=3, lora_seed=seed)  # the same on every rank
        bema = BEMA(  # before sharding; its teacher is the BEMA output here
            model, teacher_adapter="ema", teacher_weights="bema", backend=backend, **BEMA_HP
        )
        _shard(model, mode)
        ema = EMA(model, backend=backend, **EMA_HP)  # after sharding
        plain = EMA(model.get_base_model(), backend=backend, **PLAIN_HP)  # not a peft model
        try:
            EMA(model, teacher_adapter="late", backend=backend)
            late = "no error"
        except ValueError as e:
            late = str(e)
        avgs = {"ema": ema, "bema": bema, "plain": plain}
        refreshes = {k: [] for k in avgs}
        for k, avg in avgs.items():
            avg.refresh = counting(avg.refresh, refreshes[k])
        names = ema.parameter_names
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        thetas, counts = [full(model, names)], []
        updating = list(avgs.values())
        for t in range(1, STEPS + 1):
            train_step(model, opt, seed=seed + 1000 * t + rank)
            if t == 2:
                logits(model)  # an evaluation forward between step and update
            with OpCounter() as c:
                for avg in updating:
                    avg.update()
            counts.append(dict(c.counts))
            thetas.append(full(model, names))
            if t == STEPS - 1:  # state round trip through a file, per rank
                torch.save(ema.state_dict(), os.path.join(out, f"state{rank}.pt"))
                ema2 = EMA(model, backend=backend, **EMA_HP)
                ema2.load_state_dict(torch.load(os.path.join(out, f"state{rank}.pt")))
                updating.append(ema2)
        params = dict(model.named_parameters())
        result = {"names": names, "thetas": thetas, "counts": counts, "late": late}
        result["late_added"] = "late" in model.peft_config
        result["refreshes"] = {k: len(v) for k, v in refreshes.items()}
        for k, avg in (("ema", ema), ("bema", bema)):
            sd = avg.averaged_state_dict()
            result[f"{k}_placed"] = all(
                isinstance(sd[n], DTensor)
                and sd[n].placements == params[n].placements
                and sd[n].device_mesh == params[n].device_mesh
                and sd[n].shape == params[n].shape
                and sd[n].to_local().shape == params[n].to_local().shape
                for n in names
            )
            result[k] = {n: sd[n].full_tensor() for n in names}
        result["ema_local"] = {n: t.to_local() for n, t in ema.averaged_state_dict().items()}
        result["ema2_local"] = {n: t.to_local() for n, t in ema2.averaged_state_dict().items()}
        result["plain"] = {n: t.full_tensor() for n, t in plain.averaged_state_dict().items()}
        twins = full(model, [n.replace(".default.", ".ema.") for n in names])
        result["teacher"] = {n.replace(".ema.", ".default."): t for n, t in twins.items()}

        result["live_logits"] = logits(model)  # "root": leaves unsharded live weights behind
        for k, avg in (("ema", ema), ("bema", bema)):
            with avg.swapped():
                result[f"{k}_swapped_weights"] = full(model, names)
                result[f"{k}_swapped_logits"] = logits(model)
            result[f"{k}_after_weights"] = full(model, names)
            result[f"{k}_after_logits"] = logits(model)
        with bema.teacher():
            result["teacher_logits"] = logits(model)

        writes, files = [], {"ema": "adapter_model.safetensors", "plain": "averaged.safetensors"}
        peft_utils._write_adapter = counting(peft_utils._write_adapter, writes)
        result["saved_on_return"] = {}
        with OpCounter() as c:
            for k, avg in avgs.items():
                avg.save_pretrained(os.path.join(out, k))
                f = os.path.join(out, k, files.get(k, "adapter_config.json"))
                result["saved_on_return"][k] = os.path.exists(f)
        result["save_counts"] = dict(c.counts)
        result["writes"] = len(writes)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


FSDP_CASES = [("layers", "cpp"), ("root", "torch")]


@pytest.mark.parametrize("mode,backend", FSDP_CASES, ids=[f"{m}-{b}" for m, b in FSDP_CASES])
def test_fsdp2_shards_average_in_place_and_export_full(mode, backend, tmp_path, seed):
    if backend == "cpp" and not dispatch.cpp_available():
        pytest.skip("emalora_fast._C is not built")
    spawn(_fsdp_worker, str(tmp_path), seed, mode, backend)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    names, thetas = r0["names"], r0["thetas"]
    assert len(names) == 28
    for t in range(STEPS + 1):
        for n in names:
            assert torch.equal(thetas[t][n], r1["thetas"][t][n]), (t, n)
    assert not torch.equal(thetas[0][names[0]], thetas[-1][names[0]])  # training moved them

    ref = {
        "ema": reference("ema", thetas, names, **EMA_HP),
        "bema": reference("bema", thetas, names, **BEMA_HP),
    }
    for r in (r0, r1):
        # averaged_state_dict(): DTensors placed like the parameters; full = the unsharded truth
        for k in ("ema", "bema"):
            assert r[f"{k}_placed"], k
            check_average(r[k], ref[k], f"fsdp {k}")
        base_names = [n.removeprefix("base_model.model.") for n in names]
        plain_ref = reference("ema", thetas, names, **PLAIN_HP)
        check_average(r["plain"], dict(zip(base_names, plain_ref.values())), "fsdp plain")
        # the teacher adapter (created before sharding) holds the average, shard by shard
        for n in names:
            assert torch.equal(r["teacher"][n], r["bema"][n]), n
        # updates: one launch per averager and rank, no collective; only the averager created
        # before fully_shard re-read the model (once)
        if backend == "cpp":  # ema, bema; plain at s = t - 1 <= 0 or even; ema2 on the last
            want = [{"launch": 2 + (t % 2 == 1) + (t == STEPS)} for t in range(1, STEPS + 1)]
            assert r["counts"] == want
        else:
            assert all("collective" not in c for c in r["counts"])
        assert r["refreshes"] == {"ema": 0, "bema": 1, "plain": 0}
        # state_dict round trip per rank: the reloaded averager continued identically
        for n in names:
            assert torch.equal(r["ema_local"][n], r["ema2_local"][n]), n
        # swapped(): the averaged weights in the body, the live ones back after, bit for bit
        for k in ("ema", "bema"):
            for n in names:
                assert torch.equal(r[f"{k}_swapped_weights"][n], r[k][n]), (k, n)
                assert torch.equal(r[f"{k}_after_weights"][n], thetas[-1][n]), (k, n)
            assert torch.equal(r[f"{k}_after_logits"], r["live_logits"]), k
            assert not torch.equal(r[f"{k}_swapped_logits"], r["live_logits"]), k
        assert torch.equal(r["teacher_logits"], r["bema_swapped_logits"])
        assert "fully_shard" in r["late"] and not r["late_added"]
        # save: the gathers are the only collectives; rank 0 wrote; all returned after it
        assert r["save_counts"].get("collective", 0) > 0 and "launch" not in r["save_counts"]
        assert r["saved_on_return"] == {"ema": True, "bema": True, "plain": True}
    assert (r0["writes"], r1["writes"]) == (2, 0)

    from safetensors.torch import load_file

    for k in ("ema", "bema"):
        loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / k)
        params = dict(loaded.named_parameters())
        for n in names:
            assert torch.equal(params[n].detach(), r0[k][n]), (k, n)
        assert_close(logits(loaded), r0[f"{k}_swapped_logits"], FP32_RTOL, f"{k} logits")
    saved = load_file(tmp_path / "plain" / "averaged.safetensors")
    assert set(saved) == set(r0["plain"])
    for n, t in saved.items():
        assert torch.equal(t, r0["plain"][n]), n
