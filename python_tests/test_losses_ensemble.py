"""ensemble_kd_loss, camkd_weights, camkd_loss and camkd_feature_loss against their formulas transcribed here in eager
PyTorch (the averaged ensemble; Rorozhl/CA-MKD), value and gradients in float64, which inputs receive gradients, and
their argument errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from losses_testing import assert_equals_official, class_labels, randn

B, C = 8, 10


def teacher_logits(count, seed=20, grad=False):
    return [randn(B, C, seed=seed + k, scale=3.0, grad=grad) for k in range(count)]


# ------------------------------------------------------------------------------------ official formulas (eager)

def averaged_ensemble_kd(student, teachers, temperature):
    """Hinton et al.'s distillation of an ensemble: the KL from the mean of the teachers' tempered softmaxes, T²,
    batchmean."""
    mean = torch.stack([F.softmax(t / temperature, dim=1) for t in teachers]).mean(0)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), mean, reduction="sum") * temperature ** 2 \
        / student.shape[0]


def camkd_attention(logit_t_list, target):
    """Rorozhl/CA-MKD ``helper/loops.py``: the confidence weights from the teachers' cross-entropies."""
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(t, target) for t in logit_t_list], dim=0)
    return (1.0 - F.softmax(loss_t, dim=0)) / (len(logit_t_list) - 1)


def official_camkd_div(logit_s, logit_t_list, target, T):
    """Rorozhl/CA-MKD ``helper/loops.py``, ``ensemble_method == 'CAMKD'``, with ``DistillKL(is_ca=True)``."""
    attention = camkd_attention(logit_t_list, target)
    loss_div = torch.stack([(nn.KLDivLoss(reduction="none")(F.log_softmax(logit_s / T, dim=1),
                                                              F.softmax(t / T, dim=1)) * T ** 2).sum(-1)
                            for t in logit_t_list], dim=0)
    return torch.mul(attention, loss_div).sum() / (1.0 * loss_div.shape[1] * len(logit_t_list))


def official_camkd_inter(trans_feat_s_list, mid_feat_t_list, output_feat_t_list, target):
    """Rorozhl/CA-MKD ``distiller_zoo/CAMKD.py`` on the adapted student features and the teachers' classifier
    outputs on them (``models/util.py::CalWeight`` makes both)."""
    bsz, num_teacher = target.shape[0], len(trans_feat_s_list)
    weight = camkd_attention(output_feat_t_list, target)
    loss_st = torch.stack([nn.MSELoss(reduction="none")(s, t).reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans_feat_s_list, mid_feat_t_list)], dim=0)
    return torch.mul(weight, loss_st).sum() / (1.0 * bsz * num_teacher)


# -------------------------------------------------------------------------------------------------------- ensemble

@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("teachers", [1, 2, 3])
def test_ensemble_kd_averages_the_teachers_probabilities(teachers, temperature):
    student, logits = randn(B, C, seed=1, scale=3.0, grad=True), teacher_logits(teachers)
    assert_equals_official(lambda s: kdkernels.ensemble_kd_loss(s, logits, temperature),
                           lambda s: averaged_ensemble_kd(s, logits, temperature), student, what="ensemble kd")


def test_ensemble_of_one_teacher_is_kd_and_teachers_get_no_gradient():
    student, teachers = randn(B, C, seed=2, scale=3.0), teacher_logits(2, grad=True)
    torch.testing.assert_close(kdkernels.ensemble_kd_loss(student, teachers[:1]),
                               kdkernels.kd_loss(student, teachers[0].detach(), 4.0), rtol=1e-12, atol=0)
    student.requires_grad_()
    kdkernels.ensemble_kd_loss(student, teachers).backward()
    assert student.grad is not None and all(t.grad is None for t in teachers)


# ---------------------------------------------------------------------------------------------------------- CA-MKD

