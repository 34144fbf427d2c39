"""More data-free distillation (issue 19): dfad (Fang et al. 2019), deepinversion (Yin et al. CVPR 2020) and zskd
(Nayak et al. ICML 2019), their losses against the official code written out here (VainF/Data-Free-Adversarial-
Distillation DFAD_mnist.py, NVlabs/DeepInversion deepinversion.py, vcl-iisc/ZSKD dirichmat.py and the impression
script, in numpy/torch), float64 value and gradients; the methods' terms on one generated or
synthesised batch, dfad's step plan (5 student steps, then one generator step), students that never read a training
sample, exact resume, configuration errors."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, generated_step
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.data import TensorDictDataset
from kdkernels.distill.methods.data_free import DFADGenerator
from kdkernels.distill.terms import StepContext
from kdkernels.distill.trainer import TrainConfig, Trainer
from losses_testing import assert_equals_official, randn
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split


def setup(seed=0):
    return digits_setup(student="student-mlp", teacher="student-cnn", seed=seed)


class UnreadableImages(TensorDictDataset):
    """A training split whose samples cannot be read: a data-free stage must never ask for one."""

    def __getitem__(self, index):
        raise AssertionError(f"a data-free stage read training sample {index}")


def unreadable_train():
    train = small_split().train
    return UnreadableImages(train.inputs, train.targets)


def student_and_generator_after(name, steps, **options):
    recipe = build_recipe(name, setup(1), steps_per_epoch=steps, **options)
    models = recipe.stages[0].distiller.models
    Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.01, warmup_epochs=0, schedule="constant", **QUIET)).fit(
        recipe, unreadable_train(), small_split().test)
    return {name: {key: value.detach().clone() for key, value in models[name].named_parameters()}
            for name in models}


def same(a, b):
    return all(torch.equal(value, b[key]) for key, value in a.items())


# ------------------------------------------------------------------------------------------------------------- dfad

def dfad_official_student(s_logit, t_logit):
    """DFAD_mnist.py ``train``: ``loss_S = F.l1_loss(s_logit, t_logit.detach())``."""
    return F.l1_loss(s_logit, t_logit.detach())


def dfad_official_generator(s_logit, t_logit):
    """DFAD_mnist.py ``train``: ``loss_G = - F.l1_loss( s_logit, t_logit )``."""
    return -F.l1_loss(s_logit, t_logit)


def test_dfad_loss_is_the_official_l1():
    s, t = randn(12, 10, seed=1, scale=2.0, grad=True), randn(12, 10, seed=2, scale=3.0, grad=True)
    assert_equals_official(kdkernels.dfad_loss, lambda a, b: F.l1_loss(a, b), s, t, what="dfad")
    assert_equals_official(lambda a, b: -kdkernels.dfad_loss(a, b), dfad_official_generator, s, t, what="G")
    by_hand = sum(abs(float(a) - float(b)) for a, b in zip(s.detach().flatten(), t.detach().flatten()))
    torch.testing.assert_close(kdkernels.dfad_loss(s, t, reduction="sum"), torch.tensor(by_hand, dtype=torch.float64))
    torch.testing.assert_close(kdkernels.dfad_loss(s, t, reduction="none"), (s - t).abs().sum(1))
    assert torch.equal(kdkernels.nn.DFADLoss()(s, t), kdkernels.dfad_loss(s, t))
    half = kdkernels.dfad_loss(s.detach().half(), t.detach().bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_dfad_loss_errors_name_the_argument():
    s = torch.randn(4, 10)
    with pytest.raises(TypeError, match="^dfad_loss: student_logits"):
        kdkernels.dfad_loss(s.long(), s)
    with pytest.raises(ValueError, match="^dfad_loss: teacher_logits"):
        kdkernels.dfad_loss(s, torch.randn(4, 9))
    with pytest.raises(ValueError, match="^dfad_loss: reduction"):
        kdkernels.dfad_loss(s, s, reduction="avg")


def test_dfad_registered_with_official_defaults_and_presets():
    method = get_method("dfad")
    assert method.category == "data-free" and "Adversarial" in method.paper and method.approximation is None
    defaults = method.hyperparameters()
    assert (defaults["student_steps"], defaults["latent_dim"], defaults["generator_width"]) == (5, 100, 64)
    cifar = method.hyperparameters("cifar10")
    assert (cifar["latent_dim"], cifar["batch_size"], cifar["generator_lr_scale"]) == (256, 256, 0.01)
    assert DFADGenerator(16, 3, 32)(torch.randn(2, 16, 1, 1)).shape == (2, 3, 32, 32)


def test_dfad_terms_are_the_official_formulas_on_a_generated_batch():
    recipe = build_recipe("dfad", setup(), batch_size=8, steps_per_epoch=1)
    stage = recipe.stages[0]
    distiller = stage.distiller
    batch, output = generated_step(recipe)
    s, t = output.values["student"], output.values["teacher"]
    torch.testing.assert_close(output.terms["dfad"], dfad_official_student(s, t).detach())
    torch.testing.assert_close(output.terms["dfad_generator"], dfad_official_generator(s, t).detach())
    # the generator's gradient is the official loss_G's (through the frozen teacher and the student) ...
    generator = list(distiller.models["generator"].parameters())
    ours = torch.autograd.grad(output.term_losses["dfad_generator"], generator, retain_graph=True)
    official = torch.autograd.grad(dfad_official_generator(s, t), generator, retain_graph=True)
    assert ours[0].abs().sum() > 0
    for a, b in zip(ours, official):
        torch.testing.assert_close(a, b)
    # ... and the student's is loss_S's on detached images (the same images re-run without a graph)
    student = list(distiller.models["student"].parameters())
    ours = torch.autograd.grad(output.term_losses["dfad"], student)
    images = batch["input"].detach()
    official = torch.autograd.grad(dfad_official_student(distiller.models["student"](images),
                                                         distiller.models["teacher"](images)), student)
    for a, b in zip(ours, official):
        torch.testing.assert_close(a, b)
    assert stage.step_plan == {"student": 5, "generator": 1}
    assert stage.optimisers["generator"].terms == ("dfad_generator",) and stage.optimisers["student"].terms == ("dfad",)


def test_dfad_steps_the_student_five_times_then_the_generator_never_reading_training_data():
    five, six = student_and_generator_after("dfad", 5), student_and_generator_after("dfad", 6)
    fresh = {name: parameters_of(model) for name, model in build_recipe("dfad", setup(1)).stages[0].distiller
             .models.items()}
    fresh = {name: {k: v for k, v in values.items() if k in five[name]} for name, values in fresh.items()}
    assert not same(five["student"], fresh["student"]) and same(five["generator"], fresh["generator"])
    assert same(six["student"], five["student"]) and not same(six["generator"], five["generator"])
    assert same(six["teacher"], fresh["teacher"])


CONFIG = dict(epochs=2, batch_size=16, lr=0.01, warmup_epochs=0, **QUIET)


def test_dfad_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(lambda seed=0: build_recipe("dfad", setup(seed), steps_per_epoch=3), CONFIG, tmp_path,
                           pieces=(1, 1))


def test_dfad_configuration_errors_name_the_hyperparameter():
    with pytest.raises(ValueError, match="student_steps"):
        build_recipe("dfad", setup(), student_steps=0)
    with pytest.raises(TypeError, match="student_steps"):
        build_recipe("dfad", setup(), student_steps=2.5)
    with pytest.raises(ValueError, match="image_shape must be square"):
        build_recipe("dfad", setup(), image_shape=(1, 8, 6))
    with pytest.raises(TypeError, match="image_shape"):
        build_recipe("dfad", setup(), image_shape=8)
    with pytest.raises(ValueError, match="generator_lr_scale"):
        build_recipe("dfad", setup(), generator_lr_scale=0.0)
    with pytest.raises(ValueError, match="distils from a teacher"):
        build_recipe("dfad", digits_setup(teacher=None))


# ---------------------------------------------------------------------------------------------------- deepinversion

class OfficialFeatureHook:
    """NVlabs/DeepInversion ``deepinversion.py`` ``DeepInversionFeatureHook.hook_fn``."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def official_r_feature(hooks, first_bn_multiplier):
    """``get_images``: ``rescale = [first_bn_multiplier] + [1.]·(L − 1)``, ``Σ r_feature·rescale``."""
    rescale = [first_bn_multiplier] + [1. for _ in range(len(hooks) - 1)]
    return sum([mod.r_feature * rescale[idx] for (idx, mod) in enumerate(hooks)])


