"""Meta-steps: unroll k inner SGD steps of a model functionally and back-propagate an outer loss to hyperparameters
or data (a learnable temperature, loss weights, synthetic images).

::

    log_t = torch.zeros((), requires_grad=True)                       # the hyperparameter: T = exp(log_t)
    def inner_loss(outputs, batch, hyper):                            # one inner step's loss: KD at T
        t = hyper["log_t"].exp()
        return t**2 * F.kl_div(F.log_softmax(outputs / t, -1), F.log_softmax(batch["teacher"] / t, -1),
                               log_target=True, reduction="batchmean")
    fast = meta.unroll(student, inner_loss, batch=train_batch, hyper={"log_t": log_t}, lr=0.1, steps=3)
    outer = F.cross_entropy(fast(val_batch["input"]), val_batch["target"])   # the student after 3 steps
    grads = meta.meta_gradient(outer, {"log_t": log_t})               # d outer / d log_t through the 3 steps

The inner loss must be twice differentiable, so it is written in torch ops: kdkernels' fused losses take a float
temperature and their backward kernels have no autograd formula (differentiable once); :func:`unroll` finds such a
backward in the inner gradients' graph and raises ValueError rather than return silently zero second derivatives
(``first_order=True`` needs only first derivatives and accepts them).

**The inner steps** are those of ``torch.optim.SGD``, written out so that every step stays in the autograd graph::

    g_i = ∇_θ inner_loss(model(θ_i; x_i), batch_i, hyper) + weight_decay·θ_i
    v_1 = g_0,  v_{i+1} = momentum·v_i + (1 − dampening)·g_i      (torch's momentum buffer)
    θ_{i+1} = θ_i − lr·v_{i+1}     (θ_i − lr·(g_i + momentum·v_{i+1}) with nesterov; θ_i − lr·g_i without momentum)

``lr`` may be a tensor that requires grad (a learned inner learning rate, Meta-SGD style): name it in ``hyper`` too.

The gradients ``g_i`` are taken with ``create_graph=True``, so the outer loss's gradient flows through every step
(second derivatives: Hessian-vector products). ``first_order=True`` detaches them (no second derivatives): the fast
parameters then depend on ``θ_0`` with the identity Jacobian (``(1 − lr·weight_decay)`` per step with weight decay,
whose term is not an inner gradient and stays in the graph) and on a tensor ``lr``, but not on the inner loss's
hyperparameters. That is first-order MAML (d outer / d θ_0 = ∇ outer(θ_k)); a hyperparameter that acts only through
the inner loss gets no gradient in that mode, and :func:`meta_gradient` says so.

**Parameters.** By default the model's trainable parameters are the starting point, as detached leaves sharing
their storage (nothing is written to them, and an outer ``backward()`` does not reach the model: its parameters'
``.grad`` stay as they were). Pass ``params`` (name -> tensor, a subset of ``model.named_parameters()`` names) to
start elsewhere: tensors that require grad are updated and stay in the graph (``params=dict(model.named_parameters())``
meta-learns the initialisation, MAML), tensors that do not are held fixed, and parameters not named are held fixed at
the model's values. Parameters whose inner gradient is unused (a branch the inner loss does not read) are skipped,
as ``torch.optim.SGD`` skips a parameter whose ``.grad`` is None.

**Buffers and batch norm.** The inner steps run the model in train mode by default (``train=True``: batch
statistics, as a real training step); ``train=False`` runs them in eval mode (running statistics) and ``None`` in
the model's current mode; the model's mode is restored afterwards. Buffers go into ``torch.func.functional_call``
explicitly, as copies: a train-mode step updates the copies' running statistics (outside the autograd graph, as
batch norm always does), the next step reads the updated copies, and the unrolled :class:`Unrolled` holds the final
ones in ``buffers``. The model's own buffers are never changed. Running statistics carry no gradient: an outer
loss computed in eval mode sees the hyperparameters only through the fast parameters, not through the statistics
the inner steps accumulated (run the outer forward in train mode, ``fast(x, train=True)``, to use batch statistics).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from kdkernels._validation import Checks

__all__ = ["Unrolled", "unroll", "meta_gradient", "reaches"]

InnerLoss = Callable[[object, object, dict], torch.Tensor]


@dataclasses.dataclass
class Unrolled:
    """The result of :func:`unroll`: the model's fast parameters and buffers after the inner steps.

    Calling it runs the model with them (``fast(x)``: ``torch.func.functional_call``); ``params`` holds every
    parameter (the updated ones as non-leaf tensors in the autograd graph of the unroll), ``buffers`` the buffers
    after the inner steps, ``losses`` each inner step's loss (in the graph) and ``steps`` their number.
    """

    model: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    losses: list[torch.Tensor]
    momentum_buffers: dict[str, torch.Tensor]

    @property
    def steps(self) -> int:
        return len(self.losses)

    def __call__(self, *args, train: bool | None = None, **kwargs):
        """The model's output with the fast parameters. ``train`` picks the mode for this call (None: the model's
        current mode, e.g. eval for a held-out batch); a train-mode call updates copies of ``buffers``, never
        ``buffers`` themselves nor the model's."""
        buffers = {name: b.clone() for name, b in self.buffers.items()}
        with _mode(self.model, train):
            return functional_call(self.model, (self.params, buffers), args, kwargs)


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool | None):
    if train is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _model_input(batch, input_key, check: Checks):
    """The model's input in one batch: the batch itself (a tensor, or any batch when ``input_key`` is None), its
    first element (a tuple or list) or ``batch[input_key]`` (a mapping)."""
    if isinstance(batch, torch.Tensor) or input_key is None:
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            check.value_error("batch", "must not be empty", "an empty sequence")
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key not in batch:
            check.value_error("batch", f"must have the input key {input_key!r}", f"keys {sorted(map(str, batch))}")
        return batch[input_key]
    check.type_error("batch", "a tensor, a tuple/list (input first) or a mapping", batch)


