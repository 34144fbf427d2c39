"""Data-free distillation (dafl, Chen et al. ICCV 2019): the terms equal the official DAFL-train.py formulas written
out here, the generator and the student each step on their own loss while the teacher stays fixed, the student is
evaluated on the real test split, resume is exact, configuration errors (the mechanism: test_trainer_sources.py)."""
import pytest
import torch
import torch.nn.functional as F

from distill_testing import digits_setup, generated_step
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.methods.data_free import DAFLGenerator
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split


def setup(seed=0):
    return digits_setup(student="student-mlp", teacher="student-cnn", seed=seed)


def test_registered_as_data_free_with_official_presets():
    method = get_method("dafl")
    assert method.category == "data-free" and "ICCV 2019" in method.paper and method.approximation is None
    defaults = method.hyperparameters()
    assert (defaults["one_hot_weight"], defaults["information_entropy_weight"], defaults["activation_weight"],
            defaults["latent_dim"]) == (1.0, 5.0, 0.1, 100)
    cifar = method.hyperparameters("cifar100")
    assert (cifar["one_hot_weight"], cifar["information_entropy_weight"], cifar["activation_weight"],
            cifar["latent_dim"], cifar["batch_size"]) == (0.5, 20.0, 0.1, 1000, 1024)


def test_generator_makes_images_of_the_asked_shape():
    torch.manual_seed(0)
    assert DAFLGenerator(16, 3, 32)(torch.randn(2, 16)).shape == (2, 3, 32, 32)
    assert DAFLGenerator(100, 1, 8)(torch.randn(4, 100)).shape == (4, 1, 8, 8)


def test_terms_are_the_official_formulas():
    """oh·CE(z_t, argmax z_t) + ie·Σ p̄ log10 p̄ − a·mean|f_t| for G; KL(p_t ‖ p_s) summed / B for the student."""
    recipe = build_recipe("dafl", setup(), batch_size=8, steps_per_epoch=1)
    stage = recipe.stages[0]
    distiller = stage.distiller
    batch, output = generated_step(recipe)
    t, s, f = output.values["teacher"], output.values["student"], output.values["teacher:fc/input"]
    mean = F.softmax(t, 1).mean(0)
    expected = {"one_hot": F.cross_entropy(t, t.argmax(1)),
                "information_entropy": 5.0 * (mean * torch.log10(mean)).sum(),
                "activation": 0.1 * -f.abs().mean(),
                "kd": F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="sum") / s.shape[0]}
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # G's terms reach the generator through the frozen teacher; only they are G's (the official student loss reads
    # detached images: here the student's optimiser differentiates with respect to the student alone).
    generator = list(distiller.models["generator"].parameters())
    assert torch.autograd.grad(output.term_losses["one_hot"], generator[:1], retain_graph=True)[0].abs().sum() > 0
    assert stage.optimisers["generator"].terms == ("one_hot", "information_entropy", "activation")
    assert stage.optimisers["student"].terms == ("kd",) and stage.step_plan == "simultaneous"


CONFIG = dict(epochs=2, batch_size=16, lr=0.01, warmup_epochs=0, **QUIET)


def make(seed=0):
    return build_recipe("dafl", setup(seed), steps_per_epoch=2)


def test_trains_generator_and_student_and_evaluates_on_the_test_split(tmp_path):
    recipe = make()
    models = recipe.stages[0].distiller.models
    before = {name: parameters_of(models[name]) for name in ("student", "teacher", "generator")}
    result = Trainer(TrainConfig(**CONFIG)).fit(recipe, small_split().train, small_split().test)
    for name in ("student", "generator"):
        assert any(not torch.equal(value, parameters_of(models[name])[key]) for key, value in before[name].items())
    assert all(torch.equal(value, parameters_of(models["teacher"])[key]) for key, value in before["teacher"].items())
    assert "test_acc_student" in result.history[-1] and result.steps == 4
    assert all(torch.isfinite(torch.tensor(result.history[-1][name])) for name in ("kd", "one_hot", "activation"))


def test_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make, CONFIG, tmp_path, pieces=(1, 1))


def test_configuration_errors_name_the_problem():
    with pytest.raises(ValueError, match="image_shape must be square"):
        build_recipe("dafl", setup(), image_shape=(1, 8, 6))
    with pytest.raises(TypeError, match="image_shape"):
        build_recipe("dafl", setup(), image_shape=8)
    with pytest.raises(ValueError, match="batch_size"):
        build_recipe("dafl", setup(), batch_size=0)
    with pytest.raises(ValueError, match="distils from a teacher"):
        build_recipe("dafl", digits_setup(teacher=None))
