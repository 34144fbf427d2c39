"""What a method builds: a recipe of one or more training stages, and what a method is given to build it from.

Most methods are one stage (a :class:`Distiller` trained for the run's epochs). Multi-stage methods are a list:
FitNet's hint stage then KD, TAKD's teacher → assistant → student chain, BAN's generations, a teacher pruned before
distillation. Stages may share model objects: a model trained in one stage is the frozen teacher of the next
(:meth:`Distiller.activate` sets ``requires_grad`` when each stage starts).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from kdkernels.distill import task_metrics
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.meta_steps import MetaStep, check_meta_step
from kdkernels.distill.optimisers import check_optimisers
from kdkernels.distill.sources import Source, check_source

BATCHING = ("shuffle", "class_aware", "pairs")


@dataclasses.dataclass
class Stage:
    """One training stage.

    Args:
        name: shown in progress bars and metrics.
        distiller: what trains in this stage.
        epochs: ``None`` for the run's epochs, an int for a fixed count, or a float in (0, 1] for a share of them.
        before: called once when the stage starts (e.g. prune the teacher), before the optimiser is built.
        batching: ``"shuffle"``; ``"class_aware"`` (BAKE: anchors plus same-class samples in each batch);
            ``"pairs"`` (CS-KD: each batch is B anchors followed by B same-class partners).
        batching_options: options of that batching (``intra`` samples per anchor for class_aware).
        lr_scale: this stage's learning rate relative to the run's.
        model_lr_scales: per trainable model, a further factor on its learning rate (SwitOKD trains its online
            teacher at 10× the student's rate, as the official code does).
        optimisers: name -> :class:`~kdkernels.distill.optimisers.Optimiser`: several optimisers, each owning some
            models' and terms' parameters and minimising some terms (min–max training); ``None``: one optimiser over
            every trainable parameter minimising the sum of every term. See :mod:`kdkernels.distill.optimisers`.
        step_plan: with ``optimisers``: ``"alternate"`` (the default), ``"simultaneous"``, or a mapping of
            optimiser name -> turns in a row (``{"discriminator": 1, "student": 5}``).
        source: where the stage's training inputs come from instead of the dataset, e.g. a
            :class:`~kdkernels.distill.sources.GeneratorSource` (data-free KD: a generator model of the distiller,
            trained in the stage); ``None``: the run's training set. See :mod:`kdkernels.distill.sources`.
        meta_step: a :class:`~kdkernels.distill.meta_steps.MetaStep`: hyperparameters of the terms (a learnable
            temperature) updated before each optimiser step by the gradient of a held-out loss through a one-step
            look-ahead of the model, on a split of the training set kept out of the stage's batches. See
            :mod:`kdkernels.distill.meta_steps`.
    """

    name: str
    distiller: Distiller
    epochs: int | float | None = None
    before: Callable[[], None] | None = None
    batching: str = "shuffle"
    batching_options: dict = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0
    model_lr_scales: dict = dataclasses.field(default_factory=dict)
    optimisers: dict | None = None
    step_plan: str | dict | None = None
    source: Source | None = None
    meta_step: MetaStep | None = None

    def __post_init__(self):
        check_optimisers(self.name, self.distiller, self.optimisers, self.step_plan)
        check_source(self.name, self.distiller, self.source)
        check_meta_step(self.name, self.distiller, self.meta_step, optimisers=self.optimisers, source=self.source)
        if self.optimisers is not None and self.model_lr_scales:
            raise ValueError(f"stage {self.name!r}: model_lr_scales does not combine with optimisers; give each "
                             "Optimiser its lr_scale")
        not_trained = sorted(set(self.model_lr_scales) - set(self.distiller.trainable))
        if not_trained:
            raise ValueError(f"stage {self.name!r}: model_lr_scales names models that do not train here: "
                             f"{not_trained}; the trainable models are {list(self.distiller.trainable)}")
        if self.batching not in BATCHING:
            raise ValueError(f"stage {self.name!r}: batching must be one of {BATCHING}, got {self.batching!r}")
        if isinstance(self.epochs, float) and not 0.0 < self.epochs <= 1.0:
            raise ValueError(f"stage {self.name!r}: a fractional epochs must be in (0, 1], got {self.epochs}")

    def epochs_of(self, run_epochs: int) -> int:
        if self.epochs is None:
            return run_epochs
        if isinstance(self.epochs, float):
            return max(1, round(self.epochs * run_epochs))
        return int(self.epochs)


@dataclasses.dataclass
class Recipe:
    """A method's stages; ``student`` is the model the run exports (the last stage's first evaluated model).

    ``metrics``: task metrics (:mod:`kdkernels.distill.task_metrics` names) that belong to the method's evaluation,
    e.g. ``("linear_probe",)`` for a self-supervised method judged by a linear probe of its representation; the run
    evaluates them besides the ones its ``TrainConfig.metrics`` asks for (:meth:`evaluation_metrics`)."""

    method: str
    stages: list[Stage]
    hyperparameters: dict = dataclasses.field(default_factory=dict)
    metrics: tuple[str, ...] = ()

    def __post_init__(self):
        self.metrics = task_metrics.check_names(self.metrics) if self.metrics else ()

    def evaluation_metrics(self, requested) -> tuple[str, ...]:
        """The run's metrics ``requested`` followed by the method's own that are not among them."""
        requested = tuple(requested)
        return requested + tuple(name for name in self.metrics if name not in requested)

    @property
    def student(self) -> nn.Module:
        return self.stages[-1].distiller.model()


@dataclasses.dataclass
class FeaturePoints:
    """Where a model's distillation features are, as tap paths (see :mod:`kdkernels.distill.hooks`).

    stages: the stage outputs, shallow to deep (post-activation), e.g. ``["layer1", "layer2", "layer3"]``.
    embedding: the pooled penultimate feature, usually the classifier's input (``"fc/input"``).
    classifier: the path of the final linear layer.
    pre_activation: the stage outputs before their last ReLU (OFD, AB), when the model exposes them.
    margin_norms: the batch norms before the stage ReLUs, one per ``pre_activation`` tap, whose (γ, β) give OFD's
        margins where the pre-activation value is not that batch norm's output (a residual sum after it, as in the
        CIFAR ResNets: mdistiller's ``get_bn_before_relu``); empty when the ``pre_activation`` taps are the norms.
    attention: a transformer's softmax attention probabilities per block, shallow to deep ([B, heads, tokens,
        tokens], rows summing to 1), where the model has them (the zoo's ViTs); empty otherwise.
    """

    stages: list[str]
    embedding: str
    classifier: str
    pre_activation: list[str] = dataclasses.field(default_factory=list)
    margin_norms: list[str] = dataclasses.field(default_factory=list)
    attention: list[str] = dataclasses.field(default_factory=list)


def feature_points(model: nn.Module) -> FeaturePoints:
    """The model's :class:`FeaturePoints`: its ``kd_points`` attribute, or inferred for torchvision-style ResNets
    (``layer1``..``layer4``, ``fc``). Other models must set ``kd_points`` or pass taps to the method explicitly."""
    points = getattr(model, "kd_points", None)
    if isinstance(points, FeaturePoints):
        return points
    names = {name for name, _ in model.named_children()}
    stages = [f"layer{i}" for i in range(1, 5) if f"layer{i}" in names]
    if stages and "fc" in names:
        return FeaturePoints(stages=stages, embedding="fc/input", classifier="fc")
    raise ValueError(f"cannot tell where the features of {type(model).__name__} are: give the model a `kd_points` "
                     "attribute (kdkernels.distill.FeaturePoints) or pass the tap paths to the method")


@dataclasses.dataclass
class Setup:
    """What a method is built from.

    student: the model to train. teacher / teachers: trained teachers (frozen by the methods that use them).
    num_classes: classes of the task. num_train: training-set size (CRD's memory bank has one slot per sample).
    new_student: builds a fresh, untrained model of the student's architecture (BAN generations, DML peers).
    new_assistant: builds an untrained teacher-assistant (TAKD, DGKD); defaults to new_student.
    """

    student: nn.Module
    num_classes: int
    teacher: nn.Module | None = None
    teachers: list[nn.Module] = dataclasses.field(default_factory=list)
    num_train: int | None = None
    train_labels: torch.Tensor | None = None
    new_student: Callable[[], nn.Module] | None = None
    new_assistant: Callable[[], nn.Module] | None = None

    def __post_init__(self):
        if self.teacher is not None and not self.teachers:
            self.teachers = [self.teacher]
        if self.teacher is None and self.teachers:
            self.teacher = self.teachers[0]

    def require_teacher(self, method: str) -> nn.Module:
        if self.teacher is None:
            raise ValueError(f"method {method!r} distils from a teacher: pass a trained teacher")
        return self.teacher

    def fresh_student(self, method: str) -> nn.Module:
        if self.new_student is None:
            raise ValueError(f"method {method!r} needs new_student (a factory of untrained students)")
        return self.new_student()

    def fresh_assistant(self, method: str) -> nn.Module:
        factory = self.new_assistant or self.new_student
        if factory is None:
            raise ValueError(f"method {method!r} needs new_assistant (a factory of untrained teacher assistants)")
        return factory()
