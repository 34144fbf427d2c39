"""privileged_loss (kdkernels/losses/cross_modal.py, torch ops) against the authors' code transcribed here
(lopezpaz/distillation_privileged_information @cdc4cae code/mnist.py: Keras losses on two softmax outputs of one
network): float64 value and gradients, reductions, dtypes, errors."""
import pytest
import torch

import kdkernels
from losses_testing import assert_equals_official, class_labels, randn


# ------------------------------------------------------------------------------------ official formulas (eager)

def keras_categorical_crossentropy(y_true, y_pred):
    """Keras ``categorical_crossentropy`` per sample on probabilities (the clip to [eps, 1 − eps] never binds
    here)."""
    return -(y_true * torch.log(y_pred)).sum(dim=1)


def lopez_paz_distillation(student_logits, teacher_logits, labels, t, l):
    """``code/mnist.py``: ``ys_tr = softmax(soften(x_tr), t)`` precomputed from the teacher (a constant), then the
    student graph's ``hard`` and ``soft`` outputs are both ``softmax(w3)``, compiled with losses
    ``(1 − l)·categorical_crossentropy`` on the labels and ``t·t·l·categorical_crossentropy`` on ``ys_tr``; Keras
    averages each loss over the batch and sums the outputs' losses."""
    e = torch.exp(teacher_logits.detach() / t)
    ys = e / e.sum(dim=1, keepdim=True)
    p = torch.exp(student_logits) / torch.exp(student_logits).sum(dim=1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels, student_logits.shape[1]).to(student_logits.dtype)
    hard = (1.0 - l) * keras_categorical_crossentropy(onehot, p).mean()
    soft = t * t * l * keras_categorical_crossentropy(ys, p).mean()
    return hard + soft


@pytest.mark.parametrize("t, l", [(1.0, 1.0), (2.0, 0.5), (20.0, 0.1), (5.0, 0.0)])
@pytest.mark.parametrize("rows, classes", [(6, 7), (32, 10)])
def test_privileged_loss_is_the_official_formula(t, l, rows, classes):
    student = randn(rows, classes, seed=1, scale=2.0, grad=True)
    teacher = randn(rows, classes, seed=2, scale=3.0, grad=True)
    labels = class_labels(rows, classes)
    assert_equals_official(lambda s, z: kdkernels.privileged_loss(s, z, labels, t, l),
                           lambda s, z: lopez_paz_distillation(s, z, labels, t, l), student, teacher,
                           what=f"privileged T={t} λ={l}")


def test_the_teacher_gets_no_gradient_and_lambda_zero_is_cross_entropy():
    student, teacher = randn(5, 4, seed=3, grad=True), randn(5, 4, seed=4, grad=True)
    labels = class_labels(5, 4)
    kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.7).backward()
    assert teacher.grad is None and student.grad is not None
    torch.testing.assert_close(kdkernels.privileged_loss(student, teacher, labels, 3.0, 0.0),
                               torch.nn.functional.cross_entropy(student, labels))


def test_reductions_and_dtypes():
    student, teacher, labels = randn(6, 5, seed=5), randn(6, 5, seed=6), class_labels(6, 5)
    rows = kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.5, reduction="none")
    assert rows.shape == (6,)
    torch.testing.assert_close(kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.5), rows.mean())
    torch.testing.assert_close(kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.5, reduction="sum"),
                               rows.sum())
    torch.testing.assert_close(kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.5, reduction="mean"),
                               rows.sum() / 30)
    reference = kdkernels.privileged_loss(student, teacher, labels, 2.0, 0.5)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        value = kdkernels.privileged_loss(student.to(dtype), teacher.to(dtype), labels, 2.0, 0.5)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, "privileged_loss: temperature"),
    (dict(imitation=1.5), ValueError, "privileged_loss: imitation"),
    (dict(imitation="a"), TypeError, "privileged_loss: imitation"),
    (dict(reduction="avg"), ValueError, "privileged_loss: reduction"),
    (dict(labels=torch.tensor([0, 1, 2, 9, 0, 1])), ValueError, "privileged_loss: labels"),
    (dict(labels=torch.zeros(6)), TypeError, "privileged_loss: labels"),
    (dict(teacher_logits=torch.randn(6, 4)), ValueError, "privileged_loss: teacher_logits"),
    (dict(student_logits=torch.randn(6)), ValueError, "privileged_loss: student_logits"),
])
def test_privileged_loss_errors_name_the_argument(kwargs, error, match):
    arguments = dict(student_logits=torch.randn(6, 5), teacher_logits=torch.randn(6, 5),
                     labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        kdkernels.privileged_loss(**arguments)


# ------------------------------------------------------------------------------------- supervision transfer

def caffe_euclidean_loss(bottom0, bottom1):
    """Caffe ``EuclideanLossLayer::Forward_cpu``: ``diff = b0 − b1``, ``dot = diff·diff``, ``loss = dot / num / 2``
    (``num`` the batch size), on the flattened blobs; the teacher blob is not back-propagated to (Gupta et al.'s
    teacher is fixed)."""
    diff = (bottom0 - bottom1.detach()).reshape(-1)
    return torch.dot(diff, diff) / bottom0.shape[0] / 2.0


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2), (3, 2, 4, 4)])
def test_supervision_transfer_loss_is_caffes_euclidean_loss(shape):
    student = randn(*shape, seed=7, grad=True)
    teacher = randn(*shape, seed=8, scale=2.0, grad=True)
    assert_equals_official(lambda s, t: kdkernels.supervision_transfer_loss(s, t.detach()),
                           caffe_euclidean_loss, student, teacher, what=f"transfer {shape}")


def test_supervision_transfer_loss_reductions_and_dtypes():
    student, teacher = randn(4, 3, 2, 2, seed=9), randn(4, 3, 2, 2, seed=10)
    rows = kdkernels.supervision_transfer_loss(student, teacher, reduction="none")
    assert rows.shape == (4,)
    torch.testing.assert_close(rows, 0.5 * (student - teacher).pow(2).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(kdkernels.supervision_transfer_loss(student, teacher, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdkernels.supervision_transfer_loss(student, teacher), rows.mean())
    reference = kdkernels.supervision_transfer_loss(student, teacher)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        value = kdkernels.supervision_transfer_loss(student.to(dtype), teacher.to(dtype))
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(teacher_features=torch.randn(4, 6, 2, 2)), ValueError, "supervision_transfer_loss: .*connector"),
    (dict(teacher_features=torch.randn(5, 3, 2, 2)), ValueError, "supervision_transfer_loss: teacher_features"),
    (dict(student_features=torch.ones(4, 3, 2, 2, dtype=torch.long)), TypeError,
     "supervision_transfer_loss: student_features"),
    (dict(student_features=torch.randn(4)), ValueError, "supervision_transfer_loss: student_features"),
    (dict(reduction="mean"), ValueError, "supervision_transfer_loss: reduction"),
])
def test_supervision_transfer_loss_errors_name_the_argument(kwargs, error, match):
    arguments = dict(student_features=torch.randn(4, 3, 2, 2), teacher_features=torch.randn(4, 3, 2, 2))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        kdkernels.supervision_transfer_loss(**arguments)
