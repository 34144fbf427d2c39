"""Response-based strategies: training steps on digits, and each loss term against the official code's formula
transcribed here in eager PyTorch (mdistiller, cls_KD, DIST_KD, Tf-KD, zipfls, PaddleClas)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.terms import MixupBatch, StepContext
from kdkernels.losses.soft_label import min_rank


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-6)


def logits_of(values, batch):
    """(student, teacher or None, labels) from one step's values, detached and in float64: the references run in
    double so that their own rounding (DIST's Pearson of near-uniform softmaxes is ill-conditioned) stays far
    below the float32 tolerance the library is held to."""
    teacher = values.get("teacher")
    return (values["student"].detach().double(), None if teacher is None else teacher.detach().double(),
            batch["target"])


def ce(student, labels):
    return F.cross_entropy(student, labels)


# ------------------------------------------------------------------------------------ official formulas (eager)

def mdistiller_kd(student, teacher, temperature):
    log_student = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_student, F.softmax(teacher / temperature, dim=1), reduction="none").sum(1).mean() \
        * temperature ** 2


def mdistiller_dkd(student, teacher, labels, alpha, beta, temperature):
    gt_mask = torch.zeros_like(student).scatter_(1, labels.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(student).scatter_(1, labels.unsqueeze(1), 0).bool()
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)

    def two_bins(p):
        return torch.cat([(p * gt_mask).sum(1, keepdim=True), (p * other_mask).sum(1, keepdim=True)], dim=1)

    batch = student.shape[0]
    tckd = F.kl_div(torch.log(two_bins(p_s)), two_bins(p_t), reduction="sum") * temperature ** 2 / batch
    p_t2 = F.softmax(teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_p_s2 = F.log_softmax(student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature ** 2 / batch
    return alpha * tckd + beta * nckd


def cls_kd_nkd(student, teacher, labels, temp, gamma):
    label = labels.view(-1, 1)
    n, c = student.shape
    s, t = F.log_softmax(student, dim=1), F.softmax(teacher, dim=1)
    s_t, t_t = torch.gather(s, 1, label), torch.gather(t, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(student).scatter_(1, label, 0).bool()
    s_non = F.log_softmax(student[mask].reshape(n, c - 1) / temp, dim=1)
    t_non = F.softmax(teacher[mask].reshape(n, c - 1) / temp, dim=1)
    loss_non = -gamma * temp ** 2 * (t_non * s_non).sum(1).mean()
    return loss_t + loss_non


def cls_kd_tf_nkd(student, gt_label):
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


def dist_kd(student, teacher, tau, beta=1.0, gamma=1.0):
    def cos(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    def pearson(a, b):
        return cos(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))

    y_s, y_t = F.softmax(student / tau, dim=1), F.softmax(teacher / tau, dim=1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.t(), y_t.t()).mean()
    return beta * tau ** 2 * inter + gamma * tau ** 2 * intra


def tf_kd_kldiv_mean(log_input, target):
    """``nn.KLDivLoss()`` with its default element mean (spelled out: sum / numel)."""
    return (target * (target.log() - log_input)).sum() / target.numel()


def tf_kd_reg(student, labels, temperature, multiplier, correct_prob=0.99):
    classes = student.shape[1]
    teacher_soft = torch.ones_like(student) * (1 - correct_prob) / (classes - 1)
    for i in range(student.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    return tf_kd_kldiv_mean(F.log_softmax(student, dim=1), F.softmax(teacher_soft / temperature, dim=1)) \
        * multiplier


def tf_kd_label_smoothing(student, labels, alpha=0.1):
    n, c = student.shape
    smoothed = torch.full((n, c), alpha / (c - 1), dtype=student.dtype).scatter_(1, labels.unsqueeze(1), 1 - alpha)
    return -torch.sum(F.log_softmax(student, dim=1) * smoothed) / n


def scipy_min_rank(scores):
    """rankdata(−scores, method='min') by counting, row by row."""
    return torch.tensor([[1 + sum(1 for other in row if other > value) for value in row] for row in scores.tolist()])


def zipfls_loss(student, featmap, fc, labels, upsample="bilinear", do_mask=False):
    if upsample:
        featmap = F.interpolate(featmap, scale_factor=2.0, mode=upsample)
    n, c, h, w = featmap.shape
    dense_argmax = fc(featmap.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1).argmax(dim=2)
    classes = student.shape[1]
    scores = torch.zeros([n, max(classes, h * w)])
    votes = scores.scatter_add(1, dense_argmax, torch.ones_like(scores))[:, :classes]
    rank = scipy_min_rank(votes).float()
    mask = torch.ones_like(student).scatter_(1, labels.unsqueeze(1), 0.0)
    dist = (1 / rank)[mask.bool()].reshape(n, classes - 1)
    pdf = dist / dist.sum(dim=1, keepdim=True)
    res = F.log_softmax(student[mask.bool()].view(n, classes - 1), dim=1)
    loss = F.kl_div(res, pdf, reduction="none").sum(dim=1)
    if do_mask:
        keep = student.argmax(1) == labels
        return (loss * keep).sum() / keep.sum() if keep.any() else loss.mean() * 0
    return loss.mean()


def paddle_dml(student, teacher, eps=1e-12):
    def kldiv(x, target):
        return target * torch.log((target + eps) / (x + eps)) * x.shape[-1]

    p_s, p_t = F.softmax(student, dim=-1), F.softmax(teacher, dim=-1)
    return ((kldiv(p_s, p_t) + kldiv(p_t, p_s)) / 2).mean()


def paddle_wsl(student, teacher, target, temperature=2.0):
    if target is None:
        target = teacher.argmax(dim=-1)
    onehot = F.one_hot(target.reshape(-1), num_classes=student.shape[1]).to(student.dtype)
    ce_s = -(onehot * F.log_softmax(student.detach(), dim=-1)).sum(1)
    ce_t = -(onehot * F.log_softmax(teacher.detach(), dim=-1)).sum(1)
    ratio = torch.maximum(ce_s / (ce_t + 1e-7), torch.zeros_like(ce_s))
    kd = -(F.softmax(teacher / temperature, dim=-1) * F.log_softmax(student / temperature, dim=-1)).sum(1)
    return temperature ** 2 * (kd * (1 - torch.exp(-ratio))).mean()


# ------------------------------------------------------------------------------------------------------ methods

def test_kd_matches_mdistiller():
    run_steps(build_recipe("kd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("kd", digits_setup()))
    student, teacher, labels = logits_of(values, batch)
    assert_close(output.terms["kd"], 0.9 * mdistiller_kd(student, teacher, 4.0))
    assert_close(output.terms["ce_student"], 0.1 * ce(student, labels))


@pytest.mark.parametrize("preset", ["default", "imagenet-r34-r18"])
def test_dkd_matches_mdistiller(preset):
    run_steps(build_recipe("dkd", digits_setup(), preset))
    recipe = build_recipe("dkd", digits_setup(), preset, warmup=1)
    _, batch, values, output = first_step(recipe)
    student, teacher, labels = logits_of(values, batch)
    hp = recipe.hyperparameters
    expected = mdistiller_dkd(student, teacher, labels, hp["alpha"], hp["beta"], hp["temperature"])
    assert_close(output.terms["dkd"], expected)
    assert_close(output.terms["ce_student"], ce(student, labels))


@pytest.mark.parametrize("epoch, factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup_factor(epoch, factor):
    _, batch, values, output = first_step(build_recipe("dkd", digits_setup()), epoch=epoch)
    student, teacher, labels = logits_of(values, batch)
    assert_close(output.terms["dkd"], factor * mdistiller_dkd(student, teacher, labels, 1.0, 8.0, 4.0))


def test_dkd_presets_and_bad_warmup():
    method = get_method("dkd")
    assert method.hyperparameters("cifar-res56-res20")["beta"] == 2.0
    assert method.hyperparameters("cifar-vgg13-vgg8")["beta"] == 6.0
    assert method.hyperparameters("imagenet-r50-mv1") == {"temperature": 1.0, "alpha": 1.0, "beta": 2.0, "warmup": 1,
                                                          "ce_weight": 1.0}
    with pytest.raises(ValueError, match="warmup"):
        build_recipe("dkd", digits_setup(), warmup=0)
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("dkd", digits_setup(teacher=None))


def test_nkd_matches_cls_kd():
    run_steps(build_recipe("nkd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("nkd", digits_setup(), temperature=2.0))
    student, teacher, labels = logits_of(values, batch)
    assert_close(output.terms["nkd"], cls_kd_nkd(student, teacher, labels, 2.0, 1.5))
    assert_close(output.terms["ce_student"], ce(student, labels))


def test_tf_nkd_matches_cls_kd_hard_labels():
    recipe = build_recipe("tf-nkd", digits_setup(teacher=None))
    assert list(recipe.stages[0].distiller.models) == ["student"]
    run_steps(recipe)
    _, batch, values, output = first_step(build_recipe("tf-nkd", digits_setup(teacher=None)))
    student, _, labels = logits_of(values, batch)
    assert_close(output.terms["tf_nkd"], cls_kd_tf_nkd(student, labels))
    assert_close(output.terms["ce_student"], ce(student, labels))


def test_tf_nkd_soft_labels_under_mixup():
    distiller, batch, values, _ = first_step(build_recipe("tf-nkd", digits_setup(teacher=None)))
    student, _, labels = logits_of(values, batch)
    permutation = torch.roll(torch.arange(len(labels)), 1)
    context = StepContext(batch=batch, mixup=MixupBatch(0.7, permutation))
    output = distiller.compute_terms(values, context)
    onehot = F.one_hot(labels, 10).double()
    soft = 0.7 * onehot + 0.3 * onehot[permutation]
    assert_close(output.terms["tf_nkd"], cls_kd_tf_nkd(student, soft))
    assert_close(kdkernels.tf_nkd_loss(student, soft), cls_kd_tf_nkd(student, soft))


@pytest.mark.parametrize("method", ["label-smoothing", "dkd"])
def test_hard_label_terms_use_the_mixup_criterion(method):
    distiller, batch, values, _ = first_step(build_recipe(method, digits_setup(), warmup=1)
                                             if method == "dkd" else build_recipe(method, digits_setup(teacher=None)))
    student, teacher, labels = logits_of(values, batch)
    permutation = torch.roll(torch.arange(len(labels)), 3)
    output = distiller.compute_terms(values, StepContext(batch=batch, mixup=MixupBatch(0.6, permutation)))
    if method == "dkd":
        term, reference = "dkd", lambda y: mdistiller_dkd(student, teacher, y, 1.0, 8.0, 4.0)
    else:
        term, reference = "label_smoothing", lambda y: F.cross_entropy(student, y, label_smoothing=0.1)
    assert_close(output.terms[term], 0.6 * reference(labels) + 0.4 * reference(labels[permutation]))


def test_dist_matches_dist_kd():
    run_steps(build_recipe("dist", digits_setup()))
    _, batch, values, output = first_step(build_recipe("dist", digits_setup(), "cifar"))
    student, teacher, labels = logits_of(values, batch)
    assert_close(output.terms["dist"], 2.0 * dist_kd(student, teacher, 4.0))
    assert_close(output.terms["ce_student"], ce(student, labels))


def test_tfkd_self_element_mean_as_coded():
    setup = digits_setup(teacher="student-cnn")
    run_steps(build_recipe("tfkd-self", setup))
    _, batch, values, output = first_step(build_recipe("tfkd-self", digits_setup(teacher="student-cnn")))
    student, teacher, labels = logits_of(values, batch)
    d_kl = tf_kd_kldiv_mean(F.log_softmax(student / 6, dim=1), F.softmax(teacher / 6, dim=1)) * 36 * 50
    assert_close(output.terms["kd"], 0.95 * d_kl)
    assert_close(output.terms["ce_student"], 0.05 * ce(student, labels))


@pytest.mark.parametrize("preset", ["default", "mobilenetv2"])
def test_tfkd_reg_matches_tf_kd(preset):
    recipe = build_recipe("tfkd-reg", digits_setup(teacher=None), preset)
    run_steps(recipe)
    assert not get_method("tfkd-reg").needs_teacher
    recipe = build_recipe("tfkd-reg", digits_setup(teacher=None), preset)
    _, batch, values, output = first_step(recipe)
    student, _, labels = logits_of(values, batch)
    hp = recipe.hyperparameters
    expected = hp["alpha"] * tf_kd_reg(student, labels, hp["temperature"], hp["multiplier"])
    assert_close(output.terms["tf_kd_reg"], expected)
    assert_close(output.terms["ce_student"], (1 - hp["alpha"]) * ce(student, labels))


def test_tfkd_reg_virtual_teacher_is_near_uniform():
    """The documented quirk: softmax(q/T) of a probability vector, C = 100, T = 20, is 0.0105 on the label."""
    labels = torch.tensor([3])
    virtual = torch.full((1, 100), 0.01 / 99).scatter_(1, labels.unsqueeze(1), 0.99)
    target = F.softmax(virtual / 20, dim=1)
    assert abs(target[0, 3].item() - 0.0105) < 1e-4 and abs(target[0, 0].item() - 0.0100) < 1e-4
    uniform_student = torch.zeros(1, 100)
    assert kdkernels.tf_kd_reg_loss(uniform_student, labels, 20.0).item() < 1e-6


@pytest.mark.parametrize("convention", ["uniform", "others"])
def test_label_smoothing_conventions(convention):
    preset = "others" if convention == "others" else "default"
    run_steps(build_recipe("label-smoothing", digits_setup(teacher=None), preset))
    _, batch, values, output = first_step(build_recipe("label-smoothing", digits_setup(teacher=None), preset))
    student, _, labels = logits_of(values, batch)
    if convention == "uniform":
        expected = F.cross_entropy(student, labels, label_smoothing=0.1)
    else:
        expected = tf_kd_label_smoothing(student, labels)
    assert_close(output.terms["label_smoothing"], expected)


def test_label_smoothing_bad_configuration():
    with pytest.raises(ValueError, match="convention"):
        build_recipe("label-smoothing", digits_setup(teacher=None), convention="zipf")
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="epsilon"):
        kdkernels.label_smoothing_loss(logits, labels, epsilon=1.0)
    with pytest.raises(TypeError, match="labels"):
        kdkernels.label_smoothing_loss(logits, labels.float())
    with pytest.raises(ValueError, match="C >= 2"):
        kdkernels.label_smoothing_loss(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), convention="others")


def test_min_rank_ties_share_the_smallest_rank():
    votes = torch.tensor([[4.0, 3, 3, 2, 1, 0, 0], [0, 0, 0, 5, 5, 1, 0]])
    assert torch.equal(min_rank(votes), torch.tensor([[1, 2, 2, 4, 5, 6, 6], [4, 4, 4, 1, 1, 3, 4]]))
    scores = torch.randint(0, 4, (6, 12)).float()
    assert torch.equal(min_rank(scores), scipy_min_rank(scores))


@pytest.mark.parametrize("preset, mask", [("default", False), ("imagenet", False), ("default", True)])
def test_zipf_ls_matches_zipfls(preset, mask):
    run_steps(build_recipe("zipf-ls", digits_setup(teacher=None), preset, mask=mask))
    recipe = build_recipe("zipf-ls", digits_setup(teacher=None), preset, mask=mask)
    distiller, batch, values, output = first_step(recipe)
    student, _, labels = logits_of(values, batch)
    model = distiller.model()
    hp = recipe.hyperparameters
    with torch.no_grad():
        expected = zipfls_loss(student, values["student:stage3"], model.fc, labels, hp["upsample"], mask)
    assert_close(output.terms["zipf"], hp["loss_lambda"] * expected)
    assert_close(output.terms["ce_student"], ce(student, labels))
    assert not any(name.startswith("terms.") for name in distiller.state_dict()), "the classifier was duplicated"


def test_zipf_ls_bad_configuration():
    with pytest.raises(ValueError, match="feature map"):
        first_step(build_recipe("zipf-ls", digits_setup(student="student-mlp", teacher=None)))
    with pytest.raises(ValueError, match="channels but the classifier"):
        first_step(build_recipe("zipf-ls", digits_setup(teacher=None), feature_layer="stage2"))
    with pytest.raises(ValueError, match="upsample"):
        build_recipe("zipf-ls", digits_setup(teacher=None), upsample="nearest-ish")
    with pytest.raises(ValueError, match="dense_logits"):
        kdkernels.zipf_ls_loss(torch.randn(4, 10), torch.randn(4, 9, 7), torch.zeros(4, dtype=torch.long))


def test_ssld_label_free_symmetric_kl():
    recipe = build_recipe("ssld", digits_setup())
    run_steps(recipe)
    distiller, batch, values, output = first_step(build_recipe("ssld", digits_setup()))
    student, teacher, _ = logits_of(values, batch)
    assert_close(output.terms["ssld"], paddle_dml(student, teacher))
    assert list(output.terms) == ["ssld"]
    assert distiller.models["teacher"].training, "SSLD keeps the frozen teacher's batch norm in train mode"
    assert not any(p.requires_grad for p in distiller.models["teacher"].parameters())
    unlabeled = {"input": batch["input"]}
    assert torch.isfinite(distiller(unlabeled).loss)


@pytest.mark.parametrize("use_labels", [True, False])
def test_wsl_matches_paddleclas(use_labels):
    run_steps(build_recipe("wsl", digits_setup()))
    _, batch, values, output = first_step(build_recipe("wsl", digits_setup()))
    student, teacher, labels = logits_of(values, batch)
    if use_labels:
        assert_close(output.terms["wsl"], 2.5 * paddle_wsl(student, teacher, labels))
        assert_close(output.terms["ce_student"], ce(student, labels))
    else:
        assert_close(kdkernels.wsl_loss(student, teacher, None, 2.0), paddle_wsl(student, teacher, None))


def test_wsl_shape_mismatch_names_the_arguments():
    with pytest.raises(ValueError, match="teacher_logits must have the same shape as student_logits"):
        kdkernels.wsl_loss(torch.randn(4, 10), torch.randn(4, 9), torch.zeros(4, dtype=torch.long))


def test_soft_label_losses_validate_their_arguments():
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="correct_prob"):
        kdkernels.tf_kd_reg_loss(logits, labels, correct_prob=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.tf_kd_reg_loss(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="mask"):
        kdkernels.zipf_ls_loss(logits, torch.randn(4, 3, 10), labels, mask=1)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        kdkernels.tf_nkd_loss(torch.randn(2, 4, 10), labels)
    with pytest.raises(ValueError, match="class indices"):
        kdkernels.tf_nkd_loss(logits, torch.tensor([0, 1, 2, 10]))
