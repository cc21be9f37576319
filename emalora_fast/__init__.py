"""emalora-fast."""

from .loss import DistillationLoss, distillation_loss

__all__ = ["DistillationLoss", "distillation_loss"]
