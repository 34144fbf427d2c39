"""The ``logsoftmax_gather`` op: ``log_softmax(x / T)`` at k indices per row, the student side of top-k teachers.

``logsoftmax_gather_forward(logits, indices, T) -> (gathered [N, k], stats [N, 2])``; the backward writes the dense
gradient ``1/T (scatter(g) - p sum(g))`` in one pass without a probability tensor. Spec:
kdkernels/reference/logsoftmax_gather.py.
"""
from __future__ import annotations

import torch

from kdkernels.ops._checks import check_logsoftmax_gather_backward, check_logsoftmax_gather_forward
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import logsoftmax_gather as reference

OP = "logsoftmax_gather"


def _fake_forward(op, logits, indices, temperature):
    check_logsoftmax_gather_forward(op, logits, indices, temperature)
    dtype = accumulation_dtype(logits)
    return logits.new_empty(tuple(indices.shape), dtype=dtype), logits.new_empty((logits.shape[0], 2), dtype=dtype)


def _fake_backward(op, grad_gathered, logits, indices, stats, temperature):
    check_logsoftmax_gather_backward(op, grad_gathered, logits, indices, stats, temperature)
    return empty_gradient_like(logits, True)


def _setup_context(ctx, inputs, output):
    logits, indices, temperature = inputs
    _gathered, stats = output
    ctx.save_for_backward(logits, indices, stats)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)


def _make_backward(backward_op):
    def backward(ctx, grad_gathered, _grad_stats):
        logits, indices, stats = ctx.saved_tensors
        return backward_op(grad_gathered.contiguous(), logits, indices, stats, ctx.temperature), None, None

    return backward


register(OpSpec(OP, _fake_forward, _setup_context, _make_backward, _fake_backward))


def logsoftmax_gather(logits: torch.Tensor, indices: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """``log_softmax(logits / T)`` of 2-D logits gathered at int64 indices [N, k] (values in [0, V)) -> [N, k]."""
    if backend == "reference":
        return reference.logsoftmax_gather(logits, indices, temperature)
    return forward_op(OP, backend)(logits, indices, temperature)[0]
