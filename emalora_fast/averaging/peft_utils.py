"""peft glue: which tensors make an adapter, the frozen teacher adapter and adapter export.

An adapter is what peft saves for it: :func:`peft.get_peft_model_state_dict` lists its tensors
under adapter-independent keys (the names in ``adapter_model.safetensors``) — LoRA factors of
linear, embedding and conv layers, DoRA magnitude vectors, ``modules_to_save`` copies, trainable
tokens, LoHa/LoKr/(IA)³ weights. Those tensors are the model's own parameters; they are found in
the model by their storage, so no parameter name is parsed to decide what belongs to an adapter.
Only peft's public API is used (``get_peft_model_state_dict``, ``add_adapter``, ``set_adapter``,
``active_adapters``, ``save_pretrained``).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed

ParamFilter = Callable[[str, nn.Parameter], bool]


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of a peft adapter.

    Attributes:
        key: peft's adapter-independent key (its name in ``adapter_model.safetensors``).
        name: the model's name of the parameter (or buffer) holding it.
        tensor: that parameter or buffer.
        kind: what it is: the path segment before the adapter name (``lora_A``,
            ``lora_embedding_B``, ``lora_magnitude_vector``, ``modules_to_save``, ``hada_w1_a``...).
    """

    key: str
    name: str
    tensor: torch.Tensor
    kind: str


@dataclass
class Selection:
    """What an averager averages, and the adapter around it.

    Attributes:
        params: ``(name, parameter)`` pairs to average, in the model's order.
        adapter: the live peft adapter (None for a model without peft adapters).
        adapter_tensors: every tensor of that adapter by parameter name (empty without peft).
        left_out: trainable parameters of the model that are not averaged.
    """

    params: list[tuple[str, nn.Parameter]]
    adapter: str | None
    adapter_tensors: dict[str, AdapterTensor]
    left_out: list[str]

    def kinds(self) -> Counter:
        """How many averaged tensors of each kind (``other`` for tensors outside the adapter)."""
        return Counter(
            self.adapter_tensors[n].kind if n in self.adapter_tensors else "other"
            for n, _ in self.params
        )

    def outside_adapter(self) -> list[str]:
        """Averaged parameters that are not tensors of the live adapter."""
        return [n for n, _ in self.params if n not in self.adapter_tensors]


def is_peft_model(model: nn.Module) -> bool:
    """A peft ``PeftModel`` (FSDP2's ``fully_shard`` keeps it one). The transformers model inside
    also has ``peft_config`` and ``set_adapter``, but its ``save_pretrained`` saves the model."""
    if "peft" not in sys.modules:  # nothing can be a PeftModel before peft is imported
        return False
    import peft

    return isinstance(model, (peft.PeftModel, peft.PeftMixedModel))


def _active_adapters(model: nn.Module) -> list[str] | None:
    """The active peft adapters of ``model``, or None when it carries no peft adapters.

    A PeftModel has the ``active_adapters`` property; a transformers model with adapters added
    through its peft integration has an ``active_adapters()`` method (which raises when none
    was loaded, as for the model inside a PeftModel: that one is a plain module here).
    """
    if "peft" not in sys.modules or not isinstance(getattr(model, "peft_config", None), dict):
        return None
    active = getattr(model, "active_adapters", None)
    if callable(active):
        try:
            active = active()
        except (ValueError, AttributeError):
            return None
    return list(active or [])


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The locally stored part of ``p``: the shard of a DTensor, else ``p`` itself (detached)."""
    to_local = getattr(p, "to_local", None)
    t = to_local() if to_local is not None else p
    return t.detach()


def untracked_local(p: torch.Tensor) -> torch.Tensor:
    """Like :func:`local_tensor`, through ``.data``: in-place writes to it do not bump ``p``'s
    autograd version counter. Only for writes that are undone before any backward reads ``p``
    (a temporary swap of values), where the counter would raise for nothing."""
    data = p.data
    to_local = getattr(data, "to_local", None)
    return to_local() if to_local is not None else data


def _storage_key(t: torch.Tensor) -> tuple:
    t = local_tensor(t)
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape))


def _kind(name: str, adapter: str) -> str:
    parts = name.split(".")
    where = [i for i, part in enumerate(parts) if part == adapter]
    return parts[where[-1] - 1] if where and where[-1] > 0 else parts[-1]


def active_adapter(model: nn.Module) -> str:
    """The one active adapter of a peft model; raises when there are several or none."""
    active = _active_adapters(model) or []
    if len(active) != 1:
        raise ValueError(
            f"the model has {len(active)} active adapters {active}: pass adapter=... to choose "
            "the one to average"
        )
    return active[0]


def adapter_tensors(model: nn.Module, adapter: str) -> dict[str, AdapterTensor]:
    """Every tensor peft saves for ``adapter``, keyed by the model's parameter/buffer name."""
    from peft import get_peft_model_state_dict

    if adapter not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter!r}; it has {list(model.peft_config)}")
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    owners: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, t in named:
        if t.numel():
            owners.setdefault(_storage_key(t), []).append((name, t))
    found: dict[str, AdapterTensor] = {}
    for key, t in state.items():
        if not t.numel():
            continue
        cands = owners.get(_storage_key(t), [])
        if len(cands) > 1:  # shared storage: the one under the adapter's name
            cands = [c for c in cands if adapter in c[0].split(".")] or cands[:1]
        if not cands:
            raise RuntimeError(
                f"peft lists tensor {key!r} of adapter {adapter!r}; it is not in the model"
            )
        name, tensor = cands[0]
        found[name] = AdapterTensor(key, name, tensor, _kind(name, adapter))
    return found