def official_priors(inputs_jit, tv_l1, tv_l2, l2):
    """``get_image_prior_losses`` and the l2 line of ``get_images`` (bs = the batch)."""
    diff1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
    diff2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
    diff3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
    diff4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
    loss_var_l2 = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    loss_var_l1 = loss_var_l1 * 255.0
    loss_l2 = torch.norm(inputs_jit.view(inputs_jit.shape[0], -1), dim=1).mean()
    return tv_l2 * loss_var_l2 + tv_l1 * loss_var_l1 + l2 * loss_l2


def official_adi(outputs_student, outputs, T=3.0):
    """``get_images``' Adaptive DeepInversion competition (Jensen–Shannon, clamped)."""
    kl_loss = nn.KLDivLoss(reduction='batchmean')
    P = nn.functional.softmax(outputs_student / T, dim=1)
    Q = nn.functional.softmax(outputs / T, dim=1)
    M = 0.5 * (P + Q)
    P = torch.clamp(P, 0.01, 0.99)
    Q = torch.clamp(Q, 0.01, 0.99)
    M = torch.clamp(M, 0.01, 0.99)
    loss_verifier_cig = 0.5 * kl_loss(torch.log(P), M) + 0.5 * kl_loss(torch.log(Q), M)
    return 1.0 - torch.clamp(loss_verifier_cig, 0.0, 1.0)


