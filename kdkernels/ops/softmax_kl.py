"""The ``softmax_kl`` op family: fake (meta) kernels, autograd and dispatch to one backend.

Ops (schemas in csrc/kdkernels.cpp; Triton twins in kdkernels/triton/softmax_kl.py):

* ``softmax_kl_forward(student, teacher, T) -> (loss, stats_student, stats_teacher)``: per-row
  KL(softmax(teacher/T) || softmax(student/T)) of 2-D logits [N, V], plus per-row statistics [N, 2] =
  (max, log_sum) of each side, with log p = (x - max) / T - log_sum: what the backward needs.
* ``softmax_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, T, student_grad,
  teacher_grad)``.

The backward saves only the inputs and five fp32 numbers per row; it never keeps a probability tensor.
Formulas and ``-inf`` conventions: kdkernels/reference/softmax_kl.py.
"""
from __future__ import annotations

import torch

from kdkernels._validation import promote_float64
from kdkernels.ops._checks import check_jsd_backward, check_jsd_forward, check_kl_backward, check_logit_pair
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import softmax_kl as reference


def _fake_forward(op, student, teacher, temperature):
    check_logit_pair(op, student, teacher, temperature)
    rows, dtype = student.shape[0], accumulation_dtype(student)
    return (student.new_empty((rows,), dtype=dtype), student.new_empty((rows, 2), dtype=dtype),
            student.new_empty((rows, 2), dtype=dtype))


def _fake_backward(op, grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature, student_grad,
                   teacher_grad):
    check_kl_backward(op, grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature)
    return empty_gradient_like(student, student_grad), empty_gradient_like(teacher, teacher_grad)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature = inputs
    loss, stats_student, stats_teacher = output
    ctx.save_for_backward(student, teacher, stats_student, stats_teacher, loss)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats_student, stats_teacher)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats_student, _grad_stats_teacher):
        student, teacher, stats_student, stats_teacher, loss = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_loss.contiguous(), student, teacher, stats_student, stats_teacher,
                                                 loss, ctx.temperature, student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None)

    return backward


def _fake_jsd_forward(op, student, teacher, temperature, beta):
    check_jsd_forward(op, student, teacher, temperature, beta)
    rows, dtype = student.shape[0], accumulation_dtype(student)
    return (student.new_empty((rows,), dtype=dtype),) + tuple(student.new_empty((rows, 2), dtype=dtype)
                                                               for _ in range(3))


def _fake_jsd_backward(op, grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature, beta,
                       student_grad, teacher_grad):
    check_jsd_backward(op, grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature, beta)
    return empty_gradient_like(student, student_grad), empty_gradient_like(teacher, teacher_grad)


def _setup_jsd_context(ctx, inputs, output):
    student, teacher, temperature, beta = inputs
    _loss, stats_student, stats_teacher, mixture_kl = output
    ctx.save_for_backward(student, teacher, stats_student, stats_teacher, mixture_kl)
    ctx.temperature, ctx.beta = temperature, beta
    ctx.mark_non_differentiable(stats_student, stats_teacher, mixture_kl)


def _make_jsd_backward(backward_op):
    def backward(ctx, grad_loss, *_grad_statistics):
        student, teacher, stats_student, stats_teacher, mixture_kl = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_loss.contiguous(), student, teacher, stats_student,
                                                 stats_teacher, mixture_kl, ctx.temperature, ctx.beta,
                                                 student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None, None)

    return backward


register(OpSpec("softmax_kl", _fake_forward, _setup_context, _make_backward, _fake_backward))
register(OpSpec("softmax_jsd", _fake_jsd_forward, _setup_jsd_context, _make_jsd_backward, _fake_jsd_backward))


def softmax_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """Per-row KL(p_t || p_s) of 2-D logits [N, V] (last dim unit-stride) on the named backend -> [N].

    float32 result (float64 when either input is float64); differentiable with respect to both inputs.
    """
    student, teacher = promote_float64(student, teacher)
    if backend == "reference":
        return reference.softmax_kl_rows(student, teacher, temperature)
    return forward_op("softmax_kl", backend)(student, teacher, temperature)[0]


def softmax_jsd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float,
                     backend: str) -> torch.Tensor:
    """Per-row generalised JSD(beta) of 2-D logits, 0 < beta < 1, on the named backend -> [N] (see the reference)."""
    student, teacher = promote_float64(student, teacher)
    if backend == "reference":
        return reference.softmax_jsd_rows(student, teacher, temperature, beta)
    return forward_op("softmax_jsd", backend)(student, teacher, temperature, beta)[0]
