"""fitnet_loss, nst_loss, fsp_loss, ofd_margins / ofd_loss, vid_loss, ab_loss, ft_loss and cwd_loss against the official
code transcribed here in eager PyTorch (RepDistiller, overhaul-distillation, AB_distillation, Factor-Transfer,
TorchDistiller and mmrazor for CWD), value and
gradients in float64, including maps of different sizes and channel counts, and their argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, randn


def pool_larger(s, t):
    """RepDistiller: adaptive-avg-pool the larger map to the smaller H."""
    if s.shape[2] > t.shape[2]:
        s = F.adaptive_avg_pool2d(s, (t.shape[2], t.shape[2]))
    elif s.shape[2] < t.shape[2]:
        t = F.adaptive_avg_pool2d(t, (s.shape[2], s.shape[2]))
    return s, t


def pair(student_shape, teacher_shape, seed=0):
    """Student and teacher features (float64 leaves that require grad)."""
    return randn(*student_shape, seed=seed, grad=True), randn(*teacher_shape, seed=seed + 1, scale=2.0, grad=True)


MAPS = [((4, 3, 4, 4), (4, 3, 4, 4)), ((3, 6, 8, 8), (3, 6, 8, 8))]
MAP_IDS = ["4x3x4x4", "3x6x8x8"]
# (student, teacher) maps of different sizes and channel counts: the larger map is pooled to the smaller
UNEQUAL_MAPS = [((3, 4, 8, 8), (3, 6, 4, 4)), ((3, 5, 2, 2), (3, 2, 4, 4)), ((2, 3, 6, 6), (2, 7, 6, 6))]
UNEQUAL_IDS = ["student-larger", "teacher-larger", "unequal-channels"]


# -------------------------------------------------------------------------------------------------------- FitNet

@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (5, 7), (2, 3, 6)], ids=["map", "vector", "tokens"])
def test_fitnet_is_repdistiller_hint_loss(shape):
    """RepDistiller ``FitNet.py`` ``HintLoss``: ``nn.MSELoss()`` of the regressed student hint and the teacher's."""
    student, teacher = pair(shape, shape, seed=1)
    assert_equals_official(kdkernels.fitnet_loss, torch.nn.MSELoss(), student, teacher, what="fitnet")


# ----------------------------------------------------------------------------------------------------------- NST

def repdistiller_nst(f_s, f_t):
    """RepDistiller ``NST.py`` (``nst_loss``, full loss, the B×C×C×HW broadcast ``poly_kernel``)."""
    def poly_kernel(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    f_s, f_t = pool_larger(f_s, f_t)
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


@pytest.mark.parametrize("shapes", MAPS + UNEQUAL_MAPS, ids=MAP_IDS + UNEQUAL_IDS)
def test_nst_is_repdistiller(shapes):
    student, teacher = pair(*shapes, seed=2)
    assert_equals_official(kdkernels.nst_loss, repdistiller_nst, student, teacher, what="nst")


# ----------------------------------------------------------------------------------------------------------- FSP

def repdistiller_fsp(g_s, g_t):
    """RepDistiller ``FSP.py`` (``compute_fsp``, ``compute_loss``), the stage losses summed as
    ``helper/pretrain.py``."""
    def compute_fsp(g):
        matrices = []
        for bot, top in zip(g[:-1], g[1:]):
            bot, top = pool_larger(bot, top)
            bot = bot.unsqueeze(1).flatten(3)
            top = top.unsqueeze(2).flatten(3)
            matrices.append((bot * top).mean(-1))
        return matrices

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


@pytest.mark.parametrize("sizes", [(4, 4, 4), (8, 4, 2), (2, 4, 4)], ids=["equal", "shrinking", "growing"])
def test_fsp_is_repdistiller(sizes):
    """Consecutive maps of different sizes are pooled to the smaller; channels differ between stages, not between
    student and teacher."""
    channels = (3, 5, 4)
    student = [randn(2, c, h, h, seed=10 + i, grad=True) for i, (c, h) in enumerate(zip(channels, sizes))]
    teacher = [randn(2, c, h, h, seed=20 + i, grad=True) for i, (c, h) in enumerate(zip(channels, sizes))]
    assert_equals_official(kdkernels.fsp_loss, repdistiller_fsp, student, teacher, what="fsp")


# ----------------------------------------------------------------------------------------------------------- OFD

def official_margin(bn_weight, bn_bias):
    """clovaai/overhaul-distillation ``distiller.py::get_margin_from_BN`` (scipy's ``norm.cdf`` as erf)."""
    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    margins = []
    for s, m in zip(bn_weight, bn_bias):
        s, m = abs(s.item()), m.item()
        if cdf(-m / s) > 0.001:
            margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            margins.append(-3 * s)
    return torch.FloatTensor(margins)


def overhaul_distillation_loss(source, target, margin):
    """clovaai/overhaul-distillation ``distiller.py::distillation_loss`` (per stage, before the stage weight)."""
    target = torch.max(target, margin.view(1, -1, 1, 1).to(target))
    loss = F.mse_loss(source, target, reduction="none")
    return (loss * ((source > target) | (target > 0)).float()).sum()


def test_ofd_margins_are_overhaul_distillation_in_both_branches():
    """Margins of N(β, γ²)'s negative part where Φ(−β/|γ|) > 1e-3, else −3|γ|: both branches, a negative γ
    too."""
    weight = torch.cat([torch.linspace(0.3, 2.0, 6), torch.tensor([-1.5, 1.0, 2.0])])
    bias = torch.cat([torch.linspace(-4.0, 1.5, 6), torch.tensor([0.5, 20.0, 6.5])])
    margins = kdkernels.ofd_margins(weight, bias)
    assert margins.dtype == torch.float32
    torch.testing.assert_close(margins, official_margin(weight, bias))
    torch.testing.assert_close(kdkernels.ofd_margins(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 20.0])),
                               torch.tensor([-1 / math.sqrt(2 * math.pi) / 0.5, -6.0]))


