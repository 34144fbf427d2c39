"""The ``softmax_kl`` op family: fake (meta) kernels, autograd and dispatch to one backend.

Ops (schemas in csrc/kdkernels.cpp; Triton twins in kdkernels/triton/softmax_kl.py):

* ``softmax_kl_forward(student, teacher, T) -> (loss, stats_student, stats_teacher)``: per-row
  KL(softmax(teacher/T) || softmax(student/T)) of 2-D logits [N, V], plus per-row statistics [N, 2] =
  (max, log_sum) of each side, with log p = (x - max) / T - log_sum: what the backward needs.
* ``softmax_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, T, student_grad, teacher_grad)``.

The backward saves only the inputs and five fp32 numbers per row; it never keeps a probability tensor.
Formulas and ``-inf`` conventions: kdkernels/reference/softmax_kl.py.
"""
from __future__ import annotations

import torch

from kdkernels import _extension, backends
from kdkernels.reference import softmax_kl as reference


def _accumulation_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _fake_forward(student, teacher, temperature):
    rows = student.shape[0]
    dtype = _accumulation_dtype(student)
    return (student.new_empty((rows,), dtype=dtype), student.new_empty((rows, 2), dtype=dtype),
            student.new_empty((rows, 2), dtype=dtype))


def _fake_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature, student_grad,
                   teacher_grad):
    grad_student = torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad else \
        student.new_empty((0,))
    grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else \
        teacher.new_empty((0,))
    return grad_student, grad_teacher


def _setup_context(ctx, inputs, output):
    student, teacher, temperature = inputs
    loss, stats_student, stats_teacher = output
    ctx.save_for_backward(student, teacher, stats_student, stats_teacher, loss)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats_student, stats_teacher)


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats_student, _grad_stats_teacher):
        student, teacher, stats_student, stats_teacher, loss = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_loss.contiguous(), student, teacher, stats_student, stats_teacher,
                                                 loss, ctx.temperature, student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None)

    return backward


def _register_autograd(forward_name: str, backward_op) -> None:
    torch.library.register_autograd(forward_name, _autograd_backward(backward_op), setup_context=_setup_context)


if _extension._C is not None:
    torch.library.register_fake("kdkernels::softmax_kl_forward")(_fake_forward)
    torch.library.register_fake("kdkernels::softmax_kl_backward")(_fake_backward)
    _register_autograd("kdkernels::softmax_kl_forward", torch.ops.kdkernels.softmax_kl_backward.default)

# The Triton ops (and their fakes) are defined when kdkernels.triton.softmax_kl is imported, which happens only where
# triton can run: a CUDA device is visible, or TRITON_INTERPRET=1.
if not backends.unsupported_install_reasons("triton"):
    _register_autograd("kdkernels::triton_softmax_kl_forward", torch.ops.kdkernels.triton_softmax_kl_backward.default)


def _fake_jsd_forward(student, teacher, temperature, beta):
    rows = student.shape[0]
    dtype = _accumulation_dtype(student)
    return (student.new_empty((rows,), dtype=dtype),) + tuple(student.new_empty((rows, 2), dtype=dtype)
                                                               for _ in range(3))


def _fake_jsd_backward(grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature, beta,
                       student_grad, teacher_grad):
    return _fake_backward(grad_loss, student, teacher, stats_student, stats_teacher, None, temperature,
                          student_grad, teacher_grad)


def _setup_jsd_context(ctx, inputs, output):
    student, teacher, temperature, beta = inputs
    _loss, stats_student, stats_teacher, mixture_kl = output
    ctx.save_for_backward(student, teacher, stats_student, stats_teacher, mixture_kl)
    ctx.temperature, ctx.beta = temperature, beta
    ctx.mark_non_differentiable(stats_student, stats_teacher, mixture_kl)


def _jsd_autograd_backward(backward_op):
    def backward(ctx, grad_loss, *_grad_statistics):
        student, teacher, stats_student, stats_teacher, mixture_kl = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student, grad_teacher = backward_op(grad_loss.contiguous(), student, teacher, stats_student,
                                                 stats_teacher, mixture_kl, ctx.temperature, ctx.beta,
                                                 student_grad, teacher_grad)
        return (grad_student if student_grad else None, grad_teacher if teacher_grad else None, None, None)

    return backward


if _extension._C is not None:
    torch.library.register_fake("kdkernels::softmax_jsd_forward")(_fake_jsd_forward)
    torch.library.register_fake("kdkernels::softmax_jsd_backward")(_fake_jsd_backward)
    torch.library.register_autograd("kdkernels::softmax_jsd_forward",
                                    _jsd_autograd_backward(torch.ops.kdkernels.softmax_jsd_backward.default),
                                    setup_context=_setup_jsd_context)

TRITON_JSD = not backends.unsupported_install_reasons("triton") and hasattr(torch.ops.kdkernels,
                                                                               "triton_softmax_jsd_forward")
if TRITON_JSD:
    torch.library.register_autograd("kdkernels::triton_softmax_jsd_forward",
                                    _jsd_autograd_backward(torch.ops.kdkernels.triton_softmax_jsd_backward.default),
                                    setup_context=_setup_jsd_context)


def softmax_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """Per-row KL(p_t || p_s) of 2-D logits [N, V] (last dim unit-stride) on the named backend -> [N].

    float32 result (float64 when either input is float64); differentiable with respect to both inputs.
    """
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        student, teacher = student.double(), teacher.double()
    if backend == "reference":
        return reference.softmax_kl_rows(student, teacher, temperature)
    if backend in ("cpu", "cuda"):
        return torch.ops.kdkernels.softmax_kl_forward(student, teacher, temperature)[0]
    if backend == "triton":
        return torch.ops.kdkernels.triton_softmax_kl_forward(student, teacher, temperature)[0]
    raise ValueError(f"unknown backend {backend!r}")


def softmax_jsd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float,
                     backend: str) -> torch.Tensor:
    """Per-row generalised JSD(beta) of 2-D logits, 0 < beta < 1, on the named backend -> [N] (see the reference)."""
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        student, teacher = student.double(), teacher.double()
    if backend == "reference":
        return reference.softmax_jsd_rows(student, teacher, temperature, beta)
    if backend in ("cpu", "cuda"):
        return torch.ops.kdkernels.softmax_jsd_forward(student, teacher, temperature, beta)[0]
    if backend == "triton":
        return torch.ops.kdkernels.triton_softmax_jsd_forward(student, teacher, temperature, beta)[0]
    raise ValueError(f"unknown backend {backend!r}")
