"""kd_loss and KDLoss: agreement with the eager formula users write, reductions, and argument validation."""
import pytest
import torch

import kdkernels
from kdkernels.reference.softmax_kl import eager_hinton_kd


def logits(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equals_the_eager_hinton_formula(temperature):
    student, teacher = logits((16, 100), 1, torch.float64), logits((16, 100), 2, torch.float64)
    expected = eager_hinton_kd(student, teacher, temperature)
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, temperature), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_divergences_equal_their_eager_formulas(temperature):
    student, teacher = logits((8, 40), 7, torch.float64), logits((8, 40), 8, torch.float64)
    forward = eager_hinton_kd(student, teacher, temperature)
    reverse = eager_hinton_kd(teacher, student, temperature)  # KL(p_s || p_t)
    log_p_s, log_p_t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    by_hand = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean() * temperature ** 2
    torch.testing.assert_close(reverse, by_hand, rtol=1e-12, atol=0)
    for divergence, expected in (("forward", forward), ("reverse", reverse),
                                 ("symmetric", (forward + reverse) / 2)):
        actual = kdkernels.kd_loss(student, teacher, temperature, divergence=divergence)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0, msg=divergence)


def test_reductions_relate_as_documented():
    student, teacher = logits((2, 3, 50), 3), logits((2, 3, 50), 4)
    per_row = kdkernels.kd_loss(student, teacher, 2.0, reduction="none")
    assert per_row.shape == (2, 3) and per_row.dtype == torch.float32
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="sum"), per_row.sum())
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0), per_row.sum() / 6)
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="mean"), per_row.sum() / (6 * 50))
    unscaled = kdkernels.kd_loss(student, teacher, 2.0, reduction="none", scale_by_t2=False)
    torch.testing.assert_close(unscaled * 4.0, per_row)
    mean_as_kldiv = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1),
                                               log_target=True, reduction="mean") * 4.0
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="mean"), mean_as_kldiv)


def test_module_matches_functional():
    student, teacher = logits((8, 10), 5), logits((8, 10), 6)
    labels = torch.tensor([0, 1, -100, 3, 4, 5, -100, 7])
    criterion = kdkernels.nn.KDLoss(temperature=3.0, reduction="sum", divergence="symmetric")
    torch.testing.assert_close(criterion(student, teacher, labels),
                               kdkernels.kd_loss(student, teacher, 3.0, reduction="sum", labels=labels,
                                                 divergence="symmetric"))
    assert "temperature=3.0" in repr(criterion)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.nn.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kdkernels.nn.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="divergence"):
        kdkernels.nn.KDLoss(divergence="js")


GOOD = dict(student_logits=logits((4, 5)), teacher_logits=logits((4, 5), 1))

BAD_INPUTS = [
    (dict(student_logits=[[1.0, 2.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "teacher_logits must be float32"),
    (dict(student_logits=torch.ones(4, 5, dtype=torch.bool)), TypeError, "student_logits must be float32"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    (dict(student_logits=torch.empty(0, 5), teacher_logits=torch.empty(0, 5)), ValueError, "student_logits must not be empty"),
    (dict(student_logits=torch.empty(4, 0), teacher_logits=torch.empty(4, 0)), ValueError, "student_logits must not be empty"),
    (dict(teacher_logits=logits((4, 6))), ValueError, "same shape"),
    (dict(teacher_logits=logits((5, 4))), ValueError, "same shape"),
    (dict(teacher_logits=torch.zeros(4, 5, device="meta")), ValueError, "same device"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(temperature=-2.0), ValueError, "temperature must be positive"),
    (dict(temperature=float("inf")), ValueError, "temperature must be positive and finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be positive and finite"),
    (dict(temperature="4"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(scale_by_t2=1), TypeError, "scale_by_t2 must be a bool"),
    (dict(labels=torch.zeros(4, dtype=torch.float32)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels must have the logits' leading shape"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels must have the logits' leading shape"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=torch.zeros(4, dtype=torch.int64), ignore_index=0.5), TypeError, "ignore_index must be an int"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    (dict(divergence="jeffreys"), ValueError, "divergence must be one of"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta must be in"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta must be in"),
    (dict(divergence="jsd", beta="0.5"), TypeError, "beta must be a real number"),
    (dict(backend=3), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(changes, error, message):
    arguments = {**GOOD, "temperature": 2.0, **changes}
    student, teacher = arguments.pop("student_logits"), arguments.pop("teacher_logits")
    temperature = arguments.pop("temperature")
    with pytest.raises(error, match=message):
        kdkernels.kd_loss(student, teacher, temperature, **arguments)


def test_labels_on_another_device_are_rejected():
    with pytest.raises(ValueError, match="labels must be on the logits' device"):
        kdkernels.kd_loss(GOOD["student_logits"], GOOD["teacher_logits"],
                          labels=torch.zeros(4, dtype=torch.int64, device="meta"))
