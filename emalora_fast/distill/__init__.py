"""The distillation losses and self-distillation.

``loss`` is the logits loss (forward/reverse KL, JSD, streamed over the vocabulary; C++, Triton
and chunked-torch backends behind one autograd Function), ``fused_linear`` the form that starts
from hidden states and never materializes logits (its chunked and Triton paths in
``fused_linear_paths``), ``checks`` the
argument checks and reductions both share, and ``self_distill`` the ``SelfDistiller`` that takes
the averaged adapter as teacher. The kernels are ``emalora_fast.kernels.distill_loss`` /
``fused_linear`` (Triton) and the ``_C`` op (C++).
"""
