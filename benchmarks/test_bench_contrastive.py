"""pytest-benchmark microbenchmarks of the contrastive family (CRD): forward+backward of kdkernels.crd_loss vs
RepDistiller's eager formula (``kdkernels.reference.contrastive.eager_crd``: ContrastMemory's gather + bmm + exp, two
ContrastLoss) and torch.compile of it.

Each test first runs once outside the timer and checks the loss and both embedding gradients against the eager
formula in float64, then times ``loss.backward()`` with the normalisers already set (the steady state of training;
the bank update is not timed: it is the same index_select / index_copy_ in both). ``extra_info`` records the peak
extra memory of one step (kdkernels._memory: RSS delta on CPU, max_memory_allocated on CUDA). Cases: the
small case of every impl (B=64, K=4096, d=128, N=50000) and RepDistiller's CIFAR setting B=64, K=16384 (kdkernels
and eager only: a cold torch.compile of it costs minutes on a 2-core CPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from bench_testing import first_call
from kdkernels._memory import measure_peak_mb
from kdkernels.reference.contrastive import eager_crd

FEATURES, NUM_DATA = 128, 50000
CASES = [(64, 4096, "kdkernels"), (64, 4096, "eager"), (64, 4096, "compile"), (64, 16384, "kdkernels"),
         (64, 16384, "eager")]
COMPILED = {}


def _inputs(batch, negatives, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(batch, FEATURES, generator=generator), dim=1)
    teacher = F.normalize(torch.randn(batch, FEATURES, generator=generator), dim=1)
    stdv = 1.0 / (FEATURES / 3) ** 0.5
    banks = [(torch.rand(NUM_DATA, FEATURES, generator=generator) * 2 - 1) * stdv for _ in range(2)]
    indices = torch.randperm(NUM_DATA, generator=generator)[:batch]
    contrast = torch.randint(0, NUM_DATA, (batch, negatives + 1), generator=generator)
    contrast[:, 0] = indices
    to = dict(device=device, dtype=dtype)
    return (student.to(**to).requires_grad_(), teacher.to(**to).requires_grad_(), indices.to(device),
            contrast.to(device), banks[0].to(**to), banks[1].to(**to))


def _loss_fn(impl: str):
    def fused(student, teacher, indices, contrast, memory_student, memory_teacher, normalizers):
        return kdkernels.crd_loss(student, teacher, indices, contrast, memory_student, memory_teacher, normalizers)

    def eager(student, teacher, indices, contrast, memory_student, memory_teacher, normalizers):
        return eager_crd(student, teacher, contrast, memory_student, memory_teacher, normalizers).sum()

    if impl == "kdkernels":
        return fused
    if impl == "eager":
        return eager
    return COMPILED.setdefault("crd", torch.compile(eager, dynamic=False))


def _check_against_eager_float64(inputs, normalizers, loss, grads, rtol):
    wide = [x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in inputs]
    expected = _loss_fn("eager")(*wide, normalizers.double())
    expected_grads = torch.autograd.grad(expected, wide[:2])
    torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=rtol, atol=0)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), want, rtol=1e-3, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize(("batch", "negatives", "impl"), CASES,
                         ids=[f"B{b}-K{k}-{impl}" for b, k, impl in CASES])
def test_crd_fwd_bwd(benchmark, device, synchronize, batch, negatives, impl):
    inputs = _inputs(batch, negatives, device)
    student, teacher, indices, contrast, memory_student, memory_teacher = inputs
    normalizers = kdkernels.crd_normalizers(student, teacher, contrast, memory_student, memory_teacher)
    fn = _loss_fn(impl)

    def forward_backward():
        value = fn(*inputs, normalizers)
        return value, torch.autograd.grad(value, (student, teacher))

    loss, grads = first_call(forward_backward, impl)
    synchronize()
    # RepDistiller's fp32 formula (log of x / (x + c) with x ~ 1e-4) is itself ~2e-5 off its float64 value
    _check_against_eager_float64(inputs, normalizers, loss, grads, rtol=1e-5 if impl == "kdkernels" else 1e-4)

    def reset():
        student.grad = teacher.grad = None

    def step():
        fn(*inputs, normalizers).backward()
        synchronize()

    reset()
    peak = measure_peak_mb(step, device)
    benchmark.group = f"crd_loss fwd+bwd B={batch} K={negatives} d={FEATURES} N={NUM_DATA} fp32 {device.type}"
    benchmark.extra_info.update({"batch": batch, "negatives": negatives, "features": FEATURES, "num_data": NUM_DATA,
                                 "dtype": "fp32", "impl": impl, "device": device.type, "peak_extra_mb": peak})
    benchmark.pedantic(step, setup=reset, rounds=5, iterations=1, warmup_rounds=1)
    assert student.grad is not None and torch.isfinite(student.grad).all()