@pytest.mark.parametrize("first_bn_multiplier", [10.0, 1.0])
def test_deepinversion_feature_loss_is_the_official_hook(first_bn_multiplier):
    torch.manual_seed(0)
    layers = [nn.BatchNorm2d(3).double().eval(), nn.BatchNorm2d(5).double().eval()]   # the teacher: eval mode
    for layer in layers:
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    maps = [randn(6, 3, 4, 4, seed=1, scale=2.0, grad=True), randn(6, 5, 2, 3, seed=2, offset=0.5, grad=True)]

    def official(a, b):
        hooks = [OfficialFeatureHook(layer) for layer in layers]
        layers[0](a), layers[1](b)
        for hook in hooks:
            hook.hook.remove()
        return official_r_feature(hooks, first_bn_multiplier)

    def ours(a, b):
        return kdkernels.deepinversion_feature_loss([a, b], [m.running_mean for m in layers],
                                                    [m.running_var for m in layers],
                                                    first_bn_multiplier=first_bn_multiplier)

    assert_equals_official(ours, official, *maps, what="r_feature")
    assert torch.equal(kdkernels.nn.DeepInversionFeatureLoss(first_bn_multiplier=first_bn_multiplier)(
        maps, [m.running_mean for m in layers], [m.running_var for m in layers]), ours(*maps))


@pytest.mark.parametrize("weights", [(0.0, 1e-4, 1e-5), (0.3, 2.5e-5, 0.0), (1.0, 0.5, 0.2)])
def test_deepinversion_prior_loss_is_the_official_priors(weights):
    tv_l1, tv_l2, l2 = weights
    images = randn(5, 2, 6, 7, seed=3, grad=True)
    assert_equals_official(lambda x: kdkernels.deepinversion_prior_loss(x, tv_l1=tv_l1, tv_l2=tv_l2, l2=l2),
                           lambda x: official_priors(x, tv_l1, tv_l2, l2), images, what="priors")


