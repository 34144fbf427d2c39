"""Response-based strategies: training steps on digits, presets, schedules, MixUp handling and configuration errors,
and each term equal to its weight times the public loss on the method's own values (the losses against the official
formulas: test_losses_kd.py, test_losses_decoupled.py, test_losses_dist.py, test_losses_response.py,
test_losses_soft_label.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.terms import MixupBatch, StepContext
from trainer_testing import QUIET, assert_resume_is_exact


def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


def logits_of(values, batch):
    """(student, teacher or None, labels) of one step."""
    return values["student"], values.get("teacher"), batch["target"]


def ce(student, labels):
    return F.cross_entropy(student, labels)


def test_kd_trains_with_the_mdistiller_weights():
    run_steps(build_recipe("kd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("kd", digits_setup()))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["kd"], 0.9 * kdkernels.kd_loss(student, teacher, 4.0))
    close(output.terms["ce_student"], 0.1 * ce(student, labels))


# ---------------------------------------------------------------------------------------------------------- DKD

def dkd_of(recipe, student, teacher, labels):
    hp = recipe.hyperparameters
    return kdkernels.dkd_loss(student, teacher, labels, hp["temperature"], hp["alpha"], hp["beta"])


@pytest.mark.parametrize("preset", ["default", "imagenet-r34-r18"])
def test_dkd_trains_with_its_presets(preset):
    run_steps(build_recipe("dkd", digits_setup(), preset))
    recipe = build_recipe("dkd", digits_setup(), preset, warmup=1)
    _, batch, values, output = first_step(recipe)
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["dkd"], dkd_of(recipe, student, teacher, labels))
    close(output.terms["ce_student"], ce(student, labels))


@pytest.mark.parametrize("epoch, factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup_factor(epoch, factor):
    recipe = build_recipe("dkd", digits_setup())
    _, batch, values, output = first_step(recipe, epoch=epoch)
    close(output.terms["dkd"], factor * dkd_of(recipe, *logits_of(values, batch)))


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


# --------------------------------------------------------------------------------------------------------- ATKD

def z_score(logits):
    """The official ``normalize``: (z − mean) / (1e-7 + unbiased std), per sample."""
    return (logits - logits.mean(1, keepdim=True)) / (1e-7 + logits.std(1, keepdim=True))


def test_atkd_step_is_the_official_logit_standardized_kd():
    """The default: 0.1·CE + 9·T²·KL at T = 2 on the z-scored logits, written out here in float64."""
    run_steps(build_recipe("atkd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("atkd", digits_setup()))
    student, teacher, labels = (v.double() if v.is_floating_point() else v for v in logits_of(values, batch))
    log_p_s = F.log_softmax(z_score(student) / 2.0, 1)
    p_t = F.softmax(z_score(teacher) / 2.0, 1)
    official = 9.0 * 4.0 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    torch.testing.assert_close(output.terms["atkd"].double(), official.detach(), rtol=1e-5, atol=1e-7)
    close(output.terms["ce_student"], 0.1 * ce(*logits_of(values, batch)[::2]))


def test_atkd_dkd_preset_standardizes_dkd_with_the_scaled_weights():
    recipe = build_recipe("atkd", digits_setup(), "dkd", warmup=1)
    run_steps(recipe)
    _, batch, values, output = first_step(build_recipe("atkd", digits_setup(), "dkd", warmup=1))
    student, teacher, labels = logits_of(values, batch)
    expected = kdkernels.dkd_loss(z_score(student.double()), z_score(teacher.double()), labels, 2.0, 9.0, 72.0)
    torch.testing.assert_close(output.terms["atkd"].double(), expected.detach(), rtol=1e-5, atol=1e-7)
    close(output.terms["ce_student"], ce(student, labels))
    _, batch, values, output = first_step(build_recipe("atkd", digits_setup(), "dkd"), epoch=5)
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["atkd"], 5 / 20 * 9.0 * kdkernels.logit_standardized_kd_loss(
        student, teacher, labels, 2.0, "dkd"))


def test_atkd_presets():
    method = get_method("atkd")
    assert method.hyperparameters("default") == {"base": "kd", "temperature": 2.0, "kd_weight": 9.0,
                                                  "ce_weight": 0.1, "alpha": 1.0, "beta": 8.0, "warmup": 20}
    assert method.hyperparameters("dkd-imagenet-r34-r18")["beta"] == 0.5
    assert method.hyperparameters("cifar-vgg13-vgg8")["temperature"] == 3.0


def make_atkd(seed=0):
    return build_recipe("atkd", digits_setup(seed=seed), "dkd", warmup=2)


def test_atkd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_atkd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


@pytest.mark.parametrize("overrides, match", [
    ({"base": "dist"}, r"^atkd: base must be one of \('kd', 'dkd'\), got 'dist'$"),
    ({"base": "dkd", "warmup": 0}, "warmup must be a positive number"),
])
def test_atkd_bad_configuration(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_recipe("atkd", digits_setup(), **overrides)
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("atkd", digits_setup(teacher=None))


def test_atkd_bad_temperature_names_the_argument():
    with pytest.raises(ValueError, match="temperature must be positive"):
        first_step(build_recipe("atkd", digits_setup(), temperature=0.0))


# -------------------------------------------------------------------------------------------------------- FN-KD

def test_fn_kd_step_is_the_paper_formula_on_the_student_embedding():
    """CE + KL at T_i = ‖f_i‖₂ (τ 1), f the student's classifier input, written out here in float64."""
    run_steps(build_recipe("fn-kd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("fn-kd", digits_setup()))
    student, teacher, labels = logits_of(values, batch)
    temperatures = values["student:fc/input"].double().norm(dim=1, keepdim=True)
    p_t = F.softmax(teacher.double() / temperatures, 1)
    log_p_s = F.log_softmax(student.double() / temperatures, 1)
    official = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    torch.testing.assert_close(output.terms["fn-kd"].double(), official.detach(), rtol=1e-5, atol=1e-8)
    close(output.terms["ce_student"], ce(student, labels))
    assert set(output.terms) == {"ce_student", "fn-kd"}


def test_fn_kd_takes_tau_weights_and_layer():
    _, batch, values, output = first_step(build_recipe("fn-kd", digits_setup(), tau=3.0, kd_weight=2.0,
                                                       ce_weight=0.5, student_layer="stage3"))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["fn-kd"], 2.0 * kdkernels.feature_normalized_kd_loss(student, teacher,
                                                                           values["student:stage3"], 3.0))
    close(output.terms["ce_student"], 0.5 * ce(student, labels))


def make_fn_kd(seed=0):
    return build_recipe("fn-kd", digits_setup(seed=seed))


def test_fn_kd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_fn_kd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_fn_kd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("fn-kd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match="tau must be positive"):
        first_step(build_recipe("fn-kd", digits_setup(), tau=0.0))


# --------------------------------------------------------------------------------------------------------- DeiT

def deit_step_official(values, labels, distillation_type, alpha, tau):
    """facebookresearch/deit ``DistillationLoss.forward`` on the step's values, float64: the student's two heads (the
    class token's ``head``, the distillation token's ``head_dist``: what the official training-mode forward returns
    as a tuple), the teacher's logits."""
    outputs, outputs_kd = values["student:head"].double(), values["student:head_dist"].double()
    teacher_outputs = values["teacher"].double()
    base_loss = F.cross_entropy(outputs, labels)
    if distillation_type == "soft":
        distillation_loss = F.kl_div(F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, 1),
                                     reduction="sum", log_target=True) * (tau * tau) / outputs_kd.numel()
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


def deit_setup(seed=0):
    return digits_setup(student="student-vit-distilled", seed=seed)


@pytest.mark.parametrize("preset, distillation_type", [("default", "hard"), ("hard", "hard"), ("soft", "soft")])
def test_deit_step_is_the_official_distillation_loss_on_the_two_heads(preset, distillation_type):
    run_steps(build_recipe("deit", deit_setup(), preset))
    distiller, batch, values, output = first_step(build_recipe("deit", deit_setup(), preset))
    official = deit_step_official(values, batch["target"], distillation_type, 0.5, 1.0)
    torch.testing.assert_close(output.terms["deit"].double(), official.detach(), rtol=1e-5, atol=1e-7)
    assert set(output.terms) == {"deit"}
    # the student's output is DeiT's inference output, the mean of the heads
    torch.testing.assert_close(values["student"], (values["student:head"] + values["student:head_dist"]) / 2)
    student = distiller.models["student"]
    gradients = torch.autograd.grad(output.loss, [student.head.weight, student.head_dist.weight])
    assert all(bool(g.abs().sum() > 0) for g in gradients)


def test_deit_takes_alpha_and_temperature():
    _, batch, values, output = first_step(build_recipe("deit", deit_setup(), "soft", alpha=0.2, temperature=3.0))
    official = deit_step_official(values, batch["target"], "soft", 0.2, 3.0)
    torch.testing.assert_close(output.terms["deit"].double(), official.detach(), rtol=1e-5, atol=1e-7)
    _, batch, values, output = first_step(build_recipe("deit", deit_setup(), distillation_type="none"))
    close(output.terms["deit"], F.cross_entropy(values["student:head"], batch["target"]))


def test_deit_is_defined_for_the_distilled_vit_student():
    method = get_method("deit")
    assert method.default_student == "student-vit-distilled" and method.approximation is None
    assert method.hyperparameters() == {"distillation_type": "hard", "alpha": 0.5, "temperature": 1.0}
    assert method.hyperparameters("soft")["distillation_type"] == "soft"


def make_deit(seed=0):
    return build_recipe("deit", deit_setup(seed=seed), "soft")


def test_deit_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_deit, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


@pytest.mark.parametrize("setup, options, error, match", [
    (lambda: digits_setup(), {}, ValueError, r"method 'deit' trains a ViT with a distillation token .* got a "
                                             r"DigitsCNN: pass --student student-vit-distilled"),
    (lambda: digits_setup(student="student-vit"), {}, ValueError, r"got a VisionTransformer: pass --student"),
    (lambda: digits_setup(student="student-vit-distilled", teacher=None), {}, ValueError, "pass a trained teacher"),
    (deit_setup, {"distillation_type": "kl"}, ValueError, r"^deit: distillation_type must be one of 'none', 'soft'"),
    (deit_setup, {"alpha": 1.5}, ValueError, r"^deit: alpha must be in \[0, 1\], got 1.5"),
    (deit_setup, {"temperature": 0.0}, ValueError, r"^deit: temperature must be positive"),
    (deit_setup, {"alpha": "half"}, TypeError, r"^deit: alpha must be a real number"),
])
def test_deit_bad_configuration_names_the_argument(setup, options, error, match):
    with pytest.raises(error, match=match):
        build_recipe("deit", setup(), **options)


# --------------------------------------------------------------------------------------------------------- SCKD

def sckd_gradient_cosine(student_model, batch, teacher_logits, temperature=4.0):
    """The paper's similarity, written out in float64 on a copy of the student: the cosine of the flattened gradients
    of KD (T²·KL(p_t ‖ p_s), batchmean) and of CE with respect to every parameter of the student."""
    model = copy.deepcopy(student_model).double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(batch["input"].double())
    p_t = F.softmax(teacher_logits.double() / temperature, dim=1)
    kd = temperature ** 2 * (p_t * (p_t.log() - F.log_softmax(logits / temperature, dim=1))).sum(1).mean()
    ce_loss = F.cross_entropy(logits, batch["target"])
    g_kd = torch.cat([g.flatten() for g in torch.autograd.grad(kd, params, retain_graph=True)])
    g_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce_loss, params)])
    return (g_kd @ g_ce) / (g_kd.norm() * g_ce.norm())


