"""AdapterWeightAveraging inside a real Lightning Trainer, and the fused multi_avg_fn against
torch's own ``get_ema_multi_avg_fn``."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_ema_multi_avg_fn

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")
from helpers import assert_close, backend_or_skip

from emalora_fast.benchmarks.lightning import held_bytes
from emalora_fast.integrations.lightning import AdapterWeightAveraging
from emalora_fast.integrations.swa_utils import get_ema_multi_avg_fn

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two (and steadier on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_TRAIN, BATCH = 24, 4  # 6 batches an epoch


def tiny_peft_mlp(seed: int = 0):
    """A 3-layer MLP with LoRA (r=4) on its linear layers; random B factors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lit_class(lightning):
    """The test's LightningModule, for ``lightning.pytorch`` or ``pytorch_lightning``."""

    class Lit(lightning.LightningModule):
        def __init__(self, model, lr: float = 0.05):
            super().__init__()
            self.model, self.lr = model, lr
            self.seen_in_validation: dict[int, dict[str, torch.Tensor]] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen_in_validation[self.trainer.global_step] = adapter(self.model)
            x, y = batch
            return F.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.lr)

    return Lit


Lit = lit_class(pl)


class Recorder(pl.Callback):
    """The live adapter tensors after each optimizer step, by zero-based step index."""

    def __init__(self):
        self.live: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.live):
            self.live.append(adapter(pl_module.model))


def loaders(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 8, generator=g)
    y = torch.sin(x[:, :4] * 3) + 0.1 * torch.randn(N_TRAIN, 4, generator=g)
    train = torch.utils.data.TensorDataset(x, y)
    valid = torch.utils.data.TensorDataset(x[:8], y[:8])
    return torch.utils.data.DataLoader(train, batch_size=BATCH), torch.utils.data.DataLoader(valid)


def fit(callbacks, epochs=3, val=False, ckpt_path=None, model=None, lightning=pl, **trainer_kwargs):
    lit = (Lit if lightning is pl else lit_class(lightning))(model or tiny_peft_mlp())
    train, valid = loaders()
    trainer_kwargs.setdefault("devices", 1)
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val else 0,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader).*")
        trainer.fit(lit, train, valid if val else None, ckpt_path=ckpt_path)
    return trainer, lit


def lightning_ema(live, decay, every=1, start=None):
    """Lightning's EMA rule in float64: after step i with i >= start and i % every == 0; the first
    such update copies, the later ones are ``e <- decay*e + (1 - decay)*theta``."""
    ema, out = None, []
    for i, theta in enumerate(live):
        if (start is None or i >= start) and i % every == 0:
            t64 = {n: t.double() for n, t in theta.items()}
            ema = t64 if ema is None else {n: decay * ema[n] + (1 - decay) * t64[n] for n in t64}
        out.append(ema if ema is not None else {n: t.double() for n, t in theta.items()})
    return out


def test_ema_equals_float64_and_lightnings_own(seed):
    """K = 2 decays, accumulation 2, every 2nd step from step 3: ours and EMAWeightAveraging
    against a float64 EMA of the recorded live tensors."""
    decays, every, start = (0.7, 0.9), 2, 3
    ours = AdapterWeightAveraging(decays, update_every_n_steps=every, update_starting_at_step=start)
    theirs = pl.callbacks.EMAWeightAveraging(
        decay=decays[1],
        update_every_n_steps=every,
        update_starting_at_step=start,
        use_buffers=False,
    )
    rec = Recorder()
    trainer, lit = fit([ours, theirs, rec], epochs=4, accumulate_grad_batches=2)
    assert trainer.global_step == len(rec.live) == 12
    for k, d in enumerate(decays):
        ref = lightning_ema(rec.live, d, every, start)[-1]
        got = ours.averager.averaged_state_dict(profile=k)
        for n, r in ref.items():
            assert_close(got[n], r, rtol=1e-5, what=f"decay {d} {n}")
            assert not torch.equal(got[n].double(), rec.live[-1][n].double())
    averaged_model = dict(theirs._average_model.module.model.named_parameters())
    got = ours.averager.averaged_state_dict(profile=1)
    for n, t in got.items():
        assert_close(t, averaged_model[n].detach(), rtol=1e-5, what=f"vs EMAWeightAveraging {n}")


