"""Shared helpers of the trainer tests (test_trainer_*.py): tiny digits splits, KD between two MLPs, a term that
records what it was given."""
import functools

import torch

import kdkernels
from kdkernels.distill.data import load_digits
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup, Stage
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.terms import CrossEntropyTerm, Term


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