def test_adi_competition_loss_is_the_official_jensen_shannon():
    s, t = randn(8, 10, seed=4, scale=3.0, grad=True), randn(8, 10, seed=5, scale=3.0, grad=True)
    value = assert_equals_official(kdkernels.adi_competition_loss, official_adi, s, t, what="adi")
    assert 0.0 < float(value.detach()) < 1.0
    assert_equals_official(lambda a, b: kdkernels.adi_competition_loss(a, b, temperature=1.5),
                           lambda a, b: official_adi(a, b, 1.5), s, t, what="adi T")
    assert float(kdkernels.adi_competition_loss(t.detach(), t.detach())) == 1.0     # identical: JS 0


def test_deepinversion_losses_errors_name_the_argument():
    maps, stats = [torch.randn(4, 3, 2, 2)], [torch.zeros(3)]
    with pytest.raises(TypeError, match=r"^deepinversion_feature_loss: features must be a list"):
        kdkernels.deepinversion_feature_loss(maps[0], stats, stats)
    with pytest.raises(ValueError, match=r"^deepinversion_feature_loss: running_vars must hold one tensor"):
        kdkernels.deepinversion_feature_loss(maps, stats, stats * 2)
    with pytest.raises(ValueError, match=r"^deepinversion_feature_loss: running_means\[0\] must have shape"):
        kdkernels.deepinversion_feature_loss(maps, [torch.zeros(4)], stats)
    with pytest.raises(ValueError, match=r"^deepinversion_feature_loss: first_bn_multiplier"):
        kdkernels.deepinversion_feature_loss(maps, stats, stats, first_bn_multiplier=-1.0)
    with pytest.raises(ValueError, match=r"^deepinversion_prior_loss: images must have 4 dims"):
        kdkernels.deepinversion_prior_loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"^deepinversion_prior_loss: tv_l2"):
        kdkernels.deepinversion_prior_loss(maps[0], tv_l2=-1.0)
    with pytest.raises(ValueError, match=r"^adi_competition_loss: temperature"):
        kdkernels.adi_competition_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)
    half = kdkernels.deepinversion_prior_loss(maps[0].half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def di_setup(seed=0):
    return digits_setup(student="student-mlp", teacher="student-cnn", seed=seed)


def test_deepinversion_registered_with_the_official_defaults_and_flagged():
    method = get_method("deepinversion")
    assert method.category == "data-free" and "CVPR 2020" in method.paper and "Adam" in method.approximation
    defaults = method.hyperparameters()
    assert (defaults["r_feature"], defaults["first_bn_multiplier"], defaults["tv_l1"], defaults["tv_l2"],
            defaults["l2"], defaults["main_loss_multiplier"], defaults["adi_scale"], defaults["flip"]) \
        == (0.05, 10.0, 0.0, 1e-4, 1e-5, 1.0, 0.0, False)
    cifar = method.hyperparameters("cifar10")
    assert (cifar["r_feature"], cifar["first_bn_multiplier"], cifar["tv_l2"], cifar["jitter"],
            cifar["inversion_steps"]) == (100.0, 1.0, 2.5e-5, 2, 2000)
    assert method.hyperparameters("digits")["r_feature"] == 10.0


@pytest.mark.parametrize("adi_scale", [0.0, 0.2])
def test_deepinversion_inversion_terms_are_the_official_losses(adi_scale):
    recipe = build_recipe("deepinversion", di_setup(), num_images=12, inversion_batch_size=8, adi_scale=adi_scale,
                          tv_l1=0.5, jitter=1, flip=True)
    invert, distil = recipe.stages
    distiller = invert.distiller
    request = invert.source.request(seed=0, epoch=1, step=0)
    with torch.no_grad():
        example = distiller.apply_views(invert.source.generate(distiller, request), seed=0, epoch=1, step=0)
    distiller.build(example).activate()
    distiller.train()
    batch = distiller.apply_views(invert.source.generate(distiller, request), seed=0, epoch=1, step=0)
    output = distiller(batch, StepContext(batch=batch))
    teacher = distiller.models["teacher"]
    assert not teacher.training and batch["input"].requires_grad
    images = distiller.models["synthetic"].images
    assert torch.equal(batch["target"], torch.arange(12)[request["index"]] % 10)
    hooks = [OfficialFeatureHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    outputs = teacher(batch["input"])
    for hook in hooks:
        hook.hook.remove()
    expected = {"ce_teacher": F.cross_entropy(outputs, batch["target"]),
                "r_feature": 0.05 * official_r_feature(hooks, 10.0),
                "prior": official_priors(batch["input"], 0.5, 1e-4, 1e-5)}
    if adi_scale:
        expected["adi"] = adi_scale * official_adi(distiller.models["student"](batch["input"]), outputs)
    assert set(output.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name], value.detach(), msg=name)
    official = torch.autograd.grad(sum(expected.values()), images, retain_graph=True)[0]
    ours = torch.autograd.grad(output.loss, images)[0]
    torch.testing.assert_close(ours, official)
    assert ours[request["index"]].abs().sum() > 0
    assert distil.distiller.terms[0].kwargs == {"temperature": 4.0}


def test_deepinversion_distils_by_hinton_kd_on_the_synthetic_set():
    recipe = build_recipe("deepinversion", di_setup(), num_images=12, kd_temperature=3.0)
    distil = recipe.stages[1]
    distiller = distil.distiller
    distil.source.check("distil", distiller)
    source = distil.source.resolved(8, 1)
    request = source.request(seed=0, epoch=2, step=0)
    batch = source.generate(distiller, request)
    distiller.build(batch).activate()
    distiller.train()
    output = distiller(batch, StepContext(batch=batch))
    s, t = output.values["student"], output.values["teacher"]
    assert not batch["input"].requires_grad and batch["input"].shape == (8, 1, 8, 8)
    expected = F.kl_div(F.log_softmax(s / 3.0, 1), F.softmax(t / 3.0, 1), reduction="batchmean") * 9.0
    torch.testing.assert_close(output.terms["kd"], expected.detach())
    assert list(distiller.trainable) == ["student"]


def make_deepinversion(seed=0, **options):
    return build_recipe("deepinversion", di_setup(seed), num_images=24, inversion_batch_size=12,
                        inversion_steps=3, **options)


def test_deepinversion_synthesises_then_distils_never_reading_training_data():
    recipe = make_deepinversion(1)
    data = recipe.stages[0].distiller.models["synthetic"]
    images, labels = data.images.detach().clone(), data.labels.clone()
    teacher = parameters_of(recipe.stages[0].distiller.models["teacher"])
    student = parameters_of(recipe.stages[1].distiller.models["student"])
    result = Trainer(TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_epochs=0, **QUIET)).fit(
        recipe, unreadable_train(), small_split().test)
    after = data.images.detach().clone()
    assert not torch.equal(after, images) and torch.equal(data.labels, labels)
    assert same(teacher, parameters_of(recipe.stages[0].distiller.models["teacher"]))
    assert not same(student, parameters_of(recipe.stages[1].distiller.models["student"]))
    assert "test_acc_student" in result.history[-1] and result.steps == 3 + len(small_split().train) // 8


