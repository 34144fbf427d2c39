"""pytest-benchmark microbenchmarks of the softmax_kl family: forward+backward of kd_loss vs PyTorch eager vs
torch.compile.

Each test first runs its implementation once outside the timer and checks the result (finite; for fp32 equal to
eager within tight tolerances, for bf16 close to the fp32 loss of the same inputs), so a benchmark cannot silently
time a wrong computation; then it times ``fn(student, teacher).backward()`` (synchronised on GPU) with
``benchmark.pedantic``, ``student.grad = None`` before every round (outside the timer).

The full report (median/p20/p80, peak memory, speed-ups, GB/s, JSON + plot) is ``kdkernels bench``.
"""
from __future__ import annotations

import pytest
import torch

import kdkernels
from bench_testing import IMPLS, first_call, loss_fn
from kdkernels.reference.softmax_kl import eager_hinton_kd

TEMPERATURE = 4.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (shape, dtype): both small shapes in fp32, one in bf16 (each torch.compile case costs a cold compile, ~5-10 s on
# a 2-core CPU, and `pytest benchmarks --benchmark-disable` must stay well under a minute there).
CASES = [((256, 100), "fp32"), ((1024, 1000), "fp32"), ((1024, 1000), "bf16")]


def _check_against_eager(impl: str, dtype_name: str, loss: torch.Tensor, student: torch.Tensor,
                         teacher: torch.Tensor) -> None:
    assert torch.isfinite(loss).all(), f"{impl}: non-finite loss {loss}"
    assert student.grad is not None and torch.isfinite(student.grad).all(), f"{impl}: missing or non-finite grad"
    ref_student = student.detach().float().requires_grad_(True)
    ref_loss = eager_hinton_kd(ref_student, teacher.float(), TEMPERATURE)
    ref_loss.backward()
    if dtype_name == "fp32":
        torch.testing.assert_close(loss.detach().float(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-6)
    else:  # bf16 eager rounds every intermediate to bf16: only a loose check against the fp32 result
        torch.testing.assert_close(loss.detach().float(), ref_loss.detach(), rtol=5e-2, atol=5e-3)
        torch.testing.assert_close(student.grad.float(), ref_student.grad, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "dtype_name"), CASES, ids=[f"{n}x{v}-{d}" for (n, v), d in CASES])
def test_kd_loss_fwd_bwd(benchmark, device, synchronize, make_inputs, shape, dtype_name, impl):
    n, v = shape
    dtype = DTYPES[dtype_name]
    student, teacher = make_inputs(n, v, dtype)
    fn = loss_fn("kd", impl, TEMPERATURE)

    def forward_backward():
        value = fn(student, teacher)
        value.backward()
        return value

    loss = first_call(forward_backward, impl)  # correctness, outside the timer
    synchronize()
    _check_against_eager(impl, dtype_name, loss, student, teacher)

    def reset():
        student.grad = None

    def step():
        fn(student, teacher).backward()
        synchronize()

    itemsize = torch.empty((), dtype=dtype).element_size()
    benchmark.group = f"kd_loss fwd+bwd {n}x{v} {dtype_name} {device.type}"
    benchmark.extra_info.update({
        "shape": [n, v], "dtype": dtype_name, "impl": impl, "device": device.type, "temperature": TEMPERATURE,
        "backend": kdkernels.backends.select_backend("auto", student, teacher) if impl == "kdkernels" else None,
        "bytes_floor_5U": 5 * n * v * itemsize,
    })
    benchmark.pedantic(step, setup=reset, rounds=20, iterations=1, warmup_rounds=3)
    assert student.grad is not None and torch.isfinite(student.grad).all()
