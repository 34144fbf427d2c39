"""Layer-assignment losses: feature matching over many (student layer, teacher layer) pairs, each pair weighted by
learned attention or meta-learned weights (issue 16, "which teacher layer teaches which student layer").

* :func:`semckd_loss` — SemCKD: per-pair MSE weighted by the student-to-teacher layer attention;
* :func:`afd_loss` — AFD: per-pair distance of normalised spatial energy maps, weighted by the teacher-to-student
  layer attention;
* :func:`l2t_ww_loss` — L2T-ww: per-pair channel-weighted feature matching, scaled by per-sample pair weights.

The learned parts (query/key embeddings, projections, meta-networks) are the methods' modules
(:mod:`kdkernels.distill.methods.layer_assignment`); these functions take their outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch

import torch.nn.functional as F

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows


def _nested(check: Checks, name: str, value, rows: int | None = None, columns: int | None = None
            ) -> list[list[torch.Tensor]]:
    """A list (length ``rows``) of lists (length ``columns``) of tensors."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or not value:
        check.type_error(name, "a non-empty list of lists of tensors ([student layer][teacher layer])", value)
    result = []
    for i, row in enumerate(value):
        result.append(check.tensor_list(f"{name}[{i}]", row))
    if rows is not None and len(result) != rows:
        check.value_error(name, f"must hold {rows} lists (one per student layer)", f"{len(result)}")
    lengths = {len(row) for row in result}
    if len(lengths) != 1 or (columns is not None and lengths != {columns}):
        want = columns if columns is not None else len(result[0])
        check.value_error(name, f"must hold {want} tensors (one per teacher layer) in every list",
                          f"lengths {[len(row) for row in result]}")
    return result


def semckd_loss(student_features, teacher_features, attention: torch.Tensor, *,
                reduction: Reduction = "mean") -> torch.Tensor:
    """SemCKD (Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021), as
    DefangChen/SemCKD ``distiller_zoo/SemCKD.py`` (``SemCKDLoss``): every (student layer i, teacher layer j) pair's
    MSE per sample, weighted by the attention of student layer i on teacher layer j::

        d_bij = mean_{c,h,w} (s_ij − t_ij)²_b,     loss = Σ_{b,i,j} α_bij · d_bij / (B·S)

    ``student_features[i][j]``: student layer i projected for teacher layer j (the official ``AAEmbed`` output),
    ``teacher_features[i][j]``: teacher layer j at that pair's spatial size, of the same shape [B, ...];
    ``attention`` [B, S, T] (rows summing to 1 in SemCKD, not required here). ``reduction``: ``"mean"`` (the
    official, / (B·S)), ``"batchmean"`` (/ B), ``"sum"``, or ``"none"`` (per sample [B], ``Σ_{i,j} α_bij·d_bij``).
    The teacher values are used as given (detach them to keep gradients off the teacher).
    """
    check = Checks("semckd_loss")
    check.floating("attention", attention, dims=(3,))
    batch, num_student, num_teacher = attention.shape
    students = _nested(check, "student_features", student_features, num_student, num_teacher)
    teachers = _nested(check, "teacher_features", teacher_features, num_student, num_teacher)
    reduction = check.reduction(reduction)
    distances = []
    for i in range(num_student):
        for j in range(num_teacher):
            s_name, t_name = f"student_features[{i}][{j}]", f"teacher_features[{i}][{j}]"
            check.feature_pair(s_name, students[i][j], t_name, teachers[i][j], same_shape=True)
            if students[i][j].shape[0] != batch:
                check.value_error(s_name, f"must have the batch size of attention {tuple(attention.shape)}",
                                  f"shape {tuple(students[i][j].shape)}")
            check.same_device(s_name, students[i][j], "attention", attention)
            student = accumulate(students[i][j])
            difference = student - accumulate(teachers[i][j]).to(student.dtype)
            distances.append(difference.pow(2).reshape(batch, -1).mean(dim=1))
    distances = torch.stack(distances, dim=1).reshape(batch, num_student, num_teacher)
    rows = (accumulate(attention).to(distances.dtype) * distances).sum(dim=(1, 2))
    return reduce_rows(rows, reduction, elements=num_student)


