"""Helpers of the test_losses_<module>.py files: a public loss against the official formula transcribed in the test,
in float64, value and gradients; or, per backend, against that formula in float64 within the accuracy criterion."""
from __future__ import annotations

import torch

from kd_testing import FLOAT64_RTOL, assert_close_to_reference, backend_params, require_backend

ALL_BACKENDS = backend_params() + ["reference"]


def randn(*shape, seed: int, scale: float = 1.0, offset: float = 0.0, grad: bool = False) -> torch.Tensor:
    """A float64 ``randn`` tensor from its own seeded generator (a leaf that requires grad when ``grad``)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.requires_grad_(grad)


def class_labels(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def labels_for(rows: int, classes: int, device, seed: int = 0) -> torch.Tensor:
    """``class_labels`` on ``device``."""
    return class_labels(rows, classes, seed).to(device)


def device_of(backend: str) -> str:
    """The test device of a backend of ALL_BACKENDS (skips when it cannot run here); CPU for the reference."""
    return require_backend(backend) if backend != "reference" else "cpu"


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


def value_and_grad(fn, student, teacher):
    """``fn(student, teacher)`` and its gradient with respect to (a fresh leaf copy of) the student."""
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher)
    return loss, torch.autograd.grad(loss, student)[0]


def assert_matches_eager(backend, ours, eager, student, teacher, what):
    """ours(student, teacher) on `backend` against eager(...) in float64 (and in the input precision for slack)."""
    loss, grad = value_and_grad(ours, student, teacher)
    ref_loss, ref_grad = value_and_grad(eager, student.cpu().double(), teacher.cpu().double())
    # slack: twice the error of the eager formula itself evaluated in the inputs' precision
    low_loss, low_grad = value_and_grad(eager, student.cpu(), teacher.cpu())
    assert_close_to_reference(loss, ref_loss, f"{what} loss", eager=low_loss)
    assert_close_to_reference(grad, ref_grad, f"{what} grad", eager=low_grad)
    return loss, grad
