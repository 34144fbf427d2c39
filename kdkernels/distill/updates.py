"""Model updates after the optimiser step: moving-average (EMA) and snapshot copies of a trainable model.

A distiller built with ``updates={"teacher": EMA("student", 0.999)}`` has a model ``"teacher"``: a deep copy of
``"student"`` made when the distiller is built, set to the student's current state when each training stage starts
(:meth:`Distiller.activate <kdkernels.distill.Distiller.activate>`), then updated after every optimiser step. Terms
read it like any frozen model (``"teacher"``, ``"teacher:layer3"``): it runs under ``no_grad`` with ``requires_grad``
off, is in no optimiser, and stays in eval mode unless it is listed in ``frozen_train_mode``. It is a model of the
distiller, so checkpoints hold it, and each update's counter is in the distiller's state dict (its extra state): a
resumed run continues it bit for bit. Under DDP every rank holds the same source after the all-reduced step and
computes the same copy.

* :class:`EMA`: ``target = m · target + (1 − m) · source`` for every parameter after each optimiser step, with a
  constant momentum, BYOL/DINO's cosine schedule from ``m`` to 1, and mean teacher's warm-up
  ``min(1 − 1/(n + 1), m)`` (``n``: the update's number). Buffers (batch-norm statistics) are copied from the source
  by default.
* :class:`Snapshot`: ``target = source`` every ``every`` epochs or steps (snapshot distillation).

Under fp16 the grad scaler skips an optimiser step whose gradients overflow: the source does not change, and EMAs
skip their update too (their counter does not advance); snapshots refresh on their schedule anyway.

The copy does not carry the feature-tap hooks other distillers put on the source (their stored values would be
overwritten by the copy's forward); other hooks (pruning's, weight norm's) are copied with the model.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch
from torch import nn

from kdkernels._validation import Checks
from kdkernels.distill import pruning
from kdkernels.distill.hooks import is_feature_tap

if TYPE_CHECKING:
    from kdkernels.distill.stage import StageRun

SCHEDULES = ("constant", "cosine")
BUFFERS = ("copy", "average", "own")
UNITS = ("epochs", "steps")


@dataclasses.dataclass(frozen=True)
class StepClock:
    """Where an update happens: ``step`` is the 0-based index of the optimiser step just taken in the stage, of
    ``total_steps`` (``steps_per_epoch`` per epoch); ``applied`` is False when the grad scaler skipped it."""

    step: int
    steps_per_epoch: int
    total_steps: int
    applied: bool = True


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's target momentum ``1 − (1 − base) · (cos(π k / K) + 1) / 2`` at step ``k`` (0-based, clamped to ``K``)
    of ``K = total_steps``: ``base`` at k = 0, ``(1 + base) / 2`` at K/2, 1 at K.

    deepmind-research ``byol/utils/schedules.py::target_ema`` (``_cosine_decay`` clamps the step to ``max_steps``),
    used in ``byol/byol_experiment.py::_update_fn`` with the step's 0-based ``global_step``; DINO
    (facebookresearch/dino ``main_dino.py``: ``momentum_schedule = cosine_scheduler(momentum_teacher, 1, epochs,
    len(data_loader))``, read at the 0-based global iteration; ``utils.py::cosine_scheduler``) is the same curve.
    """
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


