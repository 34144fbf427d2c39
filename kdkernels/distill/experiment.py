"""Runs on the built-in digits data: train a teacher, then distil a student with any registered method.

Shared by ``kdkernels distill`` and ``kdkernels demo``. Teachers are trained with the ``ce`` baseline on the full
training split; students train on a stratified subset of it (``train_size``), where distillation has room to help.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from kdkernels.distill.config import RunResult, TrainConfig
from kdkernels.distill.data import DigitsSplit, load_digits
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Setup
from kdkernels.distill.registry import build_recipe, get_method
from kdkernels.distill.trainer import Trainer
from kdkernels.distributed import rank_and_world_size


@dataclasses.dataclass
class DigitsExperiment:
    """The digits setting: which zoo models, how much labelled data the student gets, how teachers are trained."""

    student: str = "student-cnn"
    teacher: str = "teacher-cnn"
    assistant: str = "assistant-cnn"
    train_size: int | None = 300
    teacher_epochs: int = 30
    teachers: int = 1                 # teachers trained (multi-teacher methods use them all)
    split_seed: int = 0
    cache_dir: str | None = None      # trained teachers are stored here and reused

    def split(self, train_size: int | None = ...) -> DigitsSplit:
        return load_digits(train_size=self.train_size if train_size is ... else train_size, seed=self.split_seed)


SAME_WIDTH_TEACHERS = {"student-cnn": "student-cnn-deep"}


def teacher_model_for(method: str, experiment: DigitsExperiment) -> str:
    """The zoo teacher a method is defined for: the experiment's teacher, a deeper model with the student's stage
    widths (FSP: equal channel counts), or the student's own architecture (Tf-KD self)."""
    kind = get_method(method).teacher_architecture
    if kind == "student":
        return experiment.student
    if kind == "same-widths":
        if experiment.student not in SAME_WIDTH_TEACHERS:
            raise ValueError(f"method {method!r} needs a teacher with the student's stage widths; the digits zoo has "
                             f"one for {sorted(SAME_WIDTH_TEACHERS)}, not for {experiment.student!r}")
        return SAME_WIDTH_TEACHERS[experiment.student]
    return experiment.teacher


def _teacher_cache_path(experiment: DigitsExperiment, config: TrainConfig, seed: int) -> Path | None:
    if experiment.cache_dir is None:
        return None
    key = json.dumps([experiment.teacher, experiment.teacher_epochs, experiment.split_seed, seed, config.lr,
                      config.batch_size, config.optimizer, torch.__version__], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(experiment.cache_dir) / f"teacher-{experiment.teacher}-{digest}.pt"


def train_teacher(experiment: DigitsExperiment, config: TrainConfig, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """A zoo teacher trained with cross-entropy on the full training split; returns (model, test accuracy %).
    Reuses a cached one when ``experiment.cache_dir`` holds it."""
    split = experiment.split(train_size=None)
    path = _teacher_cache_path(experiment, config, seed)
    torch.manual_seed(seed)
    teacher = digits_model(experiment.teacher)
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(saved["state_dict"])
        return teacher.eval(), float(saved["accuracy"])
    teacher_config = dataclasses.replace(config, epochs=experiment.teacher_epochs, seed=seed, out_dir=None,
                                         resume=False, mixup_alpha=0.0)
    result = Trainer(teacher_config).fit(build_recipe("ce", Setup(student=teacher, num_classes=10)),
                                         split.train, split.test)
    if path is not None and rank_and_world_size()[0] == 0:  # every rank trained the same teacher; one writes it
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": teacher.state_dict(), "accuracy": result.accuracy}, path)
    return teacher.eval(), result.accuracy


def digits_setup(experiment: DigitsExperiment, teachers: list[torch.nn.Module], seed: int) -> Setup:
    torch.manual_seed(seed)
    train = experiment.split().train
    return Setup(student=digits_model(experiment.student), num_classes=10, teachers=list(teachers),
                 num_train=len(train), train_labels=train.targets,
                 new_student=lambda: digits_model(experiment.student),
                 new_assistant=lambda: digits_model(experiment.assistant))


def distil_digits(method: str, experiment: DigitsExperiment, config: TrainConfig, teachers: list[torch.nn.Module],
                  *, seed: int = 0, preset: str = "default", overrides: dict | None = None) -> RunResult:
    """Trains a fresh zoo student with ``method`` on the digits subset and evaluates it on the test split."""
    needs_teacher = get_method(method).needs_teacher
    setup = digits_setup(experiment, teachers if needs_teacher else [], seed)
    recipe = build_recipe(method, setup, preset, **(overrides or {}))
    split = experiment.split()
    return Trainer(dataclasses.replace(config, seed=seed)).fit(recipe, split.train, split.test)
