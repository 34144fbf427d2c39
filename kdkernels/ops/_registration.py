"""The one registration path of every op family: fakes and autograd, shared by the C++ op and its Triton twin.

An :class:`OpSpec` says, for one op, what its outputs look like (the fakes, which torch.compile and opcheck use) and
how it differentiates (``setup_context`` and ``make_backward``). :func:`register` applies it to
``kdkernels::<op>_forward`` (the C++ op, when kdkernels._C is loaded) and to ``kdkernels::triton_<op>_forward`` (the
Triton twin, when triton is importable): the same fake and the same autograd for both, and for their
``_backward`` ops where the backward is an op of its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from kdkernels._validation import accumulation_dtype as _accumulation_dtype

TWIN_PREFIXES = ("", "triton_")  # the C++ op and the Triton twin


def accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, else float32: the dtype of an op's per-row outputs."""
    return _accumulation_dtype(logits)


def empty_gradient_like(logits: torch.Tensor, requested: bool) -> torch.Tensor:
    """What a backward kernel returns for one input: a contiguous gradient, or an empty [0] tensor."""
    if requested:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty((0,))


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """The Python side of one op.

    The fakes take the op's name first (``fake_forward("softmax_kl_forward", *inputs)``): they check the inputs as
    the kernels do (kdkernels/ops/_checks.py), naming the op that was called. ``make_backward(backward_op)`` returns
    the autograd backward; ``backward_op`` is that twin's ``kdkernels::[triton_]<name>_backward`` when
    ``fake_backward`` is given (the backward is an op of its own), else None (the forward already returned the
    gradients, which the backward scales).
    """

    name: str
    fake_forward: Callable
    setup_context: Callable
    make_backward: Callable
    fake_backward: Callable | None = None


def register(spec: OpSpec) -> None:
    """Fakes and autograd for every twin of `spec` that exists here."""
    for prefix in TWIN_PREFIXES:
        forward = f"{prefix}{spec.name}_forward"
        if not hasattr(torch.ops.kdkernels, forward):
            continue
        torch.library.register_fake(f"kdkernels::{forward}")(functools.partial(spec.fake_forward, forward))
        backward_op = None
        if spec.fake_backward is not None:
            backward = f"{prefix}{spec.name}_backward"
            torch.library.register_fake(f"kdkernels::{backward}")(functools.partial(spec.fake_backward, backward))
            backward_op = getattr(torch.ops.kdkernels, backward).default
        torch.library.register_autograd(f"kdkernels::{forward}", spec.make_backward(backward_op),
                                        setup_context=spec.setup_context)


def forward_op(name: str, backend: str):
    """The forward op `name` on a compiled backend ("cpu"/"cuda" share the C++ op; "triton" its twin)."""
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.kdkernels, f"{name}_forward")
    if backend == "triton":
        return getattr(torch.ops.kdkernels, f"triton_{name}_forward")
    raise ValueError(f"unknown backend {backend!r}")
