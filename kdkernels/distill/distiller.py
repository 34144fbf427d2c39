"""The Distiller: named models plus weighted loss terms, one abstraction for every distillation setting.

Offline KD is ``{"student": trainable, "teacher": frozen}``; mutual learning is several trainable peers;
self-distillation is one trainable model whose terms read its own outputs; multi-teacher KD is several frozen
teachers. Terms name the values they read (see :mod:`kdkernels.distill.terms`); the distiller runs each model that
some term reads once per step, captures the hooked features, and sums the weighted terms.

Frozen models run under ``no_grad`` with ``requires_grad`` off and stay in eval mode while the distiller trains,
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

BATCH_KEYS = ("input", "target", "index")


@dataclasses.dataclass
class DistillOutput:
    """One step: the total loss, each term's weighted value (detached), the values read, and the seconds spent in
    the terms' forward."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    values: dict[str, object]
    loss_seconds: float = 0.0


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
    """

    def __init__(self, models: Mapping[str, nn.Module], terms: Sequence[Term], *,
                 trainable: Iterable[str] = ("student",), frozen_train_mode: Iterable[str] = (),
                 evaluate: Sequence[str] | None = None, updates: Mapping[str, ModelUpdate] | None = None):
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
        self._taps = self._register_taps()
        self._built = False

    # ------------------------------------------------------------------------------------------------ structure

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

    def run_models(self, batch: Mapping[str, object]) -> dict[str, object]:
        """Runs every model read by some term on ``batch["input"]`` and returns the values the terms may read."""
        if "input" not in batch:
            raise ValueError(f"the batch has no 'input'; its keys are {list(batch)}")
        values: dict[str, object] = dict(batch)
        for name in self.models_read():
            model = self.models[name]
            grad = name in self.trainable
            with torch.no_grad() if not grad else contextlib.nullcontext():
                output = model(batch) if getattr(model, "takes_batch", False) else model(batch["input"])
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
        losses, total = {}, None
        start = time.perf_counter()
        for term in self.terms:
            loss = term(self._resolve(values, term), context)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"term {term.name!r} must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            losses[term.name] = loss.detach()
            total = loss if total is None else total + loss
        return DistillOutput(total, losses, values, time.perf_counter() - start)

    def forward(self, batch: Mapping[str, object], context: StepContext | None = None) -> DistillOutput:
        if not self._built:
            raise RuntimeError("call Distiller.build(example_batch) once before training: terms size their "
                               "connectors from the features, and the optimiser must see those parameters")
        context = context or StepContext(batch=dict(batch), training=self.training)
        return self.compute_terms(self.run_models(batch), context)

    def build(self, batch: Mapping[str, object]) -> "Distiller":
        """Sizes the terms' connectors from one example batch (models in eval mode, no gradients, no state change
        of batch-norm statistics) and checks that every term's values exist."""
        modes = {name: module.training for name, module in self.named_modules()}
        self.eval()
        try:
            with torch.no_grad():
                values = self.run_models(batch)
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