@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (2, 6, 5, 5)], ids=MAP_IDS[:1] + ["2x6x5x5"])
def test_ofd_loss_is_overhaul_distillation(shape):
    student, teacher = pair(shape, shape, seed=3)
    margin = -randn(shape[1], seed=5).abs()
    assert_equals_official(lambda s, t: kdkernels.ofd_loss(s, t, margin),
                           lambda s, t: overhaul_distillation_loss(s, t, margin), student, teacher, what="ofd")


# ----------------------------------------------------------------------------------------------------------- VID

def repdistiller_vid(pred_mean, target, log_scale, eps=1e-5):
    """RepDistiller ``VID.py`` after the regressor (``view(1, -1, 1, 1)``; ``view(1, -1)`` for [B, D] features)."""
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + eps
    pred_var = pred_var.view(1, -1, *([1] * (target.dim() - 2)))
    neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
    return torch.mean(neg_log_prob)


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (6, 5)], ids=["map", "vector"])
def test_vid_is_repdistiller_and_learns_the_variance(shape, eps):
    mean, teacher = pair(shape, shape, seed=6)
    log_scale = randn(shape[1], seed=8, grad=True)
    assert_equals_official(lambda m, t, v: kdkernels.vid_loss(m, t, v, eps),
                           lambda m, t, v: repdistiller_vid(m, t, v, eps), mean, teacher, log_scale, what="vid")


# ------------------------------------------------------------------------------------------------------------ AB

def ab_alternative_l2(source, target, margin):
    """bhheo/AB_distillation ``criterion_alternative_L2`` (RepDistiller ``AB.py``), per stage."""
    loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float()
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
    return torch.abs(loss).sum()


@pytest.mark.parametrize("margin", [1.0, 0.25])
@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (6, 5)], ids=["map", "vector"])
def test_ab_is_ab_distillation(shape, margin):
    student, teacher = pair(shape, shape, seed=9)
    assert_equals_official(lambda s, t: kdkernels.ab_loss(s, t, margin),
                           lambda s, t: ab_alternative_l2(s, t, margin), student, teacher, what="ab")


# ------------------------------------------------------------------------------------------------------------ FT

def factor_transfer(factor_s, factor_t):
    """Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``: ``FT(x) = normalize(x.view(B, −1))``, L1Loss."""
    def factor(x):
        return F.normalize(x.view(x.size(0), -1))

    return torch.nn.L1Loss()(factor(factor_s), factor(factor_t))


@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (6, 5)], ids=["map", "vector"])
def test_ft_is_factor_transfer(shape):
    student, teacher = pair(shape, shape, seed=11)
    assert_equals_official(kdkernels.ft_loss, factor_transfer, student, teacher, what="ft")


# ---------------------------------------------------------------------------------------------- argument errors

