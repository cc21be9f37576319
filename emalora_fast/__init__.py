"""emalora-fast: fused EMA/BEMA averaging of LoRA adapters and streaming distillation losses.

>>> from emalora_fast import BEMA
>>> avg = BEMA(peft_model)          # after each optimizer step: avg.update()
"""

from ._dispatch import BackendUnavailableError
from .averager import BEMA, EMA
from .schedules import bema_coefficients, ema_decay

__version__ = "0.1.0"

__all__ = [
    "BEMA",
    "EMA",
    "BackendUnavailableError",
    "bema_coefficients",
    "ema_decay",
]
