"""Self-distillation losses: a network teaches itself (BYOT's deepest classifier teaches its shallow heads).

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
