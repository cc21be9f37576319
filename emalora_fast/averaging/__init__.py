"""The averager: EMA, BEMA, K profiles and post-hoc EMA of an adapter's tensors.

``ema`` (EMA, BEMA: the schedules and what is averaged) and ``posthoc`` (PostHocEMA, with its
least-squares maths in ``posthoc_math`` and its snapshot writer in ``posthoc_io``) build on
``core`` (selection of the tensors, flat fp32 state per (device, dtype) group, one kernel launch
per group and update), ``use`` (reading, swapping, copying and exporting the average) and
``state`` (save/restore). ``schedules`` holds the decay/BEMA formulas; ``peft_utils`` finds the
adapter's tensors through peft's public API and adds the teacher adapter. The kernels are
``emalora_fast.kernels.averager`` (Triton) and the ``_C`` op (C++); ``emalora_fast.reference``
holds the float64 formulas.
"""