X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.fitnet_loss(X, torch.randn(2, 5, 4, 4)), ValueError,
     r"^fitnet_loss: student_hint must have the same shape as teacher_hint \(2, 5, 4, 4\) \(use a connector/regressor "
     r"to map the student feature\), got shape \(2, 3, 4, 4\)$"),
    (lambda: kdkernels.nst_loss(X, torch.randn(3, 3, 4, 4)), ValueError,
     r"^nst_loss: teacher must have the same batch size as student \(2, 3, 4, 4\), got shape \(3, 3, 4, 4\)$"),
    (lambda: kdkernels.nst_loss(X, X, reduction="mean"), ValueError,
     r"^nst_loss: reduction must be one of 'batchmean', 'sum', 'none', got 'mean'$"),
    (lambda: kdkernels.nst_loss(torch.randn(2, 12), torch.randn(2, 12)), ValueError,
     r"^nst_loss: student must have 4 dims, got shape \(2, 12\)$"),
    (lambda: kdkernels.fsp_loss([X], [X]), ValueError,
     r"^fsp_loss: student_features must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.fsp_loss([X, X], [X, X, X]), ValueError,
     r"^fsp_loss: teacher_features must hold the same number of maps as student_features \(2\), got 3$"),
    (lambda: kdkernels.fsp_loss([X, X], [X, torch.randn(2, 5, 4, 4)]), ValueError,
     r"^fsp_loss: teacher_features\[1\] must have the channels of student_features\[1\] \(2, 3, 4, 4\) \(FSP needs "
     r"equal channel counts\), got 5 channels \(2, 5, 4, 4\)$"),
    (lambda: kdkernels.fsp_loss(X, [X, X]), TypeError,
     r"^fsp_loss: student_features must be a list or tuple of tensors, got a torch.float32 tensor"),
    (lambda: kdkernels.ofd_loss(X, X, torch.zeros(4)), ValueError,
     r"^ofd_loss: margin must be a tensor of 3 per-channel values, got shape \(4,\)$"),
    (lambda: kdkernels.ofd_margins(torch.ones(3), torch.ones(4)), ValueError,
     r"^ofd_margins: bn_bias must have the same shape as bn_weight \(3,\), got shape \(4,\)$"),
    (lambda: kdkernels.vid_loss(X, X, torch.zeros(2)), ValueError,
     r"^vid_loss: log_scale must be a \[3\] tensor \(one per teacher channel\), got shape \(2,\)$"),
    (lambda: kdkernels.vid_loss(X, X, torch.zeros(3), eps=float("inf")), ValueError,
     r"^vid_loss: eps must be finite, got inf$"),
    (lambda: kdkernels.ab_loss(X, X, reduction="avg"), ValueError,
     r"^ab_loss: reduction must be one of 'batchmean', 'sum', 'mean', 'none', got 'avg'$"),
    (lambda: kdkernels.ab_loss(X, X, margin="1"), TypeError, r"^ab_loss: margin must be a real number, got '1'$"),
    (lambda: kdkernels.ft_loss(X, X[:, :2]), ValueError,
     r"^ft_loss: student_factor must have the same shape as teacher_factor \(2, 2, 4, 4\)"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------- CWD

def torchdistiller_cwd(preds_s, preds_t, temperature):
    """irfanICMLL/TorchDistiller ``SemSeg-distill/utils/criterion.py`` ``CriterionCWD('channel', 'kl', τ)``:
    ``ChannelNorm`` (softmax over H·W), ``KLDivLoss(reduction='sum')`` of the log of the student's softmax,
    / (n·c), · τ²; the teacher detached."""
    n, c, h, w = preds_s.shape
    norm_s = (preds_s / temperature).reshape(n, c, -1).softmax(dim=-1)
    norm_t = (preds_t.detach() / temperature).reshape(n, c, -1).softmax(dim=-1)
    loss = torch.nn.KLDivLoss(reduction="sum")(norm_s.log(), norm_t)
    return loss / (n * c) * temperature ** 2


def mmrazor_cwd(preds_s, preds_t, tau):
    """open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py`` ``ChannelWiseDivergence(tau, loss_weight=1)``."""
    n, c, h, w = preds_s.shape
    softmax_t = F.softmax(preds_t.reshape(-1, w * h) / tau, dim=1)
    log_softmax = torch.nn.LogSoftmax(dim=1)
    loss = torch.sum(softmax_t * log_softmax(preds_t.reshape(-1, w * h) / tau)
                     - softmax_t * log_softmax(preds_s.reshape(-1, w * h) / tau)) * tau ** 2
    return loss / (c * n)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (2, 6, 5, 3)], ids=["4x3x4x4", "2x6x5x3"])
