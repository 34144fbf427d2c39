"""at_loss against RepDistiller's attention transfer transcribed here in eager PyTorch, value and gradients in float64
(maps of different sizes and channel counts, other exponents, every reduction), and its argument errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, randn


def repdistiller_at(f_s, f_t, p=2.0):
    """RepDistiller ``AT.py`` (= attention-transfer ``utils.py::at_loss``) for one stage."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (at(f_s) - at(f_t)).pow(2).mean()


SHAPES = [((4, 3, 4, 4), (4, 3, 4, 4)), ((3, 4, 8, 8), (3, 6, 4, 4)), ((3, 5, 2, 2), (3, 2, 4, 4)),
          ((2, 3, 6, 6), (2, 16, 6, 6))]
SHAPE_IDS = ["equal", "student-larger", "teacher-larger", "unequal-channels"]


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
def test_at_is_repdistiller(shapes):
    student = randn(*shapes[0], seed=1, grad=True)
    teacher = randn(*shapes[1], seed=2, scale=2.0, grad=True)
    assert_equals_official(kdkernels.at_loss, repdistiller_at, student, teacher, what="at")


@pytest.mark.parametrize("p", [1.0, 1.5, 4.0])
def test_at_other_exponents(p):
    """A fractional p needs non-negative maps (post-ReLU features, as AT taps them)."""
    student = randn(3, 4, 4, 4, seed=3).abs().requires_grad_()
    teacher = randn(3, 6, 4, 4, seed=4).abs().requires_grad_()
    assert_equals_official(lambda s, t: kdkernels.at_loss(s, t, p), lambda s, t: repdistiller_at(s, t, p), student,
                           teacher, what=f"at p={p}")


def test_at_reductions_are_over_the_batch_times_positions_terms():
    student, teacher = randn(3, 4, 8, 8, seed=5), randn(3, 6, 4, 4, seed=6)
    rows = kdkernels.at_loss(student, teacher, reduction="none")
    assert rows.shape == (3,)
    torch.testing.assert_close(rows.sum() / (3 * 16), repdistiller_at(student, teacher), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.at_loss(student, teacher, reduction="batchmean"), rows.sum() / 3,
                               rtol=1e-12, atol=0)


X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.at_loss(X, X, p=0), ValueError, r"^at_loss: p must be positive and finite, got 0.0$"),
    (lambda: kdkernels.at_loss([1.0], X), TypeError, r"^at_loss: student must be a torch.Tensor, got list$"),
    (lambda: kdkernels.at_loss(X, torch.randn(3, 3, 4, 4)), ValueError,
     r"^at_loss: teacher must have the same batch size as student \(2, 3, 4, 4\), got shape \(3, 3, 4, 4\)$"),
    (lambda: kdkernels.at_loss(X, torch.randn(2, 16)), ValueError, r"^at_loss: teacher must have 4 dims, got shape "
                                                                   r"\(2, 16\)$"),
    (lambda: kdkernels.at_loss(X, X, reduction="avg"), ValueError, r"^at_loss: reduction must be one of"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
