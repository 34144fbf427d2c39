"""The ``target_split`` op: DKD's and NKD's per-row terms (target / non-target split of both softmaxes).

``target_split_forward(student, teacher, labels, T) -> (terms [N, 6], stats_student [N, 2], stats_teacher [N, 2])``
with terms = (log p_s[y], log(1 - p_s[y]), log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t)), q the softmax over
the non-target columns; ``terms`` is differentiable (its backward writes each gradient in one dense pass), the stats
are what the backward needs. Spec: kdkernels/reference/target_split.py.
"""
from __future__ import annotations

import torch

from kdkernels._validation import promote_float64
from kdkernels.ops._checks import check_target_split_backward, check_target_split_forward
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import target_split as reference

OP = "target_split"


def _fake_forward(op, student, teacher, labels, temperature):
    check_target_split_forward(op, student, teacher, labels, temperature)
    rows, dtype = student.shape[0], accumulation_dtype(student)
    return (student.new_empty((rows, 6), dtype=dtype), student.new_empty((rows, 2), dtype=dtype),
            student.new_empty((rows, 2), dtype=dtype))


def _fake_backward(op, grad_terms, student, teacher, labels, stats_student, stats_teacher, terms, temperature,
                   student_grad, teacher_grad):
    check_target_split_backward(op, grad_terms, student, teacher, labels, stats_student, stats_teacher, terms,
                                temperature)
    return empty_gradient_like(student, student_grad), empty_gradient_like(teacher, teacher_grad)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, temperature = inputs
    terms, stats_student, stats_teacher = output
    ctx.save_for_backward(student, teacher, labels, stats_student, stats_teacher, terms)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats_student, stats_teacher)


def _make_backward(backward_op):
    def backward(ctx, grad_terms, _grad_stats_student, _grad_stats_teacher):
        student, teacher, labels, stats_student, stats_teacher, terms = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_terms.contiguous(), student, teacher, labels, stats_student,
                                                 stats_teacher, terms, ctx.temperature, student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None, None)

    return backward


register(OpSpec(OP, _fake_forward, _setup_context, _make_backward, _fake_backward))


def target_split_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                       backend: str) -> torch.Tensor:
    """The six per-row terms [N, 6] of 2-D logits and int64 labels [N] (values in [0, V)) on the named backend."""
    student, teacher = promote_float64(student, teacher)
    if backend == "reference":
        return reference.target_split_terms(student, teacher, labels, temperature)
    return forward_op(OP, backend)(student, teacher, labels, temperature)[0]