def _check_lr(check: Checks, lr):
    if not isinstance(lr, torch.Tensor):
        return check.real("lr", lr, positive=True)
    if not lr.is_floating_point():
        check.type_error("lr", "a real number or a floating tensor", lr)
    if lr.numel() != 1:
        check.value_error("lr", "must have one element", f"shape {tuple(lr.shape)}")
    value = float(lr.detach())
    if not (value > 0 and value != float("inf")):
        check.value_error("lr", "must be positive and finite", value)
    return lr.reshape(())


def _check_hyper(check: Checks, hyper) -> dict[str, torch.Tensor]:
    if hyper is None:
        return {}
    if not isinstance(hyper, Mapping):
        check.type_error("hyper", "a mapping of names to tensors", hyper)
    out = {}
    for name, value in hyper.items():
        if not isinstance(name, str):
            check.type_error("hyper's names", "str", name)
        if not isinstance(value, torch.Tensor):
            check.type_error(f"hyper[{name!r}]", "a torch.Tensor", value)
        if not value.is_floating_point():
            check.type_error(f"hyper[{name!r}]", "a floating tensor", value)
        if not value.requires_grad:
            check.value_error(f"hyper[{name!r}]", "must require grad (a leaf with requires_grad=True, or a tensor "
                              "computed from one)", "a tensor that does not")
        out[name] = value
    return out


def _check_params(check: Checks, model: nn.Module, params) -> dict[str, torch.Tensor]:
    """Every parameter of the model by name: the given ones as given, the others detached (fixed)."""
    own = dict(model.named_parameters())
    if params is None:
        return {name: p.detach().requires_grad_(p.requires_grad) for name, p in own.items()}
    if not isinstance(params, Mapping):
        check.type_error("params", "a mapping of parameter names to tensors", params)
    unknown = [name for name in params if name not in own]
    if unknown:
        check.value_error("params", "must name parameters of the model", f"unknown names {unknown}; the model's "
                          f"parameters are {sorted(own)}")
    out = {name: p.detach() for name, p in own.items()}
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            check.type_error(f"params[{name!r}]", "a torch.Tensor", value)
        if value.shape != own[name].shape:
            check.value_error(f"params[{name!r}]", f"must have the model's shape {tuple(own[name].shape)}",
                              f"shape {tuple(value.shape)}")
        if value.dtype != own[name].dtype:
            check.type_error(f"params[{name!r}]", f"of the model's dtype {own[name].dtype}", value)
        if value.device != own[name].device:
            check.value_error(f"params[{name!r}]", f"must be on the model's device {own[name].device}",
                              f"device {value.device}")
        out[name] = value
    return out


