"""The Distiller: named models plus weighted loss terms, one abstraction for every distillation setting.

Offline KD is ``{"student": trainable, "teacher": frozen}``; mutual learning is several trainable peers;
self-distillation is one trainable model whose terms read its own outputs; multi-teacher KD is several frozen
teachers. Terms name the values they read (see :mod:`kdkernels.distill.terms`); the distiller runs each model that
some term reads once per step, captures the hooked features, and sums the weighted terms.

Each model reads one batch key, ``"input"`` unless the distiller's ``inputs`` names another (a teacher on one view
or modality teaching a student on another: privileged and cross-modal KD), or :data:`BATCH`, the whole batch (the
cached teacher of :mod:`kdkernels.distill.cache`, which looks its rows up by ``batch["index"]``). A model class may
declare its own default in a ``distill_input`` attribute (``CachedTeacher.distill_input = BATCH``); ``inputs``
overrides it. The distiller's ``views`` (:mod:`kdkernels.distill.views`) add the transformed inputs such keys name:
the trainer applies them to every training batch (:meth:`Distiller.apply_views`) before the models run; evaluation
runs them in evaluation mode (:meth:`Distiller.evaluation_input`).

Frozen models run under ``no_grad`` (unless their input requires grad: generated inputs of
:mod:`kdkernels.distill.sources`) with ``requires_grad`` off and stay in eval mode while the distiller trains,
unless listed in ``frozen_train_mode`` (OFD and SSLD keep the teacher's batch norm in train mode, as the official
code does). Trainable models and every term's parameters (connectors, embeddings, heads) are what
:meth:`trainable_parameters` returns and what the state dict holds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from kdkernels.distill.hooks import FeatureTaps, as_tensor
from kdkernels.distill.terms import StepContext, Term, model_of, tap_of
from kdkernels.distill.updates import ModelUpdate, ModelUpdates, updated_copies
from kdkernels.distill.views import View, apply_views, check_views

BATCH_KEYS = ("input", "target", "index")
BATCH = "batch"      # a model input that is the whole batch (dict), not one of its keys
DEFAULT_INPUT = "input"


def model_input(batch: Mapping[str, object], key: str, model: str = "model") -> object:
    """What a model reading ``key`` gets from ``batch``: ``batch[key]``, or the batch itself for :data:`BATCH`."""
    if key == BATCH:
        return batch
    if key not in batch:
        raise ValueError(f"model {model!r} reads batch key {key!r}, which the batch does not have; the batch's keys "
                         f"are {sorted(batch)}")
    return batch[key]


def default_input(model: nn.Module) -> str:
    """The batch key a model reads unless the distiller's ``inputs`` says otherwise: its ``distill_input``
    attribute, else ``"input"``."""
    return getattr(model, "distill_input", DEFAULT_INPUT)


@dataclasses.dataclass
class DistillOutput:
    """One step: the total loss, each term's weighted value (detached), the values read, the seconds spent in the
    terms' forward, and each term's weighted value in the graph (what a stage with several optimisers
    back-propagates per optimiser)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    values: dict[str, object]
    loss_seconds: float = 0.0
    term_losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)   # not detached


