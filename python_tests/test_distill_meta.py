"""The meta-learned method mkd (kdkernels.distill.methods.meta): its KD at learnable temperatures
(kdkernels.two_temperature_kd_loss, tested against the formula in test_losses_response.py) is twice differentiable in
the logits and the temperature tensors, and the recipe learns and logs T_s, T_t."""
import inspect

import pytest
import torch

import kdkernels
from kdkernels.distill.methods.meta import LearnedTemperatureKDTerm
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Setup
from kdkernels.distill.registry import build_recipe, get_method
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, small_split


def logits(seed: int, shape=(6, 5), dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def test_it_is_twice_differentiable_in_the_logits_and_the_temperatures():
    s = logits(4, (3, 4)).requires_grad_(True)
    t = logits(5, (3, 4))
    temperatures = torch.tensor([0.7, 0.3], dtype=torch.float64, requires_grad=True)

    def loss(s, log_t):
        return kdkernels.two_temperature_kd_loss(s, t, log_t[0].exp(), log_t[1].exp())

    assert torch.autograd.gradgradcheck(loss, (s, temperatures))


def test_the_recipe_learns_and_logs_the_temperatures():
    torch.manual_seed(0)
    setup = Setup(student=digits_model("student-mlp"), teacher=digits_model("student-mlp"), num_classes=10)
    recipe = build_recipe("mkd", setup, held_out=0.25, temperature=2.0)
    stage = recipe.stages[0]
    assert stage.meta_step.hyperparameters == ("kd.log_temperature_student", "kd.log_temperature_teacher")
    term = stage.distiller.terms[1]
    assert isinstance(term, LearnedTemperatureKDTerm)
    result = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.1, **QUIET)).fit(
        recipe, small_split().train, small_split().test)
    row = result.history[-1]
    assert row["temperature_student"] == pytest.approx(float(term.log_temperature_student.detach().exp()))
    assert row["temperature_teacher"] == pytest.approx(float(term.log_temperature_teacher.detach().exp()))
    assert row["temperature_teacher"] != pytest.approx(2.0)


def test_the_method_is_registered_as_an_approximation_with_provenance():
    method = get_method("mkd")
    assert method.category == "meta" and "2202.07940" in method.paper
    assert method.approximation and method.approximation.startswith("approximation of Liu et al. 2022")
    doc = inspect.getdoc(method.build)
    assert "approximation:" in doc and "T_s·T_t" in doc
    assert method.hyperparameters() == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "held_out": 0.1,
                                        "meta_lr": 0.01, "first_order": False}


@pytest.mark.slow
def test_the_demo_reports_the_learned_temperatures():
    from kdkernels.distill.demo import DemoSettings, markdown_table, run_demo
    from kdkernels.distill.experiment import DigitsExperiment

    settings = DemoSettings(methods=("ce", "mkd"), seeds=(0,), epochs=1,
                            experiment=DigitsExperiment(teacher_epochs=1, train_size=100))
    report = run_demo(settings, log=lambda _: None)
    learned = report["methods"]["mkd"]["learned"]
    assert set(learned) == {"temperature_student", "temperature_teacher"}
    assert report["methods"]["mkd"]["runs"][0]["learned"] == learned and "learned" not in report["methods"]["ce"]
    assert f"mkd: temperature_student {learned['temperature_student']:.3f}" in markdown_table(report)
