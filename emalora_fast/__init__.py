"""emalora-fast: fused EMA/BEMA averaging of LoRA adapters and streaming distillation losses.

>>> from emalora_fast import BEMA
>>> avg = BEMA(peft_model)          # after each optimizer step: avg.update()
"""

from . import _moved
from ._dispatch import BackendUnavailableError
from .averaging.ema import BEMA, EMA
from .averaging.posthoc import PostHocEMA, ReconstructionWarning, SnapshotWriteError
from .averaging.schedules import bema_coefficients, ema_decay
from .distill.fused_linear import FusedLinearDistillationLoss, fused_linear_distillation_loss
from .distill.loss import DistillationLoss, distillation_loss
from .distill.self_distill import SelfDistiller

__version__ = "0.2.0"
_moved.install()  # the 0.1 module paths (emalora_fast.averager, ...), deprecated

# The integrations import transformers / Lightning: loaded on first use.
_LAZY = {
    "AdapterWeightAveraging": "integrations.lightning",
    "AveragerCallback": "integrations.transformers",
    "AveragingTrainer": "integrations.transformers",
    "ForgettingMonitor": "integrations.forgetting",
    "SelfDistillationTrainer": "integrations.transformers",
    "forgetting_metrics": "integrations.forgetting",
    "get_ema_multi_avg_fn": "integrations.swa_utils",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterWeightAveraging",
    "AveragerCallback",
    "AveragingTrainer",
    "BEMA",
    "EMA",
    "BackendUnavailableError",
    "DistillationLoss",
    "ForgettingMonitor",
    "FusedLinearDistillationLoss",
    "PostHocEMA",
    "ReconstructionWarning",
    "SelfDistillationTrainer",
    "SelfDistiller",
    "SnapshotWriteError",
    "bema_coefficients",
    "distillation_loss",
    "ema_decay",
    "forgetting_metrics",
    "fused_linear_distillation_loss",
    "get_ema_multi_avg_fn",
]
