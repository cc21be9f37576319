"""TRL integration: drop-ins at TRL's own hooks (needs ``pip install 'emalora-fast[trl]'``).

Importing this package imports trl; ``import emalora_fast`` never does.

- Losses (:mod:`.losses`): :func:`generalized_jsd_loss` (GKD, GOLD) and
  :func:`chunked_divergence_loss` (DistillationTrainer) computed by the streamed kernels;
  :func:`use_streamed_losses` switches a trainer to them (SDFT/SDPO's ``distillation_mode``
  losses too: :mod:`.self_distillation`).
- The SDFT/SDPO EMA teacher (:mod:`.teacher`): :class:`FusedAdapterEMACallback`
  (``PEFTAdapterEMACallback``'s signature) and :func:`fused_ema_teacher` (the trainer class).
- TR-DPO under PEFT (:mod:`.dpo`): :func:`sync_ref_adapter` keeps DPO's "ref" adapter as the
  mixup average of the policy adapter.
- :class:`BEMACallback` (:mod:`.bema`): ``trl.BEMACallback``'s signature, also on a peft model.
"""

from .bema import BEMACallback
from .dpo import SyncRefAdapterCallback, sync_ref_adapter
from .losses import (
    chunked_divergence_loss,
    generalized_jsd_loss,
    gold_generalized_jsd_loss,
    use_streamed_losses,
)
from .teacher import FusedAdapterEMACallback, fused_ema_teacher

__all__ = [
    "BEMACallback",
    "FusedAdapterEMACallback",
    "SyncRefAdapterCallback",
    "fused_ema_teacher",
    "chunked_divergence_loss",
    "generalized_jsd_loss",
    "sync_ref_adapter",
    "gold_generalized_jsd_loss",
    "use_streamed_losses",
]
