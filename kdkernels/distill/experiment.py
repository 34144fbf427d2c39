"""Runs on the built-in digits data: train a teacher, then distil a student with any registered method.

Shared by ``kdkernels distill`` and ``kdkernels demo``. Teachers are trained with the ``ce`` baseline on the full
training split; students train on a stratified subset of it (``train_size``), where distillation has room to help.

The settings the seed studies vary (:class:`DigitsExperiment`): a poor teacher, stopped at a step budget
(``teacher_steps``) or at a target test accuracy (``teacher_target_accuracy``): "defective KD" (Yuan et al., CVPR
2020, "Revisiting knowledge distillation via label smoothing regularization", De-KD); reversed KD, a small teacher
for a large student (:meth:`DigitsExperiment.reversed`, Re-KD of the same paper); a label-smoothed teacher
(``teacher_label_smoothing``: Müller et al., NeurIPS 2019, "When does label smoothing help?"); and a long-tailed
student subset (``imbalance_ratio``: Cui et al. 2019, Cao et al. 2019).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import math

import torch

from kdkernels._validation import Checks
from kdkernels.distill.config import RunResult, TrainConfig
from kdkernels.distill.data import (DigitsSplit, ShuffleBatchSampler, as_sample_dataset, dataset_labels,
                                    load_digits, stratified_subset)
from kdkernels.distill.datasets import DatasetSplit, load_dataset
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import set_up_environment
from kdkernels.distill.evaluation import Evaluator
from kdkernels.distill.models import create
from kdkernels.distill.precision import AMP_DTYPES
from kdkernels.distill.terms import CrossEntropyTerm
from kdkernels.distill.weights import load_weights
from kdkernels.distill.recipe import Setup
from kdkernels.distill.registry import build_recipe, get_method
from kdkernels.distill.trainer import Trainer
from kdkernels.distributed import rank_and_world_size


@dataclasses.dataclass
class DigitsExperiment:
    """The digits setting: which zoo models, how much labelled data the student gets, how teachers are trained.

    teacher_steps: stop each teacher's training after this many optimiser steps; teacher_target_accuracy: stop it
    as soon as its test accuracy reaches this (%, checked after every step), whichever comes first; the LR schedule
    still spans ``teacher_epochs``, so the teacher is an early-stopped checkpoint of the full run (defective KD).
    teacher_label_smoothing: ε of the teacher's label-smoothed cross-entropy, ``(1 − ε)·CE + ε·mean_c(−log p_c)``
    (targets ``(1 − ε)·onehot + ε/C``; 0: plain CE). teacher_batch_size: the teachers' minibatch size (default: the run's; the
    teacher "sweet spot" grid of ``kdkernels sweep`` varies it with ``teacher_epochs``). imbalance_ratio: ρ ≥ 1 makes the student's training subset
    long-tailed (:func:`~kdkernels.distill.data.load_digits`); the teacher still trains on the full balanced
    split, and the test split is unchanged. :meth:`reversed` swaps the two models (reversed KD).
    teacher_views, teacher_input: the modality the teachers read (privileged and cross-modal KD: the views that make
    it, :mod:`kdkernels.distill.modalities`, and its batch key); the teachers are trained AND tested on it
    (:meth:`for_method` sets them from a method's :meth:`~kdkernels.distill.registry.Method.teacher_modality`).
    """

    student: str = "student-cnn"
    teacher: str = "teacher-cnn"
    assistant: str = "assistant-cnn"
    train_size: int | None = 300
    teacher_epochs: int = 30
    teachers: int = 1                 # teachers trained (multi-teacher methods use them all)
    split_seed: int = 0
    cache_dir: str | None = None      # trained teachers are stored here and reused
    teacher_steps: int | None = None
    teacher_target_accuracy: float | None = None
    teacher_label_smoothing: float = 0.0
    teacher_batch_size: int | None = None
    imbalance_ratio: float | None = None
    dataset: str = "digits"           # "digits", or a name of kdkernels.distill.datasets.load_dataset
    data_dir: str | None = None
    image_size: int | None = None
    teacher_weights: str | None = None   # a published teacher checkpoint: loaded, not trained
    teacher_views: tuple = ()            # views making the teachers' modality (deterministic transforms)
    teacher_input: str = "input"         # the batch key the teachers read

    def __post_init__(self):
        check_settings(dataclasses.asdict(self))
        if self.dataset != "digits" and self.imbalance_ratio is not None:
            raise ValueError(f"imbalance_ratio applies to the digits data, not to dataset {self.dataset!r}")
        if self.teacher_weights is not None and self.teacher_settings:
            raise ValueError(f"teacher_weights loads a trained teacher; {sorted(self.teacher_settings)} set how a "
                             "teacher is trained")

    def split(self, train_size: int | None = ...) -> DigitsSplit | DatasetSplit:
        """The student's split (``train_size``, ``imbalance_ratio``); ``split(train_size=None)`` is the teachers'
        (the full, balanced training split). Other datasets than digits are read once per process
        (:func:`~kdkernels.distill.datasets.load_dataset`, augmentation keyed by ``split_seed``) and subsampled per
        class (:func:`~kdkernels.distill.data.stratified_subset`) when ``train_size`` is set."""
        size = self.train_size if train_size is ... else train_size
        if self.dataset == "digits":
            ratio = self.imbalance_ratio if train_size is ... else None
            return load_digits(train_size=size, seed=self.split_seed, imbalance_ratio=ratio)
        full = _loaded_dataset(self.dataset, self.data_dir, self.image_size, self.split_seed)
        if size is None:
            return full
        return dataclasses.replace(full, train=stratified_subset(full.train, size, seed=self.split_seed))

    @property
    def num_classes(self) -> int:
        return 10 if self.dataset == "digits" else self.split(train_size=None).num_classes

    def model(self, name: str) -> torch.nn.Module:
        """A fresh model ``name`` for this experiment's classes (:func:`~kdkernels.distill.models.create`)."""
        return create(name, self.num_classes)

    def for_method(self, method: str, preset: str = "default",
                   overrides: dict | None = None) -> "DigitsExperiment":
        """This experiment with the teachers reading the modality that ``method`` (with ``preset`` and
        ``overrides``) defines for its teacher (:meth:`~kdkernels.distill.registry.Method.teacher_modality`)."""
        views, key = get_method(method).teacher_modality(preset, overrides)
        return dataclasses.replace(self, teacher_views=tuple(views), teacher_input=key)

    @property
    def teacher_modality(self) -> list | None:
        """The teachers' modality as text (their input key and views), None for the plain input."""
        if not self.teacher_views and self.teacher_input == "input":
            return None
        return [self.teacher_input, [repr(view) for view in self.teacher_views]]

    def reversed(self) -> "DigitsExperiment":
        """Reversed KD (Re-KD, Yuan et al. 2020): the same experiment with the two models' roles swapped, so the
        small model (the student's, trained on the full split) teaches the large one (on the student's subset).
        It asks whether a teacher weaker than its student still helps: if it does, KD acts at least in part as a
        learned label smoothing rather than as a transfer of the teacher's superior knowledge."""
        return dataclasses.replace(self, student=self.teacher, teacher=self.student)

    @property
    def teacher_settings(self) -> dict:
        """The teacher settings that differ from a plain, fully trained CE teacher (their names and values)."""
        values = {"teacher_steps": self.teacher_steps, "teacher_target_accuracy": self.teacher_target_accuracy,
                  "teacher_label_smoothing": self.teacher_label_smoothing or None,
                  "teacher_batch_size": self.teacher_batch_size}
        return {name: value for name, value in values.items() if value is not None}


def check_settings(values: dict, function: str = "DigitsExperiment", names: dict | None = None) -> None:
    """Checks the experiment settings in ``values`` (a TypeError or a ValueError naming the setting, as ``names``
    spells it: the command line passes its flags)."""
    check, names = Checks(function), names or {}
    if values.get("teacher_steps") is not None:
        check.integer(names.get("teacher_steps", "teacher_steps"), values["teacher_steps"], minimum=1)
    if values.get("teacher_target_accuracy") is not None:
        check.real(names.get("teacher_target_accuracy", "teacher_target_accuracy"),
                   values["teacher_target_accuracy"], positive=True, maximum=100.0)
    if values.get("teacher_label_smoothing") is not None:
        check.probability(names.get("teacher_label_smoothing", "teacher_label_smoothing"),
                          values["teacher_label_smoothing"], upper_open=True)
    if values.get("teacher_batch_size") is not None:
        check.integer(names.get("teacher_batch_size", "teacher_batch_size"), values["teacher_batch_size"], minimum=1)
    if values.get("imbalance_ratio") is not None:
        check.real(names.get("imbalance_ratio", "imbalance_ratio"), values["imbalance_ratio"], minimum=1.0)


SAME_WIDTH_TEACHERS = {"student-cnn": "student-cnn-deep"}


def teacher_model_for(method: str, experiment: DigitsExperiment) -> str:
    """The zoo teacher a method is defined for: the experiment's teacher, a deeper model with the student's stage
    widths (FSP: equal channel counts), the student's own architecture (Tf-KD self), or the method's
    ``default_teacher`` (manifold: a ViT)."""
    kind = get_method(method).teacher_architecture
    if kind == "any" and get_method(method).default_teacher is not None:
        return get_method(method).default_teacher
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
    key = [experiment.teacher, experiment.teacher_epochs, experiment.split_seed, seed, config.lr, config.batch_size,
           config.optimizer, torch.__version__]
    if experiment.teacher_settings:   # a plain teacher keeps the key it had before these settings existed
        key.append(experiment.teacher_settings)
    if experiment.teacher_modality is not None:   # a teacher of another modality than the input
        key.append({"teacher_modality": experiment.teacher_modality})
    if experiment.dataset != "digits":
        key.append([experiment.dataset, str(Path(experiment.data_dir).resolve()) if experiment.data_dir else None,
                    experiment.image_size, config.schedule, list(config.milestones), config.weight_decay])
    key = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(experiment.cache_dir) / f"teacher-{experiment.teacher}-{digest}.pt"


@functools.lru_cache(maxsize=4)
def _loaded_dataset(name: str, data_dir: str | None, image_size: int | None, seed: int) -> DatasetSplit:
    return load_dataset(name, data_dir, image_size=image_size, seed=seed)


@dataclasses.dataclass
class TrainedTeacher:
    """A trained zoo teacher: the model, its test accuracy (%) where its training ended, the optimiser steps it took
    and why it stopped early (``"step"``: ``teacher_steps``; ``"accuracy"``: ``teacher_target_accuracy``; None: it
    trained all ``teacher_epochs``)."""

    model: torch.nn.Module
    accuracy: float
    steps: int
    stopped: str | None = None

    def describe(self, experiment: DigitsExperiment) -> str:
        """One line for the command line: the accuracy reached, and where and why the training stopped."""
        if self.stopped == "loaded":
            return f"{self.accuracy:.2f}% test accuracy, loaded from {experiment.teacher_weights}"
        text = f"{self.accuracy:.2f}% test accuracy after {self.steps} steps"
        if self.stopped == "step":
            return text + " (the step budget)"
        if self.stopped == "accuracy":
            return text + f" (reached the {experiment.teacher_target_accuracy:g}% target)"
        if experiment.teacher_target_accuracy is not None:
            return text + f" (the {experiment.teacher_target_accuracy:g}% target was not reached)"
        return text


def teacher_recipe(experiment: DigitsExperiment, teacher: torch.nn.Module):
    """How the digits teachers are trained: the ``ce`` baseline, with ``teacher_label_smoothing`` when set, on the
    teachers' modality (``teacher_views``, ``teacher_input``: at training and at test time)."""
    overrides = {"label_smoothing": experiment.teacher_label_smoothing} if experiment.teacher_label_smoothing else {}
    recipe = build_recipe("ce", Setup(student=teacher, num_classes=experiment.num_classes), **overrides)
    if experiment.teacher_modality is None:
        return recipe
    stages = []
    for stage in recipe.stages:
        plain = stage.distiller
        plain.close()
        distiller = Distiller(dict(plain.models), list(plain.terms), trainable=plain.trainable,
                              evaluate=plain.evaluate, views=experiment.teacher_views,
                              inputs={name: experiment.teacher_input for name in plain.models})
        stages.append(dataclasses.replace(stage, distiller=distiller))
    return dataclasses.replace(recipe, stages=stages)


def teacher_config(experiment: DigitsExperiment, config: TrainConfig, seed: int) -> TrainConfig:
    """The teachers' training configuration: ``config`` for ``teacher_epochs``, no MixUp, no checkpoints, stopped at
    ``teacher_steps`` / ``teacher_target_accuracy``, with ``teacher_batch_size`` when set. A step budget the whole
    training never reaches is an error."""
    if experiment.teacher_batch_size is not None:
        config = dataclasses.replace(config, batch_size=experiment.teacher_batch_size)
    if experiment.teacher_steps is not None:
        rank, world_size = rank_and_world_size()
        sampler = ShuffleBatchSampler(len(experiment.split(train_size=None).train), config.batch_size,
                                      drop_last=config.drop_last, world_size=world_size, rank=rank)
        total = max(1, math.ceil(len(sampler) / config.grad_accum)) * experiment.teacher_epochs
        if experiment.teacher_steps > total:
            raise ValueError(f"teacher_steps ({experiment.teacher_steps}) exceeds the teacher's whole training "
                             f"({experiment.teacher_epochs} epochs of {total // experiment.teacher_epochs} steps "
                             f"= {total}): lower teacher_steps or raise teacher_epochs")
    return dataclasses.replace(config, epochs=experiment.teacher_epochs, seed=seed, out_dir=None, resume=False,
                               stop_after_epochs=None, mixup_alpha=0.0, stop_at_step=experiment.teacher_steps,
                               stop_at_accuracy=experiment.teacher_target_accuracy)


def fit_teacher(experiment: DigitsExperiment, config: TrainConfig, seed: int = 0) -> TrainedTeacher:
    """A zoo teacher trained on the full training split (:func:`teacher_recipe`, :func:`teacher_config`).
    Reuses a cached one when ``experiment.cache_dir`` holds it."""
    split = experiment.split(train_size=None)
    torch.manual_seed(seed)
    teacher = experiment.model(experiment.teacher)
    if experiment.teacher_weights is not None:
        load_weights(teacher, experiment.teacher_weights, allow_pickle=True)
        return TrainedTeacher(teacher.eval(), test_accuracy(teacher, split.test, config, experiment.teacher_views,
                                                            experiment.teacher_input), 0, "loaded")
    path = _teacher_cache_path(experiment, config, seed)
    settings = teacher_config(experiment, config, seed)
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(saved["state_dict"])
        return TrainedTeacher(teacher.eval(), float(saved["accuracy"]), int(saved.get("steps", 0)),
                              saved.get("stopped"))
    result = Trainer(settings).fit(teacher_recipe(experiment, teacher), split.train, split.test)
    if path is not None and rank_and_world_size()[0] == 0:  # every rank trained the same teacher; one writes it
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": teacher.state_dict(), "accuracy": result.accuracy, "steps": result.steps,
                    "stopped": result.stopped}, path)
    return TrainedTeacher(teacher.eval(), result.accuracy, result.steps, result.stopped)