def test_validation_on_averaged_training_on_live(seed):
    """Validation sees the averaged tensors; training continues bit for bit as without it."""
    a = AdapterWeightAveraging(0.8)
    rec_a = Recorder()
    _, lit = fit([a, rec_a], epochs=3, val=True)
    b = AdapterWeightAveraging(0.8)
    rec_b = Recorder()
    fit([b, rec_b], epochs=3, val=False)
    assert len(rec_a.live) == len(rec_b.live) == 18
    for la, lb in zip(rec_a.live, rec_b.live):
        assert all(torch.equal(la[n], lb[n]) for n in la)
    for n, t in a.averager.state_dict()["ema"].items():
        assert torch.equal(t, b.averager.state_dict()["ema"][n])
    ref = lightning_ema(rec_a.live, 0.8)
    assert sorted(lit.seen_in_validation) == [6, 12, 18]
    for step, seen in lit.seen_in_validation.items():
        for n, t in seen.items():
            assert_close(t, ref[step - 1][n], rtol=1e-5, what=f"validation at {step}: {n}")
            assert not torch.equal(t, rec_a.live[step - 1][n])
    live_now = adapter(lit.model)
    assert all(torch.equal(live_now[n], rec_a.live[-1][n]) for n in live_now)


@pytest.mark.parametrize("averaging", ["ema", "bema"])
def test_resume_is_bit_identical(tmp_path, averaging):
    kwargs = {"decay": 0.9} if averaging == "ema" else {"lag": 3.0}
    kwargs.update(averaging=averaging, teacher_adapter="teacher", update_starting_at_step=2)
    full = AdapterWeightAveraging(**kwargs, save_dir=tmp_path / "full")
    _, lit_full = fit([full], epochs=4)
    first = AdapterWeightAveraging(**kwargs)
    trainer, _ = fit([first], epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = AdapterWeightAveraging(**kwargs, save_dir=tmp_path / "resumed")
    trainer, lit = fit([resumed], epochs=4, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 24
    sa, sb = full.averager.state_dict(), resumed.averager.state_dict()
    assert sa["step"] == sb["step"] == 24
    for key in ("ema", "theta0", "out"):
        for n, t in sa.get(key, {}).items():
            assert torch.equal(t, sb[key][n]), (key, n)
    params_full = dict(lit_full.model.named_parameters())
    for n, p in lit.model.named_parameters():  # live and teacher adapters
        assert torch.equal(p, params_full[n]), n
    assert any("teacher" in n for n in params_full)
    # The averaged adapter saved at the end loads into a fresh model as a peft adapter.
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_peft_mlp().base_model.model, tmp_path / "resumed")
    averaged = resumed.averager.averaged_state_dict()
    got = dict(loaded.named_parameters())
    for n, t in averaged.items():
        assert torch.equal(got[n], t), n


def test_bema_against_float64(seed):
    """BEMA from step index 2 (theta_0 and ema taken after it): TRL's schedule in float64."""
    cb = AdapterWeightAveraging(averaging="bema", lag=3.0, update_starting_at_step=2)
    rec = Recorder()
    fit([cb, rec], epochs=2)
    live64 = [{n: t.double() for n, t in theta.items()} for theta in rec.live]
    for i, theta in enumerate(live64):  # i = t - 1, t the global step
        t = i + 1
        if i == 2:
            ema, theta0 = dict(theta), dict(theta)
            bema = dict(theta)
        elif i > 2:
            beta, alpha = max((3.0 + t) ** -0.5, 0.0), (3.0 + t) ** -0.2
            ema = {n: (1 - beta) * ema[n] + beta * x for n, x in theta.items()}
            bema = {n: ema[n] + alpha * (x - theta0[n]) for n, x in theta.items()}
    got = cb.averager.averaged_state_dict()
    for n, r in bema.items():
        assert_close(got[n], r, rtol=1e-5, what=n)
        assert not torch.equal(got[n].double(), live64[-1][n])


def test_epoch_start(seed):
    """update_starting_at_epoch=1: the average starts at the first step of epoch 1."""
    cb = AdapterWeightAveraging(0.8, update_starting_at_epoch=1)
    rec = Recorder()
    fit([cb, rec], epochs=3)
    ref = lightning_ema(rec.live, 0.8, start=6)[-1]
    got = cb.averager.averaged_state_dict()
    for n, r in ref.items():
        assert_close(got[n], r, rtol=1e-5, what=n)


def test_standalone_pytorch_lightning_trainer(seed):
    """The same callback in ``pytorch_lightning``'s Trainer (the other import name)."""
    ptl = pytest.importorskip("pytorch_lightning")
    cb = AdapterWeightAveraging(0.8)
    rec = ptl.Callback()
    rec.live, rec.on_train_batch_end = [], Recorder.on_train_batch_end.__get__(rec)
    fit([cb, rec], epochs=1, lightning=ptl)
    ref = lightning_ema(rec.live, 0.8)[-1]
    got = cb.averager.averaged_state_dict()
    for n, r in ref.items():
        assert_close(got[n], r, rtol=1e-5, what=n)


def test_example_runs(tmp_path):
    """examples/lightning_train.py at a tiny size; its averaged adapter loads with peft."""
    import runpy
    from pathlib import Path

    from peft import PeftModel

    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "lightning_train.py"))
    tiny = ["--batches", "3", "--batch-size", "2", "--seq-len", "16", "--hidden", "32"]
    cb = example["main"]([*tiny, "--epochs", "1", "--out", str(tmp_path)])
    assert cb.averager.step == 3
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))  # what --resume continues from
    base = cb.averager.model.base_model.model
    loaded = PeftModel.from_pretrained(base, tmp_path, adapter_name="loaded")
    saved = {n: p for n, p in loaded.named_parameters() if ".loaded." in n}
    for n, t in cb.averager.averaged_state_dict().items():
        assert torch.equal(saved[n.replace(".default.", ".loaded.")], t), n


