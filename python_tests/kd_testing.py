"""Helpers shared by the test modules: backend parametrisation and reference comparisons."""
import pytest
import torch

import kdkernels

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def backend_device(name: str) -> str:
    """The device a backend's tests run on: cuda for cuda, the GPU for triton when there is one, else CPU."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_params(names=KERNEL_BACKENDS):
    """pytest params for backends; GPU-only ones carry the `gpu` mark."""
    return [pytest.param(name, marks=[pytest.mark.gpu] if backend_device(name) == "cuda" else [], id=name)
            for name in names]


def require_backend(name: str) -> str:
    """Skips (with the reason) when the backend cannot run on this machine; returns its test device."""
    status = kdkernels.available_backends()[name]
    if not status.available:
        pytest.skip(f"backend {name} unavailable here: {status.reason}")
    return backend_device(name)


# Tolerances against a float64 reference computed from the same (rounded) inputs. A kernel passes when its error is
# within `rtol` of the float64 result plus twice the error of the reference formula evaluated in the input
# precision (fp32 accumulation, outputs in the input dtype): the flash-attention criterion. The second term only
# matters for ill-conditioned inputs (|logits| / T ~ 1e5), where every fp32 implementation, eager included, loses
# digits. bf16/fp16 gradients are stored in their dtype: 1 ulp (ARCHITECTURE.md), since the Triton interpreter
# rounds fp32 -> bf16 stores by truncation rather than to nearest even.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}  # ~1 ulp


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                              low_precision: torch.Tensor | None = None) -> None:
    """Elementwise |actual - expected| <= rtol (|expected| + 1e-3 max|expected|) + 2 max|low_precision - expected|,
    with NaN and inf patterns equal."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    infinite = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), infinite), f"{what}: inf pattern differs"
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    finite = torch.isfinite(expected)
    a, e = actual[finite], expected[finite]
    if e.numel() == 0:
        return
    slack = 0.0
    if low_precision is not None:
        slack = 2 * (low_precision.detach().double().cpu()[finite] - e).abs().max().item()
    bound = rtol * (e.abs() + e.abs().max() * 1e-3) + slack + 1e-300
    worst = ((a - e).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the tolerance (rtol={rtol}, slack={slack:.3g})"
