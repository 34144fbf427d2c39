"""Cross-modal and privileged methods (kdkernels/distill/methods/cross_modal.py): one training step equals the
official formula on that step's tensors, each model reads its own modality at training and test time, the
experiment trains the teacher on its modality, exact resume, bad configuration errors."""
from __future__ import annotations

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
