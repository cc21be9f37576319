"""emalora-fast."""

from .fused_linear import FusedLinearDistillationLoss, fused_linear_distillation_loss
from .loss import DistillationLoss, distillation_loss

__all__ = [
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "distillation_loss",
    "fused_linear_distillation_loss",
]