class Distiller(nn.Module):
    """Named models and loss terms.

    Args:
        models: name -> module. Names must not be batch keys (``input``, ``target``, ``index``) nor contain ``:``.
        terms: the loss terms; their names must be distinct.
        trainable: names of the models that learn (default: ``("student",)``).
        frozen_train_mode: frozen models that stay in train mode while the distiller trains.
        evaluate: names of the models whose accuracy the trainer reports, first = the one exported
            (default: the first trainable model).
        updates: name -> :class:`~kdkernels.distill.updates.EMA` or ``Snapshot``: frozen copies of a trainable
            model, added as models under these names and updated after each optimiser step.
        inputs: model name -> the batch key it reads (or :data:`BATCH`, the whole batch); models not named read
            their ``distill_input`` attribute, else ``"input"``.
        views: the :class:`~kdkernels.distill.views.View` list the trainer applies, in order, to every training
            batch (their draws keyed by the run's seed, epoch, step and each sample's index). :meth:`forward` and
            :meth:`run_models` take the batch as given: outside the trainer call :meth:`apply_views` first.
    """

    def __init__(self, models: Mapping[str, nn.Module], terms: Sequence[Term], *,
                 trainable: Iterable[str] = ("student",), frozen_train_mode: Iterable[str] = (),
                 evaluate: Sequence[str] | None = None, updates: Mapping[str, ModelUpdate] | None = None,
                 inputs: Mapping[str, str] | None = None, views: Sequence[View] = ()):
        super().__init__()
        if not models:
            raise ValueError("a Distiller needs at least one model")
        trainable, updates = tuple(trainable), {} if updates is None else updates
        models = {**models, **updated_copies(updates, models, trainable)}
        for name, model in models.items():
            if not isinstance(model, nn.Module):
                raise TypeError(f"model {name!r} must be an nn.Module, got {type(model).__name__}")
            if not name or ":" in name or "." in name or name in BATCH_KEYS:
                raise ValueError(f"model name {name!r} is not allowed: names must be non-empty, without ':' or '.', "
                                 f"and not one of the batch keys {BATCH_KEYS}")
        self.models = nn.ModuleDict(dict(models))
        self.updates = ModelUpdates(updates)
        self.trainable = tuple(trainable)
        self.frozen_train_mode = tuple(frozen_train_mode)
        for label, names in (("trainable", self.trainable), ("frozen_train_mode", self.frozen_train_mode)):
            unknown = [name for name in names if name not in self.models]
            if unknown:
                raise ValueError(f"{label} names unknown models {unknown}; the models are {list(self.models)}")
        if not self.trainable and not any(any(True for _ in t.parameters()) for t in terms):
            raise ValueError("nothing to train: no trainable model and no term with parameters")
        self.evaluate = tuple(evaluate) if evaluate is not None else self.trainable[:1]
        names = [term.name for term in terms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"term names must be distinct; repeated: {duplicates}")
        self.terms = nn.ModuleList(terms)
        self.inputs = self._check_inputs(inputs)
        self.views = check_views(views, reserved=(*self.models, BATCH))
        self._taps = self._register_taps()
        self._built = False

    # ------------------------------------------------------------------------------------------------ structure

    def _check_inputs(self, inputs: Mapping[str, str] | None) -> dict[str, str]:
        """The batch key of every model: ``inputs``, else the model's ``distill_input``, else ``"input"``."""
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, Mapping):
            raise TypeError(f"Distiller: inputs must be a mapping of model name -> batch key, got "
                            f"{type(inputs).__name__}")
        unknown = [name for name in inputs if name not in self.models]
        if unknown:
            raise ValueError(f"Distiller: inputs names unknown models {unknown}; the models are {list(self.models)}")
        result = {}
        for name, model in self.models.items():
            key = inputs.get(name, default_input(model))
            if not isinstance(key, str) or not key:
                raise TypeError(f"Distiller: the input of model {name!r} must be a batch key (a non-empty str) or "
                                f"BATCH, got {key!r}")
            result[name] = key
        return result

    def _reads(self) -> list[str]:
        return [key for term in self.terms for key in term.reads]

    def _register_taps(self) -> dict[str, FeatureTaps]:
        paths: dict[str, set[str]] = {name: set() for name in self.models}
        for term in self.terms:
            for key in term.reads:
                model, tap = model_of(key), tap_of(key)
                if tap is not None:
                    if model not in self.models:
                        raise ValueError(f"term {term.name!r} reads {key!r}, but there is no model {model!r}; "
                                         f"the models are {list(self.models)}")
                    paths[model].add(tap)
        return {name: FeatureTaps(self.models[name], taps, name) for name, taps in paths.items() if taps}

    def models_read(self) -> list[str]:
        """The models some term reads (only these run in a step)."""
        wanted = {model_of(key) for key in self._reads()}
        return [name for name in self.models if name in wanted]

    def is_trainable(self, name: str) -> bool:
        return name in self.trainable

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trainable models and of every term (connectors), each once."""
        seen, result = set(), []
        modules = [self.models[name] for name in self.trainable] + list(self.terms)
        for module in modules:
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    result.append(parameter)
        return result

    def parameter_groups(self, lr: float, model_lr_scales: dict[str, float] | None = None) -> list[dict]:
        """Optimiser parameter groups of :meth:`trainable_parameters`: one at ``lr``, plus one per model listed in
        ``model_lr_scales`` at ``lr · scale``."""
        scales = model_lr_scales or {}
        scaled = {id(p): name for name in scales for p in self.models[name].parameters()}
        groups: dict[str | None, list[nn.Parameter]] = {}
        for parameter in self.trainable_parameters():
            groups.setdefault(scaled.get(id(parameter)), []).append(parameter)
        return [{"params": params, "lr": lr * (scales[name] if name is not None else 1.0)}
                for name, params in groups.items()]

    def model(self, name: str | None = None) -> nn.Module:
        """A model by name; by default the first evaluated one (the student)."""
        return self.models[name or self.evaluate[0]]

    def activate(self) -> "Distiller":
        """Sets ``requires_grad`` per role and sets the updated copies to their sources (call when a training stage
        starts: a model trained in one stage may be a frozen teacher in the next)."""
        for name, model in self.models.items():
            model.requires_grad_(name in self.trainable)
        self.updates.start(self.models)
        return self

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for name, model in self.models.items():
            if name not in self.trainable:
                model.train(mode and name in self.frozen_train_mode)
        return self

    # -------------------------------------------------------------------------------------------------- running

    def model_input(self, name: str, batch: Mapping[str, object]) -> object:
        """What model ``name`` reads from ``batch`` (its key of ``inputs``; the whole batch for :data:`BATCH`)."""
        key = self.inputs[name]
        try:
            return model_input(batch, key, name)
        except ValueError as error:
            if any(key in view.keys() for view in self.views):
                raise ValueError(f"{error} ({key!r} is written by the distiller's views: apply them first with "
                                 "Distiller.apply_views)") from None
            raise

    def apply_views(self, batch: Mapping[str, object], *, seed: int = 0, epoch: int = 0,
                    step: int = 0) -> dict:
        """``batch`` with the views' outputs added, drawn for (seed, epoch, step) and each sample's index (see
        :mod:`kdkernels.distill.views`); the batch itself (copied) without views."""
        return apply_views(self.views, batch, seed=seed, epoch=epoch, step=step) if self.views else dict(batch)

    def evaluation_input(self, name: str, batch: Mapping[str, object]) -> object:
        """What model ``name`` reads from a test batch: the views applied in evaluation mode (random ones are the
        identity), then :meth:`model_input`."""
        if self.views:
            batch = apply_views(self.views, batch, training=False)
        return self.model_input(name, batch)

    def run_models(self, batch: Mapping[str, object]) -> dict[str, object]:
        """Runs every model read by some term on its input (:meth:`model_input`) and returns the values the terms
        may read."""
        values: dict[str, object] = dict(batch)
        for name in self.models_read():
            model = self.models[name]
            inputs = self.model_input(name, batch)
            # A frozen model runs without gradients, unless its input is in a graph (generated inputs: a term may
            # back-propagate through the frozen model into the generator; its own parameters stay frozen).
            grad = name in self.trainable or (isinstance(inputs, torch.Tensor) and inputs.requires_grad)
            with torch.no_grad() if not grad else contextlib.nullcontext():
                output = model(inputs)
            values[name] = output
            if name in self._taps:
                for tap, value in self._taps[name].pop().items():
                    values[f"{name}:{tap}"] = value
        return values

    def _resolve(self, values: dict[str, object], term: Term) -> dict[str, object]:
        resolved = {}
        for key in term.reads:
            if key not in values:
                available = sorted(k for k in values if not k.startswith("_"))
                raise ValueError(f"term {term.name!r} reads {key!r}, which this step does not provide; "
                                 f"available values: {available}")
            value = values[key]
            resolved[key] = as_tensor(value, key) if model_of(key) in self.models else value
        return resolved

    def compute_terms(self, values: dict[str, object], context: StepContext) -> DistillOutput:
        losses, live, total = {}, {}, None
        start = time.perf_counter()
        for term in self.terms:
            loss = term(self._resolve(values, term), context)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"term {term.name!r} must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            losses[term.name] = loss.detach()
            live[term.name] = loss
            total = loss if total is None else total + loss
        return DistillOutput(total, losses, values, time.perf_counter() - start, live)

    def forward(self, batch: Mapping[str, object], context: StepContext | None = None) -> DistillOutput:
        if not self._built:
            raise RuntimeError("call Distiller.build(example_batch) once before training: terms size their "
                               "connectors from the features, and the optimiser must see those parameters")
        context = context or StepContext(batch=dict(batch), training=self.training)
        return self.compute_terms(self.run_models(batch), context)

    def build(self, batch: Mapping[str, object]) -> "Distiller":
        """Sizes the terms' connectors from one example batch as the data yields it (the views are applied, drawn for
        seed, epoch and step 0; models in eval mode, no gradients, no state change of batch-norm statistics) and
        checks that every model's input and every term's values exist."""
        modes = {name: module.training for name, module in self.named_modules()}
        self.eval()
        try:
            with torch.no_grad():
                values = self.run_models(self.apply_views(batch))
            for term in self.terms:
                term.build(self._resolve(values, term))
        finally:
            for name, module in self.named_modules():
                if name in modes:
                    module.train(modes[name])
        self._built = True
        return self

    def close(self) -> None:
        """Removes the forward hooks from the models."""
        for taps in self._taps.values():
            taps.remove()
        self._taps = {}