def copy_of(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without gradients, ``requires_grad`` off, and without the feature taps that
    distillers put on it."""
    result = copy.deepcopy(model)
    for module in result.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items() if is_feature_tap(hook)]:
                del hooks[key]
    for parameter in result.parameters():
        parameter.grad = None
        parameter.requires_grad_(False)
    return result


@torch.no_grad()
def load_state_of(target: nn.Module, source: nn.Module) -> None:
    """``target`` takes ``source``'s parameters and buffers (pruned weights included: a source pruned after the copy
    was made, by a stage's ``before``, is pruned in the copy too)."""
    state = source.state_dict()
    pruning.prepare_pruned_parameters(target, state)
    target.load_state_dict(state)
    pruning.refresh_pruned_weights(target)


def pairs(target: Iterable[tuple[str, torch.Tensor]], source: Iterable[tuple[str, torch.Tensor]]) -> list:
    """(target tensor, source tensor) by name; the two models must have the same tensors."""
    target, source = dict(target), dict(source)
    if target.keys() != source.keys():
        raise ValueError(f"the copy and its source no longer have the same tensors: only in the copy "
                         f"{sorted(target.keys() - source.keys())}, only in the source "
                         f"{sorted(source.keys() - target.keys())}")
    return [(tensor, source[name]) for name, tensor in target.items()]


class ModelUpdate(nn.Module):
    """A rule that keeps a copy of the trainable model ``source`` up to date after each optimiser step. ``count`` is
    the number of updates applied in the current stage (checkpointed as the module's extra state)."""

    def __init__(self, source: str = "student"):
        super().__init__()
        if not isinstance(source, str) or not source:
            Checks(type(self).__name__).type_error("source", "a model name (a non-empty str)", source)
        self.source = source
        self.count = 0

    def start(self, target: nn.Module, source: nn.Module) -> None:
        """When a training stage starts: ``target`` becomes a copy of ``source``; the counter restarts."""
        load_state_of(target, source)
        self.count = 0

    def after_step(self, target: nn.Module, source: nn.Module, clock: StepClock) -> None:
        raise NotImplementedError

    def get_extra_state(self) -> dict:
        return {"count": self.count}

    def set_extra_state(self, state: dict) -> None:
        self.count = int(state["count"])


class EMA(ModelUpdate):
    """An exponential-moving-average copy of the trainable model ``source`` (mean teacher, BYOL / DINO target).

    After each applied optimiser step ``k`` (0-based in the stage, of ``K`` steps; ``n`` = this update's 1-based
    number), for every parameter::

        target = m · target + (1 − m) · source
        m = momentum                                          (schedule="constant")
        m = 1 − (1 − momentum) · (cos(π k / K) + 1) / 2        (schedule="cosine": BYOL / DINO, momentum → 1)
        m = min(1 − 1 / (n + 1), m)                            (warmup=True: mean teacher)

    Mean teacher: CuriousAI/mean-teacher ``pytorch/main.py::update_ema_variables`` (``alpha = min(1 − 1 /
    (global_step + 1), alpha)``; ``ema_param.mul_(alpha).add_(1 − alpha, param)``, called after ``global_step += 1``,
    so ``n`` is the step count including this step; with the warm-up the copy is the true mean of the source's
    states since the stage began). The cosine schedule: :func:`cosine_momentum` (deepmind-research
    ``byol/utils/schedules.py::target_ema``; facebookresearch/dino ``main_dino.py`` with ``utils.py::
    cosine_scheduler``).

    Args:
        source: the trainable model averaged.
        momentum: ``m`` (the base momentum under the cosine schedule), in [0, 1].
        schedule: ``"constant"`` or ``"cosine"``.
        warmup: mean teacher's warm-up ``min(1 − 1/(n + 1), m)``.
        buffers: ``"copy"`` (default: the copy takes the source's buffers, e.g. batch-norm statistics, after each
            update: right for a copy that runs in eval mode); ``"average"`` (floating buffers averaged like the
            parameters, the others copied: timm's ``ModelEmaV3``); ``"own"`` (left alone, as the official mean
            teacher, BYOL and DINO code do: there the copy runs in train mode and its batch norm keeps its own
            statistics; list the copy in the distiller's ``frozen_train_mode``).
    """

    def __init__(self, source: str = "student", momentum: float = 0.999, *, schedule: str = "constant",
                 warmup: bool = False, buffers: str = "copy"):
        super().__init__(source)
        check = Checks("EMA")
        self.momentum = check.probability("momentum", momentum)
        self.schedule = check.choice("schedule", schedule, SCHEDULES)
        self.warmup = check.flag("warmup", warmup)
        self.buffers = check.choice("buffers", buffers, BUFFERS)

    def momentum_at(self, step: int, total_steps: int, update: int) -> float:
        """``m`` of update number ``update`` (1-based) after step ``step`` (0-based) of ``total_steps``."""
        m = cosine_momentum(self.momentum, step, total_steps) if self.schedule == "cosine" else self.momentum
        return min(1.0 - 1.0 / (update + 1), m) if self.warmup else m

    @torch.no_grad()
    def after_step(self, target: nn.Module, source: nn.Module, clock: StepClock) -> None:
        if not clock.applied:
            return
        m = self.momentum_at(clock.step, clock.total_steps, self.count + 1)
        averaged, copied = pairs(target.named_parameters(), source.named_parameters()), []
        if self.buffers != "own":
            for t, s in pairs(target.named_buffers(), source.named_buffers()):
                (averaged if self.buffers == "average" and t.is_floating_point() else copied).append((t, s))
        if averaged:
            targets, sources = [t for t, _ in averaged], [s.detach() for _, s in averaged]
            torch._foreach_mul_(targets, m)
            torch._foreach_add_(targets, sources, alpha=1.0 - m)
        for t, s in copied:
            t.copy_(s)
        self.count += 1

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, momentum={self.momentum:g}, schedule={self.schedule!r}, "
                f"warmup={self.warmup}, buffers={self.buffers!r}")


