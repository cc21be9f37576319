"""A kernel launch as data, and the device facts a launcher's choices depend on.

Every launcher of this package builds a :class:`Launch` (kernel, grid, arguments, compile-time
constants, warps, stages) with a ``*_launch`` function and then calls it. The compile check
(:mod:`emalora_fast.kernels.compile_check`) calls the same ``*_launch`` functions on meta tensors
with a :class:`Target` standing for an H100 or an A100, and compiles what they return ahead of
time: what it checks is what a real launch would compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    """What a launcher may tune for: ``arch`` 0 means Triton's interpreter (small tiles)."""

    arch: int  # compute capability as 10 * major + minor (90: H100/H200, 80: A100); 0: interpreter
    sms: int  # streaming multiprocessors


INTERPRETER = Target(arch=0, sms=2)
H100 = Target(arch=90, sms=132)
A100 = Target(arch=80, sms=108)


def mix_logs(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)) of an interior JSD weight 0 < beta < 1, else (0, 0) (unused)."""
    if 0.0 < beta < 1.0:
        return math.log(beta), math.log1p(-beta)
    return 0.0, 0.0


def check_labels(labels: torch.Tensor | None, n: int) -> None:
    """Raise unless ``labels`` is None or a contiguous int64 tensor of shape [n]."""
    if labels is not None and (
        labels.dtype != torch.int64 or labels.shape != (n,) or labels.stride(0) != 1
    ):
        raise ValueError("labels must be a contiguous int64 tensor of shape [N]")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(arch=10 * props.major + props.minor, sms=props.multi_processor_count)


def target_of(device: torch.device) -> Target:
    """The target of a launch on ``device`` (queried once per CUDA device, at the first launch)."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``."""

    kernel: Any  # a triton JITFunction (or the interpreter's stand-in)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int | None = None  # None: Triton's default

    @property
    def options(self) -> dict[str, int]:
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)
