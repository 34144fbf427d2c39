"""kd_loss and KDLoss (kdkernels/losses/kd.py) against Hinton's eager formula (reference.softmax_kl), PaddleClas's
DMLLoss (symmetric), top-k teachers against the dense loss, logit soft-capping; reductions and argument validation."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, logits as scaled_logits, require_backend
from kdkernels.reference.softmax_kl import eager_hinton_kd
from losses_testing import ALL_BACKENDS, assert_equals_official, assert_matches_eager, device_of, labels_for, randn


def logits(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equals_the_eager_hinton_formula(temperature):
    student, teacher = logits((16, 100), 1, torch.float64), logits((16, 100), 2, torch.float64)
    expected = eager_hinton_kd(student, teacher, temperature)
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, temperature), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_divergences_equal_their_eager_formulas(temperature):
    student, teacher = logits((8, 40), 7, torch.float64), logits((8, 40), 8, torch.float64)
    forward = eager_hinton_kd(student, teacher, temperature)
    reverse = eager_hinton_kd(teacher, student, temperature)  # KL(p_s || p_t)
    log_p_s, log_p_t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    by_hand = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean() * temperature ** 2
    torch.testing.assert_close(reverse, by_hand, rtol=1e-12, atol=0)
    for divergence, expected in (("forward", forward), ("reverse", reverse),
                                 ("symmetric", (forward + reverse) / 2)):
        actual = kdkernels.kd_loss(student, teacher, temperature, divergence=divergence)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0, msg=divergence)


def test_reductions_relate_as_documented():
    student, teacher = logits((2, 3, 50), 3), logits((2, 3, 50), 4)
    per_row = kdkernels.kd_loss(student, teacher, 2.0, reduction="none")
    assert per_row.shape == (2, 3) and per_row.dtype == torch.float32
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="sum"), per_row.sum())
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0), per_row.sum() / 6)
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="mean"), per_row.sum() / (6 * 50))
    unscaled = kdkernels.kd_loss(student, teacher, 2.0, reduction="none", scale_by_t2=False)
    torch.testing.assert_close(unscaled * 4.0, per_row)
    mean_as_kldiv = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1),
                                               log_target=True, reduction="mean") * 4.0
    torch.testing.assert_close(kdkernels.kd_loss(student, teacher, 2.0, reduction="mean"), mean_as_kldiv)


def test_module_matches_functional():
    student, teacher = logits((8, 10), 5), logits((8, 10), 6)
    labels = torch.tensor([0, 1, -100, 3, 4, 5, -100, 7])
    criterion = kdkernels.nn.KDLoss(temperature=3.0, reduction="sum", divergence="symmetric")
    torch.testing.assert_close(criterion(student, teacher, labels),
                               kdkernels.kd_loss(student, teacher, 3.0, reduction="sum", labels=labels,
                                                 divergence="symmetric"))
    assert "temperature=3.0" in repr(criterion)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.nn.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kdkernels.nn.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="divergence"):
        kdkernels.nn.KDLoss(divergence="js")


GOOD = dict(student_logits=logits((4, 5)), teacher_logits=logits((4, 5), 1))

BAD_INPUTS = [
    (dict(student_logits=[[1.0, 2.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "teacher_logits must be float32"),
    (dict(student_logits=torch.ones(4, 5, dtype=torch.bool)), TypeError, "student_logits must be float32"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    (dict(student_logits=torch.empty(0, 5), teacher_logits=torch.empty(0, 5)), ValueError, "student_logits must not be empty"),
    (dict(student_logits=torch.empty(4, 0), teacher_logits=torch.empty(4, 0)), ValueError, "student_logits must not be empty"),
    (dict(teacher_logits=logits((4, 6))), ValueError, "same shape"),
    (dict(teacher_logits=logits((5, 4))), ValueError, "same shape"),
    (dict(teacher_logits=torch.zeros(4, 5, device="meta")), ValueError, "same device"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(temperature=-2.0), ValueError, "temperature must be positive"),
    (dict(temperature=float("inf")), ValueError, "temperature must be positive and finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be positive and finite"),
    (dict(temperature="4"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(scale_by_t2=1), TypeError, "scale_by_t2 must be a bool"),
    (dict(labels=torch.zeros(4, dtype=torch.float32)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels must have the logits' leading shape"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels must have the logits' leading shape"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=torch.zeros(4, dtype=torch.int64), ignore_index=0.5), TypeError, "ignore_index must be an int"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    (dict(divergence="jeffreys"), ValueError, "divergence must be one of"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta must be in"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta must be in"),
    (dict(divergence="jsd", beta="0.5"), TypeError, "beta must be a real number"),
    (dict(backend=3), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(changes, error, message):
    arguments = {**GOOD, "temperature": 2.0, **changes}
    student, teacher = arguments.pop("student_logits"), arguments.pop("teacher_logits")
    temperature = arguments.pop("temperature")
    with pytest.raises(error, match=message):
        kdkernels.kd_loss(student, teacher, temperature, **arguments)


def test_labels_on_another_device_are_rejected():
    with pytest.raises(ValueError, match="labels must be on the logits' device"):
        kdkernels.kd_loss(GOOD["student_logits"], GOOD["teacher_logits"],
                          labels=torch.zeros(4, dtype=torch.int64, device="meta"))


# ------------------------------------------------------------------------------------- symmetric KL (DMLLoss)

def paddle_dml(x, target, eps=1e-12):
    """PaddleClas ``DMLLoss`` (act softmax): symmetric KL, each ``target·log((target+eps)/(x+eps))·C``, mean."""
    x, target = F.softmax(x, dim=-1), F.softmax(target, dim=-1)
    kldiv = lambda a, b: b * torch.log((b + eps) / (a + eps)) * a.shape[-1]  # noqa: E731
    return ((kldiv(x, target) + kldiv(target, x)) / 2).mean()


@pytest.mark.parametrize("shape", [(6, 7), (32, 100)], ids=["6x7", "32x100"])
def test_symmetric_kd_is_paddleclas_dmlloss(shape):
    """Without DMLLoss's 1e-12 inside the logarithms: kd_loss is exact, and that eps alone moves the value by up to
    ~1e-7 (relative) on these logits."""
    student, teacher = randn(*shape, seed=14, scale=3.0, grad=True), randn(*shape, seed=15, scale=3.0, grad=True)
    assert_equals_official(lambda s, t: kdkernels.kd_loss(s, t, 1.0, divergence="symmetric"),
                           lambda s, t: paddle_dml(s, t, eps=0.0), student, teacher, what="symmetric kd")


# ---------------------------------------------------------------------------------- top-k teachers, soft-capping

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("convention", ["renormalize", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_topk_with_every_class_equals_the_dense_loss(backend, convention, dtype):
    device = device_of(backend)
    student, teacher = scaled_logits((5, 40), dtype, device, seed=14), scaled_logits((5, 40), dtype, device, seed=15)
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
    student = scaled_logits((4, 30), torch.float32, device, seed=16)
    teacher = scaled_logits((4, 30), torch.float64, seed=17)
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
def test_topk_with_every_row_ignored(backend):
    device = device_of(backend)
    log_probs, indices = torch.log_softmax(scaled_logits((3, 12), device=device, seed=28), -1).topk(4)
    s = scaled_logits((3, 12), device=device, seed=29).requires_grad_()
    ignored = kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices,
                                labels=torch.full((3,), -100, device=device), backend=backend)
    ignored.backward()
    assert ignored.item() == 0.0 and (s.grad == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logit_softcap(backend):
    device = device_of(backend)
    student = scaled_logits((4, 50), torch.float32, device, seed=18, scale=40.0)
    teacher = scaled_logits((4, 50), torch.float32, device, seed=19, scale=40.0)
    cap = 30.0
    assert_matches_eager(
        backend, lambda s, t: kdkernels.kd_loss(s, t, 2.0, logit_softcap=cap, backend=backend),
        lambda s, t: kdkernels.kd_loss(cap * torch.tanh(s / cap), cap * torch.tanh(t / cap), 2.0, backend="reference"),
        student, teacher, "softcap")


@pytest.mark.parametrize("backend", backend_params())
def test_topk_compile_fullgraph(backend):
    device = require_backend(backend)
    student = scaled_logits((6, 64), device=device, seed=20).requires_grad_()
    teacher = scaled_logits((6, 64), device=device, seed=21)
    log_probs, indices = torch.log_softmax(teacher, -1).topk(8)

    def distill(s):
        return kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices, backend=backend)

    assert_compiles_fullgraph(distill, student, rtol=1e-5, atol=1e-6, grad_rtol=1e-5,
                              grad_atol=1e-7)


def test_softcap_module_matches_the_function():
    student, teacher = scaled_logits((6, 30), seed=22), scaled_logits((6, 30), seed=23)
    assert torch.equal(kdkernels.nn.KDLoss(2.0, logit_softcap=5.0)(student, teacher),
                       kdkernels.kd_loss(student, teacher, 2.0, logit_softcap=5.0))


@pytest.mark.parametrize("call,error,match", [
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
def test_topk_and_softcap_errors_name_the_argument(call, error, match):
    student, teacher = scaled_logits((6, 30), seed=24), scaled_logits((6, 30), seed=25)
    with pytest.raises(error, match=match):
        call(student, teacher, labels_for(6, 30, "cpu"))


@pytest.mark.parametrize("backend", backend_params())
def test_topk_gradcheck_float64(backend):
    """Finite differences through the fused top-k KL (the student)."""
    device = require_backend(backend)
    student = scaled_logits((3, 7), torch.float64, device, seed=32).requires_grad_()
    teacher = scaled_logits((3, 7), torch.float64, device, seed=33).requires_grad_()
    log_probs, indices = torch.log_softmax(scaled_logits((3, 7), torch.float64, device, seed=34), -1).topk(3)
    assert torch.autograd.gradcheck(
        lambda s, t: kdkernels.kd_loss(s, teacher_topk_logprobs=log_probs, teacher_topk_indices=indices,
                                       temperature=1.0, topk_convention="tail", backend=backend) + 0 * t.sum(),
        (student, teacher))