def _energy(feature: torch.Tensor, size=None) -> torch.Tensor:
    """AFD's spatial map of a feature: ``mean_c f²`` [B, 1, H, W], average-pooled to ``size``, flattened and L2
    normalised over the positions (``F.normalize``, eps 1e-12) -> [B, H·W]."""
    energy = accumulate(feature).pow(2).mean(dim=1, keepdim=True)
    if size is not None:
        energy = F.adaptive_avg_pool2d(energy, size)
    return F.normalize(energy.reshape(energy.shape[0], -1), dim=1)


def afd_loss(student_features, teacher_features, attention: torch.Tensor, *,
             reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """Attention-based feature distillation (Ji, Heo, Park, "Show, Attend and Distill: Knowledge Distillation via
    Attention-based Feature Matching", AAAI 2021), as clovaai/attention-feature-distillation ``distill/AFD.py``
    (``Attention.forward``/``cal_diff`` with the values of ``LinearTransformTeacher``/``LinearTransformStudent``
    and ``Sample``): every teacher layer t compares its spatial energy map with every student layer's, pooled to the
    teacher's size, weighted by the attention of teacher layer t on student layer s::

        v_t = normalize(mean_c f_t²),   v_st = normalize(avgpool_{H_t×W_t}(mean_c f_s²)),
        loss = Σ_t mean_b Σ_s α_bts · mean_hw (v_st − v_t)²

    ``student_features`` / ``teacher_features``: lists of [B, C, H, W] maps (any channel counts and sizes);
    ``attention`` [B, T, S] (the meta-network's softmax over the student layers; rows summing to 1 are not
    required). ``reduction``: ``"batchmean"`` (the official), ``"sum"``, or ``"none"`` (per sample [B], summed over
    the pairs). The teacher maps are used as given (detach them to keep gradients off the teacher).
    """
    check = Checks("afd_loss")
    students = check.tensor_list("student_features", student_features)
    teachers = check.tensor_list("teacher_features", teacher_features)
    check.floating("attention", attention, dims=(3,))
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    batch = attention.shape[0]
    if tuple(attention.shape[1:]) != (len(teachers), len(students)):
        check.value_error("attention", f"must have shape [B, {len(teachers)}, {len(students)}] (teacher layers, "
                          "student layers)", f"shape {tuple(attention.shape)}")
    for name, maps in (("student_features", students), ("teacher_features", teachers)):
        for index, feature in enumerate(maps):
            check.features(f"{name}[{index}]", feature, dims=(4,))
            if feature.shape[0] != batch:
                check.value_error(f"{name}[{index}]", f"must have the batch size of attention "
                                  f"{tuple(attention.shape)}", f"shape {tuple(feature.shape)}")
            check.same_device(f"{name}[{index}]", feature, "attention", attention)
    rows = None
    for t, teacher in enumerate(teachers):
        size = tuple(teacher.shape[2:])
        target = _energy(teacher)
        values = torch.stack([_energy(student, size) for student in students], dim=1)      # B × S × HW_t
        distances = (values - target.to(values.dtype).unsqueeze(1)).pow(2).mean(dim=2)       # B × S
        pair_rows = (accumulate(attention[:, t]).to(distances.dtype) * distances).sum(dim=1)
        rows = pair_rows if rows is None else rows + pair_rows
    return reduce_rows(rows, reduction)


def _weights(check: Checks, name: str, value, pairs: int):
    """None, or a list of ``pairs`` float tensors."""
    if value is None:
        return None
    weights = check.tensor_list(name, value)
    if len(weights) != pairs:
        check.value_error(name, f"must hold one tensor per pair ({pairs})", f"{len(weights)}")
    for index, weight in enumerate(weights):
        check.floating(f"{name}[{index}]", weight)
    return weights


def l2t_ww_loss(student_features, teacher_features, channel_weights=None, pair_weights=None, *,
                reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """Learning what and where to transfer (Jang, Lee, Hwang, Shin, ICML 2019), as alinlab/L2T-ww
    ``train_l2t_ww.py`` (``FeatureMatching.forward``, β left to the caller): for every (teacher layer, student
    layer) pair p the teacher map, bilinearly resized to the student map's width when they differ
    (``F.interpolate(scale_factor=W_s / W_t, mode="bilinear")``), against the student map already mapped to the
    teacher's channels (the official 1×1 conv)::

        d_pbc = mean_hw (resize(t_p) − s_p)²_bc,    loss = Σ_p mean_b λ_pb · Σ_c w_pbc · d_pbc

    ``student_features`` / ``teacher_features``: one [B, C_p, H, W] map per pair, with the same channels;
    ``channel_weights``: None (then ``Σ_c w·d`` is ``mean_c d`` without ``pair_weights`` and ``Σ_c d`` with them,
    as the official branches ``weight is None``) or per pair
    [B, C_p] (what to transfer: the official ``WeightNetwork``'s softmax); ``pair_weights``: None (λ 1) or per pair
    a tensor of B (or 1) elements (where: the official ``LossWeightNetwork``'s [B, 1] output). ``reduction``:
    ``"batchmean"`` (the official), ``"sum"`` or ``"none"`` (per sample [B], summed over the pairs). The teacher
    maps are used as given (detach them to keep gradients off the teacher). Twice differentiable (torch ops).
    """
    check = Checks("l2t_ww_loss")
    students = check.tensor_list("student_features", student_features)
    teachers = check.tensor_list("teacher_features", teacher_features)
    if len(teachers) != len(students):
        check.value_error("teacher_features", f"must hold one map per student map ({len(students)})",
                          f"{len(teachers)} maps")
    channel_weights = _weights(check, "channel_weights", channel_weights, len(students))
    pair_weights = _weights(check, "pair_weights", pair_weights, len(students))
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    rows = None
    for p, (student, teacher) in enumerate(zip(students, teachers)):
        s_name, t_name = f"student_features[{p}]", f"teacher_features[{p}]"
        check.feature_pair(s_name, student, t_name, teacher, dims=(4,))
        batch, channels = student.shape[:2]
        if teacher.shape[1] != channels:
            check.value_error(s_name, f"must have the channels of {t_name} {tuple(teacher.shape)} (map the student "
                              "with the 1×1 conv first)", f"shape {tuple(student.shape)}")
        student = accumulate(student)
        teacher = accumulate(teacher).to(student.dtype)
        if teacher.shape[3] != student.shape[3]:
            teacher = F.interpolate(teacher, scale_factor=student.shape[3] / teacher.shape[3], mode="bilinear")
        if teacher.shape[2:] != student.shape[2:]:
            check.value_error(t_name, f"must resize to the spatial size of {s_name} {tuple(student.shape)} by the "
                              "factor of their widths", f"shape {tuple(teacher.shape)} after resizing")
        distances = (teacher - student).pow(2).mean(dim=(2, 3))                                   # B × C
        if channel_weights is None:     # the official: mean over channels without any weights, else their sum
            pair_rows = distances.mean(dim=1) if pair_weights is None else distances.sum(dim=1)
        else:
            weight = channel_weights[p]
            check.shape(f"channel_weights[{p}]", weight, (batch, channels))
            check.same_device(f"channel_weights[{p}]", weight, s_name, student)
            pair_rows = (distances * accumulate(weight).to(distances.dtype)).sum(dim=1)
        if pair_weights is not None:
            weight = pair_weights[p]
            if weight.numel() not in (1, batch):
                check.value_error(f"pair_weights[{p}]", f"must hold 1 or B = {batch} elements",
                                  f"shape {tuple(weight.shape)}")
            check.same_device(f"pair_weights[{p}]", weight, s_name, student)
            pair_rows = pair_rows * accumulate(weight).to(pair_rows.dtype).reshape(-1)
        rows = pair_rows if rows is None else rows + pair_rows
    return reduce_rows(rows, reduction)
