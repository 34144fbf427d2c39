"""Cross-modal and privileged methods (kdkernels/distill/methods/cross_modal.py): one training step equals the
official formula on that step's tensors, each model reads its own modality at training and test time, the
experiment trains the teacher on its modality, exact resume, bad configuration errors."""
from __future__ import annotations

import json

import pytest
import torch

from distill_testing import batches_for, digits_setup
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.config import TrainConfig
from kdkernels.distill.experiment import DigitsExperiment, _teacher_cache_path, fit_teacher, teacher_recipe
from kdkernels.distill.modalities import Degrade, Profiles
from kdkernels.distill.terms import StepContext
from kdkernels.distill.views import Draws
from test_losses_cross_modal import lopez_paz_distillation
from trainer_testing import QUIET, assert_resume_is_exact

NO_DRAWS = Draws(0, None)


def step(recipe, stage_index: int = -1):
    """(distiller, batch with its views, values, output) of one train-mode forward on the first digits batch."""
    stage = recipe.stages[stage_index]
    batch = next(iter(batches_for(stage)))
    distiller = stage.distiller
    distiller.build(batch).activate().train()
    batch = distiller.apply_views(batch)
    values = distiller.run_models(batch)
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=1, batch=batch))
    return distiller, batch, values, output


# ----------------------------------------------------------------------------------------------------- privileged

@pytest.mark.parametrize("temperature, imitation", [(1.0, 1.0), (4.0, 0.3)])
def test_privileged_step_is_the_official_formula_on_each_models_modality(temperature, imitation):
    recipe = build_recipe("privileged", digits_setup(), temperature=temperature, imitation=imitation)
    distiller, batch, values, output = step(recipe)
    degraded = Degrade()(batch["input"], NO_DRAWS)[0]
    assert torch.equal(batch["input_degraded"], degraded) and not torch.equal(degraded, batch["input"])
    torch.testing.assert_close(values["student"], distiller.models["student"](degraded))
    torch.testing.assert_close(values["teacher"], distiller.models["teacher"](batch["input"]))
    expected = lopez_paz_distillation(values["student"].double(), values["teacher"].double(), batch["target"],
                                      temperature, imitation)
    torch.testing.assert_close(output.terms["privileged"].double(), expected, rtol=1e-5, atol=1e-6)
    assert list(output.terms) == ["privileged"]
    # at test time the student still reads the degraded image, the teacher the clean one
    test_batch = {"input": batch["input"], "target": batch["target"]}
    assert torch.equal(distiller.evaluation_input("student", test_batch), degraded)
    assert torch.equal(distiller.evaluation_input("teacher", test_batch), batch["input"])
    assert distiller.evaluate == ("student", "teacher")


def test_privileged_presets_and_modalities():
    method = get_method("privileged")
    assert method.category == "cross-modal"
    assert method.hyperparameters()["temperature"] == 1.0 and method.hyperparameters()["imitation"] == 1.0
    assert method.hyperparameters("alone")["imitation"] == 0.0
    # alone: the student's cross-entropy on its own modality
    distiller, batch, values, output = step(build_recipe("privileged", digits_setup(), "alone"))
    torch.testing.assert_close(output.terms["privileged"],
                               torch.nn.functional.cross_entropy(values["student"], batch["target"]))
    # the profiles preset with the zoo's modal-mlp; an occluded block through student_options
    recipe = build_recipe("privileged", digits_setup(student="modal-mlp"), "profiles")
    _, batch, values, _ = step(recipe)
    assert torch.equal(batch["input_profiles"], Profiles()(batch["input"], NO_DRAWS)[0])
    assert values["student"].shape == (32, 10)
    recipe = build_recipe("privileged", digits_setup(), student_options={"factor": 1, "occlude": 4, "at": (2, 2)})
    _, batch, _, _ = step(recipe)
    assert torch.all(batch["input_degraded"][..., 2:6, 2:6] == 0)


