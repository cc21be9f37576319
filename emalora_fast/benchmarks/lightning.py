"""Lightning benchmark cases: one update of ``AdapterWeightAveraging`` against Lightning's own
``EMAWeightAveraging`` and ``WeightAveraging(multi_avg_fn=...)`` on the same peft model.

Each provider is a callback set up on the same LightningModule (a Llama-shaped model built from a
config, LoRA r=16 on every linear layer) and driven through its ``on_train_batch_end`` hook, as
the Trainer drives it after an optimizer step. The extra memory of a provider is the bytes of the
tensor storages its callback holds that are not the model's own (after one update and one
validation swap, so that buffers allocated on first use are counted): exact on any device, where
a process-level peak would mix in the allocator's caching.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

# (hidden, intermediate, layers, vocab) of the Llama-shaped models.
SIZES = {"tiny": (64, 128, 2, 256), "small": (512, 1408, 4, 1000)}
PROVIDERS = (
    "emalora",
    "ema_weight_averaging",
    "weight_averaging_foreach",
    "weight_averaging_fused",
)
_HELD_MODULES = ("emalora_fast", "lightning", "pytorch_lightning", "torch.optim")


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


def peft_llama(size: str, r: int = 16, seed: int = 0) -> nn.Module:
    """A Llama-shaped ``LlamaForCausalLM`` from a config with an all-linear LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, target_modules="all-linear"))


def held_bytes(obj: object, model: nn.Module) -> int:
    """Bytes of the tensor storages reachable from ``obj`` that ``model`` does not own.

    Follows containers, modules (their parameters and buffers) and the attributes of objects of
    this project, Lightning and ``torch.optim``; a storage is counted once however many views
    of it are held.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, storages = set(), {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is model:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in own:
                storages[s.data_ptr()] = s.nbytes()
        elif isinstance(o, nn.Module):
            stack += [*o.parameters(), *o.buffers()]
        elif isinstance(o, dict):
            stack += list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack += list(o)
        elif type(o).__module__.startswith(_HELD_MODULES) and hasattr(o, "__dict__"):
            stack += list(vars(o).values())
    return sum(storages.values())


def _callback(provider: str, decay: float):
    pl = _lightning()
    from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_multi_avg_fn

    from ..integrations.lightning import AdapterWeightAveraging
    from ..integrations.swa_utils import get_ema_multi_avg_fn

    if provider == "emalora":
        return AdapterWeightAveraging(decay)
    if provider == "ema_weight_averaging":
        return pl.callbacks.EMAWeightAveraging(decay=decay)
    fn = torch_multi_avg_fn if provider == "weight_averaging_foreach" else get_ema_multi_avg_fn
    return pl.callbacks.WeightAveraging(multi_avg_fn=fn(decay))


def cases(
    size: str, device: torch.device, decay: float = 0.999
) -> tuple[dict[str, Callable[[], None]], dict[str, int], dict[str, int]]:
    """Per provider: one update (a callable), the bytes its callback holds; and the sizes
    (``adapter_bytes``, ``model_bytes``) of the model they share."""
    pl = _lightning()

    class Module(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    lit = Module(peft_llama(size)).to(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    adapter = [p for p in lit.parameters() if p.requires_grad]
    steps, held = {}, {}
    for provider in PROVIDERS:
        cb = _callback(provider, decay)
        cb.setup(trainer, lit, "fit")
        clock = types.SimpleNamespace(global_step=0)  # what the hook reads of the Trainer

        def update(cb=cb, clock=clock) -> None:
            clock.global_step += 1
            cb.on_train_batch_end(clock, lit, None, None, 0)

        update()  # the first update (a copy for AveragedModel) and allocations on first use
        cb.on_validation_epoch_start(trainer, lit)
        cb.on_validation_epoch_end(trainer, lit)
        steps[provider], held[provider] = update, held_bytes(cb, lit)
    sizes = {
        "adapter_bytes": sum(p.nbytes for p in adapter),
        "model_bytes": sum(t.nbytes for t in [*lit.parameters(), *lit.buffers()]),
    }
    return steps, held, sizes
