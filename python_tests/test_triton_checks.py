"""The input checks of the ops (kdkernels/ops/_checks.py) as the Triton ops run them: TypeError for a wrong type or dtype,
ValueError for a wrong shape or value, each message starting with the op and naming the argument, in the op and in
its fake (meta) kernel alike."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kd_testing import logits, require_backend


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def _ops():
    ops = torch.ops.kdkernels
    labels = torch.tensor([0, 2, 4])
    return {
        "triton_softmax_kl_forward": lambda s, t, T: ops.triton_softmax_kl_forward(s, t, T),
        "triton_softmax_jsd_forward": lambda s, t, T: ops.triton_softmax_jsd_forward(s, t, T, 0.5),
        "triton_target_split_forward": lambda s, t, T: ops.triton_target_split_forward(s, t, labels, T),
        "triton_dist_forward": lambda s, t, T: ops.triton_dist_forward(s, t, T),
    }


PAIR_OPS = ["triton_softmax_kl_forward", "triton_softmax_jsd_forward", "triton_target_split_forward",
            "triton_dist_forward"]
F32 = logits((3, 5), seed=0)


@pytest.mark.parametrize("op", PAIR_OPS)
@pytest.mark.parametrize("student,teacher,temperature,error,message", [
    (F32.int(), F32, 1.0, TypeError, "student must be float32, float16, bfloat16 or float64, got torch.int32"),
    (F32, F32.long(), 1.0, TypeError, "teacher must be float32, float16, bfloat16 or float64, got torch.int64"),
    (F32[0], F32, 1.0, ValueError, r"student must be a 2-D \[N, V\] tensor, got shape \(5,\)"),
    (F32, F32[:, :4], 1.0, ValueError, r"teacher must have the student's shape \(3, 5\), got \(3, 4\)"),
    (F32, F32.double(), 1.0, TypeError, "student and teacher must both be float64 or neither, got torch.float32 and "
                                        "torch.float64"),
    (F32, F32, 0.0, ValueError, "temperature must be finite and > 0, got 0.0"),
    (F32, F32, -1.0, ValueError, "temperature must be finite and > 0, got -1.0"),
    (F32, F32, math.inf, ValueError, "temperature must be finite and > 0, got inf"),
    (F32, F32, math.nan, ValueError, "temperature must be finite and > 0, got nan"),
], ids=["int-student", "int-teacher", "1-D", "shapes", "fp64-mix", "T=0", "T<0", "T=inf", "T=nan"])
def test_logit_pair_checks(op, student, teacher, temperature, error, message):
    with pytest.raises(error, match=f"^{op}: {message}"):
        _ops()[op](student, teacher, temperature)
    with FakeTensorMode() as mode, pytest.raises(error, match=f"^{op}: {message}"):
        _ops()[op](mode.from_tensor(student), mode.from_tensor(teacher), temperature)


def test_jsd_beta():
    for beta in (0.0, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"^triton_softmax_jsd_forward: beta must lie in \(0, 1\)"):
            torch.ops.kdkernels.triton_softmax_jsd_forward(F32, F32, 1.0, beta)


def test_backward_row_tensors():
    ops = torch.ops.kdkernels
    loss, stats_s, stats_t = ops.triton_softmax_kl_forward(F32, F32, 1.0)
    grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"^triton_softmax_kl_backward: stats_teacher must have shape \(3, 2\), got "
                                         r"\(3, 3\)"):
        ops.triton_softmax_kl_backward(grad, F32, F32, stats_s, torch.zeros(3, 3), loss, 1.0, True, True)
    with pytest.raises(TypeError, match="^triton_softmax_kl_backward: grad_loss must be a floating-point tensor, got "
                                        "torch.int64"):
        ops.triton_softmax_kl_backward(grad.long(), F32, F32, stats_s, stats_t, loss, 1.0, True, True)
    with pytest.raises(ValueError, match="^triton_softmax_kl_backward: teacher must have the student's shape"):
        ops.triton_softmax_kl_backward(grad, F32, F32[:, :2], stats_s, stats_t, loss, 1.0, True, True)


def test_index_tensors():
    ops = torch.ops.kdkernels
    with pytest.raises(TypeError, match="^triton_target_split_forward: labels must be an int64 tensor, got "
                                        "torch.int32"):
        ops.triton_target_split_forward(F32, F32, torch.tensor([0, 1, 2], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match=r"^triton_target_split_forward: labels must have shape \(3,\), got \(2,\)"):
        ops.triton_target_split_forward(F32, F32, torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match=r"^triton_logsoftmax_gather_forward: indices must be a 2-D \[N, k\] tensor"):
        ops.triton_logsoftmax_gather_forward(F32, torch.tensor([0, 1, 2]), 1.0)
    with pytest.raises(TypeError, match="^triton_logsoftmax_gather_forward: indices must be an int64 tensor"):
        ops.triton_logsoftmax_gather_forward(F32, torch.zeros(3, 2, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="^triton_logsoftmax_gather_forward: logits must be float32, float16, "
                                        "bfloat16 or float64, got torch.int32"):
        ops.triton_logsoftmax_gather_forward(F32.int(), torch.zeros(3, 2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="^triton_logsoftmax_gather_forward: temperature must be finite and > 0"):
        ops.triton_logsoftmax_gather_forward(F32, torch.zeros(3, 2, dtype=torch.int64), 0.0)


def test_contrastive_types_and_values():
    op = torch.ops.kdkernels.triton_crd_nce_forward
    embed, memory = logits((3, 4), seed=1), logits((6, 4), seed=2)
    indices, log_z = torch.zeros(3, 5, dtype=torch.int64), torch.tensor(0.0)
    with pytest.raises(TypeError, match="^triton_crd_nce_forward: embed must be float32, float16, bfloat16 or "
                                        "float64, got torch.int32"):
        op(embed.int(), memory, indices, log_z, 0.1, 0.5, 1e-7, False)
    with pytest.raises(TypeError, match="^triton_crd_nce_forward: log_normalizer must be a 0-dim torch.float32 "
                                        "tensor, got torch.float64"):
        op(embed, memory, indices, log_z.double(), 0.1, 0.5, 1e-7, False)
    with pytest.raises(ValueError, match=r"^triton_crd_nce_forward: log_normalizer must be a 0-dim torch.float32 "
                                         r"tensor, got shape \(1,\)"):
        op(embed, memory, indices, log_z.reshape(1), 0.1, 0.5, 1e-7, False)
    with pytest.raises(ValueError, match="^triton_crd_nce_forward: temperature must be finite and > 0"):
        op(embed, memory, indices, log_z, 0.0, 0.5, 1e-7, False)
