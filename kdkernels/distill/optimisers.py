"""Several optimisers in one stage: parameter groups with their own optimiser, learning rate and schedule, and a step
plan for min–max training (student vs. feature discriminator, generator vs. discriminator, data-free generator vs.
student).

    Stage("adv", distiller,
          optimisers={"student": Optimiser(models=("student",), terms=("ce", "kd", "adv_g")),
                      "discriminator": Optimiser(terms_params=("adv_d",), terms=("adv_d",), lr_scale=0.5)},
          step_plan="alternate")

Each :class:`Optimiser` owns the parameters of the trainable models it names (``models``) and of the terms it names
(``terms_params``: connectors, discriminators, heads), and minimises the sum of the terms it names (``terms``); a
term may be minimised by several optimisers. Every trainable parameter of the stage must belong to exactly one
optimiser, and every term must be minimised by at least one. Without ``optimisers`` a stage has today's single
optimiser over every trainable parameter minimising the sum of every term, unchanged.

Step plans (one *turn* = one optimiser step of the stage: ``grad_accum`` micro-batches, one forward each):

* ``"alternate"``: the optimisers in turn, in the mapping's order, one per turn, each turn its own forward;
* ``{"discriminator": 1, "student": k}``: a cycle of turns, each optimiser that many in a row (in the mapping's
  order): one discriminator step, then k student steps, then again;
* ``"simultaneous"``: one forward per turn; every optimiser steps on the gradient of its own terms, computed by a
  separate backward pass over those terms (``torch.autograd.grad`` with respect to its parameters only, so no
  optimiser sees another's terms' gradients). A single backward with a :class:`GradientReversal` layer is the
  other way to train a min–max objective in one pass (the reversed features' gradient flips sign): use one
  optimiser over both sides and a term that reads through :func:`grad_reverse`.

Every term is computed in every turn (the epoch's logged term means stay comparable); only the turn's optimisers'
terms are back-propagated. The learning rate of optimiser ``o`` at the stage's step ``s`` is
``lr · stage.lr_scale · o.lr_scale · factor(s)`` with the run's schedule (:mod:`kdkernels.distill.schedules`): every
optimiser's scheduler advances on every turn, stepped or not, so the curve is the stage's, whatever the plan.
Clipping (``clip_grad_norm``) applies per optimiser to its own parameters. The epoch's ``lr`` column in the metrics is
the first optimiser's.

AMP: each optimiser has its own ``GradScaler`` (active for fp16 alone) that scales only its own loss and unscales
only its own gradients: an overflow in the discriminator's backward skips the discriminator's step and backs off
its scale without skipping the student's, and losses of very different sizes get scales of their own. Checkpoints
hold every optimiser's state, scheduler and scaler (``StageRun.state_dict()["optimisers"]``): a resumed run repeats
the uninterrupted one bit for bit.

DDP: a stage with several optimisers is not wrapped in ``DistributedDataParallel`` (DDP allows one backward per
forward and all-reduces in its backward hooks, which separate per-optimiser backward passes would break). Instead,
after a turn's micro-batches, the stepping optimisers' gradients are averaged over the ranks with one all-reduce per
optimiser (what DDP computes), and the distiller's buffers are broadcast from rank 0 before each forward (as DDP's
``broadcast_buffers``). The graph is the same on every rank, so the same parameters have gradients everywhere.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Mapping

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from kdkernels.distill.distiller import Distiller

STEP_PLANS = ("alternate", "simultaneous")


# ---------------------------------------------------------------------------------------------- gradient reversal

class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def _check_scale(function: str, scale) -> float:
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"{function}: scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{function}: scale must be finite and non-negative, got {scale!r}")
    return float(scale)


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer of Ganin & Lempitsky (2015): the identity forward, ``−scale ×`` the incoming
    gradient backward. A discriminator reading ``grad_reverse(features)`` is trained to tell the features apart
    while the model producing them, in the same backward, is trained to fool it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"grad_reverse: x must be a tensor, got {type(x).__name__}")
    return _GradientReversal.apply(x, _check_scale("grad_reverse", scale))


class GradientReversal(nn.Module):
    """:func:`grad_reverse` as a module: ``GradientReversal(scale)(x)``."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = _check_scale("GradientReversal", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


# ------------------------------------------------------------------------------------------------- configuration

