"""``trl.BEMACallback`` on the fused averager, for plain models and peft models alike.

TRL's ``BEMACallback`` copies the whole model (``type(model)(model.config)``, which fails for a
``PeftModel``) and updates it with a per-tensor loop. :class:`BEMACallback` here has the same
arguments and defaults and the same schedule, computed by :class:`emalora_fast.BEMA` in one
launch, and writes ``output_dir/bema`` at train end: a peft adapter for a peft model
(``PeftModel.from_pretrained`` loads it), the full model (``save_pretrained``) otherwise.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import TrainerCallback

from ... import BEMA
from ...distributed import unwrap_model
from ._checks import check_steps

__all__ = ["BEMACallback"]


class BEMACallback(TrainerCallback):
    """Bias-corrected EMA (arXiv 2508.00180) of the trained weights, TRL's callback's schedule.

    At global step t (t > ``update_after``, every ``update_freq`` steps)::

        beta_t  = max((lag + multiplier t) ** -ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier t) ** -bias_power
        ema    <- (1 - beta_t) ema + beta_t theta_t
        bema    = ema + alpha_t (theta_t - theta_0)

    theta_0 and ema are the weights at train begin, reset to theta_t at ``t == update_after``.
    The tensors are the trainable ones: a peft model's adapter (LoRA, DoRA, ``modules_to_save``
    ...), every trainable parameter of a plain model. :attr:`averager` (an
    :class:`emalora_fast.BEMA`) holds the state; ``averager.averaged_state_dict()`` gives bema.

    ``device`` is where the BEMA buffers live, as in TRL. When it is the weights' device the
    averager updates in place from the live weights (no model copy at all). Otherwise (TRL's
    default ``"cpu"`` while training on a GPU, to save device memory) a copy of the model is
    kept on ``device``, as TRL keeps one; at each update step the trainable weights are copied
    into it (one multi-tensor copy) and the averager runs there.

    Args:
        update_freq: phi, update every this many steps (>= 1). TRL's default 400 is kept;
            the fused update is cheap enough to use 1.
        ema_power: kappa. bias_power: eta. lag: rho. update_after: tau (burn-in steps).
        multiplier: gamma. min_ema_multiplier: the lower bound of beta.
        device: where the buffers live (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        backend: the averager's backend.
    """

    def __init__(
        self,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "cpu",
        *,
        backend: str = "auto",
    ) -> None:
        check_steps("update_freq", update_freq)
        if not isinstance(update_after, int) or isinstance(update_after, bool) or update_after < 0:
            raise ValueError(f"update_after must be an integer >= 0, got {update_after!r}")
        self.update_freq = update_freq
        self.ema_power = ema_power
        self.bias_power = bias_power
        self.lag = lag
        self.update_after = update_after
        self.multiplier = multiplier
        self.min_ema_multiplier = min_ema_multiplier
        self.device = torch.device(device)
        self.backend = backend
        self.averager: BEMA | None = None
        self.running_model = None  # the copy on `device`, when it is not the weights' device
        self._live: list[torch.Tensor] = []
        self._mirror: list[torch.Tensor] = []
        # The averager's own checks, before training starts.
        BEMA(torch.nn.Linear(1, 1), **self._hyperparameters(), backend="torch")

    def _hyperparameters(self) -> dict:
        return {
            "ema_power": self.ema_power,
            "bias_power": self.bias_power,
            "lag": self.lag,
            "multiplier": self.multiplier,
            "update_after": self.update_after,
            "update_every": self.update_freq,
            "min_ema_multiplier": self.min_ema_multiplier,
        }

    @staticmethod
    def _same_device(a: torch.device, b: torch.device) -> bool:
        return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("BEMACallback: the model has no trainable parameters to average")
        target = model
        if not self._same_device(trainable[0].device, self.device):
            self.running_model = copy.deepcopy(model).to(self.device)
            target = self.running_model
            self._live = trainable
            self._mirror = [p for p in target.parameters() if p.requires_grad]
        self.averager = BEMA(target, **self._hyperparameters(), backend=self.backend)

    def _is_update_step(self, t: int) -> bool:
        s = t - self.update_after
        return s == 0 or (s > 0 and s % self.update_freq == 0)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        t = state.global_step
        if self.averager is None or not self._is_update_step(t):
            return
        if self._mirror:
            torch._foreach_copy_(self._mirror, self._live)
        self.averager.update(step=t)

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        if self.averager is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, "bema")
        target = self.averager.model
        if hasattr(target, "peft_config"):
            self.averager.save_pretrained(folder)
        else:
            with self.averager.swapped():
                target.save_pretrained(folder)
