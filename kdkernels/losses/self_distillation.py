"""Self-distillation losses: a network teaches itself (BYOT's deepest classifier teaches its shallow heads; MixSKD's
mixup images and interpolated clean outputs teach each other; snapshot distillation's earlier snapshot teaches the
next cycle).

Plain PyTorch: each function IS the reference of its formula, transcribed from the code named in its docstring
(../shared/reference/methods.md §1.12).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks
from kdkernels.losses._common import accumulate
from kdkernels.losses.ensemble import check_logits_list
from kdkernels.losses.kd import kd_loss
from kdkernels.losses.response import soft_cross_entropy_loss


def _byot_feature_term(head_feature: torch.Tensor, final_feature: torch.Tensor) -> torch.Tensor:
    """``Σ (f − F)² · 1[(f > 0) | (F > 0)]`` over all elements (``feature_loss_function``)."""
    active = ((head_feature > 0) | (final_feature > 0)).to(head_feature.dtype)
    return ((head_feature - final_feature) ** 2 * active).sum()


def byot_loss(final_logits: torch.Tensor, head_logits: Sequence[torch.Tensor], labels: torch.Tensor,
              final_features: torch.Tensor, head_features: Sequence[torch.Tensor], temperature: float = 3.0,
              alpha: float = 0.1, beta: float = 1e-6) -> torch.Tensor:
    """BYOT's total loss (Zhang et al., "Be Your Own Teacher", ICCV 2019; luanyunteng/pytorch-be-your-own-teacher
    ``train.py``, unofficial code)::

        (1 − α) · [CE(z_final) + Σ_k CE(z_k)]
        + α · T² · Σ_k softCE(z_k / T, softmax(z_final / T).detach())
        + β · Σ_k Σ (f_k − f_final.detach())² · 1[(f_k > 0) | (f_final > 0)]

    ``head_logits``/``head_features`` are the auxiliary heads' outputs (shallow stages), ``final_*`` the network's own
    classifier output and its pooled feature (flattened to [B, D] like the heads' features). Its three terms are
    normalised differently (batch means and a sum over elements), as coded, so it takes no ``reduction``.
    """
    check = Checks("byot_loss")
    check.logits("final_logits", final_logits, dims=(2,))
    heads = check_logits_list(check, "head_logits", head_logits, final_logits, reference_name="final_logits")
    check.labels(labels, final_logits.shape[:1], final_logits.device)
    temperature = check.temperature(temperature)
    alpha, beta = check.real("alpha", alpha, nonnegative=True), check.real("beta", beta, nonnegative=True)
    head_features = check.tensor_list("head_features", head_features)
    if len(head_features) != len(heads):
        check.value_error("head_features", f"must hold one feature per head logits ({len(heads)})",
                          f"{len(head_features)}")
    final = accumulate(final_logits)
    final_feature = accumulate(final_features).reshape(final.shape[0], -1).detach()
    ce = F.cross_entropy(final, labels) + sum(F.cross_entropy(accumulate(h), labels) for h in heads)
    soft = sum(soft_cross_entropy_loss(h, final.detach(), temperature) for h in heads) * temperature ** 2
    features = []
    for index, feature in enumerate(head_features):
        feature = accumulate(feature).reshape(final.shape[0], -1)
        if feature.shape != final_feature.shape:
            check.value_error(f"head_features[{index}]", f"must have final_features' {final_feature.shape[1]} "
                              "features per sample", f"{feature.shape[1]}")
        features.append(_byot_feature_term(feature, final_feature))
    return (1.0 - alpha) * ce + alpha * soft + beta * sum(features)


def _sad_attention(feature_map: torch.Tensor, size: tuple[int, int] | None, p: float) -> torch.Tensor:
    """``at_gen``'s map: ``softmax_hw(resize(Σ_c |A_c|^p))`` as [B, H·W] (resize: bilinear, align_corners False)."""
    summed = feature_map.abs().pow(p).sum(dim=1, keepdim=True)
    if size is not None and tuple(summed.shape[-2:]) != tuple(size):
        summed = F.interpolate(summed, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(summed.flatten(1), dim=1)


def sad_loss(stage_maps: Sequence[torch.Tensor], p: float = 2.0, detach_target: bool = True) -> torch.Tensor:
    """Self-attention distillation (Hou, Ma, Liu, Loy, "Learning Lightweight Lane Detection CNNs by Self Attention
    Distillation", ICCV 2019; ``at_gen`` of InhwanBae/ENet-SAD_Pytorch ``model_ENET_SAD.py``, the PyTorch port the
    official cardwing/Codes-for-Lane-Detection README points to)::

        Σ_m MSE( Ψ(A_m), Ψ(A_{m+1}) ),   Ψ(A) = softmax_{h,w}( B(Σ_c |A_c|^p) )

    over consecutive stage maps ``stage_maps`` [B, C_m, H_m, W_m] (shallow to deep, at least two). ``B`` resizes
    the deeper map's channel sum bilinearly (align_corners False) to the shallower map's size before the spatial
    softmax, as ``at_gen`` upsamples E2's map to E1's; the MSE is the mean over the B·H_m·W_m positions
    (``nn.MSELoss(reduction='mean')``). The deeper map is the distillation target: ``detach_target=True`` stops its
    gradient (the paper's "Ψ(A_{m+1}) is the target"; the PyTorch port does not detach, ``detach_target=False``).
    """
    check = Checks("sad_loss")
    maps = check.tensor_list("stage_maps", stage_maps, minimum=2)
    for index, feature_map in enumerate(maps):
        check.floating(f"stage_maps[{index}]", feature_map, dims=(4,))
        if feature_map.shape[0] != maps[0].shape[0]:
            check.value_error(f"stage_maps[{index}]", f"must have stage_maps[0]'s batch size {maps[0].shape[0]}",
                              f"shape {tuple(feature_map.shape)}")
        check.same_device(f"stage_maps[{index}]", feature_map, "stage_maps[0]", maps[0])
    p = check.real("p", p, positive=True)
    detach_target = check.flag("detach_target", detach_target)
    total = None
    for shallow, deep in zip(maps[:-1], maps[1:]):
        shallow = accumulate(shallow)
        deep = accumulate(deep.detach() if detach_target else deep)
        size = tuple(shallow.shape[-2:])
        term = F.mse_loss(_sad_attention(shallow, None, p), _sad_attention(deep, size, p))
        total = term if total is None else total + term
    return total


def _smoothed_softmax(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    classes = logits.shape[1]
    return (torch.softmax(logits, dim=1) + epsilon) / (1.0 + classes * epsilon)


def dks_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Deeply-supervised knowledge synergy (Sun, Yao, Zhou, Wang, CVPR 2019; sundw2014/DKS ``wrn_DKS/main.py``
    and ``wrn_DKS/KL_divergence.py``)::

        Σ_i CE(z_i, y) + Σ_i Σ_{j≠i} KL( p̂_j.detach() ‖ p̂_i ),   p̂ = (softmax(z) + ε) / (1 + C·ε)

    over every classifier ``logits`` [B, C] (the auxiliary branches and the main classifier, at least two), each
    branch learning from every other branch's detached output (all ordered pairs, weight 1, temperature 1). The
    KL is the batch mean of the per-sample sum over classes, on the ε-smoothed softmaxes (ε = 1e-8) as coded.
    """
    check = Checks("dks_loss")
    outputs = check_logits_list(check, "logits", logits, minimum=2)
    check.labels(labels, outputs[0].shape[:1], outputs[0].device)
    epsilon = check.real("epsilon", epsilon, nonnegative=True)
    outputs = [accumulate(z) for z in outputs]
    probabilities = [_smoothed_softmax(z, epsilon) for z in outputs]
    total = sum(F.cross_entropy(z, labels) for z in outputs)
    for i, learner in enumerate(probabilities):
        log_learner = torch.log(learner)
        for j, target in enumerate(probabilities):
            if i != j:
                target = target.detach()
                total = total + (target * (torch.log(target) - log_learner)).sum(dim=1).mean()
    return total


def ddgsd_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, features_a: torch.Tensor,
               features_b: torch.Tensor, kl_weight: float = 1.0, mmd_weight: float = 1.0) -> torch.Tensor:
    """Data-distortion guided self-distillation (Xu, Liu, "Data-Distortion Guided Self-Distillation for Deep Neural
    Networks", AAAI 2019; no official code, transcribed from the paper's description)::

        CE(z_a, y) + CE(z_b, y) + λ_kl · [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)] + λ_mmd · ‖mean_b f_a − mean_b f_b‖²

    on the logits ``z`` [B, C] and pooled features ``f`` [B, ...] (flattened per sample) of two distorted views of
    the same images through the same network, p = softmax(z) (T = 1). The KL terms are batch means of per-sample
    sums over classes, symmetric and undetached (each view's posterior learns from the other's); the MMD has the
    linear kernel (the squared distance between the views' mean features). Approximation: the paper's weights,
    kernel and gradient flow are not confirmed by code.
    """
    check = Checks("ddgsd_loss")
    check.logits_pair(logits_a, logits_b, "logits_a", "logits_b", dims=(2,))
    check.labels(labels, logits_a.shape[:1], logits_a.device)
    check.feature_pair("features_a", features_a, "features_b", features_b)
    if features_a.shape[0] != logits_a.shape[0]:
        check.value_error("features_a", f"must have the logits' batch size {logits_a.shape[0]}",
                          f"shape {tuple(features_a.shape)}")
    check.same_device("features_a", features_a, "logits_a", logits_a)
    if features_a.shape[1:].numel() != features_b.shape[1:].numel():
        check.value_error("features_b", f"must have features_a's {features_a.shape[1:].numel()} features per sample",
                          f"shape {tuple(features_b.shape)}")
    kl_weight = check.real("kl_weight", kl_weight, nonnegative=True)
    mmd_weight = check.real("mmd_weight", mmd_weight, nonnegative=True)
    a, b = accumulate(logits_a), accumulate(logits_b)
    log_a, log_b = torch.log_softmax(a, dim=1), torch.log_softmax(b, dim=1)
    kl = ((log_a.exp() * (log_a - log_b)).sum(dim=1) + (log_b.exp() * (log_b - log_a)).sum(dim=1)).mean()
    mean_a = accumulate(features_a).flatten(1).mean(dim=0)
    mean_b = accumulate(features_b).flatten(1).mean(dim=0)
    mmd = (mean_a - mean_b).pow(2).sum()
    return F.cross_entropy(a, labels) + F.cross_entropy(b, labels) + kl_weight * kl + mmd_weight * mmd


def mixup_interpolate(values: torch.Tensor, lam: float | torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """``lam·v + (1 − lam)·v[perm]`` row-wise (``lam`` a number or one weight per row, broadcast over the rest): the
    interpolation of a batch's outputs that MixSKD compares with the outputs of the mixup images."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return lam * values + (1.0 - lam) * values[permutation]


def _mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam, permutation: torch.Tensor) -> torch.Tensor:
    """``mean_b lam_b·CE(z_b, y_b) + (1 − lam_b)·CE(z_b, y_perm_b)`` (the official ``mixup_criterion`` for one lam)."""
    first = F.cross_entropy(logits, labels, reduction="none")
    second = F.cross_entropy(logits, labels[permutation], reduction="none")
    return (lam * first + (1.0 - lam) * second).mean()


def _mixskd_lists(check: Checks, names: tuple[str, str], first, second, rows: int, device, what: str):
    firsts = check.tensor_list(names[0], first)
    seconds = check.tensor_list(names[1], second)
    if len(seconds) != len(firsts):
        check.value_error(names[1], f"must hold one tensor per {what} ({len(firsts)})", f"{len(seconds)}")
    for index, (a, b) in enumerate(zip(firsts, seconds)):
        check.feature_pair(f"{names[0]}[{index}]", a, f"{names[1]}[{index}]", b, same_shape=True)
        if a.shape[0] != rows:
            check.value_error(f"{names[0]}[{index}]", f"must have the logits' batch size {rows}",
                              f"shape {tuple(a.shape)}")
        check.same_device(f"{names[0]}[{index}]", a, "logits[0]", device)
    return firsts, seconds


def mixskd_loss(logits: Sequence[torch.Tensor], mixup_logits: Sequence[torch.Tensor],
                features: Sequence[torch.Tensor], mixup_features: Sequence[torch.Tensor],
                teacher_logits: torch.Tensor, teacher_mixup_logits: torch.Tensor,
                discriminator_logits: Sequence[torch.Tensor], discriminator_mixup_logits: Sequence[torch.Tensor],
                labels: torch.Tensor, lam: float | torch.Tensor, permutation: torch.Tensor,
                temperature: float = 3.0) -> torch.Tensor:
    """MixSKD's total loss (Yang, An, Zhou, Cai, Zhi, Wu, Xu, Zhang, "MixSKD: Self-Knowledge Distillation from
    Mixup for Image Recognition", ECCV 2022; winycg/Self-KD-Lib @ ede3062 ``main_mixskd_imagenet.py`` ``train``,
    ``utils.py`` ``DistillKL``, ``methods/adversarial.py`` ``discriminatorLoss``)::

        Σ_k CE(z_k, y) + Σ_k mixCE(m_k) + mixCE(t) + mixCE(t_m)                              task
        + KL_T(t_m.detach() ‖ ẑ_K) + KL_T(t.detach() ‖ m_K)                                    self-teacher
        + Σ_{k<K} [KL_T(m_k.detach() ‖ ẑ_k) + KL_T(ẑ_k.detach() ‖ m_k)]                        branches, both ways
        + Σ_k MSE(f̂_k, g_k) + Σ_k BCE(D_k(f̂_k) → [1, 0], D_k(g_k) → [0, 1])                  feature maps

    over K classifiers (auxiliary branches shallow to deep, the network's own classifier last): ``logits`` z_k and
    ``features`` f_k [B, ...] on the clean images, ``mixup_logits`` m_k and ``mixup_features`` g_k on their mixup
    images ``lam·x + (1 − lam)·x[perm]``; ``ẑ = lam·z + (1 − lam)·z[perm]`` and ``f̂`` likewise
    (:func:`mixup_interpolate`). ``teacher_logits`` t / ``teacher_mixup_logits`` t_m are the self-teacher's outputs
    on the interpolated / mixup feature maps, ``discriminator_logits`` / ``discriminator_mixup_logits`` [B, 2] the
    k-th discriminator's on the pooled f̂_k / g_k. ``mixCE(z) = lam·CE(z, y) + (1 − lam)·CE(z, y[perm])``;
    ``KL_T`` is the batch-mean KL of the T-softened softmaxes times T² (T = 3); the MSE the mean over elements,
    undetached both ways; the BCE ``BCEWithLogits`` averaged over the 2B×2 targets. ``lam`` is a number in [0, 1]
    (the official one draw per batch) or one weight per sample [B]; ``permutation`` int64 [B]. Weights 1, as coded.
    The CIFAR script (``main_mixskd_cifar.py``) computes the mixup CE terms but leaves them out of its sum; this is
    the ImageNet script's sum, which includes them. No ``reduction``: batch means of different terms.
    """
    check = Checks("mixskd_loss")
    clean = check_logits_list(check, "logits", logits)
    mixed = check_logits_list(check, "mixup_logits", mixup_logits, clean[0], reference_name="logits[0]")
    if len(mixed) != len(clean):
        check.value_error("mixup_logits", f"must hold one logits per classifier ({len(clean)})", f"{len(mixed)}")
    rows, reference = clean[0].shape[0], clean[0]
    check.logits_pair(teacher_logits, teacher_mixup_logits, "teacher_logits", "teacher_mixup_logits", dims=(2,))
    check.same_shape("teacher_logits", teacher_logits, "logits[0]", reference)
    check.same_device("teacher_logits", teacher_logits, "logits[0]", reference)
    feats, mixed_feats = _mixskd_lists(check, ("features", "mixup_features"), features, mixup_features, rows,
                                       reference, "classifier")
    if len(feats) != len(clean):
        check.value_error("features", f"must hold one feature map per classifier ({len(clean)})", f"{len(feats)}")
    judged, mixed_judged = _mixskd_lists(check, ("discriminator_logits", "discriminator_mixup_logits"),
                                         discriminator_logits, discriminator_mixup_logits, rows, reference,
                                         "discriminator")
    if len(judged) != len(clean):
        check.value_error("discriminator_logits", f"must hold one discriminator output per classifier ({len(clean)})",
                          f"{len(judged)}")
    for index, value in enumerate(judged):
        check.shape(f"discriminator_logits[{index}]", value, (rows, 2))
    check.labels(labels, clean[0].shape[:1], clean[0].device)
    permutation = check.index_tensor("permutation", permutation, (rows,), clean[0].device)
    if isinstance(lam, torch.Tensor):
        check.floating("lam", lam, dims=(0, 1))
        if lam.dim() == 1 and lam.shape[0] != rows:
            check.value_error("lam", f"must be a number or hold one weight per sample ({rows})",
                              f"shape {tuple(lam.shape)}")
        check.same_device("lam", lam, "logits[0]", reference)
        lam = accumulate(lam)
    else:
        lam = check.real("lam", lam, minimum=0.0, maximum=1.0)
    temperature = check.temperature(temperature)

    clean = [accumulate(z) for z in clean]
    mixed = [accumulate(z) for z in mixed]
    teacher, teacher_mixed = accumulate(teacher_logits), accumulate(teacher_mixup_logits)
    interpolated = [mixup_interpolate(z, lam, permutation) for z in clean]

    def kl(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kd_loss(student, target.detach(), temperature)

    task = sum(F.cross_entropy(z, labels) for z in clean)
    task = task + sum(_mixup_cross_entropy(z, labels, lam, permutation) for z in [*mixed, teacher, teacher_mixed])
    divergence = kl(interpolated[-1], teacher_mixed) + kl(mixed[-1], teacher)
    for z_hat, m in zip(interpolated[:-1], mixed[:-1]):
        divergence = divergence + kl(z_hat, m) + kl(m, z_hat)
    feature = sum(F.mse_loss(mixup_interpolate(accumulate(f), lam, permutation), accumulate(g))
                  for f, g in zip(feats, mixed_feats))
    adversarial = 0.0
    for d, d_mixed in zip(judged, mixed_judged):
        both = torch.cat([accumulate(d), accumulate(d_mixed)])
        target = torch.zeros_like(both)
        target[:rows, 0] = 1.0
        target[rows:, 1] = 1.0
        adversarial = adversarial + F.binary_cross_entropy_with_logits(both, target)
    return task + divergence + feature + adversarial


def snapshot_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                               temperature: float = 3.0, ce_weight: float = 1.0,
                               kd_weight: float = 1.0) -> torch.Tensor:
    """Snapshot distillation's loss in a cycle after the first (Yang, Xie, Su, Yuille, "Snapshot Distillation:
    Teacher-Student Optimization in One Generation", CVPR 2019; no official code, from the paper's description)::

        ce_weight · CE(z_s, y) + kd_weight · T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )

    with ``z_t`` the logits [B, C] of the network's snapshot at the end of the previous cycle (detached) and the KL
    the batch mean of per-sample sums (``kdkernels.kd_loss``). Approximation: the paper's temperature, weights and
    whether it softens the student's output too are not confirmed by code; the defaults are unconfirmed choices.
    """
    check = Checks("snapshot_distillation_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    check.labels(labels, student_logits.shape[:1], student_logits.device)
    temperature = check.temperature(temperature)
    ce_weight = check.real("ce_weight", ce_weight, nonnegative=True)
    kd_weight = check.real("kd_weight", kd_weight, nonnegative=True)
    student = accumulate(student_logits)
    distillation = kd_loss(student, accumulate(teacher_logits).detach(), temperature)
    return ce_weight * F.cross_entropy(student, labels) + kd_weight * distillation
