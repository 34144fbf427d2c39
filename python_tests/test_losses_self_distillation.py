"""byot_loss, sad_loss, dks_loss, ddgsd_loss and mixskd_loss against their official losses transcribed here in eager
PyTorch (BYOT: luanyunteng/pytorch-be-your-own-teacher; SAD: ENet-SAD_Pytorch at_gen; DKS: sundw2014/DKS; DDGSD: the
paper, no code; MixSKD: winycg/Self-KD-Lib main_mixskd_imagenet.py; snapshot distillation: the paper, no code), value
and gradients in float64, and their argument errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, class_labels, randn

B, C, D = 8, 10, 6


def official_byot(final, heads, target, final_feature, head_features, temperature, alpha, beta):
    """luanyunteng/pytorch-be-your-own-teacher ``train.py`` total loss."""
    teacher = torch.softmax(final / temperature, dim=1).detach()

    def kd_loss_function(output):
        return -torch.mean(torch.sum(torch.log_softmax(output / temperature, dim=1) * teacher, dim=1))

    def feature_loss_function(fea, target_fea):
        return torch.abs((fea - target_fea) ** 2 * ((fea > 0) | (target_fea > 0)).float()).sum()

    ce = F.cross_entropy(final, target) + sum(F.cross_entropy(h, target) for h in heads)
    kd = sum(kd_loss_function(h) * temperature ** 2 for h in heads)
    feature = sum(feature_loss_function(f, final_feature.detach()) for f in head_features)
    return (1 - alpha) * ce + alpha * kd + beta * feature


def byot_inputs(heads, feature_shape=(B, D)):
    """(final logits, head logits, labels, final feature, head features): float64 leaves that require grad."""
    return (randn(B, C, seed=1, scale=3.0, grad=True), [randn(B, C, seed=10 + k, scale=3.0, grad=True)
                                                       for k in range(heads)],
            class_labels(B, C, seed=2), randn(*feature_shape, seed=3, grad=True),
            [randn(*feature_shape, seed=20 + k, grad=True) for k in range(heads)])


@pytest.mark.parametrize("temperature, alpha, beta", [(3.0, 0.1, 1e-6), (1.0, 0.3, 1e-3), (4.0, 0.0, 0.0)])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_byot_is_the_official_total_loss(heads, temperature, alpha, beta):
    """The final feature and the soft targets are detached: the final logits learn from the CE alone."""
    final, head_logits, labels, final_feature, head_features = byot_inputs(heads)
    assert_equals_official(
        lambda z, h, f, g: kdkernels.byot_loss(z, h, labels, f, g, temperature, alpha, beta),
        lambda z, h, f, g: official_byot(z, h, labels, f, g, temperature, alpha, beta),
        final, head_logits, final_feature, head_features, what="byot")


def test_byot_flattens_feature_maps_per_sample():
    final, head_logits, labels, final_feature, head_features = byot_inputs(2, (B, 2, 3))
    assert_equals_official(
        lambda z, h, f, g: kdkernels.byot_loss(z, h, labels, f, g),
        lambda z, h, f, g: official_byot(z, h, labels, f.flatten(1), [x.flatten(1) for x in g], 3.0, 0.1, 1e-6),
        final, head_logits, final_feature, head_features, what="byot [B, 2, 3] features")


Z, Y, F6 = torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), torch.randn(4, 6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.byot_loss(Z, [Z], Y, F6, [F6, F6]), ValueError,
     r"^byot_loss: head_features must hold one feature per head logits \(1\), got 2$"),
    (lambda: kdkernels.byot_loss(Z, [Z], Y, F6, [torch.randn(4, 5)]), ValueError,
     r"^byot_loss: head_features\[0\] must have final_features' 6 features per sample, got 5$"),
    (lambda: kdkernels.byot_loss(Z, [torch.randn(4, 9)], Y, F6, [F6]), ValueError,
     r"^byot_loss: head_logits\[0\] must have the same shape as final_logits \(4, 10\), got shape \(4, 9\)$"),
    (lambda: kdkernels.byot_loss(Z, [Z], Y[:3], F6, [F6]), ValueError,
     r"^byot_loss: labels must have the logits' leading shape \(4,\), got shape \(3,\)$"),
    (lambda: kdkernels.byot_loss(Z, [Z], Y, F6, [F6], alpha=-0.1), ValueError,
     r"^byot_loss: alpha must be >= 0 and finite, got -0.1$"),
    (lambda: kdkernels.byot_loss(Z, Z, Y, F6, [F6]), TypeError,
     r"^byot_loss: head_logits must be a list or tuple of tensors, got a torch.float32 tensor"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------------- SAD

def official_at_gen(x1, x2, detach_target):
    """InhwanBae/ENet-SAD_Pytorch ``model_ENET_SAD.py`` ``at_gen``: x1 the previous (shallower) map, x2 the current
    one, upsampled to x1's size when they differ (here with ``size=`` for any ratio), SpatialSoftmax at T = 1, MSE."""
    if detach_target:
        x2 = x2.detach()

    def sps(x):
        x = x.view(x.shape[0], -1, x.shape[1] * x.shape[2])
        return F.softmax(x / 1.0, dim=-1)

    if x1.size() != x2.size():
        a1 = sps(x1.pow(2).sum(dim=1))
        a2 = x2.pow(2).sum(dim=1, keepdim=True)
        a2 = sps(torch.squeeze(F.interpolate(a2, size=x1.shape[-2:], mode="bilinear", align_corners=False), dim=1))
    else:
        a1, a2 = sps(x1.pow(2).sum(dim=1)), sps(x2.pow(2).sum(dim=1))
    return F.mse_loss(a1, a2, reduction="mean")


