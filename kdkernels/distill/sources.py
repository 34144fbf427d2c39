"""Input sources other than the dataset: a stage whose training inputs come from a generator model (data-free KD),
from a learnable tensor dataset (dataset distillation: :class:`TensorSource` over :class:`SyntheticData`), or from
either of them trained by an earlier stage and frozen in this one (model inversion, then distillation).

    generator = MyGenerator(noise_dim=32)                  # noise [B, 32] -> images [B, 1, 8, 8]
    distiller = Distiller({"student": student, "teacher": teacher, "generator": generator},
                          [GeneratorConfidence(), KDOnGenerated()], trainable=("student", "generator"))
    Stage("data-free", distiller,
          source=GeneratorSource(generator="generator", batch_size=64, noise_dim=32, steps_per_epoch=20),
          optimisers={"generator": Optimiser(models=("generator",), terms=("confidence",)),
                      "student": Optimiser(models=("student",), terms=("kd",))},
          step_plan="simultaneous")

A :class:`GeneratorSource` replaces the dataset of its stage: each micro-batch is ``batch_size`` noise vectors
``z ~ N(0, I)`` fed to the distiller's generator model; the batch the terms and models see is

* ``"input"``: ``generator(noise)``, in the graph of the generator (a term back-propagates into it; a frozen model
  reading a generated input runs with gradients to that input, its parameters staying frozen);
* ``"noise"``: the noise, float32 ``[B, *noise_shape]``;
* ``"index"``: int64 ``[B]``, unique per sample within the stage:
  ``((step · grad_accum + micro) · world_size + rank) · batch_size + position``;

and no ``"target"``: a term that reads labels is refused when the stage is made (as label-free data would fail).

The generator is one of the distiller's models (checkpointed and resumed with them); it runs inside the step's
forward (under autocast and, when data-parallel, inside DDP, so its gradients are averaged). When it is trainable,
the stage trains it (an :class:`~kdkernels.distill.optimisers.Optimiser` may own it); when it is frozen, it is a
fixed sampler: it runs under ``no_grad`` in eval mode (as every frozen model) and its images carry no graph. The
evaluated models are tested on the run's real test split as in any stage; list the student first in ``trainable``
(or set ``evaluate``) so the generator is not.

**Data synthesised by an earlier stage.** Stages share model objects, so a :class:`SyntheticData` (or a generator)
trained by one stage is the frozen source of the next: model inversion optimises the images against a frozen
teacher in a first stage, then a second stage distils the student on them and never reads the training set::

    images = SyntheticData(torch.randn(500, 1, 8, 8), torch.arange(500) % 10)
    invert = Stage("invert", Distiller({"teacher": teacher, "synthetic": images}, inversion_terms,
                                       trainable=("synthetic",), evaluate=("teacher",)),
                   source=TensorSource("synthetic"))
    distil = Stage("distil", Distiller({"student": student, "teacher": teacher, "synthetic": images}, kd_terms),
                   source=TensorSource("synthetic"))              # frozen here: the images stay as stage 1 left them
    recipe = Recipe("inversion", [invert, distil])

**Randomness.** Sample ``b``'s noise is a counter-based hash of (seed, epoch, step, ``index[b]``) (standard normal
by Box–Muller: :class:`~kdkernels.distill.views.Draws` keyed by ``stream_seed(seed, SOURCE_STREAM, epoch, step)``,
computed on the device; the epoch counts across stages, the step is the stage's optimiser step), and the index
holds the micro-batch and the rank: a resumed run draws exactly what the uninterrupted run drew (nothing is saved),
data-parallel ranks draw different noise, and 2 ranks of ``B`` samples draw together what one process with ``2B``
draws (the same indices), so DDP equals one process with the whole batch for a generator without batch statistics.
The global RNGs are neither read nor advanced. A :class:`TensorSource` draws its indices with ``torch.randperm``
from a generator seeded with ``stream_seed(seed, SOURCE_STREAM, epoch, step, micro, rank)``.

An epoch of a source stage is ``steps_per_epoch`` optimiser steps (``grad_accum`` micro-batches each); by default
the batch size is the run's and an epoch has as many steps as an epoch of the run's training set would. The
distiller's views apply to the generated batch (inside the forward, after the generation, drawn from the samples'
indices as for a dataset's batch: an augmented view of a generated image stays in the generator's graph); the
trainer's MixUp does not combine with a source.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from kdkernels._validation import Checks
from kdkernels.distill.environment import SOURCE_STREAM, stream_seed
from kdkernels.distill.views import Draws

if TYPE_CHECKING:
    from kdkernels.distill.distiller import Distiller

SOURCE_KEYS = ("input", "noise", "index")



def check_source_model(where: str, role: str, name: str, distiller: Distiller) -> None:
    """The source's model ``name`` exists and is not evaluated (trainable: the stage trains it; frozen: an earlier
    stage did); else a ValueError naming the stage, the role and the model."""
    if name not in distiller.models:
        raise ValueError(f"{where} names unknown {role} model {name!r}; the models are {list(distiller.models)}")
    if name in distiller.evaluate:
        raise ValueError(f"{where}: the {role} {name!r} is among the evaluated models {list(distiller.evaluate)}; "
                         "list the student first in trainable or set evaluate")


class Source:
    """Where a stage's training inputs come from instead of the dataset (see the module doc)."""

    steps_per_epoch: int | None
    batch_size: int | None

    def resolved(self, batch_size: int, steps_per_epoch: int) -> "Source":
        """The source with the run's batch size and steps per epoch where it leaves them to the run."""
        return self

    def check(self, stage: str, distiller: Distiller) -> None:
        """Raises when the source does not fit the stage's distiller."""

    def request(self, *, seed: int, epoch: int, step: int, micro: int, grad_accum: int, rank: int,
                world_size: int, device: torch.device) -> dict:
        """What the micro-batch ``micro`` of optimiser step ``step`` starts from (drawn, no graph)."""
        raise NotImplementedError

    def generate(self, distiller: Distiller, request: dict) -> dict:
        """The batch the models read, from a request (inside the step's forward: the graph is kept)."""
        raise NotImplementedError