def _names(owner: str, label: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)) \
            or not all(isinstance(name, str) for name in value):
        raise TypeError(f"{owner}: {label} must be a tuple of names (str), got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Optimiser:
    """One optimiser of a stage (see the module doc).

    Args:
        models: the trainable models whose parameters it owns.
        terms: the terms whose (weighted) sum it minimises.
        terms_params: the terms whose parameters (connectors, discriminators, heads) it owns.
        lr_scale: its learning rate relative to the stage's (the run's ``lr · stage.lr_scale``).
    """

    models: tuple = ()
    terms: tuple = ()
    terms_params: tuple = ()
    lr_scale: float = 1.0

    def __post_init__(self):
        for label in ("models", "terms", "terms_params"):
            object.__setattr__(self, label, _names("Optimiser", label, getattr(self, label)))
        object.__setattr__(self, "lr_scale", _check_lr_scale(self.lr_scale))


def _check_lr_scale(value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"Optimiser: lr_scale must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Optimiser: lr_scale must be positive and finite, got {value!r}")
    return float(value)


def check_optimisers(stage: str, distiller: Distiller, optimisers, step_plan) -> None:
    """Checks a stage's ``optimisers`` and ``step_plan`` by name (the parameters are checked when the stage starts,
    after the distiller is built: :func:`optimiser_parameters`)."""
    where = f"stage {stage!r}"
    if optimisers is None:
        if step_plan is not None:
            raise ValueError(f"{where}: step_plan needs optimisers (a stage without them has one optimiser)")
        return
    if not isinstance(optimisers, Mapping):
        raise TypeError(f"{where}: optimisers must be a mapping of name -> Optimiser, got "
                        f"{type(optimisers).__name__}")
    if not optimisers:
        raise ValueError(f"{where}: optimisers is empty; leave it out for the single default optimiser")
    term_names = [term.name for term in distiller.terms]
    owners: dict[tuple[str, str], str] = {}
    minimised: set[str] = set()
    for name, optimiser in optimisers.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: optimiser names must be non-empty str, got {name!r}")
        if not isinstance(optimiser, Optimiser):
            raise TypeError(f"{where}: optimisers[{name!r}] must be an Optimiser, got {type(optimiser).__name__}")
        label = f"{where}: optimiser {name!r}"
        if not optimiser.models and not optimiser.terms_params:
            raise ValueError(f"{label} names no parameter: give it models and/or terms_params")
        if not optimiser.terms:
            raise ValueError(f"{label} minimises no term: give it terms (of {term_names})")
        for model in optimiser.models:
            if model not in distiller.models:
                raise ValueError(f"{label}: models names unknown model {model!r}; the models are "
                                 f"{list(distiller.models)}")
            if model not in distiller.trainable:
                raise ValueError(f"{label}: models names {model!r}, which does not train in this stage; the "
                                 f"trainable models are {list(distiller.trainable)}")
        for label_name in ("terms", "terms_params"):
            for term in getattr(optimiser, label_name):
                if term not in term_names:
                    raise ValueError(f"{label}: {label_name} names unknown term {term!r}; the terms are {term_names}")
        for kind, owned in (("model", optimiser.models), ("term", optimiser.terms_params)):
            for item in owned:
                other = owners.setdefault((kind, item), name)
                if other != name:
                    raise ValueError(f"{where}: the parameters of {kind} {item!r} are in two optimisers, {other!r} "
                                     f"and {name!r}")
        minimised.update(optimiser.terms)
    missing = [term for term in term_names if term not in minimised]
    if missing:
        raise ValueError(f"{where}: terms {missing} are in no optimiser's terms; every term must be minimised by "
                         f"one")
    plan_turns(stage, list(optimisers), step_plan)


def plan_turns(stage: str, names: list[str], step_plan) -> list[tuple[str, ...]]:
    """The cycle of turns of a step plan: the optimisers that step at stage step ``s`` are ``turns[s % len]``."""
    where = f"stage {stage!r}"
    if step_plan is None or step_plan == "alternate":
        return [(name,) for name in names]
    if step_plan == "simultaneous":
        return [tuple(names)]
    if isinstance(step_plan, str):
        raise ValueError(f"{where}: unknown step_plan {step_plan!r}; use one of {STEP_PLANS} or a mapping of "
                         "optimiser name -> steps in a row")
    if not isinstance(step_plan, Mapping):
        raise TypeError(f"{where}: step_plan must be one of {STEP_PLANS} or a mapping of optimiser name -> steps, "
                        f"got {type(step_plan).__name__}")
    if set(step_plan) != set(names):
        raise ValueError(f"{where}: step_plan must name every optimiser once: it names {list(step_plan)}, the "
                         f"optimisers are {names}")
    turns = []
    for name, count in step_plan.items():
        if not isinstance(count, numbers.Integral) or isinstance(count, bool):
            raise TypeError(f"{where}: step_plan[{name!r}] must be an int, got {type(count).__name__}")
        if count < 1:
            raise ValueError(f"{where}: step_plan[{name!r}] must be at least 1, got {count}")
        turns.extend([(name,)] * int(count))
    return turns


def optimiser_parameters(stage: str, distiller: Distiller, optimisers: Mapping[str, Optimiser]
                         ) -> dict[str, list[nn.Parameter]]:
    """Each optimiser's parameters (those with ``requires_grad``, each once), after the distiller is built and
    activated. A ValueError when an optimiser owns no parameter, a parameter is in two optimisers (a module shared
    between two owners) or a trainable parameter is in none."""
    where = f"stage {stage!r}"
    terms = {term.name: term for term in distiller.terms}
    owner: dict[int, str] = {}
    result: dict[str, list[nn.Parameter]] = {}
    for name, optimiser in optimisers.items():
        modules = [distiller.models[m] for m in optimiser.models] + [terms[t] for t in optimiser.terms_params]
        params, seen = [], set()
        for module in modules:
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    params.append(parameter)
                    other = owner.setdefault(id(parameter), name)
                    if other != name:
                        raise ValueError(f"{where}: a parameter is in two optimisers, {other!r} and {name!r} (a "
                                         "module shared between their models or terms)")
        if not params:
            raise ValueError(f"{where}: optimiser {name!r} names no parameter that trains: its models "
                             f"{list(optimiser.models)} and terms_params {list(optimiser.terms_params)} have none")
        result[name] = params
    unowned = [label for label, module in [*((f"model {m!r}", distiller.models[m]) for m in distiller.trainable),
                                           *((f"term {t.name!r}", t) for t in distiller.terms)]
               if any(p.requires_grad and id(p) not in owner for p in module.parameters())]
    if unowned:
        raise ValueError(f"{where}: the parameters of {unowned} are in no optimiser; name them in an optimiser's "
                         "models or terms_params")
    return result


# -------------------------------------------------------------------------------------------------------- DDP

def broadcast_buffers(module: nn.Module, world_size: int) -> None:
    """Rank 0's buffers to every rank (DDP's ``broadcast_buffers``)."""
    if world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """The parameters' gradients averaged over the ranks, in one flat all-reduce (parameters without a gradient,
    the same on every rank, are left out)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
