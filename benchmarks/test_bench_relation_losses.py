"""pytest-benchmark microbenchmarks: forward+backward of the relation losses (rkd_distance, rkd_angle, sp, pkt, cc)
vs their official eager formulas (lenscloth/RKD, RepDistiller, probabilistic_kt, KD-Zoo) and torch.compile of those.

Each test first checks one call against the eager formula in float64, then times ``fn(student, teacher).backward()``
on [B, D] features. The full report is ``python -m kdkernels.bench --loss rkd_distance|rkd_angle|rkd|sp|pkt|cc``.
"""
from __future__ import annotations

import pytest
import torch

from kdkernels.bench.impls import benched_loss

IMPLS = ["kdkernels", "eager", "compile"]
# B = 256 is the launch-bound case; the angle's eager formula costs B^3 * D, so it runs at B = 128 here.
CASES = [("rkd_distance", (256, 128)), ("sp", (256, 128)), ("pkt", (256, 128)), ("cc", (256, 128)),
         ("rkd_angle", (128, 128))]
COMPILED = {}


def _loss_fn(loss: str, impl: str):
    benched = benched_loss(loss)
    if impl == "kdkernels":
        return lambda s, t: benched.fused(s, t, 1.0, "auto")
    if impl == "eager":
        return lambda s, t: benched.eager(s, t, 1.0)
    compiled = COMPILED.setdefault(loss, torch.compile(benched.eager, dynamic=False))
    return lambda s, t: compiled(s, t, 1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("loss", "shape"), CASES, ids=[f"{loss}-{b}x{d}" for loss, (b, d) in CASES])
def test_relation_loss_fwd_bwd(check_and_time, device, make_inputs, loss, shape, impl):
    student, teacher = make_inputs(*shape, torch.float32)
    group = f"{loss}_loss fwd+bwd {shape[0]}x{shape[1]} fp32 {device.type}"
    check_and_time(_loss_fn(loss, impl), _loss_fn(loss, "eager"), student, teacher, group, impl,
                   loss_tol=(1e-4, 1e-7), grad_tol=(1e-3, 1e-4))
