"""lsgan_discriminator_loss and lsgan_generator_loss (kdkernels/losses/online_feature.py, torch ops) against AFD's
least-squares losses transcribed here (Chung et al., ICML 2020): float64 value and gradients, low precision, errors."""
import pytest
import torch

import kdkernels
from losses_testing import assert_equals_official, randn


def afd_discriminator_official(real, fake):
    """``L_D = [1 − D(T_peer(G_peer(x)))]² + [D(T_own(G_own(x)))]²``, each averaged over the batch (and over the
    patch scores), written out in float64 sums."""
    return ((1 - real) ** 2).sum() / real.numel() + (fake ** 2).sum() / fake.numel()


def afd_generator_official(fake):
    """``L_G = [1 − D(T_own(G_own(x)))]²`` averaged over the batch (and the patch scores)."""
    return ((1 - fake) ** 2).sum() / fake.numel()


@pytest.mark.parametrize("shape", [(8, 1), (8, 1, 3, 3)])
def test_lsgan_losses_are_the_afd_formulas(shape):
    real = randn(*shape, seed=1, scale=2.0).sigmoid().detach().requires_grad_(True)
    fake = randn(*shape, seed=2, scale=2.0).sigmoid().detach().requires_grad_(True)
    assert_equals_official(kdkernels.lsgan_discriminator_loss, afd_discriminator_official, real, fake,
                           what="discriminator")
    assert_equals_official(kdkernels.lsgan_generator_loss, afd_generator_official, fake, what="generator")


def test_real_and_fake_may_have_different_batches():
    real, fake = randn(5, 1, seed=1).sigmoid(), randn(3, 1, seed=2).sigmoid()
    torch.testing.assert_close(kdkernels.lsgan_discriminator_loss(real, fake), afd_discriminator_official(real, fake))


def test_perfect_discriminator_and_perfect_fool_give_zero():
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    assert kdkernels.lsgan_discriminator_loss(ones, zeros).item() == 0.0
    assert kdkernels.lsgan_discriminator_loss(zeros, ones).item() == 2.0
    assert kdkernels.lsgan_generator_loss(ones).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(dtype):
    real, fake = randn(16, 1, seed=3).sigmoid(), randn(16, 1, seed=4).sigmoid()
    value = kdkernels.lsgan_discriminator_loss(real.to(dtype), fake.to(dtype))
    assert value.dtype == torch.float32
    expected = afd_discriminator_official(real.to(dtype).double(), fake.to(dtype).double())
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert kdkernels.lsgan_generator_loss(fake.to(dtype)).dtype == torch.float32


def test_modules_equal_functions():
    real, fake = randn(6, 1, seed=5).sigmoid(), randn(6, 1, seed=6).sigmoid()
    module = kdkernels.nn.LSGANDiscriminatorLoss()
    assert torch.equal(module(real, fake), kdkernels.lsgan_discriminator_loss(real, fake))
    assert torch.equal(kdkernels.nn.LSGANGeneratorLoss()(fake), kdkernels.lsgan_generator_loss(fake))


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.lsgan_generator_loss([0.5]), TypeError, r"^lsgan_generator_loss: fake_scores"),
    (lambda: kdkernels.lsgan_generator_loss(torch.ones(3, dtype=torch.long)), TypeError,
     r"^lsgan_generator_loss: fake_scores"),
    (lambda: kdkernels.lsgan_generator_loss(torch.tensor(0.5)), ValueError, r"^lsgan_generator_loss: fake_scores"),
    (lambda: kdkernels.lsgan_discriminator_loss(torch.ones(0, 1), torch.ones(2, 1)), ValueError,
     r"^lsgan_discriminator_loss: real_scores"),
    (lambda: kdkernels.lsgan_discriminator_loss(torch.ones(2, 1), "x"), TypeError,
     r"^lsgan_discriminator_loss: fake_scores"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
