"""Fixtures for the pytest-benchmark microbenchmarks, one file per op family (see benchmarks/README.md).

    pytest benchmarks                          # time them (pytest-benchmark table)
    pytest benchmarks --benchmark-disable      # smoke test: each benchmarked call runs once, asserts still run

The kernels run on the GPU when one is visible, else on the CPU. Triton kernels are never run under the
interpreter here: this file does not set TRITON_INTERPRET.
"""
from __future__ import annotations

import pytest
import torch

from bench_testing import first_call, loss_fn
from kdkernels.bench.impls import benched_loss


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def synchronize(device):
    """``synchronize()`` waits for queued GPU work, so that a timed callable covers the kernels it launched."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
def check_and_time(benchmark, device, synchronize, make_inputs):
    """``check_and_time(loss, shape, impl, temperature, loss_tol=(rtol, atol), grad_tol=(rtol, atol_rel))``: fp32
    inputs ``shape`` from make_inputs, one call of ``fn(student, teacher).backward()`` checked against the eager
    formula in float64 (loss, and the student gradient with an absolute floor of ``atol_rel`` x its largest entry),
    then timed by pytest-benchmark, grouped per (loss, shape, device)."""
    def run(loss, shape, impl, temperature, loss_tol, grad_tol):
        student, teacher = make_inputs(*shape, torch.float32)
        fn = loss_fn(loss, impl, temperature)

        def forward_backward():
            value = fn(student, teacher)
            value.backward()
            return value

        value = first_call(forward_backward, impl)
        synchronize()
        wide = student.detach().double().requires_grad_(True)
        expected = loss_fn(loss, "eager", temperature)(wide, teacher.double())
        expected.backward()
        torch.testing.assert_close(value.detach().double(), expected.detach(), rtol=loss_tol[0], atol=loss_tol[1])
        torch.testing.assert_close(student.grad.double(), wide.grad, rtol=grad_tol[0],
                                   atol=grad_tol[1] * wide.grad.abs().max().item())

        def reset():
            student.grad = None

        def step():
            fn(student, teacher).backward()
            synchronize()

        benchmark.group = f"{benched_loss(loss).name} fwd+bwd {shape[0]}x{shape[1]} fp32 {device.type}"
        benchmark.extra_info.update({"shape": list(shape), "dtype": "fp32", "impl": impl, "device": device.type})
        benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
        assert student.grad is not None and torch.isfinite(student.grad).all()

    return run