def train_teacher(experiment: DigitsExperiment, config: TrainConfig, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """:func:`fit_teacher` as (model, test accuracy %)."""
    trained = fit_teacher(experiment, config, seed)
    return trained.model, trained.accuracy


def digits_setup(experiment: DigitsExperiment, teachers: list[torch.nn.Module], seed: int) -> Setup:
    torch.manual_seed(seed)
    train = experiment.split().train
    return Setup(student=experiment.model(experiment.student), num_classes=experiment.num_classes,
                 teachers=list(teachers), num_train=len(train),
                 train_labels=torch.as_tensor(dataset_labels(train)),
                 new_student=lambda: experiment.model(experiment.student),
                 new_assistant=lambda: experiment.model(experiment.assistant))


def test_accuracy(model: torch.nn.Module, test_set, config: TrainConfig, views: tuple = (),
                  input_key: str = "input") -> float:
    """The top-1 test accuracy (%) of ``model`` alone, evaluated as the trainer evaluates (a loaded teacher), on the
    modality ``views`` / ``input_key`` make (the plain input by default)."""
    env = set_up_environment(config.device)
    distiller = Distiller({"model": model}, [CrossEntropyTerm("model")], trainable=("model",), views=views,
                          inputs={"model": input_key}).to(env.device)
    evaluator = Evaluator(as_sample_dataset(test_set), env, batch_size=config.eval_batch_size,
                          num_workers=config.num_workers, amp_dtype=AMP_DTYPES[config.amp])
    return evaluator(distiller)["test_acc_model"]


def distil_digits(method: str, experiment: DigitsExperiment, config: TrainConfig, teachers: list[torch.nn.Module],
                  *, seed: int = 0, preset: str = "default", overrides: dict | None = None) -> RunResult:
    """Trains a fresh zoo student with ``method`` on the digits subset and evaluates it on the test split."""
    needs_teacher = get_method(method).needs_teacher
    setup = digits_setup(experiment, teachers if needs_teacher else [], seed)
    recipe = build_recipe(method, setup, preset, **(overrides or {}))
    split = experiment.split()
    return Trainer(dataclasses.replace(config, seed=seed)).fit(recipe, split.train, split.test)