@pytest.mark.parametrize("threshold", [0.0, -1.0, 1.0], ids=["paper-phi-0", "always-on", "always-off"])
def test_sckd_keeps_kd_only_when_its_gradient_agrees_with_ce(threshold):
    recipe = build_recipe("sckd", digits_setup(), threshold=threshold)
    distiller, batch, values, output = first_step(recipe)
    student, teacher, labels = logits_of(values, batch)
    gate = distiller.terms[1]
    cosine = sckd_gradient_cosine(distiller.models["student"], batch, teacher)
    torch.testing.assert_close(gate.last_cosine, cosine, rtol=1e-4, atol=1e-6)
    assert -1.0 < float(cosine) < 1.0
    kept = float(cosine) >= threshold
    if threshold != 0.0:
        assert kept == (threshold == -1.0)
    close(output.terms["kd"], (0.9 if kept else 0.0) * kdkernels.kd_loss(student, teacher, 4.0))
    close(output.terms["ce_student"], 0.1 * ce(student, labels))
    params = [p for p in distiller.models["student"].parameters()]
    grads = torch.autograd.grad(output.term_losses["kd"], params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads) == kept


def test_sckd_trains_and_takes_the_imagenet_preset():
    run_steps(build_recipe("sckd", digits_setup()))
    distiller, batch, values, output = first_step(build_recipe("sckd", digits_setup(), "imagenet", threshold=-1.0))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["kd"], 0.5 * kdkernels.kd_loss(student, teacher, 1.0))
    close(output.terms["ce_student"], 0.5 * ce(student, labels))
    assert get_method("sckd").approximation.startswith("no official code found")


