"""Helpers of the test_losses_<module>.py files: a public loss against the official formula transcribed in the test,
in float64, value and gradients."""
from __future__ import annotations

import torch

from kd_testing import FLOAT64_RTOL, assert_close_to_reference


def randn(*shape, seed: int, scale: float = 1.0, offset: float = 0.0, grad: bool = False) -> torch.Tensor:
    """A float64 ``randn`` tensor from its own seeded generator (a leaf that requires grad when ``grad``)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.requires_grad_(grad)


def class_labels(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def _leaves(args) -> list[torch.Tensor]:
    """The tensors among ``args`` (lists and tuples searched too) that require grad, in order."""
    found = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.requires_grad:
                found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(_leaves(arg))
    return found


def _value_and_grads(fn, args, leaves):
    value = fn(*args)
    if not leaves:
        return value, []
    upstream = None
    if value.dim():  # a per-sample result: a random upstream gradient, so that no row is checked against ones
        generator = torch.Generator().manual_seed(7)
        upstream = torch.rand(value.shape, generator=generator, dtype=value.dtype) + 0.5
    grads = torch.autograd.grad(value, leaves, upstream, allow_unused=True)
    return value, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def assert_equals_official(ours, official, *args, what: str, rtol: float = FLOAT64_RTOL) -> torch.Tensor:
    """``ours(*args)`` against ``official(*args)``: the value, and the gradient of every input that requires grad
    (a gradient that does not reach an input counts as zeros), elementwise to ``rtol`` (float64). Returns ours."""
    value, grads = _value_and_grads(ours, args, _leaves(args))
    expected, expected_grads = _value_and_grads(official, args, _leaves(args))
    assert value.dtype == torch.float64, f"{what}: {value.dtype} result for float64 inputs"
    assert_close_to_reference(value, expected, f"{what} value", rtol=rtol)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert_close_to_reference(grad, expected_grad, f"{what} grad {index}", rtol=rtol)
    return value
