"""Adversarial distillation (adv-feature, Wang et al. 2018): the terms equal the formulas written out here, the two
optimisers own the right parameters and each steps on its own loss, exact resume, configuration errors (the
mechanism: test_trainer_optimisers.py)."""
import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.optimisers import optimiser_parameters
from kdkernels.distill.terms import StepContext
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split


def light_setup(seed=0):
    """A fast pair with unequal widths (the MLP's 32-wide embedding, the small CNN's 16): a connector."""
    return digits_setup(student="student-mlp", teacher="student-cnn", seed=seed)


def built(student="student-cnn", **overrides):
    recipe = build_recipe("adv-feature", digits_setup(student=student), **overrides)
    stage = recipe.stages[0]
    batch = next(iter(batches_for(stage, batch_size=16)))
    stage.distiller.build(batch).activate()
    return recipe, stage, batch


def test_registered_as_an_adversarial_approximation():
    method = get_method("adv-feature")
    assert method.category == "adversarial" and "AAAI 2018" in method.paper
    assert "no official code" in method.approximation


def unit(features):
    """Rows scaled to unit L2 norm (the discriminator's input)."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


@pytest.mark.parametrize("student", ["student-cnn", "student-mlp"])
def test_terms_are_the_formulas(student):
    """CE + T²·KL(p_t ‖ p_s) (batchmean) + 0.1·mean −log σ(D(u(φ(f_s)))) for the student; mean −log σ(D(u(f_t))) +
    mean −log(1 − σ(D(u(φ(f_s))))) for the discriminator (u: unit L2 norm per row)."""
    recipe, stage, batch = built(student)
    distiller = stage.distiller
    output = distiller(batch, StepContext(batch=batch))
    values = output.values
    s, t = values["student"], values["teacher"]
    fs, ft = values["student:fc/input"], values["teacher:fc/input"]
    connector, discriminator = distiller.terms[2].connector, distiller.terms[3].discriminator
    assert isinstance(connector, torch.nn.Linear) and connector.in_features == fs.shape[1]
    kd = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    expected = {"ce_student": F.cross_entropy(s, batch["target"]), "kd": kd,
                "adv": 0.1 * -F.logsigmoid(discriminator(unit(connector(fs)))).mean(),
                "adv_d": -F.logsigmoid(discriminator(unit(ft))).mean()
                - F.logsigmoid(-discriminator(unit(connector(fs)))).mean()}
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_two_optimisers_own_the_student_and_the_discriminator():
    recipe, stage, _ = built()
    distiller = stage.distiller
    groups = optimiser_parameters(stage.name, distiller, stage.optimisers)
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    student = {id(p) for p in distiller.models["student"].parameters()}
    connector = {id(p) for p in distiller.terms[2].connector.parameters()}
    assert ids["student"] == student | connector
    assert ids["discriminator"] == {id(p) for p in distiller.terms[3].discriminator.parameters()}
    assert stage.optimisers["student"].terms == ("ce_student", "kd", "adv")
    assert stage.optimisers["discriminator"].terms == ("adv_d",) and stage.step_plan == "simultaneous"


def test_the_discriminator_steps_on_its_own_loss_only():
    """One step over the whole batch: the discriminator's update does not depend on the student's adversarial
    weight (no adv gradient leaks into D), the student's does; both sides moved."""
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, **QUIET)
    distillers = {}
    for adv_weight in (0.1, 0.0):
        recipe = build_recipe("adv-feature", light_setup(), adv_weight=adv_weight)
        initial = parameters_of(recipe.stages[0].distiller.models["student"])
        Trainer(config).fit(recipe, small_split().train)
        distillers[adv_weight] = recipe.stages[0].distiller
        assert not torch.equal(parameters_of(recipe.student)["fc.weight"], initial["fc.weight"])
    with_adv, without_adv = distillers[0.1], distillers[0.0]
    discriminator = parameters_of(with_adv.terms[3].discriminator)
    for name, value in parameters_of(without_adv.terms[3].discriminator).items():
        assert torch.equal(discriminator[name], value), name
    students = [parameters_of(d.models["student"]) for d in (with_adv, without_adv)]
    assert any(not torch.equal(students[0][name], students[1][name]) for name in students[0])


def make(seed=0):
    return build_recipe("adv-feature", light_setup(seed=seed), step_plan={"discriminator": 1, "student": 2})


def test_resume_is_bit_exact(tmp_path):
    """A 1:2 plan over 2-turn epochs (the cycle crosses the epoch boundary), momentum SGD."""
    config = dict(epochs=2, batch_size=32, lr=0.05, **QUIET)
    _, _, reference_recipe, resumed_recipe = assert_resume_is_exact(make, config, tmp_path)
    for name, value in parameters_of(reference_recipe.stages[0].distiller).items():
        assert torch.equal(parameters_of(resumed_recipe.stages[0].distiller)[name], value), name


@pytest.mark.parametrize("overrides, error, match", [
    ({"adv_weight": -1.0}, ValueError, "adv-feature: adv_weight"),
    ({"hidden": 0}, ValueError, "adv-feature: hidden"),
    ({"layers": 1.5}, TypeError, "adv-feature: layers"),
    ({"discriminator_lr_scale": 0.0}, ValueError, "adv-feature: discriminator_lr_scale"),
    ({"step_plan": "sometimes"}, ValueError, "unknown step_plan 'sometimes'"),
])
def test_errors_name_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("adv-feature", digits_setup(), **overrides)


def test_needs_a_teacher():
    with pytest.raises(ValueError, match="distils from a teacher"):
        build_recipe("adv-feature", digits_setup(teacher=None))
