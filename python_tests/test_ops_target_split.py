"""target_split kernels (cpu, cuda, triton) against the float64 reference: the six per-row DKD/NKD terms and their
gradients, class counts, label positions, extreme gaps, -inf entries, dtypes, strides, opcheck."""
import pytest
import torch

from kd_testing import (assert_close_to_reference, backend_params, check_op_against_reference, logits,
                        op_pair, require_backend)
from kdkernels.ops.target_split import target_split_terms

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def labels_for(rows, classes, device, seed=0):
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed)).to(device)


def terms_fn(labels, temperature):
    return lambda backend, s, t: target_split_terms(s, t, labels.to(s.device), temperature, backend)


def check(backend, student, teacher, labels, temperature=2.0, grads=(True, True)):
    return check_op_against_reference(terms_fn(labels, temperature), backend, [student, teacher], list(grads),
                                      what="target_split")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, dtype):
    device = require_backend(backend)
    student, teacher = logits((6, 300), dtype, device, seed=1), logits((6, 300), dtype, device, seed=2)
    check(backend, student, teacher, labels_for(6, 300, device))
    check(backend, student, teacher, labels_for(6, 300, device, 1), temperature=0.5, grads=(True, False))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("classes", [1, 2, 3, 2049, 9000])
def test_class_counts_and_label_positions(backend, dtype, classes):
    device = require_backend(backend)
    student, teacher = logits((4, classes), dtype, device, seed=3), logits((4, classes), dtype, device, seed=4)
    labels = torch.tensor([0, classes - 1, classes // 2, min(16, classes - 1)], device=device)
    (terms,), _ = check(backend, student, teacher, labels, temperature=1.5)
    if classes == 1:  # no non-target class: log(1 - p[y]) = -inf, both non-target terms 0
        assert torch.isneginf(terms[:, 1]).all() and (terms[:, 0] == 0).all() and (terms[:, 4:] == 0).all()
    if classes == 2:  # one non-target class: q = 1 on both sides
        assert (terms[:, 4].abs() <= 1e-6).all() and (terms[:, 5].abs() <= 1e-6).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_extreme_target_gaps_stay_finite_and_exact(backend, dtype):
    """The target 300 T above every other class: p[y] rounds to 1, yet log(1 - p[y]) = -300 - log(V - 1) exactly."""
    device = require_backend(backend)
    temperature, classes = 2.0, 50
    student = logits((3, classes), torch.float64, seed=5, scale=1.0)
    teacher = logits((3, classes), torch.float64, seed=6, scale=1.0)
    labels = torch.tensor([0, 7, 49])
    student[torch.arange(3), labels] += 300 * temperature
    teacher[torch.arange(3), labels] += 250 * temperature
    student, teacher = student.to(dtype).to(device), teacher.to(dtype).to(device)
    (terms,), grads = check(backend, student, teacher, labels.to(device), temperature)
    assert torch.isfinite(terms).all() and all(torch.isfinite(g).all() for g in grads)
    assert (terms[:, 1] < -290).all() and (terms[:, 3] < -240).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_negative_infinity_conventions(backend, dtype):
    device = require_backend(backend)
    student, teacher = logits((6, 40), torch.float64, seed=7), logits((6, 40), torch.float64, seed=8)
    labels = torch.tensor([3, 3, 5, 0, 9, 1])
    student[0, ::4] = teacher[0, ::4] = float("-inf")  # masked classes in both (not the target)
    teacher[1, 3] = float("-inf")  # the teacher's target is masked: p_t[y] = 0
    student[2] = float("-inf")  # the student's non-target classes all -inf: log(1 - p_s[y]) = -inf, KL = +inf
    student[2, 5] = 1.0
    teacher[3, 1:] = float("-inf")  # the teacher's non-target set is empty: KL = H = 0
    student[4] = teacher[4] = float("-inf")  # an entirely -inf row
    teacher[5, 10:30] = float("-inf")  # teacher-only masked classes
    student, teacher = student.to(dtype).to(device), teacher.to(dtype).to(device)
    (terms,), _ = check_op_against_reference(terms_fn(labels, 2.0), backend, [student, teacher], [False, False],
                                             what="target_split")
    assert torch.isneginf(terms[1, 2]) and terms[2, 4].item() == float("inf") and torch.isneginf(terms[2, 1])
    assert (terms[3, 4:] == 0).all() and torch.isneginf(terms[4, :4]).all() and (terms[4, 4:] == 0).all()
    finite_rows = [0, 1, 5]  # their gradients are finite and match the reference
    check(backend, student[finite_rows], teacher[finite_rows], labels[finite_rows].to(device))


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_dtypes_and_strides(backend):
    device = require_backend(backend)
    student = logits((5, 90), torch.bfloat16, device, seed=9)[:, 5:85]  # row stride 90
    teacher = logits((5, 80), torch.float32, device, seed=10)
    assert not student.is_contiguous()
    check(backend, student, teacher, labels_for(5, 80, device, 2))


@pytest.mark.parametrize("backend", backend_params())
def test_identity_with_the_full_kl(backend):
    """Per row KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t[y]) KL(q_t || q_s) (the DKD decomposition)."""
    device = require_backend(backend)
    student, teacher = logits((8, 1000), torch.float64, device, seed=11), logits((8, 1000), torch.float64, device,
                                                                                  seed=12)
    terms = target_split_terms(student, teacher, labels_for(8, 1000, device, 3), 3.0, backend)
    log_b_s, log_b_t = terms[:, 0:2], terms[:, 2:4]
    two_bin = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
    full = torch.ops.kdkernels.softmax_kl_forward(student.cpu(), teacher.cpu(), 3.0)[0]
    assert_close_to_reference(two_bin + log_b_t[:, 1].exp() * terms[:, 4], full, "identity")


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = require_backend(backend)
    forward, backward = op_pair("target_split", backend)
    labels = labels_for(4, 19, device, 4)
    for requires_grad in (False, True):
        student = logits((4, 19), torch.float32, device, seed=13).requires_grad_(requires_grad)
        teacher = logits((4, 19), torch.bfloat16, device, seed=14).requires_grad_(requires_grad)
        torch.library.opcheck(forward, (student, teacher, labels, 2.0))
    terms, stats_s, stats_t = forward(student.detach(), teacher.detach(), labels, 2.0)
    grad = torch.rand_like(terms)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (grad, student.detach(), teacher.detach(), labels, stats_s, stats_t, terms,
                                         2.0, *flags))


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_kernel_rejects_bad_labels(backend):
    require_backend(backend)
    student, teacher = logits((2, 5)), logits((2, 5), seed=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, V\) = \[0, 5\), got 5 in row 1"):
        torch.ops.kdkernels.target_split_forward(student, teacher, torch.tensor([0, 5]), 1.0)
    with pytest.raises(TypeError, match="target_split_forward: labels must be int64, got Int"):
        torch.ops.kdkernels.target_split_forward(student, teacher, torch.tensor([0, 1], dtype=torch.int32), 1.0)
