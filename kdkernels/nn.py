"""``torch.nn.Module`` versions of the public losses, for training scripts that hold a criterion::

    criterion = kdkernels.nn.KDLoss(temperature=4.0)
    loss = criterion(student(x), teacher(x).detach())

Each module is generated from its function (:data:`LOSS_MODULES` lists the pairs), so the two cannot drift apart: the
constructor takes the function's hyperparameters (same names, defaults and order, stored as attributes), ``forward``
its per-call tensors, and ``module(*inputs)`` is ``function(*inputs, **hyperparameters)``. The constructor checks what
the function's signature states (choices written as ``Literal`` annotations, a positive temperature, the types of
the defaults); the function checks the rest on each call. :class:`CRDLoss` is written by hand: it owns CRD's memory banks and normalisation constants.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Literal, get_args, get_origin

import torch

from kdkernels import losses
from kdkernels._validation import Checks
from kdkernels.losses import contrastive


def _check_hyperparameters(class_name: str, values: dict, signature: inspect.Signature) -> None:
    """What the function's signature states: choices (Literal annotations), a positive temperature, and types from
    the defaults; ranges and the inputs are the function's to check on each call."""
    check = Checks(class_name)
    for name, value in values.items():
        parameter = signature.parameters[name]
        default = parameter.default
        if get_origin(parameter.annotation) is Literal:
            check.choice(name, value, get_args(parameter.annotation))
        elif name == "temperature":
            check.temperature(value)
        elif isinstance(default, bool):
            check.flag(name, value)
        elif isinstance(default, int) and value is not None:
            check.integer(name, value)
        elif isinstance(default, float) and value is not None:
            check.real(name, value)
        elif isinstance(default, str) and not isinstance(value, str):
            check.type_error(name, "a str", value)


