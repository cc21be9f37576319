"""emalora-fast: fused EMA/BEMA averaging of LoRA adapters and streaming distillation losses.

>>> from emalora_fast import BEMA
>>> avg = BEMA(peft_model)          # after each optimizer step: avg.update()
"""

from ._dispatch import BackendUnavailableError
from .averager import BEMA, EMA
from .fused_linear import FusedLinearDistillationLoss, fused_linear_distillation_loss
from .loss import DistillationLoss, distillation_loss
from .schedules import bema_coefficients, ema_decay
from .self_distill import SelfDistiller

__version__ = "0.1.0"

__all__ = [
    "BEMA",
    "EMA",
    "BackendUnavailableError",
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "SelfDistiller",
    "bema_coefficients",
    "distillation_loss",
    "ema_decay",
    "fused_linear_distillation_loss",
]
