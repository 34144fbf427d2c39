"""Per-term gradients: the gradient of one term's loss with respect to a model's parameters, from the graph of the
step's single forward pass (no second forward), so that a term can weigh itself by how its gradient relates to
another's: gradient-similarity gating as in SCKD, which weights the KD term by the cosine similarity of the KD and
CE gradients.

::

    gated = distill.term_gradients.GradientSimilarityGate(
        distill.FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), weight=0.9, temperature=4.0),
        reference=distill.CrossEntropyTerm("student"))       # weight 0.9·cos(∇_θ KD, ∇_θ CE)·KD
    distiller = distill.Distiller({"student": student, "teacher": teacher},
                                  [distill.CrossEntropyTerm("student"), gated])

The parameters are found from the graph: the leaf tensors that require grad behind the value the gate names
(``of="student"``: the student's output, so the student's trainable parameters, not the terms' connectors). The
gradients are ``torch.autograd.grad(loss, params, retain_graph=True)``: the step's graph stays for its own
backward; each gated step costs one extra backward per term compared, never a forward. The gate's factor is
detached (a weight, not a loss), and without gradients (evaluation under ``no_grad``) the gate is 1. Under DDP each
rank gates with its own shard's gradients (they are not all-reduced).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from kdkernels._validation import Checks
from kdkernels.distill.terms import StepContext, Term

__all__ = ["graph_leaves", "term_gradients", "gradient_cosine", "GradientSimilarityGate"]


def graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that ``tensor`` depends on (for a model's output: its trainable
    parameters that the output used, and any input that requires grad), in a fixed order (first reached first)."""
    if not isinstance(tensor, torch.Tensor):
        Checks("graph_leaves").type_error("tensor", "a torch.Tensor", tensor)
    if tensor.grad_fn is None:
        return [tensor] if tensor.requires_grad else []
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(child for child, _ in reversed(node.next_functions))
    return leaves


def _params(check: Checks, params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    if not isinstance(params, Iterable):
        check.type_error("params", "an iterable of tensors", params)
    params = list(params)
    if not params:
        check.value_error("params", "must hold at least one tensor", "none")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            check.type_error(f"params[{i}]", "a torch.Tensor", p)
        if not p.requires_grad:
            check.value_error(f"params[{i}]", "must require grad", "a tensor that does not")
    return params


def term_gradients(losses: Mapping[str, torch.Tensor], params: Iterable[torch.Tensor], *,
                   create_graph: bool = False) -> dict[str, list[torch.Tensor]]:
    """name -> the gradient of ``losses[name]`` with respect to each of ``params`` (zeros where a loss does not
    reach a parameter), computed with ``retain_graph=True`` so the graph stays for the step's own backward."""
    check = Checks("term_gradients")
    if not isinstance(losses, Mapping):
        check.type_error("losses", "a mapping of names to scalar tensors", losses)
    params = _params(check, params)
    out = {}
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor):
            check.type_error(f"losses[{name!r}]", "a torch.Tensor", loss)
        if loss.numel() != 1:
            check.value_error(f"losses[{name!r}]", "must be a scalar", f"shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            check.value_error(f"losses[{name!r}]", "must be differentiable (require grad)", "a tensor that does not")
        grads = torch.autograd.grad(loss.reshape(()), params, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)
        out[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out


def _cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum(x.double().square().sum() for x in a))
    norm_b = torch.sqrt(sum(y.double().square().sum() for y in b))
    return dot / (norm_a * norm_b).clamp_min(eps)


def gradient_cosine(loss: torch.Tensor, other: torch.Tensor, params: Iterable[torch.Tensor], *,
                    eps: float = 1e-12) -> torch.Tensor:
    """The cosine similarity of the two losses' gradients with respect to ``params`` (all parameters flattened into
    one vector), a detached float64 scalar; 0 when a gradient is zero."""
    check = Checks("gradient_cosine")
    eps = check.real("eps", eps, positive=True)
    grads = term_gradients({"loss": loss, "other": other}, params)
    return _cosine(grads["loss"], grads["other"], eps).detach()


class GradientSimilarityGate(Term):
    """``gate(cos) · term``, with ``cos`` the cosine similarity of the gradients of ``term`` and ``reference``
    (both computed from the step's values: no second forward) with respect to the parameters behind the value
    ``of``. ``gate`` maps the detached cosine (a float64 scalar tensor) to the factor; the default is the cosine
    itself, ``lambda c: c.clamp(min=0)`` drops the term when the gradients conflict. ``reference`` is only
    compared with, never added (list it among the distiller's terms too if it is a loss of the step). The last
    cosine is kept in ``last_cosine`` (None before the first gated step).
    """

    def __init__(self, term: Term, reference: Term, *, of: str = "student",
                 gate: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str | None = None,
                 eps: float = 1e-12):
        check = Checks("GradientSimilarityGate")
        if not isinstance(term, Term):
            check.type_error("term", "a Term", term)
        if not isinstance(reference, Term):
            check.type_error("reference", "a Term", reference)
        if not isinstance(of, str) or not of:
            check.type_error("of", "a value name (str)", of)
        if gate is not None and not callable(gate):
            check.type_error("gate", "a callable (cosine) -> factor", gate)
        reads = list(dict.fromkeys([*term.reads, *reference.reads, of]))
        super().__init__(name or term.name, reads, 1.0)
        self.term = term
        self.reference = reference
        self.of = of
        self.gate = gate
        self.eps = check.real("eps", eps, positive=True)
        self.last_cosine: torch.Tensor | None = None

    def build(self, example):
        self.term.build({key: example[key] for key in self.term.reads})
        self.reference.build({key: example[key] for key in self.reference.reads})

    def forward(self, values: dict, context: StepContext) -> torch.Tensor:
        loss = self.term(values, context)
        anchor = values[self.of]
        if not (torch.is_grad_enabled() and isinstance(anchor, torch.Tensor) and anchor.requires_grad
                and loss.requires_grad):
            return loss
        params = graph_leaves(anchor)
        other = self.reference(values, context)
        if not params or not other.requires_grad:
            return loss
        grads = term_gradients({"term": loss, "reference": other}, params)
        cosine = _cosine(grads["term"], grads["reference"], self.eps).detach()
        self.last_cosine = cosine
        factor = cosine if self.gate is None else self.gate(cosine)
        factor = torch.as_tensor(factor).detach().to(loss.dtype)
        return factor * loss

    def extra_repr(self) -> str:
        return f"name={self.name!r}, of={self.of!r}"
