"""Test configuration: run the Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before kdkernels (and its Triton
modules) are imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