def test_top_level_exports():
    import emalora_fast
    from emalora_fast import AdapterWeightAveraging as A
    from emalora_fast import get_ema_multi_avg_fn as g

    assert A is AdapterWeightAveraging and g is get_ema_multi_avg_fn
    assert {"AdapterWeightAveraging", "get_ema_multi_avg_fn"} <= set(emalora_fast.__all__)


def test_import_does_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, emalora_fast, emalora_fast.integrations.swa_utils; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("decays", [0.9, (0.5, 0.9, 0.99)])
def test_extra_memory_is_the_averaged_tensors(decays):
    """After a fit with validation (the swap's copy of the live values allocated), the callback
    holds (profiles + 1) x adapter bytes, and nothing the size of the model."""
    cb = AdapterWeightAveraging(decays)
    _, lit = fit([cb], epochs=1, val=True)
    k = 1 if isinstance(decays, float) else len(decays)
    adapter_bytes = sum(t.nbytes for t in adapter(lit.model).values())
    held = held_bytes(cb, lit)
    assert k * adapter_bytes <= held <= (k + 1) * adapter_bytes + 64


def _allocated_bytes(fn) -> int:
    """Bytes torch allocates on the CPU while ``fn`` runs (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_updates_and_swaps_allocate_nothing():
    """After the first of each, an update (through the hook) and a validation swap allocate
    nothing; nor does a call of the multi_avg_fn. A control proves the measure sees allocations."""
    import types

    lit = Lit(tiny_peft_mlp())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    cb = AdapterWeightAveraging((0.5, 0.9))
    cb.setup(trainer, lit, "fit")
    clock = types.SimpleNamespace(global_step=0)

    def steps():
        for _ in range(3):
            clock.global_step += 1
            cb.on_train_batch_end(clock, lit, None, None, 0)
            cb.on_validation_epoch_start(trainer, lit)
            cb.on_validation_epoch_end(trainer, lit)

    steps()
    assert _allocated_bytes(steps) == 0
    assert cb.averager.step == 6
    ema, cur = adapter(lit.model), adapter(lit.model)
    fn = get_ema_multi_avg_fn(0.9)
    fn(list(ema.values()), list(cur.values()), None)
    assert _allocated_bytes(lambda: fn(list(ema.values()), list(cur.values()), None)) == 0
    assert _allocated_bytes(lambda: torch.ones(64).add(1)) >= 2 * 64 * 4  # the control


def test_bad_input_raises_before_anything_changes():
    with pytest.raises(ValueError, match="decay"):
        AdapterWeightAveraging(1.0)
    with pytest.raises(ValueError, match="decay"):
        AdapterWeightAveraging((0.9, 0.0))
    with pytest.raises(TypeError, match="no argument"):
        AdapterWeightAveraging(0.9, ema_power=0.5)
    frozen = tiny_peft_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    before = adapter(frozen) | {n: p.clone() for n, p in frozen.named_parameters()}
    with pytest.raises(ValueError, match="no parameters to average"):
        fit([AdapterWeightAveraging(0.9, teacher_adapter="t")], epochs=1, model=frozen)
    after = dict(frozen.named_parameters())
    assert sorted(after) == sorted(before)  # no teacher adapter was added
    with pytest.raises(ValueError, match="profile"):
        AdapterWeightAveraging((0.9, 0.99), profile=0.5)
    cb = AdapterWeightAveraging(0.9)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    fsdp = pl.strategies.FSDPStrategy()
    trainer._accelerator_connector.strategy = fsdp  # what strategy="fsdp" resolves to
    with pytest.raises(ValueError, match="FSDPStrategy"):
        cb.setup(trainer, Lit(tiny_peft_mlp()), "fit")
    assert cb.averager is None


# ------------------------------------------------------------------------------------------------
# multi_avg_fn


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_multi_avg_fn_equals_torch(dtype, decay, backend):
    """Same result as torch's get_ema_multi_avg_fn, within fp32 rounding (see the bound)."""
    backend_or_skip(backend)
    shapes = [(7, 3), (1,), (129,), (16, 33), (1100,)]
    ema = [torch.randn(s).mul(3).to(dtype) for s in shapes]
    ref = [e.clone() for e in ema]
    ref64 = [e.double() for e in ema]
    ours, theirs = get_ema_multi_avg_fn(decay, backend=backend), torch_ema_multi_avg_fn(decay)
    steps, top = 6, 0.0
    cur = [torch.empty(s, dtype=dtype) for s in shapes]  # parameters, changed in place
    for _ in range(steps):
        for c in cur:
            c.copy_(torch.randn(c.shape).mul(3))
        ours(ema, cur, torch.tensor(1))
        theirs(ref, cur, torch.tensor(1))
        ref64 = [decay * e + (1 - decay) * c.double() for e, c in zip(ref64, cur)]
        top = max(top, *(c.abs().max().item() for c in cur), *(e.abs().max().item() for e in ref))
    # Both forms (decay*e + (1-decay)*x and torch's lerp) round a few times per step at fp32
    # (bf16: once per step on storage); errors of past steps shrink by `decay`, so T steps stay
    # within T x 4 roundings of the largest magnitude.
    eps = EPS32 if dtype == torch.float32 else torch.finfo(dtype).eps
    bound = steps * 4 * eps * top
    for e, r, r64 in zip(ema, ref, ref64):
        assert (e.double() - r.double()).abs().max().item() <= bound
        assert (e.double() - r64).abs().max().item() <= bound
    assert len(ours._slots) == (0 if backend == "torch" else 1)  # built once for these storages