CONFIG_DI = dict(epochs=1, batch_size=8, lr=0.01, warmup_epochs=0, **QUIET)


def test_deepinversion_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_deepinversion, CONFIG_DI, tmp_path, pieces=(1, 1))


def test_deepinversion_configuration_errors_name_the_hyperparameter():
    with pytest.raises(ValueError, match="inversion_batch_size"):
        build_recipe("deepinversion", di_setup(), num_images=8, inversion_batch_size=9)
    with pytest.raises(ValueError, match="r_feature"):
        build_recipe("deepinversion", di_setup(), r_feature=-1.0)
    with pytest.raises(TypeError, match="flip"):
        build_recipe("deepinversion", di_setup(), flip="yes")
    with pytest.raises(ValueError, match="kd_temperature"):
        build_recipe("deepinversion", di_setup(), kd_temperature=0.0)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        build_recipe("deepinversion", digits_setup(student="student-mlp", teacher="student-mlp"))
    with pytest.raises(ValueError, match="distils from a teacher"):
        build_recipe("deepinversion", digits_setup(teacher=None))


# ------------------------------------------------------------------------------------------------------------- zskd

def official_similarity(weight_tf):
    """vcl-iisc/ZSKD ``dirichmat.py`` (sklearn ``normalize(axis=0)`` written out): the TF weight [D, C]."""
    fc_weight_norm = weight_tf / np.linalg.norm(weight_tf, axis=0, keepdims=True)
    im_sim_mat = np.matmul(np.transpose(fc_weight_norm), fc_weight_norm)
    return (im_sim_mat - np.min(im_sim_mat)) / (np.max(im_sim_mat) - np.min(im_sim_mat))


