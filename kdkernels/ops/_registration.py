"""Registration shared by the op families: fake kernels of the C++ ops and autograd of the C++ and Triton twins."""
from __future__ import annotations

from typing import Callable

import torch

from kdkernels import _extension
from kdkernels import backends  # noqa: F401  (imports the Triton twins, so that their ops exist here)


def accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def empty_gradient_like(logits: torch.Tensor, requested: bool) -> torch.Tensor:
    """What a backward kernel returns for one input: a contiguous gradient, or an empty [0] tensor."""
    if requested:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty((0,))


def register_family(family: str, *, fake_forward: Callable, fake_backward: Callable, setup_context: Callable,
                    make_backward: Callable) -> None:
    """Fakes for ``kdkernels::<family>_forward/_backward`` (when ``_C`` is loaded) and autograd for every twin that
    exists: the C++ op and ``kdkernels::triton_<family>_forward`` (whose fakes the Triton module registers).

    ``make_backward(backward_op)`` returns the autograd backward calling that backend's backward op.
    """
    if _extension._C is not None:
        torch.library.register_fake(f"kdkernels::{family}_forward")(fake_forward)
        torch.library.register_fake(f"kdkernels::{family}_backward")(fake_backward)
    for prefix in ("", "triton_"):
        if prefix == "" and _extension._C is None:
            continue
        if not hasattr(torch.ops.kdkernels, f"{prefix}{family}_forward"):
            continue
        backward_op = getattr(torch.ops.kdkernels, f"{prefix}{family}_backward").default
        torch.library.register_autograd(f"kdkernels::{prefix}{family}_forward", make_backward(backward_op),
                                        setup_context=setup_context)


def forward_op(family: str, backend: str):
    """The forward op of `family` on a compiled backend ("cpu"/"cuda" share the C++ op; "triton" its twin)."""
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.kdkernels, f"{family}_forward")
    if backend == "triton":
        return getattr(torch.ops.kdkernels, f"triton_{family}_forward")
    raise ValueError(f"unknown backend {backend!r}")