def sad_maps(shapes):
    return [randn(B, *shape, seed=30 + k, scale=2.0, grad=True) for k, shape in enumerate(shapes)]


@pytest.mark.parametrize("shapes", [[(3, 8, 8), (5, 4, 4)], [(4, 8, 8), (6, 4, 4), (7, 2, 2)],
                                    [(3, 4, 4), (5, 4, 4)], [(2, 6, 6), (3, 4, 4)]])
@pytest.mark.parametrize("detach_target", [True, False])
def test_sad_is_the_official_at_gen_sum(shapes, detach_target):
    maps = sad_maps(shapes)
    assert_equals_official(
        lambda m: kdkernels.sad_loss(m, 2.0, detach_target),
        lambda m: sum(official_at_gen(a, b, detach_target) for a, b in zip(m[:-1], m[1:])),
        maps, what="sad")


def test_sad_target_is_detached_and_p_is_used():
    maps = sad_maps([(3, 4, 4), (5, 2, 2)])
    kdkernels.sad_loss(maps).backward()
    assert maps[1].grad is None and maps[0].grad.abs().sum() > 0
    a, b = sad_maps([(3, 4, 4), (5, 2, 2)])
    assert not torch.allclose(kdkernels.sad_loss([a, b], p=1.0), kdkernels.sad_loss([a, b], p=2.0))


# ------------------------------------------------------------------------------------------------------------- DKS

def official_dks(outputs, targets):
    """sundw2014/DKS ``wrn_DKS/main.py`` ``h`` with ``KL_divergence.py`` (the ones tensor on the CPU here)."""

    def kl_divergence(logits_p, logits_q):
        p, q = F.softmax(logits_p, dim=1), F.softmax(logits_q, dim=1)
        num_classes, epsilon = p.shape[1], 1e-8
        _p = (p + epsilon * torch.ones(*p.shape, dtype=p.dtype)) / (1.0 + num_classes * epsilon)
        _q = (q + epsilon * torch.ones(*q.shape, dtype=q.dtype)) / (1.0 + num_classes * epsilon)
        return torch.mean(torch.sum(_p * torch.log(_p / _q), 1))

    loss = []
    for o in outputs:
        loss.append(F.cross_entropy(o, targets))
        for o2 in outputs:
            if o is not o2:
                loss.append(kl_divergence(o2.detach(), o))
    return sum(loss)