def make_sckd(seed=0):
    return build_recipe("sckd", digits_setup(seed=seed))


def test_sckd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_sckd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_sckd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("sckd", digits_setup(teacher=None))
    for threshold in (1.5, -2.0, "0"):
        with pytest.raises(ValueError, match=r"sckd: threshold must be a cosine in \[-1, 1\]"):
            build_recipe("sckd", digits_setup(), threshold=threshold)
    with pytest.raises(ValueError, match="kd_loss: temperature must be positive"):
        first_step(build_recipe("sckd", digits_setup(), temperature=-1.0))


# ------------------------------------------------------------------------------------------------ NKD and tf-NKD

def test_nkd_trains_with_the_cls_kd_settings():
    run_steps(build_recipe("nkd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("nkd", digits_setup(), temperature=2.0))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["nkd"], kdkernels.nkd_loss(student, teacher, labels, 2.0, 1.5))
    close(output.terms["ce_student"], ce(student, labels))


def test_tf_nkd_trains_without_a_teacher():
    recipe = build_recipe("tf-nkd", digits_setup(teacher=None))
    assert list(recipe.stages[0].distiller.models) == ["student"]
    run_steps(recipe)
    _, batch, values, output = first_step(build_recipe("tf-nkd", digits_setup(teacher=None)))
    student, _, labels = logits_of(values, batch)
    close(output.terms["tf_nkd"], kdkernels.tf_nkd_loss(student, labels))
    close(output.terms["ce_student"], ce(student, labels))


@pytest.mark.parametrize("method", ["tf-nkd", "nkd"])
def test_soft_label_terms_take_mixups_soft_labels(method):
    """cls_KD: NKD and tf-NKD see ``lam·onehot(y) + (1 − lam)·onehot(y[perm])`` (the top one or two of them)."""
    setup = digits_setup(teacher=None) if method == "tf-nkd" else digits_setup()
    distiller, batch, values, _ = first_step(build_recipe(method, setup))
    student, teacher, labels = logits_of(values, batch)
    permutation = torch.roll(torch.arange(len(labels)), 1)
    output = distiller.compute_terms(values, StepContext(batch=batch, mixup=MixupBatch(0.7, permutation)))
    onehot = F.one_hot(labels, 10).float()
    soft = 0.7 * onehot + 0.3 * onehot[permutation]
    if method == "tf-nkd":
        close(output.terms["tf_nkd"], kdkernels.tf_nkd_loss(student, soft))
    else:
        close(output.terms["nkd"], kdkernels.nkd_loss(student, teacher, soft))


@pytest.mark.parametrize("method", ["label-smoothing", "dkd"])
def test_hard_label_terms_use_the_mixup_criterion(method):
    recipe = build_recipe(method, digits_setup(), warmup=1) if method == "dkd" else \
        build_recipe(method, digits_setup(teacher=None))
    distiller, batch, values, _ = first_step(recipe)
    student, teacher, labels = logits_of(values, batch)
    permutation = torch.roll(torch.arange(len(labels)), 3)
    output = distiller.compute_terms(values, StepContext(batch=batch, mixup=MixupBatch(0.6, permutation)))
    if method == "dkd":
        term, loss = "dkd", lambda y: dkd_of(recipe, student, teacher, y)
    else:
        term, loss = "label_smoothing", lambda y: kdkernels.label_smoothing_loss(student, y, 0.1)
    close(output.terms[term], 0.6 * loss(labels) + 0.4 * loss(labels[permutation]))


# --------------------------------------------------------------------------------------------------------- DIST

def test_dist_trains_with_its_cifar_preset():
    run_steps(build_recipe("dist", digits_setup()))
    _, batch, values, output = first_step(build_recipe("dist", digits_setup(), "cifar"))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["dist"], 2.0 * kdkernels.dist_loss(student, teacher, 4.0))
    close(output.terms["ce_student"], ce(student, labels))


# -------------------------------------------------------------------------------------------------------- Tf-KD

def test_tfkd_self_uses_the_element_mean_as_coded():
    run_steps(build_recipe("tfkd-self", digits_setup(teacher="student-cnn")))
    _, batch, values, output = first_step(build_recipe("tfkd-self", digits_setup(teacher="student-cnn")))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["kd"], 0.95 * 50 * kdkernels.kd_loss(student, teacher, 6.0, reduction="mean"))
    close(output.terms["ce_student"], 0.05 * ce(student, labels))


