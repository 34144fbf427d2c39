"""Loss terms: the weighted pieces a :class:`~kdkernels.distill.Distiller` sums.

A term names the values it reads (``reads``) and returns a scalar. Value names are

* ``"<model>"``: the model's output (its logits; a tuple or dict output gives its first tensor / ``"logits"``);
* ``"<model>:<path>"``: the output of the submodule at ``path``, captured by a forward hook;
* ``"<model>:<path>/input"``: that submodule's first input (e.g. ``"student:fc/input"``, the pooled feature);
* any key of the batch: ``"input"``, ``"target"``, ``"index"``, whatever a sampler adds, and the outputs and labels
  of the distiller's views (``"input_rot"``, ``"rot_label"``, ``"mix_lam"``, …; see :mod:`kdkernels.distill.views`).

Terms compute in float32 with autocast off (AMP runs the models, never the losses). Trainable pieces a method
needs (regressors, embeddings, auxiliary heads) are submodules of its terms, so the distiller optimises and
checkpoints them; state that is not trained (memory banks, normalising constants) lives in buffers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class StepContext:
    """What a term may know about the step besides its inputs."""

    epoch: int = 1              # 1-based epoch of the current stage (DKD's warm-up counts from 1, as mdistiller)
    epochs: int = 1             # epochs of the current stage
    step: int = 0               # optimiser steps taken so far in this stage
    batch: dict = dataclasses.field(default_factory=dict)
    training: bool = True
    mixup: "MixupBatch | None" = None


@dataclasses.dataclass
class MixupBatch:
    """A mixed batch: inputs ``lam·x + (1 − lam)·x[permutation]``; targets are ``target`` and ``target[permutation]``."""

    lam: float
    permutation: torch.Tensor


def float32(value):
    """Floating tensors as float32 (losses run in fp32 under AMP); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32 \
            and value.dtype != torch.float64:
        return value.float()
    return value


class Term(nn.Module):
    """A weighted loss term. Subclasses implement :meth:`loss` and, if they own connectors whose shapes depend on
    the features, :meth:`build`."""

    def __init__(self, name: str, reads: Sequence[str], weight: float = 1.0):
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"a term needs a non-empty name, got {name!r}")
        if isinstance(reads, str) or not reads:
            raise ValueError(f"term {name!r}: reads must be a non-empty sequence of value names, got {reads!r}")
        self.name = name
        self.reads = tuple(reads)
        self.weight = float(weight)

    def build(self, example: dict[str, torch.Tensor]) -> None:
        """Called once before training with example values (same keys as :meth:`loss` reads) to size connectors
        and check shapes. Raise a ValueError naming the term and the values when they cannot work together."""

    def loss(self, *values: torch.Tensor, context: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def weight_at(self, context: StepContext) -> float:
        """The weight at this step (a schedule, such as DKD's warm-up, overrides this)."""
        return self.weight

    def forward(self, values: dict, context: StepContext) -> torch.Tensor:
        inputs = [float32(values[key]) for key in self.reads]
        device_type = next((v.device.type for v in inputs if isinstance(v, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return self.weight_at(context) * self.loss(*inputs, context=context)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, reads={self.reads}, weight={self.weight:g}"


class FunctionTerm(Term):
    """A term from a plain loss function: ``weight · fn(*values, **kwargs)``."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], reads: Sequence[str], weight: float = 1.0,
                 **kwargs):
        super().__init__(name, reads, weight)
        self.fn = fn
        self.kwargs = kwargs

    def loss(self, *values, context):
        return self.fn(*values, **self.kwargs)


class CrossEntropyTerm(Term):
    """``CE(logits, target)`` with optional label smoothing; under MixUp ``lam·CE(y) + (1 − lam)·CE(y[perm])``.

    ``rows`` limits the loss to the first rows of the batch (samplers that append partner samples, e.g. CS-KD).
    ``mixed_by=(lam_key, perm_key)`` reads a mixing view's per-sample weights and partners
    (:class:`~kdkernels.distill.views.MixUp`, :class:`~kdkernels.distill.views.CutMix`: ``("mix_lam", "mix_perm")``)
    and mixes the targets per sample, ``mean_b lam_b·CE(z_b, y_b) + (1 − lam_b)·CE(z_b, y_perm_b)``; the logits
    must be those of the mixed view (``Distiller(inputs={"student": "input_mix"})``).
    """

    def __init__(self, logits: str = "student", weight: float = 1.0, *, name: str | None = None,
                 target: str = "target", label_smoothing: float = 0.0, rows: int | None = None,
                 mixed_by: tuple[str, str] | None = None):
        name = name or f"ce_{logits}"
        if mixed_by is not None and (not isinstance(mixed_by, (tuple, list)) or len(mixed_by) != 2
                                     or not all(isinstance(key, str) and key for key in mixed_by)):
            raise TypeError(f"term {name!r}: mixed_by must be a pair of batch keys (lam, perm), such as "
                            f"('mix_lam', 'mix_perm'), got {mixed_by!r}")
        if mixed_by is not None and rows is not None:
            raise ValueError(f"term {name!r}: mixed_by does not combine with rows (the partners index the whole "
                             "batch)")
        super().__init__(name, (logits, target, *(mixed_by or ())), weight)
        self.label_smoothing = float(label_smoothing)
        self.rows = rows
        self.mixed_by = tuple(mixed_by) if mixed_by is not None else None

    def loss(self, logits, target, *mixing, context):
        if self.rows is not None:
            logits, target = logits[: self.rows], target[: self.rows]
        if mixing:
            lam, permutation = mixing
            own = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
            partner = F.cross_entropy(logits, target[permutation], label_smoothing=self.label_smoothing,
                                      reduction="none")
            lam = lam.to(own.dtype)
            return (lam * own + (1.0 - lam) * partner).mean()
        return mixup_average(lambda y: F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), target,
                             context)


def mixup_average(loss_of, target: torch.Tensor, context: StepContext) -> torch.Tensor:
    """``loss_of(y)``, or under MixUp the mixup criterion ``lam·loss_of(y) + (1 − lam)·loss_of(y[perm])``, for
    losses that take hard labels."""
    if context.mixup is None:
        return loss_of(target)
    lam, permutation = context.mixup.lam, context.mixup.permutation
    return lam * loss_of(target) + (1.0 - lam) * loss_of(target[permutation])


def model_of(key: str) -> str:
    """The model a value name refers to (``"teacher:layer3"`` -> ``"teacher"``)."""
    return key.split(":", 1)[0]


def tap_of(key: str) -> str | None:
    """The hook path of a value name, or None for a model's own output."""
    return key.split(":", 1)[1] if ":" in key else None
