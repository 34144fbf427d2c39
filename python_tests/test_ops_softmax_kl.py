"""softmax_kl kernels (cpu, cuda, triton) against the float64 reference: forward, backward, edge cases, opcheck,
gradcheck and torch.compile."""
import pytest
import torch

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, check_against_reference, logits, loss_and_grads, \
    masked, op_pair, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, dtype, reduction):
    device = require_backend(backend)
    student, teacher = logits((6, 300), dtype, device, seed=1), logits((6, 300), dtype, device, seed=2)
    check_against_reference(backend, student, teacher, 2.0, reduction)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_student_only_gradient(backend, dtype):
    device = require_backend(backend)
    student, teacher = logits((4, 50), dtype, device, seed=3), logits((4, 50), dtype, device, seed=4)
    check_against_reference(backend, student, teacher, 4.0, teacher_grad=False)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("classes", [1, 2, 3, 9000, 262144],
                         ids=["V1", "V2", "V3", "V9000-several-blocks", "V262144"])
def test_class_counts(backend, dtype, classes):
    device = require_backend(backend)
    student, teacher = logits((3, classes), dtype, device, seed=5), logits((3, classes), dtype, device, seed=6)
    check_against_reference(backend, student, teacher, 1.0, "sum")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["logits~1", "logits~1e4"])
def test_temperatures_and_extreme_logits(backend, temperature, scale):
    device = require_backend(backend)
    student, teacher = logits((5, 257), torch.float32, device, scale, 7), logits((5, 257), torch.float32, device,
                                                                                 scale, 8)
    loss, grads = check_against_reference(backend, student, teacher, temperature, "none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divergence", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1e3, 1e4], ids=["logits~1e3", "logits~1e4"])
