"""pairwise kernels (cpu, cuda, triton) against the float64 reference (kdkernels/reference/pairwise.py): loss and
both gradients of every relation (RKD distance / angle / weighted sum, SP, PKT, CC), dtypes, batch sizes, feature
widths that differ, large mean offsets, duplicate and zero rows, CC orders, gradient flags, errors, opcheck.

The ops return the gradients of the loss under a unit upstream gradient; the reference's come from autograd."""
import pytest
import torch

from kd_testing import EPS, accumulation_dtype_of, assert_close_to_reference, backend_params, logits, require_backend
from kdkernels.reference.pairwise import relation_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
RELATIONS = [("rkd_distance", ()), ("rkd_angle", ()), ("rkd", (25.0, 50.0)), ("sp", ()), ("pkt", (1e-7,)),
             ("cc", (0.4, 2.0, 0.0))]
RELATION_IDS = [name for name, _ in RELATIONS]
RKD = [relation for relation in RELATIONS if relation[0].startswith("rkd")]
RKD_IDS = [name for name, _ in RKD]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]


def pairwise_op(backend):
    return torch.ops.kdkernels.triton_pairwise_forward if backend == "triton" else torch.ops.kdkernels.pairwise_forward


def features(rows, columns, dtype, device, seed, offset=0.0):
    return (logits((rows, columns), torch.float64, seed=seed, scale=1.0) + offset).to(dtype).to(device)


def reference(relation, params, student, teacher):
    """(loss, grad_student, grad_teacher) of the reference by autograd, in the inputs' precision."""
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    loss = relation_loss(relation, student, teacher, tuple(params))
    return (loss, *torch.autograd.grad(loss, (student, teacher)))


# Where the float32 reference measures nothing (it is the formula under test that breaks there: coincident points),
# results must be within ULPS ulps of the float64 result's largest entry: each gradient entry is a sum over the batch,
# (dG + dG^T) P, of terms up to that size, so rounding leaves a few ulps of the maximum in entries near 0 (measured:
# at most 6 ulps on the duplicate-row cases).
ULPS = 32


def gradient_floor(dtype, expected):
    return ULPS * EPS[accumulation_dtype_of(dtype)] * expected.abs().max().item()


def check(backend, relation, params, student, teacher, flags=(True, True), slack_inputs="same", expected_inputs=None):
    """Runs the op and compares it with the float64 reference. The low-precision slack is the reference evaluated
    in the inputs' precision on `slack_inputs` (default: the same rounded inputs; None: no slack, and the gradients
    get the floor above instead); the expected values come from the float64 reference on `expected_inputs`
    (default: the inputs)."""
    loss, grad_student, grad_teacher = pairwise_op(backend)(student, teacher, relation, list(params), *flags)
    inputs = (student.cpu(), teacher.cpu())
    expected = reference(relation, params, *(x.double() for x in (expected_inputs or inputs)))
    low = reference(relation, params, *(inputs if slack_inputs == "same" else slack_inputs)) \
        if slack_inputs is not None else (None, None, None)
    acc = accumulation_dtype_of(student.dtype)
    assert loss.dtype == acc and loss.shape == (), f"loss: {loss.dtype} {tuple(loss.shape)}"
    ulps = ULPS if slack_inputs is None else None
    assert_close_to_reference(loss, expected[0], f"{relation} loss", eager=low[0], ulps=ulps)
    for name, grad, flag, x, ref, ref_low in zip(("student", "teacher"), (grad_student, grad_teacher), flags,
                                                  (student, teacher), expected[1:], low[1:]):
        assert grad.dtype == x.dtype and grad.device == x.device, f"{name} grad: {grad.dtype} on {grad.device}"
        if not flag:
            assert grad.shape == (0,), f"{name} grad not requested: shape {tuple(grad.shape)}"
            continue
        assert grad.shape == x.shape and grad.is_contiguous(), f"{name} grad: {tuple(grad.shape)}"
        assert_close_to_reference(grad, ref, f"{relation} {name} grad", eager=ref_low, ulps=ulps)
    return loss, grad_student, grad_teacher


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("relation,params", RELATIONS, ids=RELATION_IDS)
def test_matches_reference(backend, relation, params, dtype):
    device = require_backend(backend)
    check(backend, relation, params, features(17, 24, dtype, device, 1), features(17, 40, dtype, device, 2))


