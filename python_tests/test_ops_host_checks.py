"""The C++ host checks shared by every family (csrc/common/host.h) and the families' own (csrc/<family>/*_host.h),
called through the ops directly: a wrong dtype raises TypeError, a wrong shape or value ValueError, and each message
starts with the op's name, then names the argument, what was expected and what came."""
import pytest
import torch

from kd_testing import backend_params, require_backend


def _kl(device, **changes):
    args = dict(student=torch.randn(3, 5, device=device), teacher=torch.randn(3, 5, device=device), temperature=2.0)
    return {**args, **changes}


def _kl_backward(device, **changes):
    forward = _kl(device)
    loss, stats_s, stats_t = torch.ops.kdkernels.softmax_kl_forward(**forward)
    args = dict(grad_loss=torch.ones_like(loss), **forward, stats_student=stats_s, stats_teacher=stats_t, loss=loss,
                student_grad=True, teacher_grad=True)
    args = {key: args[key] for key in ("grad_loss", "student", "teacher", "stats_student", "stats_teacher", "loss",
                                       "temperature", "student_grad", "teacher_grad")}
    return {**args, **changes}


def _jsd(device, **changes):
    return {**_kl(device), "beta": 0.5, **changes}


def _jsd_backward(device, **changes):
    forward = _jsd(device)
    loss, stats_s, stats_t, mixture = torch.ops.kdkernels.softmax_jsd_forward(**forward)
    args = dict(grad_loss=torch.ones_like(loss), student=forward["student"], teacher=forward["teacher"],
                stats_student=stats_s, stats_teacher=stats_t, mixture_kl=mixture, temperature=2.0, beta=0.5,
                student_grad=True, teacher_grad=True)
    return {**args, **changes}


def _split(device, **changes):
    return {**_kl(device), "labels": torch.tensor([0, 4, 2], device=device), **changes}


def _split_backward(device, **changes):
    forward = _split(device)
    terms, stats_s, stats_t = torch.ops.kdkernels.target_split_forward(**forward)
    args = dict(grad_terms=torch.ones_like(terms), student=forward["student"], teacher=forward["teacher"],
                labels=forward["labels"], stats_student=stats_s, stats_teacher=stats_t, terms=terms, temperature=2.0,
                student_grad=True, teacher_grad=True)
    return {**args, **changes}


def _gather(device, **changes):
    args = dict(logits=torch.randn(3, 5, device=device), indices=torch.tensor([[0, 1], [4, 4], [2, 0]], device=device),
                temperature=2.0)
    return {**args, **changes}


def _gather_backward(device, **changes):
    forward = _gather(device)
    gathered, stats = torch.ops.kdkernels.logsoftmax_gather_forward(**forward)
    return {"grad_gathered": torch.ones_like(gathered), **forward, "stats": stats, **changes}


def _dist(device, **changes):
    return _kl(device, **changes)


def _dist_backward(device, **changes):
    forward = _dist(device)
    row, col, row_moments, col_moments, stats_s, stats_t = torch.ops.kdkernels.dist_forward(**forward)
    args = dict(grad_row=torch.ones_like(row), grad_col=torch.ones_like(col), student=forward["student"],
                teacher=forward["teacher"], row_moments=row_moments, col_moments=col_moments, stats_student=stats_s,
                stats_teacher=stats_t, temperature=2.0, student_grad=True, teacher_grad=True)
    return {**args, **changes}


def _int(device, shape=(3, 5)):
    return torch.ones(shape, dtype=torch.int32, device=device)


