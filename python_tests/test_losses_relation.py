"""rkd_distance_loss, rkd_angle_loss, rkd_loss, sp_loss, pkt_loss and cc_loss: equal to the official formulas
(lenscloth/RKD, RepDistiller, probabilistic_kt, KD-Zoo) in float64 on every backend, accurate in fp32 where the
official fp32 code is not (large mean offsets), finite on duplicate and zero rows, O(B²) memory, no B < 2, and clear
errors for bad input."""
import pytest
import torch

import kdkernels
from kd_testing import FLOAT64_RTOL, assert_close_to_reference, assert_compiles_fullgraph, backend_params, \
    require_backend
from kdkernels._memory import cpu_peak_supported, measure_peak_mb
from kdkernels.reference import pairwise as reference

ALL_BACKENDS = backend_params() + ["reference"]

# (name, kdkernels loss, official eager formula); each takes (student, teacher).
LOSSES = [
    ("rkd_distance", kdkernels.rkd_distance_loss, reference.eager_rkd_distance),
    ("rkd_angle", kdkernels.rkd_angle_loss, reference.eager_rkd_angle),
    ("rkd", kdkernels.rkd_loss, reference.eager_rkd),
    ("sp", kdkernels.sp_loss, reference.eager_sp),
    ("pkt", kdkernels.pkt_loss, reference.eager_pkt),
    ("cc", kdkernels.cc_loss, reference.eager_cc),
]
LOSS_IDS = [name for name, _, _ in LOSSES]


def device_of(backend):
    return require_backend(backend) if backend != "reference" else "cpu"


def features(shape, dtype=torch.float64, device="cpu", seed=0, offset=0.0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def value_and_grads(fn, student, teacher, teacher_grad=False):
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(student, teacher)
    grads = torch.autograd.grad(loss, (student, teacher) if teacher_grad else (student,))
    return loss, grads


def assert_matches(actual, expected, what, low=None, ulps=None):
    """Loss and gradients against the expected pair: float64 results elementwise, with gradients compared relative to
    their largest entry (an entry that is 0 by symmetry is rounding noise in any implementation); lower precisions
    by the flash-attention criterion against `low` (the formula in the input precision), or within `ulps`."""
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert_close_to_reference(loss, ref_loss, f"{what} loss", eager=None if low is None else low[0], ulps=ulps)
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        floor = FLOAT64_RTOL * ref.abs().max().item() if grad.dtype == torch.float64 else 0.0
        assert_close_to_reference(grad, ref, f"{what} grad {i}", eager=None if low is None else low[1][i],
                                  ulps=ulps, atol=floor)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name,loss,eager", LOSSES, ids=LOSS_IDS)
def test_equals_the_official_formula_in_float64(backend, name, loss, eager):
    device = device_of(backend)
    student, teacher = features((12, 10), seed=1), features((12, 6), seed=2, scale=3.0)
    actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.to(device), teacher.to(device))
    expected = value_and_grads(eager, student, teacher)
    assert_matches(actual, expected, name)
    assert actual[0].dtype == torch.float64


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name,loss,eager", LOSSES, ids=LOSS_IDS)
def test_teacher_gradient_matches_the_reference(backend, name, loss, eager):
    """Online distillation: the teacher requires grad and gets the gradient of the same loss (the reference
    differentiates both sides, the official code detaches RKD's teacher)."""
    device = device_of(backend)
    student, teacher = features((9, 5), seed=3), features((9, 7), seed=4)
    actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.to(device), teacher.to(device), True)
    expected = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student, teacher, True)
    assert_matches(actual, expected, name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name,loss,eager", LOSSES, ids=LOSS_IDS)
def test_low_precision_inputs_compute_in_fp32(backend, dtype, name, loss, eager):
    device = require_backend(backend)
    student = features((16, 3, 2, 2), seed=5).to(dtype)  # any [B, ...] shape is flattened per sample
    teacher = features((16, 20), seed=6).to(dtype)
    actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.to(device), teacher.to(device))
    assert actual[0].dtype == torch.float32 and actual[1][0].dtype == dtype
    assert actual[1][0].shape == student.shape
    expected = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student.double(), teacher.double())
    low = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student.float(), teacher.float())
    low = (low[0], tuple(g.to(dtype) for g in low[1]))
    assert_matches(actual, expected, name, low)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle"])
def test_rkd_centres_features_with_a_large_mean_offset(backend, name):
    """Distances and angles are translation invariant. With a mean offset of 1000 the uncentred fp32 Gram formula
    of the official pdist loses the distances (cancellation of |x|^2 ~ 1e6 terms); the kernels centre first and
    stay within fp32 rounding of the float64 result."""
    device = require_backend(backend)
    loss = dict((n, f) for n, f, _ in LOSSES)[name]
    student, teacher = features((20, 16), seed=7, offset=1000.0), features((20, 8), seed=8, offset=-1000.0)
    actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.float().to(device),
                             teacher.float().to(device))
    expected = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student.float().double(),
                               teacher.float().double())
    assert_matches(actual, expected, name, ulps=64)
    if name == "rkd_distance":
        official = reference.eager_rkd_distance(student.float(), teacher.float())
        assert (official.double() - expected[0]).abs() > 100 * (actual[0].double().cpu() - expected[0]).abs()


DUPLICATE_CASES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b, d in
                   [(name, torch.float64) for name in ("cpu", "cuda", "triton", "reference")]
                   + [(name, torch.float32) for name in ("cpu", "cuda", "triton")]]