def _parameter_text(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return parameter.name
    return f"{parameter.name}=_defaults[{parameter.name!r}]"


def _signature_text(parameters: list[inspect.Parameter]) -> str:
    """Parameters as source text, with a bare * before the first keyword-only one."""
    parts, starred = ["self"], False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        parts.append(_parameter_text(parameter))
    return ", ".join(parts)


def loss_module(class_name: str, function: Callable, inputs: tuple[str, ...], example: str) -> type:
    """The module class of `function`: ``inputs`` (names of its per-call tensors, in forward's order) go to
    ``forward``, every other parameter to the constructor."""
    signature = inspect.signature(function, eval_str=True)
    missing = [name for name in inputs if name not in signature.parameters]
    if missing:
        raise ValueError(f"{function.__name__} has no parameter(s) {missing}")
    hyper = [p for name, p in signature.parameters.items() if name not in inputs]
    inputs_as_parameters = [signature.parameters[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                            for name in inputs]
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    names = [p.name for p in hyper]
    source = (
        f"def __init__({_signature_text(hyper)}):\n"
        f"    torch.nn.Module.__init__(self)\n"
        f"    values = {{{', '.join(f'{n!r}: {n}' for n in names)}}}\n"
        f"    _check(_class_name, values, _function_signature)\n"
        f"    for name, value in values.items():\n"
        f"        setattr(self, name, value)\n"
        f"def forward({_signature_text(inputs_as_parameters)}):\n"
        f"    return _function({', '.join(f'{n}={n}' for n in inputs)}"
        f"{''.join(f', {n}=self.{n}' for n in names)})\n")
    namespace = {"torch": torch, "_defaults": defaults, "_check": _check_hyperparameters, "_class_name": class_name,
                 "_function_signature": signature, "_function": function}
    exec(source, namespace)  # real signatures: help(), IDEs and torch.compile see the parameters by name

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names)

    summary = (function.__doc__ or "").strip().split("\n\n")[0]
    doc = (f"Module of :func:`kdkernels.{function.__name__}`: {summary}\n\n"
           f"``{class_name}(hyperparameters)(inputs)`` equals ``{function.__name__}(inputs, hyperparameters)``. "
           f"Inputs: {', '.join(inputs)}.\n\nExample::\n\n    {example}\n")
    return type(class_name, (torch.nn.Module,), {
        "__init__": namespace["__init__"], "forward": namespace["forward"], "extra_repr": extra_repr,
        "__doc__": doc, "__module__": __name__, "function": staticmethod(function), "inputs": inputs,
        "hyperparameters": tuple(names)})


# (class name, function, forward's inputs, example): every public loss that is a loss (not a helper such as
# bake_targets, camkd_weights, ofd_margins, crd_normalizers or the samplers); crd_loss's module is CRDLoss below.
_SPECS = [
    ("KDLoss", losses.kd_loss,
     ("student_logits", "teacher_logits", "labels", "teacher_topk_logprobs", "teacher_topk_indices"),
     "loss = KDLoss(temperature=4.0)(student(x), teacher(x).detach())"),
    ("LinearKDLoss", losses.linear_kd_loss,
     ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "student_bias", "teacher_bias",
      "teacher_topk_logprobs", "teacher_topk_indices", "labels", "num_items"),
     "loss = LinearKDLoss(divergence='jsd')(h_s, student.lm_head.weight, h_t.detach(), teacher.lm_head.weight, "
     "labels=y)"),
    ("DKDLoss", losses.dkd_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = ce + min(epoch / 20, 1.0) * DKDLoss(4.0, 1.0, 8.0)(student(x), teacher(x).detach(), y)"),
    ("NKDLoss", losses.nkd_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = ce + NKDLoss(temperature=1.0, gamma=1.5)(student(x), teacher(x).detach(), y)"),
    ("DISTLoss", losses.dist_loss, ("student_logits", "teacher_logits"),
     "loss = ce + DISTLoss(temperature=1.0)(student(x), teacher(x).detach())"),
    ("RKDLoss", losses.rkd_loss, ("student", "teacher"), "loss = ce + RKDLoss(25.0, 50.0)(f_s, f_t.detach())"),
    ("RKDDistanceLoss", losses.rkd_distance_loss, ("student", "teacher"),
     "loss = ce + 25.0 * RKDDistanceLoss()(f_s, f_t.detach())"),
    ("RKDAngleLoss", losses.rkd_angle_loss, ("student", "teacher"),
     "loss = ce + 50.0 * RKDAngleLoss()(f_s, f_t.detach())"),
    ("SPLoss", losses.sp_loss, ("student", "teacher"), "loss = ce + 3000.0 * SPLoss()(f_s, f_t.detach())"),
    ("PKTLoss", losses.pkt_loss, ("student", "teacher"), "loss = ce + 30000.0 * PKTLoss()(f_s, f_t.detach())"),
    ("CCLoss", losses.cc_loss, ("student", "teacher"), "loss = ce + 0.02 * CCLoss(gamma=0.4)(e_s, e_t.detach())"),
    ("IRGLoss", losses.irg_loss, ("student", "teacher"),
     "loss = ce + IRGLoss()((m1_s, m2_s, emb_s, z_s), (m1_t, m2_t, emb_t, z_t))"),
    ("ManifoldLoss", losses.manifold_loss, ("student_tokens", "teacher_tokens"),
     "loss = ManifoldLoss(192, 0.1, 4.0, 0.2)([s_block0, s_block11], [t_block0.detach(), t_block23.detach()])"),
    ("CategoryStructureLoss", losses.category_structure_loss,
     ("student_features", "teacher_features", "labels", "student_logits", "teacher_logits"),
     "loss = 0.9 * ce + CategoryStructureLoss()(connector(f_s), f_t.detach(), y, student(x), teacher(x).detach())"),
    ("MHGDLoss", losses.mhgd_loss, ("student_attention", "teacher_attention"),
     "loss = ce + MHGDLoss()(attention(e_s_back, e_s_front), attention(e_t_back, e_t_front).detach())"),
    ("CRCDLoss", losses.crcd_loss,
     ("student_embed", "teacher_embed", "indices", "contrast_indices", "memory_student", "memory_teacher",
      "normalizers", "generator"),
     "loss = CRCDLoss()(embed_s(f_s), embed_t(f_t), idx, contrast_idx, bank_s, bank_t, z)  # then update the banks"),
    ("REFILLEDTripletLoss", losses.refilled_triplet_loss, ("student_embed", "teacher_embed", "labels"),
     "loss = 1000.0 * REFILLEDTripletLoss(temperature=4.0)(emb_s, emb_t.detach(), y)"),
    ("REFILLEDClassifierLoss", losses.refilled_classifier_loss, ("student_logits", "teacher_embed", "labels"),
     "loss = ce + 1000.0 * REFILLEDClassifierLoss(temperature=2.0)(student(x), emb_t.detach(), y)"),
    ("BAKELoss", losses.bake_loss, ("logits", "features"),
     "loss = F.cross_entropy(logits, y) + BAKELoss(temperature=4.0, omega=0.5)(logits, features)"),
    ("SoftCrossEntropyLoss", losses.soft_cross_entropy_loss, ("student_logits", "teacher_logits"),
     "loss = SoftCrossEntropyLoss()(student(x), previous_generation(x).detach())"),
    ("WSLLoss", losses.wsl_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = ce + 2.5 * WSLLoss(temperature=2.0)(student(x), teacher(x).detach(), y)"),
    ("BDKDLoss", losses.bdkd_loss, ("learner_logits", "target_logits"),
     "loss = ce + BDKDLoss(temperature=3.0)(z_a, z_b.detach())"),
    ("MMTLoss", losses.mmt_loss, ("logits_1", "logits_2", "ema_logits_1", "ema_logits_2", "labels"),
     "loss = MMTLoss(soft_ce_weight=0.5)(net_1(x1), net_2(x2), ema_1(x1), ema_2(x2), y)"),
    ("PrivilegedLoss", losses.privileged_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = PrivilegedLoss(temperature=1.0, imitation=1.0)(student(x_degraded), teacher(x_clean).detach(), y)"),
    ("SupervisionTransferLoss", losses.supervision_transfer_loss, ("student_features", "teacher_features"),
     "loss = SupervisionTransferLoss()(connector(student.pool5(x_depth)), teacher.pool5(x_rgb).detach())"),
    ("TwoTemperatureKDLoss", losses.two_temperature_kd_loss, ("student_logits", "teacher_logits"),
     "loss = ce + TwoTemperatureKDLoss(2.0, 4.0)(student(x), teacher(x).detach())"),
    ("LogitStandardizedKDLoss", losses.logit_standardized_kd_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = 0.1 * ce + 9.0 * LogitStandardizedKDLoss(temperature=2.0)(student(x), teacher(x).detach())"),
    ("FeatureNormalizedKDLoss", losses.feature_normalized_kd_loss,
     ("student_logits", "teacher_logits", "student_features"),
     "loss = ce + FeatureNormalizedKDLoss(tau=1.0)(student(x), teacher(x).detach(), f_s)"),
    ("DeiTLoss", losses.deit_loss, ("class_logits", "distillation_logits", "teacher_logits", "labels"),
     "loss = DeiTLoss('hard', alpha=0.5)(vit.head(cls), vit.head_dist(dist), teacher(x).detach(), y)"),
    ("SoftmaxMSELoss", losses.softmax_mse_loss, ("student_logits", "teacher_logits"),
     "loss = ce + consistency_weight * SoftmaxMSELoss()(student(x), ema_teacher(x_view2).detach())"),
    ("BYOLLoss", losses.byol_loss, ("prediction", "target"),
     "loss = BYOLLoss()(predictor(projector(f(x1))), target_projector(target_f(x2)).detach()) + (views swapped)"),
    ("SimSiamLoss", losses.simsiam_loss, ("prediction", "target"),
     "loss = 0.5 * (SimSiamLoss()(predictor(projector(f(x1))), projector(f(x2)).detach()) + (views swapped))"),
    ("MoCoLoss", losses.moco_loss, ("query", "key", "queue"),
     "loss = MoCoLoss(temperature=0.2)(head(f(x1)), key_head(key_f(x2)).detach(), queue)   # then enqueue the keys"),
    ("DINOLoss", losses.dino_loss, ("student_outputs", "teacher_outputs", "center"),
     "loss = DINOLoss(teacher_temperature=0.04)(stack(student(views)), stack(ema(global_views)).detach(), center)"),
    ("SDSSLLoss", losses.sdssl_loss, ("predictions", "keys"),
     "loss = SDSSLLoss(ratio=r)(stack([pred_l(proj_l(h_l(x1))) for l in layers]), ema_proj(ema_f(x2)).detach())"),
    ("SSKDHeadLoss", losses.sskd_head_loss, ("features",),
     "loss = SSKDHeadLoss()(teacher_head(f_t(rotations(x)).detach()))   # stage 1: the teacher's head"),
    ("SSKDLoss", losses.sskd_loss, ("student_logits", "teacher_logits", "student_features", "teacher_features",
                                    "labels"),
     "loss = SSKDLoss()(s(x4), t(x4).detach(), head_s(f_s(x4)), head_t(f_t(x4)).detach(), y)   # x4: 4 rotations"),
    ("HSAKDHeadLoss", losses.hsakd_head_loss, ("aux_logits", "labels"),
     "loss = HSAKDHeadLoss()([h(f.detach()) for h, f in zip(aux_heads_t, taps_t(x4))], y)   # stage 1"),
    ("HSAKDLoss", losses.hsakd_loss, ("student_logits", "teacher_logits", "student_aux_logits", "teacher_aux_logits",
                                      "labels"),
     "loss = HSAKDLoss(temperature=3.0)(s(x4), t(x4).detach(), [h(f) for h, f in zip(heads_s, taps_s)], aux_t, y)"),
    ("GANGeneratorLoss", losses.gan_generator_loss, ("fake_logits",),
     "loss = ce + kd + 0.1 * GANGeneratorLoss()(discriminator(f_s))"),
    ("GANDiscriminatorLoss", losses.gan_discriminator_loss, ("real_logits", "fake_logits"),
     "loss_d = GANDiscriminatorLoss()(discriminator(f_t), discriminator(f_s.detach()))"),
    ("LSGANGeneratorLoss", losses.lsgan_generator_loss, ("fake_scores",),
     "loss_1 = ce + kl + LSGANGeneratorLoss()(discriminator_1(f_1))   # AFD: network 1 fools its discriminator"),
    ("LSGANDiscriminatorLoss", losses.lsgan_discriminator_loss, ("real_scores", "fake_scores"),
     "loss_d1 = LSGANDiscriminatorLoss()(discriminator_1(f_2.detach()), discriminator_1(f_1.detach()))"),
    ("DAFLGeneratorLoss", losses.dafl_generator_loss, ("teacher_logits", "teacher_features"),
     "loss_g = DAFLGeneratorLoss()(teacher(generator(z)), teacher_features)"),
    ("DFADLoss", losses.dfad_loss, ("student_logits", "teacher_logits"),
     "loss_s = DFADLoss()(student(x.detach()), teacher(x.detach()));  loss_g = -DFADLoss()(student(x), teacher(x))"),
    ("DeepInversionFeatureLoss", losses.deepinversion_feature_loss, ("features", "running_means", "running_vars"),
     "loss_x = 0.05 * DeepInversionFeatureLoss()(bn_inputs, [bn.running_mean for bn in bns], [bn.running_var ...])"),
    ("DeepInversionPriorLoss", losses.deepinversion_prior_loss, ("images",),
     "loss_x = ce + r_feature + DeepInversionPriorLoss(tv_l2=1e-4, l2=1e-5)(jittered_images)"),
    ("ADICompetitionLoss", losses.adi_competition_loss, ("student_logits", "teacher_logits"),
     "loss_x = deepinversion_terms + adi_scale * ADICompetitionLoss()(student(x), teacher(x))"),
    ("ZSKDImpressionLoss", losses.zskd_impression_loss, ("teacher_logits", "soft_targets"),
     "loss_x = ZSKDImpressionLoss(temperature=20.0)(teacher(impressions), dirichlet_targets)"),
    ("LabelSmoothingLoss", losses.label_smoothing_loss, ("logits", "labels"),
     "loss = LabelSmoothingLoss(epsilon=0.1)(student(x), y)"),
    ("TfKDRegLoss", losses.tf_kd_reg_loss, ("student_logits", "labels"),
     "loss = 0.9 * ce + TfKDRegLoss(temperature=20.0, correct_prob=0.99)(student(x), y)"),
    ("TfNKDLoss", losses.tf_nkd_loss, ("student_logits", "labels"), "loss = ce + TfNKDLoss()(student(x), y)"),
    ("ZipfLSLoss", losses.zipf_ls_loss, ("logits", "dense_logits", "labels"),
     "loss = ce + ZipfLSLoss()(logits, dense_logits, y)"),
    ("FitNetLoss", losses.fitnet_loss, ("student_hint", "teacher_hint"),
     "loss = FitNetLoss()(regressor(f_s), f_t.detach())"),
    ("ATLoss", losses.at_loss, ("student", "teacher"), "loss = ce + 1000.0 * ATLoss(p=2.0)(f_s, f_t.detach())"),
    ("TTKDLoss", losses.ttkd_loss, ("student_query", "student_value", "teacher_map", "teacher_key"),
     "loss = 0.1 * ce + 0.2 * TTKDLoss()(query_embed(f_s), value_embed(f_s), f_t.detach())"),
    ("NSTLoss", losses.nst_loss, ("student", "teacher"), "loss = ce + 50.0 * NSTLoss()(f_s, f_t.detach())"),
    ("FSPLoss", losses.fsp_loss, ("student_features", "teacher_features"),
     "loss = FSPLoss()([g1_s, g2_s, g3_s], [g1_t, g2_t, g3_t])"),
    ("OFDLoss", losses.ofd_loss, ("student", "teacher", "margin"),
     "loss = OFDLoss(reduction='batchmean')(connector(f_s), f_t.detach(), margin)"),
    ("VIDLoss", losses.vid_loss, ("mean", "teacher", "log_scale"),
     "loss = VIDLoss()(regressor(f_s), f_t.detach(), log_scale)"),
    ("ABLoss", losses.ab_loss, ("student", "teacher"), "loss = ABLoss(margin=1.0)(connector(f_s), f_t.detach())"),
    ("FTLoss", losses.ft_loss, ("student_factor", "teacher_factor"),
     "loss = ce + 200.0 * FTLoss()(translator(f_s), paraphraser(f_t).detach())"),
    ("CWDLoss", losses.cwd_loss, ("student_map", "teacher_map"),
     "loss = ce + 3.0 * CWDLoss(temperature=4.0)(connector(f_s), f_t.detach())"),
    ("CDLoss", losses.cd_loss, ("student_features", "teacher_features"),
     "loss = ce + 6.0 * CDLoss()([c(f) for c, f in zip(connectors, fs_s)], [f.detach() for f in fs_t])"),
    ("PADL2Loss", losses.pad_l2_loss, ("student_feature", "teacher_feature", "log_variance"),
     "loss = ce + PADL2Loss()(e_s, e_t.detach(), variance_branch(e_s))"),
    ("KDSVDLoss", losses.kd_svd_loss, ("student_features", "teacher_features"),
     "loss = ce + KDSVDLoss()([c(f) for c, f in zip(connectors, fs_s)], [f.detach() for f in fs_t])"),
    ("JacobianMatchingLoss", losses.jacobian_matching_loss, ("student_jacobian", "teacher_jacobian"),
     "loss = ce + kd + 20.0 * JacobianMatchingLoss()(grad(z_s[y].sum(), x, create_graph=True)[0], j_t.detach())"),
    ("TOFDLoss", losses.tofd_loss, ("student_features", "teacher_features", "student_logits", "teacher_logits",
                                    "labels", "link_weights"),
     "loss = TOFDLoss(temperature=1 + 3 * epoch / epochs)([l(f) for l, f in zip(links, aux_s)], aux_t, z_s, z_t, y, "
     "[l.weight for l in links])"),
    ("HKDLoss", losses.hkd_loss, ("student_features", "teacher_features", "layer_weights"),
     "loss = HKDLoss()([e_s, *fs_s], [e_t.detach(), *[f.detach() for f in fs_t]], [1.0] + [100 * 0.7 ** epoch] * 3)"),
    ("SemCKDLoss", losses.semckd_loss, ("student_features", "teacher_features", "attention"),
     "loss = ce + kd + 400.0 * SemCKDLoss()(projected_s, [[t.detach() for t in row] for row in pooled_t], attention)"),
    ("AFDLoss", losses.afd_loss, ("student_features", "teacher_features", "attention"),
     "loss = ce + 0.9 * kd + 200.0 * AFDLoss()(fs_s, [f.detach() for f in fs_t], attention)"),
    ("L2TWWLoss", losses.l2t_ww_loss, ("student_features", "teacher_features", "channel_weights", "pair_weights"),
     "loss = ce + 0.5 * L2TWWLoss()([c(f) for c, f in zip(convs, fs_s)], [f.detach() for f in fs_t], w, lw)"),
    ("DarkRankLoss", losses.darkrank_loss, ("student", "teacher"), "loss = DarkRankLoss()(e_s, e_t.detach())"),
    ("EnsembleKDLoss", losses.ensemble_kd_loss, ("student_logits", "teacher_logits"),
     "loss = ce + EnsembleKDLoss(temperature=4.0)(student(x), [t(x).detach() for t in teachers])"),
    ("CAMKDLoss", losses.camkd_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = ce + CAMKDLoss(temperature=4.0)(student(x), [t(x).detach() for t in teachers], y)"),
    ("CAMKDFeatureLoss", losses.camkd_feature_loss,
     ("student_features", "teacher_features", "teacher_logits_on_student", "labels"),
     "loss = 50.0 * CAMKDFeatureLoss()(adapted_s, features_t, logits_t_on_s, y)"),
    ("ONELoss", losses.one_loss, ("branch_logits", "gate_weights", "labels"),
     "loss = ONELoss(temperature=3.0, kl_weight=ramp)([z_1, z_2, z_3], gate(shared), y)"),
    ("OECKDLoss", losses.oec_kd_loss, ("logits", "labels", "target_features", "adapted_features"),
     "loss = OECKDLoss(temperature=2.0)([z_0, z_1, z_2], y, maps_0, [[a(f) for a, f in zip(adapt_j, maps_j)], ...])"),
    ("PCLLoss", losses.pcl_loss, ("peer_logits", "ensemble_logits", "mean_logits", "labels"),
     "loss = PCLLoss(temperature=3.0, kl_weight=ramp)([z_1, z_2, z_3], z_e, [ema_z_1, ema_z_2, ema_z_3], y)"),
    ("MCLLoss", losses.mcl_loss, ("embeddings", "labels"),
     "loss = ce_1 + ce_2 + MCLLoss(temperature=0.1)([head_1(f_1), head_2(f_2)], y)"),
    ("BYOTLoss", losses.byot_loss, ("final_logits", "head_logits", "labels", "final_features", "head_features"),
     "loss = BYOTLoss(temperature=3.0)(z, head_logits, y, f, head_features)"),
    ("SADLoss", losses.sad_loss, ("stage_maps",), "loss = ce + 0.1 * SADLoss()([f1, f2, f3])"),
    ("DKSLoss", losses.dks_loss, ("logits", "labels"), "loss = DKSLoss()([z_branch1, z_branch2, z], y)"),
    ("DDGSDLoss", losses.ddgsd_loss, ("logits_a", "logits_b", "labels", "features_a", "features_b"),
     "loss = DDGSDLoss()(model(x_a), model(x_b), y, f_a, f_b)"),
    ("MixSKDLoss", losses.mixskd_loss,
     ("logits", "mixup_logits", "features", "mixup_features", "teacher_logits", "teacher_mixup_logits",
      "discriminator_logits", "discriminator_mixup_logits", "labels", "lam", "permutation"),
     "loss = MixSKDLoss(temperature=3.0)(z, z_mix, f, f_mix, t, t_mix, d, d_mix, y, lam, perm)"),
    ("SnapshotDistillationLoss", losses.snapshot_distillation_loss, ("student_logits", "teacher_logits", "labels"),
     "loss = SnapshotDistillationLoss(temperature=3.0)(model(x), snapshot(x), y)"),
]

LOSS_MODULES: dict[str, type] = {}
for _name, _function, _inputs, _example in _SPECS:
    LOSS_MODULES[_function.__name__] = globals()[_name] = loss_module(_name, _function, _inputs, _example)
del _name, _function, _inputs, _example


class CRDLoss(torch.nn.Module):
    """CRD's contrastive loss with its state, as RepDistiller's ``CRDLoss`` without the embedding heads (the caller's
    modules: pass their L2-normalised outputs). Holds the two memory banks ``memory_student`` / ``memory_teacher``
    [num_data, feat_dim] (buffers, init U(-stdv, stdv), stdv = 1/sqrt(feat_dim/3)) and ``normalizers`` [2] (Z_v1,
    Z_v2; -1 until set). Each call sets Z on the first call (:func:`kdkernels.crd_normalizers`; a loaded state_dict
    whose Z are > 0 counts as set), computes :func:`kdkernels.crd_loss` from the banks as they were, then updates both
    banks (:func:`kdkernels.crd_update_memory_`).

    Example::

        criterion = kdkernels.nn.CRDLoss(num_data=len(train_set), feat_dim=128)
        loss = criterion(embed_s(f_s), embed_t(f_t), sample_index, contrast_index)
    """

    def __init__(self, num_data: int, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7, *, backend: str = "auto") -> None:
        super().__init__()
        check = Checks("CRDLoss")
        self.num_data = check.integer("num_data", num_data, minimum=1)
        self.feat_dim = check.integer("feat_dim", feat_dim, minimum=1)
        self.num_negatives = check.integer("num_negatives", num_negatives, minimum=1)
        self.temperature = check.temperature(temperature)
        self.momentum = check.probability("momentum", momentum)
        self.eps = check.real("eps", eps, nonnegative=True)
        self.backend = backend
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self.normalizers_set = False
        self.register_load_state_dict_post_hook(CRDLoss._after_load)

    @staticmethod
    def _after_load(module: "CRDLoss", _incompatible_keys) -> None:
        module.normalizers_set = bool((module.normalizers > 0).all())

    def forward(self, student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
                contrast_indices: torch.Tensor | None = None) -> torch.Tensor:
        if contrast_indices is None:
            contrast_indices = contrastive.sample_contrast_indices(indices, self.num_data, self.num_negatives)
        if not self.normalizers_set:
            self.normalizers.copy_(contrastive.crd_normalizers(
                student_embed, teacher_embed, contrast_indices, self.memory_student, self.memory_teacher,
                self.temperature, backend=self.backend))
            self.normalizers_set = True
        loss = contrastive.crd_loss(student_embed, teacher_embed, indices, contrast_indices, self.memory_student,
                                    self.memory_teacher, self.normalizers, self.temperature, self.eps,
                                    backend=self.backend)
        contrastive.crd_update_memory_(self.memory_student, student_embed, indices, self.momentum)
        contrastive.crd_update_memory_(self.memory_teacher, teacher_embed, indices, self.momentum)
        return loss

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}")


LOSS_MODULES["crd_loss"] = CRDLoss

__all__ = sorted(cls.__name__ for cls in LOSS_MODULES.values())
