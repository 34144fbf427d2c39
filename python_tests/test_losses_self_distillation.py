"""byot_loss against BYOT's total loss transcribed here in eager PyTorch (luanyunteng/pytorch-be-your-own-teacher),
value and gradients in float64 for one to three heads, and its argument errors."""
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