def _batches(check: Checks, batch, batches, steps) -> list:
    if (batch is None) == (batches is None):
        check.value_error("batch/batches", "must be given exactly one of the two (one batch repeated `steps` "
                          "times, or one batch per step)", "both" if batch is not None else "neither")
    if batches is not None:
        if not isinstance(batches, (list, tuple)):
            check.type_error("batches", "a list or tuple of batches", batches)
        if not batches:
            check.value_error("batches", "must hold at least one batch", "an empty sequence")
        if steps is not None and check.integer("steps", steps, minimum=1) != len(batches):
            check.value_error("steps", f"must equal len(batches) = {len(batches)} (or be None)", steps)
        return list(batches)
    steps = 1 if steps is None else check.integer("steps", steps, minimum=1)
    return [batch] * steps


def unroll(model: nn.Module, inner_loss: InnerLoss, *, batch=None, batches: Sequence | None = None,
           steps: int | None = None, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
           nesterov: bool = False, weight_decay: float = 0.0, hyper: Mapping[str, torch.Tensor] | None = None,
           params: Mapping[str, torch.Tensor] | None = None, first_order: bool = False, train: bool | None = True,
           input_key: str | None = "input") -> Unrolled:
    """Take ``steps`` differentiable SGD steps of ``model`` on ``inner_loss`` and return the fast parameters.

    Args:
        model: the module (its parameters are read, never written).
        inner_loss: ``inner_loss(outputs, batch, hyper) -> scalar``: ``outputs`` is the model's output on the
            batch's input (see ``input_key``) with the current fast parameters, ``hyper`` the ``hyper`` mapping.
        batch: one batch, used for every step (``steps`` times, default 1); or
        batches: one batch per step (``steps``, if given, must equal their number).
            A batch is a tensor (the input), a tuple/list (input first) or a mapping (``batch[input_key]``);
            with ``input_key=None`` the model gets the whole batch.
            Synthetic data to learn is a tensor in the batch that requires grad (name it in ``hyper`` too).
        lr, momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD`` (``lr > 0``, a float or a
            one-element tensor, which may require grad; momentum, dampening and weight decay >= 0; nesterov needs
            momentum > 0 and dampening 0).
        hyper: name -> tensor requiring grad: the hyperparameters or data the outer loss will be differentiated
            by. Each must be reached by the inner losses' graph or the fast parameters' (a tensor ``lr``), else
            ValueError naming it.
        params: the starting parameters (see the module docstring); default the model's, detached.
        first_order: detach the inner gradients (no second derivatives; see the module docstring).
        train: the mode of the inner steps (True: train mode, batch statistics; False: eval; None: as it is).

    Returns:
        an :class:`Unrolled` (call it to run the model with the fast parameters).
    """
    check = Checks("unroll")
    if not isinstance(model, nn.Module):
        check.type_error("model", "an nn.Module", model)
    if not callable(inner_loss):
        check.type_error("inner_loss", "a callable (outputs, batch, hyper) -> scalar tensor", inner_loss)
    lr = _check_lr(check, lr)
    momentum = check.real("momentum", momentum, nonnegative=True)
    dampening = check.real("dampening", dampening, nonnegative=True)
    nesterov = check.flag("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        check.value_error("nesterov", "needs momentum > 0 and dampening 0 (as torch.optim.SGD)",
                          f"momentum {momentum:g}, dampening {dampening:g}")
    weight_decay = check.real("weight_decay", weight_decay, nonnegative=True)
    first_order = check.flag("first_order", first_order)
    if train is not None:
        check.flag("train", train)
    if input_key is not None and not isinstance(input_key, str):
        check.type_error("input_key", "a str or None", input_key)
    hyper = _check_hyper(check, hyper)
    schedule = _batches(check, batch, batches, steps)
    params = _check_params(check, model, params)
    learned = [name for name, p in params.items() if p.requires_grad]
    if not learned:
        check.value_error("params", "must hold at least one tensor that requires grad (the parameters to update)",
                          "none that does")
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    velocity: dict[str, torch.Tensor] = {}
    losses = []
    with _mode(model, train), torch.enable_grad():
        for step, current in enumerate(schedule):
            outputs = functional_call(model, (params, buffers), (_model_input(current, input_key, check),))
            loss = inner_loss(outputs, current, hyper)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"unroll: inner_loss must return a tensor, got {type(loss).__name__} at step {step}")
            if loss.numel() != 1:
                raise ValueError(f"unroll: inner_loss must return a scalar, got shape {tuple(loss.shape)} at step "
                                 f"{step}")
            if not loss.requires_grad:
                raise ValueError(f"unroll: the inner loss at step {step} is not differentiable (it does not require "
                                 "grad): it must depend on the model's outputs, computed without no_grad/detach")
            grads = torch.autograd.grad(loss.reshape(()), [params[name] for name in learned],
                                        create_graph=not first_order, allow_unused=True)
            if all(g is None for g in grads):
                raise ValueError(f"unroll: the inner loss at step {step} does not depend on any parameter being "
                                 f"updated ({learned})")
            if step == 0 and not first_order:
                _check_twice_differentiable([g for g in grads if g is not None])
            params = dict(params)
            for name, grad in zip(learned, grads):
                if grad is None:
                    continue
                if first_order:
                    grad = grad.detach()
                if weight_decay:
                    grad = grad + weight_decay * params[name]
                if momentum:
                    buffer = momentum * velocity[name] + (1 - dampening) * grad if name in velocity else grad
                    velocity[name] = buffer
                    grad = grad + momentum * buffer if nesterov else buffer
                params[name] = params[name] - lr * grad
            losses.append(loss.reshape(()))
    if hyper:
        missing = [name for name, value in hyper.items()
                   if not reaches(losses, value) and not reaches(list(params.values()), value)]
        if missing:
            raise ValueError(f"unroll: neither the inner losses nor the fast parameters depend on hyper {missing}: no "
                             f"meta-gradient can reach {'it' if len(missing) == 1 else 'them'}")
    return Unrolled(model, params, buffers, losses, velocity)


