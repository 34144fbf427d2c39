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


# Accuracy criterion. Every kernel result is compared with the float64 reference on the same (rounded) inputs.
# * Results below float64 meet the flash-attention criterion (FlashAttention's tests, ARCHITECTURE.md): the largest
#   error is at most twice the largest error of the eager formula evaluated in the input precision on the same inputs
#   and on the same machine, plus one ulp of the result's dtype at the result's scale (the rounding of the stored
#   result itself, which a lucky eager value may escape). No hand-set tolerance: a kernel may be as inaccurate as the
#   formula users would otherwise run, twice over, and no more, on whatever CPU or BLAS the suite runs on.
# * float64 results have no wider reference to measure their rounding against: they must agree elementwise with the
#   float64 reference to FLOAT64_RTOL (about 5e5 ulps; formulas differ in their order of operations).
EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
FLOAT64_RTOL = 1e-10


def accumulation_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_special_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> torch.Tensor:
    """Asserts equal shapes and NaN / inf patterns; returns the mask of finite expected entries."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    infinite = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), infinite), f"{what}: inf pattern differs"
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    return torch.isfinite(expected)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, what: str, *,
                              eager: torch.Tensor | None = None, rtol: float | None = None, ulps: float | None = None,
                              atol: float = 0.0) -> None:
    """`actual` against `expected` (the float64 reference on the same inputs), NaN and inf patterns equal, and:

    * a float64 `actual`: elementwise |a - e| <= rtol (|e| + 1e-3 max|e|) + atol, rtol = FLOAT64_RTOL by default;
    * else with `eager` (the eager formula in the input precision): the flash-attention criterion,
      max|a - e| <= 2 max|eager - e| + eps(a.dtype) max|e| + atol;
    * else with `ulps` (where the eager formula itself breaks down in the input precision, so that it measures
      nothing: coincident points, exact zeros): max|a - e| <= ulps eps(a.dtype) max|e| + atol.
    """
    out_dtype = actual.dtype
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    finite = _same_special_values(actual, expected, what)
    a, e = actual[finite], expected[finite]
    if e.numel() == 0:
        return
    scale = e.abs().max().item()
    if out_dtype == torch.float64 or (eager is None and ulps is None):
        if out_dtype != torch.float64 and rtol is None:
            raise TypeError(f"{what}: a {out_dtype} result needs eager= (or ulps=) to be judged")
        rtol = FLOAT64_RTOL if rtol is None else rtol
        bound = rtol * (e.abs() + scale * 1e-3) + atol + 1e-300
        worst = ((a - e).abs() / bound).max().item()
        assert worst <= 1.0, f"{what}: error {worst:.3g}x the tolerance (rtol={rtol}, atol={atol:.3g})"
        return
    error = (a - e).abs().max().item()
    if eager is not None:
        eager_error = (eager.detach().double().cpu()[finite] - e).abs().max().item()
        bound = 2 * eager_error + EPS[out_dtype] * scale + atol
        detail = f"eager formula's error {eager_error:.3g}"
    else:
        bound = ulps * EPS[out_dtype] * scale + atol
        detail = f"{ulps} ulps of {out_dtype} at the result's scale {scale:.3g}"
    assert error <= bound, f"{what}: max error {error:.3g} exceeds {bound:.3g} ({detail})"


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
    assert loss.dtype == accumulation_dtype_of(student.dtype), f"loss dtype {loss.dtype}"
    assert_close_to_reference(loss, ref_loss, "loss", eager=low_loss)
    for name, grad, ref, low, x in zip(("student grad", "teacher grad"), grads, ref_grads, low_grads,
                                       (student, teacher)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
        assert_close_to_reference(grad, ref, name, eager=low, atol=grad_atol)
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


def check_op_against_reference(fn, backend, tensors, grad_flags, grad_atol=0.0, what="op"):
    """Compares fn(backend, ...) with fn("reference", ...) in float64 and in the inputs' precision: every output
    and every input gradient, under random upstream gradients. Returns (outputs, grads)."""
    outputs, grads, upstreams = _outputs_and_grads(fn, backend, tensors, grad_flags)
    cpu_tensors = [t.detach().cpu() for t in tensors]
    wide = [t.double() if t.dtype.is_floating_point else t for t in cpu_tensors]
    ref_outputs, ref_grads, _ = _outputs_and_grads(fn, "reference", wide, grad_flags,
                                                   tuple(u.cpu().double() for u in upstreams))
    low_outputs, low_grads, _ = _outputs_and_grads(fn, "reference", cpu_tensors, grad_flags,
                                                   tuple(u.cpu() for u in upstreams))
    for index, (out, ref, low) in enumerate(zip(outputs, ref_outputs, low_outputs)):
        assert_close_to_reference(out, ref, f"{what} output {index}", eager=low)
    differentiable = [t for t, flag in zip(tensors, grad_flags) if flag]
    for index, (grad, ref, low, x) in enumerate(zip(grads, ref_grads, low_grads, differentiable)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"{what} grad {index}: {grad.dtype} {grad.shape}"
        assert_close_to_reference(grad, ref, f"{what} grad {index}", eager=low, atol=grad_atol)
    return outputs, grads


def op_pair(family: str, backend: str):
    """The (forward, backward) custom ops of an op family on `backend` (its Triton twins are triton_<family>_*)."""
    prefix = "triton_" if backend == "triton" else ""
    return (getattr(torch.ops.kdkernels, f"{prefix}{family}_forward"),
            getattr(torch.ops.kdkernels, f"{prefix}{family}_backward"))


def assert_compiles_fullgraph(fn, *inputs, rtol, atol, grad_rtol, grad_atol):
    """torch.compile(fn, fullgraph=True) gives fn's eager value and its gradients w.r.t. the inputs that require
    grad (a graph break or a missing fake would raise)."""
    torch._dynamo.reset()
    differentiable = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected, differentiable)
    actual = torch.compile(fn, fullgraph=True)(*inputs)
    actual_grads = torch.autograd.grad(actual, differentiable)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=grad_rtol, atol=grad_atol)
