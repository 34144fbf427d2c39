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


# ---- oec_kd_loss (Devwalkar/BOC-KD utils/Losses.py) -------------------------------------------------------------

def boc_kd_combined_official(preds, labels, maps, adaptation_outputs, T=2.0, ratios=(0.7, 0.15, 0.15)):
    """Devwalkar/BOC-KD ``Combined_Loss.student_forward`` with ``Normal_Loss``, ``Intermmediate_loss`` (MSELoss,
    adaptation outputs given) and ``KL_Loss``; ``preds`` = the students' logits (the pseudo teacher, weights 1/K, is
    built here as ``BIO_ResNet._forward_student`` builds it), ``maps[b][j]`` = student j's map at block b."""
    K = len(preds)
    teacher = (torch.full((1, K, 1), 1.0 / K, dtype=torch.float64) * torch.stack(preds, dim=1)).sum(dim=1)
    loss_a = sum(torch.nn.CrossEntropyLoss()(z, labels) for z in preds)
    loss_b = 0
    for b in range(len(maps)):
        pseudo_teacher = maps[b][0].detach()
        for j in range(1, K):
            loss_b = loss_b + torch.nn.MSELoss()(pseudo_teacher, adaptation_outputs[b][j - 1])
    loss_c = 0
    for z in preds:
        student = torch.log_softmax(z / T, dim=1)
        target = torch.softmax(teacher / T, dim=1).detach()
        loss_c = loss_c + T ** 2 * ((target * (target.log() - student)).sum(1).sum() / target.size(0))
    return ratios[0] * loss_a + ratios[1] * loss_b + ratios[2] * loss_c


def oec_inputs(K=3, blocks=2):
    logits = [randn(6, 5, seed=10 + i, scale=2.0, grad=True) for i in range(K)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    targets = [randn(6, 4, 2, 2, seed=20 + b, grad=True) for b in range(blocks)]
    adapted = [[randn(6, 4, 2, 2, seed=30 + 10 * j + b, grad=True) for b in range(blocks)] for j in range(1, K)]
    return logits, labels, targets, adapted


@pytest.mark.parametrize("T, weights", [(2.0, (0.7, 0.15, 0.15)), (3.0, (1.0, 1.0, 1.0))])
def test_oec_kd_loss_is_boc_kd_combined_loss(T, weights):
    logits, labels, targets, adapted = oec_inputs()
    maps = [[targets[b]] + [adapted[j][b] for j in range(len(adapted))] for b in range(len(targets))]
    adaptation_outputs = [[adapted[j][b] for j in range(len(adapted))] for b in range(len(targets))]
    leaves = [*logits, *targets, *[a for maps_j in adapted for a in maps_j]]
    ours = kdkernels.oec_kd_loss(logits, labels, targets, adapted, T, *weights)
    official = boc_kd_combined_official(logits, labels, maps, adaptation_outputs, T, weights)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)
    ours_grads = torch.autograd.grad(ours, leaves, allow_unused=True)
    official_grads = torch.autograd.grad(official, leaves, allow_unused=True)
    for mine, theirs in zip(ours_grads, official_grads):
        if theirs is None:   # the targets (student 0's maps) are detached in both
            assert mine is None
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert all(g is None for g in ours_grads[len(logits):len(logits) + len(targets)])
    parts = kdkernels.oec_kd_loss(logits, labels, targets, adapted, T, *weights, return_parts=True)
    torch.testing.assert_close(sum(w * p for w, p in zip(weights, parts)), ours)


def test_oec_kd_loss_low_precision_is_computed_in_float32():
    logits, labels, targets, adapted = oec_inputs()
    half = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
    value = kdkernels.oec_kd_loss([half(z) for z in logits], labels, [half(t) for t in targets],
                                  [[half(a) for a in maps] for maps in adapted])
    assert value.dtype == torch.float32
    expected = kdkernels.oec_kd_loss([half(z).double() for z in logits], labels, [half(t).double() for t in targets],
                                     [[half(a).double() for a in maps] for maps in adapted])
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, error, match", [
    ({"logits": "x"}, TypeError, r"^oec_kd_loss: logits"),
    ({"logits": "one"}, ValueError, r"^oec_kd_loss: logits must hold at least 2"),
    ({"labels": "float"}, TypeError, r"^oec_kd_loss: labels"),
    ({"adapted_features": "missing"}, ValueError, r"^oec_kd_loss: adapted_features must hold one list per student"),
    ({"adapted_features": "block"}, ValueError, r"^oec_kd_loss: adapted_features\[0\] must hold one map per block"),
    ({"adapted_features": "channels"}, ValueError, r"^oec_kd_loss: adapted_features\[1\]\[0\] must have the same"),
    ({"temperature": 0.0}, ValueError, r"^oec_kd_loss: temperature"),
    ({"kl_weight": -1.0}, ValueError, r"^oec_kd_loss: kl_weight"),
])
def test_oec_kd_loss_bad_arguments(change, error, match):
    logits, labels, targets, adapted = oec_inputs()
    arguments = {"logits": logits, "labels": labels, "target_features": targets, "adapted_features": adapted}
    (name, value), = change.items()
    arguments[name] = {"x": "x", "one": logits[:1], "float": labels.double(), "missing": adapted[:1],
                       "block": [adapted[0][:1], adapted[1]], "channels": [adapted[0], [adapted[1][0][:, :3]]
                                                                          + adapted[1][1:]]}.get(value, value)
    with pytest.raises(error, match=match):
        kdkernels.oec_kd_loss(**arguments)
