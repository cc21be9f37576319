"""Backend choice for every op: ``"auto" | "triton" | "cpp" | "torch"``.

``auto`` picks Triton for CUDA tensors, the C++ op of ``emalora_fast._C`` for CPU tensors where the
extension is built, and the pure-PyTorch path otherwise. Imports are lazy and nothing here queries
a GPU; forcing a backend that cannot run raises :class:`BackendUnavailableError` with the reason
and the original import error.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "triton", "cpp", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpp", "torch")

logger = logging.getLogger("emalora_fast")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here."""


@functools.cache
def _try_import(name: str) -> tuple[ModuleType | None, BaseException | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # any import failure, compiled-extension errors included
        return None, exc


def load_cpp() -> ModuleType:
    """Import ``emalora_fast._C`` (registers ``torch.ops.emalora_fast``) or explain why not."""
    mod, err = _try_import("emalora_fast._C")
    if mod is None:
        raise BackendUnavailableError(
            "backend 'cpp' needs the compiled extension emalora_fast._C, which failed to import "
            f"({type(err).__name__}: {err}); build it with "
            "`pip install --no-build-isolation -e .`"
        ) from err
    return mod


def load_triton(module: str) -> ModuleType:
    """Import the Triton kernel module ``emalora_fast.kernels.<module>`` or explain why not."""
    mod, err = _try_import(f"emalora_fast.kernels.{module}")
    if mod is None:
        raise BackendUnavailableError(
            f"backend 'triton' needs the triton package, and importing the kernels failed "
            f"({type(err).__name__}: {err}); install triton (a CUDA build of torch ships it)"
        ) from err
    return mod


def cpp_available() -> bool:
    return _try_import("emalora_fast._C")[0] is not None


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _log_choice(op: str, backend: str, device: str) -> None:
    logger.debug("emalora_fast: %s on %s uses backend %r", op, device, backend)


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend for ``op`` on ``device``; raises when a forced one cannot run.

    Args:
        backend: one of :data:`BACKENDS`.
        device: the device of the op's tensors.
        op: the op's name, for messages and the debug log.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            chosen = "triton"
            load_triton(op)
        elif device.type == "cpu" and cpp_available():
            chosen = "cpp"
        else:
            chosen = "torch"
    else:
        chosen = backend
        if chosen == "triton":
            if not _triton_runs_on(device):
                raise BackendUnavailableError(
                    f"backend 'triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                    f"got tensors on {device}"
                )
            load_triton(op)
        elif chosen == "cpp":
            if device.type != "cpu":
                raise BackendUnavailableError(
                    f"backend 'cpp' runs on CPU tensors, got tensors on {device}"
                )
            load_cpp()
    _log_choice(op, chosen, str(device))
    return chosen