@pytest.mark.parametrize("preset", ["default", "mobilenetv2"])
def test_tfkd_reg_trains_without_a_teacher(preset):
    recipe = build_recipe("tfkd-reg", digits_setup(teacher=None), preset)
    run_steps(recipe)
    assert not get_method("tfkd-reg").needs_teacher
    recipe = build_recipe("tfkd-reg", digits_setup(teacher=None), preset)
    _, batch, values, output = first_step(recipe)
    student, _, labels = logits_of(values, batch)
    hp = recipe.hyperparameters
    expected = kdkernels.tf_kd_reg_loss(student, labels, hp["temperature"], multiplier=hp["multiplier"])
    close(output.terms["tf_kd_reg"], hp["alpha"] * expected)
    close(output.terms["ce_student"], (1 - hp["alpha"]) * ce(student, labels))


# ---------------------------------------------------------------------------------------------- label smoothing

@pytest.mark.parametrize("convention", ["uniform", "others"])
def test_label_smoothing_conventions(convention):
    preset = "others" if convention == "others" else "default"
    run_steps(build_recipe("label-smoothing", digits_setup(teacher=None), preset))
    _, batch, values, output = first_step(build_recipe("label-smoothing", digits_setup(teacher=None), preset))
    student, _, labels = logits_of(values, batch)
    close(output.terms["label_smoothing"], kdkernels.label_smoothing_loss(student, labels, 0.1, convention))