# B = 2 makes every RKD loss exactly 0 (the one distance normalises to 1, every angle is 0 or 1): test_rkd_two_points.
BATCH_CASES = [pytest.param(name, params, batch, id=f"{name}-{batch}") for batch in (2, 3, 70)
               for name, params in RELATIONS if not (batch == 2 and name.startswith("rkd"))]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relation,params,batch", BATCH_CASES)
def test_batch_sizes(backend, relation, params, batch):
    device = require_backend(backend)
    student = features(batch, 9, torch.float32, device, 3)
    teacher = features(batch, 5, torch.float32, device, 4)
    check(backend, relation, params, student, teacher)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("relation,params", RKD, ids=RKD_IDS)
def test_rkd_two_points(backend, relation, params, dtype):
    """Two points: the loss and its gradients are 0 in exact arithmetic, the reference's float64 values are rounding
    noise, and so are the kernels' (an angle of 1 formed from Gram entries is 1 within a few ulps): the loss must
    stay below (64 ulps)^2 and the gradients below 64 ulps of the accumulation dtype (unit-scale features)."""
    device = require_backend(backend)
    student, teacher = features(2, 9, dtype, device, 25), features(2, 5, dtype, device, 26)
    loss, grad_student, grad_teacher = pairwise_op(backend)(student, teacher, relation, list(params), True, True)
    ulps = 64 * torch.finfo(accumulation_dtype_of(dtype)).eps
    weight = max(params, default=1.0)
    assert abs(loss.item()) <= weight * ulps ** 2, f"loss {loss.item()}"
    for grad in (grad_student, grad_teacher):
        assert grad.abs().max().item() <= weight * ulps, f"gradient {grad.abs().max().item()}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("offset", [30.0, 1000.0])
@pytest.mark.parametrize("relation,params", RKD, ids=RKD_IDS)
def test_rkd_large_mean_offset(backend, relation, params, offset, dtype):
    """RKD is translation invariant, and the kernels centre the batch before the Gram, so an offset costs nothing.
    The reference's own Gram formula loses digits to the offset (fp64: ~1e-10 relative at +1000, fp32: all of
    them), so both the expected values and the slack come from the reference on the inputs centred in float64: the
    same loss and, since the loss is translation invariant, the same gradients."""
    device = require_backend(backend)
    student = features(16, 24, dtype, device, 5, offset)
    teacher = features(16, 12, dtype, device, 6, offset)
    centred = [x.cpu().double() - x.cpu().double().mean(0, keepdim=True) for x in (student, teacher)]
    check(backend, relation, params, student, teacher, expected_inputs=centred,
          slack_inputs=[x.to(dtype) for x in centred])


# B = 256: float32 Grams (a few eps in every squared distance and angle numerator, and 256-term float32 GEMM sums in
# the backward) put the RKD gradients 3 to 12 times further from the float64 result than the official fp32 formula.
LARGE_BATCH_CASES = [pytest.param(name, params, columns, id=f"{name}-{columns}") for columns in (128, 512)
                     for name, params in RKD]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relation,params,columns", LARGE_BATCH_CASES)
def test_rkd_large_batch(backend, relation, params, columns):
    device = require_backend(backend)
    if backend == "triton" and device == "cpu" and relation != "rkd_distance":
        pytest.skip("B^3 angle tiles take minutes under the Triton interpreter (run on a GPU)")
    check(backend, relation, params, features(256, columns, torch.float32, device, 31),
          features(256, columns, torch.float32, device, 32))