def official_impression_cost(net_logits, labels):
    """``noise_cost = reduce_mean(softmax_cross_entropy_with_logits_v2(logits=net_logits/20, labels))``."""
    return (-(labels * torch.log_softmax(net_logits / 20.0, dim=1)).sum(1)).mean()


def test_zskd_class_similarity_is_the_official_matrix():
    weight = randn(10, 16, seed=6)
    ours = kdkernels.zskd_class_similarity(weight)
    torch.testing.assert_close(ours, torch.from_numpy(official_similarity(weight.numpy().T)))
    assert float(ours.min()) == 0.0 and float(ours.max()) == 1.0 and torch.allclose(ours, ours.T)
    with pytest.raises(ValueError, match="^zskd_class_similarity: weight must hold at least 2"):
        kdkernels.zskd_class_similarity(torch.randn(1, 4))


def test_zskd_impression_loss_is_the_official_cost():
    logits = randn(6, 10, seed=7, scale=20.0, grad=True)
    targets = randn(6, 10, seed=8).softmax(1).requires_grad_(True)
    assert_equals_official(kdkernels.zskd_impression_loss, official_impression_cost, logits, targets, what="zskd")
    assert torch.equal(kdkernels.nn.ZSKDImpressionLoss()(logits, targets),
                       kdkernels.zskd_impression_loss(logits, targets))
    with pytest.raises(ValueError, match="^zskd_impression_loss: soft_targets must have the same shape"):
        kdkernels.zskd_impression_loss(logits, targets[:, :9])
    with pytest.raises(ValueError, match="^zskd_impression_loss: temperature"):
        kdkernels.zskd_impression_loss(logits, targets, temperature=-1.0)


def test_zskd_dirichlet_targets_follow_the_similarity_row_and_beta():
    from kdkernels.distill.methods.data_free import dirichlet_targets
    torch.manual_seed(0)
    similarity = kdkernels.zskd_class_similarity(torch.randn(10, 12))
    labels = torch.full((4000,), 3)
    for beta in (1.0, 0.1):
        targets = dirichlet_targets(similarity, labels, torch.full((4000,), beta))
        row = similarity[3]
        concentration = (row - row.min()) / (row.max() - row.min()) * beta + 1e-4
        torch.testing.assert_close(targets.sum(1), torch.ones(4000))
        torch.testing.assert_close(targets.mean(0), (concentration / concentration.sum()).float(), atol=0.03,
                                   rtol=0)
    # β = 0.1 is a sparser Dirichlet (the official code's per-row re-normalisation would cancel it)
    sharp = dirichlet_targets(similarity, labels, torch.full((4000,), 0.1)).max(1).values.mean()
    soft = dirichlet_targets(similarity, labels, torch.full((4000,), 1.0)).max(1).values.mean()
    assert sharp > soft + 0.05


