"""kdkernels: fused knowledge-distillation losses for PyTorch (C++, CUDA and Triton kernels, pure-PyTorch reference).

    import kdkernels
    loss = kdkernels.kd_loss(student_logits, teacher_logits, temperature=4.0)
"""
from kdkernels._version import __version__
from kdkernels._extension import build_info
from kdkernels.backends import BackendUnavailableError, available_backends
from kdkernels import ops  # noqa: F401  (registers fake kernels and autograd for the compiled ops)
from kdkernels.losses import kd_loss
from kdkernels.decoupled_losses import dkd_loss, nkd_loss
from kdkernels.pearson_losses import dist_loss
from kdkernels.relation_losses import cc_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss
from kdkernels.bake import bake_loss, bake_targets
from kdkernels.contrastive_losses import crd_loss, crd_normalizers, crd_update_memory_
from kdkernels import nn

__all__ = ["__version__", "kd_loss", "dkd_loss", "nkd_loss", "dist_loss", "rkd_distance_loss", "rkd_angle_loss",
           "rkd_loss", "sp_loss", "pkt_loss", "cc_loss", "bake_loss", "bake_targets", "crd_loss", "crd_normalizers",
           "crd_update_memory_", "nn", "available_backends", "build_info", "BackendUnavailableError"]
from kdkernels.ensemble_losses import (byot_loss, camkd_feature_loss, camkd_loss, camkd_weights,  # noqa: E402
                                       ensemble_kd_loss, soft_cross_entropy_loss)
__all__ += ["soft_cross_entropy_loss", "ensemble_kd_loss", "camkd_weights", "camkd_loss", "camkd_feature_loss",
            "byot_loss"]