@pytest.mark.parametrize("teachers", [2, 3])
def test_camkd_weights_are_ca_mkd_and_carry_gradient(teachers):
    """Each sample's weights sum to 1 over the teachers; gradients flow through the logits (not detached)."""
    logits, labels = teacher_logits(teachers, grad=True), class_labels(B, C, seed=3)
    weights = assert_equals_official(lambda *t: kdkernels.camkd_weights(list(t), labels),
                                     lambda *t: camkd_attention(list(t), labels), *logits, what="camkd weights")
    assert weights.shape == (teachers, B)
    torch.testing.assert_close(weights.sum(0), torch.ones(B, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("teachers", [2, 3])
def test_camkd_loss_is_ca_mkd(teachers, temperature):
    student, logits, labels = randn(B, C, seed=4, scale=3.0, grad=True), teacher_logits(teachers), class_labels(B, C)
    assert_equals_official(lambda s: kdkernels.camkd_loss(s, logits, labels, temperature),
                           lambda s: official_camkd_div(s, logits, labels, temperature), student, what="camkd")


def test_camkd_loss_detaches_the_teachers():
    student, logits = randn(B, C, seed=5, grad=True), teacher_logits(2, grad=True)
    kdkernels.camkd_loss(student, logits, class_labels(B, C)).backward()
    assert student.grad is not None and all(t.grad is None for t in logits)


@pytest.mark.parametrize("shape", [(B, 3, 2, 2), (B, 5)], ids=["maps", "vectors"])
@pytest.mark.parametrize("teachers", [2, 3])
def test_camkd_feature_loss_is_ca_mkd_with_undetached_weights(teachers, shape):
    """Gradients reach the adapted student features and, through the weights, the logits; not the teachers."""
    adapted = [randn(*shape, seed=30 + k, grad=True) for k in range(teachers)]
    features = [randn(*shape, seed=40 + k, scale=1.0 + k, grad=True) for k in range(teachers)]
    logits, labels = teacher_logits(teachers, grad=True), class_labels(B, C, seed=6)
    assert_equals_official(
        lambda a, f, z: kdkernels.camkd_feature_loss(a, f, z, labels),
        lambda a, f, z: official_camkd_inter(a, [x.detach() for x in f], z, labels), adapted, features, logits,
        what="camkd feature")
    kdkernels.camkd_feature_loss(adapted, features, logits, labels).backward()
    assert logits[0].grad.abs().sum() > 0 and all(f.grad is None for f in features)


# ---------------------------------------------------------------------------------------------- argument errors

Z, Y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.ensemble_kd_loss(Z, torch.randn(4, 10)), TypeError,
     r"^ensemble_kd_loss: teacher_logits must be a list or tuple of tensors, got a torch.float32 tensor"),
    (lambda: kdkernels.ensemble_kd_loss(Z, []), ValueError,
     r"^ensemble_kd_loss: teacher_logits must hold at least 1 tensor\(s\), got 0$"),
    (lambda: kdkernels.ensemble_kd_loss(Z, [Z, torch.randn(4, 9)]), ValueError,
     r"^ensemble_kd_loss: teacher_logits\[1\] must have the same shape as student_logits \(4, 10\), got shape "
     r"\(4, 9\)$"),
    (lambda: kdkernels.camkd_weights([Z], Y), ValueError,
     r"^camkd_weights: teacher_logits must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.camkd_weights([Z, Z], Y[:3]), ValueError,
     r"^camkd_weights: labels must have the logits' leading shape \(4,\), got shape \(3,\)$"),
    (lambda: kdkernels.camkd_loss(Z, [Z, Z], Y, temperature=-1.0), ValueError,
     r"^camkd_loss: temperature must be positive and finite, got -1.0$"),
    (lambda: kdkernels.camkd_feature_loss([Z, Z], [Z], [Z, Z], Y), ValueError,
     r"^camkd_feature_loss: student_features, teacher_features, teacher_logits_on_student must hold one adapted "
     r"student feature, teacher feature and logits per teacher, got 2, 1 and 2$"),
    (lambda: kdkernels.camkd_feature_loss([Z, Z], [Z, torch.randn(4, 5)], [Z, Z], Y), ValueError,
     r"^camkd_feature_loss: student_features\[1\], teacher_features\[1\] differ in shape \(they must be equal\), "
     r"got \(4, 10\) vs \(4, 5\)$"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------------ ONE

def one_official(z1, z2, z3, gate, targets, consistency_weight=1.0, eps=1e-7):
    """Lan1991Xu/ONE_NeurIPS2018: ``ONE_ResNet.forward``'s ``x_m`` (``models/cifar/resnet.py``), ``cifar_one.py``
    ``train``'s loss and ``loss/kl_loss.py`` ``KLLoss`` (T = 3, its ``+ 10**(-7)`` as ``eps``)."""
    def kl_loss(pred, label, T=3):
        predict = F.log_softmax(pred / T, dim=1)
        target = (F.softmax(label / T, dim=1) + eps).detach()
        return T * T * ((target * (target.log() - predict)).sum(1).sum() / target.size()[0])

    x_m = (gate[:, 0].repeat(z1.size()[1], 1).transpose(0, 1) * z1 + gate[:, 1].repeat(z1.size()[1], 1).transpose(0, 1)
           * z2 + gate[:, 2].repeat(z1.size()[1], 1).transpose(0, 1) * z3)
    loss_cross = (F.cross_entropy(z1, targets) + F.cross_entropy(z2, targets) + F.cross_entropy(z3, targets)
                  + F.cross_entropy(x_m, targets))
    loss_kl = consistency_weight * (kl_loss(z1, x_m) + kl_loss(z2, x_m) + kl_loss(z3, x_m))
    return loss_cross + loss_kl


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.0])
def test_one_loss_is_the_official_objective(weight):
    """Exact (no epsilon) against the official formula without its 1e-7; value and gradients of the three branches
    and the gate (through the ensemble's CE only)."""
    z1, z2, z3 = teacher_logits(3, seed=40, grad=True)
    gate = torch.softmax(randn(B, 3, seed=50, scale=2.0), dim=1).requires_grad_()
    y = class_labels(B, C, seed=4)
    assert_equals_official(lambda a, b, c, g: kdkernels.one_loss([a, b, c], g, y, 3.0, weight),
                           lambda a, b, c, g: one_official(a, b, c, g, y, weight, eps=0.0), z1, z2, z3, gate,
                           what="one")
    # with KLLoss's 1e-7 the official value moves by less than 1e-5 relative
    ours = kdkernels.one_loss([z1, z2, z3], gate, y, 3.0, weight)
    torch.testing.assert_close(ours, one_official(z1, z2, z3, gate, y, weight), rtol=1e-5, atol=0)


