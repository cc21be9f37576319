"""The averager under data parallelism: DDP, FSDP2 (``fully_shard``) and their wrappers.

- **DDP** replicates the LoRA weights and all-reduces their gradients, so every rank takes the
  same optimizer steps and its averager keeps the same shadows with no communication. Create the
  averager on the wrapped model (or :func:`unwrap_model` of it) *after* wrapping: DDP broadcasts
  rank 0's weights when it wraps the module.
- **FSDP2** turns parameters into DTensors. The averager averages each rank's local shard in
  place (one launch per rank and group, no collective on update); ``averaged_state_dict()``
  returns DTensors placed like the parameters, and saving a peft adapter gathers the adapter's
  tensors once, on all ranks, and writes them on rank 0. An averager created before
  ``fully_shard`` notices the move on its next update and keeps only its rank's part of the
  state.

Every helper here is cheap when no distributed feature is in use: modules that were never
imported cannot have wrapped or sharded anything.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "unwrap_model",
    "is_dtensor",
    "has_dtensor_parameters",
    "shard_like",
    "reshard_fsdp",
    "full_tensors",
    "adapter_full_state_dict",
    "is_main_process",
    "barrier",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel, FSDP (1), DeepSpeed and ``torch.compile``
    wrappers, nested in any order (what ``accelerator.unwrap_model`` returns).

    FSDP2's ``fully_shard`` does not wrap (it changes the module's class in place): such a module
    is returned as it is.
    """
    wrappers: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers.append(FullyShardedDataParallel)
    compiled = ()
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.eval_frame import OptimizedModule

        compiled = (OptimizedModule,)
    while True:
        if isinstance(model, tuple(wrappers)) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 / tensor-parallel parameter)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a tensor of ``param``'s global shape) when split like the
    DTensor ``param``; no communication.

    Returns:
        a new tensor of ``param.to_local()``'s shape and ``full``'s dtype, on ``param``'s device.
    """
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(full.shape)} is not the global shape {tuple(param.shape)}")
    local = distribute_tensor(
        full.detach().to(param.device), param.device_mesh, param.placements, src_data_rank=None
    ).to_local()
    return local.clone()


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``; a walk of its module tree."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_fsdp(model: nn.Module, modules: list[nn.Module] | None = None) -> bool:
    """Register the sharded parameters of every FSDP2 module of ``model`` again.

    FSDP2 registers unsharded copies between a forward and the end of the backward (the root
    module keeps them after a forward, an evaluation forward included). Writes into the shards
    are seen by the next forward only once those copies are dropped. A no-op for modules that
    are sharded already.

    Args:
        model: the model.
        modules: its :func:`fsdp_modules`, when the caller keeps them (saves the walk).
    Returns:
        whether ``model`` holds FSDP2 modules at all.
    """
    mods = fsdp_modules(model) if modules is None else modules
    for m in mods:
        m.reshard()
    return bool(mods)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather every DTensor of ``tensors`` into a full tensor (a collective: call it on all
    ranks with the same keys in the same order); other tensors pass through."""
    return {k: v.full_tensor() if is_dtensor(v) else v for k, v in tensors.items()}


def adapter_full_state_dict(
    model: nn.Module, adapter: str, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that belong to peft adapter ``adapter`` (names
    holding ``.<adapter>.``), gathered into full tensors: a collective, call it on all ranks.

    Only these tensors are gathered, never the base model's.
    """
    pattern = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    keep = keep or (lambda k: pattern.search(k) is not None)
    with torch.no_grad():
        return full_tensors({k: v for k, v in model.state_dict().items() if keep(k)})


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the default process group, or True without one."""
    return not _initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialized, else nothing."""
    if _initialized():
        torch.distributed.barrier()
