"""Self-supervised and consistency losses that compose torch ops: what a model is taught by another view of the
data or by its own moving average (the mean teacher's softmax MSE).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the official code
named in its docstring.
"""
from __future__ import annotations

import torch

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import accumulate, reduce_rows


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     reduction: Reduction = "batchmean") -> torch.Tensor:
    """``Σ_b Σ_c (softmax(s)_bc − softmax(t)_bc)² / C / B``: the mean teacher's consistency cost.

    As CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss`` codes it (a sum over the batch
    and the C classes divided by C; ``pytorch/main.py`` then divides by the minibatch size and multiplies by the
    ramped-up consistency weight). Per sample: ``Σ_c (p_s − p_t)² / C``. ``reduction`` over samples:
    ``"batchmean"`` (above), ``"sum"`` (the official function's return value), ``"mean"`` (the same as batchmean:
    a sample's value is already a mean over classes) or ``"none"``. The gradient reaches both inputs; the official
    code sends it to the student only (pass the teacher's logits detached, or from a frozen model).
    """
    check = Checks("softmax_mse_loss")
    check.logits_pair(student_logits, teacher_logits)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    classes = student_logits.shape[-1]
    squares = (torch.softmax(student, dim=-1) - torch.softmax(teacher, dim=-1)).pow(2)
    rows = squares.reshape(-1, classes).sum(dim=-1)
    return reduce_rows(rows, "batchmean" if reduction == "mean" else reduction,
                       leading_shape=student_logits.shape[:-1], scale=1.0 / classes)
