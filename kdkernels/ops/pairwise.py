"""The ``pairwise`` op: batch-relation losses (RKD distance and angle, SP, PKT, CC) with their gradients.

``pairwise_forward(student [B, D_s], teacher [B, D_t], relation, params, student_grad, teacher_grad) ->
(loss [], grad_student, grad_teacher)``: the kernels compute the gradients of the loss in the same call (at the Gram
level the backward shares the forward's loop), so autograd only scales them by the upstream gradient. Relations and
their parameters are listed in csrc/kdkernels.cpp; the spec is kdkernels/reference/pairwise.py.
"""
from __future__ import annotations

import torch

from kdkernels._validation import promote_float64
from kdkernels.ops._checks import check_pairwise_forward
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import pairwise as reference

OP = "pairwise"


def _fake_forward(op, student, teacher, relation, params, student_grad, teacher_grad):
    check_pairwise_forward(op, student, teacher, relation, params)
    loss = student.new_empty((), dtype=accumulation_dtype(student))
    return loss, empty_gradient_like(student, student_grad), empty_gradient_like(teacher, teacher_grad)


def _setup_context(ctx, inputs, output):
    _loss, grad_student, grad_teacher = output
    ctx.save_for_backward(grad_student, grad_teacher)
    ctx.mark_non_differentiable(grad_student, grad_teacher)


def _scaled_gradients(ctx, grad_loss):
    """The saved gradients of the loss times the upstream gradient, for the inputs that need one."""
    return tuple((grad_loss * grad).to(grad.dtype) if needed and grad.numel() else None
                 for grad, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:2]))


def _backward(ctx, grad_loss, *_unused):
    return (*_scaled_gradients(ctx, grad_loss), None, None, None, None)


register(OpSpec(OP, _fake_forward, _setup_context, lambda _no_backward_op: _backward))


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)  # a private guard: absent -> plain call


def _below_autograd(op, *args):
    """op(*args) straight to the backend's kernel: the op's registered autograd would only redispatch it, in Python
    (~20 us a call). torch.compile cannot trace that guard and needs no shortcut."""
    if _BELOW_AUTOGRAD is None or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


class _RelationLoss(torch.autograd.Function):
    """The public path: the op called under this lean autograd.Function (the registered autograd of the op, for
    direct callers of torch.ops.kdkernels.*, costs ~0.1 ms more per call in Python, which matters for B ~ 256)."""

    @staticmethod
    def forward(ctx, student, teacher, op, relation, params):
        loss, grad_student, grad_teacher = _below_autograd(op, student, teacher, relation, params,
                                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_student, grad_teacher)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scaled_gradients(ctx, grad_loss), None, None, None)


def relation_loss(relation: str, student: torch.Tensor, teacher: torch.Tensor, params: tuple[float, ...],
                  backend: str) -> torch.Tensor:
    """The relation loss of 2-D features on the named backend, differentiable with respect to both (a scalar in the
    accumulation dtype: float64 for float64 features, else float32)."""
    student, teacher = promote_float64(student, teacher)
    if backend == "reference":
        return reference.relation_loss(relation, student, teacher, params)
    return _RelationLoss.apply(student, teacher, forward_op(OP, backend), relation, [float(p) for p in params])