@pytest.mark.parametrize("backend,dtype", DUPLICATE_CASES)
def test_rkd_duplicate_rows_have_zero_distance_and_finite_gradients(backend, dtype):
    """Duplicate samples: the official distance is clamped (zero gradient) and the official angle uses a zero unit
    vector; the forward equals the official code in float64, the gradients stay finite (the official angle's are
    ~1e12). In fp32 the kernels treat distances within Gram rounding as 0, as float64 would (the reference formula
    itself, uncentred, gives such duplicates a distance of ~1e-4 in fp32)."""
    device = device_of(backend)
    student, teacher = features((10, 6), seed=9), features((10, 4), seed=10)
    student[4], teacher[7], teacher[8] = student[1], teacher[2], teacher[2]
    student, teacher = student.to(dtype), teacher.to(dtype)
    for name, loss, eager in LOSSES[:3]:
        actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.to(device), teacher.to(device))
        official = eager(student.double(), teacher.double())
        assert_close_to_reference(actual[0], official, f"{name} loss", ulps=8)
        assert torch.isfinite(actual[1][0]).all()
        expected = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student.double(), teacher.double())
        assert_matches(actual, expected, name, ulps=64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_samples_is_the_smallest_batch(backend):
    device = device_of(backend)
    student, teacher = features((2, 5), device=device, seed=11), features((2, 3), device=device, seed=12)
    for name, loss, eager in LOSSES:
        actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student, teacher)
        expected = value_and_grads(eager, student.cpu(), teacher.cpu())
        assert_close_to_reference(actual[0], expected[0], name, atol=1e-15)
        assert torch.isfinite(actual[1][0]).all()
        with pytest.raises(ValueError, match="at least 2 samples"):
            loss(student[:1], teacher[:1], backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_feature_rows_give_finite_gradients(backend):
    device = device_of(backend)
    student, teacher = features((7, 5), seed=13), features((7, 4), seed=14)
    student[3] = 0.0
    teacher[5] = 0.0
    for name, loss, _ in LOSSES[3:]:
        actual = value_and_grads(lambda s, t: loss(s, t, backend=backend), student.to(device), teacher.to(device))
        expected = value_and_grads(lambda s, t: loss(s, t, backend="reference"), student, teacher)
        assert torch.isfinite(actual[1][0]).all()
        assert_matches(actual, expected, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rkd_is_the_weighted_sum_and_cc_options(backend):
    device = device_of(backend)
    student, teacher = features((8, 5), device=device, seed=15), features((8, 9), device=device, seed=16)
    combined = kdkernels.rkd_loss(student, teacher, 2.0, 3.0, backend=backend)
    parts = (2.0 * kdkernels.rkd_distance_loss(student, teacher, backend=backend)
             + 3.0 * kdkernels.rkd_angle_loss(student, teacher, backend=backend))
    torch.testing.assert_close(combined, parts, rtol=1e-12, atol=0)
    for order in (0, 1, 5):
        actual = kdkernels.cc_loss(student, teacher, gamma=0.7, order=order, backend=backend)
        torch.testing.assert_close(actual.cpu(), reference.eager_cc(student.cpu(), teacher.cpu(), 0.7, order),
                                   rtol=1e-12, atol=0)
    bilinear = kdkernels.cc_loss(student, teacher, kernel="bilinear", backend=backend)
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    expected = torch.nn.functional.mse_loss(unit(student) @ unit(student).T, unit(teacher) @ unit(teacher).T)
    torch.testing.assert_close(bilinear, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,loss,eager", LOSSES, ids=LOSS_IDS)
def test_gradcheck_float64(name, loss, eager):
    backend = "cpu"
    require_backend(backend)
    student = features((5, 4), seed=17).requires_grad_()
    teacher = features((5, 3), seed=18).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, backend=backend), (student, teacher))


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = require_backend(backend)
    student = features((10, 6), torch.float32, device, seed=19).requires_grad_()
    teacher = features((10, 8), torch.float32, device, seed=20)

    def distill(s, t):
        return (kdkernels.rkd_loss(s, t, backend=backend) + kdkernels.sp_loss(s, t, backend=backend)
                + kdkernels.pkt_loss(s, t, backend=backend) + kdkernels.cc_loss(s, t, backend=backend))

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-6, atol=1e-7, grad_rtol=1e-5,
                              grad_atol=1e-7)


def test_no_gradient_is_computed_without_autograd():
    require_backend("cpu")
    student, teacher = features((6, 4), torch.float32, seed=21), features((6, 4), torch.float32, seed=22)
    _, grad_student, grad_teacher = torch.ops.kdkernels.pairwise_forward(student, teacher, "rkd", [25.0, 50.0],
                                                                         False, False)
    assert grad_student.numel() == 0 and grad_teacher.numel() == 0
    with torch.no_grad():
        value = kdkernels.rkd_loss(student.requires_grad_(), teacher)
    assert not value.requires_grad


