"""Triton backend of kdkernels: one module per op family (``kdkernels.triton.<family>``).

This package deliberately imports nothing, so that ``import kdkernels`` never imports Triton. The family modules
import Triton themselves and are imported lazily by ``kdkernels/ops/<family>.py`` when the Triton backend is used.
On a machine without a GPU the kernels run only under ``TRITON_INTERPRET=1``, which must be set before the family
module is imported (Triton reads it when a kernel is decorated).
"""
