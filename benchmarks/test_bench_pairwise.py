"""pytest-benchmark microbenchmarks of the pairwise family: forward+backward of the relation losses (rkd_distance,
rkd_angle, sp, pkt, cc) vs their official eager formulas (lenscloth/RKD, RepDistiller, probabilistic_kt, KD-Zoo) and
torch.compile of those.

Each test first checks one call against the eager formula in float64, then times ``fn(student, teacher).backward()``
on [B, D] features. The full report is ``python -m kdkernels.bench --loss rkd_distance|rkd_angle|rkd|sp|pkt|cc``.
"""
from __future__ import annotations

import pytest

from bench_testing import IMPLS

# B = 256 is the launch-bound case; the angle's eager formula costs B^3 * D, so it runs at B = 128 here.
CASES = [("rkd_distance", (256, 128)), ("sp", (256, 128)), ("pkt", (256, 128)), ("cc", (256, 128)),
         ("rkd_angle", (128, 128))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("loss", "shape"), CASES, ids=[f"{loss}-{b}x{d}" for loss, (b, d) in CASES])
def test_pairwise_loss_fwd_bwd(check_and_time, loss, shape, impl):
    check_and_time(loss, shape, impl, 1.0, loss_tol=(1e-4, 1e-7), grad_tol=(1e-3, 1e-4))
