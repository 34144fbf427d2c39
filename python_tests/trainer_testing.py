"""Shared helpers of the trainer tests (test_trainer_*.py): tiny digits splits, KD between two MLPs, a term that
records what it was given, and a run trained in pieces (each a fresh recipe resumed from the last checkpoint)
compared with the uninterrupted run."""
import functools

import torch

import kdkernels
from kdkernels.distill.data import load_digits
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup, Stage
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.terms import CrossEntropyTerm, Term
from kdkernels.distill.trainer import TrainConfig, Trainer


QUIET = dict(progress=False, num_workers=0)


@functools.lru_cache(maxsize=None)
def small_split(train_size: int = 64):
    return load_digits(train_size=train_size, seed=0)


def kd_recipe(seed: int = 0, student: str = "student-mlp", teacher: str = "student-mlp") -> Recipe:
    """KD between two BN-free MLPs (an untrained teacher is enough to exercise the machinery)."""
    torch.manual_seed(seed)
    setup = Setup(student=digits_model(student), teacher=digits_model(teacher), num_classes=10)
    return build_recipe("kd", setup)


def parameters_of(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "loss_seconds")} for row in history]


class RecordingTerm(Term):
    """KD (forward KL, T = 4) that records what it was given: value dtypes, the step context, the batch input."""

    def __init__(self):
        super().__init__("recorded_kd", ("student", "teacher"))
        self.records = []

    def loss(self, student, teacher, *, context):
        loss = kdkernels.kd_loss(student, teacher, 4.0)
        self.records.append({"dtypes": (student.dtype, teacher.dtype), "loss_dtype": loss.dtype,
                             "epoch": context.epoch, "epochs": context.epochs, "step": context.step,
                             "mixup": context.mixup, "input": context.batch["input"].detach().clone(),
                             "index": context.batch["index"].clone()})
        return loss


def recording_recipe(seed: int = 0) -> tuple[Recipe, RecordingTerm]:
    torch.manual_seed(seed)
    term = RecordingTerm()
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-cnn")}
    distiller = Distiller(models, [CrossEntropyTerm("student", 0.5), term])
    return Recipe("recorded", [Stage("recorded", distiller)]), term


def assert_resume_is_exact(make_recipe, config: dict, tmp_path, pieces=(1, 5)):
    """Trains ``make_recipe(seed=1)`` in one call and a fresh recipe in ``pieces`` of epochs (each resuming from the
    last checkpoint); asserts that both end with the same parameters, history and accuracies. Returns
    (reference, resumed, reference_recipe, resumed_recipe)."""
    reference_recipe = make_recipe(seed=1)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **config)).fit(
        reference_recipe, small_split().train, small_split().test)
    resumed, resumed_recipe = run_in_pieces(make_recipe, config, list(pieces), tmp_path / "pieces")
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)
    return reference, resumed, reference_recipe, resumed_recipe


def run_in_pieces(make_recipe, config: dict, pieces, out_dir):
    """Trains a fresh recipe for each piece's epochs, resuming from out_dir/last.pt (a new process would build
    the recipe again the same way); returns the last call's result and recipe."""
    for index, piece in enumerate(pieces):
        # The first call starts like the reference run; later calls start from other weights, which the
        # checkpoint must replace.
        recipe = make_recipe(seed=1 if index == 0 else 100 + index)
        result = Trainer(TrainConfig(out_dir=out_dir, resume=index > 0, stop_after_epochs=piece, **config)).fit(
            recipe, small_split().train, small_split().test)
        assert result.completed == (index == len(pieces) - 1)
    return result, recipe


def assert_same_run(resumed, resumed_recipe, reference, reference_recipe):
    for key, state in parameters_of_recipe(reference_recipe).items():
        for name, value in state.items():
            assert torch.equal(parameters_of_recipe(resumed_recipe)[key][name], value), f"{key}.{name}"
    assert without_timings(resumed.history) == without_timings(reference.history)
    assert resumed.accuracy == reference.accuracy and resumed.best_accuracy == reference.best_accuracy


def parameters_of_recipe(recipe):
    """Every model's and every stage's terms' state (a connector or paraphraser a later stage uses)."""
    models = {f"{i}/{name}": parameters_of(model) for i, stage in enumerate(recipe.stages)
              for name, model in stage.distiller.models.items()}
    terms = {f"{i}/terms": parameters_of(stage.distiller.terms) for i, stage in enumerate(recipe.stages)}
    return {**models, **terms}


def assert_same_run_models(resumed: Recipe, reference: Recipe) -> None:
    for key, state in parameters_of_recipe(reference).items():
        for name, value in state.items():
            assert torch.equal(parameters_of_recipe(resumed)[key][name], value), f"{key}.{name}"
