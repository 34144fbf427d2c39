"""dkd_loss, nkd_loss, dist_loss, top-k teachers and logit soft-capping: equal to the formulas as the reference
repositories write them (float64), finite where those are not, with clear errors for bad input."""
import math

import pytest
import torch

import kdkernels
from kd_testing import assert_close_to_reference, backend_params, check_op_against_reference, logits, \
    require_backend
from kdkernels.reference.dist import eager_dist
from kdkernels.reference.target_split import eager_dkd, eager_nkd

ALL_BACKENDS = backend_params() + ["reference"]


def device_of(backend):
    return require_backend(backend) if backend != "reference" else "cpu"


def labels_for(rows, classes, device, seed=0):
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed)).to(device)


def value_and_grad(fn, student, teacher):
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher)
    return loss, torch.autograd.grad(loss, student)[0]


def assert_matches_eager(backend, ours, eager, student, teacher, what):
    """ours(student, teacher) on `backend` against eager(...) in float64 (and in the input precision for slack)."""
    loss, grad = value_and_grad(ours, student, teacher)
    ref_loss, ref_grad = value_and_grad(eager, student.cpu().double(), teacher.cpu().double())
    # slack: twice the error of the eager formula itself evaluated in the inputs' precision
    low_loss, low_grad = value_and_grad(eager, student.cpu(), teacher.cpu())
    assert_close_to_reference(loss, ref_loss, f"{what} loss", eager=low_loss)
    assert_close_to_reference(grad, ref_grad, f"{what} grad", eager=low_grad)
    return loss, grad


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dist_equals_dist_kd(backend, dtype):
    device = device_of(backend)
    student, teacher = logits((16, 100), dtype, device, seed=12), logits((16, 100), dtype, device, seed=13)
    for temperature, beta, gamma in ((1.0, 1.0, 1.0), (4.0, 2.0, 0.5)):
        assert_matches_eager(backend,
                             lambda s, t: kdkernels.dist_loss(s, t, temperature, beta, gamma, backend=backend),
                             lambda s, t: eager_dist(s, t, beta, gamma, temperature), student, teacher, "dist")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("rows,classes,scale,temperature",
                         [(2, 10, 3.0, 1.0), (4, 100, 3.0, 0.1), (16, 2, 3.0, 1.0), (16, 100, 50.0, 1.0),
                          (4, 10, 3.0, 30.0)],
                         ids=["two-rows", "four-rows-low-T", "two-classes", "saturated", "high-T"])
