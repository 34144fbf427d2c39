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
