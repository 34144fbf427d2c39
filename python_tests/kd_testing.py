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
                              low_precision: torch.Tensor | None = None, atol: float = 0.0) -> None:
    """Elementwise |actual - expected| <= rtol (|expected| + 1e-3 max|expected|) + 2 max|low_precision - expected|
    + atol, with NaN and inf patterns equal."""
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
    bound = rtol * (e.abs() + e.abs().max() * 1e-3) + slack + atol + 1e-300
    worst = ((a - e).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the tolerance (rtol={rtol}, slack={slack:.3g})"


def logits(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)


def loss_and_grads(backend, student, teacher, temperature, reduction, teacher_grad=True, upstream=None, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = kdkernels.kd_loss(student, teacher, temperature, reduction=reduction, backend=backend, **kwargs)
    if upstream is None:  # grad_output != 1 everywhere
        upstream = torch.full_like(loss, 0.75) if loss.dim() == 0 else \
            torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype).to(loss.device) + 0.5
    inputs = (student, teacher) if teacher_grad else (student,)
    grads = torch.autograd.grad(loss, inputs, upstream)
    return loss, grads, upstream


def check_against_reference(backend, student, teacher, temperature, reduction="batchmean", teacher_grad=True,
                            grad_atol=0.0, **kwargs):
    """Runs the backend, the float64 reference and the reference in the input precision; compares all outputs.

    `grad_atol` is an absolute floor for gradients whose formula cancels O(1) terms (see test_ops_softmax_jsd)."""
    loss, grads, upstream = loss_and_grads(backend, student, teacher, temperature, reduction, teacher_grad, **kwargs)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ref_loss, ref_grads, _ = loss_and_grads("reference", student.cpu().double(), teacher.cpu().double(), temperature,
                                            reduction, teacher_grad, upstream.cpu().double(), **cpu)
    low_loss, low_grads, _ = loss_and_grads("reference", student.cpu(), teacher.cpu(), temperature, reduction,
                                            teacher_grad, upstream.cpu(), **cpu)
    rtol = RTOL[student.dtype]
    expected_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype, f"loss dtype {loss.dtype}"
    assert_close_to_reference(loss, ref_loss, max(RTOL[torch.float32], RTOL[expected_dtype]), "loss", low_loss)
    for name, grad, ref, low, x in zip(("student grad", "teacher grad"), grads, ref_grads, low_grads,
                                       (student, teacher)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
        assert_close_to_reference(grad, ref, rtol, name, low, atol=grad_atol)
    return loss, grads


def masked(dtype, device):
    """Rows: finite; -inf in both at the same places; teacher -inf only; a row entirely -inf in both."""
    student, teacher = logits((4, 40), torch.float64, seed=9), logits((4, 40), torch.float64, seed=10)
    student[1, ::3] = teacher[1, ::3] = float("-inf")
    teacher[2, 5:20] = float("-inf")
    student[3] = teacher[3] = float("-inf")
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def _outputs_and_grads(fn, backend, tensors, grad_flags, upstreams=None):
    """fn(backend, *tensors) -> a tensor or a tuple of tensors; returns (outputs, grads of those that require grad,
    upstream gradients). Upstreams are random (seeded) when not given, so no gradient is checked against ones."""
    tensors = [t.detach().clone().requires_grad_(flag) for t, flag in zip(tensors, grad_flags)]
    outputs = fn(backend, *tensors)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if upstreams is None:
        generator = torch.Generator().manual_seed(7)
        upstreams = tuple((torch.rand(o.shape, generator=generator, dtype=torch.float64) + 0.5).to(o.dtype)
                          .to(o.device) for o in outputs)
    differentiable = [t for t in tensors if t.requires_grad]
    finite = [(o, u) for o, u in zip(outputs, upstreams) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in finite], differentiable, [u for _, u in finite]) \
        if differentiable else ()
    return outputs, grads, upstreams


def check_op_against_reference(fn, backend, tensors, grad_flags, output_rtol=None, grad_atol=0.0, what="op"):
    """Compares fn(backend, ...) with fn("reference", ...) in float64 and in the inputs' precision: every output
    and every input gradient, under random upstream gradients. Returns (outputs, grads)."""
    outputs, grads, upstreams = _outputs_and_grads(fn, backend, tensors, grad_flags)
    cpu_tensors = [t.detach().cpu() for t in tensors]
    wide = [t.double() if t.dtype.is_floating_point else t for t in cpu_tensors]
    ref_outputs, ref_grads, _ = _outputs_and_grads(fn, "reference", wide, grad_flags,
                                                   tuple(u.cpu().double() for u in upstreams))
    low_outputs, low_grads, _ = _outputs_and_grads(fn, "reference", cpu_tensors, grad_flags,
                                                   tuple(u.cpu() for u in upstreams))
    floats = [t for t in tensors if t.dtype.is_floating_point]
    dtype = floats[0].dtype
    rtol = output_rtol if output_rtol is not None else RTOL[torch.float64 if dtype == torch.float64 else torch.float32]
    for index, (out, ref, low) in enumerate(zip(outputs, ref_outputs, low_outputs)):
        assert_close_to_reference(out, ref, rtol, f"{what} output {index}", low)
    differentiable = [t for t, flag in zip(tensors, grad_flags) if flag]
    for index, (grad, ref, low, x) in enumerate(zip(grads, ref_grads, low_grads, differentiable)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"{what} grad {index}: {grad.dtype} {grad.shape}"
        assert_close_to_reference(grad, ref, RTOL[x.dtype], f"{what} grad {index}", low, atol=grad_atol)
    return outputs, grads