def close_pairs(rows, columns, seed, rho, pairs, offset=0.0):
    """Features with row j := row i + rho |x_i - mean| u (u a random unit vector) for each (i, j): samples a
    relative distance rho apart, compared with their distance from the batch mean."""
    x = logits((rows, columns), torch.float64, seed=seed, scale=1.0)
    generator = torch.Generator().manual_seed(seed + 1000)
    for i, j in pairs:
        direction = torch.randn(columns, generator=generator, dtype=torch.float64)
        x[j] = x[i] + rho * (x[i] - x.mean(0)).norm() * direction / direction.norm()
    return (x + offset).float()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("rho,offset", [(1e-2, 0.0), (1e-3, 0.0), (1e-3, 30.0), (1e-4, 0.0)],
                         ids=["rho1e-2", "rho1e-3", "rho1e-3-offset30", "rho1e-4"])
@pytest.mark.parametrize("relation,params", RKD, ids=RKD_IDS)
def test_rkd_close_samples(backend, relation, params, rho, offset):
    """Samples a relative distance rho apart (a pair on each side, and one more on the student's): the angles between
    their difference and the other samples are as accurate as the official fp32 formula's, which forms the
    differences themselves. From a float32 Gram, an angle's numerator (G_bc - G_ab) - (G_ac - G_aa) loses ~eps |x|^2
    against |x_b - x_a| |x_c - x_a|, an angle error ~eps/rho and a gradient error ~eps/rho^2 (at rho = 1 %: 5e-4,
    where the official code has 3e-7; at 0.4 % and below the samples counted as coincident). From the float64 Gram
    the same growth starts near rho = 3e-5 (the float64 GEMM's rounding of the pair's squared distance): 1e-4 is the
    documented limit. The offset checks the centring (in float64: in float32 it would round the pairs' differences
    by eps |x|)."""
    device = require_backend(backend)
    student = close_pairs(16, 24, 33, rho, ((0, 1), (5, 9)), offset).to(device)
    teacher = close_pairs(16, 12, 34, rho, ((2, 3),), offset).to(device)
    check(backend, relation, params, student, teacher)


def test_cpu_is_deterministic_across_thread_counts():
    """Every reduction has a fixed order (the float64 GEMMs included): results are bitwise equal on 1 and 2 threads."""
    require_backend("cpu")
    student, teacher = features(70, 33, torch.float32, "cpu", 35), features(70, 20, torch.float32, "cpu", 36)
    threads = torch.get_num_threads()
    try:
        for relation, params in RELATIONS:
            torch.set_num_threads(1)
            single = pairwise_op("cpu")(student, teacher, relation, list(params), True, True)
            torch.set_num_threads(max(2, threads))
            multi = pairwise_op("cpu")(student, teacher, relation, list(params), True, True)
            for a, b in zip(single, multi):
                assert torch.equal(a, b), relation
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("relation,params", RKD, ids=RKD_IDS)
def test_rkd_duplicate_rows(backend, relation, params, dtype):
    """Coincident points: zero distances (clamped to 1e-6 with zero gradient) and zero unit vectors. The reference in
    fp32 turns the Gram formula's rounding noise into distances of ~1e-3 with huge gradients, so no fp32 slack: the
    kernels must match the float64 reference (noise-free here) at the plain tolerance."""
    device = require_backend(backend)
    student = features(11, 24, torch.float64, "cpu", 7)
    teacher = features(11, 20, torch.float64, "cpu", 8)
    student[4] = student[0]
    student[7] = student[0]
    teacher[2] = teacher[9]
    teacher[5] = teacher[6]
    student, teacher = student.to(dtype).to(device), teacher.to(dtype).to(device)
    _, grad_student, grad_teacher = check(backend, relation, params, student, teacher, slack_inputs=None)
    assert torch.isfinite(grad_student).all() and torch.isfinite(grad_teacher).all()


