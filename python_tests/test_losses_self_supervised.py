"""softmax_mse_loss (kdkernels/losses/self_supervised.py, torch ops) against CuriousAI/mean-teacher's code transcribed
here: float64 value and gradient, reductions, the nn module; errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, randn

SHAPES = [(6, 7), (32, 100)]
SHAPE_IDS = [f"{b}x{c}" for b, c in SHAPES]


def mean_teacher_softmax_mse(input_logits, target_logits):
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss`` (a sum over the batch; the
    caller in ``pytorch/main.py`` divides it by the minibatch size)."""
    assert input_logits.size() == target_logits.size()
    input_softmax = F.softmax(input_logits, dim=1)
    target_softmax = F.softmax(target_logits, dim=1)
    num_classes = input_logits.size()[1]
    return F.mse_loss(input_softmax, target_softmax, reduction="sum") / num_classes


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_softmax_mse_is_the_mean_teachers_consistency_cost(shape):
    student, teacher = randn(*shape, seed=20, scale=3.0, grad=True), randn(*shape, seed=21, scale=3.0, grad=True)
    batch = shape[0]
    assert_equals_official(lambda s, t: kdkernels.softmax_mse_loss(s, t),
                           lambda s, t: mean_teacher_softmax_mse(s, t) / batch, student, teacher,
                           what="softmax mse (batchmean)")
    assert_equals_official(lambda s, t: kdkernels.softmax_mse_loss(s, t, reduction="sum"),
                           mean_teacher_softmax_mse, student, teacher, what="softmax mse (sum)")


def test_softmax_mse_reductions_relate_as_documented():
    student, teacher = randn(5, 2, 7, seed=22, scale=2.0), randn(5, 2, 7, seed=23, scale=2.0)
    rows = kdkernels.softmax_mse_loss(student, teacher, reduction="none")
    assert rows.shape == (5, 2)
    expected_rows = (F.softmax(student, -1) - F.softmax(teacher, -1)).pow(2).mean(-1)
    torch.testing.assert_close(rows, expected_rows, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher), rows.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher, reduction="mean"), rows.mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher, reduction="sum"), rows.sum(),
                               rtol=1e-12, atol=0)
    same = kdkernels.nn.SoftmaxMSELoss(reduction="sum")(student, teacher)
    assert torch.equal(same, kdkernels.softmax_mse_loss(student, teacher, reduction="sum"))


LOGITS = torch.randn(4, 10)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.softmax_mse_loss(LOGITS, LOGITS[:, :5]), ValueError,
     r"^softmax_mse_loss: teacher_logits must have the same shape as student_logits \(4, 10\), got shape \(4, 5\)$"),
    (lambda: kdkernels.softmax_mse_loss(LOGITS, LOGITS, reduction="avg"), ValueError,
     r"^softmax_mse_loss: reduction must be one of"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------------ BYOL

def byol_l2_normalize(x, axis=-1, epsilon=1e-12):
    """deepmind-research ``byol/utils/helpers.py`` ``l2_normalize`` (jnp → torch)."""
    square_sum = torch.sum(x * x, dim=axis, keepdim=True)
    return x * torch.rsqrt(torch.clamp(square_sum, min=epsilon))


def byol_regression_loss(x, y):
    """deepmind-research ``byol/utils/helpers.py`` ``regression_loss``: per-sample ``Σ_d (x̂ − ŷ)²``."""
    normed_x, normed_y = byol_l2_normalize(x, axis=-1), byol_l2_normalize(y, axis=-1)
    return torch.sum((normed_x - normed_y) ** 2, dim=-1)


@pytest.mark.parametrize("shape", [(6, 5), (32, 256)], ids=["6x5", "32x256"])
def test_byol_loss_is_the_official_regression_loss(shape):
    prediction, target = randn(*shape, seed=30, scale=2.0, grad=True), randn(*shape, seed=31, scale=0.5, grad=True)
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z),
                           lambda p, z: byol_regression_loss(p, z).mean(), prediction, target,
                           what="byol regression loss (batchmean, byol_experiment.py loss_fn's jnp.mean)")
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z, reduction="sum"),
                           lambda p, z: byol_regression_loss(p, z).sum(), prediction, target, what="byol (sum)")
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z, reduction="none"), byol_regression_loss,
                           prediction, target, what="byol (none)")


def test_byol_loss_is_two_minus_two_cosine_and_its_module_agrees():
    prediction, target = randn(8, 4, seed=32), randn(8, 4, seed=33, scale=3.0)
    rows = kdkernels.byol_loss(prediction, target, reduction="none")
    torch.testing.assert_close(rows, 2 - 2 * F.cosine_similarity(prediction, target, dim=-1), rtol=1e-12, atol=1e-12)
    assert torch.equal(kdkernels.nn.BYOLLoss(reduction="sum")(prediction, target),
                       kdkernels.byol_loss(prediction, target, reduction="sum"))
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    value = kdkernels.byol_loss(zero, torch.ones(3, 4, dtype=torch.float64))
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(zero.grad).all(), "the 1e-12 floor of l2_normalize"
    half = kdkernels.byol_loss(prediction.half(), target.half())
    assert half.dtype == torch.float32


FEATURES = torch.randn(4, 6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES[:, :5]), ValueError,
     r"^byol_loss: prediction must have the same shape as target \(4, 5\)"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES[:3]), ValueError,
     r"^byol_loss: target must have the same batch size as prediction"),
    (lambda: kdkernels.byol_loss(FEATURES[0], FEATURES[0]), ValueError, r"^byol_loss: prediction must have 2 dims"),
    (lambda: kdkernels.byol_loss(FEATURES.long(), FEATURES), TypeError, r"^byol_loss: prediction must be float32"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES.numpy()), TypeError, r"^byol_loss: target must be a torch.Tensor"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES, reduction="mean"), ValueError,
     r"^byol_loss: reduction must be one of 'batchmean', 'sum', 'none'"),
])
def test_byol_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
