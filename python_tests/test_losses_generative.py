"""gan_generator_loss, gan_discriminator_loss and dafl_generator_loss (kdkernels/losses/generative.py, torch ops)
against the official code transcribed here (PyTorch's DCGAN example, huawei-noah/Efficient-Computing DAFL-train.py):
float64 value and gradient, the nn modules; errors."""
import pytest
import torch
import torch.nn as nn

import kdkernels
from losses_testing import assert_equals_official, randn


def dcgan_generator_error(output):
    """pytorch/examples ``dcgan/main.py``: ``errG = criterion(output, label)`` with real labels, on ``D(fake)``
    probabilities (here their logits through a sigmoid)."""
    probabilities = torch.sigmoid(output)
    return nn.BCELoss()(probabilities, torch.ones_like(probabilities))


def dcgan_discriminator_error(real, fake):
    """pytorch/examples ``dcgan/main.py``: ``errD = errD_real + errD_fake``."""
    real, fake = torch.sigmoid(real), torch.sigmoid(fake)
    criterion = nn.BCELoss()
    return criterion(real, torch.ones_like(real)) + criterion(fake, torch.zeros_like(fake))


def dafl_official(outputs_T, features_T, oh=1.0, ie=5.0, a=0.1):
    """huawei-noah/Efficient-Computing ``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``, the generator's loss."""
    pred = outputs_T.data.max(1)[1]
    loss_activation = -features_T.abs().mean()
    loss_one_hot = nn.CrossEntropyLoss()(outputs_T, pred)
    softmax_o_T = torch.nn.functional.softmax(outputs_T, dim=1).mean(dim=0)
    loss_information_entropy = (softmax_o_T * torch.log10(softmax_o_T)).sum()
    return loss_one_hot * oh + loss_information_entropy * ie + loss_activation * a


def test_gan_losses_are_the_dcgan_criteria():
    real, fake = randn(12, 1, seed=1, scale=2.0, grad=True), randn(12, 1, seed=2, scale=2.0, grad=True)
    assert_equals_official(kdkernels.gan_generator_loss, dcgan_generator_error, fake, what="generator")
    assert_equals_official(kdkernels.gan_discriminator_loss, dcgan_discriminator_error, real, fake,
                           what="discriminator")
    assert torch.equal(kdkernels.nn.GANDiscriminatorLoss()(real, fake), kdkernels.gan_discriminator_loss(real, fake))


def test_gan_losses_are_finite_for_saturated_logits():
    fake = torch.tensor([[200.0], [-200.0]], dtype=torch.float64)
    assert torch.isfinite(kdkernels.gan_generator_loss(fake))
    assert torch.isfinite(kdkernels.gan_discriminator_loss(fake, fake))


@pytest.mark.parametrize("weights", [(1.0, 5.0, 0.1), (0.05, 5.0, 0.01)], ids=["mnist", "cifar10"])
def test_dafl_generator_loss_is_the_official_code(weights):
    logits, features = randn(16, 10, seed=3, scale=2.0, grad=True), randn(16, 7, seed=4, grad=True)
    assert_equals_official(lambda t, f: kdkernels.dafl_generator_loss(t, f, *weights),
                           lambda t, f: dafl_official(t, f, *weights), logits, features, what="dafl")
    parts = kdkernels.dafl_generator_loss(logits, features, return_parts=True)
    total = sum(w * p for w, p in zip(weights, parts))
    torch.testing.assert_close(total, kdkernels.dafl_generator_loss(logits, features, *weights), rtol=1e-12, atol=0)
    assert torch.equal(kdkernels.nn.DAFLGeneratorLoss(*weights)(logits, features),
                       kdkernels.dafl_generator_loss(logits, features, *weights))


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.gan_generator_loss([0.0]), TypeError, r"^gan_generator_loss: fake_logits must be"),
    (lambda: kdkernels.gan_discriminator_loss(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)), TypeError,
     r"^gan_discriminator_loss: fake_logits must be"),
    (lambda: kdkernels.dafl_generator_loss(torch.randn(2, 3, 4), torch.randn(2, 5)), ValueError,
     r"^dafl_generator_loss: teacher_logits must have 2 dims"),
    (lambda: kdkernels.dafl_generator_loss(torch.randn(2, 3), torch.randn(2, 5), one_hot_weight=-1.0), ValueError,
     r"^dafl_generator_loss: one_hot_weight must be >= 0"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
