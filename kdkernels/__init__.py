"""kdkernels: fused knowledge-distillation losses for PyTorch (C++, CUDA and Triton kernels, pure-PyTorch reference),
and a distillation toolkit on top of them (:mod:`kdkernels.distill`).

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
from kdkernels.contrastive_losses import (crd_loss, crd_normalizers, crd_update_memory_, sample_contrast_indices,
                                          sample_other_class_indices)
from kdkernels.soft_label_losses import label_smoothing_loss, tf_kd_reg_loss, tf_nkd_loss, wsl_loss, zipf_ls_loss
from kdkernels.feature_losses import (ab_loss, at_loss, fitnet_loss, fsp_loss, ft_loss, nst_loss, ofd_loss,
                                      ofd_margins, vid_loss)
from kdkernels.ranking_losses import bdkd_loss, darkrank_loss, irg_loss
from kdkernels.ensemble_losses import (byot_loss, camkd_feature_loss, camkd_loss, camkd_weights, ensemble_kd_loss,
                                       soft_cross_entropy_loss)
from kdkernels import nn

__all__ = [
    "__version__", "build_info", "available_backends", "BackendUnavailableError", "nn",
    # fused kernels
    "kd_loss", "dkd_loss", "nkd_loss", "dist_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "sp_loss",
    "pkt_loss", "cc_loss", "bake_loss", "bake_targets", "crd_loss", "crd_normalizers", "crd_update_memory_",
    "sample_contrast_indices", "sample_other_class_indices",
    # reference implementations (no fused kernel yet)
    "label_smoothing_loss", "tf_kd_reg_loss", "tf_nkd_loss", "zipf_ls_loss", "wsl_loss",
    "fitnet_loss", "at_loss", "nst_loss", "fsp_loss", "ofd_margins", "ofd_loss", "vid_loss", "ab_loss", "ft_loss",
    "irg_loss", "darkrank_loss", "bdkd_loss", "soft_cross_entropy_loss", "ensemble_kd_loss", "camkd_weights",
    "camkd_loss", "camkd_feature_loss", "byot_loss",
]