def test_the_method_declares_its_teachers_modality_and_the_experiment_trains_it_there():
    method = get_method("privileged")
    assert method.teacher_modality() == ((), "input")
    assert get_method("kd").teacher_modality() == ((), "input")
    views, key = method.teacher_modality("default", {"teacher_modality": "profiles"})
    assert key == "input_profiles" and isinstance(views[0].transform, Profiles)
    plain = DigitsExperiment(teacher="modal-mlp", teacher_epochs=1, train_size=100)
    assert plain.for_method("privileged").teacher_modality is None
    experiment = plain.for_method("privileged", overrides={"teacher_modality": "profiles"})
    assert experiment.teacher_input == "input_profiles"
    config = TrainConfig(epochs=1, batch_size=64, progress=False, device="cpu")
    distiller = teacher_recipe(experiment, experiment.model("modal-mlp")).stages[0].distiller
    assert distiller.inputs["student"] == "input_profiles"
    # the modal-mlp reads 16 values: it trains (and is tested) only on the profiles, never on the 8×8 image
    trained = fit_teacher(experiment, config, seed=0)
    assert 0.0 <= trained.accuracy <= 100.0 and trained.steps > 0
    with pytest.raises(RuntimeError):
        fit_teacher(plain, config, seed=0)
    # a teacher of another modality is cached under another key
    cached = DigitsExperiment(cache_dir="/tmp/unused")
    assert _teacher_cache_path(cached, config, 0) != _teacher_cache_path(
        cached.for_method("privileged", overrides={"teacher_modality": "degraded"}), config, 0)
    assert _teacher_cache_path(cached, config, 0) == _teacher_cache_path(cached.for_method("privileged"), config, 0)


