"""Losses of the self-distillation and multi-teacher methods: soft cross-entropy (BAN, BYOT), the averaged-ensemble
KD, CA-MKD's confidence weights and its two weighted terms, and BYOT's total loss.

Plain PyTorch: each function IS the reference of its formula (../shared/reference/methods.md §1.12, §1.15); the
averaged-ensemble KD runs on the fused ``kd_loss``. All results are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.losses import _check_labels, _check_logits, _check_temperature, check_logits_pair, kd_loss
from kdkernels.relation_losses import check_features


def _accumulation(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_class_labels(labels, rows: int, device: torch.device) -> None:
    _check_labels(labels, torch.Size([rows]), device, -100)


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def _check_teacher_list(name: str, teacher_logits, student_logits: torch.Tensor | None = None,
                        minimum: int = 1) -> list[torch.Tensor]:
    if isinstance(teacher_logits, torch.Tensor) or not isinstance(teacher_logits, Sequence):
        raise TypeError(f"{name} must be a list or tuple of [B, C] tensors, got {type(teacher_logits).__name__}")
    if len(teacher_logits) < minimum:
        raise ValueError(f"{name} needs at least {minimum} teacher(s), got {len(teacher_logits)}")
    reference = student_logits if student_logits is not None else teacher_logits[0]
    for index, logits in enumerate(teacher_logits):
        _check_logits(f"{name}[{index}]", logits)
        if logits.dim() != 2:
            raise ValueError(f"{name}[{index}] must have shape [B, C], got {tuple(logits.shape)}")
        if student_logits is not None:
            check_logits_pair(student_logits, logits)
        elif logits.shape != reference.shape or logits.device != reference.device:
            raise ValueError(f"{name}[{index}] has shape {tuple(logits.shape)} on {logits.device}; every teacher "
                             f"must match {name}[0] ({tuple(reference.shape)} on {reference.device})")
    return list(teacher_logits)


def soft_cross_entropy_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """``−mean_b Σ_c softmax(t/T)_bc · log_softmax(s/T)_bc``: cross-entropy against the teacher's soft targets.

    It equals ``kd_loss(s, t, T, scale_by_t2=False)`` plus the teacher's entropy, so the gradients agree; the value
    is the one the official code logs. BYOT (luanyunteng/pytorch-be-your-own-teacher ``kd_loss_function``, there
    multiplied by T²) and BAN (Furlanello et al. 2018: the student's cross-entropy on the previous generation's
    output, T = 1) use it. The gradient reaches both inputs; detach the teacher for offline distillation.
    """
    check_logits_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    student, teacher = _accumulation(student_logits), _accumulation(teacher_logits).to(_accumulation(student_logits))
    targets = torch.softmax(teacher / temperature, dim=-1)
    return -(targets * torch.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def ensemble_kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
                     temperature: float = 4.0) -> torch.Tensor:
    """Averaged-ensemble KD: ``T² · Σ_b KL(p̄ ‖ softmax(s_b/T)) / B`` with ``p̄ = mean_k softmax(t_k/T)``.

    The teachers' tempered probabilities are averaged (not their logits). The KL runs on the fused ``kd_loss``
    against the logits ``T · log p̄``, whose tempered softmax is ``p̄``. With one teacher it is exactly
    ``kd_loss(s, t, T)``. The teachers are detached.
    """
    _check_logits("student_logits", student_logits)
    teachers = _check_teacher_list("teacher_logits", teacher_logits, student_logits)
    temperature = _check_temperature(temperature)
    with torch.no_grad():
        acc = _accumulation(student_logits).dtype
        mean = torch.stack([torch.softmax(t.to(acc) / temperature, dim=-1) for t in teachers]).mean(0)
        ensemble_logits = temperature * torch.log(mean)
    return kd_loss(student_logits, ensemble_logits.to(student_logits.dtype), temperature)


def camkd_weights(teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD's confidence weights ``w_kb = (1 − softmax_k(CE(t_k[b], y_b))) / (K − 1)``, shape [K, B].

    The softmax runs across the K ≥ 2 teachers for each sample, so each column sums to 1 (Rorozhl/CA-MKD
    ``helper/loops.py`` and ``distiller_zoo/CAMKD.py``). Gradients flow through the logits (CA-MKD's intermediate
    weights are not detached).
    """
    teachers = _check_teacher_list("teacher_logits", teacher_logits, minimum=2)
    _check_class_labels(labels, teachers[0].shape[0], teachers[0].device)
    losses = torch.stack([F.cross_entropy(_accumulation(t), labels, reduction="none") for t in teachers])
    return (1.0 - torch.softmax(losses, dim=0)) / (len(teachers) - 1)