def test_cwd_is_the_official_channel_wise_divergence(shape, temperature):
    """Both official codes; the teacher as a constant (the official code detaches it)."""
    student, teacher = randn(*shape, seed=1, scale=2.0, grad=True), randn(*shape, seed=2, scale=3.0)
    for official in (torchdistiller_cwd, mmrazor_cwd):
        assert_equals_official(lambda s: kdkernels.cwd_loss(s, teacher, temperature),
                               lambda s: official(s, teacher, temperature), student, what=official.__name__)


def test_cwd_reductions_and_teacher_gradient():
    student, teacher = randn(3, 4, 2, 2, seed=3, grad=True), randn(3, 4, 2, 2, seed=4, grad=True)
    channels = kdkernels.cwd_loss(student, teacher, 2.0, reduction="none")
    assert channels.shape == (3,) and bool((channels >= 0).all())
    torch.testing.assert_close(kdkernels.cwd_loss(student, teacher, 2.0), channels.sum() / 12, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.cwd_loss(student, teacher, 2.0, reduction="batchmean"),
                               channels.sum() / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.cwd_loss(student, teacher, 2.0, reduction="sum"), channels.sum(),
                               rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda s, t: kdkernels.cwd_loss(s, t, 2.0), (student, teacher))
    assert float(kdkernels.cwd_loss(teacher.detach(), teacher.detach())) == 0.0


CWD_MAP = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.cwd_loss(CWD_MAP, torch.randn(2, 5, 4, 4)), ValueError,
     r"^cwd_loss: student_map must have the same shape as teacher_map \(2, 5, 4, 4\) \(use a connector"),
    (lambda: kdkernels.cwd_loss(CWD_MAP, CWD_MAP, 0.0), ValueError,
     r"^cwd_loss: temperature must be positive and finite, got 0.0$"),
    (lambda: kdkernels.cwd_loss(torch.randn(2, 3), torch.randn(2, 3)), ValueError,
     r"^cwd_loss: student_map must have 3 or 4 dims, got shape \(2, 3\)$"),
    (lambda: kdkernels.cwd_loss(CWD_MAP, CWD_MAP, reduction="avg"), ValueError, r"^cwd_loss: reduction must be one of"),
])
def test_cwd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------------ CD

def official_cd(stu_features, tea_features):
    """zhouzaida/channel-distillation ``losses/cd_loss.py`` ``CDLoss``: per stage the MSE of the spatial means."""
    loss = 0.
    for s, t in zip(stu_features, tea_features):
        s = s.mean(dim=(2, 3), keepdim=False)
        t = t.mean(dim=(2, 3), keepdim=False)
        loss += torch.mean(torch.pow(s - t, 2))
    return loss


def test_cd_is_the_official_channel_distillation_loss_over_stages():
    students = [randn(4, 3, 8, 8, seed=1, grad=True), randn(4, 6, 4, 4, seed=2, scale=2.0, grad=True)]
    teachers = [randn(4, 3, 4, 4, seed=3, grad=True), randn(4, 6, 2, 2, seed=4, scale=3.0, grad=True)]
    assert_equals_official(lambda *maps: kdkernels.cd_loss(list(maps[:2]), list(maps[2:])),
                           lambda *maps: official_cd(maps[:2], maps[2:]), *students, *teachers, what="cd")
    assert_equals_official(lambda s, t: kdkernels.cd_loss(s, t), lambda s, t: official_cd([s], [t]),
                           students[1], teachers[1], what="cd one stage")


def test_cd_reductions():
    student, teacher = randn(3, 4, 2, 2, seed=5), randn(3, 4, 3, 3, seed=6)
    rows = kdkernels.cd_loss(student, teacher, reduction="none")
    assert rows.shape == (3,)
    torch.testing.assert_close(kdkernels.cd_loss(student, teacher), rows.sum() / 12, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.cd_loss(student, teacher, reduction="batchmean"), rows.sum() / 3,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.cd_loss([student, student], [teacher, teacher], reduction="sum"),
                               2 * rows.sum(), rtol=1e-12, atol=0)


