"""dkd_loss and nkd_loss (kdkernels/losses/decoupled.py, on the fused target_split op) against mdistiller's DKD and
NKD's official code (kdkernels.reference.target_split.eager_dkd / eager_nkd) in float64, finite where those are not,
with clear errors for bad input."""
import pytest
import torch

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, logits, require_backend
from kdkernels.reference.target_split import eager_dkd, eager_nkd
from losses_testing import ALL_BACKENDS, assert_matches_eager, device_of, labels_for


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_dkd_equals_mdistiller(backend, dtype, reduction):
    device = device_of(backend)
    student, teacher = logits((8, 100), dtype, device, seed=1), logits((8, 100), dtype, device, seed=2)
    labels = labels_for(8, 100, device)
    rows = 8 if reduction == "batchmean" else 1

    def eager(s, t):
        per_row = [eager_dkd(s[i:i + 1], t[i:i + 1], labels[i:i + 1].cpu(), 1.0, 8.0, 4.0) for i in range(8)]
        stacked = torch.stack(per_row)
        return stacked if reduction == "none" else stacked.sum() / rows

    def ours(s, t):
        return kdkernels.dkd_loss(s, t, labels, 4.0, 1.0, 8.0, reduction, backend=backend)

    if reduction == "none":
        ours_sum = lambda s, t: ours(s, t).sum()  # noqa: E731
        eager_sum = lambda s, t: eager(s, t).sum()  # noqa: E731
        assert_matches_eager(backend, ours_sum, eager_sum, student, teacher, "dkd rows")
        assert ours(student, teacher).shape == (8,)
    else:
        assert_matches_eager(backend, ours, eager, student, teacher, "dkd")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dkd_parts_and_the_kl_identity(backend):
    device = device_of(backend)
    student, teacher = logits((6, 50), torch.float64, device, seed=3), logits((6, 50), torch.float64, device, seed=4)
    labels = labels_for(6, 50, device, 1)
    tckd, nckd = kdkernels.dkd_loss(student, teacher, labels, 2.0, reduction="none", return_parts=True,
                                    backend=backend)
    ref_tckd, ref_nckd = eager_dkd(student.cpu(), teacher.cpu(), labels.cpu(), temperature=2.0, return_parts=True)
    assert torch.allclose(tckd.sum().cpu() / 6, ref_tckd, rtol=1e-10) and torch.allclose(nckd.sum().cpu() / 6,
                                                                                       ref_nckd, rtol=1e-10)
    p_t_target = torch.softmax(teacher / 2.0, -1).gather(1, labels[:, None]).squeeze(1)
    kl = kdkernels.kd_loss(student, teacher, 2.0, reduction="none", backend=backend)  # already T²-scaled
    assert torch.allclose(tckd + (1 - p_t_target) * nckd, kl, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dkd_finite_where_mdistiller_is_not(backend, dtype):
    """Two classes, and a target 100·T above the rest: mdistiller's log of a summed softmax bin is log 0 = -inf
    (NaN once multiplied by a zero teacher bin); the log-space DKD stays finite and close to the float64 truth."""
    device = device_of(backend)
    temperature = 1.0
    for classes in (2, 10):
        student = logits((4, classes), torch.float64, seed=5, scale=1.0)
        teacher = logits((4, classes), torch.float64, seed=6, scale=1.0)
        labels = torch.tensor([0, 1, 1, 0])
        student[torch.arange(4), labels] += 120 * temperature
        teacher[torch.arange(4), labels] += 110 * temperature
        eager = eager_dkd(student.to(dtype).float(), teacher.to(dtype).float(), labels, temperature=temperature)
        assert not torch.isfinite(eager), "the reference formula should break on these inputs"
        s, t = student.to(dtype).to(device).requires_grad_(), teacher.to(dtype).to(device)
        loss = kdkernels.dkd_loss(s, t, labels.to(device), temperature, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        truth = kdkernels.dkd_loss(s.detach().double().cpu(), t.double().cpu(), labels, temperature,
                                   backend="reference")
        assert abs(loss.item() - truth.item()) <= 1e-5 * abs(truth.item()) + 1e-30


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dkd_batch_of_one(backend):
    device = device_of(backend)
    student, teacher = logits((1, 12), device=device, seed=26), logits((1, 12), device=device, seed=27)
    label = torch.tensor([3], device=device)
    loss = kdkernels.dkd_loss(student, teacher, label, backend=backend)
    expected = eager_dkd(student.double().cpu(), teacher.double().cpu(), label.cpu())
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_nkd_equals_cls_kd(backend, temperature):
    device = device_of(backend)
    student, teacher = logits((8, 60), torch.float32, device, seed=7), logits((8, 60), torch.float32, device, seed=8)
    labels = labels_for(8, 60, device, 2)
    assert_matches_eager(backend, lambda s, t: kdkernels.nkd_loss(s, t, labels, temperature, 1.5, backend=backend),
                         lambda s, t: eager_nkd(s, t, labels.cpu(), temperature, 1.5), student, teacher, "nkd")
    soft = torch.softmax(logits((8, 60), torch.float32, device, seed=9), -1)  # mixup-style soft labels -> argmax
    assert_matches_eager(backend, lambda s, t: kdkernels.nkd_loss(s, t, soft, temperature, backend=backend),
                         lambda s, t: eager_nkd(s, t, soft.cpu().double(), temperature), student, teacher, "nkd soft")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nkd_treats_the_teacher_as_a_constant(backend):
    device = device_of(backend)
    student = logits((4, 20), device=device, seed=10).requires_grad_()
    teacher = logits((4, 20), device=device, seed=11).requires_grad_()
    kdkernels.nkd_loss(student, teacher, labels_for(4, 20, device), backend=backend).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = require_backend(backend)
    student = logits((6, 64), device=device, seed=20).requires_grad_()
    teacher = logits((6, 64), device=device, seed=21)
    labels = labels_for(6, 64, device, 3)

    def distill(s, t):
        return kdkernels.dkd_loss(s, t, labels, backend=backend)

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-5, atol=1e-6, grad_rtol=1e-5,
                              grad_atol=1e-7)


def test_nn_modules_match_the_functions():
    student, teacher = logits((6, 30), seed=22), logits((6, 30), seed=23)
    labels = labels_for(6, 30, "cpu", 4)
    pairs = [(kdkernels.nn.DKDLoss(2.0, 0.5, 4.0)(student, teacher, labels),
              kdkernels.dkd_loss(student, teacher, labels, 2.0, 0.5, 4.0)),
             (kdkernels.nn.NKDLoss(1.0, 2.0)(student, teacher, labels),
              kdkernels.nkd_loss(student, teacher, labels, 1.0, 2.0))]
    for module_value, function_value in pairs:
        assert torch.equal(module_value, function_value)
    assert "beta=4.0" in repr(kdkernels.nn.DKDLoss(2.0, 0.5, 4.0))


@pytest.mark.parametrize("call,error,match", [
    (lambda s, t, y: kdkernels.dkd_loss(s, t, y + 100), ValueError, r"labels must be class indices in \[0, 30\)"),
    (lambda s, t, y: kdkernels.dkd_loss(s, t, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda s, t, y: kdkernels.dkd_loss(s, t, y[:3]), ValueError, "leading shape"),
    (lambda s, t, y: kdkernels.dkd_loss(s, t, y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda s, t, y: kdkernels.dkd_loss(s, t, y, alpha=float("nan")), ValueError, "alpha must be finite"),
    (lambda s, t, y: kdkernels.dkd_loss(s, t[:, :5], y), ValueError, "same shape"),
    (lambda s, t, y: kdkernels.nkd_loss(s, t, y, gamma="x"), TypeError, "gamma must be a real number"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    student, teacher = logits((6, 30), seed=24), logits((6, 30), seed=25)
    with pytest.raises(error, match=match):
        call(student, teacher, labels_for(6, 30, "cpu"))


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_float64(backend):
    """Finite differences through the fused DKD (both inputs) and NKD (the student; the teacher is a constant)."""
    device = require_backend(backend)
    student = logits((3, 7), torch.float64, device, seed=32).requires_grad_()
    teacher = logits((3, 7), torch.float64, device, seed=33).requires_grad_()
    labels = torch.tensor([0, 6, 3], device=device)
    checks = [
        lambda s, t: kdkernels.dkd_loss(s, t, labels, 1.7, 1.0, 2.0, "sum", backend=backend),
        lambda s, t: torch.stack(kdkernels.dkd_loss(s, t, labels, 0.8, return_parts=True, backend=backend)),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (student, teacher))
    assert torch.autograd.gradcheck(lambda s: kdkernels.nkd_loss(s, teacher.detach(), labels, 2.0, backend=backend),
                                    (student,))