def test_multi_avg_fn_in_averaged_model_reuses_its_table():
    model = tiny_peft_mlp()
    fn = get_ema_multi_avg_fn(0.8)
    ours = AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
    theirs = AveragedModel(model, multi_avg_fn=torch_ema_multi_avg_fn(0.8), use_buffers=True)
    slot = None
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        if i >= 1:
            assert len(fn._slots) == 1
            slot = slot or next(iter(fn._slots.values()))
            assert next(iter(fn._slots.values())) is slot
    top = max(p.abs().max().item() for p in model.parameters())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a - b).abs().max().item() <= 5 * 4 * EPS32 * top


def test_multi_avg_fn_in_lightnings_weight_averaging(seed):
    """Lightning's WeightAveraging with our multi_avg_fn gives torch's result."""
    results = []
    for fn in (get_ema_multi_avg_fn(0.9), torch_ema_multi_avg_fn(0.9)):
        cb = pl.callbacks.WeightAveraging(multi_avg_fn=fn, use_buffers=False)
        _, lit = fit([cb], epochs=2)  # on_train_end copies the average into the model
        results.append(adapter(lit.model))
    top = max(t.abs().max().item() for t in results[1].values())
    for n, t in results[0].items():
        assert (t - results[1][n]).abs().max().item() <= 12 * 4 * EPS32 * top, n
        assert torch.isfinite(t).all()


