"""Fixtures for the pytest-benchmark microbenchmarks of kd_loss (see benchmarks/README.md).

    pytest benchmarks                          # time them (pytest-benchmark table)
    pytest benchmarks --benchmark-disable      # smoke test: each benchmarked call runs once, asserts still run

The kernels run on the GPU when one is visible, else on the CPU. Triton kernels are never run under the
interpreter here: this file does not set TRITON_INTERPRET.
"""
from __future__ import annotations

import pytest
import torch

from kdkernels.reference.softmax_kl import eager_hinton_kd


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def synchronize(device):
    """``synchronize()`` waits for queued GPU work, so that a timed callable covers the kernels it launched."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@pytest.fixture(scope="session")
def compiled_eager():
    """``torch.compile(eager_hinton_kd, dynamic=False)``, one object for the whole session (dynamo keeps one
    graph per (shape, dtype); the few shapes here stay under its recompile limit). Compile errors skip the test."""
    compiled = torch.compile(eager_hinton_kd, dynamic=False)
    errors: dict[tuple, str] = {}

    def call(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        key = (tuple(student.shape), student.dtype, student.device.type)
        if key in errors:
            pytest.skip(errors[key])
        try:
            return compiled(student, teacher, temperature)
        except Exception as exc:  # noqa: BLE001  (no C++ compiler, an inductor bug: not a kdkernels failure)
            errors[key] = f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}"
            pytest.skip(errors[key])

    return call


@pytest.fixture
def make_inputs(device):
    """``make_inputs(n, v, dtype)`` -> (student leaf requiring grad, detached teacher), fixed seed."""
    def make(n: int, v: int, dtype: torch.dtype):
        gen = torch.Generator(device=device).manual_seed(0)
        student = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype).requires_grad_(True)
        teacher = (torch.randn(n, v, device=device, generator=gen) * 3.0).to(dtype)
        return student, teacher
    return make


@pytest.fixture
def check_and_time(benchmark, device, synchronize):
    """``check_and_time(fn, eager, student, teacher, group, impl, loss_tol=(rtol, atol), grad_tol=(rtol, atol_rel))``:
    one call of ``fn(student, teacher).backward()`` checked against ``eager`` in float64 (loss, and the student
    gradient with an absolute floor of ``atol_rel`` x its largest entry), then timed by pytest-benchmark. A
    torch.compile row whose compilation fails here is skipped (no C++ compiler: not a kdkernels failure)."""
    def run(fn, eager, student, teacher, group, impl, loss_tol, grad_tol):
        try:
            value = fn(student, teacher)
            value.backward()
        except Exception as exc:  # noqa: BLE001
            if impl != "compile":
                raise
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}")
        synchronize()
        wide = student.detach().double().requires_grad_(True)
        expected = eager(wide, teacher.double())
        expected.backward()
        torch.testing.assert_close(value.detach().double(), expected.detach(), rtol=loss_tol[0], atol=loss_tol[1])
        torch.testing.assert_close(student.grad.double(), wide.grad, rtol=grad_tol[0],
                                   atol=grad_tol[1] * wide.grad.abs().max().item())

        def reset():
            student.grad = None

        def step():
            fn(student, teacher).backward()
            synchronize()

        benchmark.group = group
        benchmark.extra_info.update({"shape": list(student.shape), "dtype": "fp32", "impl": impl,
                                     "device": device.type})
        benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
        assert student.grad is not None and torch.isfinite(student.grad).all()

    return run
