"""pytest-benchmark microbenchmarks of the target_split family: forward+backward of dkd_loss and nkd_loss vs their
eager formulas (as mdistiller and cls_KD write them) and torch.compile of those.

As in test_bench_softmax_kl.py, each test first runs once outside the timer and checks the result against the eager
formula in float64, then times ``fn(student, teacher).backward()``. The full report is
``kdkernels bench --loss dkd|nkd``.
"""
from __future__ import annotations

import pytest

from bench_testing import IMPLS

# fp32 [1024, 1000] only: each torch.compile case costs a cold compile on a 2-core CPU. (loss, shape, temperature)
CASES = [("dkd", (1024, 1000), 4.0), ("nkd", (1024, 1000), 1.0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("loss", "shape", "temperature"), CASES, ids=[f"{loss}-{n}x{v}" for loss, (n, v), _ in CASES])
def test_target_split_loss_fwd_bwd(check_and_time, loss, shape, temperature, impl):
    check_and_time(loss, shape, impl, temperature, loss_tol=(1e-5, 1e-6), grad_tol=(1e-3, 1e-6))