def test_multi_avg_fn_keeps_the_average_where_current_is_not_finite():
    ema = [torch.randn(40), torch.randn(3, 5)]
    before = [e.clone() for e in ema]
    cur = [torch.randn(40), torch.randn(3, 5)]
    cur[0][7], cur[1][2, 1] = float("nan"), float("inf")
    fn = get_ema_multi_avg_fn(0.9)
    fn(ema, cur, None)
    assert ema[0][7] == before[0][7] and ema[1][2, 1] == before[1][2, 1]
    ref = [0.9 * b.double() + 0.1 * c.double() for b, c in zip(before, cur)]
    ok = [torch.isfinite(c) for c in cur]
    for e, r, m in zip(ema, ref, ok):
        assert_close(e[m], r[m], rtol=1e-6, what="finite elements")
    assert bool(fn.flags[0].item())


def test_multi_avg_fn_checks_decay():
    with pytest.raises(ValueError, match="decay"):
        get_ema_multi_avg_fn(1.5)
    with pytest.raises(ValueError, match="backend"):
        get_ema_multi_avg_fn(0.9, backend="cuda")


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process DDP fit (Lightning finds the processes already launched)."""
    import os
    import sys

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
        LOCAL_RANK=str(rank), RANK=str(rank),
    )  # fmt: skip
    if sys.platform == "linux":  # gloo otherwise resolves the host name
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    cb, rec = AdapterWeightAveraging(0.8), Recorder()
    fit([cb, rec], epochs=2, val=True, devices=2, strategy="ddp")
    torch.save({"live": rec.live, "avg": cb.averager.averaged_state_dict()}, f"{out}/{rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """strategy="ddp", 2 CPU processes (gloo): both ranks hold the same average, the float64
    EMA of the (identical) live tensors, with validation on the averaged weights in between."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert len(runs[0]["live"]) == 6  # 24 samples / 2 ranks / batch 4 = 3 steps per epoch
    for n, t in runs[0]["avg"].items():
        assert torch.equal(t, runs[1]["avg"][n])
        assert_close(t, lightning_ema(runs[0]["live"], 0.8)[-1][n], rtol=1e-5, what=n)
