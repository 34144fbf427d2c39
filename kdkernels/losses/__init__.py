"""The public functional losses, one module per fused op family and one per category of unfused losses.

Fused families: :mod:`~kdkernels.losses.kd` (KD, reverse/symmetric KL, JSD, top-k teachers),
:mod:`~kdkernels.losses.linear_kd` (LLM distillation from hidden states and lm_head weights; reference slice),
:mod:`~kdkernels.losses.decoupled` (DKD, NKD), :mod:`~kdkernels.losses.dist` (DIST),
:mod:`~kdkernels.losses.relation` (RKD, SP, PKT, CC; and IRG), :mod:`~kdkernels.losses.contrastive` (CRD),
:mod:`~kdkernels.losses.bake` (BAKE). Unfused categories: :mod:`~kdkernels.losses.response`,
:mod:`~kdkernels.losses.soft_label`, :mod:`~kdkernels.losses.feature`, :mod:`~kdkernels.losses.attention`,
:mod:`~kdkernels.losses.ranking`, :mod:`~kdkernels.losses.ensemble`, :mod:`~kdkernels.losses.online`,
:mod:`~kdkernels.losses.online_feature`, :mod:`~kdkernels.losses.self_distillation`,
:mod:`~kdkernels.losses.self_supervised`, :mod:`~kdkernels.losses.generative`,
:mod:`~kdkernels.losses.layer_assignment`.
Every name here is also a top-level ``kdkernels`` name, and has an ``nn.Module`` in :mod:`kdkernels.nn`.
"""
from kdkernels.losses.kd import kd_loss
from kdkernels.losses.linear_kd import linear_kd_loss
from kdkernels.losses.decoupled import dkd_loss, nkd_loss
from kdkernels.losses.dist import dist_loss
from kdkernels.losses.relation import (cc_loss, irg_loss, manifold_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss,
                                      rkd_loss, sp_loss)
from kdkernels.losses.relation import (category_structure_loss, mhgd_loss, refilled_classifier_loss,
                                       refilled_triplet_loss)
from kdkernels.losses.contrastive import (crd_loss, crd_normalizers, crd_update_memory_, sample_contrast_indices,
                                          sample_other_class_indices)
from kdkernels.losses.contrastive import crcd_loss, crcd_normalizers
from kdkernels.losses.bake import bake_loss, bake_targets
from kdkernels.losses.response import (bdkd_loss, deit_loss, feature_normalized_kd_loss, logit_standardized_kd_loss,
                                      mmt_loss, soft_cross_entropy_loss, two_temperature_kd_loss, wsl_loss)
from kdkernels.losses.cross_modal import privileged_loss, supervision_transfer_loss
from kdkernels.losses.soft_label import label_smoothing_loss, tf_kd_reg_loss, tf_nkd_loss, zipf_ls_loss
from kdkernels.losses.feature import (ab_loss, cd_loss, cwd_loss, fitnet_loss, fsp_loss, ft_loss, hkd_loss,
                                      jacobian_matching_loss, kd_svd_loss, nst_loss, ofd_loss, ofd_margins,
                                      pad_l2_loss, tofd_loss, vid_loss)
from kdkernels.losses.attention import at_loss, ttkd_loss
from kdkernels.losses.layer_assignment import afd_loss, l2t_ww_loss, semckd_loss
from kdkernels.losses.ranking import darkrank_loss
from kdkernels.losses.ensemble import camkd_feature_loss, camkd_loss, camkd_weights, ensemble_kd_loss, one_loss
from kdkernels.losses.online import mcl_loss, pcl_loss
from kdkernels.losses.self_distillation import (byot_loss, ddgsd_loss, dks_loss, mixskd_loss, sad_loss,
                                               snapshot_distillation_loss)
from kdkernels.losses.self_supervised import (byol_loss, dino_loss, hsakd_head_loss, hsakd_joint_labels,
                                              hsakd_loss, moco_loss, sdssl_loss, simsiam_loss, softmax_mse_loss,
                                              sskd_head_loss, sskd_loss)
from kdkernels.losses.generative import dafl_generator_loss, gan_discriminator_loss, gan_generator_loss
from kdkernels.losses.data_free import (adi_competition_loss, deepinversion_feature_loss, deepinversion_prior_loss,
                                        dfad_loss, zskd_class_similarity, zskd_impression_loss)
from kdkernels.losses.online_feature import lsgan_discriminator_loss, lsgan_generator_loss, oec_kd_loss

__all__ = [
    # fused kernels
    "kd_loss", "linear_kd_loss", "dkd_loss", "nkd_loss", "dist_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "sp_loss",
    "pkt_loss", "cc_loss", "crd_loss", "crd_normalizers", "crd_update_memory_", "sample_contrast_indices",
    "sample_other_class_indices", "bake_loss", "bake_targets",
    # composed of torch ops (no fused kernel yet)
    "soft_cross_entropy_loss", "wsl_loss", "bdkd_loss", "two_temperature_kd_loss", "logit_standardized_kd_loss",
    "feature_normalized_kd_loss", "mmt_loss", "deit_loss",
    "privileged_loss", "supervision_transfer_loss",
    "softmax_mse_loss", "byol_loss", "simsiam_loss", "moco_loss", "dino_loss", "sdssl_loss", "sskd_head_loss",
    "sskd_loss", "hsakd_joint_labels",
    "hsakd_head_loss", "hsakd_loss",
    "gan_generator_loss",
    "gan_discriminator_loss", "lsgan_generator_loss", "lsgan_discriminator_loss", "dafl_generator_loss", "dfad_loss", "deepinversion_feature_loss",
    "deepinversion_prior_loss", "adi_competition_loss", "zskd_impression_loss", "zskd_class_similarity",
    "label_smoothing_loss", "tf_kd_reg_loss", "tf_nkd_loss",
    "crcd_loss", "crcd_normalizers",
    "zipf_ls_loss", "fitnet_loss", "nst_loss", "fsp_loss", "ofd_margins", "ofd_loss", "vid_loss", "ab_loss",
    "ft_loss", "cwd_loss", "cd_loss", "pad_l2_loss", "kd_svd_loss", "jacobian_matching_loss", "tofd_loss", "hkd_loss",
    "semckd_loss", "afd_loss", "l2t_ww_loss",
    "at_loss", "ttkd_loss", "irg_loss", "manifold_loss", "category_structure_loss", "mhgd_loss",
    "refilled_triplet_loss", "refilled_classifier_loss", "darkrank_loss",
    "ensemble_kd_loss", "camkd_weights", "camkd_loss", "camkd_feature_loss", "one_loss", "pcl_loss", "mcl_loss",
    "oec_kd_loss", "byot_loss", "sad_loss", "dks_loss", "ddgsd_loss", "mixskd_loss", "snapshot_distillation_loss",
]
