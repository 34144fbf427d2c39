"""semckd_loss and afd_loss against the official code transcribed here in eager PyTorch (DefangChen/SemCKD,
clovaai/attention-feature-distillation), value and gradients in float64, their reductions, dtypes and argument
errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------------------------------- AFD

def official_afd(g_s, g_t, atts):
    """clovaai/attention-feature-distillation ``distill/AFD.py``: the values of ``LinearTransformTeacher`` and
    ``LinearTransformStudent`` (``Sample`` per unique teacher shape, ``unique_shape`` of ``utils.py``), then
    ``Attention.forward``'s loop over the teacher layers with ``cal_diff``, summed as ``AFD.forward``."""
    bs = g_t[0].size(0)
    t_shapes = [f.size() for f in g_t]
    n_t, unique_t_shapes = [], []
    n = -1
    for t_shape in t_shapes:
        if t_shape not in unique_t_shapes:
            unique_t_shapes.append(t_shape)
            n += 1
        n_t.append(n)
    spatial_mean_t = [f_t.pow(2).mean(1).view(bs, -1) for f_t in g_t]
    h_t_all = [F.normalize(f_s, dim=1) for f_s in spatial_mean_t]
    spatial_mean_s = []
    for t_shape in unique_t_shapes:
        sample = nn.AdaptiveAvgPool2d((t_shape[2], t_shape[3]))
        spatial_mean_s.append(torch.stack([sample(f_s.pow(2).mean(1, keepdim=True)).view(bs, -1) for f_s in g_s],
                                          dim=1))
    h_hat_s_all = [F.normalize(s_m, dim=2) for s_m in spatial_mean_s]

    def cal_diff(v_s, v_t, att):
        diff = (v_s - v_t.unsqueeze(1)).pow(2).mean(2)
        diff = torch.mul(diff, att).sum(1).mean()
        return diff

    loss = []
    for i, (n, h_t) in enumerate(zip(n_t, h_t_all)):
        loss.append(cal_diff(h_hat_s_all[n], h_t, atts[:, i]))
    return sum(loss)


def afd_inputs(batch=4, seed=0):
    """Three student layers, three teacher layers (two of one shape, as the official's repeated block shapes)."""
    students = [randn(batch, *shape, seed=seed + i, grad=True) for i, shape in
                enumerate([(3, 8, 8), (5, 4, 4), (6, 2, 2)])]
    teachers = [randn(batch, *shape, seed=seed + 10 + i, scale=2.0, grad=True) for i, shape in
                enumerate([(4, 4, 4), (4, 4, 4), (7, 2, 2)])]
    attention = randn(batch, 3, 3, seed=seed + 20).softmax(-1).requires_grad_()
    return students, teachers, attention


def test_afd_is_the_official_attention_weighted_energy_map_distance():
    students, teachers, attention = afd_inputs()
    assert_equals_official(kdkernels.afd_loss, official_afd, students, teachers, attention, what="afd")


def test_afd_reductions_and_dtypes():
    students, teachers, attention = afd_inputs(batch=3, seed=1)
    rows = kdkernels.afd_loss(students, teachers, attention, reduction="none")
    assert rows.shape == (3,)
    batchmean = kdkernels.afd_loss(students, teachers, attention)
    torch.testing.assert_close(batchmean, rows.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.afd_loss(students, teachers, attention, reduction="sum"), rows.sum(),
                               rtol=1e-12, atol=0)
    half = kdkernels.afd_loss([t.detach().bfloat16() for t in students], [t.detach().half() for t in teachers],
                              attention.detach().half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), batchmean.detach(), rtol=3e-2, atol=1e-4)


M = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.afd_loss([M, M], [M], torch.rand(2, 2, 1)), ValueError,
     r"^afd_loss: attention must have shape \[B, 1, 2\] \(teacher layers, student layers\), got shape \(2, 2, 1\)"),
    (lambda: kdkernels.afd_loss([M], [torch.randn(3, 3, 4, 4)], torch.rand(2, 1, 1)), ValueError,
     r"^afd_loss: teacher_features\[0\] must have the batch size of attention \(2, 1, 1\)"),
    (lambda: kdkernels.afd_loss([torch.randn(2, 3)], [M], torch.rand(2, 1, 1)), ValueError,
     r"^afd_loss: student_features\[0\] must have 4 dims"),
    (lambda: kdkernels.afd_loss(M, [M], torch.rand(2, 1, 1)), TypeError,
     r"^afd_loss: student_features must be a list or tuple of tensors"),
    (lambda: kdkernels.afd_loss([M], [M], torch.rand(2, 1)), ValueError, r"^afd_loss: attention must have 3 dims"),
    (lambda: kdkernels.afd_loss([M], [M], torch.rand(2, 1, 1), reduction="mean"), ValueError,
     r"^afd_loss: reduction must be one of"),
])
def test_afd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