def test_dist_equals_dist_kd_where_it_is_ill_conditioned(backend, rows, classes, scale, temperature):
    """Few rows or classes, saturated softmaxes, low and high T (see test_ops_dist.REGIMES), fp32: within the
    flash-attention criterion of DIST_KD's own code. (The fp32 reference backend is that code, not held to it.)"""
    device = require_backend(backend)
    for seed in range(3):
        student = logits((rows, classes), torch.float32, device, scale=scale, seed=40 + 2 * seed)
        teacher = logits((rows, classes), torch.float32, device, scale=scale, seed=41 + 2 * seed)
        assert_matches_eager(backend, lambda s, t: kdkernels.dist_loss(s, t, temperature, 2.0, 0.5, backend=backend),
                             lambda s, t: eager_dist(s, t, 2.0, 0.5, temperature), student, teacher, "dist")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dist_batch_of_one(backend):
    device = device_of(backend)
    student, teacher = logits((1, 10), device=device), logits((1, 10), device=device, seed=1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        kdkernels.dist_loss(student, teacher, backend=backend)
    inter_only = kdkernels.dist_loss(student, teacher, gamma=0.0, backend=backend)
    expected = eager_dist(student.double().cpu(), teacher.double().cpu(), gamma=0.0)
    assert abs(inter_only.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("convention", ["renormalize", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_topk_with_every_class_equals_the_dense_loss(backend, convention, dtype):
    device = device_of(backend)
    student, teacher = logits((5, 40), dtype, device, seed=14), logits((5, 40), dtype, device, seed=15)
    log_probs, indices = torch.log_softmax(teacher.double(), -1).topk(40)  # every class, sorted
    temperature = 2.0 if convention == "renormalize" else 1.0
    labels = torch.tensor([0, -100, 2, 3, 4], device=device)

    def sparse(s, t):
        return kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs.to(dtype), teacher_topk_indices=indices,
                                 temperature=temperature, topk_convention=convention, labels=labels,
                                 backend=backend)

    def dense(s, t):
        return kdkernels.kd_loss(s, t, temperature, labels=labels, backend="reference")

    assert_matches_eager(backend, sparse, dense, student, teacher, f"top-k ({convention})")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_conventions_on_a_partial_support(backend):
    """k < V against the conventions written out with dense float64 tensors."""
    device = device_of(backend)
    student, teacher = logits((4, 30), torch.float32, device, seed=16), logits((4, 30), torch.float64, seed=17)
    log_p_t = torch.log_softmax(teacher, -1)
    log_probs, indices = log_p_t.topk(6)
    indices = indices.to(device)

    def renormalized(s, t):
        q = torch.softmax(log_probs.to(s.dtype) / 3.0, -1)
        log_p_s = torch.log_softmax(s / 3.0, -1).gather(1, indices.cpu())
        return (q * (q.log() - log_p_s)).sum() / 4 * 9.0

    def tail(s, t):
        q = log_probs.to(s.dtype).exp()
        p_s = torch.softmax(s, -1)
        p_in = p_s.gather(1, indices.cpu())
        q_tail, p_tail = 1 - q.sum(-1), 1 - p_in.sum(-1)
        return ((q * (q.log() - p_in.log())).sum(-1) + q_tail * (q_tail.log() - p_tail.log())).sum() / 4

    for convention, temperature, eager in (("renormalize", 3.0, renormalized), ("tail", 1.0, tail)):
        assert_matches_eager(
            backend, lambda s, t: kdkernels.kd_loss(s, None, temperature, teacher_topk_logprobs=log_probs.float().to(
                device), teacher_topk_indices=indices, topk_convention=convention, backend=backend),
            eager, student, teacher.to(device), convention)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logit_softcap(backend):
    device = device_of(backend)
    student, teacher = logits((4, 50), torch.float32, device, seed=18, scale=40.0), logits((4, 50), torch.float32,
                                                                                         device, seed=19, scale=40.0)
    cap = 30.0
    assert_matches_eager(
        backend, lambda s, t: kdkernels.kd_loss(s, t, 2.0, logit_softcap=cap, backend=backend),
        lambda s, t: kdkernels.kd_loss(cap * torch.tanh(s / cap), cap * torch.tanh(t / cap), 2.0, backend="reference"),
        student, teacher, "softcap")


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = require_backend(backend)
    student = logits((6, 64), device=device, seed=20).requires_grad_()
    teacher = logits((6, 64), device=device, seed=21)
    labels = labels_for(6, 64, device, 3)
    log_probs, indices = torch.log_softmax(teacher, -1).topk(8)

    def distill(s, t):
        return (kdkernels.dkd_loss(s, t, labels, backend=backend) + kdkernels.dist_loss(s, t, backend=backend)
                + kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices,
                                    backend=backend))

    torch._dynamo.reset()
    expected = distill(student, teacher)
    (expected_grad,) = torch.autograd.grad(expected, student)
    actual = torch.compile(distill, fullgraph=True)(student, teacher)
    (actual_grad,) = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_nn_modules_match_the_functions():
    student, teacher = logits((6, 30), seed=22), logits((6, 30), seed=23)
    labels = labels_for(6, 30, "cpu", 4)
    pairs = [(kdkernels.nn.DKDLoss(2.0, 0.5, 4.0)(student, teacher, labels),
              kdkernels.dkd_loss(student, teacher, labels, 2.0, 0.5, 4.0)),
             (kdkernels.nn.NKDLoss(1.0, 2.0)(student, teacher, labels),
              kdkernels.nkd_loss(student, teacher, labels, 1.0, 2.0)),
             (kdkernels.nn.DISTLoss(4.0, 2.0, 1.0)(student, teacher), kdkernels.dist_loss(student, teacher, 4.0, 2.0)),
             (kdkernels.nn.KDLoss(2.0, logit_softcap=5.0)(student, teacher),
              kdkernels.kd_loss(student, teacher, 2.0, logit_softcap=5.0))]
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
    (lambda s, t, y: kdkernels.dist_loss(s, t, temperature=0), ValueError, "temperature must be positive"),
    (lambda s, t, y: kdkernels.kd_loss(s), TypeError, "needs teacher_logits"),
    (lambda s, t, y: kdkernels.kd_loss(s, t, teacher_topk_logprobs=t[:, :3], teacher_topk_indices=y[:, None]),
     ValueError, "not both"),
    (lambda s, t, y: kdkernels.kd_loss(s, teacher_topk_logprobs=t[:, :2], teacher_topk_indices=y[:, None]),
     ValueError, "same shape"),
    (lambda s, t, y: kdkernels.kd_loss(s, teacher_topk_logprobs=t[:, :1], teacher_topk_indices=y[:, None] + 30),
     ValueError, r"teacher_topk_indices must be in \[0, 30\)"),
    (lambda s, t, y: kdkernels.kd_loss(s, teacher_topk_logprobs=t[:, :1], teacher_topk_indices=y[:, None],
                                       topk_convention="tail", temperature=2.0), ValueError, "needs temperature=1"),
    (lambda s, t, y: kdkernels.kd_loss(s, teacher_topk_logprobs=t[:, :1], teacher_topk_indices=y[:, None],
                                       divergence="reverse"), ValueError, "divergence='forward' only"),
    (lambda s, t, y: kdkernels.kd_loss(s, t, logit_softcap=-1.0), ValueError, "logit_softcap must be positive"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    student, teacher = logits((6, 30), seed=24), logits((6, 30), seed=25)
    with pytest.raises(error, match=match):
        call(student, teacher, labels_for(6, 30, "cpu"))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_of_one_and_all_ignored_rows(backend):
    device = device_of(backend)
    student, teacher = logits((1, 12), device=device, seed=26), logits((1, 12), device=device, seed=27)
    label = torch.tensor([3], device=device)
    loss = kdkernels.dkd_loss(student, teacher, label, backend=backend)
    expected = eager_dkd(student.double().cpu(), teacher.double().cpu(), label.cpu())
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    log_probs, indices = torch.log_softmax(logits((3, 12), device=device, seed=28), -1).topk(4)
    s = logits((3, 12), device=device, seed=29).requires_grad_()
    ignored = kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices,
                                labels=torch.full((3,), -100, device=device), backend=backend)
    ignored.backward()
    assert ignored.item() == 0.0 and (s.grad == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_dist_loss_does_not_synchronise(backend, monkeypatch):
    device = require_backend(backend)
    student = logits((4, 30), device=device, seed=30).requires_grad_()
    teacher = logits((4, 30), device=device, seed=31)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside the loss")

    for name in ("item", "__bool__", "tolist", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = kdkernels.dist_loss(student, teacher, backend=backend)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_float64(backend):
    """Finite differences through every new fused op, both inputs (top-k: the student)."""
    device = require_backend(backend)
    student = logits((3, 7), torch.float64, device, seed=32).requires_grad_()
    teacher = logits((3, 7), torch.float64, device, seed=33).requires_grad_()
    labels = torch.tensor([0, 6, 3], device=device)
    log_probs, indices = torch.log_softmax(logits((3, 7), torch.float64, device, seed=34), -1).topk(3)
    checks = [
        lambda s, t: kdkernels.dkd_loss(s, t, labels, 1.7, 1.0, 2.0, "sum", backend=backend),
        lambda s, t: torch.stack(kdkernels.dkd_loss(s, t, labels, 0.8, return_parts=True, backend=backend)),
        lambda s, t: kdkernels.dist_loss(s, t, 1.3, 1.0, 0.5, backend=backend),
        lambda s, t: kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices,
                                       temperature=1.0, topk_convention="tail", backend=backend) + 0 * t.sum(),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (student, teacher))
    assert torch.autograd.gradcheck(lambda s: kdkernels.nkd_loss(s, teacher.detach(), labels, 2.0, backend=backend),
                                    (student,))
