"""Triton kernels of emalora-fast and their launchers.

This subpackage is the only place that imports triton. On CPU tensors the kernels run under
Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported.
"""