def camkd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor,
               temperature: float = 4.0) -> torch.Tensor:
    """CA-MKD's weighted KD: ``Σ_{k,b} w_kb · T² Σ_c KL(softmax(t_k/T) ‖ softmax(s/T))_b / (B·K)``.

    ``w = camkd_weights(teacher_logits, labels)`` (Rorozhl/CA-MKD ``loops.py``, ``ensemble_method == 'CAMKD'``, with
    ``DistillKL(is_ca=True)`` per-sample KL). The teachers are detached.
    """
    _check_logits("student_logits", student_logits)
    teachers = [t.detach() for t in _check_teacher_list("teacher_logits", teacher_logits, student_logits, 2)]
    temperature = _check_temperature(temperature)
    weights = camkd_weights(teachers, labels)
    per_sample = torch.stack([kd_loss(student_logits, t, temperature, reduction="none") for t in teachers])
    rows, count = student_logits.shape[0], len(teachers)
    return (weights.to(per_sample) * per_sample).sum() / (rows * count)


def camkd_feature_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                       teacher_logits_on_student: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD's intermediate term ``Σ_{k,b} w'_kb · mean_{chw}(f_s^k − f_t^k)²_b / (B·K)``.

    ``student_features[k]`` is the student feature adapted to teacher k (its Embed), ``teacher_features[k]`` that
    teacher's feature, and ``w' = camkd_weights(teacher_logits_on_student, labels)`` where the logits come from each
    teacher's classifier applied to the adapted student feature. ``w'`` is NOT detached, as coded
    (Rorozhl/CA-MKD ``distiller_zoo/CAMKD.py``).
    """
    for label, values in (("student_features", student_features), ("teacher_features", teacher_features)):
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
            raise TypeError(f"{label} must be a list or tuple of tensors, got {type(values).__name__}")
    if not len(student_features) == len(teacher_features) == len(teacher_logits_on_student):
        raise ValueError(f"one adapted student feature, teacher feature and logits per teacher: got "
                         f"{len(student_features)}, {len(teacher_features)} and {len(teacher_logits_on_student)}")
    weights = camkd_weights(teacher_logits_on_student, labels)
    errors = []
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        check_features(f"student_features[{index}]", student)
        check_features(f"teacher_features[{index}]", teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"student_features[{index}] and teacher_features[{index}] differ in shape: "
                             f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
        squared = (_accumulation(student) - _accumulation(teacher).detach()) ** 2
        errors.append(squared.reshape(squared.shape[0], -1).mean(-1))
    rows, count = labels.shape[0], len(errors)
    return (weights * torch.stack(errors)).sum() / (rows * count)


def _byot_feature_term(head_feature: torch.Tensor, final_feature: torch.Tensor) -> torch.Tensor:
    """``Σ (f − F)² · 1[(f > 0) | (F > 0)]`` over all elements (``feature_loss_function``)."""
    active = ((head_feature > 0) | (final_feature > 0)).to(head_feature.dtype)
    return ((head_feature - final_feature) ** 2 * active).sum()


def byot_loss(final_logits: torch.Tensor, head_logits: Sequence[torch.Tensor], labels: torch.Tensor,
              final_features: torch.Tensor, head_features: Sequence[torch.Tensor], temperature: float = 3.0,
              alpha: float = 0.1, beta: float = 1e-6) -> torch.Tensor:
    """BYOT's total loss (luanyunteng/pytorch-be-your-own-teacher ``train.py``, unofficial code)::

        (1 − α) · [CE(z_final) + Σ_k CE(z_k)]
        + α · T² · Σ_k softCE(z_k / T, softmax(z_final / T).detach())
        + β · Σ_k Σ (f_k − f_final.detach())² · 1[(f_k > 0) | (f_final > 0)]

    ``head_logits``/``head_features`` are the auxiliary heads' outputs (shallow stages), ``final_*`` the network's own
    classifier output and its pooled feature (flattened to [B, D] like the heads' features).
    """
    _check_logits("final_logits", final_logits)
    heads = _check_teacher_list("head_logits", head_logits, final_logits)
    _check_class_labels(labels, final_logits.shape[0], final_logits.device)
    temperature = _check_temperature(temperature)
    alpha, beta = _check_weight("alpha", alpha), _check_weight("beta", beta)
    if isinstance(head_features, torch.Tensor) or len(head_features) != len(heads):
        raise ValueError("head_features must be a list with one feature per head logits")
    final = _accumulation(final_logits)
    final_feature = _accumulation(final_features).reshape(final.shape[0], -1).detach()
    ce = F.cross_entropy(final, labels) + sum(F.cross_entropy(_accumulation(h), labels) for h in heads)
    soft = sum(soft_cross_entropy_loss(h, final.detach(), temperature) for h in heads) * temperature ** 2
    features = []
    for index, feature in enumerate(head_features):
        feature = _accumulation(feature).reshape(final.shape[0], -1)
        if feature.shape != final_feature.shape:
            raise ValueError(f"head_features[{index}] has {feature.shape[1]} features per sample, final_features "
                             f"{final_feature.shape[1]}")
        features.append(_byot_feature_term(feature, final_feature))
    return (1.0 - alpha) * ce + alpha * soft + beta * sum(features)
