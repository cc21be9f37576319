"""peft glue: LoRA parameter discovery, the frozen teacher adapter and adapter export.

Only peft's public API is used (``add_adapter``, ``set_adapter``, ``active_adapters``,
``save_pretrained``).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .integrations import distributed

ParamFilter = Callable[[str, nn.Parameter], bool]

_LORA_NAME = re.compile(r"\.lora_[AB]\.([^.]+)\.")


def is_peft_model(model: nn.Module) -> bool:
    """A peft ``PeftModel`` (FSDP2's ``fully_shard`` keeps it one). The transformers model inside
    also has ``peft_config`` and ``set_adapter``, but its ``save_pretrained`` saves the model."""
    if "peft" not in sys.modules:  # nothing can be a PeftModel before peft is imported
        return False
    import peft

    return isinstance(model, (peft.PeftModel, peft.PeftMixedModel))


def default_lora_filter(name: str, param: nn.Parameter) -> bool:
    """The default selection: trainable LoRA factors (names holding ``lora_A``/``lora_B``)."""
    return param.requires_grad and ("lora_A" in name or "lora_B" in name)


def select_parameters(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs chosen by ``param_filter`` (default: trainable LoRA factors)."""
    keep = param_filter or default_lora_filter
    return [(n, p) for n, p in model.named_parameters() if keep(n, p)]


def adapter_of(name: str) -> str | None:
    """The adapter name inside a LoRA parameter name (``...lora_A.<adapter>.weight``)."""
    m = _LORA_NAME.search(name)
    return m.group(1) if m else None


def teacher_name_for(name: str, live_adapter: str, teacher_adapter: str) -> str:
    """The teacher adapter's twin of a live LoRA parameter name."""
    return name.replace(f".{live_adapter}.", f".{teacher_adapter}.")


def live_adapter_of(names: list[str]) -> str:
    """The one adapter that owns all the selected LoRA parameters; raises otherwise."""
    adapters = {adapter_of(n) for n in names}
    if None in adapters or len(adapters) != 1:
        raise ValueError(
            "a teacher adapter needs the averaged parameters to be the LoRA factors of one "
            f"adapter; found adapters {sorted(a for a in adapters if a)} "
            f"(and {sum(adapter_of(n) is None for n in names)} non-LoRA parameters)"
        )
    return adapters.pop()


def add_teacher_adapter(
    model: nn.Module, live_names: list[str], teacher_adapter: str
) -> dict[str, nn.Parameter]:
    """Add (or reuse) a frozen adapter named ``teacher_adapter`` with the live adapter's config.

    The new adapter is neither active nor trainable; its parameters are returned keyed by the
    live parameter names they mirror. Nothing else in the model changes.
    """
    if not is_peft_model(model):
        raise TypeError("teacher_adapter needs a peft model (PeftModel) to add the adapter to")
    live = live_adapter_of(live_names)
    if teacher_adapter == live:
        raise ValueError(f"teacher_adapter must differ from the live adapter {live!r}")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    active = list(model.active_adapters)
    if teacher_adapter not in model.peft_config and distributed.has_dtensor_parameters(model):
        raise ValueError(
            f"cannot add teacher adapter {teacher_adapter!r} to a sharded (FSDP2) model: its "
            "tensors would not be sharded; create the averager, or add the adapter, before "
            "fully_shard"
        )
    if teacher_adapter not in model.peft_config:
        model.add_adapter(teacher_adapter, copy.deepcopy(model.peft_config[live]))
    params = dict(model.named_parameters())
    twins = {}
    for n in live_names:
        tn = teacher_name_for(n, live, teacher_adapter)
        tp = params.get(tn)
        if tp is None or tp.shape != params[n].shape:
            raise ValueError(f"teacher adapter {teacher_adapter!r} has no tensor matching {n}")
        twins[n] = tp
    _restore(model, active, flags)
    for tp in twins.values():
        tp.requires_grad_(False)
    return twins


def _restore(model: nn.Module, active: list[str], flags: dict[int, bool]) -> None:
    if list(model.active_adapters) != active:
        model.base_model.set_adapter(active if len(active) > 1 else active[0])
    for p in model.parameters():
        want = flags.get(id(p))
        if want is not None and p.requires_grad != want:
            p.requires_grad_(want)


@contextmanager
def adapter_active(model: nn.Module, adapter: str) -> Iterator[nn.Module]:
    """Run the body with ``adapter`` active (frozen); restore active adapters and every flag."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    active = list(model.active_adapters)
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield model
    finally:
        _restore(model, active, flags)


def save_adapter(model: nn.Module, save_directory: str, adapter: str, **kwargs) -> None:
    """Write one adapter of a peft model as a standalone peft adapter directory.

    With DTensor (FSDP2) parameters call it on every rank: all gather the adapter's tensors
    (only those), rank 0 writes, and all return once it has written.
    """
    if distributed.has_dtensor_parameters(model):
        kwargs["state_dict"] = distributed.adapter_full_state_dict(model, adapter)
        if distributed.is_main_process():
            _write_adapter(model, save_directory, adapter, **kwargs)
        distributed.barrier()
        return
    _write_adapter(model, save_directory, adapter, **kwargs)


def _write_adapter(model: nn.Module, save_directory: str, adapter: str, **kwargs) -> None:
    model.save_pretrained(save_directory, selected_adapters=[adapter], **kwargs)
    if adapter != "default":
        # peft writes a non-default adapter into a sub-folder; move it up so that
        # PeftModel.from_pretrained(base, save_directory) loads it directly.
        import os
        import shutil

        sub = os.path.join(save_directory, adapter)
        for f in os.listdir(sub):
            shutil.move(os.path.join(sub, f), os.path.join(save_directory, f))
        os.rmdir(sub)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The locally stored part of ``p``: the shard of a DTensor, else ``p`` itself (detached)."""
    to_local = getattr(p, "to_local", None)
    t = to_local() if to_local is not None else p
    return t.detach()
