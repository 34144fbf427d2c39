"""What a training run is asked to do and what it returns: :class:`TrainConfig` (checked when built, each bad
option a ValueError naming it, a TypeError for ``metrics`` of the wrong type) and :class:`RunResult`."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kdkernels.distill import task_metrics
from kdkernels.distill.precision import AMP_DTYPES
from kdkernels.distill.schedules import OPTIMIZERS, SCHEDULES


@dataclasses.dataclass
class TrainConfig:
    """How a recipe is trained.

    epochs: per stage, unless the stage fixes its own (``Stage.epochs``). batch_size: samples per micro-batch
    (per rank under DDP); an optimiser step takes ``grad_accum`` of them. lr: the base learning rate (times the
    stage's ``lr_scale``). schedule: ``"cosine"`` (to 0 over the stage), ``"step"`` (× ``gamma`` every
    ``step_size`` epochs, default a third of the stage), ``"multistep"`` (× ``gamma`` at each epoch of
    ``milestones``) or ``"constant"``; ``warmup_epochs`` (may be fractional) ramps the LR linearly first.
    amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (fp16 uses a GradScaler). mixup_alpha: > 0 enables MixUp with
    ``lam ~ Beta(alpha, alpha)``. device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``. resume: False, True (``out_dir/last.pt`` when it exists) or a checkpoint path.
    stop_after_epochs: leave after this many epochs in this call (all stages counted), with a resumable
    checkpoint: for time-limited jobs. eval_batch_size: batch size of the test-set evaluation. metrics: the task
    metrics of the test-set evaluation, by name (:mod:`kdkernels.distill.task_metrics`): ``"classification"``
    (the default: accuracy, NLL, ECE and, with a teacher, agreement and KL), ``"miou"`` (dense prediction),
    ``"language_model"`` (token accuracy, perplexity), or a name given to ``task_metrics.register``.
    stop_at_step: end the run for good after this many optimiser steps (all stages counted). stop_at_accuracy: end
    it as soon as the exported model's test accuracy (%) reaches this, checked after every optimiser step of the
    last stage (one test-set evaluation per step, not counted in the train time). The LR schedule still spans
    ``epochs``, so the model is the early-stopped state of the full run (a "defective" teacher); the run evaluates
    the model where it stopped and says why in ``RunResult.stopped``. channels_last: the models' 4-D weights and
    the training batches' 4-D inputs in the channels-last memory format (convolutions on tensor cores run in it
    without transposes); ``"auto"``: on CUDA under AMP, where it pays; True or False: always or never. Neither combines with ``resume`` or
    ``stop_after_epochs`` (a stopped run is not continued).
    """

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    step_size: int | None = None
    warmup_epochs: float = 0
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    amp: str = "off"
    mixup_alpha: float = 0.0
    seed: int = 0
    device: str = "auto"
    out_dir: str | os.PathLike | None = None
    checkpoint_every: int = 1
    resume: bool | str | os.PathLike = False
    progress: bool = True
    eval_every: int = 1
    drop_last: bool = False
    num_workers: int = 0
    eval_batch_size: int = 256
    stop_after_epochs: int | None = None
    metrics: Sequence[str] = task_metrics.DEFAULT
    stop_at_step: int | None = None
    stop_at_accuracy: float | None = None
    channels_last: bool | str = "auto"

    def __post_init__(self):
        self.metrics = task_metrics.check_names(self.metrics)
        if self.channels_last not in ("auto", True, False):
            raise ValueError(f"channels_last must be 'auto', True or False, got {self.channels_last!r}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("amp", self.amp, tuple(AMP_DTYPES))
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "eval_every", "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("step_size", "stop_after_epochs", "stop_at_step"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "mixup_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm}")
        if self.stop_at_accuracy is not None:
            if isinstance(self.stop_at_accuracy, bool) or not isinstance(self.stop_at_accuracy, (int, float)):
                raise TypeError(f"stop_at_accuracy must be a number (a test accuracy in %) or None, got "
                                f"{type(self.stop_at_accuracy).__name__}")
            if not 0.0 < self.stop_at_accuracy <= 100.0:
                raise ValueError(f"stop_at_accuracy must be in (0, 100] (a test accuracy in %), got "
                                 f"{self.stop_at_accuracy}")
        stopping = [name for name in ("stop_at_step", "stop_at_accuracy") if getattr(self, name) is not None]
        if stopping and (self.resume is not False or self.stop_after_epochs is not None):
            raise ValueError(f"{stopping[0]} ends a run for good: it cannot be combined with "
                             f"{'resume' if self.resume is not False else 'stop_after_epochs'} (a stopped run is not "
                             "continued)")
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones (the epochs at which the LR is multiplied by "
                             "gamma)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from error


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class RunResult:
    """What :meth:`Trainer.fit` returns. Accuracies are in %, ``None`` without a test set. ``accuracies`` holds the
    last evaluation of each evaluated model of the last stage; ``accuracy`` is the exported model's. ``completed``
    is False when ``stop_after_epochs`` ended the call early. ``nll`` (mean cross-entropy, nats), ``ece`` (expected
    calibration error, a fraction), ``teacher_agreement`` (% top-1 agreement with the teacher) and ``teacher_kl``
    (mean KL(p_t ‖ p_s) at T = 1) are the exported model's at its last evaluation, ``None`` when not measured (no
    test set, no teacher, other task metrics); ``evaluation`` holds every ``test_*`` value of that evaluation.
    ``steps``: the optimiser steps taken in this call (all stages); ``stopped``: ``"step"`` or ``"accuracy"`` when
    ``TrainConfig.stop_at_step`` or ``stop_at_accuracy`` ended the run, else None."""

    method: str
    accuracy: float | None
    best_accuracy: float | None
    accuracies: dict[str, float]
    history: list[dict]
    train_seconds: float
    loss_seconds: float
    loss_share: float
    student: nn.Module
    paths: dict[str, Path]
    completed: bool = True
    nll: float | None = None
    ece: float | None = None
    teacher_agreement: float | None = None
    teacher_kl: float | None = None
    evaluation: dict[str, float | None] = dataclasses.field(default_factory=dict)
    steps: int = 0
    stopped: str | None = None