def test_rkd_angle_memory_is_quadratic_in_the_batch():
    """Target: B = 1024, D = 512, fp32, forward + backward within 64 MB of extra memory (the official code needs
    B x B x D and B x B x B tensors: 2 GiB and 4 GiB each)."""
    require_backend("cpu")
    supported, reason = cpu_peak_supported()
    if not supported:
        pytest.skip(reason)
    student = features((1024, 512), torch.float32, seed=23).requires_grad_()
    teacher = features((1024, 512), torch.float32, seed=24)

    def step():
        kdkernels.rkd_angle_loss(student, teacher, backend="cpu").backward()

    step()  # warm-up: thread pools, allocator
    student.grad = None
    peak = measure_peak_mb(step, torch.device("cpu"))
    assert peak is not None and peak < 64, f"peak extra memory {peak:.1f} MB"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_raises_a_clear_error(backend):
    device = device_of(backend)
    student, teacher = features((4, 3), device=device, seed=25), features((4, 3), device=device, seed=26)
    cases = [
        (lambda: kdkernels.rkd_loss(student, teacher[:3], backend=backend), ValueError, "same batch size"),
        (lambda: kdkernels.sp_loss(student.long(), teacher, backend=backend), TypeError, "student must be float32"),
        (lambda: kdkernels.pkt_loss(student, "x", backend=backend), TypeError, "teacher must be a torch.Tensor"),
        (lambda: kdkernels.pkt_loss(student, teacher, eps=0.0, backend=backend), ValueError, "eps must be positive"),
        (lambda: kdkernels.cc_loss(student, teacher, order=1.5, backend=backend), TypeError, "order must be an int"),
        (lambda: kdkernels.cc_loss(student, teacher, order=65, backend=backend), ValueError, r"order must be an int in \[0, 64\]"),
        (lambda: kdkernels.cc_loss(student, teacher, kernel="rbf", backend=backend), ValueError, "kernel"),
        (lambda: kdkernels.rkd_loss(student, teacher, float("nan"), backend=backend), ValueError, "distance_weight"),
        (lambda: kdkernels.sp_loss(student, teacher, gather=1, backend=backend), TypeError, "gather"),
        (lambda: kdkernels.sp_loss(student[:, :0], teacher, backend=backend), ValueError, "at least one feature"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_nn_modules_match_the_functions():
    student, teacher = features((6, 5), seed=27), features((6, 4), seed=28)
    pairs = [(kdkernels.nn.RKDLoss(1.0, 2.0)(student, teacher), kdkernels.rkd_loss(student, teacher, 1.0, 2.0)),
             (kdkernels.nn.SPLoss()(student, teacher), kdkernels.sp_loss(student, teacher)),
             (kdkernels.nn.PKTLoss(1e-6)(student, teacher), kdkernels.pkt_loss(student, teacher, 1e-6)),
             (kdkernels.nn.CCLoss(0.5, 3)(student, teacher), kdkernels.cc_loss(student, teacher, 0.5, 3))]
    for module_value, function_value in pairs:
        torch.testing.assert_close(module_value, function_value, rtol=0, atol=0)


# ---- IRG (plain PyTorch) against Knowledge-Distillation-Zoo kd_losses/irg.py, value and gradients in float64 --------

from torch.nn import functional as F  # noqa: E402

from losses_testing import assert_equals_official, randn  # noqa: E402


def kd_zoo_irg(irg_s, irg_t, w_irg_vert=0.1, w_irg_edge=5.0, w_irg_tran=5.0):
    """Knowledge-Distillation-Zoo ``kd_losses/irg.py`` (``IRG.forward``, ``euclidean_dist_fm`` and ``_fms``,
    squared)."""
    def euclidean_dist_fm(fm, eps=1e-12):
        fm = fm.view(fm.size(0), -1)
        fm_square = fm.pow(2).sum(dim=1)
        fm_prod = torch.mm(fm, fm.t())
        fms_dist = (fm_square.unsqueeze(0) + fm_square.unsqueeze(1) - 2 * fm_prod).clamp(min=eps)
        fms_dist = fms_dist.clone()
        fms_dist[range(len(fm_prod)), range(len(fm_prod))] = 0
        return fms_dist / fms_dist.max()

    def euclidean_dist_fms(fm1, fm2, eps=1e-12):
        if fm1.size(2) > fm2.size(2):
            fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
        if fm1.size(1) < fm2.size(1):
            fm2 = (fm2[:, 0::2, :, :] + fm2[:, 1::2, :, :]) / 2.0
        fm1, fm2 = fm1.reshape(fm1.size(0), -1), fm2.reshape(fm2.size(0), -1)
        fms_dist = torch.sum(torch.pow(fm1 - fm2, 2), dim=-1).clamp(min=eps)
        return fms_dist / fms_dist.max()

    fm_s1, fm_s2, feat_s, out_s = irg_s
    fm_t1, fm_t2, feat_t, out_t = irg_t
    loss_irg_vert = F.mse_loss(out_s, out_t)
    loss_irg_edge = (F.mse_loss(euclidean_dist_fm(feat_s), euclidean_dist_fm(feat_t))
                     + F.mse_loss(euclidean_dist_fm(fm_s1), euclidean_dist_fm(fm_t1))
                     + F.mse_loss(euclidean_dist_fm(fm_s2), euclidean_dist_fm(fm_t2))) / 3.0
    loss_irg_tran = F.mse_loss(euclidean_dist_fms(fm_s1, fm_s2), euclidean_dist_fms(fm_t1, fm_t2))
    return w_irg_vert * loss_irg_vert + w_irg_edge * loss_irg_edge + w_irg_tran * loss_irg_tran


def irg_side(map1, map2, embedding, classes=10, seed=0):
    """(map1, map2, embedding, logits) of one network: float64 leaves that require grad."""
    batch = map1[0]
    return [randn(*map1, seed=seed, grad=True), randn(*map2, seed=seed + 1, grad=True),
            randn(batch, embedding, seed=seed + 2, grad=True), randn(batch, classes, seed=seed + 3, grad=True)]


IRG_SIDES = {  # (student, teacher) (map1, map2, embedding) shapes
    "pooled-and-paired": (((6, 4, 4, 4), (6, 8, 2, 2), 8), ((6, 16, 4, 4), (6, 32, 2, 2), 32)),
    "equal-maps": (((5, 3, 4, 4), (5, 3, 4, 4), 6), ((5, 6, 4, 4), (5, 6, 4, 4), 6)),
    "pooled-only": (((4, 5, 6, 6), (4, 5, 3, 3), 5), ((4, 2, 8, 8), (4, 4, 4, 4), 7)),
}


@pytest.mark.parametrize("weights", [(0.1, 5.0, 5.0), (1.0, 0.5, 2.0)], ids=["kd-zoo", "other-weights"])
@pytest.mark.parametrize("sides", list(IRG_SIDES.values()), ids=list(IRG_SIDES))
def test_irg_is_kd_zoo(sides, weights):
    """map1 is pooled to map2's size when larger, map2's channels averaged in pairs when it has more; widths differ
    between student and teacher except for the logits. Both sides get gradients."""
    (s1, s2, s_dim), (t1, t2, t_dim) = sides
    student, teacher = irg_side(s1, s2, s_dim, seed=1), irg_side(t1, t2, t_dim, seed=11)
    assert_equals_official(lambda s, t: kdkernels.irg_loss(s, t, *weights), lambda s, t: kd_zoo_irg(s, t, *weights),
                           student, teacher, what="irg")


def test_irg_bad_input_raises_naming_the_argument():
    (s1, s2, s_dim), (t1, t2, t_dim) = IRG_SIDES["pooled-and-paired"]
    student, teacher = irg_side(s1, s2, s_dim, seed=1), irg_side(t1, t2, t_dim, seed=11)
    cases = [
        (lambda: kdkernels.irg_loss([student[0]], teacher), TypeError,
         r"^irg_loss: student must be a sequence \(map1, map2, embedding, logits\) of 4 tensors, got list$"),
        (lambda: kdkernels.irg_loss(student, teacher[:3] + [teacher[3][:, :5]]), ValueError,
         r"^irg_loss: teacher\[3\] must have the same shape as student\[3\] \(6, 10\), got shape \(6, 5\)$"),
        (lambda: kdkernels.irg_loss(student, [teacher[0], teacher[1][:, :24]] + teacher[2:]), ValueError,
         r"^irg_loss: teacher\[1\] must have teacher\[0\]'s channels, or twice as many, and at most its spatial size"),
        (lambda: kdkernels.irg_loss([student[2], student[1]] + student[2:], teacher), ValueError,
         r"^irg_loss: student\[0\], student\[1\] must be \[B, C, H, W\] maps"),
        (lambda: kdkernels.irg_loss([x[:1] for x in student], [x[:1] for x in teacher]), ValueError,
         r"^irg_loss: student\[0\] must hold at least 2 samples"),
        (lambda: kdkernels.irg_loss(student, teacher, edge_weight=float("inf")), ValueError,
         r"^irg_loss: edge_weight must be finite, got inf$"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---- category structure (plain PyTorch) against xeanzheng/CSKD train_cifar.py, value and gradients in float64 -------

def cskd_official(sf4, tf4, label, s_out, t_out, intra_weight=0.002, inter_weight=0.04, center_weight=0.1,
                  use_filter=True):
    """xeanzheng/CSKD ``train_cifar.py`` (a309f0f): ``cluster``, ``cluster_filter``, ``correlation`` and the
    ``intra_cor`` / ``inter_cor`` lines of the training loop, transcribed with loops as there (any [B, ...] feature:
    the official's ``TF4.size(1) * size(2) * size(3)`` is the per-sample size)."""
    num_classes = s_out.size(1)

    def cluster(feature, label):
        lists = [[] for _ in range(num_classes)]
        for i in range(feature.size(0)):
            lists[label[i]].append(feature[i])
        centres, valid = [None] * num_classes, []
        for c in range(num_classes):
            if lists[c]:
                centres[c] = sum(lists[c]) / len(lists[c])
                valid.append(centres[c])
        return torch.stack([centres[label[i]] for i in range(feature.size(0))]), torch.stack(valid)

    def cluster_filter(feature, pred, label):
        lists = [[] for _ in range(num_classes)]
        for i in range(feature.size(0)):
            if pred[i] == label[i]:
                lists[label[i]].append(feature[i])
        centres = [sum(x) / len(x) if x else None for x in lists]
        return torch.stack([centres[label[i]] if lists[label[i]] else feature[i] for i in range(feature.size(0))])

    def correlation(feature):
        feature = feature.reshape(feature.size(0), -1)
        rows = []
        for i in range(feature.size(0)):
            tmp = feature[i].unsqueeze(0).expand(feature.size(0), -1)
            rows.append((tmp * feature).sum(-1) / (tmp ** 2).sum(-1).sqrt() / (feature ** 2).sum(-1).sqrt())
        return torch.stack(rows)

    mse = F.mse_loss
    _, t_pred = torch.max(t_out, 1)
    _, s_pred = torch.max(s_out, 1)
    if use_filter:
        TF4, SF4 = cluster_filter(tf4, t_pred, label), cluster_filter(sf4, s_pred, label)
    else:
        TF4, SF4 = cluster(tf4, label)[0], cluster(sf4, label)[0]
    _, T_center_list = cluster(tf4, label)
    _, S_center_list = cluster(sf4, label)
    T_OUT, T_logits = cluster(t_out, label)
    S_OUT, S_logits = cluster(s_out, label)
    center, _ = cluster(s_out, label)
    size = tf4[0].numel()
    intra_cor = intra_weight * (mse((tf4 - TF4).detach(), sf4 - SF4.detach()) / size
                                + mse((t_out - T_OUT).detach(), s_out - S_OUT.detach()) / T_OUT.size(1)) \
        + center_weight * mse(s_out, center.detach())
    T_cor, S_cor = correlation(T_center_list), correlation(S_center_list)
    T_cor_logits, S_cor_logits = correlation(T_logits), correlation(S_logits)
    inter_cor = inter_weight * (mse(T_cor.detach(), S_cor) / T_cor.size(1)
                                + mse(T_cor_logits.detach(), S_cor_logits) / T_cor_logits.size(1))
    return intra_cor + inter_cor


def cskd_inputs(shape=(12, 3, 2, 2), classes=5, seed=0):
    """Student and teacher (features, logits), float64 leaves that require grad, and labels where some classes are
    absent, some teacher and student predictions are right (the teacher logits favour the label) and some wrong."""
    batch = shape[0]
    labels = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 1, 0, 3][:batch])
    t_logits = randn(batch, classes, seed=seed + 3)
    t_logits = (t_logits + 2.5 * F.one_hot(labels, classes) * (torch.arange(batch) % 3 != 0).unsqueeze(1))
    s_logits = randn(batch, classes, seed=seed + 4) + 1.5 * F.one_hot(labels, classes) * (torch.arange(batch) % 2 == 0
                                                                                          ).unsqueeze(1)
    return (randn(*shape, seed=seed + 1, grad=True), randn(*shape, seed=seed + 2, grad=True), labels,
            s_logits.detach().requires_grad_(), t_logits.detach().requires_grad_())


@pytest.mark.parametrize("options", [{}, {"use_filter": False}, {"intra_weight": 0.5, "inter_weight": 2.0,
                                                                  "center_weight": 0.3}],
                         ids=["official", "no-filter", "other-weights"])
@pytest.mark.parametrize("shape", [(12, 3, 2, 2), (12, 6)], ids=["maps", "vectors"])
def test_category_structure_is_cskd(shape, options):
    """Value and gradients (student features and logits; the teacher gets none, as the official detaches it)."""
    student, teacher, labels, s_logits, t_logits = cskd_inputs(shape)
    assert bool((s_logits.argmax(1) == labels).any()) and bool((s_logits.argmax(1) != labels).any())
    assert bool((t_logits.argmax(1) == labels).any()) and bool((t_logits.argmax(1) != labels).any())
    ours = dict(options)
    if "use_filter" in ours:
        ours["filter_correct"] = ours.pop("use_filter")
    value = assert_equals_official(
        lambda s, t, y, zs, zt: kdkernels.category_structure_loss(s, t, y, zs, zt, **ours),
        lambda s, t, y, zs, zt: cskd_official(s, t, y, zs, zt, **options), student, teacher, labels, s_logits,
        t_logits, what="category_structure")
    assert value > 0
    grads = torch.autograd.grad(kdkernels.category_structure_loss(student, teacher, labels, s_logits, t_logits),
                                (student, s_logits, teacher, t_logits), allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0 and grads[2] is None and grads[3] is None


def test_category_structure_filter_changes_the_intra_term_and_low_precision_runs_in_fp32():
    student, teacher, labels, s_logits, t_logits = cskd_inputs()
    filtered = kdkernels.category_structure_loss(student, teacher, labels, s_logits, t_logits)
    plain = kdkernels.category_structure_loss(student, teacher, labels, s_logits, t_logits, filter_correct=False)
    assert not torch.allclose(filtered, plain)
    same = kdkernels.category_structure_loss(student, student, labels, s_logits, s_logits, center_weight=0.0)
    torch.testing.assert_close(same, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-15)
    for dtype in (torch.float16, torch.bfloat16):
        value = kdkernels.category_structure_loss(*(x.detach().to(dtype) if x.is_floating_point() else x
                                                    for x in (student, teacher, labels, s_logits, t_logits)))
        assert value.dtype == torch.float32
        expected = cskd_official(*(x.detach().to(dtype).double() if x.is_floating_point() else x
                                   for x in (student, teacher, labels, s_logits, t_logits)))
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-9)


def test_category_structure_bad_input_raises_naming_the_argument():
    student, teacher, labels, s_logits, t_logits = cskd_inputs()
    loss = kdkernels.category_structure_loss
    cases = [
        (lambda: loss(student, teacher[:, :2], labels, s_logits, t_logits), ValueError,
         r"^category_structure_loss: student_features must have the same shape as teacher_features"),
        (lambda: loss(student, teacher, labels, s_logits, t_logits[:, :3]), ValueError,
         r"^category_structure_loss: teacher_logits must have the same shape as student_logits"),
        (lambda: loss(student, teacher, labels, s_logits[:5], t_logits[:5]), ValueError,
         r"^category_structure_loss: student_logits must have the features' batch size 12"),
        (lambda: loss(student, teacher, labels.float(), s_logits, t_logits), TypeError,
         r"^category_structure_loss: labels must be an integer tensor"),
        (lambda: loss(student, teacher, labels + 5, s_logits, t_logits), ValueError,
         r"^category_structure_loss: labels must be class indices in \[0, 5\)"),
        (lambda: loss(student, teacher, labels, s_logits, t_logits, inter_weight=float("nan")), ValueError,
         r"^category_structure_loss: inter_weight must be finite"),
        (lambda: loss(student, teacher, labels, s_logits, t_logits, filter_correct=1), TypeError,
         r"^category_structure_loss: filter_correct must be a bool"),
        (lambda: loss(student.int(), teacher, labels, s_logits, t_logits), TypeError,
         r"^category_structure_loss: student_features must be"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---- MHGD graph loss against KD_methods_with_TF nets/Relation.py kld_loss (after tanh), float64 ----------------------

def mhgd_official(G_S, G_T):
    """KD_methods_with_TF ``nets/Relation.py`` (9fb5414): ``G_T = tf.tanh(G_T)``, ``G_S = tf.tanh(G_S)``,
    ``kld_loss(G_S, G_T) = reduce_sum(softmax(X) * (log_softmax(X) - log_softmax(Y)))`` (last axis)."""
    X, Y = torch.tanh(G_S), torch.tanh(G_T)
    return torch.sum(torch.softmax(X, -1) * (torch.log_softmax(X, -1) - torch.log_softmax(Y, -1)))


@pytest.mark.parametrize("shape", [(8, 6, 6), (2, 3, 5, 5), (4,)], ids=["heads-batch-batch", "4d", "one-row"])
def test_mhgd_loss_is_the_official_kld_of_tanh_graphs(shape):
    student, teacher = randn(*shape, seed=1, scale=2.0, grad=True), randn(*shape, seed=2, scale=2.0, grad=True)
    value = assert_equals_official(kdkernels.mhgd_loss, mhgd_official, student, teacher, what="mhgd")
    assert value > 0
    same = kdkernels.mhgd_loss(student, student)
    torch.testing.assert_close(same, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-15)


def test_mhgd_loss_low_precision_computes_in_fp32():
    student, teacher = randn(8, 6, 6, seed=1), randn(8, 6, 6, seed=2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        value = kdkernels.mhgd_loss(student.to(dtype), teacher.to(dtype))
        assert value.dtype == torch.float32
        expected = mhgd_official(student.to(dtype).double(), teacher.to(dtype).double())
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    assert kdkernels.mhgd_loss(student.float(), teacher).dtype == torch.float64


def test_mhgd_loss_bad_input_raises_naming_the_argument():
    student, teacher = randn(8, 6, 6, seed=1), randn(8, 6, 6, seed=2)
    cases = [
        (lambda: kdkernels.mhgd_loss(student, teacher[:, :, :5]), ValueError,
         r"^mhgd_loss: teacher_attention must have the same shape as student_attention \(8, 6, 6\)"),
        (lambda: kdkernels.mhgd_loss(student.long(), teacher), TypeError, r"^mhgd_loss: student_attention must be"),
        (lambda: kdkernels.mhgd_loss(student, None), TypeError, r"^mhgd_loss: teacher_attention must be a torch"),
        (lambda: kdkernels.mhgd_loss(torch.zeros(()), torch.zeros(())), ValueError,
         r"^mhgd_loss: student_attention must have at least 1 dimension"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ------------------------------------------------------------------------------------------------------- REFILLED

from losses_testing import randn as seeded_randn  # noqa: E402
import torch.nn as nn  # noqa: E402


def official_semi_hard_triplets(embeddings, labels):
    """njulus/ReFilled @c5e077f utils/Triplet.py generate_semi_hard_triplets, written out pair by pair: squared
    distances (clamped, zero diagonal); for each (a, p) with y_a = y_p, a != p, in row-major order, the nearest
    negative with D_an > D_ap, else the farthest negative (first index on ties)."""
    b = embeddings.shape[0]
    sq = (embeddings ** 2).sum(1, keepdim=True)
    d = torch.clamp(sq + sq.t() - 2.0 * embeddings @ embeddings.t(), min=0) * (1 - torch.eye(b, dtype=sq.dtype))
    anchors, positives, negatives = [], [], []
    for a in range(b):
        for p in range(b):
            if a == p or labels[a] != labels[p]:
                continue
            outside = [n for n in range(b) if labels[n] != labels[a] and d[a, n] > d[a, p]]
            inside = [n for n in range(b) if labels[n] != labels[a]]
            n = min(outside, key=lambda j: (d[a, j], j)) if outside else max(inside, key=lambda j: (d[a, j], -j))
            anchors.append(a), positives.append(p), negatives.append(n)
    return torch.tensor(anchors), torch.tensor(positives), torch.tensor(negatives)


def official_refilled_stage1(student_embedding, teacher_embedding, fine_label, tau1=4.0):
    """njulus/ReFilled @c5e077f Train.py stage 1 (without the factor 1000)."""
    teacher_embedding = F.normalize(teacher_embedding, p=2, dim=1)
    student_embedding = F.normalize(student_embedding, p=2, dim=1)
    with torch.no_grad():
        a, p, n = official_semi_hard_triplets(student_embedding, fine_label)
    teacher_ap = torch.norm(teacher_embedding[a] - teacher_embedding[p], p=2, dim=1)
    teacher_an = torch.norm(teacher_embedding[a] - teacher_embedding[n], p=2, dim=1)
    student_ap = torch.norm(student_embedding[a] - student_embedding[p], p=2, dim=1)
    student_an = torch.norm(student_embedding[a] - student_embedding[n], p=2, dim=1)
    teacher_output = torch.sigmoid((teacher_an - teacher_ap) / tau1)
    student_output = torch.sigmoid((student_an - student_ap) / tau1)
    teacher_aug = torch.cat([teacher_output.unsqueeze(1), 1 - teacher_output.unsqueeze(1)], dim=1)
    student_aug = torch.cat([student_output.unsqueeze(1), 1 - student_output.unsqueeze(1)], dim=1)
    return nn.KLDivLoss(reduction="mean")(torch.log(student_aug), teacher_aug)   # the 2020 default: element mean


def official_refilled_stage2(model_output, teacher_embedding, fine_label, number_of_classes, tau3=2.0):
    """njulus/ReFilled @c5e077f Train.py stage 2 (without beta = 1000)."""
    means = torch.zeros((number_of_classes, teacher_embedding.shape[1]), dtype=teacher_embedding.dtype)
    counts = torch.zeros(number_of_classes, dtype=teacher_embedding.dtype)
    for i in range(teacher_embedding.shape[0]):
        counts[fine_label[i]] += 1
        means[fine_label[i], :] = means[fine_label[i], :] + teacher_embedding[i, :]
    exists = torch.tensor([i for i in range(number_of_classes) if counts[i] != 0]).long()
    means = (means[exists].t() / counts[exists]).t()
    means = (means.t() / torch.norm(means, dim=1)).t()
    teacher_output = torch.mm(teacher_embedding, means.t())
    local = model_output[:, exists]
    return nn.KLDivLoss(reduction="mean")(F.log_softmax(local / tau3, dim=1), F.softmax(teacher_output / tau3, dim=1))


REFILLED_LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 4])   # class 4 and 3 single: anchors without positives


def test_refilled_triplets_are_the_official_semi_hard_triplets():
    from kdkernels.losses.relation import _refilled_semi_hard_triplets
    for seed in range(4):
        embed = F.normalize(seeded_randn(10, 6, seed=seed), dim=1)
        negative, keep = _refilled_semi_hard_triplets(embed, REFILLED_LABELS)
        a, p, n = official_semi_hard_triplets(embed, REFILLED_LABELS)
        assert keep.sum() == len(a) and bool(keep[a, p].all())
        assert torch.equal(negative[a, p], n)


@pytest.mark.parametrize("temperature", [4.0, 0.5])
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_refilled_triplet_loss_is_the_official_stage1(temperature):
    student, teacher = seeded_randn(10, 6, seed=1, grad=True), seeded_randn(10, 5, seed=2, scale=3.0, grad=True)
    value = assert_equals_official(
        lambda s, t: kdkernels.refilled_triplet_loss(s, t, REFILLED_LABELS, temperature),
        lambda s, t: official_refilled_stage1(s, t, REFILLED_LABELS, temperature), student, teacher,
        what="refilled_triplet")
    assert value > 0


def test_refilled_triplet_loss_reductions_fp32_and_no_triplet():
    student, teacher = seeded_randn(10, 6, seed=3), seeded_randn(10, 5, seed=4)
    mean = kdkernels.refilled_triplet_loss(student, teacher, REFILLED_LABELS)
    total = kdkernels.refilled_triplet_loss(student, teacher, REFILLED_LABELS, normalization="sum")
    batchmean = kdkernels.refilled_triplet_loss(student, teacher, REFILLED_LABELS, normalization="triplets")
    triplets = 2 * 3 + 2 * 3 + 2 * 1        # classes 0 and 1 (3 samples each), class 2 (2 samples)
    torch.testing.assert_close(mean, total / (2 * triplets), rtol=1e-12, atol=0)
    torch.testing.assert_close(batchmean, total / triplets, rtol=1e-12, atol=0)
    low = kdkernels.refilled_triplet_loss(student.float(), teacher.half(), REFILLED_LABELS)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), mean, rtol=2e-3, atol=1e-6)
    single = kdkernels.refilled_triplet_loss(student.requires_grad_(), teacher, torch.arange(10))
    assert single == 0
    single.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_refilled_classifier_loss_is_the_official_stage2():
    labels = torch.tensor([0, 2, 2, 5, 0, 5, 2, 1])        # classes 3, 4, 6 absent
    logits, embed = seeded_randn(8, 7, seed=5, scale=2.0, grad=True), seeded_randn(8, 6, seed=6, grad=True)
    for temperature in (2.0, 1.0):
        assert_equals_official(
            lambda z, t: kdkernels.refilled_classifier_loss(z, t, labels, temperature),
            lambda z, t: official_refilled_stage2(z, t, labels, 7, temperature), logits, embed,
            what="refilled_classifier")
    rows = kdkernels.refilled_classifier_loss(logits, embed, labels, reduction="none")
    assert rows.shape == (8,)
    torch.testing.assert_close(kdkernels.refilled_classifier_loss(logits, embed, labels), rows.sum() / (8 * 4),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.refilled_classifier_loss(logits, embed, labels, reduction="batchmean"),
                               rows.mean(), rtol=1e-12, atol=0)
    low = kdkernels.refilled_classifier_loss(logits.detach().half(), embed.detach().bfloat16(), labels)
    assert low.dtype == torch.float32 and torch.isfinite(low)


REFILLED_EMBED = torch.randn(4, 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.refilled_triplet_loss(REFILLED_EMBED, torch.randn(5, 3), torch.zeros(4, dtype=torch.long)),
     ValueError, r"^refilled_triplet_loss: teacher_embed must have the same batch size"),
    (lambda: kdkernels.refilled_triplet_loss(REFILLED_EMBED, REFILLED_EMBED, torch.zeros(3, dtype=torch.long)),
     ValueError, r"^refilled_triplet_loss: labels must hold one label per sample \(4\)"),
    (lambda: kdkernels.refilled_triplet_loss(REFILLED_EMBED, REFILLED_EMBED, torch.zeros(4)), TypeError,
     r"^refilled_triplet_loss: labels"),
    (lambda: kdkernels.refilled_triplet_loss(REFILLED_EMBED, REFILLED_EMBED, torch.zeros(4, dtype=torch.long), 0.0),
     ValueError, r"^refilled_triplet_loss: temperature"),
    (lambda: kdkernels.refilled_triplet_loss(REFILLED_EMBED, REFILLED_EMBED, torch.zeros(4, dtype=torch.long),
                                             normalization="none"), ValueError,
     r"^refilled_triplet_loss: normalization must be one of 'pairs', 'triplets', 'sum'"),
    (lambda: kdkernels.refilled_classifier_loss(REFILLED_EMBED, torch.randn(3, 2), torch.zeros(4, dtype=torch.long)),
     ValueError, r"^refilled_classifier_loss: teacher_embed must have the batch size of student_logits"),
    (lambda: kdkernels.refilled_classifier_loss(REFILLED_EMBED, REFILLED_EMBED, torch.full((4,), 3)),
     ValueError, r"^refilled_classifier_loss: labels"),
    (lambda: kdkernels.refilled_classifier_loss(REFILLED_EMBED, REFILLED_EMBED, torch.zeros(4, dtype=torch.long),
                                                -1.0), ValueError, r"^refilled_classifier_loss: temperature"),
])
def test_refilled_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------- manifold distillation

def official_layer_mf_loss(F_s, F_t, K):
    """Hao840/manifold-distillation @1096b82 ``losses.py`` ``layer_mf_loss``."""
    F_s = torch.nn.functional.normalize(F_s, dim=-1)
    F_t = torch.nn.functional.normalize(F_t, dim=-1)
    M_s = F_s.bmm(F_s.transpose(-1, -2))
    M_t = F_t.bmm(F_t.transpose(-1, -2))
    M_diff = M_t - M_s
    loss_mf_patch = (M_diff * M_diff).mean()
    f_s = F_s.permute(1, 0, 2)
    f_t = F_t.permute(1, 0, 2)
    M_s = f_s.bmm(f_s.transpose(-1, -2))
    M_t = f_t.bmm(f_t.transpose(-1, -2))
    M_diff = M_t - M_s
    loss_mf_sample = (M_diff * M_diff).mean()
    bsz, patch_num, _ = F_s.shape
    sampler = torch.randperm(bsz * patch_num)[:K]
    f_s = F_s.reshape(bsz * patch_num, -1)[sampler]
    f_t = F_t.reshape(bsz * patch_num, -1)[sampler]
    M_s = f_s.mm(f_s.T)
    M_t = f_t.mm(f_t.T)
    M_diff = M_t - M_s
    loss_mf_rand = (M_diff * M_diff).mean()
    return loss_mf_patch, loss_mf_sample, loss_mf_rand


def official_mf_loss(block_outs_s, block_outs_t, K, w_sample, w_patch, w_rand):
    """``mf_loss`` over every given pair (layer ids 0..n-1), its three sums over the layers averaged, then added
    (``DistillationLoss`` returns the three scaled by beta, and the training loop adds them)."""
    losses = [[], [], []]
    for F_s, F_t in zip(block_outs_s, block_outs_t):
        loss_mf_patch, loss_mf_sample, loss_mf_rand = official_layer_mf_loss(F_s, F_t, K)
        losses[0].append(w_sample * loss_mf_sample)
        losses[1].append(w_patch * loss_mf_patch)
        losses[2].append(w_rand * loss_mf_rand)
    return sum(sum(part) / len(part) for part in losses)


@pytest.mark.parametrize("samples", [192, 10, 1])
@pytest.mark.parametrize("weights", [(0.1, 4.0, 0.2), (1.0, 0.0, 2.5)])
def test_manifold_is_the_official_mf_loss(samples, weights):
    """Two layer pairs of different widths; the same global-RNG draws (a fresh randperm per layer pair)."""
    student = [randn(4, 9, 6, seed=1, grad=True), randn(4, 9, 6, seed=2, scale=2.0, grad=True)]
    teacher = [randn(4, 9, 8, seed=3, grad=True), randn(4, 9, 8, seed=4, offset=0.5, grad=True)]

    def ours(*tokens):
        torch.manual_seed(7)
        return kdkernels.manifold_loss(list(tokens[:2]), list(tokens[2:]), samples, *weights)

    def official(*tokens):
        torch.manual_seed(7)
        return official_mf_loss(tokens[:2], tokens[2:], samples, *weights)

    assert_equals_official(ours, official, *student, *teacher, what="manifold")


def test_manifold_terms_are_relations_of_the_normalised_tokens():
    tokens = randn(3, 5, 4, seed=5)
    # the same relations (a rescaled copy of each token, another width by a rotation) give 0
    rotation = torch.linalg.qr(randn(6, 6, seed=6))[0][:4]
    scaled = tokens * torch.rand(3, 5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).add(0.5)
    assert float(kdkernels.manifold_loss(scaled @ rotation, tokens, samples=7)) < 1e-24
    # one layer = a list of one; the patch term alone
    other = randn(3, 5, 2, seed=8)
    only_patch = kdkernels.manifold_loss(other, tokens, sample_weight=0.0, patch_weight=1.0, random_weight=0.0)
    s, t = torch.nn.functional.normalize(other, dim=-1), torch.nn.functional.normalize(tokens, dim=-1)
    torch.testing.assert_close(only_patch, ((t @ t.transpose(1, 2) - s @ s.transpose(1, 2)) ** 2).mean())
    torch.testing.assert_close(kdkernels.manifold_loss([other], [tokens]), kdkernels.manifold_loss(other, tokens))
    # a generator makes the draws reproducible without the global RNG
    first = kdkernels.manifold_loss(other, tokens, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, kdkernels.manifold_loss(other, tokens, 4, generator=torch.Generator().manual_seed(3)))


def test_manifold_low_precision_computes_in_float32():
    student, teacher = randn(4, 6, 5, seed=9), randn(4, 6, 7, seed=10)
    reference_value = kdkernels.manifold_loss(student, teacher)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        value = kdkernels.manifold_loss(student.to(dtype), teacher.to(dtype))
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference_value, rtol=3e-2, atol=1e-4)