CD_MAP = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.cd_loss(CD_MAP, torch.randn(2, 5, 4, 4)), ValueError,
     r"^cd_loss: student_features must have the channels of teacher_features \(2, 5, 4, 4\) \(use a connector"),
    (lambda: kdkernels.cd_loss([CD_MAP, CD_MAP], [CD_MAP]), ValueError,
     r"^cd_loss: teacher_features must hold one map per student map \(2\)"),
    (lambda: kdkernels.cd_loss([CD_MAP], [torch.randn(3, 3, 4, 4)]), ValueError,
     r"^cd_loss: teacher_features\[0\] must have the same batch size as student_features\[0\]"),
    (lambda: kdkernels.cd_loss(torch.randn(2, 3), torch.randn(2, 3)), ValueError,
     r"^cd_loss: student_features must have 4 dims"),
    (lambda: kdkernels.cd_loss(CD_MAP, CD_MAP, reduction="avg"), ValueError, r"^cd_loss: reduction must be one of"),
])
def test_cd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------- PAD

def official_pad_l2(student_embed_outputs, teacher_embed_outputs, log_variances, eps=1e-6, reduction="mean"):
    """torchdistill ``losses/mid_level.py`` ``PADL2Loss.forward`` on the flattened embeddings."""
    student_embed_outputs, teacher_embed_outputs = student_embed_outputs.flatten(1), teacher_embed_outputs.flatten(1)
    squared_losses = torch.mean(
        (teacher_embed_outputs - student_embed_outputs) ** 2 / (eps + torch.exp(log_variances.flatten(1)))
        + log_variances.flatten(1), dim=1)
    return squared_losses.mean() if reduction == "mean" else squared_losses.sum()


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 1, 1)], ids=["embedding", "pooled-map"])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_pad_l2_is_torchdistill_padl2loss(shape, eps):
    student, teacher = pair(shape, shape, seed=40)
    log_variance = randn(*shape, seed=42, scale=1.5, grad=True)
    assert_equals_official(lambda s, t, v: kdkernels.pad_l2_loss(s, t, v, eps),
                           lambda s, t, v: official_pad_l2(s, t, v, eps), student, teacher, log_variance, what="pad")
    # torchdistill's reduction='sum' sums the per-sample means: our "mean" times B
    torch.testing.assert_close(kdkernels.pad_l2_loss(student, teacher, log_variance, eps) * shape[0],
                               official_pad_l2(student, teacher, log_variance, eps, reduction="sum"),
                               rtol=1e-12, atol=0)


def test_pad_l2_reductions_and_dtypes():
    student, teacher, log_variance = randn(3, 4, seed=43), randn(3, 4, seed=44), randn(3, 4, seed=45)
    rows = kdkernels.pad_l2_loss(student, teacher, log_variance, reduction="none")
    expected_rows = ((teacher - student) ** 2 / (1e-6 + log_variance.exp()) + log_variance).sum(1)
    torch.testing.assert_close(rows, expected_rows, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.pad_l2_loss(student, teacher, log_variance, reduction="batchmean"),
                               rows.sum() / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.pad_l2_loss(student, teacher, log_variance, reduction="sum"), rows.sum(),
                               rtol=1e-12, atol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = kdkernels.pad_l2_loss(student.to(dtype), teacher.to(dtype), log_variance.to(dtype))
        assert low.dtype == torch.float32
        exact = official_pad_l2(student.to(dtype).double(), teacher.to(dtype).double(),
                                log_variance.to(dtype).double())
        torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=1e-6)
    mixed = kdkernels.pad_l2_loss(student.float(), teacher, log_variance.float())
    assert mixed.dtype == torch.float64


PAD_E = torch.randn(2, 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.pad_l2_loss(PAD_E, torch.randn(2, 4), PAD_E), ValueError,
     r"^pad_l2_loss: student_feature must have the same shape as teacher_feature \(2, 4\) \(use a connector"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, PAD_E, torch.randn(2, 4)), ValueError,
     r"^pad_l2_loss: log_variance must have the same shape as student_feature \(2, 3\)"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, torch.randn(3, 3), PAD_E), ValueError,
     r"^pad_l2_loss: teacher_feature must have the same batch size as student_feature"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, PAD_E, PAD_E.long()), TypeError, r"^pad_l2_loss: log_variance must be"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, PAD_E, [1.0]), TypeError,
     r"^pad_l2_loss: log_variance must be a torch.Tensor"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, PAD_E, PAD_E, eps=-1.0), ValueError, r"^pad_l2_loss: eps must be"),
    (lambda: kdkernels.pad_l2_loss(PAD_E, PAD_E, PAD_E, reduction="avg"), ValueError,
     r"^pad_l2_loss: reduction must be one of"),
])
def test_pad_l2_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------------------------------------------- KD-SVD

