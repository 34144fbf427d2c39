"""kdkernels: fused knowledge-distillation losses for PyTorch (C++, CUDA and Triton kernels, pure-PyTorch reference),
and a distillation toolkit on top of them (:mod:`kdkernels.distill`).

    import kdkernels
    loss = kdkernels.kd_loss(student_logits, teacher_logits, temperature=4.0)
"""
from kdkernels._version import __version__
from kdkernels._extension import build_info
from kdkernels import ops  # noqa: F401  (registers fake kernels and autograd for the compiled ops; decides backends)
from kdkernels.backends import BackendUnavailableError, available_backends
from kdkernels.losses import *  # noqa: F401,F403  (every public loss)
from kdkernels.losses import __all__ as _LOSSES
from kdkernels import nn

__all__ = ["__version__", "build_info", "available_backends", "BackendUnavailableError", "nn", *_LOSSES]
