"""softmax_jsd kernels (cpu, cuda, triton) against the float64 reference, and kd_loss(divergence="jsd")."""
import math

import pytest
import torch

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, check_against_reference, logits, masked, \
    require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def grad_atol(dtype, temperature, beta, upstream=1.5):
    """Absolute error any implementation of the JSD gradient carries: each element is
    g/T * p * (log p - log m - KL), a difference of terms up to ~ (1 + |log beta| + |log(1 - beta)|) that cancels to
    ~0 for peaked rows, so its rounding is a few eps of g/T times that (g = upstream * T**2 here: 'none' and 'sum')."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 32 * eps * upstream * temperature * (1 + abs(math.log(beta)) + abs(math.log1p(-beta)))


def check_jsd(backend, student, teacher, temperature, beta, reduction="none", **kwargs):
    return check_against_reference(backend, student, teacher, temperature, reduction, divergence="jsd", beta=beta,
                                   grad_atol=grad_atol(student.dtype, temperature, beta), **kwargs)


def jsd_backend(name):
    device = require_backend(name)
    assert "softmax_jsd" in kdkernels.backends.INSTALLED[name].ops, f"the {name} backend has no softmax_jsd kernel"
    return device


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_matches_reference(backend, dtype, beta):
    device = jsd_backend(backend)
    student, teacher = logits((6, 300), dtype, device, seed=1), logits((6, 300), dtype, device, seed=2)
    check_jsd(backend, student, teacher, 2.0, beta)
    check_jsd(backend, student, teacher, 2.0, beta, "sum", teacher_grad=False)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_mixture_kls_are_unbiased(backend, beta):
    """Over many rows the fp32 mixture KLs' relative errors average to ~0: beta (resp. 1 - beta) rounded to fp32
    inside log1p((1 - beta) expm1(d)), or p formed against a rounded log_sum, would shift every row's KL the same way
    by 1-6 ulp, which adds up in a summed loss (the eager formula's errors are larger per row, but unbiased)."""
    device = jsd_backend(backend)
    student, teacher = logits((400, 300), torch.float32, device, seed=1), logits((400, 300), torch.float32, device,
                                                                                 seed=2)
    forward = torch.ops.kdkernels.triton_softmax_jsd_forward if backend == "triton" \
        else torch.ops.kdkernels.softmax_jsd_forward
    *_, mixture_kl = forward(student, teacher, 2.0, beta)
    log_p_s = torch.log_softmax(student.cpu().double() / 2.0, dim=1)
    log_p_t = torch.log_softmax(teacher.cpu().double() / 2.0, dim=1)
    log_m = torch.logaddexp(math.log(beta) + log_p_t, math.log1p(-beta) + log_p_s)
    exact = torch.stack([(log_p_t.exp() * (log_p_t - log_m)).sum(1), (log_p_s.exp() * (log_p_s - log_m)).sum(1)], 1)
    ulps = (mixture_kl.cpu().double() - exact) / exact.abs() / torch.finfo(torch.float32).eps
    bias = ulps.mean(dim=0)
    assert bias.abs().max() < 0.5, f"mixture KLs biased by {bias.tolist()} ulp (sd {ulps.std(dim=0).tolist()})"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["logits~1", "logits~1e4"])
@pytest.mark.parametrize("classes", [2, 9000], ids=["V2", "V9000"])
def test_temperatures_extreme_logits_and_sizes(backend, temperature, scale, classes):
    device = jsd_backend(backend)
    student = logits((4, classes), torch.float32, device, scale, 3)
    teacher = logits((4, classes), torch.float32, device, scale, 4)
    loss, grads = check_jsd(backend, student, teacher, temperature, 0.3)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4], ids=["logits~1", "logits~1e3", "logits~1e4"])
