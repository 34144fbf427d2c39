"""Losses of online feature-map distillation, composing torch ops: the least-squares adversarial losses with which
AFD (Chung, Park, Kim, Kwak, "Feature-map-level Online Adversarial Knowledge Distillation", ICML 2020) trains each
network's feature-map discriminator and the network that tries to fool it; OEC-KD's combined loss of a student
ensemble distilled from its own mean (Walawalkar, Shen, Savvides, ECCV 2020).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the paper or code named
in its docstring.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks
from kdkernels.losses._common import accumulate
from kdkernels.losses.ensemble import check_logits_list
from kdkernels.losses.kd import kd_loss


def _scores(check: Checks, name: str, value) -> torch.Tensor:
    """Discriminator outputs ``[B, ...]``: float, at least one dimension, not empty."""
    return check.floating(name, value, min_dim=1)


def lsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """``mean (1 − D(real))² + mean D(fake)²``: the least-squares discriminator loss (Mao et al., LSGAN, labels
    1 for real, 0 for fake) as AFD writes it for network k's discriminator (Chung et al., ICML 2020, eq. of
    ``L_D``)::

        L_{D_k} = [1 − D_k(T_j(G_j(x)))]² + [D_k(T_k(G_k(x)))]²       # the peer's map real, the own map fake

    ``real_scores`` / ``fake_scores``: the discriminator's outputs (probabilities after its sigmoid), ``[B, ...]``
    (one score per sample or a map of patch scores); each mean runs over all of its elements. Detach the feature maps
    for the discriminator's step. fp16/bf16 scores are computed in fp32; the result is an fp32 (fp64 for fp64) scalar.
    """
    check = Checks("lsgan_discriminator_loss")
    real_scores, fake_scores = _scores(check, "real_scores", real_scores), _scores(check, "fake_scores", fake_scores)
    check.same_device("fake_scores", fake_scores, "real_scores", real_scores)
    real, fake = accumulate(real_scores), accumulate(fake_scores)
    return (1.0 - real).square().mean() + fake.square().mean()


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """``mean (1 − D(fake))²``: the least-squares loss of the network that tries to make its discriminator take its
    own feature map for the peer's (AFD, Chung et al., ICML 2020, ``L_{G_k} = [1 − D_k(T_k(G_k(x)))]²``).

    ``fake_scores``: the discriminator's outputs (probabilities) on the network's own map, ``[B, ...]``, mean over
    all elements; the gradient reaches the network through the discriminator. fp32 (fp64 for fp64) scalar.
    """
    check = Checks("lsgan_generator_loss")
    fake = accumulate(_scores(check, "fake_scores", fake_scores))
    return (1.0 - fake).square().mean()


def oec_kd_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, target_features: Sequence[torch.Tensor],
                adapted_features: Sequence[Sequence[torch.Tensor]], temperature: float = 2.0, ce_weight: float = 0.7,
                feature_weight: float = 0.15, kl_weight: float = 0.15, *, return_parts: bool = False):
    """OEC-KD's combined loss (Walawalkar, Shen, Savvides, "Online Ensemble Model Compression using Knowledge
    Distillation", ECCV 2020), as Devwalkar/BOC-KD ``utils/Losses.py`` ``Combined_Loss.student_forward``::

        z_e    = (1/K) Σ_i z_i                                   # the pseudo teacher: the students' mean logits
        normal = Σ_i CE(z_i, y)                                  # every student, not the pseudo teacher
        inter  = Σ_b Σ_{j≥1} mean((f_0^b − A_j^b(f_j^b))²)        # nn.MSELoss; f_0 (student 0's maps) detached
        kl     = Σ_i T² · KL(softmax(z_e/T) ‖ softmax(z_i/T))      # batchmean; the pseudo teacher detached
        loss   = ce_weight·normal + feature_weight·inter + kl_weight·kl

    ``logits``: the K ≥ 2 students' ``[B, C]`` logits, student 0 (the uncompressed one, whose maps are the feature
    targets) first. ``target_features``: student 0's maps, one per block ``b`` (used detached).
    ``adapted_features``: for each student j ≥ 1 (K − 1 lists), its maps per block already through its adaptation
    layer ``A_j^b`` (the official 1×1 convolutions), each shaped as the block's target. Defaults: the official
    CIFAR-100 ResNet configs (``contribution_ratios = [0.7, 0.15, 0.15]``, ``KL_loss_temperature = 2``).
    ``return_parts=True`` returns the unweighted ``(normal, inter, kl)``. fp32 (fp64 for fp64) scalars.
    """
    check = Checks("oec_kd_loss")
    logits = check_logits_list(check, "logits", logits, minimum=2)
    labels = check.class_labels(labels, logits[0])
    targets = check.tensor_list("target_features", target_features)
    for index, target in enumerate(targets):
        check.floating(f"target_features[{index}]", target, min_dim=2)
        check.same_device(f"target_features[{index}]", target, "logits[0]", logits[0])
    if isinstance(adapted_features, torch.Tensor) or not isinstance(adapted_features, Sequence):
        check.type_error("adapted_features", "a list (one per student after the first) of lists of tensors",
                         adapted_features)
    if len(adapted_features) != len(logits) - 1:
        check.value_error("adapted_features", f"must hold one list per student after the first ({len(logits) - 1})",
                          f"{len(adapted_features)} lists")
    for student, maps in enumerate(adapted_features, start=1):
        name = f"adapted_features[{student - 1}]"
        maps = check.tensor_list(name, maps)
        if len(maps) != len(targets):
            check.value_error(name, f"must hold one map per block ({len(targets)}, as target_features)",
                              f"{len(maps)} maps")
        for block, (value, target) in enumerate(zip(maps, targets)):
            check.floating(f"{name}[{block}]", value)
            check.same_shape(f"{name}[{block}]", value, f"target_features[{block}]", target,
                             " (map the student's channels with its adaptation layer)")
    temperature = check.temperature(temperature)
    weights = [check.real(name, value, minimum=0.0) for name, value in (
        ("ce_weight", ce_weight), ("feature_weight", feature_weight), ("kl_weight", kl_weight))]
    check.flag("return_parts", return_parts)
    acc = [accumulate(z) for z in logits]
    normal = sum(F.cross_entropy(z, labels) for z in acc)
    inter = sum(F.mse_loss(accumulate(target).detach(), accumulate(value))
                for maps in adapted_features for value, target in zip(maps, targets))
    ensemble = torch.stack(acc).mean(dim=0).detach()
    kl = sum(kd_loss(z, ensemble, temperature) for z in acc)
    parts = (normal, inter, kl)
    if return_parts:
        return parts
    return sum(weight * part for weight, part in zip(weights, parts))