def _check_twice_differentiable(grads: list[torch.Tensor]) -> None:
    """ValueError if the inner gradients' graph holds a backward with no autograd formula (a custom kernel's
    backward, e.g. kdkernels' fused losses): differentiating through it gives silently zero second derivatives."""
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    seen, culprits = set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "NotImplemented" in node.name():
            culprits += [child.name() for child, _ in node.next_functions if child is not None] or [node.name()]
        stack.extend(child for child, _ in node.next_functions)
    if culprits:
        raise ValueError(f"unroll: the inner loss is not twice differentiable: the backward of {sorted(set(culprits))} "
                         "has no autograd formula, so the meta-gradient through it would be silently zero; write "
                         "the inner loss with differentiable torch ops (kdkernels' fused losses are differentiable "
                         "once), or pass first_order=True")


def reaches(roots: torch.Tensor | Iterable[torch.Tensor], tensor: torch.Tensor) -> bool:
    """Whether the autograd graph of ``roots`` depends on ``tensor`` (walks the graph; computes nothing)."""
    roots = [roots] if isinstance(roots, torch.Tensor) else list(roots)
    if not tensor.requires_grad:
        return False
    if any(root is tensor for root in roots):
        return True
    target = tensor.grad_fn
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if target is not None and node is target:
            return True
        if target is None and getattr(node, "variable", None) is tensor:     # AccumulateGrad of the leaf
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def meta_gradient(outer_loss: torch.Tensor, hyper: Mapping[str, torch.Tensor], *,
                  retain_graph: bool = False, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """``d outer_loss / d hyper[name]`` for every name (``torch.autograd.grad``; nothing accumulates in ``.grad``).

    ValueError if the outer loss is not a differentiable scalar, or names the hyperparameters it does not reach
    (e.g. a temperature used only by the inner loss of a ``first_order=True`` unroll).
    """
    check = Checks("meta_gradient")
    check.tensor("outer_loss", outer_loss)
    if outer_loss.numel() != 1:
        check.value_error("outer_loss", "must be a scalar", f"shape {tuple(outer_loss.shape)}")
    if not outer_loss.requires_grad:
        check.value_error("outer_loss", "must be differentiable (require grad)", "a tensor that does not")
    hyper = _check_hyper(check, hyper)
    if not hyper:
        check.value_error("hyper", "must name at least one tensor", "an empty mapping")
    grads = torch.autograd.grad(outer_loss.reshape(()), list(hyper.values()), retain_graph=retain_graph,
                                create_graph=create_graph, allow_unused=True)
    missing = [name for name, g in zip(hyper, grads) if g is None]
    if missing:
        raise ValueError(f"meta_gradient: the outer loss does not depend on hyper {missing} (with first_order=True "
                         "the fast parameters do not depend on the hyperparameters of the inner loss)")
    return dict(zip(hyper, grads))
