"""pytest-benchmark microbenchmarks of the dist family: forward+backward of dist_loss vs its eager formula (as
DIST_KD writes it) and torch.compile of that.

As in test_bench_softmax_kl.py, the test first runs once outside the timer and checks the result against the eager
formula in float64, then times ``fn(student, teacher).backward()``. The full report is ``kdkernels bench --loss dist``.
"""
from __future__ import annotations

import pytest

from bench_testing import IMPLS


@pytest.mark.parametrize("impl", IMPLS)
def test_dist_loss_fwd_bwd(check_and_time, impl):
    """fp32 [1024, 1000], T = 1 (DIST's ImageNet setting); one case: each torch.compile case is a cold compile."""
    check_and_time("dist", (1024, 1000), impl, 1.0, loss_tol=(1e-5, 1e-6), grad_tol=(1e-3, 1e-6))