CASES = {
    "kl student dtype": ("softmax_kl_forward", lambda d: _kl(d, student=_int(d)), TypeError,
                         r"^softmax_kl_forward: student must be float32, float16, bfloat16 or float64, got Int"),
    "kl student dim": ("softmax_kl_forward", lambda d: _kl(d, student=torch.randn(5, device=d)), ValueError,
                       r"^softmax_kl_forward: student must be 2-D \[N, V\], got shape \[5\]"),
    "kl shapes": ("softmax_kl_forward", lambda d: _kl(d, teacher=torch.randn(3, 4, device=d)), ValueError,
                  r"^softmax_kl_forward: student and teacher must have the same shape, got \[3, 5\] and \[3, 4\]"),
    "kl float64 pair": ("softmax_kl_forward", lambda d: _kl(d, teacher=torch.randn(3, 5, device=d).double()),
                        TypeError, r"^softmax_kl_forward: float64 student and teacher go together, got student Float "
                                   r"and teacher Double"),
    "kl stride": ("softmax_kl_forward", lambda d: _kl(d, teacher=torch.randn(5, 3, device=d).t()), ValueError,
                  r"^softmax_kl_forward: the last dim of teacher must have unit stride, got strides \[1, 3\]"),
    "kl temperature": ("softmax_kl_forward", lambda d: _kl(d, temperature=0.0), ValueError,
                       r"^softmax_kl_forward: temperature must be positive and finite, got 0"),
    "kl columns": ("softmax_kl_forward", lambda d: _kl(d, student=torch.randn(3, 0, device=d),
                                                       teacher=torch.randn(3, 0, device=d)), ValueError,
                   r"^softmax_kl_forward: logits need at least one column, got shape \[3, 0\]"),
    "kl stats dtype": ("softmax_kl_backward", lambda d: _kl_backward(d, stats_student=torch.zeros(3, 2, device=d,
                                                                                                  dtype=torch.float64)),
                       TypeError, r"^softmax_kl_backward: stats_student must be Float, got Double"),
    "kl grad shape": ("softmax_kl_backward", lambda d: _kl_backward(d, grad_loss=torch.ones(3, 1, device=d)),
                      ValueError, r"^softmax_kl_backward: grad_loss must be a contiguous tensor of shape \[3\] on "
                                  r"\w+(:\d)?, got shape \[3, 1\] on"),
    "kl loss contiguity": ("softmax_kl_backward", lambda d: _kl_backward(d, loss=torch.ones(6, device=d)[::2]),
                           ValueError, r"^softmax_kl_backward: loss must be a contiguous tensor of shape \[3\] .*"
                                       r"\(not contiguous\)"),
    "jsd beta": ("softmax_jsd_forward", lambda d: _jsd(d, beta=1.0), ValueError,
                 r"^softmax_jsd_forward: beta must be in \(0, 1\), got 1"),
    "jsd mixture shape": ("softmax_jsd_backward", lambda d: _jsd_backward(d, mixture_kl=torch.zeros(3, 3, device=d)),
                          ValueError, r"^softmax_jsd_backward: mixture_kl must be a contiguous tensor of shape "
                                      r"\[3, 2\]"),
    "split labels dtype": ("target_split_forward", lambda d: _split(d, labels=torch.zeros(3, dtype=torch.int32,
                                                                                           device=d)),
                           TypeError, r"^target_split_forward: labels must be int64, got Int"),
    "split labels shape": ("target_split_forward", lambda d: _split(d, labels=torch.zeros(2, dtype=torch.long,
                                                                                           device=d)),
                           ValueError, r"^target_split_forward: labels must have shape \[3\], got \[2\]"),
    "split terms dtype": ("target_split_backward", lambda d: _split_backward(d, terms=torch.zeros(3, 6, device=d,
                                                                                                  dtype=torch.half)),
                          TypeError, r"^target_split_backward: terms must be Float, got Half"),
    "gather logits dtype": ("logsoftmax_gather_forward", lambda d: _gather(d, logits=_int(d)), TypeError,
                            r"^logsoftmax_gather_forward: logits must be float32, float16, bfloat16 or float64, "
                            r"got Int"),
    "gather indices shape": ("logsoftmax_gather_forward", lambda d: _gather(d, indices=torch.zeros(2, 1, device=d,
                                                                                                   dtype=torch.long)),
                             ValueError, r"^logsoftmax_gather_forward: indices must have shape \[3, k\], got \[2, 1\]"),
    "gather grad shape": ("logsoftmax_gather_backward", lambda d: _gather_backward(d, grad_gathered=torch.ones(
                              3, 1, device=d)),
                          ValueError, r"^logsoftmax_gather_backward: grad_gathered must be a contiguous tensor of "
                                      r"shape \[3, 2\]"),
    "dist teacher dtype": ("dist_forward", lambda d: _dist(d, teacher=_int(d)), TypeError,
                           r"^dist_forward: teacher must be float32, float16, bfloat16 or float64, got Int"),
    "dist moments shape": ("dist_backward", lambda d: _dist_backward(d, col_moments=torch.zeros(5, 4, dtype=torch.float64, device=d)),
                           ValueError, r"^dist_backward: col_moments must be a contiguous tensor of shape \[5, 5\]"),
}


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_the_policy_type_naming_op_and_argument(backend, case):
    device = require_backend(backend)
    op, arguments, error, message = CASES[case]
    with pytest.raises(error, match=message):
        getattr(torch.ops.kdkernels, op)(**arguments(device))