def tf_svd(X, n):
    """KD_methods_with_TF ``nets/SVP.py`` ``SVD``: NHWC map -> [B, HW, D], ``tf.svd`` (s, u, v with v not
    transposed), the first n of s, u, v each ``tf.nn.l2_normalize``d along axis 1."""
    x = X.reshape(X.shape[0], -1, X.shape[-1])
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh.transpose(1, 2)
    return F.normalize(s[:, :n], dim=1), F.normalize(u[:, :, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def tf_align_rsv(x, y):
    """``Align_rsv``: cosine = xᵀy; mask = sign(cosine) where |cosine| is the max over axis 1, else 0; x @ mask."""
    cosine = x.transpose(1, 2) @ y
    mask = torch.where(cosine.abs().amax(1, keepdim=True) == cosine.abs(), torch.sign(cosine),
                       torch.zeros_like(cosine))
    return x @ mask.detach(), y   # tf.sign / tf.where carry no gradient


def official_kd_svd(student_feature_maps, teacher_feature_maps, K=1):
    """``nets/Shared.py`` ``KD_SVD`` (dist_type 'SVD'); the maps given NCHW are turned NHWC as the TF code reads."""
    losses, v_tb, v_sb = [], None, None
    for i, (sfm, tfm) in enumerate(zip(student_feature_maps, teacher_feature_maps)):
        sfm, tfm = sfm.permute(0, 2, 3, 1), tfm.permute(0, 2, 3, 1)
        sigma_t, _, v_t = tf_svd(tfm, K)
        _, _, v_s = tf_svd(sfm, K + 3)
        v_s, v_t = tf_align_rsv(v_s, v_t)
        sigma_t = sigma_t.unsqueeze(1)
        v_t = v_t * sigma_t
        v_s = v_s * sigma_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)) ** 2 / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)) ** 2 / 8)
            l2loss = (s_rbf - t_rbf.detach()) ** 2
            losses.append(l2loss.sum())
        v_tb, v_sb = v_t, v_s
    return sum(losses)


def svd_stages(seed, channels=(3, 5, 4), sizes=(6, 4, 2)):
    return [randn(4, c, h, h, seed=seed + i, grad=True) for i, (c, h) in enumerate(zip(channels, sizes))]


def test_kd_svd_is_the_official_kd_svd():
    """The teacher is a frozen network in the official code (its σ_t scales the student's vectors too, which would
    send it a gradient): compared with constant teacher maps, and ours sends the teacher none."""
    students, teachers = svd_stages(40), svd_stages(50)
    constants = [t.detach() for t in teachers]
    value = assert_equals_official(lambda *m: kdkernels.kd_svd_loss(list(m[:3]), list(m[3:])),
                                   lambda *m: official_kd_svd(m[:3], m[3:]), *students, *constants, what="kd-svd")
    assert value > 0
    grads = torch.autograd.grad(kdkernels.kd_svd_loss(students, teachers), [*students, *teachers], allow_unused=True)
    assert all(g is None or not g.any() for g in grads[3:]), "the teacher side must get no gradient"
    assert all(g.abs().sum() > 0 for g in grads[:3])


def test_kd_svd_more_vectors_reductions_and_two_stages():
    students, teachers = svd_stages(60, (4, 6), (4, 3)), [t.detach() for t in svd_stages(70, (4, 6), (4, 3))]
    assert_equals_official(lambda *m: kdkernels.kd_svd_loss(list(m[:2]), list(m[2:]), k=2),
                           lambda *m: official_kd_svd(m[:2], m[2:], K=2), *students, *teachers, what="kd-svd k=2")
    rows = kdkernels.kd_svd_loss(students, teachers, reduction="none")
    assert rows.shape == (4,)
    torch.testing.assert_close(kdkernels.kd_svd_loss(students, teachers), rows.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.kd_svd_loss(students, teachers, reduction="batchmean"), rows.sum() / 4,
                               rtol=1e-12, atol=0)
    wider = kdkernels.kd_svd_loss(students, teachers, rbf_scale=2.0)
    assert not torch.allclose(wider, rows.sum())


