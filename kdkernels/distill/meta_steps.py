"""Meta-steps in training: hyperparameters (a learnable temperature, loss weights) updated in every optimiser step by
the gradient of a held-out loss through a one-step look-ahead of the trained model.

::

    Stage("mkd", distiller, meta_step=MetaStep(hyperparameters=("kd.log_temperature",), held_out=0.1, lr=1e-3))

Before the model's own optimiser step ``s``, the meta-step

1. takes the step's training batch ``x`` (every micro-batch of the step, on every rank: the global batch, with the
   distiller's views applied) and looks the model ahead by one plain SGD step on the inner loss, the weighted sum of
   the ``terms`` (default: every term of the distiller; they may read tapped features, the looked-ahead model's
   captured by the distiller's hooks in its forward with the fast parameters) at the current hyperparameters ``φ``:
   ``θ'(φ) = θ − η·∇_θ L_inner(θ, φ; x)``, ``η`` the model's current learning rate
   (:func:`kdkernels.distill.meta.unroll`, second order unless ``first_order``);
2. computes the outer loss ``L_outer = CE(f(x_h; θ'(φ)), y_h)`` on a held-out batch ``(x_h, y_h)``, the model in
   eval mode (running statistics: a sample's output does not depend on its batch);
3. steps the hyperparameters' own optimiser (Adam by default, ``lr``, no schedule) on ``∂L_outer/∂φ``.

Then the model's own step runs as usual, its loss at the updated ``φ``. The hyperparameters are parameters of the
distiller's terms (``"<term name>.<parameter name>"``): the checkpoint holds them with the distiller, they are left out
of the stage's optimiser (and of gradient clipping), and only the meta-step changes them.

**The held-out split.** ``held_out`` (a share in (0, 1) or a number of samples) of the training set is kept out of
the stage's training batches: drawn once from the run's seed, per class (each class gives its share, the remainder
going to the classes with the largest fractions; the outer loss needs the labels). Each meta-step's held-out batch is
``batch_size × world_size`` samples (at most the split's size) drawn without replacement from (seed, epoch, step), so
a resumed run and every rank draw the same; each rank takes its equal share of it.

**DDP.** Every rank gathers the step's training micro-batches of all ranks (the look-ahead is the same step as one
process on the whole batch), computes the outer loss on its share of the held-out batch and the meta-gradients are
averaged over the ranks (:func:`~kdkernels.distill.optimisers.average_gradients`): every rank takes the same
hyperparameter step, that of one process with the whole batch.

**AMP.** The meta-step runs in float32 (no autocast): the second derivatives of a one-step look-ahead are cheap for
the models it is meant for, and fp16 Hessian-vector products overflow easily.

**Checkpoints.** The meta optimiser's state is in the stage's state (``StageRun.state_dict()["meta_step"]``); the
held-out draws are functions of (seed, epoch, step): a resumed run repeats the uninterrupted one bit for bit.

The inner loss must be twice differentiable (torch ops): :func:`~kdkernels.distill.meta.unroll` refuses kdkernels'
fused losses (differentiable once) unless ``first_order=True``, under which a hyperparameter that only the inner loss
reads gets no gradient, which :func:`~kdkernels.distill.meta.meta_gradient` reports. A stage with a meta-step has one
optimiser (not ``optimisers``), trains on the dataset (not a ``source``), and the meta-step ignores the trainer's MixUp.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate

from kdkernels.distill import meta
from kdkernels.distill.batches import to_device
from kdkernels.distill.distiller import BATCH, Distiller
from kdkernels.distill.environment import META_STREAM, Environment, all_gather_objects, stream_seed
from kdkernels.distill.hooks import as_tensor
from kdkernels.distill.optimisers import average_gradients
from kdkernels.distill.terms import StepContext, model_of

if TYPE_CHECKING:
    from kdkernels.distill.config import TrainConfig
    from kdkernels.distill.stage import StageRun

OPTIMISERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class MetaStep:
    """A stage's meta-step (see the module doc).

    Args:
        hyperparameters: the learned tensors, ``"<term name>.<parameter name>"`` (parameters of the distiller's terms
            that exist when the stage is made).
        held_out: the held-out split: a share of the training set in (0, 1), or a number of samples (an int >= 1).
        lr: the hyperparameters' optimiser's learning rate (constant).
        optimiser: ``"adam"`` (``torch.optim.Adam``) or ``"sgd"`` (plain ``torch.optim.SGD``).
        model: the trainable model looked ahead.
        terms: the terms of the inner loss (default: every term of the distiller); they read the models' outputs,
            their tapped features (``"student:layer3"``: the looked-ahead model's are those of its functional forward
            with the fast parameters, the other models' are computed once without gradients) and batch keys.
        first_order: detach the inner gradient (no second derivatives; see :func:`kdkernels.distill.meta.unroll`).
    """

    hyperparameters: tuple = ()
    held_out: float | int = 0.1
    lr: float = 1e-3
    optimiser: str = "adam"
    model: str = "student"
    terms: tuple | None = None
    first_order: bool = False

    def __post_init__(self):
        names = self.hyperparameters
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not names \
                or not all(isinstance(n, str) and "." in n for n in names):
            raise TypeError(f"MetaStep: hyperparameters must be a non-empty tuple of '<term>.<parameter>' names, got "
                            f"{names!r}")
        object.__setattr__(self, "hyperparameters", tuple(names))
        held = self.held_out
        if isinstance(held, bool) or not isinstance(held, numbers.Real):
            raise TypeError(f"MetaStep: held_out must be a share in (0, 1) or a number of samples, got {held!r}")
        if isinstance(held, numbers.Integral):
            if held < 1:
                raise ValueError(f"MetaStep: held_out as a number of samples must be at least 1, got {held}")
        elif not 0.0 < held < 1.0:
            raise ValueError(f"MetaStep: held_out as a share must be in (0, 1), got {held!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not (
                math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"MetaStep: lr must be positive and finite, got {self.lr!r}")
        if self.optimiser not in OPTIMISERS:
            raise ValueError(f"MetaStep: optimiser must be one of {OPTIMISERS}, got {self.optimiser!r}")
        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"MetaStep: model must be a model name, got {self.model!r}")
        if self.terms is not None:
            if isinstance(self.terms, str) or not isinstance(self.terms, (tuple, list)) or not self.terms:
                raise TypeError(f"MetaStep: terms must be None or a non-empty tuple of term names, got {self.terms!r}")
            object.__setattr__(self, "terms", tuple(self.terms))
        if not isinstance(self.first_order, bool):
            raise TypeError(f"MetaStep: first_order must be a bool, got {self.first_order!r}")


def check_meta_step(stage: str, distiller: Distiller, meta_step, *, optimisers, source) -> None:
    """Checks a stage's ``meta_step`` against its distiller by name (the parameters again when the stage starts)."""
    if meta_step is None:
        return
    where = f"stage {stage!r}"
    if not isinstance(meta_step, MetaStep):
        raise TypeError(f"{where}: meta_step must be a MetaStep, got {type(meta_step).__name__}")
    if optimisers is not None:
        raise ValueError(f"{where}: a meta_step needs the stage's single optimiser; it does not combine with "
                         "optimisers")
    if source is not None:
        raise ValueError(f"{where}: a meta_step holds out part of the training set; it does not combine with a source")
    if meta_step.model not in distiller.trainable:
        raise ValueError(f"{where}: the meta_step looks ahead model {meta_step.model!r}, which does not train here; "
                         f"the trainable models are {list(distiller.trainable)}")
    terms = {term.name: term for term in distiller.terms}
    for name in meta_step.terms or ():
        if name not in terms:
            raise ValueError(f"{where}: the meta_step's terms name unknown term {name!r}; the terms are {list(terms)}")
    hyperparameters(stage, distiller, meta_step)


def tapped_features(distiller: Distiller, name: str) -> dict[str, torch.Tensor]:
    """The features the distiller's forward hooks captured in model ``name``'s latest forward (a functional call with
    fast parameters included), as ``"<model>:<tap>"`` values; the hooks' store is cleared."""
    taps = getattr(distiller, "_taps", {}).get(name)
    if taps is None:
        return {}
    return {f"{name}:{tap}": as_tensor(value, f"{name}:{tap}") for tap, value in taps.pop().items()}


def inner_terms(distiller: Distiller, meta_step: MetaStep) -> list:
    names = meta_step.terms
    return [term for term in distiller.terms if names is None or term.name in names]


def hyperparameters(stage: str, distiller: Distiller, meta_step: MetaStep) -> dict[str, nn.Parameter]:
    """The named hyperparameters: parameters of the distiller's terms, each once."""
    terms = {term.name: term for term in distiller.terms}
    result = {}
    for name in meta_step.hyperparameters:
        term_name, parameter = name.split(".", 1)
        if term_name not in terms:
            raise ValueError(f"stage {stage!r}: meta_step hyperparameter {name!r} names unknown term {term_name!r}; "
                             f"the terms are {list(terms)}")
        own = dict(terms[term_name].named_parameters())
        if parameter not in own:
            raise ValueError(f"stage {stage!r}: meta_step hyperparameter {name!r} is not a parameter of term "
                             f"{term_name!r}; its parameters are {sorted(own)}")
        if name in result or any(p is own[parameter] for p in result.values()):
            raise ValueError(f"stage {stage!r}: meta_step hyperparameter {name!r} is named twice")
        result[name] = own[parameter]
    return result


# --------------------------------------------------------------------------------------------- held-out split

def held_out_indices(num_samples: int, labels: np.ndarray | None, held_out: float | int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), both sorted: ``held_out`` (a share or a count) of ``num_samples`` drawn
    from ``seed``, per class when there are labels (largest-remainder counts)."""
    total = round(held_out * num_samples) if isinstance(held_out, float) else int(held_out)
    if not 0 < total < num_samples:
        raise ValueError(f"meta_step: held_out {held_out!r} of {num_samples} training samples leaves "
                         f"{total} held out and {num_samples - total} to train on; both must be at least 1")
    rng = np.random.default_rng(stream_seed(seed, META_STREAM))
    if labels is None:
        held = rng.permutation(num_samples)[:total]
    else:
        classes, sizes = np.unique(labels, return_counts=True)
        exact = sizes * total / num_samples
        counts = np.floor(exact).astype(int)
        for c in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
            counts[c] += 1
        held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, counts)])
    mask = np.zeros(num_samples, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_training_set(meta_step: MetaStep | None, train_set: Dataset, labels: np.ndarray | None, seed: int
                       ) -> tuple[Dataset, np.ndarray | None, Dataset | None]:
    """The stage's training set and labels without the held-out split, and the split (None without a meta-step).
    Samples keep their ``index`` in the whole training set."""
    if meta_step is None:
        return train_set, labels, None
    if labels is None:
        raise ValueError("meta_step: the outer loss is the cross-entropy on held-out labels, but the training data has "
                         "no 'target' labels")
    train, held = held_out_indices(len(train_set), labels, meta_step.held_out, seed)
    return (Subset(train_set, train.tolist()), None if labels is None else labels[train],
            Subset(train_set, held.tolist()))


# ----------------------------------------------------------------------------------------------------- running

class MetaStepRun:
    """A stage's meta-step while it trains: the hyperparameters, their optimiser and the held-out split."""

    def __init__(self, stage: str, spec: MetaStep, distiller: Distiller, held_out_set: Dataset):
        self.spec, self.distiller, self.held_out_set = spec, distiller, held_out_set
        self.parameters = hyperparameters(stage, distiller, spec)
        for name, parameter in self.parameters.items():
            if not parameter.requires_grad or not parameter.is_floating_point():
                raise ValueError(f"stage {stage!r}: meta_step hyperparameter {name!r} must be a floating parameter "
                                 "that requires grad")
        params = list(self.parameters.values())
        self.optimizer = torch.optim.Adam(params, lr=spec.lr) if spec.optimiser == "adam" \
            else torch.optim.SGD(params, lr=spec.lr)
        self.terms = inner_terms(distiller, spec)

    def without_hyperparameters(self, parameters: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        ids = {id(p) for p in self.parameters.values()}
        return [p for p in parameters if id(p) not in ids]

    def groups_without_hyperparameters(self, groups: list[dict]) -> list[dict]:
        groups = [{**group, "params": self.without_hyperparameters(group["params"])} for group in groups]
        return [group for group in groups if group["params"]]

    # ------------------------------------------------------------------------------------------------- batches

    def training_batch(self, run: StageRun, group: list[dict], epoch: int, seed: int, env: Environment) -> dict:
        """The step's micro-batches of every rank, in rank order, on the device, with the views applied."""
        batches = list(group)
        if env.world_size > 1:
            local = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in group]
            batches = [b for rank_batches in all_gather_objects(local, env.world_size) for b in rank_batches]
        whole = {key: torch.cat([b[key] for b in batches]) for key in batches[0]
                 if isinstance(batches[0][key], torch.Tensor)}
        return run.distiller.apply_views(to_device(whole, env.device), seed=seed, epoch=run.offset + epoch,
                                         step=run.step)

    def held_out_batch(self, seed: int, epoch: int, step: int, batch_size: int, env: Environment) -> dict:
        """This rank's share of the step's held-out batch (``batch_size × world_size`` samples drawn without
        replacement from (seed, epoch, step), at most the split's size rounded down to a multiple of the ranks)."""
        size = len(self.held_out_set)
        total = min(batch_size * env.world_size, size - size % env.world_size)
        if total < env.world_size:
            raise ValueError(f"meta_step: the held-out split has {size} samples, fewer than the {env.world_size} "
                             "processes")
        rng = np.random.default_rng(stream_seed(seed, META_STREAM, epoch, step))
        chosen = rng.choice(size, size=total, replace=False)
        share = total // env.world_size
        mine = chosen[env.rank * share: (env.rank + 1) * share]
        return to_device(default_collate([self.held_out_set[int(i)] for i in mine]), env.device)

    # ---------------------------------------------------------------------------------------------------- step

    def inner_lr(self, run: StageRun) -> float:
        """The looked-ahead model's current learning rate (its parameter group's)."""
        first = next(p for p in self.distiller.models[self.spec.model].parameters() if p.requires_grad)
        for group in run.optimizer.param_groups:
            if any(p is first for p in group["params"]):
                return float(group["lr"])
        return float(run.optimizer.param_groups[0]["lr"])

    def step(self, run: StageRun, group: list[dict], epoch: int, config: TrainConfig, env: Environment) -> None:
        """One meta-step before the model's optimiser step ``run.step`` (see the module doc)."""
        distiller, name = self.distiller, self.spec.model
        batch = self.training_batch(run, group, epoch, config.seed, env)
        held = self.held_out_batch(config.seed, run.offset + epoch, run.step, config.batch_size, env)
        model = distiller.models[name]
        read = {model_of(key) for term in self.terms for key in term.reads} & set(distiller.models)
        frozen = {}
        with torch.no_grad():
            for other in sorted(read - {name}):
                frozen[other] = as_tensor(distiller.models[other](distiller.model_input(other, batch)), other)
                frozen.update(tapped_features(distiller, other))
        context = StepContext(epoch=epoch, epochs=run.epochs, step=run.step, batch=batch)

        def inner_loss(outputs, _batch, _hyper):   # right after the fast model's forward: its hooks hold its features
            values = {**batch, **frozen, name: as_tensor(outputs, name), **tapped_features(distiller, name)}
            return sum(term({key: values[key] for key in term.reads}, context) for term in self.terms)

        input_key = distiller.inputs[name]
        fast = meta.unroll(model, inner_loss, batch=batch, lr=self.inner_lr(run), hyper=self.parameters,
                           first_order=self.spec.first_order, input_key=None if input_key == BATCH else input_key)
        outputs = fast(held if input_key == BATCH else held[input_key], train=False)
        tapped_features(distiller, name)     # drops the held-out forward's features
        outer = F.cross_entropy(as_tensor(outputs, name).float(), held["target"])
        grads = meta.meta_gradient(outer, self.parameters)
        for parameter, grad in zip(self.parameters.values(), grads.values()):
            parameter.grad = grad.detach()
        average_gradients(list(self.parameters.values()), env.world_size)
        self.optimizer.step()
        for parameter in self.parameters.values():
            parameter.grad = None   # the model's own backward may fill it; the next meta-step overwrites it

    # -------------------------------------------------------------------------------------------- state and logs

    def logged(self) -> dict[str, float]:
        """The values the epoch's metrics row shows: a term's ``logged_values()`` when it has one (e.g. the
        temperature ``exp(log T)``), else each scalar hyperparameter by name."""
        row, seen = {}, set()
        for name, parameter in self.parameters.items():
            term_name = name.split(".", 1)[0]
            term = next(t for t in self.distiller.terms if t.name == term_name)
            if hasattr(term, "logged_values"):
                if term_name not in seen:
                    row.update(term.logged_values())
                    seen.add(term_name)
            elif parameter.numel() == 1:
                row[name] = float(parameter.detach())
        return row

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
