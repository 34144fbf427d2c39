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


# -------------------------------------------------------------------------------------------------------- L2T-ww

def official_feature_matching(convs, pairs, source_features, target_features, weight, beta, loss_weight):
    """alinlab/L2T-ww ``train_l2t_ww.py`` ``FeatureMatching.forward`` (``self[i]`` = ``convs[i]``, the 1×1 conv
    from the target's channels to the source's)."""
    matching_loss = 0.0
    for i, (src_idx, tgt_idx) in enumerate(pairs):
        sw = source_features[src_idx].size(3)
        tw = target_features[tgt_idx].size(3)
        if sw == tw:
            diff = source_features[src_idx] - convs[i](target_features[tgt_idx])
        else:
            diff = F.interpolate(
                source_features[src_idx],
                scale_factor=tw / sw,
                mode='bilinear'
            ) - convs[i](target_features[tgt_idx])
        diff = diff.pow(2).mean(3).mean(2)
        if loss_weight is None and weight is None:
            diff = diff.mean(1).mean(0).mul(beta[i])
        elif loss_weight is None:
            diff = diff.mul(weight[i]).sum(1).mean(0).mul(beta[i])
        elif weight is None:
            diff = (diff.sum(1)*(loss_weight[i].squeeze())).mean(0).mul(beta[i])
        else:
            diff = (diff.mul(weight[i]).sum(1)*(loss_weight[i].squeeze())).mean(0).mul(beta[i])
        matching_loss = matching_loss + diff
    return matching_loss


# source (teacher) maps: 4×4 and 2×2 (6 and 5 channels); target (student): 8×8, 4×4 and 2×2 (3, 4, 7 channels)
L2T_PAIRS = [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2)]     # upsampling ×2, equal size, downsampling ×0.5


@pytest.mark.parametrize("weighted, loss_weighted", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["what-and-where", "what", "where", "neither"])
def test_l2t_ww_is_the_official_feature_matching(weighted, loss_weighted):
    batch = 4
    sources = [randn(batch, 6, 4, 4, seed=1, grad=True), randn(batch, 5, 2, 2, seed=2, grad=True)]
    targets = [randn(batch, 3, 8, 8, seed=3, grad=True), randn(batch, 4, 4, 4, seed=4, grad=True),
               randn(batch, 7, 2, 2, seed=5, grad=True)]
    torch.manual_seed(0)
    convs = [nn.Conv2d(targets[t].shape[1], sources[s].shape[1], 1).double() for s, t in L2T_PAIRS]
    weights = [randn(batch, sources[s].shape[1], seed=10 + i).softmax(1).requires_grad_() if weighted else None
               for i, (s, _) in enumerate(L2T_PAIRS)]
    loss_weights = [randn(batch, 1, seed=20 + i).relu().requires_grad_() if loss_weighted else None
                    for i in range(len(L2T_PAIRS))]

    def ours(sources, targets, weights, loss_weights):
        return 0.5 * kdkernels.l2t_ww_loss([conv(targets[t]) for conv, (_, t) in zip(convs, L2T_PAIRS)],
                                           [sources[s] for s, _ in L2T_PAIRS], weights if weighted else None,
                                           loss_weights if loss_weighted else None)

    def official(sources, targets, weights, loss_weights):
        return official_feature_matching(convs, L2T_PAIRS, sources, targets, weights if weighted else None,
                                         [0.5] * len(L2T_PAIRS), loss_weights if loss_weighted else None)

    assert_equals_official(ours, official, sources, targets, weights, loss_weights, what="l2t_ww")


def test_l2t_ww_reductions_dtypes_and_second_derivatives():
    student, teacher = randn(3, 4, 4, 4, seed=1, grad=True), randn(3, 4, 2, 2, seed=2)
    weight, pair = randn(3, 4, seed=3).softmax(1).requires_grad_(), randn(1, 1, seed=4).abs()
    rows = kdkernels.l2t_ww_loss([student], [teacher], [weight], [pair], reduction="none")
    assert rows.shape == (3,)
    torch.testing.assert_close(kdkernels.l2t_ww_loss([student], [teacher], [weight], [pair]), rows.mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.l2t_ww_loss([student], [teacher], [weight], [pair], reduction="sum"),
                               rows.sum(), rtol=1e-12, atol=0)
    half = kdkernels.l2t_ww_loss([student.detach().half()], [teacher.bfloat16()], [weight.detach().half()])
    assert half.dtype == torch.float32
    # the meta-gradient needs d²loss / (d student · d weight): not zero
    (grad,) = torch.autograd.grad(kdkernels.l2t_ww_loss([student], [teacher], [weight]), student, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), weight)
    assert second.abs().sum() > 0


L = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.l2t_ww_loss([L], [torch.randn(2, 5, 4, 4)]), ValueError,
     r"^l2t_ww_loss: student_features\[0\] must have the channels of teacher_features\[0\] \(2, 5, 4, 4\)"),
    (lambda: kdkernels.l2t_ww_loss([L, L], [L]), ValueError,
     r"^l2t_ww_loss: teacher_features must hold one map per student map \(2\)"),
    (lambda: kdkernels.l2t_ww_loss([L], [L], [torch.rand(2, 4)]), ValueError,
     r"^l2t_ww_loss: channel_weights\[0\] must have shape \[2, 3\]"),
    (lambda: kdkernels.l2t_ww_loss([L], [L], None, [torch.rand(3)]), ValueError,
     r"^l2t_ww_loss: pair_weights\[0\] must hold 1 or B = 2 elements"),
    (lambda: kdkernels.l2t_ww_loss([L], [L], [torch.rand(2, 3)] * 2), ValueError,
     r"^l2t_ww_loss: channel_weights must hold one tensor per pair \(1\)"),
    (lambda: kdkernels.l2t_ww_loss([L], [torch.randn(2, 3, 3, 5)]), ValueError,
     r"^l2t_ww_loss: teacher_features\[0\] must resize to the spatial size of student_features\[0\]"),
    (lambda: kdkernels.l2t_ww_loss(L, [L]), TypeError, r"^l2t_ww_loss: student_features must be a list"),
    (lambda: kdkernels.l2t_ww_loss([L], [L], [torch.ones(2, 3, dtype=torch.long)]), TypeError,
     r"^l2t_ww_loss: channel_weights\[0\] must be float32"),
    (lambda: kdkernels.l2t_ww_loss([L], [L], reduction="mean"), ValueError, r"^l2t_ww_loss: reduction must be one of"),
])
def test_l2t_ww_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