def test_the_command_line_trains_the_teacher_on_the_modality_of_the_method_preset_and_overrides(tmp_path):
    """``kdkernels distill``: a modal-mlp teacher can only run on a 16-value modality; --set teacher_modality reaches
    the teacher's training and its test accuracy."""
    from kdkernels import cli

    assert cli.main(["distill", "--method", "privileged", "--teacher", "modal-mlp", "--set",
                     "teacher_modality=profiles", "--epochs", "1", "--teacher-epochs", "1", "--train-size", "100",
                     "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["experiment"]["teacher_input"] == "input_profiles"
    assert 0.0 < result["teachers"][0]["accuracy"] <= 100.0
    # the distillation run tests the teacher on its modality too (the image would not fit the modal-mlp); not the
    # same number: the student's subset standardises the digits with its own mean and std
    assert 0.0 < result["evaluation"]["test_acc_teacher"] <= 100.0


def make_privileged(seed=0):
    return build_recipe("privileged", digits_setup(seed=seed), temperature=2.0, imitation=0.5)


def test_privileged_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_privileged, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path,
                           pieces=(1, 1))


@pytest.mark.parametrize("overrides, error, match", [
    ({"temperature": 0.0}, ValueError, "privileged: temperature"),
    ({"imitation": 2.0}, ValueError, "privileged: imitation"),
    ({"student_modality": "depth"}, ValueError, "privileged: student_modality"),
    ({"teacher_modality": 3}, TypeError, "privileged: teacher_modality"),
    ({"student_options": [2]}, TypeError, "privileged: student_options"),
    ({"student_options": {"factor": 0}}, ValueError, "privileged: student_options.*factor"),
    ({"student_options": {"dim": 4}}, ValueError, "privileged: student_options"),
    ({"teacher_modality": "degraded", "teacher_options": {"factor": 4}}, ValueError, "privileged: teacher_options"),
])
def test_privileged_bad_configuration_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("privileged", digits_setup(), **overrides)


# ---------------------------------------------------------------------------------------------------- cross-modal

def test_cross_modal_transfer_stage_regresses_the_teachers_pool5_analogue_without_labels():
    setup = digits_setup()
    recipe = build_recipe("cross-modal", setup)
    assert [stage.name for stage in recipe.stages] == ["cross-modal-transfer", "cross-modal-finetune"]
    assert [stage.epochs_of(30) for stage in recipe.stages] == [15, 30]
    distiller, batch, values, output = step(recipe, 0)
    degraded = Degrade()(batch["input"], NO_DRAWS)[0]
    assert torch.equal(batch["input_degraded"], degraded)
    torch.testing.assert_close(values["student"], distiller.models["student"](degraded))
    torch.testing.assert_close(values["teacher"], distiller.models["teacher"](batch["input"]))
    student, teacher = values["student:stage3"], values["teacher:stage3"]
    assert student.shape == (32, 16, 2, 2) and teacher.shape == (32, 128, 2, 2)
    connector = distiller.terms[0].connectors[0]
    assert isinstance(connector, torch.nn.Conv2d) and connector.kernel_size == (1, 1)
    expected = 0.01 * 0.5 * (connector(student) - teacher).pow(2).sum() / 32
    torch.testing.assert_close(output.terms["transfer"], expected)
    assert get_method("cross-modal").hyperparameters()["transfer_weight"] == 0.01
    assert list(output.terms) == ["transfer"]
    # the stage reads no label: its forward runs on a batch without "target"
    unlabelled = {key: value for key, value in batch.items() if key != "target"}
    distiller.compute_terms(distiller.run_models(unlabelled), StepContext(epoch=1, epochs=1, batch=unlabelled))
    # the gradient reaches the student (and the connector), not the teacher
    output.loss.backward()
    assert setup.student.stage1[0].weight.grad is not None and connector.weight.grad is not None
    assert all(p.grad is None for p in distiller.models["teacher"].parameters())


def test_cross_modal_finetune_stage_is_ce_on_the_students_modality_from_the_transferred_network():
    setup = digits_setup()
    recipe = build_recipe("cross-modal", setup)
    assert recipe.stages[1].distiller.models["student"] is recipe.stages[0].distiller.models["student"]
    assert "teacher" not in recipe.stages[1].distiller.models and recipe.student is setup.student
    distiller, batch, values, output = step(recipe, 1)
    degraded = Degrade()(batch["input"], NO_DRAWS)[0]
    torch.testing.assert_close(values["student"], setup.student(degraded))
    torch.testing.assert_close(output.terms["ce_student"],
                               torch.nn.functional.cross_entropy(values["student"], batch["target"]))
    assert torch.equal(distiller.evaluation_input("student", {"input": batch["input"]}), degraded)


def test_cross_modal_presets():
    method = get_method("cross-modal")
    assert method.category == "cross-modal" and method.approximation
    assert method.teacher_modality() == ((), "input")
    alone = build_recipe("cross-modal", digits_setup(), "alone")
    assert [stage.name for stage in alone.stages] == ["cross-modal-finetune"]
    recipe = build_recipe("cross-modal", digits_setup(student="modal-mlp"), "profiles")
    distiller, batch, values, output = step(recipe, 0)
    assert values["student:hidden2"].shape == (32, 32) and values["teacher:fc/input"].shape == (32, 128)
    connector = distiller.terms[0].connectors[0]
    assert isinstance(connector, torch.nn.Linear)
    torch.testing.assert_close(output.terms["transfer"], 0.005 * (connector(values["student:hidden2"])
                                                                - values["teacher:fc/input"]).pow(2).sum() / 32)
    recipe = build_recipe("cross-modal", digits_setup(), transfer_epochs=3, transfer_weight=2.0)
    assert recipe.stages[0].epochs_of(30) == 3
    distiller, _, values, weighted = step(recipe, 0)
    connector = distiller.terms[0].connectors[0]
    torch.testing.assert_close(weighted.terms["transfer"], 2.0 * 0.5 * (connector(values["student:stage3"])
                                                                       - values["teacher:stage3"]).pow(2).sum() / 32)


def make_cross_modal(seed=0):
    return build_recipe("cross-modal", digits_setup(seed=seed))


def test_cross_modal_resume_is_bit_exact_across_the_stage_boundary(tmp_path):
    # 2 run epochs: 1 transfer epoch then 2 fine-tuning epochs, resumed at the boundary and inside stage 2
    assert_resume_is_exact(make_cross_modal, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path,
                           pieces=(1, 1, 1))


@pytest.mark.parametrize("overrides, error, match", [
    ({"transfer_epochs": -1}, ValueError, "cross-modal: transfer_epochs"),
    ({"transfer_epochs": 1.5}, ValueError, "cross-modal: transfer_epochs"),
    ({"transfer_epochs": "half"}, TypeError, "cross-modal: transfer_epochs"),
    ({"transfer_weight": 0.0}, ValueError, "cross-modal: transfer_weight"),
    ({"student_layer": 3}, TypeError, "cross-modal: student_layer"),
    ({"student_modality": "sound"}, ValueError, "cross-modal: student_modality"),
    ({"teacher_options": {"seed": -2}}, ValueError, "cross-modal: teacher_options"),
])
def test_cross_modal_bad_configuration_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("cross-modal", digits_setup(), **overrides)


def test_cross_modal_features_a_connector_cannot_map_are_named():
    recipe = build_recipe("cross-modal", digits_setup(), student_layer="stage1", teacher_layer="stage3")
    with pytest.raises(ValueError, match="student_layer / teacher_layer"):
        step(recipe, 0)
