"""Losses of data-free distillation, composing torch ops: DFAD's teacher–student logit discrepancy (the student
minimises it, the generator maximises it) and DeepInversion's image-synthesis objective (batch-norm feature
statistics, image priors).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the official code
named in its docstring. (DAFL's generator objective is in :mod:`kdkernels.losses.generative`.)
"""
from __future__ import annotations

import torch

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import accumulate
from kdkernels.losses.feature import reduce_elements


def dfad_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              reduction: Reduction = "mean") -> torch.Tensor:
    """DFAD's discrepancy ``mean_{b,c} |z_s − z_t|`` (the MAE of the logits; Fang, Song, Song, Sun 2019;
    VainF/Data-Free-Adversarial-Distillation ``DFAD_mnist.py``/``DFAD_cifar.py``: ``F.l1_loss(s_logit, t_logit)``).
    The student minimises it on generated images (teacher detached), the generator maximises it (``loss_G = −it``,
    gradients through both networks). ``reduction`` over the B·C terms: ``"mean"`` (official), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (per-sample sums). Computed in fp32 (float64 stays)."""
    check = Checks("dfad_loss")
    check.logits_pair(student_logits, teacher_logits)
    reduction = check.reduction(reduction)
    difference = (accumulate(student_logits) - accumulate(teacher_logits)).abs()
    return reduce_elements(difference.reshape(difference.shape[0], -1) if difference.dim() > 1
                           else difference.unsqueeze(0), reduction)


def deepinversion_feature_loss(features, running_means, running_vars, *,
                               first_bn_multiplier: float = 10.0) -> torch.Tensor:
    """DeepInversion's feature-distribution regulariser ``R_feature = Σ_l s_l (‖σ²_l − σ²_BN,l‖₂ + ‖μ_l − μ_BN,l‖₂)``
    (Yin et al., CVPR 2020; NVlabs/DeepInversion ``deepinversion.py`` ``DeepInversionFeatureHook`` and
    ``get_images``): ``features[l]`` the input ``[B, C, ...]`` of the teacher's l-th batch-norm layer on the
    synthesised batch, μ_l / σ²_l its per-channel batch mean / biased variance (over the batch and every position),
    ``running_means[l]`` / ``running_vars[l]`` ``[C]`` that layer's stored statistics (constants, as the official
    ``.data``); ``s_0 = first_bn_multiplier`` (official 10, ``imagenet_inversion.py``; 1 in the CIFAR script),
    ``s_l = 1`` after. Gradients reach the features (and through the frozen network the images). Computed in fp32
    (float64 stays); returns a scalar."""
    check = Checks("deepinversion_feature_loss")
    features = check.tensor_list("features", features)
    running_means = check.tensor_list("running_means", running_means)
    running_vars = check.tensor_list("running_vars", running_vars)
    for name, values in (("running_means", running_means), ("running_vars", running_vars)):
        if len(values) != len(features):
            check.value_error(name, f"must hold one tensor per feature map ({len(features)})", f"{len(values)}")
    first_bn_multiplier = check.real("first_bn_multiplier", first_bn_multiplier, minimum=0.0)
    total = None
    for layer, (feature, mean_bn, var_bn) in enumerate(zip(features, running_means, running_vars)):
        feature = check.floating(f"features[{layer}]", feature, min_dim=2)
        mean_bn = check.floating(f"running_means[{layer}]", mean_bn, dims=(1,))
        var_bn = check.floating(f"running_vars[{layer}]", var_bn, dims=(1,))
        check.shape(f"running_means[{layer}]", mean_bn, (feature.shape[1],), "[C] of its feature map")
        check.shape(f"running_vars[{layer}]", var_bn, (feature.shape[1],), "[C] of its feature map")
        x = accumulate(feature)
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)                           # [C, B·positions]
        mean, var = rows.mean(1), rows.var(1, unbiased=False)
        r_feature = torch.linalg.vector_norm(var_bn.detach().to(x.dtype) - var) \
            + torch.linalg.vector_norm(mean_bn.detach().to(x.dtype) - mean)
        r_feature = r_feature * first_bn_multiplier if layer == 0 else r_feature
        total = r_feature if total is None else total + r_feature
    return total