def select(
    model: nn.Module, param_filter: ParamFilter | None = None, adapter: str | None = None
) -> Selection:
    """The parameters an averager averages.

    Default: for a model with peft adapters, every trainable tensor of the live adapter
    (``adapter``, or the one active adapter); for any other module, every trainable parameter.
    ``param_filter(name, param)`` chooses among all the model's parameters instead.
    """
    named = list(model.named_parameters())
    tensors: dict[str, AdapterTensor] = {}
    if _active_adapters(model) is not None:
        adapter = adapter if adapter is not None else active_adapter(model)
        tensors = adapter_tensors(model, adapter)
    elif adapter is not None:
        raise ValueError(f"adapter={adapter!r} needs a model with peft adapters")
    if param_filter is not None:
        params = [(n, p) for n, p in named if param_filter(n, p)]
    elif tensors:
        params = [(n, p) for n, p in named if n in tensors and p.requires_grad]
    else:
        params = [(n, p) for n, p in named if p.requires_grad]
    chosen = {n for n, _ in params}
    left_out = [n for n, p in named if p.requires_grad and n not in chosen]
    return Selection(params, adapter, tensors, left_out)


def add_teacher_adapter(
    model: nn.Module, selection: Selection, teacher_adapter: str
) -> tuple[dict[str, nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Add (or reuse) a frozen adapter ``teacher_adapter`` with the live adapter's config.

    Returns the teacher's twin of every averaged parameter (keyed by the live name) and the
    (source, twin) pairs of the live adapter's other tensors (not averaged: copied once by the
    caller). The new adapter is neither active nor trainable; nothing else in the model changes.
    """
    if not is_peft_model(model):
        raise TypeError("teacher_adapter needs a peft model (PeftModel) to add the adapter to")
    live = selection.adapter
    if teacher_adapter == live:
        raise ValueError(f"teacher_adapter must differ from the live adapter {live!r}")
    outside = selection.outside_adapter()
    if outside:
        raise ValueError(
            f"a teacher adapter can hold only tensors of adapter {live!r}, and {len(outside)} "
            f"averaged parameters are not (e.g. {outside[:2]}): leave them out of param_filter, "
            "or create the averager without teacher_adapter"
        )
    if teacher_adapter not in model.peft_config and distributed.has_dtensor_parameters(model):
        raise ValueError(
            f"cannot add teacher adapter {teacher_adapter!r} to a sharded (FSDP2) model: its "
            "tensors would not be sharded; create the averager, or add the adapter, before "
            "fully_shard"
        )
    flags = {id(p): p.requires_grad for p in model.parameters()}
    active = list(model.active_adapters)
    if teacher_adapter not in model.peft_config:
        config = copy.deepcopy(model.peft_config[live])
        config.inference_mode = True
        model.add_adapter(teacher_adapter, config)
    by_key = {t.key: t for t in adapter_tensors(model, teacher_adapter).values()}
    twins: dict[str, nn.Parameter] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    averaged = {n for n, _ in selection.params}
    for name, live_t in selection.adapter_tensors.items():
        twin = by_key.get(live_t.key)
        if twin is None or twin.tensor.shape != live_t.tensor.shape:
            raise ValueError(
                f"teacher adapter {teacher_adapter!r} has no tensor matching {name} "
                f"(peft key {live_t.key!r}); was it created with another config?"
            )
        if name in averaged:
            twins[name] = twin.tensor
        else:
            copies.append((live_t.tensor, twin.tensor))
    if list(model.active_adapters) != active:
        model.set_adapter(active[0])  # the PeftModel's own record and its layers
    for p in model.parameters():
        want = flags.get(id(p))
        if want is not None and p.requires_grad != want:
            p.requires_grad_(want)
    for t in twins.values():
        t.requires_grad_(False)
    return twins, copies


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
        sub = os.path.join(save_directory, adapter)
        for f in os.listdir(sub):
            shutil.move(os.path.join(sub, f), os.path.join(save_directory, f))
        os.rmdir(sub)