def test_kd_svd_aligns_the_student_sign():
    """A student equal to the teacher up to a sign flip of a stage has the teacher's vectors: loss 0."""
    teachers = svd_stages(80)
    students = [teachers[0].detach(), -teachers[1].detach(), teachers[2].detach()]
    torch.testing.assert_close(kdkernels.kd_svd_loss(students, teachers), torch.zeros((), dtype=torch.float64),
                               rtol=0, atol=1e-20)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_svd_low_precision_computes_in_float32(dtype):
    students, teachers = svd_stages(90), svd_stages(95)
    value = kdkernels.kd_svd_loss([s.detach().to(dtype) for s in students], [t.detach().to(dtype) for t in teachers])
    assert value.dtype == torch.float32
    # in float32: the teacher's singular-vector signs are the float32 SVD's (float64's may differ, and the target too)
    expected = official_kd_svd([s.detach().to(dtype).float() for s in students],
                               [t.detach().to(dtype).float() for t in teachers])
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


SVD_MAP = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.kd_svd_loss([SVD_MAP], [SVD_MAP]), ValueError,
     r"^kd_svd_loss: student_features must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.kd_svd_loss(SVD_MAP, SVD_MAP), TypeError,
     r"^kd_svd_loss: student_features must be a list or tuple of tensors"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, SVD_MAP, SVD_MAP]), ValueError,
     r"^kd_svd_loss: teacher_features must hold one map per student map \(2\)"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, torch.randn(2, 5, 4, 4)]), ValueError,
     r"^kd_svd_loss: student_features\[1\] must have the channels of teacher_features\[1\] \(2, 5, 4, 4\) \(use a"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, torch.randn(2, 3)], [SVD_MAP, SVD_MAP]), ValueError,
     r"^kd_svd_loss: student_features\[1\] must have 4 dims"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, SVD_MAP], k=0), ValueError,
     r"^kd_svd_loss: k must be an int >= 1, got 0$"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, SVD_MAP], k=2, student_k=1), ValueError,
     r"^kd_svd_loss: student_k must be an int >= 2, got 1$"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, SVD_MAP], rbf_scale=0.0), ValueError,
     r"^kd_svd_loss: rbf_scale must be positive and finite, got 0.0$"),
    (lambda: kdkernels.kd_svd_loss([SVD_MAP, SVD_MAP], [SVD_MAP, SVD_MAP], reduction="mean"), ValueError,
     r"^kd_svd_loss: reduction must be one of 'batchmean', 'sum', 'none'"),
])
def test_kd_svd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------ Jacobian

def kdzoo_sobolev_on_gradients(grad_s, grad_t):
    """AberHu/Knowledge-Distillation-Zoo ``kd_losses/sobolev.py`` after its two ``grad`` calls: ``F.normalize`` of
    the flattened gradients (p 2, dim 1), ``F.mse_loss(norm_grad_s, norm_grad_t.detach())``."""
    norm_grad_s = F.normalize(grad_s.view(grad_s.size(0), -1), p=2, dim=1)
    norm_grad_t = F.normalize(grad_t.view(grad_t.size(0), -1), p=2, dim=1)
    return F.mse_loss(norm_grad_s, norm_grad_t.detach())