MF_TOKENS = torch.randn(2, 5, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.manifold_loss(MF_TOKENS, torch.randn(2, 6, 4)), ValueError,
     r"^manifold_loss: teacher_tokens\[0\] must have the student's batch and token count \(2, 5\)"),
    (lambda: kdkernels.manifold_loss([MF_TOKENS, MF_TOKENS], [MF_TOKENS]), ValueError,
     r"^manifold_loss: teacher_tokens must hold as many layers as student_tokens \(2\), got 1$"),
    (lambda: kdkernels.manifold_loss(torch.randn(2, 20), MF_TOKENS), ValueError,
     r"^manifold_loss: student_tokens must have 3 dims"),
    (lambda: kdkernels.manifold_loss([], []), TypeError, r"^manifold_loss: student_tokens must be a \[B, N, D\]"),
    (lambda: kdkernels.manifold_loss(MF_TOKENS, MF_TOKENS, 0), ValueError,
     r"^manifold_loss: samples must be an int >= 1, got 0$"),
    (lambda: kdkernels.manifold_loss(MF_TOKENS, MF_TOKENS, 10, -1.0), ValueError,
     r"^manifold_loss: sample_weight must be >= 0"),
    (lambda: kdkernels.manifold_loss(MF_TOKENS, MF_TOKENS, generator=3), TypeError,
     r"^manifold_loss: generator must be a torch.Generator or None"),
])
def test_manifold_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
