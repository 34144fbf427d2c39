"""label_smoothing_loss, tf_kd_reg_loss, tf_nkd_loss and zipf_ls_loss against the official code transcribed here in
eager PyTorch (timm / torch, Tf-KD, cls_KD, zipfls), value and gradient in float64, and their argument errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.losses.soft_label import dense_votes, min_rank
from losses_testing import assert_equals_official, class_labels, randn

SHAPES = [(6, 7), (32, 100)]
SHAPE_IDS = [f"{b}x{c}" for b, c in SHAPES]


# ------------------------------------------------------------------------------------ official formulas (eager)

def tf_kd_label_smoothing(student, labels, alpha=0.1):
    """Tf-KD ``my_loss_function.py::loss_label_smoothing``: 1 − α on the label, α/(C − 1) elsewhere."""
    n, c = student.shape
    smoothed = torch.full((n, c), alpha / (c - 1), dtype=student.dtype).scatter_(1, labels.unsqueeze(1), 1 - alpha)
    return -torch.sum(F.log_softmax(student, dim=1) * smoothed) / n


def tf_kd_kldiv_mean(log_input, target):
    """``nn.KLDivLoss()`` with its default element mean (spelled out: sum / numel)."""
    return (target * (target.log() - log_input)).sum() / target.numel()


def tf_kd_reg(student, labels, temperature, multiplier, correct_prob=0.99):
    """Tf-KD ``my_loss_function.py::loss_kd_regularization``."""
    classes = student.shape[1]
    teacher_soft = torch.ones_like(student) * (1 - correct_prob) / (classes - 1)
    for i in range(student.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    return tf_kd_kldiv_mean(F.log_softmax(student, dim=1), F.softmax(teacher_soft / temperature, dim=1)) \
        * multiplier


def cls_kd_tf_nkd(student, gt_label):
    """yzd-v/cls_KD ``classification_distiller.py`` @8a16562 with ``tf_nkd=True``."""
    if gt_label.dim() > 1:
        value, label = torch.sort(gt_label, descending=True, dim=-1)
        t_len = 2
    else:
        label = gt_label.view(len(gt_label), 1)
        value = torch.ones_like(label)
        t_len = 1
    y_i = F.softmax(student, dim=1)
    total = 0.0
    for i in range(t_len):
        y_t = torch.gather(y_i, 1, label[:, i].unsqueeze(-1))
        w_t = y_t + value[:, i].unsqueeze(-1) - y_t.mean()
        w_t[value[:, i].unsqueeze(-1) == 0] = 0
        total = total - (w_t.detach() * torch.log(y_t)).mean()
    return total


def scipy_min_rank(scores):
    """rankdata(−scores, method='min') by counting, row by row."""
    return torch.tensor([[1 + sum(1 for other in row if other > value) for value in row] for row in scores.tolist()])


def zipfls_loss(student, dense_logits, labels, do_mask=False, power=1.0):
    """megvii-research/zipfls ``pytorch_zipfls/losses.py`` (``zipf_loss``, dense, ``rank='hard'``,
    ``rank_zipf``) from the per-location logits on. ``power``: ours (the official distribution is 1 / rank)."""
    n, locations, classes = dense_logits.shape
    dense_argmax = dense_logits.argmax(dim=2)
    scores = torch.zeros([n, max(classes, locations)], dtype=student.dtype)
    votes = scores.scatter_add(1, dense_argmax, torch.ones_like(scores))[:, :classes]
    rank = scipy_min_rank(votes).to(student.dtype)
    mask = torch.ones_like(student).scatter_(1, labels.unsqueeze(1), 0.0)
    dist = (1 / rank ** power)[mask.bool()].reshape(n, classes - 1)
    pdf = dist / dist.sum(dim=1, keepdim=True)
    res = F.log_softmax(student[mask.bool()].view(n, classes - 1), dim=1)
    loss = F.kl_div(res, pdf, reduction="none").sum(dim=1)
    if do_mask:
        keep = student.argmax(1) == labels
        return (loss * keep).sum() / keep.sum() if keep.any() else loss.mean() * 0
    return loss.mean()


# ------------------------------------------------------------------------------------------------ label smoothing

@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_label_smoothing_uniform_is_torch_cross_entropy_with_label_smoothing(shape, epsilon):
    logits, labels = randn(*shape, seed=1, scale=3.0, grad=True), class_labels(shape[0], shape[1], seed=2)
    assert_equals_official(lambda z: kdkernels.label_smoothing_loss(z, labels, epsilon),
                           lambda z: F.cross_entropy(z, labels, label_smoothing=epsilon), logits,
                           what="label smoothing (uniform)")


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
@pytest.mark.parametrize("shape", SHAPES + [(4, 2)], ids=SHAPE_IDS + ["4x2"])
def test_label_smoothing_others_is_tf_kd(shape, epsilon):
    logits, labels = randn(*shape, seed=3, scale=3.0, grad=True), class_labels(shape[0], shape[1], seed=4)
    assert_equals_official(lambda z: kdkernels.label_smoothing_loss(z, labels, epsilon, "others"),
                           lambda z: tf_kd_label_smoothing(z, labels, epsilon), logits,
                           what="label smoothing (others)")


# ------------------------------------------------------------------------------------------------------ Tf-KD reg

@pytest.mark.parametrize("temperature, multiplier, correct_prob", [(20.0, 100.0, 0.99), (40.0, 1.0, 0.99),
                                                                   (2.0, 50.0, 0.9)])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_tf_kd_reg_is_tf_kd(shape, temperature, multiplier, correct_prob):
    logits, labels = randn(*shape, seed=5, scale=3.0, grad=True), class_labels(shape[0], shape[1], seed=6)
    assert_equals_official(
        lambda z: kdkernels.tf_kd_reg_loss(z, labels, temperature, correct_prob, multiplier),
        lambda z: tf_kd_reg(z, labels, temperature, multiplier, correct_prob), logits, what="tf_kd_reg")


def test_tf_kd_reg_virtual_teacher_is_near_uniform():
    """The documented quirk: softmax(q/T) of a probability vector, C = 100, T = 20, is 0.0105 on the label."""
    labels = torch.tensor([3])
    virtual = torch.full((1, 100), 0.01 / 99).scatter_(1, labels.unsqueeze(1), 0.99)
    target = F.softmax(virtual / 20, dim=1)
    assert abs(target[0, 3].item() - 0.0105) < 1e-4 and abs(target[0, 0].item() - 0.0100) < 1e-4
    uniform_student = torch.zeros(1, 100)
    assert kdkernels.tf_kd_reg_loss(uniform_student, labels, 20.0).item() < 1e-6


# --------------------------------------------------------------------------------------------------------- tf-NKD

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_tf_nkd_is_cls_kd_with_hard_labels(shape):
    logits, labels = randn(*shape, seed=7, scale=3.0, grad=True), class_labels(shape[0], shape[1], seed=8)
    assert_equals_official(lambda z: kdkernels.tf_nkd_loss(z, labels), lambda z: cls_kd_tf_nkd(z, labels), logits,
                           what="tf_nkd hard")


@pytest.mark.parametrize("lam", [0.7, 1.0], ids=["mixup", "one-hot"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_tf_nkd_is_cls_kd_with_soft_labels(shape, lam):
    """MixUp's soft labels ``lam·onehot(y) + (1 − lam)·onehot(y[perm])`` (top 2 summed); lam 1 leaves a zero second
    label, whose term the weight removes."""
    logits, labels = randn(*shape, seed=9, scale=3.0, grad=True), class_labels(shape[0], shape[1], seed=10)
    onehot = F.one_hot(labels, shape[1]).double()
    soft = lam * onehot + (1 - lam) * onehot[torch.roll(torch.arange(shape[0]), 1)]
    assert_equals_official(lambda z: kdkernels.tf_nkd_loss(z, soft), lambda z: cls_kd_tf_nkd(z, soft), logits,
                           what="tf_nkd soft")


# -------------------------------------------------------------------------------------------- Zipf's label smoothing

def test_min_rank_ties_share_the_smallest_rank():
    votes = torch.tensor([[4.0, 3, 3, 2, 1, 0, 0], [0, 0, 0, 5, 5, 1, 0]])
    assert torch.equal(min_rank(votes), torch.tensor([[1, 2, 2, 4, 5, 6, 6], [4, 4, 4, 1, 1, 3, 4]]))
    scores = torch.randint(0, 4, (6, 12), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(min_rank(scores), scipy_min_rank(scores))


def test_dense_votes_count_each_locations_argmax():
    dense = randn(5, 9, 7, seed=11)
    expected = F.one_hot(dense.argmax(dim=2), 7).sum(dim=1).float()
    assert torch.equal(dense_votes(dense), expected)


def zipf_inputs(batch, locations, classes, correct_rows=()):
    """Student logits (leaf), per-location logits and labels; the rows in ``correct_rows`` predict their label."""
    logits = randn(batch, classes, seed=12, scale=2.0)
    labels = class_labels(batch, classes, seed=13)
    rows = torch.tensor(list(correct_rows), dtype=torch.long)
    logits[rows, labels[rows]] += 20.0
    return logits.requires_grad_(), randn(batch, locations, classes, seed=14), labels


@pytest.mark.parametrize("power", [1.0, 1.5])
@pytest.mark.parametrize("batch, locations, classes", [(6, 3, 7), (8, 64, 10), (4, 16, 100)],
                         ids=["few-locations-many-ties", "64-locations", "100-classes"])
def test_zipf_ls_is_zipfls(batch, locations, classes, power):
    logits, dense, labels = zipf_inputs(batch, locations, classes)
    assert_equals_official(lambda z: kdkernels.zipf_ls_loss(z, dense, labels, power),
                           lambda z: zipfls_loss(z, dense, labels, power=power), logits, what="zipf_ls")


@pytest.mark.parametrize("correct_rows", [(0, 3, 4), ()], ids=["some-correct", "none-correct"])
def test_zipf_ls_mask_averages_over_the_correct_rows(correct_rows):
    logits, dense, labels = zipf_inputs(6, 9, 7, correct_rows)
    value = assert_equals_official(lambda z: kdkernels.zipf_ls_loss(z, dense, labels, mask=True),
                                   lambda z: zipfls_loss(z, dense, labels, do_mask=True), logits, what="zipf_ls mask")
    rows = kdkernels.zipf_ls_loss(logits, dense, labels, mask=True, reduction="none")
    assert torch.equal(rows != 0, torch.isin(torch.arange(6), torch.tensor(correct_rows, dtype=torch.long)))
    assert value.item() == 0.0 if not correct_rows else value.item() > 0.0


def test_zipf_ls_takes_no_gradient_through_the_dense_logits():
    logits, dense, labels = zipf_inputs(6, 9, 7)
    dense.requires_grad_()
    kdkernels.zipf_ls_loss(logits, dense, labels).backward()
    assert dense.grad is None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------- argument errors

LOGITS, LABELS = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.label_smoothing_loss(LOGITS, LABELS, epsilon=1.0), ValueError,
     r"^label_smoothing_loss: epsilon must be in \[0, 1\), got 1.0$"),
    (lambda: kdkernels.label_smoothing_loss(LOGITS, LABELS, convention="zipf"), ValueError,
     r"^label_smoothing_loss: convention must be one of 'uniform', 'others', got 'zipf'$"),
    (lambda: kdkernels.label_smoothing_loss(LOGITS, LABELS.float()), TypeError,
     r"^label_smoothing_loss: labels must be an integer tensor, got a torch.float32 tensor of shape \(4,\)$"),
    (lambda: kdkernels.label_smoothing_loss(torch.randn(4, 1), torch.zeros(4, dtype=torch.long),
                                            convention="others"), ValueError,
     r"^label_smoothing_loss: logits must have C >= 2 classes with convention='others'.*, got C = 1$"),
    (lambda: kdkernels.label_smoothing_loss(torch.randn(2, 4, 10), LABELS), ValueError,
     r"^label_smoothing_loss: logits must have shape \[batch, classes\], got shape \(2, 4, 10\)$"),
    (lambda: kdkernels.tf_kd_reg_loss(LOGITS, LABELS, correct_prob=1.5), ValueError,
     r"^tf_kd_reg_loss: correct_prob must be in \[0, 1\], got 1.5$"),
    (lambda: kdkernels.tf_kd_reg_loss(LOGITS, LABELS, temperature=0.0), ValueError,
     r"^tf_kd_reg_loss: temperature must be positive and finite, got 0.0$"),
    (lambda: kdkernels.tf_kd_reg_loss(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), ValueError,
     r"^tf_kd_reg_loss: student_logits must have at least 2 classes, got 1$"),
    (lambda: kdkernels.tf_nkd_loss(torch.randn(2, 4, 10), LABELS), ValueError,
     r"^tf_nkd_loss: student_logits must have shape \[batch, classes\], got shape \(2, 4, 10\)$"),
    (lambda: kdkernels.tf_nkd_loss(LOGITS, torch.tensor([0, 1, 2, 10])), ValueError,
     r"^tf_nkd_loss: labels must be class indices in \[0, 10\), got 10$"),
    (lambda: kdkernels.zipf_ls_loss(LOGITS, torch.randn(4, 3, 10), LABELS, mask=1), TypeError,
     r"^zipf_ls_loss: mask must be a bool, got 1$"),
    (lambda: kdkernels.zipf_ls_loss(LOGITS, torch.randn(4, 9, 7), LABELS), ValueError,
     r"^zipf_ls_loss: dense_logits must have shape \[batch, locations, classes\] = \[4, L, 10\], "
     r"got shape \(4, 9, 7\)$"),
    (lambda: kdkernels.zipf_ls_loss(torch.randn(4, 1), torch.randn(4, 3, 1), torch.zeros(4, dtype=torch.long)),
     ValueError, r"^zipf_ls_loss: logits must have at least 2 classes, got 1$"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
