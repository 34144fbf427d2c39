"""semckd_loss against the official code transcribed here in eager PyTorch (DefangChen/SemCKD), value and gradients in
float64, its reductions, dtypes and argument errors."""
import pytest
import torch

import kdkernels
from losses_testing import assert_equals_official, randn


# -------------------------------------------------------------------------------------------------------- SemCKD

def official_semckd(s_value, f_target, weight):
    """DefangChen/SemCKD ``distiller_zoo/SemCKD.py`` ``SemCKDLoss.forward`` (``nn.MSELoss(reduction='none')``,
    on the CPU instead of ``.cuda()``)."""
    crit = torch.nn.MSELoss(reduction='none')
    bsz, num_stu, num_tea = weight.shape
    ind_loss = torch.zeros(bsz, num_stu, num_tea, dtype=weight.dtype)
    for i in range(num_stu):
        for j in range(num_tea):
            ind_loss[:, i, j] = crit(s_value[i][j], f_target[i][j]).reshape(bsz, -1).mean(-1)
    loss = (weight * ind_loss).sum() / (1.0 * bsz * num_stu)
    return loss


def semckd_inputs(batch=4, seed=0):
    """Two student layers × three teacher layers, pairs of different shapes; attention rows on the simplex."""
    shapes = [[(3, 4, 4), (5, 2, 2), (6, 1, 1)], [(3, 4, 4), (5, 2, 2), (6, 2, 2)]]
    students = [[randn(batch, *shape, seed=seed + 10 * i + j, grad=True) for j, shape in enumerate(row)]
                for i, row in enumerate(shapes)]
    teachers = [[randn(batch, *shape, seed=seed + 100 + 10 * i + j, scale=2.0, grad=True)
                 for j, shape in enumerate(row)] for i, row in enumerate(shapes)]
    attention = randn(batch, 2, 3, seed=seed + 7).softmax(-1).requires_grad_()
    return students, teachers, attention


def test_semckd_is_the_official_attention_weighted_pair_mse():
    students, teachers, attention = semckd_inputs()
    assert_equals_official(kdkernels.semckd_loss, official_semckd, students, teachers, attention, what="semckd")


def test_semckd_reductions_and_dtypes():
    students, teachers, attention = semckd_inputs(batch=3, seed=1)
    rows = kdkernels.semckd_loss(students, teachers, attention, reduction="none")
    assert rows.shape == (3,)
    mean = kdkernels.semckd_loss(students, teachers, attention)
    torch.testing.assert_close(mean, rows.sum() / (3 * 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.semckd_loss(students, teachers, attention, reduction="sum"), rows.sum(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.semckd_loss(students, teachers, attention, reduction="batchmean"),
                               rows.sum() / 3, rtol=1e-12, atol=0)
    half = kdkernels.semckd_loss([[t.detach().half() for t in row] for row in students],
                                 [[t.detach().bfloat16() for t in row] for row in teachers], attention.detach().half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), mean.detach(), rtol=3e-2, atol=1e-3)


S = [[torch.randn(2, 3, 4, 4)]]
A = torch.rand(2, 1, 1)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.semckd_loss(S, [[torch.randn(2, 5, 4, 4)]], A), ValueError,
     r"^semckd_loss: student_features\[0\]\[0\] must have the same shape as teacher_features\[0\]\[0\] \(2, 5, 4, 4\)"),
    (lambda: kdkernels.semckd_loss(S, S, torch.rand(2, 2, 1)), ValueError,
     r"^semckd_loss: student_features must hold 2 lists \(one per student layer\), got 1"),
    (lambda: kdkernels.semckd_loss(S, S, torch.rand(2, 1, 3)), ValueError,
     r"^semckd_loss: student_features must hold 3 tensors \(one per teacher layer\) in every list"),
    (lambda: kdkernels.semckd_loss(S, S, torch.rand(3, 1, 1)), ValueError,
     r"^semckd_loss: student_features\[0\]\[0\] must have the batch size of attention \(3, 1, 1\)"),
    (lambda: kdkernels.semckd_loss(S, S, torch.rand(2, 1)), ValueError, r"^semckd_loss: attention must have 3 dims"),
    (lambda: kdkernels.semckd_loss(S[0][0], S, A), TypeError,
     r"^semckd_loss: student_features must be a non-empty list of lists of tensors"),
    (lambda: kdkernels.semckd_loss(S, [[1.0]], A), TypeError, r"^semckd_loss: teacher_features\[0\]\[0\] must be"),
    (lambda: kdkernels.semckd_loss(S, S, A.long()), TypeError, r"^semckd_loss: attention must be float32"),
    (lambda: kdkernels.semckd_loss(S, S, A, reduction="avg"), ValueError, r"^semckd_loss: reduction must be one of"),
])
def test_semckd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