def near_duplicates(x, columns, pairs=((0, 4), (1, 8), (3, 9), (5, 10), (2, 6))):
    """Row j := row i moved by one ulp (alternately up and down) in its first `columns` entries, for each (i, j)."""
    for index, (i, j) in enumerate(pairs):
        x[j] = x[i]
        direction = torch.full_like(x[i, :columns], float("inf") if index % 2 else -float("inf"))
        x[j, :columns] = torch.nextafter(x[i, :columns], direction)
        assert (x[i].double() - x[j].double()).pow(2).sum().item() < 1e-12
    return x


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rkd_distance_of_rows_one_ulp_apart(backend, dtype):
    """Rows one ulp apart in a few columns: their true squared distance is below the 1e-12 clamp (checked), so the
    reference gives 1e-6 with zero gradient; the kernels' squared distances must stay below the clamp too, not
    become a distance of ~1e-3 with a large gradient (as the float32 Gram formula's rounding noise, ~1e-6, would).
    Exactly equal rows alone do not test this: their Gram entries are bitwise equal on the CPU."""
    device = require_backend(backend)
    # Seeds, offsets and column counts chosen so that float32 Grams of a few of these pairs have positive noise
    # (+1.9e-6). The offset keeps the ulp differences alive through the centring (a float32 x - mean would round
    # them away).
    student = near_duplicates(features(11, 24, dtype, "cpu", 29, offset=3.0), columns=4)
    teacher = near_duplicates(features(11, 24, dtype, "cpu", 30, offset=10.0), columns=1)
    check(backend, "rkd_distance", (), student.to(device), teacher.to(device), slack_inputs=None)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rkd_identical_batch(backend, dtype):
    """Every student row the same: all student distances are the clamp (mu = 1e-6) and every angle is 0; the loss
    equals the reference's and no gradient flows to the student."""
    device = require_backend(backend)
    student = features(1, 10, dtype, device, 9).repeat(5, 1)
    teacher = features(5, 10, dtype, device, 10)
    for relation, params in RKD:
        _, grad_student, _ = check(backend, relation, params, student, teacher, slack_inputs=None)
        assert torch.equal(grad_student, torch.zeros_like(grad_student))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cc_zero_rows(backend, dtype):
    """A zero row normalises to 0 (F.normalize's clamp): its gradient is dL/dx^ / 1e-12, as the reference's."""
    device = require_backend(backend)
    student, teacher = features(6, 8, dtype, device, 11), features(6, 7, dtype, device, 12)
    student[2] = 0
    teacher[4] = 0
    check(backend, "cc", (0.4, 2.0, 0.0), student, teacher)