def deepinversion_prior_loss(images: torch.Tensor, *, tv_l1: float = 0.0, tv_l2: float = 1e-4,
                             l2: float = 1e-5) -> torch.Tensor:
    """DeepInversion's image priors ``tv_l2·Σ_k ‖d_k‖₂ + tv_l1·Σ_k mean|d_k| + l2·mean_b ‖x_b‖₂`` on images
    ``[B, C, H, W]`` (NVlabs/DeepInversion ``deepinversion.py`` ``get_image_prior_losses`` and ``get_images``):
    ``d_1..d_4`` the differences of horizontal, vertical and both diagonal neighbours (``‖·‖₂`` the L2 norm of the
    whole difference tensor), ``x_b`` an image flattened. Defaults ``imagenet_inversion.py`` (``--tv_l1 0
    --tv_l2 1e-4 --l2 1e-5``). Computed in fp32 (float64 stays); returns a scalar."""
    check = Checks("deepinversion_prior_loss")
    images = check.floating("images", images, dims=(4,))
    weights = [check.real(name, value, minimum=0.0) for name, value in (("tv_l1", tv_l1), ("tv_l2", tv_l2),
                                                                         ("l2", l2))]
    x = accumulate(images)
    differences = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
                   x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    tv_l1_value = sum(d.abs().mean() for d in differences)
    tv_l2_value = sum(torch.linalg.vector_norm(d) for d in differences)
    l2_value = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).mean()
    return weights[0] * tv_l1_value + weights[1] * tv_l2_value + weights[2] * l2_value


def adi_competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's competition term ``1 − clamp(JS, 0, 1)`` (NVlabs/DeepInversion ``deepinversion.py``
    ``get_images``, ``adi_scale``): ``P = softmax(z_s/T)``, ``Q = softmax(z_t/T)``, ``M = (P + Q)/2``, each then
    clamped to [0.01, 0.99], ``JS = ½·KL(M ‖ P) + ½·KL(M ‖ Q)`` (``KLDivLoss(batchmean)``, i.e. summed over classes,
    averaged over the batch); T = 3. Minimising it makes images on which the student disagrees with the teacher.
    Computed in fp32 (float64 stays); returns a scalar."""
    check = Checks("adi_competition_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    temperature = check.temperature(temperature)
    p = torch.softmax(accumulate(student_logits) / temperature, dim=1)
    q = torch.softmax(accumulate(teacher_logits) / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    rows = p.shape[0]
    divergence = 0.5 * (m * (m.log() - p.log())).sum() / rows + 0.5 * (m * (m.log() - q.log())).sum() / rows
    return 1.0 - divergence.clamp(0.0, 1.0)


def zskd_class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """Zero-Shot KD's class-similarity matrix from the teacher's final-layer weight ``[C, D]`` (Nayak et al., ICML
    2019; vcl-iisc/ZSKD ``di_generation/dirichmat.py``): each class's weight vector L2-normalised, ``S = Ŵ Ŵᵀ``
    ``[C, C]``, then min–max normalised over the whole matrix to [0, 1] (the official ``norm1``; its TF weight is
    ``[D, C]``, normalised per column). Computed in fp32 (float64 stays); no gradient is needed."""
    check = Checks("zskd_class_similarity")
    weight = check.floating("weight", weight, dims=(2,))
    if weight.shape[0] < 2:
        check.value_error("weight", "must hold at least 2 classes (rows)", f"shape {tuple(weight.shape)}")
    w = torch.nn.functional.normalize(accumulate(weight), dim=1)
    similarity = w @ w.T
    low, high = similarity.min(), similarity.max()
    return (similarity - low) / (high - low).clamp_min(torch.finfo(similarity.dtype).tiny)


def zskd_impression_loss(teacher_logits: torch.Tensor, soft_targets: torch.Tensor,
                         temperature: float = 20.0) -> torch.Tensor:
    """Zero-Shot KD's data-impression objective ``mean_b −Σ_c y_bc · log softmax(z_t/T)_bc`` (vcl-iisc/ZSKD
    ``di_generation/cifar_10_impressions_alexnet_Dirch.py``: ``softmax_cross_entropy_with_logits_v2(logits=
    net_logits/20, labels=dirichlet targets)``, reduce_mean): the images are optimised so that the teacher's
    tempered softmax matches Dirichlet-sampled soft targets ``y`` (rows of probabilities ``[B, C]``); T = 20.
    Computed in fp32 (float64 stays); returns a scalar."""
    check = Checks("zskd_impression_loss")
    teacher_logits = check.logits("teacher_logits", teacher_logits, dims=(2,))
    soft_targets = check.floating("soft_targets", soft_targets, dims=(2,))
    check.same_shape("soft_targets", soft_targets, "teacher_logits", teacher_logits)
    check.same_device("soft_targets", soft_targets, "teacher_logits", teacher_logits)
    temperature = check.temperature(temperature)
    log_probs = torch.log_softmax(accumulate(teacher_logits) / temperature, dim=1)
    return -(accumulate(soft_targets).to(log_probs.dtype) * log_probs).sum(1).mean()