class Snapshot(ModelUpdate):
    """A frozen copy of the trainable model ``source``, refreshed (``target = source``, parameters and buffers)
    after every ``every``-th epoch or optimiser step of the stage: after step ``k`` (0-based) when
    ``(k + 1) mod P = 0``, ``P = every · steps_per_epoch`` (``unit="epochs"``) or ``every`` (``unit="steps"``).
    Snapshot distillation (Yang et al., CVPR 2019) teaches each mini-generation with the snapshot taken at the end
    of the previous one."""

    def __init__(self, source: str = "student", every: int = 1, unit: str = "epochs"):
        super().__init__(source)
        check = Checks("Snapshot")
        self.every = check.integer("every", every, minimum=1)
        self.unit = check.choice("unit", unit, UNITS)

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the copy refreshes after step ``step`` (0-based)."""
        period = self.every * (steps_per_epoch if self.unit == "epochs" else 1)
        return (step + 1) % period == 0

    def after_step(self, target: nn.Module, source: nn.Module, clock: StepClock) -> None:
        if self.due(clock.step, clock.steps_per_epoch):
            load_state_of(target, source)
            self.count += 1

    def extra_repr(self) -> str:
        return f"source={self.source!r}, every={self.every}, unit={self.unit!r}"


def updated_copies(updates: Mapping[str, ModelUpdate], models: Mapping[str, nn.Module],
                   trainable: Sequence[str]) -> dict[str, nn.Module]:
    """The models a distiller's ``updates`` add (name -> copy of its source), after checking that each is a
    :class:`ModelUpdate` of a trainable model under a new name."""
    if not isinstance(updates, Mapping):
        raise TypeError(f"updates must be a mapping of model name -> EMA or Snapshot, got {type(updates).__name__}")
    copies = {}
    for name, update in updates.items():
        if not isinstance(update, ModelUpdate):
            raise TypeError(f"updates[{name!r}] must be an EMA or Snapshot (a ModelUpdate), got "
                            f"{type(update).__name__}")
        kind = type(update).__name__
        if name in models:
            raise ValueError(f"updates[{name!r}]: the {kind} copy's name {name!r} is already a model of the "
                             f"distiller; the models are {list(models)}: choose another name")
        if name in trainable:
            raise ValueError(f"updates[{name!r}]: model {name!r} is set by its {kind} after each optimiser step, so "
                             f"it cannot also be trainable")
        if update.source not in models:
            raise ValueError(f"updates[{name!r}]: {kind} of unknown source {update.source!r}; the models are "
                             f"{list(models)}")
        if update.source not in trainable:
            raise ValueError(f"updates[{name!r}]: {kind} of the frozen model {update.source!r}: it never changes, so "
                             f"there is nothing to follow; the trainable models are {list(trainable)}")
        source = models[update.source]
        copies[name] = copy_of(source) if isinstance(source, nn.Module) else source   # the distiller names it
    return copies


class ModelUpdates(nn.ModuleDict):
    """A distiller's updates, by the name of the model each one sets (``Distiller.updates``)."""

    def start(self, models: Mapping[str, nn.Module]) -> None:
        """Every copy becomes its source (a training stage starts)."""
        for name, update in self.items():
            update.start(models[name], models[update.source])

    def after_step(self, models: Mapping[str, nn.Module], clock: StepClock) -> None:
        """Every update, after an optimiser step."""
        for name, update in self.items():
            update.after_step(models[name], models[update.source], clock)


def update_models(run: StageRun, applied: bool) -> None:
    """The updates of ``run``'s distiller after its optimiser step number ``run.step`` (before the count moves on);
    ``applied`` is False when the grad scaler skipped the step."""
    distiller = run.distiller
    if len(distiller.updates):
        distiller.updates.after_step(distiller.models, StepClock(run.step, run.steps_per_epoch,
                                                                 run.epochs * run.steps_per_epoch, applied))