def _positive_int(check: Checks, name: str, value) -> int:
    return check.integer(name, value, minimum=1)


class GeneratorSource(Source):
    """Inputs from a generator model of the distiller: ``batch["input"] = generator(noise)``.

    Args:
        generator: the name of the distiller's generator model (trained in the stage when trainable, else fixed).
        batch_size: noise vectors per micro-batch (per rank under DDP); ``None``: the run's ``batch_size``.
        noise_dim: the noise's shape per sample: an int (``[B, noise_dim]``) or a tuple (``[B, *noise_dim]``).
        steps_per_epoch: optimiser steps in one epoch of the stage; ``None``: as many as an epoch of the run's
            training set has (its shuffled batches of the run's ``batch_size`` on this rank, over ``grad_accum``).
    """

    def __init__(self, generator: str = "generator", batch_size: int | None = None,
                 noise_dim: int | Sequence[int] = 100, steps_per_epoch: int | None = None):
        check = Checks("GeneratorSource")
        self.generator = check.name("generator", generator, "model name")
        self.batch_size = None if batch_size is None else _positive_int(check, "batch_size", batch_size)
        if isinstance(noise_dim, numbers.Integral) and not isinstance(noise_dim, bool):
            shape = (noise_dim,)
        elif isinstance(noise_dim, (tuple, list)):
            shape = tuple(noise_dim)
        else:
            check.type_error("noise_dim", "an int or a tuple of ints", noise_dim)
        self.noise_shape = tuple(_positive_int(check, "noise_dim", size) for size in shape)
        if not self.noise_shape:
            check.value_error("noise_dim", "must name at least one dimension", repr(noise_dim))
        self.steps_per_epoch = None if steps_per_epoch is None \
            else _positive_int(check, "steps_per_epoch", steps_per_epoch)

    def resolved(self, batch_size: int, steps_per_epoch: int) -> "GeneratorSource":
        """This source with the run's values where it has ``None``."""
        return GeneratorSource(self.generator, self.batch_size or batch_size, self.noise_shape,
                               self.steps_per_epoch or steps_per_epoch)

    def __repr__(self) -> str:
        return (f"GeneratorSource(generator={self.generator!r}, batch_size={self.batch_size}, "
                f"noise_dim={self.noise_shape}, steps_per_epoch={self.steps_per_epoch})")

    def check(self, stage: str, distiller: Distiller) -> None:
        where = f"stage {stage!r}: source"
        check_source_model(where, "generator", self.generator, distiller)
        readers = [term.name for term in distiller.terms if "target" in term.reads]
        if readers:
            raise ValueError(f"{where}: terms {readers} read 'target', but generated inputs have no labels (a "
                             f"generator source yields {list(SOURCE_KEYS)})")

    def noise(self, *, seed: int, epoch: int, step: int, index: torch.Tensor) -> torch.Tensor:
        """The noise of the samples ``index`` (int64 ``[B]``), float32 ``[B, *noise_shape]`` on index's device: row
        ``b`` a function of (seed, epoch, step, index[b]) only (see the module doc)."""
        return Draws(stream_seed(seed, SOURCE_STREAM, epoch, step), index).normal(math.prod(self.noise_shape)) \
            .view(index.shape[0], *self.noise_shape)

    def request(self, *, seed, epoch, step, micro=0, grad_accum=1, rank=0, world_size=1, device=None) -> dict:
        first = ((step * grad_accum + micro) * world_size + rank) * self.batch_size
        index = torch.arange(first, first + self.batch_size, dtype=torch.int64, device=device)
        return {"noise": self.noise(seed=seed, epoch=epoch, step=step, index=index), "index": index}

    def generate(self, distiller: Distiller, request: dict) -> dict:
        frozen = self.generator not in distiller.trainable
        with torch.no_grad() if frozen else contextlib.nullcontext():
            images = distiller.models[self.generator](request["noise"])
        if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] != request["noise"].shape[0]:
            raise ValueError(f"the generator {self.generator!r} must return a tensor [B, ...] with one row per noise "
                             f"vector (B = {request['noise'].shape[0]}), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        return {**request, "input": images}


class SyntheticData(nn.Module):
    """A learnable tensor dataset (dataset distillation, model inversion): ``images`` an ``nn.Parameter`` ``[N, ...]``
    (trained by the stage's optimisers when this module is a trainable model of the distiller, fixed when it is
    frozen) and fixed integer ``labels``
    ``[N]`` (a buffer: checkpointed, never trained). ``forward()`` returns the images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        check = Checks("SyntheticData")
        images = check.tensor("images", images)
        labels = check.integers("labels", labels)
        if images.dim() < 1 or images.shape[0] == 0 or not images.is_floating_point():
            check.value_error("images", "must be a non-empty floating-point tensor [N, ...]", images)
        if labels.shape != images.shape[:1]:
            check.value_error("labels", f"must have shape [N] = [{images.shape[0]}] (one label per image)", labels)
        self.images = nn.Parameter(images.detach().clone())
        self.register_buffer("labels", labels.detach().clone().long())

    def __len__(self) -> int:
        return self.images.shape[0]

    def forward(self, *_) -> torch.Tensor:
        return self.images


class TensorSource(Source):
    """Inputs from a learnable tensor dataset: a :class:`SyntheticData` model of the distiller. Each micro-batch
    is ``batch_size`` distinct samples drawn at random (``torch.randperm(N)[:batch_size]`` from a generator seeded
    with ``stream_seed(seed, SOURCE_STREAM, epoch, step, micro, rank)``); the batch is ``"input"`` (the rows of the
    images parameter, in its graph when the data model is trainable: a term back-propagates into the synthetic
    images), ``"target"`` (their fixed
    labels) and ``"index"`` (their positions in the synthetic set, as a dataset's index).

    Args:
        data: the name of the distiller's :class:`SyntheticData` model (its images trained in the stage when it is
            trainable, fixed when it is frozen: a set synthesised by an earlier stage).
        batch_size: samples per micro-batch (at most N); ``None``: the run's ``batch_size`` (capped at N).
        steps_per_epoch: optimiser steps per epoch; ``None``: an epoch of the run's training set.
    """

    def __init__(self, data: str = "synthetic", batch_size: int | None = None, steps_per_epoch: int | None = None):
        check = Checks("TensorSource")
        self.data = check.name("data", data, "model name")
        self.batch_size = None if batch_size is None else _positive_int(check, "batch_size", batch_size)
        self.steps_per_epoch = None if steps_per_epoch is None \
            else _positive_int(check, "steps_per_epoch", steps_per_epoch)
        self.size: int | None = None    # N, known once checked against the distiller

    def __repr__(self) -> str:
        return (f"TensorSource(data={self.data!r}, batch_size={self.batch_size}, "
                f"steps_per_epoch={self.steps_per_epoch})")

    def resolved(self, batch_size: int, steps_per_epoch: int) -> "TensorSource":
        source = TensorSource(self.data, self.batch_size or min(batch_size, self.size or batch_size),
                              self.steps_per_epoch or steps_per_epoch)
        source.size = self.size
        return source

    def check(self, stage: str, distiller: Distiller) -> None:
        where = f"stage {stage!r}: source"
        check_source_model(where, "data", self.data, distiller)
        model = distiller.models[self.data]
        if not isinstance(model, SyntheticData):
            raise TypeError(f"{where}: the data model {self.data!r} must be a SyntheticData, got "
                            f"{type(model).__name__}")
        if self.batch_size is not None and self.batch_size > len(model):
            raise ValueError(f"{where}: batch_size {self.batch_size} is larger than the synthetic set ({len(model)} "
                             "samples; a batch holds distinct samples)")
        self.size = len(model)

    def request(self, *, seed, epoch, step, micro=0, grad_accum=1, rank=0, world_size=1, device=None) -> dict:
        if self.size is None or self.batch_size is None:
            raise ValueError("TensorSource: request() needs the source checked by its Stage and resolved")
        generator = torch.Generator().manual_seed(stream_seed(seed, SOURCE_STREAM, epoch, step, micro, rank))
        index = torch.randperm(self.size, generator=generator)[:self.batch_size]
        return {"index": index if device is None else index.to(device)}

    def generate(self, distiller: Distiller, request: dict) -> dict:
        model = distiller.models[self.data]
        index = request["index"]
        images = model.images[index] if self.data in distiller.trainable else model.images.detach()[index]
        return {**request, "input": images, "target": model.labels[index]}


class SourceLoader:
    """What a source stage iterates over in an epoch: ``steps_per_epoch · grad_accum`` micro-batch requests
    (``{"micro": k}``, k counting within the optimiser step); the draws happen in the step, which knows its number.
    Stands in for the stage's loader and sampler (``set_epoch``, ``len``, a ``generator`` the loop reseeds)."""

    def __init__(self, source: Source, grad_accum: int):
        self.source, self.grad_accum = source, grad_accum
        self.generator = torch.Generator()   # unused: the loop reseeds a loader's generator every epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.source.steps_per_epoch * self.grad_accum

    def __iter__(self):
        for _ in range(self.source.steps_per_epoch):
            for micro in range(self.grad_accum):
                yield {"micro": micro}


def is_request(batch: dict) -> bool:
    return "micro" in batch and "input" not in batch


def check_source(stage: str, distiller: Distiller, source) -> None:
    if source is None:
        return
    if not isinstance(source, Source):
        raise TypeError(f"stage {stage!r}: source must be a Source (e.g. GeneratorSource), got "
                        f"{type(source).__name__}")
    source.check(stage, distiller)