@pytest.mark.parametrize("classes", [257, 5000], ids=["V257", "V5000"])
def test_saturated_softmax_gradients(backend, divergence, temperature, scale, classes):
    """Low T and large logits (|x| / T ~ 1e3..1e5, rows nearly one-hot; V5000 spans several tiles / chunks): the loss
    and both gradients within the criterion. Log-probabilities must be (x - max) / T - log_sum, exponentiated without
    a rounded conversion to log2 units, and where the teacher is one-hot the teacher gradient's log-ratio minus the
    loss must cancel exactly, as in the eager formula (forward and backward round the same value alike)."""
    device = require_backend(backend)
    student = logits((4, classes), torch.float32, device, scale, 11)
    teacher = logits((4, classes), torch.float32, device, scale, 12)
    check_against_reference(backend, student, teacher, temperature, "none", divergence=divergence)
    check_against_reference(backend, student, teacher, temperature, "batchmean", divergence=divergence)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_negative_infinity_entries(backend, dtype):
    device = require_backend(backend)
    student, teacher = masked(dtype, device)
    loss, (grad_student, grad_teacher) = check_against_reference(backend, student, teacher, 2.0, "none")
    assert torch.isfinite(loss).all()
    assert loss[3].item() == 0.0, "a row that is entirely -inf gives loss 0"
    for grad in (grad_student, grad_teacher):
        assert torch.isfinite(grad).all()
        assert (grad[3] == 0).all(), "a row that is entirely -inf gives gradient 0"
        assert (grad[1, ::3] == 0).all(), "entries -inf in both get gradient 0"
    assert (grad_teacher[2, 5:20] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divergence", ["reverse", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_reverse_and_symmetric_divergences(backend, divergence, dtype):
    device = require_backend(backend)
    student, teacher = logits((5, 700), dtype, device, seed=31), logits((5, 700), dtype, device, seed=32)
    check_against_reference(backend, student, teacher, 2.0, "none", divergence=divergence)
    check_against_reference(backend, student, teacher, 0.5, "batchmean", divergence=divergence,
                            labels=torch.tensor([0, -100, 2, 3, 4], device=device))
    if divergence == "reverse":  # -inf in both, -inf only where p_s is the target (student), an all -inf row
        masked_teacher, masked_student = masked(dtype, device)
        loss, grads = check_against_reference(backend, masked_student, masked_teacher, 2.0, "none",
                                              divergence=divergence)
        assert torch.isfinite(loss).all() and loss[3].item() == 0.0
        assert all(torch.isfinite(g).all() and (g[3] == 0).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params())
def test_student_negative_infinity_under_finite_teacher_is_infinite(backend):
    device = require_backend(backend)
    student, teacher = logits((3, 3000), device=device, seed=11), logits((3, 3000), device=device, seed=12)
    student[0, 4] = float("-inf")  # one entry
    student[2] = float("-inf")  # the whole row
    student = student.requires_grad_()
    loss = kdkernels.kd_loss(student, teacher, 1.0, reduction="none", backend=backend)
    assert loss[0].item() == float("inf") and loss[2].item() == float("inf") and torch.isfinite(loss[1])
    (grad,) = torch.autograd.grad(loss[1], student)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all() and (grad[2] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_ignore_index_rows(backend):
    device = require_backend(backend)
    student, teacher = logits((2, 5, 33), device=device, seed=13), logits((2, 5, 33), device=device, seed=14)
    labels = torch.tensor([[1, -100, 3, 4, -100], [0, 0, -100, 7, 2]], device=device)
    for reduction in REDUCTIONS:
        check_against_reference(backend, student, teacher, 2.0, reduction, labels=labels)
    student[0, 1] = float("nan")  # an ignored row's content never reaches the loss or the kernels' gradient
    loss, (grad_student, grad_teacher), _ = loss_and_grads(backend, student, teacher, 2.0, "batchmean",
                                                           labels=labels)
    kept = labels != -100
    expected = kdkernels.kd_loss(student[kept], teacher[kept], 2.0, backend="reference")
    torch.testing.assert_close(loss.cpu(), expected.cpu(), rtol=1e-5, atol=0)
    assert (grad_student[~kept] == 0).all() and (grad_teacher[~kept] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_all_rows_ignored_gives_zero(backend):
    device = require_backend(backend)
    student, teacher = logits((3, 8), device=device), logits((3, 8), device=device, seed=1)
    labels = torch.full((3,), -1, device=device)
    for reduction in ("batchmean", "mean", "sum"):
        loss, (grad_student, _), _ = loss_and_grads(backend, student, teacher, 1.0, reduction, labels=labels,
                                                    ignore_index=-1)
        assert loss.item() == 0.0 and (grad_student == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_and_batched_inputs(backend):
    device = require_backend(backend)
    wide = logits((6, 80), device=device, seed=15)
    student = wide[:, 10:70]  # row stride 80
    teacher = logits((60, 6), device=device, seed=16).t()  # last dim strided
    assert not student.is_contiguous() and teacher.stride(-1) != 1
    check_against_reference(backend, student, teacher, 3.0, "batchmean")
    batched_s, batched_t = logits((2, 3, 4, 25), device=device, seed=17), logits((2, 3, 4, 25), device=device,
                                                                               seed=18)
    loss, _ = check_against_reference(backend, batched_s, batched_t, 3.0, "none")
    assert loss.shape == (2, 3, 4)


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_input_dtypes(backend):
    device = require_backend(backend)
    student = logits((4, 100), torch.bfloat16, device, seed=19)
    teacher = logits((4, 100), torch.float32, device, seed=20)
    check_against_reference(backend, student, teacher, 2.0, "sum")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_float64(backend, reduction):
    device = require_backend(backend)
    student = logits((3, 7), torch.float64, device, seed=21).requires_grad_()
    teacher = logits((3, 7), torch.float64, device, seed=22).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: kdkernels.kd_loss(s, t, 1.7, reduction=reduction, backend=backend), (student, teacher))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(backend, dtype):
    device = require_backend(backend)
    forward, backward = op_pair("softmax_kl", backend)
    for requires_grad in (False, True):
        student = logits((4, 19), dtype, device, seed=23).requires_grad_(requires_grad)
        teacher = logits((4, 19), dtype, device, seed=24).requires_grad_(requires_grad)
        torch.library.opcheck(forward, (student, teacher, 2.0))
    loss, lse_s, lse_t = forward(student.detach(), teacher.detach(), 2.0)
    grad = torch.rand_like(loss)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (grad, student.detach(), teacher.detach(), lse_s, lse_t, loss, 2.0, *flags))


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton")) + ["reference"])
def test_compile_fullgraph(backend):
    device = require_backend(backend) if backend != "reference" else "cpu"
    student = logits((5, 64), device=device, seed=25).requires_grad_()
    teacher = logits((5, 64), device=device, seed=26)
    labels = torch.tensor([0, -100, 2, 3, 4], device=device)

    def distill(s, t):
        return kdkernels.kd_loss(s, t, 4.0, labels=labels, backend=backend) + 0.1 * s.logsumexp(-1).mean()

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-5, atol=1e-6, grad_rtol=1e-5,
                              grad_atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_backward_saves_only_inputs_and_row_statistics(backend):
    """The autograd graph keeps the two inputs and [N] per-row statistics: no probability tensor."""
    device = require_backend(backend)
    student = logits((8, 500), device=device, seed=27).requires_grad_()
    teacher = logits((8, 500), device=device, seed=28).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kdkernels.kd_loss(student, teacher, 2.0, backend=backend)
    big = [t for t in saved if t.numel() >= student.numel()]
    assert all(t.data_ptr() in (student.data_ptr(), teacher.data_ptr()) for t in big), \
        f"saved a new [N, V] tensor: {[tuple(t.shape) for t in big]}"
    rows = student.shape[0]
    small = [t for t in saved if t.numel() < student.numel()]
    assert small and all(t.shape[0] == rows and t.numel() <= 2 * rows for t in small), \
        f"saved more than per-row statistics: {[tuple(t.shape) for t in small]}"


@pytest.mark.parametrize("backend", backend_params())
def test_no_host_synchronisation(backend, monkeypatch):
    """No .item()/bool()/nonzero on tensors inside the loss (each would block on a GPU)."""
    device = require_backend(backend)
    student = logits((4, 30), device=device, seed=29).requires_grad_()
    teacher = logits((4, 30), device=device, seed=30)
    labels = torch.tensor([1, -100, 2, 3], device=device)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside the loss")

    for name in ("item", "__bool__", "tolist", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = kdkernels.kd_loss(student, teacher, 2.0, labels=labels, backend=backend)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(student.grad).all()
