"""Multi-teacher losses: the averaged-ensemble KD, CA-MKD's confidence weights and its two weighted terms; ONE's
gated branch ensemble.

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


def one_loss(branch_logits: Sequence[torch.Tensor], gate_weights: torch.Tensor, labels: torch.Tensor,
             temperature: float = 3.0, kl_weight: float = 1.0, *,
             reduction: Reduction = "batchmean") -> torch.Tensor:
    """ONE, On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018): m branches and their gated ensemble::

        z_e  = Σ_i g_i · z_i                                   (g: the gate's per-sample weights, [B, m])
        loss = Σ_i CE(z_i, y) + CE(z_e, y) + w · Σ_i T² · KL(softmax(z_e/T).detach() ‖ softmax(z_i/T))

    Lan1991Xu/ONE_NeurIPS2018 ``cifar_one.py`` ``train`` (``loss_cross + consistency_weight · Σ criterion_kl``) with
    ``loss/kl_loss.py`` ``KLLoss`` (T 3, T², sum over the batch / B, the ensemble target detached) and
    ``models/cifar/resnet.py`` ``ONE_ResNet.forward`` (``x_m = Σ x_c_i · x_3_i``, logits weighted per sample).
    ``kl_weight`` is the official ``consistency_weight`` (a sigmoid ramp-up over epochs, applied by the caller).
    KLLoss adds 1e-7 to the ensemble's probabilities before its logarithm; this is the exact KL (no epsilon).
    Gradients reach every branch and, through ``CE(z_e, y)``, the gate; not through the KL's target.
    ``reduction`` of the per-sample sum: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over B · C) or ``"none"``.
    """
    check = Checks("one_loss")
    branches = check_logits_list(check, "branch_logits", branch_logits, minimum=1)
    check.floating("gate_weights", gate_weights, dims=(2,))
    batch, m = branches[0].shape[0], len(branches)
    check.shape("gate_weights", gate_weights, (batch, m), f"[B, m] = [{batch}, {m}]")
    check.same_device("gate_weights", gate_weights, "branch_logits[0]", branches[0])
    temperature = check.temperature(temperature)
    kl_weight = check.real("kl_weight", kl_weight, nonnegative=True)
    reduction = check.reduction(reduction)
    targets = check.class_labels(labels, branches[0])
    acc = accumulate(branches[0]).dtype
    stacked = torch.stack([z.to(acc) for z in branches])                        # [m, B, C]
    ensemble = torch.einsum("bm,mbc->bc", gate_weights.to(acc), stacked)
    rows = F.cross_entropy(ensemble, targets, reduction="none")
    detached = ensemble.detach()
    for z in stacked:
        rows = rows + F.cross_entropy(z, targets, reduction="none")
        if kl_weight:
            rows = rows + kl_weight * kd_loss(z, detached, temperature, reduction="none")
    return reduce_rows(rows, reduction, elements=branches[0].shape[1])