def test_one_loss_target_is_detached_and_reductions_agree():
    z1, z2, z3 = teacher_logits(3, seed=40, grad=True)
    gate = torch.softmax(randn(B, 3, seed=50), dim=1).requires_grad_()
    y = class_labels(B, C, seed=4)
    kl_only = kdkernels.one_loss([z1, z2, z3], gate, y, 3.0, 1.0) - kdkernels.one_loss([z1, z2, z3], gate, y, 3.0, 0.0)
    assert kl_only > 0
    assert torch.autograd.grad(kl_only, gate)[0].abs().max() < 1e-12, "the KL's ensemble target carries no gradient"
    rows = kdkernels.one_loss([z1, z2, z3], gate, y, reduction="none")
    torch.testing.assert_close(rows.sum(), kdkernels.one_loss([z1, z2, z3], gate, y, reduction="sum"))
    torch.testing.assert_close(rows.mean(), kdkernels.one_loss([z1, z2, z3], gate, y))
    low = kdkernels.one_loss([z.to(torch.bfloat16) for z in (z1, z2, z3)], gate.to(torch.bfloat16), y)
    assert low.dtype == torch.float32


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.one_loss([torch.randn(4, 10)] * 3, torch.ones(4, 2) / 2, torch.zeros(4, dtype=torch.long)),
     ValueError, r"^one_loss: gate_weights must have shape \[B, m\] = \[4, 3\], got shape \(4, 2\)$"),
    (lambda: kdkernels.one_loss([torch.randn(4, 10), torch.randn(4, 9)], torch.ones(4, 2),
                                torch.zeros(4, dtype=torch.long)),
     ValueError, r"^one_loss: branch_logits\[1\] must have the same shape as branch_logits\[0\]"),
    (lambda: kdkernels.one_loss(torch.randn(4, 10), torch.ones(4, 1), torch.zeros(4, dtype=torch.long)),
     TypeError, r"^one_loss: branch_logits must be a list or tuple of tensors"),
    (lambda: kdkernels.one_loss([torch.randn(4, 10)], torch.ones(4, 1), torch.zeros(4, dtype=torch.long), 0.0),
     ValueError, r"^one_loss: temperature must be positive and finite, got 0.0$"),
    (lambda: kdkernels.one_loss([torch.randn(4, 10)], torch.ones(4, 1), torch.zeros(4, dtype=torch.long), 3.0, -1.0),
     ValueError, r"^one_loss: kl_weight must be >= 0 and finite, got -1.0$"),
    (lambda: kdkernels.one_loss([torch.randn(4, 10)], torch.ones(4, 1, dtype=torch.long),
                                torch.zeros(4, dtype=torch.long)), TypeError, r"^one_loss: gate_weights must be"),
])
def test_one_loss_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
