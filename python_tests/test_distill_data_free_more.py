"""More data-free distillation (issue 19): dfad (Fang et al. 2019) and its loss against the official code written
out here (VainF/Data-Free-Adversarial-Distillation DFAD_mnist.py), float64 value and gradients; the method's terms on
one generated batch, its step plan (5 student steps, then one generator step), a student that never reads a
training sample, exact resume, configuration errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup
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
    request = stage.source.request(seed=0, epoch=1, step=0)
    with torch.no_grad():
        example = stage.source.generate(distiller, request)
    distiller.build(example).activate()
    distiller.train()
    batch = stage.source.generate(distiller, request)
    output = distiller(batch, StepContext(batch=batch))
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