def test_zskd_registered_and_flagged():
    method = get_method("zskd")
    assert method.category == "data-free" and "ICML 2019" in method.paper and "generateDirch" in method.approximation
    defaults = method.hyperparameters()
    assert (defaults["temperature"], defaults["betas"]) == (20.0, (1.0, 0.1))
    assert method.hyperparameters("cifar10")["num_impressions"] == 40000


def test_zskd_terms_are_the_official_losses():
    recipe = build_recipe("zskd", di_setup(), num_impressions=40, impression_batch_size=16, impression_weight=3.0)
    impressions, distil = recipe.stages
    distiller = impressions.distiller
    data = distiller.models["synthetic"]
    assert data.soft_targets.shape == (40, 10) and torch.equal(data.labels, torch.arange(40) % 10)
    assert float(data.images.detach().min()) >= 0.0 and float(data.images.detach().max()) < 1.0   # U[0, 1)
    request = impressions.source.request(seed=0, epoch=1, step=0)
    batch = impressions.source.generate(distiller, request)
    distiller.build(batch).activate()
    distiller.train()
    output = distiller(batch, StepContext(batch=batch))
    t = output.values["teacher"]
    expected = 3.0 * official_impression_cost(t, data.soft_targets[request["index"]])
    torch.testing.assert_close(output.terms["impression"], expected.detach())
    ours = torch.autograd.grad(output.loss, data.images, retain_graph=True)[0]
    torch.testing.assert_close(ours, torch.autograd.grad(expected, data.images)[0])
    # the KD stage: T²·softmax_cross_entropy(student/T, softmax(teacher/T)), T = 20 (train.py)
    distil.source.check("distil", distil.distiller)
    source = distil.source.resolved(8, 1)
    batch = source.generate(distil.distiller, source.request(seed=0, epoch=2, step=0))
    distil.distiller.build(batch).activate()
    distil.distiller.train()
    output = distil.distiller(batch, StepContext(batch=batch))
    s, t = output.values["student"], output.values["teacher"]
    expected = 400.0 * (-(F.softmax(t / 20.0, 1) * F.log_softmax(s / 20.0, 1)).sum(1)).mean()
    torch.testing.assert_close(output.terms["kd"], expected.detach())


def make_zskd(seed=0):
    return build_recipe("zskd", di_setup(seed), num_impressions=24, impression_batch_size=12, impression_steps=3)


def test_zskd_synthesises_then_distils_never_reading_training_data_and_resumes(tmp_path):
    recipe = make_zskd(1)
    data = recipe.stages[0].distiller.models["synthetic"]
    images, targets = data.images.detach().clone(), data.soft_targets.clone()
    student = parameters_of(recipe.stages[1].distiller.models["student"])
    result = Trainer(TrainConfig(**CONFIG_DI)).fit(recipe, unreadable_train(), small_split().test)
    assert not torch.equal(data.images.detach(), images) and torch.equal(data.soft_targets, targets)
    assert not same(student, parameters_of(recipe.stages[1].distiller.models["student"]))
    assert "test_acc_student" in result.history[-1]
    assert_resume_is_exact(make_zskd, CONFIG_DI, tmp_path, pieces=(1, 1))


def test_zskd_configuration_errors_name_the_hyperparameter():
    with pytest.raises(ValueError, match="betas"):
        build_recipe("zskd", di_setup(), betas=(1.0, 0.0))
    with pytest.raises(TypeError, match="betas"):
        build_recipe("zskd", di_setup(), betas=0.1)
    with pytest.raises(ValueError, match="impression_batch_size"):
        build_recipe("zskd", di_setup(), num_impressions=8, impression_batch_size=9)
    with pytest.raises(ValueError, match="classifier 'stage1'"):
        build_recipe("zskd", di_setup(), classifier="stage1")
    with pytest.raises(ValueError, match="temperature"):
        build_recipe("zskd", di_setup(), temperature=0.0)
    with pytest.raises(ValueError, match="impression_weight"):
        build_recipe("zskd", di_setup(), impression_weight=0.0)
