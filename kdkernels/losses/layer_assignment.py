"""Layer-assignment losses: feature matching over many (student layer, teacher layer) pairs, each pair weighted by
learned attention or meta-learned weights (issue 16, "which teacher layer teaches which student layer").

* :func:`semckd_loss` — SemCKD: per-pair MSE weighted by the student-to-teacher layer attention;

The learned parts (query/key embeddings, projections, meta-networks) are the methods' modules
(:mod:`kdkernels.distill.methods.layer_assignment`); these functions take their outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kdkernels._validation import Checks, Reduction
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