def test_label_smoothing_bad_configuration():
    with pytest.raises(ValueError, match="convention"):
        build_recipe("label-smoothing", digits_setup(teacher=None), convention="zipf")


# --------------------------------------------------------------------------------------- Zipf's label smoothing

def zipfls_dense_logits(featmap, fc, upsample):
    """megvii-research/zipfls ``train.py`` (``--dense``): the classifier at every location of the last feature map,
    upsampled ×2 first when ``--upsample`` names a mode."""
    if upsample:
        featmap = F.interpolate(featmap, scale_factor=2.0, mode=upsample)
    n, c, h, w = featmap.shape
    return fc(featmap.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1)


@pytest.mark.parametrize("preset, mask", [("default", False), ("imagenet", False), ("default", True)])
def test_zipf_ls_votes_with_the_students_own_classifier(preset, mask):
    run_steps(build_recipe("zipf-ls", digits_setup(teacher=None), preset, mask=mask))
    recipe = build_recipe("zipf-ls", digits_setup(teacher=None), preset, mask=mask)
    distiller, batch, values, output = first_step(recipe)
    student, _, labels = logits_of(values, batch)
    hp = recipe.hyperparameters
    with torch.no_grad():
        dense = zipfls_dense_logits(values["student:stage3"], distiller.model().fc, hp["upsample"])
    close(output.terms["zipf"], hp["loss_lambda"] * kdkernels.zipf_ls_loss(student, dense, labels, mask=mask))
    close(output.terms["ce_student"], ce(student, labels))
    assert not any(name.startswith("terms.") for name in distiller.state_dict()), "the classifier was duplicated"


def test_zipf_ls_bad_configuration():
    with pytest.raises(ValueError, match="feature map"):
        first_step(build_recipe("zipf-ls", digits_setup(student="student-mlp", teacher=None)))
    with pytest.raises(ValueError, match="channels but the classifier"):
        first_step(build_recipe("zipf-ls", digits_setup(teacher=None), feature_layer="stage2"))
    with pytest.raises(ValueError, match="upsample"):
        build_recipe("zipf-ls", digits_setup(teacher=None), upsample="nearest-ish")


# ------------------------------------------------------------------------------------------------- SSLD and WSL

def test_ssld_label_free_symmetric_kl():
    recipe = build_recipe("ssld", digits_setup())
    run_steps(recipe)
    distiller, batch, values, output = first_step(build_recipe("ssld", digits_setup()))
    student, teacher, _ = logits_of(values, batch)
    close(output.terms["ssld"], kdkernels.kd_loss(student, teacher, 1.0, divergence="symmetric"))
    assert list(output.terms) == ["ssld"]
    assert distiller.models["teacher"].training, "SSLD keeps the frozen teacher's batch norm in train mode"
    assert not any(p.requires_grad for p in distiller.models["teacher"].parameters())
    unlabeled = {"input": batch["input"]}
    assert torch.isfinite(distiller(unlabeled).loss)


def test_wsl_trains_with_the_paddleclas_weights():
    run_steps(build_recipe("wsl", digits_setup()))
    _, batch, values, output = first_step(build_recipe("wsl", digits_setup()))
    student, teacher, labels = logits_of(values, batch)
    close(output.terms["wsl"], 2.5 * kdkernels.wsl_loss(student, teacher, labels, 2.0))
    close(output.terms["ce_student"], ce(student, labels))