def paper_jacobian_matching(j_s, j_t):
    """Srinivas & Fleuret: per sample ‖J_s/‖J_s‖₂ − J_t/‖J_t‖₂‖₂², averaged over the batch."""
    j_s, j_t = j_s.flatten(1), j_t.flatten(1)
    diff = j_s / j_s.norm(dim=1, keepdim=True) - j_t / j_t.norm(dim=1, keepdim=True)
    return (diff ** 2).sum(1).mean()


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (3, 3, 4, 5), (5, 7)], ids=["digits", "rgb", "vector"])
def test_jacobian_matching_is_the_reference_and_the_paper_formula(shape):
    j_s, j_t = randn(*shape, seed=100, grad=True), randn(*shape, seed=101, scale=3.0)
    assert_equals_official(kdkernels.jacobian_matching_loss, kdzoo_sobolev_on_gradients, j_s, j_t, what="jacobian")
    assert_equals_official(lambda s, t: kdkernels.jacobian_matching_loss(s, t, reduction="batchmean"),
                           paper_jacobian_matching, j_s, j_t, what="jacobian batchmean")
    rows = kdkernels.jacobian_matching_loss(j_s, j_t, reduction="none")
    assert rows.shape == (shape[0],)
    torch.testing.assert_close(kdkernels.jacobian_matching_loss(j_s, j_t, reduction="sum"), rows.sum(), rtol=1e-12,
                               atol=0)
    # scale-invariant per sample: only the directions are matched
    scaled = j_s.detach() * torch.arange(1, shape[0] + 1, dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(kdkernels.jacobian_matching_loss(scaled, j_t), kdzoo_sobolev_on_gradients(j_s, j_t),
                               rtol=1e-12, atol=0)


def test_jacobian_matching_of_real_input_gradients_with_double_backward():
    """The loss on ``autograd.grad(..., create_graph=True)`` gradients trains the student's weights: the reference's
    whole ``Sobolev.forward`` (gather the target logit, grad w.r.t. the image) through a small net, in float64."""
    x = randn(4, 6, seed=102).requires_grad_()
    w_s, w_t = randn(6, 5, seed=103, grad=True), randn(6, 5, seed=104)
    target = torch.tensor([0, 3, 4, 1])

    def grads(w, create_graph):
        out = torch.tanh(x @ w) * 2
        chosen = torch.gather(out, 1, target.view(-1, 1))
        return torch.autograd.grad(chosen, x, torch.ones_like(chosen), create_graph=create_graph)[0]

    ours = kdkernels.jacobian_matching_loss(grads(w_s, True), grads(w_t, False))
    expected = kdzoo_sobolev_on_gradients(grads(w_s, True), grads(w_t, False))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, w_s)[0], torch.autograd.grad(expected, w_s)[0], rtol=1e-10,
                               atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jacobian_matching_low_precision_computes_in_float32(dtype):
    j_s, j_t = randn(3, 10, seed=105), randn(3, 10, seed=106)
    value = kdkernels.jacobian_matching_loss(j_s.to(dtype), j_t.to(dtype))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), kdzoo_sobolev_on_gradients(j_s.to(dtype).double(),
                                                                          j_t.to(dtype).double()), rtol=1e-5, atol=1e-8)


JAC = torch.randn(2, 1, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.jacobian_matching_loss(JAC, torch.randn(2, 1, 4, 5)), ValueError,
     r"^jacobian_matching_loss: student_jacobian must have the same shape as teacher_jacobian \(2, 1, 4, 5\)"),
    (lambda: kdkernels.jacobian_matching_loss(JAC, torch.randn(3, 1, 4, 4)), ValueError,
     r"^jacobian_matching_loss: teacher_jacobian must have the same batch size as student_jacobian"),
    (lambda: kdkernels.jacobian_matching_loss(JAC, JAC.long()), TypeError,
     r"^jacobian_matching_loss: teacher_jacobian must be"),
    (lambda: kdkernels.jacobian_matching_loss(None, JAC), TypeError,
     r"^jacobian_matching_loss: student_jacobian must be a torch.Tensor, got NoneType$"),
    (lambda: kdkernels.jacobian_matching_loss(JAC, JAC, reduction="avg"), ValueError,
     r"^jacobian_matching_loss: reduction must be one of"),
])
def test_jacobian_matching_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_kd_svd_gradient_is_finite_for_rank_deficient_student_maps():
    """Repeated singular values (here a map of rank 1: every position the same vector, and two all-zero samples'
    stages) make the plain SVD gradient inf/NaN; the student's basis comes with a backward that leaves those pairs
    out, as the official code's removenan, so the gradient is finite and nonzero."""
    generator = torch.Generator().manual_seed(0)
    column = torch.randn(2, 6, 1, 1, generator=generator, dtype=torch.float64)
    students = [column.expand(2, 6, 3, 3).clone().requires_grad_(),
                torch.zeros(2, 6, 2, 2, dtype=torch.float64).requires_grad_()]
    teachers = [torch.randn(2, 6, 3, 3, generator=generator, dtype=torch.float64),
                torch.randn(2, 6, 2, 2, generator=generator, dtype=torch.float64)]
    matrix = students[0].detach().flatten(2).transpose(1, 2).requires_grad_()
    plain = torch.linalg.svd(matrix, full_matrices=False)[2][:, :4].sum()
    assert not torch.isfinite(torch.autograd.grad(plain, matrix)[0]).all()   # what the plain SVD gives
    loss = kdkernels.kd_svd_loss(students, teachers)
    grads = torch.autograd.grad(loss, students)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0