@pytest.mark.parametrize("branches", [2, 3, 4])
def test_dks_is_the_official_loss(branches):
    logits = [randn(B, C, seed=40 + k, scale=3.0, grad=True) for k in range(branches)]
    labels = class_labels(B, C, seed=5)
    assert_equals_official(lambda z: kdkernels.dks_loss(z, labels), lambda z: official_dks(z, labels), logits,
                           what="dks")


def test_dks_each_branch_learns_only_through_its_own_terms():
    """With ε = 0, branch i's gradient is that of CE(z_i) + KL(softmax(z_j).detach() ‖ softmax(z_i)) alone."""
    z = [randn(B, C, seed=50 + k, grad=True) for k in range(2)]
    labels = class_labels(B, C, seed=6)
    kdkernels.dks_loss(z, labels, epsilon=0.0).backward()
    for x, y in ((z[0], z[1]), (z[1], z[0])):
        own = F.cross_entropy(x, labels) + F.kl_div(F.log_softmax(x, 1), F.softmax(y.detach(), 1),
                                                    reduction="batchmean")
        torch.testing.assert_close(x.grad, torch.autograd.grad(own, x)[0], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------- DDGSD

def paper_ddgsd(za, zb, labels, fa, fb, kl_weight, mmd_weight):
    """Xu & Liu (AAAI 2019), as read from the paper: CE on both views, KL both ways, linear-kernel MMD."""
    pa, pb = F.softmax(za, dim=1), F.softmax(zb, dim=1)
    kl_ab = torch.sum(pa * torch.log(pa / pb), dim=1).mean()
    kl_ba = torch.sum(pb * torch.log(pb / pa), dim=1).mean()
    mmd = torch.sum((fa.reshape(len(fa), -1).mean(0) - fb.reshape(len(fb), -1).mean(0)) ** 2)
    return F.cross_entropy(za, labels) + F.cross_entropy(zb, labels) + kl_weight * (kl_ab + kl_ba) + mmd_weight * mmd


@pytest.mark.parametrize("kl_weight, mmd_weight", [(1.0, 1.0), (0.5, 3.0), (0.0, 0.0)])
@pytest.mark.parametrize("feature_shape", [(D,), (2, 3)])
def test_ddgsd_is_the_paper_loss(kl_weight, mmd_weight, feature_shape):
    za, zb = randn(B, C, seed=60, scale=3.0, grad=True), randn(B, C, seed=61, scale=3.0, grad=True)
    fa, fb = randn(B, *feature_shape, seed=62, grad=True), randn(B, *feature_shape, seed=63, offset=0.5, grad=True)
    labels = class_labels(B, C, seed=7)
    assert_equals_official(
        lambda a, b, f, g: kdkernels.ddgsd_loss(a, b, labels, f, g, kl_weight, mmd_weight),
        lambda a, b, f, g: paper_ddgsd(a, b, labels, f, g, kl_weight, mmd_weight),
        za, zb, fa, fb, what="ddgsd")


def official_mixskd(logits, features, ensemble_logits, ensemble_mixup_logits, judged, judged_mixup, targets, lam,
                    index, kd_t):
    """winycg/Self-KD-Lib @ ede3062 ``main_mixskd_imagenet.py`` ``train`` on the network's outputs for
    ``cat([inputs, mix_inputs])``: ``logits``/``features`` [2B, ...] per classifier, the self-teacher's outputs, and
    the discriminators' outputs on the (pooled) interpolated and mixup features (``discriminatorLoss``)."""
    bs = targets.shape[0]
    targets_a, targets_b = targets, targets[index]

    def criterion_div(y_s, y_t):   # utils.py DistillKL
        p_s = F.log_softmax(y_s / kd_t, dim=1)
        p_t = F.softmax(y_t / kd_t, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * (kd_t ** 2)

    def mixup_criterion(pred):
        return lam * F.cross_entropy(pred, targets_a) + (1 - lam) * F.cross_entropy(pred, targets_b)

    mix_logits = [lam * logit[:bs] + (1 - lam) * logit[index] for logit in logits]
    ensemble_features = [lam * (fea[:bs]) + (1 - lam) * (fea[index]) for fea in features]
    mixup_logits = [logit[bs:] for logit in logits]
    mixup_features = [fea[bs:] for fea in features]
    loss_cls = sum(F.cross_entropy(logit[:bs], targets) for logit in logits)
    loss_cls = loss_cls + sum(mixup_criterion(mixup_logit) for mixup_logit in mixup_logits)
    loss_cls = loss_cls + mixup_criterion(ensemble_logits) + mixup_criterion(ensemble_mixup_logits)
    loss_div = criterion_div(mix_logits[-1], ensemble_mixup_logits.detach())
    loss_div = loss_div + criterion_div(mixup_logits[-1], ensemble_logits.detach())
    for i in range(len(mix_logits) - 1):
        loss_div = loss_div + criterion_div(mix_logits[i], mixup_logits[i].detach())
        loss_div = loss_div + criterion_div(mixup_logits[i], mix_logits[i].detach())
    loss_fea = sum(F.mse_loss(ensemble_features[fi], mixup_features[fi]) for fi in range(len(features)))
    target = torch.tensor([[1, 0] for _ in range(bs)] + [[0, 1] for _ in range(bs)], dtype=torch.float64)
    loss_gan = sum(F.binary_cross_entropy_with_logits(torch.cat((d, d_mix), 0), target)
                   for d, d_mix in zip(judged, judged_mixup))
    return loss_cls + loss_div + loss_fea + loss_gan


def mixskd_inputs(classifiers, feature_shape):
    """float64 leaves: clean and mixup logits/features per classifier, self-teacher and discriminator outputs."""
    def many(seed, *shape):
        return [randn(B, *shape, seed=seed + k, scale=2.0, grad=True) for k in range(classifiers)]
    return (many(100, C), many(110, C), many(120, *feature_shape), many(130, *feature_shape),
            randn(B, C, seed=140, scale=2.0, grad=True), randn(B, C, seed=141, scale=2.0, grad=True),
            many(150, 2), many(160, 2))


@pytest.mark.parametrize("temperature, lam", [(3.0, 0.3), (1.0, 0.9), (4.0, 0.0)])
@pytest.mark.parametrize("classifiers, feature_shape", [(4, (3, 2, 2)), (1, (5,)), (2, (3, 2, 2))])
def test_mixskd_is_the_official_loss(classifiers, feature_shape, temperature, lam):
    labels, index = class_labels(B, C, seed=8), torch.randperm(B, generator=torch.Generator().manual_seed(3))
    inputs = mixskd_inputs(classifiers, feature_shape)

    def official(z, m, f, g, t, t_m, d, d_m):
        return official_mixskd([torch.cat([a, b]) for a, b in zip(z, m)], [torch.cat([a, b]) for a, b in zip(f, g)],
                               t, t_m, d, d_m, labels, lam, index, temperature)

    for weight in (lam, torch.full((B,), lam, dtype=torch.float64)):   # a number, or one weight per sample
        value = assert_equals_official(
            lambda *args: kdkernels.mixskd_loss(*args, labels, weight, index, temperature), official, *inputs,
            what="mixskd")
        assert value > 0


def test_mixskd_per_sample_weights_mix_each_row_with_its_partner():
    """With one lam per sample the interpolation and the mixup CE weigh each row by its own lam."""
    labels, index = class_labels(B, C, seed=8), torch.arange(B).roll(1)
    z, m, f, g, t, t_m, d, d_m = mixskd_inputs(1, (4,))
    lam = torch.linspace(0.1, 0.9, B, dtype=torch.float64)
    column = lam[:, None]

    def mix_ce(logits):
        return (lam * F.cross_entropy(logits, labels, reduction="none")
                + (1 - lam) * F.cross_entropy(logits, labels[index], reduction="none")).mean()

    def kd(student, teacher):
        return kdkernels.kd_loss(student, teacher.detach(), 3.0)

    def expected(z, m, f, g, t, t_m, d, d_m):
        z_hat, f_hat = column * z[0] + (1 - column) * z[0][index], column * f[0] + (1 - column) * f[0][index]
        target = torch.cat([torch.tensor([[1.0, 0.0]] * B), torch.tensor([[0.0, 1.0]] * B)]).double()
        return (F.cross_entropy(z[0], labels) + mix_ce(m[0]) + mix_ce(t) + mix_ce(t_m) + kd(z_hat, t_m) + kd(m[0], t)
                + ((f_hat - g[0]) ** 2).mean()
                + F.binary_cross_entropy_with_logits(torch.cat([d[0], d_m[0]]), target))

    assert_equals_official(lambda *args: kdkernels.mixskd_loss(*args, labels, lam, index), expected,
                           z, m, f, g, t, t_m, d, d_m, what="mixskd per sample")


def paper_snapshot_distillation(student, teacher, labels, temperature, ce_weight, kd_weight):
    """Snapshot distillation (Yang et al., CVPR 2019) as read from the paper: CE plus Hinton KD from the snapshot."""
    p_t = torch.softmax(teacher.detach() / temperature, dim=1)
    log_p_s = torch.log_softmax(student / temperature, dim=1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1).mean()
    return ce_weight * F.cross_entropy(student, labels) + kd_weight * temperature ** 2 * kl


@pytest.mark.parametrize("temperature, ce_weight, kd_weight", [(3.0, 1.0, 1.0), (1.0, 0.5, 2.0), (4.0, 0.0, 1.0)])
def test_snapshot_distillation_is_the_paper_loss(temperature, ce_weight, kd_weight):
    """The snapshot is detached: its gradient is zero."""
    student, teacher = randn(B, C, seed=170, scale=3.0, grad=True), randn(B, C, seed=171, scale=3.0, grad=True)
    labels = class_labels(B, C, seed=9)
    assert_equals_official(
        lambda s, t: kdkernels.snapshot_distillation_loss(s, t, labels, temperature, ce_weight, kd_weight),
        lambda s, t: paper_snapshot_distillation(s, t, labels, temperature, ce_weight, kd_weight),
        student, teacher, what="snapshot distillation")
    assert torch.autograd.grad(kdkernels.snapshot_distillation_loss(student, teacher, labels), teacher,
                               allow_unused=True)[0] is None


S4, S2 = torch.randn(4, 3, 4, 4), torch.randn(4, 5, 2, 2)


def mixskd(**changes):
    maps = [torch.randn(4, 3, 2, 2)] * 2
    arguments = dict(logits=[Z, Z], mixup_logits=[Z, Z], features=maps, mixup_features=maps, teacher_logits=Z,
                     teacher_mixup_logits=Z, discriminator_logits=[torch.randn(4, 2)] * 2,
                     discriminator_mixup_logits=[torch.randn(4, 2)] * 2, labels=Y, lam=0.5,
                     permutation=torch.arange(4))
    return kdkernels.mixskd_loss(**{**arguments, **changes})


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.sad_loss([S4]), ValueError, r"^sad_loss: stage_maps must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.sad_loss([S4, torch.randn(4, 5)]), ValueError, r"^sad_loss: stage_maps\[1\]"),
    (lambda: kdkernels.sad_loss([S4, torch.randn(3, 5, 2, 2)]), ValueError,
     r"^sad_loss: stage_maps\[1\] must have stage_maps\[0\]'s batch size 4, got shape \(3, 5, 2, 2\)$"),
    (lambda: kdkernels.sad_loss([S4, S2], p=0.0), ValueError, r"^sad_loss: p must be"),
    (lambda: kdkernels.sad_loss([S4, S2], detach_target=1), TypeError, r"^sad_loss: detach_target"),
    (lambda: kdkernels.sad_loss(S4), TypeError, r"^sad_loss: stage_maps must be a list or tuple of tensors"),
    (lambda: kdkernels.dks_loss([Z], Y), ValueError, r"^dks_loss: logits must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.dks_loss([Z, torch.randn(4, 9)], Y), ValueError,
     r"^dks_loss: logits\[1\] must have the same shape as logits\[0\] \(4, 10\), got shape \(4, 9\)$"),
    (lambda: kdkernels.dks_loss([Z, Z], Y[:3]), ValueError, r"^dks_loss: labels must have the logits' leading shape"),
    (lambda: kdkernels.dks_loss([Z, Z], Y, epsilon=-1.0), ValueError, r"^dks_loss: epsilon must be >= 0"),
    (lambda: mixskd(mixup_logits=[Z]), ValueError, r"^mixskd_loss: mixup_logits must hold one logits per "
                                                       r"classifier \(2\), got 1$"),
    (lambda: mixskd(features=[torch.randn(4, 3)] * 2), ValueError,
     r"^mixskd_loss: features\[0\] must have the same shape as mixup_features\[0\] \(4, 3, 2, 2\)"),
    (lambda: mixskd(discriminator_logits=[torch.randn(4, 3)] * 2, discriminator_mixup_logits=[torch.randn(4, 3)] * 2),
     ValueError, r"^mixskd_loss: discriminator_logits\[0\] must have shape \[4, 2\]"),
    (lambda: mixskd(teacher_logits=torch.randn(4, 9)), ValueError, r"^mixskd_loss: teacher_mixup_logits must have"),
    (lambda: mixskd(lam=1.5), ValueError, r"^mixskd_loss: lam must be in \[0, 1\], got 1.5$"),
    (lambda: mixskd(lam=torch.ones(3)), ValueError, r"^mixskd_loss: lam must be a number or hold one weight per"),
    (lambda: mixskd(lam=torch.ones(4, dtype=torch.int64)), TypeError, r"^mixskd_loss: lam must be float32"),
    (lambda: mixskd(permutation=torch.arange(4).int()), TypeError, r"^mixskd_loss: permutation must be int64"),
    (lambda: mixskd(permutation=torch.arange(3)), ValueError, r"^mixskd_loss: permutation must have shape \[4\]"),
    (lambda: mixskd(labels=Y[:3]), ValueError, r"^mixskd_loss: labels must have the logits' leading shape"),
    (lambda: mixskd(temperature=0.0), ValueError, r"^mixskd_loss: temperature must be"),
    (lambda: kdkernels.snapshot_distillation_loss(Z, torch.randn(4, 9), Y), ValueError,
     r"^snapshot_distillation_loss: teacher_logits must have the same shape as student_logits"),
    (lambda: kdkernels.snapshot_distillation_loss(Z, Z, Y[:2]), ValueError,
     r"^snapshot_distillation_loss: labels must have the logits' leading shape"),
    (lambda: kdkernels.snapshot_distillation_loss(Z, Z, Y, ce_weight=-1.0), ValueError,
     r"^snapshot_distillation_loss: ce_weight must be >= 0"),
    (lambda: kdkernels.snapshot_distillation_loss(Z, Z, Y, kd_weight="1"), TypeError,
     r"^snapshot_distillation_loss: kd_weight must be a real number"),
])
def test_self_distillation_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
