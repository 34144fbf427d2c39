"""Multi-teacher losses: the averaged-ensemble KD, CA-MKD's confidence weights and its two weighted terms.

Plain PyTorch: each function IS the reference of its formula (../shared/reference/methods.md §1.15); the
averaged-ensemble KD runs on the fused ``kd_loss``. All results are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows
from kdkernels.losses.kd import kd_loss


def check_logits_list(check: Checks, name: str, logits_list, reference: torch.Tensor | None = None,
                      minimum: int = 1, reference_name: str = "student_logits") -> list[torch.Tensor]:
    """A list of [B, C] logits, all shaped like `reference` (or like the first) and on its device."""
    logits_list = check.tensor_list(name, logits_list, minimum=minimum)
    if reference is None:
        reference, reference_name = logits_list[0], f"{name}[0]"
    for index, logits in enumerate(logits_list):
        check.logits(f"{name}[{index}]", logits, dims=(2,))
        check.same_shape(f"{name}[{index}]", logits, reference_name, reference)
        check.same_device(f"{name}[{index}]", logits, reference_name, reference)
    return logits_list


def ensemble_kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
                     temperature: float = 4.0, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Averaged-ensemble KD: ``T² · Σ_b KL(p̄ ‖ softmax(s_b/T)) / B`` with ``p̄ = mean_k softmax(t_k/T)``.

    The teachers' tempered probabilities are averaged (not their logits). The KL runs on the fused ``kd_loss``
    against the logits ``T · log p̄``, whose tempered softmax is ``p̄``. With one teacher it is exactly
    ``kd_loss(s, t, T)``. The teachers are detached. ``reduction`` as :func:`kdkernels.kd_loss`'s.
    """
    check = Checks("ensemble_kd_loss")
    check.logits("student_logits", student_logits)
    teachers = check_logits_list(check, "teacher_logits", teacher_logits, student_logits)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    with torch.no_grad():
        acc = accumulate(student_logits).dtype
        mean = torch.stack([torch.softmax(t.to(acc) / temperature, dim=-1) for t in teachers]).mean(0)
        ensemble_logits = temperature * torch.log(mean)
    return kd_loss(student_logits, ensemble_logits.to(student_logits.dtype), temperature, reduction=reduction)


def camkd_weights(teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD's confidence weights ``w_kb = (1 − softmax_k(CE(t_k[b], y_b))) / (K − 1)``, shape [K, B].

    The softmax runs across the K ≥ 2 teachers for each sample, so each column sums to 1 (Rorozhl/CA-MKD
    ``helper/loops.py`` and ``distiller_zoo/CAMKD.py``). Gradients flow through the logits (CA-MKD's intermediate
    weights are not detached).
    """
    check = Checks("camkd_weights")
    teachers = check_logits_list(check, "teacher_logits", teacher_logits, minimum=2)
    check.labels(labels, teachers[0].shape[:1], teachers[0].device)
    losses = torch.stack([F.cross_entropy(accumulate(t), labels, reduction="none") for t in teachers])
    return (1.0 - torch.softmax(losses, dim=0)) / (len(teachers) - 1)


def camkd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor,
               temperature: float = 4.0, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """CA-MKD's weighted KD: ``Σ_{k,b} w_kb · T² Σ_c KL(softmax(t_k/T) ‖ softmax(s/T))_b / (B·K)``.

    ``w = camkd_weights(teacher_logits, labels)`` (Rorozhl/CA-MKD ``loops.py``, ``ensemble_method == 'CAMKD'``, with
    ``DistillKL(is_ca=True)`` per-sample KL). The teachers are detached. ``reduction`` of the per-sample
    ``Σ_k w_kb KL_kb / K``: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over B · C) or ``"none"``.
    """
    check = Checks("camkd_loss")
    check.logits("student_logits", student_logits, dims=(2,))
    teachers = [t.detach() for t in check_logits_list(check, "teacher_logits", teacher_logits, student_logits, 2)]
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    weights = camkd_weights(teachers, labels)
    per_sample = torch.stack([kd_loss(student_logits, t, temperature, reduction="none") for t in teachers])
    rows = (weights.to(per_sample) * per_sample).sum(dim=0) / len(teachers)
    return reduce_rows(rows, reduction, elements=student_logits.shape[1])


def camkd_feature_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                       teacher_logits_on_student: Sequence[torch.Tensor], labels: torch.Tensor, *,
                       reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """CA-MKD's intermediate term ``Σ_{k,b} w'_kb · mean_{chw}(f_s^k − f_t^k)²_b / (B·K)``.

    ``student_features[k]`` is the student feature adapted to teacher k (its Embed), ``teacher_features[k]`` that
    teacher's feature, and ``w' = camkd_weights(teacher_logits_on_student, labels)`` where the logits come from each
    teacher's classifier applied to the adapted student feature. ``w'`` is NOT detached, as coded
    (Rorozhl/CA-MKD ``distiller_zoo/CAMKD.py``). ``reduction`` of the per-sample ``Σ_k w'_kb mean_chw(...) / K``:
    ``"batchmean"`` (above), ``"sum"`` or ``"none"``.
    """
    check = Checks("camkd_feature_loss")
    student_features = check.tensor_list("student_features", student_features)
    teacher_features = check.tensor_list("teacher_features", teacher_features)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    if not len(student_features) == len(teacher_features) == len(teacher_logits_on_student):
        check.value_error("student_features, teacher_features, teacher_logits_on_student",
                          "must hold one adapted student feature, teacher feature and logits per teacher",
                          f"{len(student_features)}, {len(teacher_features)} and {len(teacher_logits_on_student)}")
    weights = camkd_weights(teacher_logits_on_student, labels)
    errors = []
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        check.features(f"student_features[{index}]", student)
        check.features(f"teacher_features[{index}]", teacher)
        if student.shape != teacher.shape:
            check.value_error(f"student_features[{index}], teacher_features[{index}]", "differ in shape (they must "
                              "be equal)", f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
        squared = (accumulate(student) - accumulate(teacher).detach()) ** 2
        errors.append(squared.reshape(squared.shape[0], -1).mean(-1))
    rows = (weights * torch.stack(errors)).sum(dim=0) / len(errors)
    return reduce_rows(rows, reduction)
