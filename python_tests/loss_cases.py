"""One small valid call of every public loss: the inputs (per-call tensors) by parameter name, for the tests that run
every loss the same way (modules, argument checks, reductions)."""
import torch

B, C = 6, 7


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(*shape, seed):
    return torch.nn.functional.normalize(_randn(*shape, seed=seed), dim=-1)


def _labels(seed=0):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def _logits_pair():
    return {"student_logits": _randn(B, C, seed=1), "teacher_logits": _randn(B, C, seed=2) * 2}


def _features_pair(shape_s=(B, 5), shape_t=(B, 4)):
    return {"student": _randn(*shape_s, seed=3), "teacher": _randn(*shape_t, seed=4)}


def _maps(channels=3, size=4, seed=5):
    return _randn(B, channels, size, size, seed=seed)


def _irg_side(seed):
    return [_randn(B, 4, 4, 4, seed=seed), _randn(B, 8, 2, 2, seed=seed + 1), _randn(B, 5, seed=seed + 2),
            _randn(B, C, seed=seed + 3)]


# function name -> builder of its inputs {parameter: value}
INPUTS = {
    "kd_loss": lambda: _logits_pair(),
    "linear_kd_loss": lambda: {"student_hidden": _randn(B, 5, seed=1), "student_weight": _randn(C, 5, seed=2),
                               "teacher_hidden": _randn(B, 4, seed=3), "teacher_weight": _randn(C + 2, 4, seed=4)},
    "dkd_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "nkd_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "dist_loss": lambda: _logits_pair(),
    "rkd_distance_loss": lambda: _features_pair(),
    "rkd_angle_loss": lambda: _features_pair(),
    "rkd_loss": lambda: _features_pair(),
    "sp_loss": lambda: _features_pair(),
    "pkt_loss": lambda: _features_pair(),
    "cc_loss": lambda: _features_pair(),
    "irg_loss": lambda: {"student": _irg_side(10), "teacher": _irg_side(20)},
    "manifold_loss": lambda: {"student_tokens": [_randn(B, 5, 3, seed=1), _randn(B, 5, 3, seed=2)],
                              "teacher_tokens": [_randn(B, 5, 4, seed=3), _randn(B, 5, 4, seed=4)]},
    "category_structure_loss": lambda: {"student_features": _maps(seed=8), "teacher_features": _maps(seed=9),
                                        "labels": _labels(), **_logits_pair()},
    "mhgd_loss": lambda: {"student_attention": _randn(3, B, B, seed=1), "teacher_attention": _randn(3, B, B, seed=2)},
    "refilled_triplet_loss": lambda: {"student_embed": _randn(B, 5, seed=3), "teacher_embed": _randn(B, 4, seed=4),
                                      "labels": torch.tensor([0, 1, 0, 1, 2, 0])},
    "refilled_classifier_loss": lambda: {"student_logits": _randn(B, C, seed=1), "teacher_embed": _randn(B, 4, seed=4),
                                         "labels": _labels()},
    "bake_loss": lambda: {"logits": _randn(B, C, seed=6), "features": _randn(B, 5, seed=7)},
    "soft_cross_entropy_loss": lambda: _logits_pair(),
    "two_temperature_kd_loss": lambda: _logits_pair(),
    "logit_standardized_kd_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "feature_normalized_kd_loss": lambda: {**_logits_pair(), "student_features": _randn(B, 6, seed=3)},
    "softmax_mse_loss": lambda: _logits_pair(),
    "byol_loss": lambda: {"prediction": _randn(B, 5, seed=1), "target": _randn(B, 5, seed=2)},
    "simsiam_loss": lambda: {"prediction": _randn(B, 5, seed=1), "target": _randn(B, 5, seed=2)},
    "moco_loss": lambda: {"query": _randn(B, 5, seed=1), "key": _randn(B, 5, seed=2),
                          "queue": torch.nn.functional.normalize(_randn(7, 5, seed=3), dim=1)},
    "dino_loss": lambda: {"student_outputs": _randn(4, B, 5, seed=1), "teacher_outputs": _randn(2, B, 5, seed=2),
                          "center": _randn(5, seed=3)},
    "sdssl_loss": lambda: {"predictions": _randn(3, B, 5, seed=1), "keys": _randn(B, 5, seed=2)},
    "sskd_head_loss": lambda: {"features": _randn(4 * 3, 5, seed=1)},
    "sskd_loss": lambda: {"student_logits": _randn(4 * 3, C, seed=1), "teacher_logits": _randn(4 * 3, C, seed=2) * 2,
                          "student_features": _randn(4 * 3, 5, seed=3), "teacher_features": _randn(4 * 3, 6, seed=4),
                          "labels": _labels()[:3]},
    "hsakd_head_loss": lambda: {"aux_logits": [_randn(4 * 3, 4 * C, seed=1), _randn(4 * 3, 4 * C, seed=2)],
                                "labels": _labels()[:3]},
    "hsakd_loss": lambda: {"student_logits": _randn(4 * 3, C, seed=1), "teacher_logits": _randn(4 * 3, C, seed=2),
                           "student_aux_logits": [_randn(4 * 3, 4 * C, seed=3)],
                           "teacher_aux_logits": [_randn(4 * 3, 4 * C, seed=4) * 2], "labels": _labels()[:3]},
    "gan_generator_loss": lambda: {"fake_logits": _randn(B, 1, seed=1)},
    "gan_discriminator_loss": lambda: {"real_logits": _randn(B, 1, seed=1), "fake_logits": _randn(B, 1, seed=2)},
    "lsgan_generator_loss": lambda: {"fake_scores": _randn(B, 1, 2, 2, seed=1).sigmoid()},
    "lsgan_discriminator_loss": lambda: {"real_scores": _randn(B, 1, 2, 2, seed=1).sigmoid(),
                                         "fake_scores": _randn(B, 1, 2, 2, seed=2).sigmoid()},
    "dafl_generator_loss": lambda: {"teacher_logits": _randn(B, C, seed=1), "teacher_features": _randn(B, 5, seed=2)},
    "dfad_loss": lambda: _logits_pair(),
    "deepinversion_feature_loss": lambda: {"features": [_maps(seed=1), _maps(channels=5, seed=2)],
                                           "running_means": [_randn(3, seed=3), _randn(5, seed=4)],
                                           "running_vars": [_randn(3, seed=5).exp(), _randn(5, seed=6).exp()]},
    "deepinversion_prior_loss": lambda: {"images": _maps(seed=1)},
    "adi_competition_loss": lambda: _logits_pair(),
    "zskd_impression_loss": lambda: {"teacher_logits": _randn(B, C, seed=1),
                                     "soft_targets": _randn(B, C, seed=2).softmax(1)},
    "wsl_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "privileged_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "supervision_transfer_loss": lambda: {"student_features": _maps(seed=5), "teacher_features": _maps(seed=6)},
    "deit_loss": lambda: {"class_logits": _randn(B, C, seed=1), "distillation_logits": _randn(B, C, seed=3),
                          "teacher_logits": _randn(B, C, seed=2) * 2, "labels": _labels()},
    "bdkd_loss": lambda: {"learner_logits": _randn(B, C, seed=1), "target_logits": _randn(B, C, seed=2)},
    "mmt_loss": lambda: {"logits_1": _randn(B, C, seed=1), "logits_2": _randn(B, C, seed=2),
                         "ema_logits_1": _randn(B, C, seed=3), "ema_logits_2": _randn(B, C, seed=4),
                         "labels": _labels()},
    "label_smoothing_loss": lambda: {"logits": _randn(B, C, seed=1), "labels": _labels()},
    "tf_kd_reg_loss": lambda: {"student_logits": _randn(B, C, seed=1), "labels": _labels()},
    "tf_nkd_loss": lambda: {"student_logits": _randn(B, C, seed=1), "labels": _labels()},
    "zipf_ls_loss": lambda: {"logits": _randn(B, C, seed=1), "dense_logits": _randn(B, 9, C, seed=8),
                             "labels": _labels()},
    "fitnet_loss": lambda: {"student_hint": _maps(seed=1), "teacher_hint": _maps(seed=2)},
    "at_loss": lambda: {"student": _maps(seed=1), "teacher": _maps(channels=5, seed=2)},
    "ttkd_loss": lambda: {"student_query": _maps(seed=1), "student_value": _maps(seed=2),
                          "teacher_map": _maps(seed=3)},
    "nst_loss": lambda: {"student": _maps(seed=1), "teacher": _maps(channels=5, seed=2)},
    "fsp_loss": lambda: {"student_features": [_maps(seed=1), _maps(seed=2)],
                         "teacher_features": [_maps(seed=3), _maps(seed=4)]},
    "ofd_loss": lambda: {"student": _maps(seed=1), "teacher": _maps(seed=2), "margin": -_randn(3, seed=3).abs()},
    "vid_loss": lambda: {"mean": _maps(seed=1), "teacher": _maps(seed=2), "log_scale": _randn(3, seed=3)},
    "ab_loss": lambda: {"student": _maps(seed=1), "teacher": _maps(seed=2)},
    "ft_loss": lambda: {"student_factor": _maps(seed=1), "teacher_factor": _maps(seed=2)},
    "cwd_loss": lambda: {"student_map": _maps(seed=1), "teacher_map": _maps(seed=2)},
    "cd_loss": lambda: {"student_features": _maps(seed=1), "teacher_features": _maps(seed=2)},
    "pad_l2_loss": lambda: {"student_feature": _randn(B, 5, seed=1), "teacher_feature": _randn(B, 5, seed=2),
                            "log_variance": _randn(B, 5, seed=3)},
    "jacobian_matching_loss": lambda: {"student_jacobian": _maps(seed=1), "teacher_jacobian": _maps(seed=2)},
    "tofd_loss": lambda: {"student_features": [_randn(B, 5, seed=1), _randn(B, 5, seed=2)],
                          "teacher_features": [_randn(B, 5, seed=3), _randn(B, 5, seed=4)],
                          "student_logits": [_randn(B, C, seed=5), _randn(B, C, seed=6)],
                          "teacher_logits": [_randn(B, C, seed=7), _randn(B, C, seed=8)], "labels": _labels(),
                          "link_weights": [_randn(5, 4, seed=9), _randn(5, 4, seed=10)]},
    "hkd_loss": lambda: {"student_features": [_randn(B, 5, seed=1), _maps(seed=2)],
                         "teacher_features": [_randn(B, 4, seed=3), _maps(channels=2, seed=4)],
                         "layer_weights": [1.0, 3.0]},
    "kd_svd_loss": lambda: {"student_features": [_maps(seed=1), _maps(channels=5, size=2, seed=2)],
                            "teacher_features": [_maps(seed=3), _maps(channels=5, size=2, seed=4)]},
    "semckd_loss": lambda: {"student_features": [[_maps(seed=1), _maps(channels=2, size=2, seed=2)]],
                            "teacher_features": [[_maps(seed=3), _maps(channels=2, size=2, seed=4)]],
                            "attention": _randn(B, 1, 2, seed=5).softmax(-1)},
    "afd_loss": lambda: {"student_features": [_maps(seed=1), _maps(channels=2, size=2, seed=2)],
                         "teacher_features": [_maps(channels=4, size=2, seed=3)],
                         "attention": _randn(B, 1, 2, seed=5).softmax(-1)},
    "l2t_ww_loss": lambda: {"student_features": [_maps(seed=1), _maps(seed=2)],
                            "teacher_features": [_maps(size=2, seed=3), _maps(seed=4)],
                            "channel_weights": [_randn(B, 3, seed=5).softmax(-1), _randn(B, 3, seed=6).softmax(-1)],
                            "pair_weights": [_randn(B, 1, seed=7).relu(), _randn(B, 1, seed=8).relu()]},
    "darkrank_loss": lambda: _features_pair(),
    "ensemble_kd_loss": lambda: {"student_logits": _randn(B, C, seed=1),
                                 "teacher_logits": [_randn(B, C, seed=2), _randn(B, C, seed=3)]},
    "camkd_loss": lambda: {"student_logits": _randn(B, C, seed=1),
                           "teacher_logits": [_randn(B, C, seed=2), _randn(B, C, seed=3)], "labels": _labels()},
    "camkd_feature_loss": lambda: {"student_features": [_randn(B, 5, seed=1), _randn(B, 5, seed=2)],
                                   "teacher_features": [_randn(B, 5, seed=3), _randn(B, 5, seed=4)],
                                   "teacher_logits_on_student": [_randn(B, C, seed=5), _randn(B, C, seed=6)],
                                   "labels": _labels()},
    "one_loss": lambda: {"branch_logits": [_randn(B, C, seed=1), _randn(B, C, seed=2), _randn(B, C, seed=3)],
                         "gate_weights": _randn(B, 3, seed=4).softmax(-1), "labels": _labels()},
    "oec_kd_loss": lambda: {"logits": [_randn(B, C, seed=1), _randn(B, C, seed=2), _randn(B, C, seed=3)],
                            "labels": _labels(), "target_features": [_maps(seed=4), _randn(B, 5, seed=5)],
                            "adapted_features": [[_maps(seed=6), _randn(B, 5, seed=7)],
                                                 [_maps(seed=8), _randn(B, 5, seed=9)]]},
    "pcl_loss": lambda: {"peer_logits": [_randn(B, C, seed=1), _randn(B, C, seed=2), _randn(B, C, seed=3)],
                         "ensemble_logits": _randn(B, C, seed=4),
                         "mean_logits": [_randn(B, C, seed=5), _randn(B, C, seed=6), _randn(B, C, seed=7)],
                         "labels": _labels()},
    "mcl_loss": lambda: {"embeddings": [_randn(B, 5, seed=1), _randn(B, 5, seed=2), _randn(B, 5, seed=3)],
                         "labels": _labels()},
    "byot_loss": lambda: {"final_logits": _randn(B, C, seed=1), "head_logits": [_randn(B, C, seed=2)],
                          "labels": _labels(), "final_features": _randn(B, 5, seed=3),
                          "head_features": [_randn(B, 5, seed=4)]},
    "sad_loss": lambda: {"stage_maps": [_randn(B, 3, 4, 4, seed=1), _randn(B, 5, 2, 2, seed=2)]},
    "dks_loss": lambda: {"logits": [_randn(B, C, seed=1), _randn(B, C, seed=2)], "labels": _labels()},
    "ddgsd_loss": lambda: {"logits_a": _randn(B, C, seed=1), "logits_b": _randn(B, C, seed=2), "labels": _labels(),
                           "features_a": _randn(B, 5, seed=3), "features_b": _randn(B, 5, seed=4)},
    "mixskd_loss": lambda: {"logits": [_randn(B, C, seed=1), _randn(B, C, seed=2)],
                            "mixup_logits": [_randn(B, C, seed=3), _randn(B, C, seed=4)],
                            "features": [_randn(B, 3, 2, 2, seed=5), _randn(B, 3, 2, 2, seed=6)],
                            "mixup_features": [_randn(B, 3, 2, 2, seed=7), _randn(B, 3, 2, 2, seed=8)],
                            "teacher_logits": _randn(B, C, seed=9), "teacher_mixup_logits": _randn(B, C, seed=10),
                            "discriminator_logits": [_randn(B, 2, seed=11), _randn(B, 2, seed=12)],
                            "discriminator_mixup_logits": [_randn(B, 2, seed=13), _randn(B, 2, seed=14)],
                            "labels": _labels(), "lam": 0.3, "permutation": torch.arange(B).roll(1)},
    "snapshot_distillation_loss": lambda: {**_logits_pair(), "labels": _labels()},
    "crcd_loss": lambda: {"student_embed": _unit(B, 5, seed=1), "teacher_embed": _unit(B, 5, seed=2),
                          "indices": torch.arange(B), "contrast_indices": torch.arange(4 * B).view(B, 4) % 10,
                          "memory_student": _unit(10, 5, seed=3), "memory_teacher": _unit(10, 5, seed=4),
                          "normalizers": torch.tensor([3.0, 4.0], dtype=torch.float64)},
    "crd_loss": None,  # stateful: kdkernels.nn.CRDLoss, tested in test_losses_contrastive.py
}

# Public functions that are helpers of a loss rather than losses (no module, no reduction).
HELPERS = ("bake_targets", "camkd_weights", "ofd_margins", "crd_normalizers", "crd_update_memory_",
           "sample_contrast_indices", "sample_other_class_indices", "crcd_normalizers", "hsakd_joint_labels",
           "zskd_class_similarity")
