"""The ``dist`` op: DIST's row (inter-class) and column (intra-class) Pearson correlations of two softmaxes.

``dist_forward(student, teacher, T) -> (row_pearson [N], col_pearson [V], row_moments [N, 3], col_moments [V, 5],
stats_student [N, 2], stats_teacher [N, 2])``; the two Pearson vectors (accumulation dtype) are differentiable, the
rest (float64) is what the backward needs (it never stores a probability tensor). Spec: kdkernels/reference/dist.py.
"""
from __future__ import annotations

import torch

from kdkernels._validation import promote_float64
from kdkernels.ops._checks import check_dist_backward, check_logit_pair
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import dist as reference

OP = "dist"


def _fake_forward(op, student, teacher, temperature):
    check_logit_pair(op, student, teacher, temperature)
    rows, cols = student.shape
    dtype = accumulation_dtype(student)
    return (student.new_empty((rows,), dtype=dtype), student.new_empty((cols,), dtype=dtype),
            *(student.new_empty(shape, dtype=torch.float64) for shape in ((rows, 3), (cols, 5), (rows, 2), (rows, 2))))


def _fake_backward(op, grad_row, grad_col, student, teacher, row_moments, col_moments, stats_student, stats_teacher,
                   temperature, student_grad, teacher_grad):
    check_dist_backward(op, grad_row, grad_col, student, teacher, row_moments, col_moments, stats_student,
                        stats_teacher, temperature)
    return empty_gradient_like(student, student_grad), empty_gradient_like(teacher, teacher_grad)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature = inputs
    _row, _col, row_moments, col_moments, stats_student, stats_teacher = output
    ctx.save_for_backward(student, teacher, row_moments, col_moments, stats_student, stats_teacher)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(row_moments, col_moments, stats_student, stats_teacher)


def _make_backward(backward_op):
    def backward(ctx, grad_row, grad_col, *_grad_saved):
        student, teacher, row_moments, col_moments, stats_student, stats_teacher = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, cols = student.shape
        dtype = accumulation_dtype(student)
        grad_row = torch.zeros(rows, dtype=dtype, device=student.device) if grad_row is None else grad_row
        grad_col = torch.zeros(cols, dtype=dtype, device=student.device) if grad_col is None else grad_col
        grad_student, grad_teacher = backward_op(grad_row.contiguous(), grad_col.contiguous(), student, teacher,
                                                 row_moments, col_moments, stats_student, stats_teacher,
                                                 ctx.temperature, student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None)

    return backward


register(OpSpec(OP, _fake_forward, _setup_context, _make_backward, _fake_backward))


def dist_pearson(student: torch.Tensor, teacher: torch.Tensor, temperature: float, backend: str):
    """(row_pearson [N], col_pearson [V]) of 2-D logits on the named backend (see the reference)."""
    student, teacher = promote_float64(student, teacher)
    if backend == "reference":
        return reference.dist_pearson(student, teacher, temperature)
    outputs = forward_op(OP, backend)(student, teacher, temperature)
    return outputs[0], outputs[1]