def _finite_difference_rows(relation, params, student, teacher, side, row, step):
    """Central differences of the float64 reference loss with respect to one row of one side."""
    inputs = [student.double().cpu(), teacher.double().cpu()]
    grad = torch.zeros(inputs[side].shape[1], dtype=torch.float64)
    for column in range(grad.numel()):
        plus, minus = [x.clone() for x in inputs], [x.clone() for x in inputs]
        plus[side][row, column] += step
        minus[side][row, column] -= step
        grad[column] = (relation_loss(relation, *plus, params) - relation_loss(relation, *minus, params)) / (2 * step)
    return grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pkt_zero_rows(backend, dtype):
    """x / (|x| + eps) is differentiable at x = 0 with derivative 1 / eps (the official sqrt(sum x^2) gives NaN
    there; the reference's torch.norm gives the true value): every row is compared with the reference, and the zero
    rows also with central differences of the float64 reference loss (step 1e-13 against eps = 1e-7: truncation
    ~1e-6 relative, hence the 1e-5 tolerance of those rows)."""
    device = require_backend(backend)
    params = (1e-7,)
    student, teacher = features(6, 5, dtype, device, 13), features(6, 4, dtype, device, 14)
    student[1] = 0
    teacher[3] = 0
    loss, grad_student, grad_teacher = pairwise_op(backend)(student, teacher, "pkt", list(params), True, True)
    expected = reference("pkt", params, student.cpu().double(), teacher.cpu().double())
    low = reference("pkt", params, student.cpu(), teacher.cpu())
    assert_close_to_reference(loss, expected[0], "loss", eager=low[0])
    for side, (grad, zero_row) in enumerate(((grad_student, 1), (grad_teacher, 3))):
        assert_close_to_reference(grad, expected[1 + side], f"grad {side}", eager=low[1 + side])
        difference = _finite_difference_rows("pkt", params, student, teacher, side, zero_row, 1e-13)
        assert_close_to_reference(grad[zero_row], difference, f"grad {side} zero row", rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("order,bilinear", [(0, 0.0), (1, 0.0), (2, 0.0), (5, 0.0), (2, 1.0)],
                         ids=["order0", "order1", "order2", "order5", "bilinear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cc_orders(backend, order, bilinear, dtype):
    device = require_backend(backend)
    student, teacher = features(9, 16, dtype, device, 15), features(9, 6, dtype, device, 16)
    check(backend, "cc", (0.7, float(order), bilinear), student, teacher)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rkd_is_the_weighted_sum_of_its_terms(backend, dtype):
    device = require_backend(backend)
    student, teacher = features(12, 10, dtype, device, 17), features(12, 14, dtype, device, 18)
    op = pairwise_op(backend)
    weights = (2.5, 0.75)
    combined = op(student, teacher, "rkd", list(weights), True, True)
    distance = op(student, teacher, "rkd_distance", [], True, True)
    angle = op(student, teacher, "rkd_angle", [], True, True)
    for index, what in enumerate(("loss", "student grad", "teacher grad")):
        expected = weights[0] * distance[index].double() + weights[1] * angle[index].double()
        floor = gradient_floor(dtype, expected) if index > 0 else 0.0  # one GEMM against two: rounding near 0
        assert_close_to_reference(combined[index], expected, what, ulps=ULPS, atol=floor)
    check(backend, "rkd", weights, student, teacher)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("flags", FLAGS, ids=["both", "student", "teacher", "none"])
@pytest.mark.parametrize("relation,params", RELATIONS, ids=RELATION_IDS)
def test_gradient_flags(backend, relation, params, flags):
    device = require_backend(backend)
    student, teacher = features(6, 7, torch.float32, device, 19), features(6, 3, torch.bfloat16, device, 20)
    check(backend, relation, params, student, teacher, flags)


@pytest.mark.parametrize("backend", backend_params())
def test_rejects_bad_input(backend):
    device = require_backend(backend)
    op = pairwise_op(backend)
    student, teacher = features(4, 5, torch.float32, device, 21), features(4, 3, torch.float32, device, 22)
    prefix = "triton_pairwise_forward: " if backend == "triton" else "pairwise_forward: "
    bad_calls = [
        ((student[:1], teacher[:1], "sp", []), ValueError, "a batch relation needs at least 2 samples, got 1"),
        ((student, teacher[:3], "sp", []), ValueError, "teacher must have the student's 4 samples, got 3"),
        ((student.double(), teacher, "sp", []), TypeError, "float64"),
        ((student, teacher.double(), "sp", []), TypeError, "float64"),
        ((student, teacher.long(), "sp", []), TypeError, "teacher must be float32, float16, bfloat16 or float64"),
        ((student, teacher, "rkd_cosine", []), ValueError, "unknown relation 'rkd_cosine'"),
        ((student, teacher, "rkd", [1.0]), ValueError, "relation 'rkd' takes 2 parameters, got 1"),
        ((student, teacher, "sp", [1.0]), ValueError, "relation 'sp' takes 0 parameters, got 1"),
        ((student, teacher, "cc", [0.4, 2.0]), ValueError, "relation 'cc' takes 3 parameters, got 2"),
        ((student, teacher, "cc", [0.4, 1.5, 0.0]), ValueError, r"cc order must be an integer in \[0, 64\]"),
        ((student, teacher, "cc", [0.4, -1.0, 0.0]), ValueError, r"cc order must be an integer in \[0, 64\]"),
        ((student, teacher, "pkt", [0.0]), ValueError, "pkt eps must be positive"),
        ((student[0], teacher, "sp", []), ValueError, r"student must be 2-D features \[B, D\] with D >= 1"),
    ]
    for args, error, message in bad_calls:
        with pytest.raises(error, match="^" + prefix + ".*" + message):
            op(*args, True, True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relation,params", [("rkd", (25.0, 50.0)), ("sp", ()), ("pkt", (1e-7,)),
                                             ("cc", (0.4, 2.0, 0.0))], ids=["rkd", "sp", "pkt", "cc"])
def test_opcheck(backend, relation, params):
    device = require_backend(backend)
    student, teacher = features(5, 6, torch.float32, device, 23), features(5, 4, torch.bfloat16, device, 24)
    for flags in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(pairwise_op(backend), (student, teacher, relation, list(params), *flags))
