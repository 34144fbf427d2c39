"""dist kernels (cpu, cuda, triton) against the float64 reference: DIST's row and column Pearson correlations and
their gradients, batch and class counts, ill-conditioned regimes (few rows or classes, saturated softmaxes, low and
high temperatures), identical rows, near-one-hot rows, -inf entries, dtypes, thread-count independence, opcheck."""
import pytest
import torch

from kd_testing import backend_params, check_op_against_reference, logits, op_pair, require_backend
from kdkernels.ops.dist import dist_pearson

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def check(backend, student, teacher, temperature=2.0, grads=(True, True)):
    fn = lambda name, s, t: dist_pearson(s, t, temperature, name)  # noqa: E731
    return check_op_against_reference(fn, backend, [student, teacher], list(grads), what="dist")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, dtype):
    device = require_backend(backend)
    student, teacher = logits((16, 300), dtype, device, seed=1), logits((16, 300), dtype, device, seed=2)
    check(backend, student, teacher)
    check(backend, student, teacher, temperature=4.0, grads=(True, False))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("rows,classes", [(1, 5), (2, 1), (2, 3), (3, 17), (5, 2049), (70, 40), (4, 9000)])
def test_shapes(backend, rows, classes):
    device = require_backend(backend)
    student = logits((rows, classes), torch.float32, device, seed=3)
    teacher = logits((rows, classes), torch.float32, device, seed=4)
    check(backend, student, teacher, temperature=1.0)


# (rows, classes, logit scale, temperature) where DIST's statistics are ill-conditioned: a column's spread far below
# its values (few rows, saturated softmaxes), correlations close to +-1 (two rows, two classes), probabilities far
# below 1e-6 (large logits, low T) or all close to 1/V (high T). DIST_KD's own fp32 code is as accurate there as the
# rounding of y allows, which only arithmetic beyond float32 beats by the flash-attention criterion's margin.
REGIMES = {
    "two-rows": (2, 10, 3.0, 1.0),
    "three-rows": (3, 5, 3.0, 1.0),
    "four-rows-low-T": (4, 100, 3.0, 0.1),
    "two-classes": (16, 2, 3.0, 1.0),
    "three-classes-low-T": (8, 3, 3.0, 0.25),
    "saturated": (16, 100, 50.0, 1.0),
    "saturated-two-rows": (2, 5, 3.0, 0.1),
    "low-T": (64, 300, 3.0, 0.1),
    "high-T": (4, 10, 3.0, 30.0),
    "logits-1e4": (8, 50, 1e4, 1.0),
    "logits-1e4-high-T": (8, 50, 1e4, 100.0),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("regime", REGIMES)
def test_ill_conditioned_regimes(backend, regime):
    device = require_backend(backend)
    rows, classes, scale, temperature = REGIMES[regime]
    for seed in range(3):
        student = logits((rows, classes), torch.float32, device, scale=scale, seed=100 + 2 * seed)
        teacher = logits((rows, classes), torch.float32, device, scale=scale, seed=101 + 2 * seed)
        if "saturated" in regime:
            assert torch.softmax(student.double() / temperature, -1).min() < 1e-6
        check(backend, student, teacher, temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scale,temperature", [(1e4, 1.0), (1e4, 100.0), (30.0, 0.1), (3.0, 100.0)])
def test_float64_across_the_exponential_range(backend, scale, temperature):
    """Exponents from 0 down past the underflow of exp, in float64 (elementwise rtol 1e-10)."""
    device = require_backend(backend)
    student, teacher = logits((8, 50), torch.float64, device, scale, 1), logits((8, 50), torch.float64, device, scale, 2)
    check(backend, student, teacher, temperature)


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("rows,classes", [(200, 300), (70, 5000)])
def test_results_do_not_depend_on_the_thread_count(backend, rows, classes):
    """Several row blocks (forward) and row tasks (backward): 1 and 2 threads give the same bits."""
    require_backend(backend)
    student = logits((rows, classes), seed=15).requires_grad_()
    teacher = logits((rows, classes), seed=16).requires_grad_()
    upstream = (torch.rand(rows, generator=torch.Generator().manual_seed(0)),
                torch.rand(classes, generator=torch.Generator().manual_seed(1)))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            row, col = dist_pearson(student, teacher, 2.0, backend)
            results.append((row, col, *torch.autograd.grad((row, col), (student, teacher), upstream)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("backend", backend_params())
def test_two_classes_and_two_rows_are_perfectly_correlated(backend):
    """With V = 2 (and N = 2) every centred pair is (d, -d): each Pearson is exactly +-1 and its true gradient is of
    the order of the 1e-8 epsilon, i.e. pure rounding noise in any float32 implementation; it must stay tiny."""
    device = require_backend(backend)
    student = logits((2, 2), torch.float32, device, seed=13).requires_grad_()
    teacher = logits((2, 2), torch.float32, device, seed=14)
    row, col = dist_pearson(student, teacher, 2.0, backend)
    assert torch.allclose(row.abs(), torch.ones_like(row)) and torch.allclose(col.abs(), torch.ones_like(col))
    (grad,) = torch.autograd.grad(row.sum() + col.sum(), student)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-4


@pytest.mark.parametrize("backend", backend_params())
def test_identical_rows_give_zero_column_correlation(backend):
    """Every row the same: each column is constant across the batch, so its centred values are 0 up to the rounding
    of the column mean and the 1e-8 in the denominator keeps its Pearson at ~0; the gradients stay finite."""
    device = require_backend(backend)
    student = logits((1, 30), torch.float32, device, seed=5).repeat(6, 1)
    teacher = logits((6, 30), torch.float32, device, seed=6)
    (row, col), grads = check(backend, student, teacher)
    assert col.abs().max() < 1e-6 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_near_one_hot_rows_and_masked_classes(backend, dtype):
    device = require_backend(backend)
    student, teacher = logits((8, 100), torch.float64, seed=7, scale=50.0), logits((8, 100), torch.float64, seed=8)
    student[:, ::7] = teacher[:, ::7] = float("-inf")
    (row, col), grads = check(backend, student.to(dtype).to(device), teacher.to(dtype).to(device))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_dtypes_and_strides(backend):
    device = require_backend(backend)
    student = logits((6, 90), torch.bfloat16, device, seed=9)[:, 5:85]
    teacher = logits((6, 80), torch.float16, device, seed=10)
    check(backend, student, teacher)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = require_backend(backend)
    forward, backward = op_pair("dist", backend)
    for requires_grad in (False, True):
        student = logits((4, 19), torch.float32, device, seed=11).requires_grad_(requires_grad)
        teacher = logits((4, 19), torch.bfloat16, device, seed=12).requires_grad_(requires_grad)
        torch.library.opcheck(forward, (student, teacher, 2.0))
    row, col, row_moments, col_moments, stats_s, stats_t = forward(student.detach(), teacher.detach(), 2.0)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (torch.rand_like(row), torch.rand_like(col), student.detach(),
                                         teacher.detach(), row_moments, col_moments, stats_s, stats_t, 2.0, *flags))