def test_saturated_softmax_gradients(backend, temperature, scale):
    """Low T, from moderate to saturated rows (two tiles of the Triton kernels): the mixture KLs that the backward
    subtracts from each log-ratio must be accurate to a few ulp (fp64 row sums, log1p to a few ulp below -0.3)."""
    device = jsd_backend(backend)
    student = logits((4, 5000), torch.float32, device, scale, 13)
    teacher = logits((4, 5000), torch.float32, device, scale, 14)
    check_jsd(backend, student, teacher, temperature, 0.5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_negative_infinity_entries(backend, dtype):
    device = jsd_backend(backend)
    student, teacher = masked(dtype, device)
    student[0, :] = float("-inf")  # a row whose student is entirely -inf: empty for the JSD
    loss, (grad_student, grad_teacher) = check_jsd(backend, student, teacher, 2.0, 0.4)
    assert torch.isfinite(loss).all() and loss[0].item() == 0.0 and loss[3].item() == 0.0
    for grad in (grad_student, grad_teacher):
        assert torch.isfinite(grad).all() and (grad[0] == 0).all() and (grad[3] == 0).all()
        assert (grad[1, ::3] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_never_nan_when_both_probabilities_underflow(backend):
    """Disjoint peaked rows: every log-probability but the peaks is far below -100, where a mixture formed in
    probability space is 0 and 0 * log 0 gives NaN (Liger-Kernel #1453). In log space: about ln 2 per row."""
    device = jsd_backend(backend)
    student = torch.full((3, 64), -50.0, device=device)
    teacher = torch.full((3, 64), -50.0, device=device)
    student[:, 0] = 50.0
    teacher[:, 1] = 50.0
    loss, grads = check_jsd(backend, student, teacher, 0.5, 0.5)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss.cpu(), torch.full((3,), math.log(2) * 0.25), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_half_is_symmetric_and_endpoints_are_the_kls(backend):
    device = jsd_backend(backend)
    student, teacher = logits((5, 77), device=device, seed=5), logits((5, 77), device=device, seed=6)
    jsd = lambda s, t, beta: kdkernels.kd_loss(s, t, 2.0, divergence="jsd", beta=beta, backend=backend)  # noqa: E731
    torch.testing.assert_close(jsd(student, teacher, 0.5), jsd(teacher, student, 0.5), rtol=1e-6, atol=0)
    forward = kdkernels.kd_loss(student, teacher, 2.0, backend=backend)
    reverse = kdkernels.kd_loss(student, teacher, 2.0, divergence="reverse", backend=backend)
    assert torch.equal(jsd(student, teacher, 0.0), forward) and torch.equal(jsd(student, teacher, 1.0), reverse)
    assert jsd(student, teacher, 0.5) <= (forward + reverse) / 4  # JS <= J / 4 (Lin 1991)


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_float64(backend):
    device = jsd_backend(backend)
    student = logits((3, 7), torch.float64, device, seed=7).requires_grad_()
    teacher = logits((3, 7), torch.float64, device, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: kdkernels.kd_loss(s, t, 1.3, reduction="none", divergence="jsd", beta=0.35, backend=backend),
        (student, teacher))


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = jsd_backend(backend)
    if backend == "triton":
        forward, backward = torch.ops.kdkernels.triton_softmax_jsd_forward, torch.ops.kdkernels.triton_softmax_jsd_backward
    else:
        forward, backward = torch.ops.kdkernels.softmax_jsd_forward, torch.ops.kdkernels.softmax_jsd_backward
    for requires_grad in (False, True):
        student = logits((4, 19), device=device, seed=9).requires_grad_(requires_grad)
        teacher = logits((4, 19), device=device, seed=10).requires_grad_(requires_grad)
        torch.library.opcheck(forward, (student, teacher, 2.0, 0.25))
    _, stats_s, stats_t, mixture = forward(student.detach(), teacher.detach(), 2.0, 0.25)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (torch.rand(4, device=device), student.detach(), teacher.detach(), stats_s,
                                         stats_t, mixture, 2.0, 0.25, *flags))


@pytest.mark.parametrize("backend", backend_params() + ["reference"])
def test_compile_fullgraph(backend):
    device = jsd_backend(backend) if backend != "reference" else "cpu"
    student = logits((5, 64), device=device, seed=11).requires_grad_()
    teacher = logits((5, 64), device=device, seed=12)

    def distill(s, t):
        return kdkernels.kd_loss(s, t, 2.0, divergence="jsd", beta=0.7, backend=backend)

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-5, atol=1e-7, grad_rtol=1e-5,
                              grad_atol=1e-8)
