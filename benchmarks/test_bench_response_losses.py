"""pytest-benchmark microbenchmarks: forward+backward of dkd_loss, nkd_loss and dist_loss vs their eager formulas
(as mdistiller, cls_KD and DIST_KD write them) and torch.compile of those.

As in test_bench_kd_loss.py, each test first runs once outside the timer and checks the result against the eager
formula in float64, then times ``fn(student, teacher).backward()``. The full report is
``kdkernels bench --loss dkd|nkd|dist``.
"""
from __future__ import annotations

import pytest
import torch

from kdkernels.bench.impls import benched_loss

IMPLS = ["kdkernels", "eager", "compile"]
# fp32 [1024, 1000] only: each torch.compile case costs a cold compile on a 2-core CPU.
CASES = [("dkd", (1024, 1000)), ("dist", (1024, 1000)), ("nkd", (1024, 1000))]
COMPILED = {}


def _loss_fn(loss: str, impl: str):
    benched = benched_loss(loss)
    temperature = 1.0 if loss != "dkd" else 4.0
    if impl == "kdkernels":
        return lambda s, t: benched.fused(s, t, temperature, "auto")
    if impl == "eager":
        return lambda s, t: benched.eager(s, t, temperature)
    compiled = COMPILED.setdefault(loss, torch.compile(benched.eager, dynamic=False))
    return lambda s, t: compiled(s, t, temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("loss", "shape"), CASES, ids=[f"{loss}-{n}x{v}" for loss, (n, v) in CASES])
def test_response_loss_fwd_bwd(benchmark, device, synchronize, make_inputs, loss, shape, impl):
    n, v = shape
    student, teacher = make_inputs(n, v, torch.float32)
    fn = _loss_fn(loss, impl)
    try:
        value = fn(student, teacher)
        value.backward()
    except Exception as exc:  # noqa: BLE001  (no C++ compiler for inductor: not a kdkernels failure)
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}")
    synchronize()
    wide = student.detach().double().requires_grad_(True)
    expected = _loss_fn(loss, "eager")(wide, teacher.double())
    expected.backward()
    torch.testing.assert_close(value.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), wide.grad, rtol=1e-3, atol=1e-6 * wide.grad.abs().max().item())

    def reset():
        student.grad = None

    def step():
        fn(student, teacher).backward()
        synchronize()

    benchmark.group = f"{loss}_loss fwd+bwd {n}x{v} fp32 {device.type}"
    benchmark.extra_info.update({"shape": [n, v], "dtype": "fp32", "impl": impl, "device": device.type})
    benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
    assert student.grad is not None and torch.isfinite(student.grad).all()
