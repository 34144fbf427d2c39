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
def test_response_loss_fwd_bwd(check_and_time, device, make_inputs, loss, shape, impl):
    student, teacher = make_inputs(*shape, torch.float32)
    group = f"{loss}_loss fwd+bwd {shape[0]}x{shape[1]} fp32 {device.type}"
    check_and_time(_loss_fn(loss, impl), _loss_fn(loss, "eager"), student, teacher, group, impl,
                   loss_tol=(1e-5, 1e-6), grad_tol=(1e-3, 1e-6))
