"""softmax_mse_loss (kdkernels/losses/self_supervised.py, torch ops) against CuriousAI/mean-teacher's code transcribed
here: float64 value and gradient, reductions, the nn module; errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, randn

SHAPES = [(6, 7), (32, 100)]
SHAPE_IDS = [f"{b}x{c}" for b, c in SHAPES]


def mean_teacher_softmax_mse(input_logits, target_logits):
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss`` (a sum over the batch; the
    caller in ``pytorch/main.py`` divides it by the minibatch size)."""
    assert input_logits.size() == target_logits.size()
    input_softmax = F.softmax(input_logits, dim=1)
    target_softmax = F.softmax(target_logits, dim=1)
    num_classes = input_logits.size()[1]
    return F.mse_loss(input_softmax, target_softmax, reduction="sum") / num_classes


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_softmax_mse_is_the_mean_teachers_consistency_cost(shape):
    student, teacher = randn(*shape, seed=20, scale=3.0, grad=True), randn(*shape, seed=21, scale=3.0, grad=True)
    batch = shape[0]
    assert_equals_official(lambda s, t: kdkernels.softmax_mse_loss(s, t),
                           lambda s, t: mean_teacher_softmax_mse(s, t) / batch, student, teacher,
                           what="softmax mse (batchmean)")
    assert_equals_official(lambda s, t: kdkernels.softmax_mse_loss(s, t, reduction="sum"),
                           mean_teacher_softmax_mse, student, teacher, what="softmax mse (sum)")


def test_softmax_mse_reductions_relate_as_documented():
    student, teacher = randn(5, 2, 7, seed=22, scale=2.0), randn(5, 2, 7, seed=23, scale=2.0)
    rows = kdkernels.softmax_mse_loss(student, teacher, reduction="none")
    assert rows.shape == (5, 2)
    expected_rows = (F.softmax(student, -1) - F.softmax(teacher, -1)).pow(2).mean(-1)
    torch.testing.assert_close(rows, expected_rows, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher), rows.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher, reduction="mean"), rows.mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.softmax_mse_loss(student, teacher, reduction="sum"), rows.sum(),
                               rtol=1e-12, atol=0)
    same = kdkernels.nn.SoftmaxMSELoss(reduction="sum")(student, teacher)
    assert torch.equal(same, kdkernels.softmax_mse_loss(student, teacher, reduction="sum"))


LOGITS = torch.randn(4, 10)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.softmax_mse_loss(LOGITS, LOGITS[:, :5]), ValueError,
     r"^softmax_mse_loss: teacher_logits must have the same shape as student_logits \(4, 10\), got shape \(4, 5\)$"),
    (lambda: kdkernels.softmax_mse_loss(LOGITS, LOGITS, reduction="avg"), ValueError,
     r"^softmax_mse_loss: reduction must be one of"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------------------ BYOL

def byol_l2_normalize(x, axis=-1, epsilon=1e-12):
    """deepmind-research ``byol/utils/helpers.py`` ``l2_normalize`` (jnp → torch)."""
    square_sum = torch.sum(x * x, dim=axis, keepdim=True)
    return x * torch.rsqrt(torch.clamp(square_sum, min=epsilon))


def byol_regression_loss(x, y):
    """deepmind-research ``byol/utils/helpers.py`` ``regression_loss``: per-sample ``Σ_d (x̂ − ŷ)²``."""
    normed_x, normed_y = byol_l2_normalize(x, axis=-1), byol_l2_normalize(y, axis=-1)
    return torch.sum((normed_x - normed_y) ** 2, dim=-1)


@pytest.mark.parametrize("shape", [(6, 5), (32, 256)], ids=["6x5", "32x256"])
def test_byol_loss_is_the_official_regression_loss(shape):
    prediction, target = randn(*shape, seed=30, scale=2.0, grad=True), randn(*shape, seed=31, scale=0.5, grad=True)
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z),
                           lambda p, z: byol_regression_loss(p, z).mean(), prediction, target,
                           what="byol regression loss (batchmean, byol_experiment.py loss_fn's jnp.mean)")
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z, reduction="sum"),
                           lambda p, z: byol_regression_loss(p, z).sum(), prediction, target, what="byol (sum)")
    assert_equals_official(lambda p, z: kdkernels.byol_loss(p, z, reduction="none"), byol_regression_loss,
                           prediction, target, what="byol (none)")


def test_byol_loss_is_two_minus_two_cosine_and_its_module_agrees():
    prediction, target = randn(8, 4, seed=32), randn(8, 4, seed=33, scale=3.0)
    rows = kdkernels.byol_loss(prediction, target, reduction="none")
    torch.testing.assert_close(rows, 2 - 2 * F.cosine_similarity(prediction, target, dim=-1), rtol=1e-12, atol=1e-12)
    assert torch.equal(kdkernels.nn.BYOLLoss(reduction="sum")(prediction, target),
                       kdkernels.byol_loss(prediction, target, reduction="sum"))
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    value = kdkernels.byol_loss(zero, torch.ones(3, 4, dtype=torch.float64))
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(zero.grad).all(), "the 1e-12 floor of l2_normalize"
    half = kdkernels.byol_loss(prediction.half(), target.half())
    assert half.dtype == torch.float32


FEATURES = torch.randn(4, 6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES[:, :5]), ValueError,
     r"^byol_loss: prediction must have the same shape as target \(4, 5\)"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES[:3]), ValueError,
     r"^byol_loss: target must have the same batch size as prediction"),
    (lambda: kdkernels.byol_loss(FEATURES[0], FEATURES[0]), ValueError, r"^byol_loss: prediction must have 2 dims"),
    (lambda: kdkernels.byol_loss(FEATURES.long(), FEATURES), TypeError, r"^byol_loss: prediction must be float32"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES.numpy()), TypeError, r"^byol_loss: target must be a torch.Tensor"),
    (lambda: kdkernels.byol_loss(FEATURES, FEATURES, reduction="mean"), ValueError,
     r"^byol_loss: reduction must be one of 'batchmean', 'sum', 'none'"),
])
def test_byol_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()



# ------------------------------------------------------------------------------------------------------- SimSiam

def simsiam_official_loss(p1, p2, z1, z2):
    """facebookresearch/simsiam ``main_simsiam.py`` ``train``: ``criterion = nn.CosineSimilarity(dim=1)``, ``loss =
    −(criterion(p1, z2).mean() + criterion(p2, z1).mean()) · 0.5`` (z detached by ``simsiam/builder.py``)."""
    criterion = torch.nn.CosineSimilarity(dim=1)
    return -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5


@pytest.mark.parametrize("shape", [(6, 5), (32, 64)], ids=["6x5", "32x64"])
def test_simsiam_loss_is_the_official_negative_cosine(shape):
    p1, p2 = randn(*shape, seed=40, scale=2.0, grad=True), randn(*shape, seed=41, grad=True)
    z1, z2 = randn(*shape, seed=42, scale=0.5, grad=True), randn(*shape, seed=43, scale=3.0, grad=True)
    assert_equals_official(
        lambda a, b, c, d: 0.5 * (kdkernels.simsiam_loss(a, d.detach()) + kdkernels.simsiam_loss(b, c.detach())),
        simsiam_official_loss, p1, p2, z1, z2, what="simsiam symmetrised loss (main_simsiam.py)")
    assert_equals_official(lambda p, z: kdkernels.simsiam_loss(p, z, reduction="none"),
                           lambda p, z: -(p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1)), p1, z2,
                           what="simsiam per sample −cos (both gradients)")
    assert_equals_official(lambda p, z: kdkernels.simsiam_loss(p, z, reduction="sum"),
                           lambda p, z: -torch.nn.CosineSimilarity(dim=1)(p, z).sum(), p1, z2, what="simsiam (sum)")


def test_simsiam_loss_precisions_and_module():
    prediction, target = randn(8, 4, seed=44), randn(8, 4, seed=45, scale=3.0)
    value = kdkernels.simsiam_loss(prediction, target)
    assert -1.0 <= value.item() <= 1.0
    torch.testing.assert_close(kdkernels.simsiam_loss(prediction, prediction), torch.tensor(-1.0, dtype=torch.float64))
    assert torch.equal(kdkernels.nn.SimSiamLoss(reduction="sum")(prediction, target),
                       kdkernels.simsiam_loss(prediction, target, reduction="sum"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = kdkernels.simsiam_loss(prediction.to(dtype), target.to(dtype))
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), value, rtol=2e-2, atol=2e-2)
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    kdkernels.simsiam_loss(zero, torch.ones(3, 4, dtype=torch.float64)).backward()
    assert torch.isfinite(zero.grad).all(), "the 1e-8 floor of nn.CosineSimilarity"


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.simsiam_loss(FEATURES, FEATURES[:, :5]), ValueError,
     r"^simsiam_loss: prediction must have the same shape as target"),
    (lambda: kdkernels.simsiam_loss(FEATURES, FEATURES[:3]), ValueError,
     r"^simsiam_loss: target must have the same batch size as prediction"),
    (lambda: kdkernels.simsiam_loss(FEATURES[0], FEATURES[0]), ValueError,
     r"^simsiam_loss: prediction must have 2 dims"),
    (lambda: kdkernels.simsiam_loss(FEATURES.long(), FEATURES), TypeError, r"^simsiam_loss: prediction must be"),
    (lambda: kdkernels.simsiam_loss(FEATURES, [1.0]), TypeError, r"^simsiam_loss: target must be a torch.Tensor"),
    (lambda: kdkernels.simsiam_loss(FEATURES, FEATURES, reduction="mean"), ValueError,
     r"^simsiam_loss: reduction must be one of 'batchmean', 'sum', 'none'"),
])
def test_simsiam_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------- MoCo

def moco_official_logits(q, k, queue_dk, T):
    """facebookresearch/moco ``moco/builder.py`` ``MoCo.forward`` (after the encoders): normalised q and k,
    ``l_pos = einsum('nc,nc->n')``, ``l_neg = einsum('nc,ck->nk', q, queue)`` with the official [dim, K] queue,
    ``logits = cat([l_pos, l_neg]) / T``, labels zeros."""
    q = torch.nn.functional.normalize(q, dim=1)
    k = torch.nn.functional.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue_dk])
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    return logits, torch.zeros(logits.shape[0], dtype=torch.long)


def moco_official_loss(q, k, queue_dk, T, reduction="mean"):
    """``main_moco.py``: ``criterion = nn.CrossEntropyLoss()`` of ``model(im_q, im_k)``."""
    logits, labels = moco_official_logits(q, k, queue_dk, T)
    return torch.nn.CrossEntropyLoss(reduction=reduction)(logits, labels)


@pytest.mark.parametrize("batch, dim, queue_size, temperature", [(6, 5, 12, 0.07), (16, 32, 64, 0.2)])
def test_moco_loss_is_the_official_infonce(batch, dim, queue_size, temperature):
    query, key = randn(batch, dim, seed=50, scale=2.0, grad=True), randn(batch, dim, seed=51, grad=True)
    queue = F.normalize(randn(dim, queue_size, seed=52), dim=0).T.contiguous().requires_grad_()
    assert_equals_official(lambda q, k, n: kdkernels.moco_loss(q, k, n, temperature=temperature),
                           lambda q, k, n: moco_official_loss(q, k, n.T, temperature), query, key, queue,
                           what="moco InfoNCE (batch mean)")
    for reduction, official in (("sum", "sum"), ("none", "none")):
        assert_equals_official(lambda q, k, n: kdkernels.moco_loss(q, k, n, temperature=temperature,
                                                                   reduction=reduction),
                               lambda q, k, n: moco_official_loss(q, k, n.T, temperature, official), query, key,
                               queue, what=f"moco ({reduction})")


def test_moco_loss_default_temperature_precisions_and_module():
    query, key, queue = randn(8, 4, seed=53), randn(8, 4, seed=54), F.normalize(randn(10, 4, seed=55), dim=1)
    value = kdkernels.moco_loss(query, key, queue)
    torch.testing.assert_close(value, moco_official_loss(query, key, queue.T, 0.07), rtol=1e-12, atol=0)
    assert torch.equal(kdkernels.nn.MoCoLoss(temperature=0.2)(query, key, queue),
                       kdkernels.moco_loss(query, key, queue, temperature=0.2))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = kdkernels.moco_loss(query.to(dtype), key.to(dtype), queue.to(dtype))
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), value, rtol=5e-2, atol=5e-2)
    # the positive alone scores far above unrelated negatives: the loss is close to 0
    far = kdkernels.moco_loss(query[:1], query[:1] * 3, -F.normalize(query[:1], dim=1), temperature=0.07)
    assert far.item() < 1e-6


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES[:, :5], FEATURES), ValueError,
     r"^moco_loss: query must have the same shape as key"),
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES, FEATURES[:, :5]), ValueError,
     r"^moco_loss: queue must hold keys of the query's width 6 \(shape \[K, D\]\), got shape \(4, 5\)"),
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES, FEATURES[0]), ValueError, r"^moco_loss: queue must have 2 dims"),
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES, FEATURES.long()), TypeError, r"^moco_loss: queue must be"),
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES, FEATURES, temperature=0.0), ValueError,
     r"^moco_loss: temperature must be positive"),
    (lambda: kdkernels.moco_loss(FEATURES, FEATURES, FEATURES, reduction="mean"), ValueError,
     r"^moco_loss: reduction must be one of 'batchmean', 'sum', 'none'"),
])
def test_moco_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------- DINO

def dino_official_loss(student_output, teacher_output, center, ncrops, temp, student_temp=0.1):
    """facebookresearch/dino ``main_dino.py`` ``DINOLoss.forward`` (without the center update), on the official
    [V·B, K] layouts (views concatenated along the batch)."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss


@pytest.mark.parametrize("views, batch, classes, temp", [(2, 5, 7, 0.04), (6, 8, 32, 0.07)])
def test_dino_loss_is_the_official_multicrop_cross_entropy(views, batch, classes, temp):
    student = randn(views, batch, classes, seed=60, scale=2.0, grad=True)
    teacher = randn(2, batch, classes, seed=61, scale=0.5, grad=True)
    center = randn(1, classes, seed=62, scale=0.3)
    assert_equals_official(
        lambda s, t: kdkernels.dino_loss(s, t, center, teacher_temperature=temp),
        lambda s, t: dino_official_loss(s.reshape(views * batch, classes), t.reshape(2 * batch, classes), center,
                                        views, temp), student, teacher, what="dino loss (DINOLoss.forward)")
    assert_equals_official(
        lambda s, t: kdkernels.dino_loss(s, t, center[0], student_temperature=0.2, teacher_temperature=temp),
        lambda s, t: dino_official_loss(s.reshape(views * batch, classes), t.reshape(2 * batch, classes), center,
                                        views, temp, student_temp=0.2), student, teacher,
        what="dino loss (student temperature 0.2, a [K] center)")


def test_dino_loss_precisions_module_and_one_teacher_view():
    student, teacher, center = randn(3, 4, 6, seed=63), randn(2, 4, 6, seed=64), randn(6, seed=65, scale=0.1)
    value = kdkernels.dino_loss(student, teacher, center)
    assert torch.equal(kdkernels.nn.DINOLoss()(student, teacher, center), value)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = kdkernels.dino_loss(student.to(dtype), teacher.to(dtype), center.to(dtype))
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), value, rtol=5e-2, atol=5e-2)
    one = kdkernels.dino_loss(student, teacher[:1], center)
    q = F.softmax((teacher[0] - center) / 0.04, dim=-1)
    expected = sum(-(q * F.log_softmax(student[v] / 0.1, dim=-1)).sum(-1).mean() for v in (1, 2)) / 2
    torch.testing.assert_close(one, expected, rtol=1e-12, atol=0)


STACKED = torch.randn(3, 4, 6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.dino_loss(STACKED, STACKED[:2, :, :5], STACKED[0, 0]), ValueError,
     r"^dino_loss: teacher_outputs must have shape \[V_t, 4, 6\] with 1 <= V_t <= 3"),
    (lambda: kdkernels.dino_loss(STACKED[:2], STACKED, STACKED[0, 0]), ValueError,
     r"^dino_loss: teacher_outputs must have shape \[V_t, 4, 6\] with 1 <= V_t <= 2"),
    (lambda: kdkernels.dino_loss(STACKED[:1], STACKED[:1], STACKED[0, 0]), ValueError,
     r"^dino_loss: student_outputs must hold at least 2 views"),
    (lambda: kdkernels.dino_loss(STACKED, STACKED[:2], STACKED[0, 0, :5]), ValueError,
     r"^dino_loss: center must have shape \[6\] or \[1, 6\]"),
    (lambda: kdkernels.dino_loss(STACKED[0], STACKED[:2], STACKED[0, 0]), ValueError,
     r"^dino_loss: student_outputs must have 3 dims"),
    (lambda: kdkernels.dino_loss(STACKED, STACKED[:2].long(), STACKED[0, 0]), TypeError,
     r"^dino_loss: teacher_outputs must be"),
    (lambda: kdkernels.dino_loss(STACKED, STACKED[:2], STACKED[0, 0], teacher_temperature=0.0), ValueError,
     r"^dino_loss: teacher_temperature must be positive"),
    (lambda: kdkernels.dino_loss(STACKED, STACKED[:2], STACKED[0, 0], student_temperature=-1.0), ValueError,
     r"^dino_loss: student_temperature must be positive"),
])
def test_dino_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------------------- SDSSL

def sdssl_info_nce_loss(s_features, t_features):
    """hagiss/SDSSL ``pl_train_moco.py`` ``PLLearner.info_nce_loss`` (rank 0 of one process)."""
    batch_size = s_features.shape[0]
    labels = torch.arange(batch_size, dtype=torch.long)
    s_features = F.normalize(s_features, dim=1)
    t_features = F.normalize(t_features, dim=1)
    similarity_matrix = torch.matmul(s_features, t_features.T)
    tau = 0.2
    logits = similarity_matrix / tau
    loss = torch.nn.CrossEntropyLoss()(logits, labels)
    return 2 * tau * loss


def sdssl_info_nce_loss_layer(s_features, t_features, depth):
    """``PLLearner.info_nce_loss_layer`` (rank 0): ``depth`` layers' predictions stacked along the batch."""
    batch_size = s_features.shape[0]
    batch_size /= depth
    labels = torch.cat([torch.arange(batch_size, dtype=torch.long) for _ in range(depth)], dim=0)
    s_features = F.normalize(s_features, dim=1)
    t_features = F.normalize(t_features, dim=1)
    similarity_matrix = torch.matmul(s_features, t_features.T)
    tau = 0.2
    logits = similarity_matrix / tau
    loss = torch.nn.CrossEntropyLoss()(logits, labels)
    return 2 * tau * loss


def sdssl_official(predictions, keys, ratio):
    """``training_step``'s ``loss_output + self.ratio * loss_mid`` for one view pair (``st_inter``: the last
    layer's prediction against the keys, the mean over the intermediate layers' predictions)."""
    layers, batch, dim = predictions.shape
    flat = predictions.reshape(layers * batch, dim)
    student_mid, student_output = torch.split(flat, [batch * (layers - 1), batch], dim=0)
    loss_mid = sdssl_info_nce_loss_layer(student_mid, keys, layers - 1)
    return sdssl_info_nce_loss(student_output, keys) + ratio * loss_mid


@pytest.mark.parametrize("layers, batch, dim, ratio", [(12, 6, 5, 1.0), (3, 16, 32, 0.37)])
def test_sdssl_loss_is_the_official_self_distilled_infonce(layers, batch, dim, ratio):
    predictions = randn(layers, batch, dim, seed=70, scale=2.0, grad=True)
    keys = randn(batch, dim, seed=71, grad=True)
    assert_equals_official(lambda p, k: kdkernels.sdssl_loss(p, k, ratio=ratio),
                           lambda p, k: sdssl_official(p, k, ratio), predictions, keys,
                           what="sdssl loss_output + ratio·loss_mid")
    # the predictor-only term: 12 · info_nce_loss_layer(all layers) with depth 12 = ratio L − 1
    assert_equals_official(lambda p, k: kdkernels.sdssl_loss(p, k, ratio=layers - 1),
                           lambda p, k: layers * sdssl_info_nce_loss_layer(p.reshape(-1, dim), k, layers),
                           predictions, keys, what="sdssl 12·loss_detached")
    assert_equals_official(lambda p, k: kdkernels.sdssl_loss(p[-1:], k),
                           lambda p, k: sdssl_info_nce_loss(p[-1], k), predictions, keys,
                           what="MoCo v3 (one layer)")


def test_sdssl_loss_precisions_module_and_temperature():
    predictions, keys = randn(3, 8, 4, seed=72), randn(8, 4, seed=73)
    value = kdkernels.sdssl_loss(predictions, keys)
    assert torch.equal(kdkernels.nn.SDSSLLoss()(predictions, keys), value)
    torch.testing.assert_close(kdkernels.sdssl_loss(predictions, keys, ratio=0.0),
                               sdssl_info_nce_loss(predictions[-1], keys), rtol=1e-12, atol=0)
    hot = kdkernels.sdssl_loss(predictions[-1:], keys, temperature=1.0)
    logits = F.normalize(predictions[-1], dim=1) @ F.normalize(keys, dim=1).T
    torch.testing.assert_close(hot, 2 * F.cross_entropy(logits, torch.arange(8)), rtol=1e-12, atol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = kdkernels.sdssl_loss(predictions.to(dtype), keys.to(dtype))
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), value, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.sdssl_loss(STACKED, STACKED[0, :3]), ValueError,
     r"^sdssl_loss: keys must have shape \[B, D\] = \(4, 6\)"),
    (lambda: kdkernels.sdssl_loss(STACKED[0], STACKED[0]), ValueError, r"^sdssl_loss: predictions must have 3 dims"),
    (lambda: kdkernels.sdssl_loss(STACKED, STACKED[0].long()), TypeError, r"^sdssl_loss: keys must be"),
    (lambda: kdkernels.sdssl_loss(STACKED, STACKED[0], temperature=0.0), ValueError,
     r"^sdssl_loss: temperature must be positive"),
    (lambda: kdkernels.sdssl_loss(STACKED, STACKED[0], ratio=-1.0), ValueError, r"^sdssl_loss: ratio must be >= 0"),
])
def test_sdssl_loss_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()

# ---------------------------------------------------------------------------------------------------------- SSKD

def official_sskd_similarity(feat, batch):
    """xuguodong03/SSKD ``student.py``: cosine similarity of every rotated row to every normal row, [3B, B]."""
    nor_index = torch.arange(4 * batch) % 4 == 0
    aug_index = torch.arange(4 * batch) % 4 != 0
    nor_feat = feat[nor_index].unsqueeze(2).expand(-1, -1, 3 * batch).transpose(0, 2)
    aug_feat = feat[aug_index].unsqueeze(2).expand(-1, -1, 1 * batch)
    return F.cosine_similarity(aug_feat, nor_feat, dim=1)


def official_sskd_head(rep):
    """SSKD ``student.py`` ``# train ssp_head``: CE of each rotated copy's similarities against its image index."""
    batch = rep.shape[0] // 4
    simi = official_sskd_similarity(rep, batch)
    target = torch.arange(batch).unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    return F.cross_entropy(simi, target)


def official_selection(scores, target, ratio, batch):
    """SSKD ``student.py``'s error-level ranking (``torch.argsort(rank)`` made stable: the official order of tied
    ranks is unspecified)."""
    rank = torch.argsort(scores, dim=1, descending=True)
    rank = torch.argmax(torch.eq(rank, target.unsqueeze(1)).long(), dim=1)
    index = torch.argsort(rank, stable=True)
    wrong_num = torch.nonzero(rank, as_tuple=True)[0].numel()
    correct_num = 3 * batch - wrong_num
    index = index[:correct_num + int(wrong_num * ratio)]
    return torch.sort(index)[0]


def official_sskd(output, knowledge, s_feat, t_feat, target, ce_weight=0.1, kd_weight=0.9, tf_weight=2.7,
                  ss_weight=10.0, kd_T=4.0, tf_T=4.0, ss_T=0.5, ratio_tf=1.0, ratio_ss=0.75):
    """SSKD ``student.py``'s student loss (loss1 … loss4), transcribed."""
    batch = output.shape[0] // 4
    nor_index = torch.arange(4 * batch) % 4 == 0
    aug_index = torch.arange(4 * batch) % 4 != 0
    log_nor_output = F.log_softmax(output[nor_index] / kd_T, dim=1)
    log_aug_output = F.log_softmax(output[aug_index] / tf_T, dim=1)
    nor_knowledge = F.softmax(knowledge[nor_index] / kd_T, dim=1)
    aug_knowledge = F.softmax(knowledge[aug_index] / tf_T, dim=1)
    aug_target = target.unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    distill_index_tf = official_selection(aug_knowledge, aug_target, ratio_tf, batch)
    s_simi = official_sskd_similarity(s_feat, batch)
    t_simi = official_sskd_similarity(t_feat, batch).detach()
    own = torch.arange(batch).unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    distill_index_ss = official_selection(t_simi, own, ratio_ss, batch)
    log_simi = F.log_softmax(s_simi / ss_T, dim=1)
    simi_knowledge = F.softmax(t_simi / ss_T, dim=1)
    loss1 = F.cross_entropy(output[nor_index], target)
    loss2 = F.kl_div(log_nor_output, nor_knowledge, reduction="batchmean") * kd_T * kd_T
    loss3 = F.kl_div(log_aug_output[distill_index_tf], aug_knowledge[distill_index_tf],
                     reduction="batchmean") * tf_T * tf_T
    loss4 = F.kl_div(log_simi[distill_index_ss], simi_knowledge[distill_index_ss], reduction="batchmean") * ss_T * ss_T
    return ce_weight * loss1 + kd_weight * loss2 + tf_weight * loss3 + ss_weight * loss4


def sskd_inputs(batch=6, classes=5, seed=40):
    return (randn(4 * batch, classes, seed=seed, scale=2.0, grad=True), randn(4 * batch, classes, seed=seed + 1,
                                                                            scale=3.0),
            randn(4 * batch, 7, seed=seed + 2, grad=True), randn(4 * batch, 9, seed=seed + 3),
            torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed)))


def test_sskd_head_loss_is_the_official_ssp_head_objective():
    rep = randn(4 * 5, 6, seed=39, grad=True)
    assert_equals_official(kdkernels.sskd_head_loss, official_sskd_head, rep, what="sskd head")


@pytest.mark.parametrize("options", [{}, {"ratio_tf": 0.5, "ratio_ss": 0.0}, {"ratio_tf": 0.0, "ratio_ss": 1.0}],
                         ids=["official", "half-tf-no-ss-wrong", "no-tf-wrong-all-ss"])
def test_sskd_loss_is_the_official_student_loss(options):
    student, teacher, s_feat, t_feat, labels = sskd_inputs()
    ours = {"tf_ratio": options.get("ratio_tf", 1.0), "ss_ratio": options.get("ratio_ss", 0.75)}
    # the teacher agrees with the labels on some rotated rows, so that both kinds of rows exist
    teacher = teacher.detach().clone()
    teacher[1::4].scatter_(1, labels[:, None], 20.0)
    assert_equals_official(lambda s, f: kdkernels.sskd_loss(s, teacher, f, t_feat, labels, **ours),
                           lambda s, f: official_sskd(s, teacher, f, t_feat, labels, **options), student, s_feat,
                           what=f"sskd {options}")


def test_sskd_loss_selection_drops_the_wrong_rows():
    student, teacher, s_feat, t_feat, labels = sskd_inputs(batch=4, seed=50)
    off = dict(ce_weight=0.0, kd_weight=0.0, ss_weight=0.0, tf_weight=1.0)
    teacher = teacher.detach().clone()
    teacher[1::4].scatter_(1, labels[:, None], 20.0)     # right on the 90° copies only
    teacher[2::4].scatter_(1, labels[:, None], -20.0)
    teacher[3::4].scatter_(1, labels[:, None], -20.0)
    kept_only_right = kdkernels.sskd_loss(student, teacher, s_feat, t_feat, labels, tf_ratio=0.0, **off)
    right_rows = kdkernels.kd_loss(student[1::4], teacher[1::4], 4.0)
    torch.testing.assert_close(kept_only_right, right_rows, rtol=1e-12, atol=1e-12)
    everything = kdkernels.sskd_loss(student, teacher, s_feat, t_feat, labels, tf_ratio=1.0, **off)
    aug = torch.arange(16) % 4 != 0
    torch.testing.assert_close(everything, kdkernels.kd_loss(student[aug], teacher[aug], 4.0), rtol=1e-12, atol=1e-12)


def test_sskd_loss_precisions_and_module():
    student, teacher, s_feat, t_feat, labels = (t.detach() if t.is_floating_point() else t for t in sskd_inputs())
    reference = kdkernels.sskd_loss(student, teacher, s_feat, t_feat, labels)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        value = kdkernels.sskd_loss(student.to(dtype), teacher.to(dtype), s_feat.to(dtype), t_feat.to(dtype), labels)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference, rtol=0.05, atol=0.05)
    module = kdkernels.nn.SSKDLoss(ss_ratio=0.5)
    assert torch.equal(module(student, teacher, s_feat, t_feat, labels),
                       kdkernels.sskd_loss(student, teacher, s_feat, t_feat, labels, ss_ratio=0.5))


LOGITS12, FEAT12, LABELS3 = torch.randn(12, 5), torch.randn(12, 4), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.sskd_loss(LOGITS12[:10], LOGITS12[:10], FEAT12[:10], FEAT12[:10], LABELS3), ValueError,
     r"^sskd_loss: student_logits must hold 4 rows per image"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12[:, :4], FEAT12, FEAT12, LABELS3), ValueError,
     r"^sskd_loss: teacher_logits must have the same shape as student_logits"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12, FEAT12, FEAT12[:8], LABELS3), ValueError,
     r"^sskd_loss: teacher_features must have the same batch size as student_features"),
    (lambda: kdkernels.sskd_loss(LOGITS12[:8], LOGITS12[:8], FEAT12[:8], FEAT12[:8], LABELS3), ValueError,
     r"^sskd_loss: labels must have the logits' leading shape \(2,\)"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12, FEAT12, FEAT12, LABELS3.float()), TypeError,
     r"^sskd_loss: labels must be an integer tensor"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12, FEAT12, FEAT12, LABELS3, ss_ratio=1.5), ValueError,
     r"^sskd_loss: ss_ratio must be"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12, FEAT12, FEAT12, LABELS3, ss_temperature=0.0), ValueError,
     r"^sskd_loss: ss_temperature must be"),
    (lambda: kdkernels.sskd_loss(LOGITS12, LOGITS12, FEAT12, FEAT12, LABELS3, tf_weight=-1.0), ValueError,
     r"^sskd_loss: tf_weight must be"),
    (lambda: kdkernels.sskd_head_loss(FEAT12[:10]), ValueError, r"^sskd_head_loss: features must hold 4 rows per"),
    (lambda: kdkernels.sskd_head_loss(FEAT12, copies=1), ValueError, r"^sskd_head_loss: copies must be"),
    (lambda: kdkernels.sskd_head_loss(FEAT12.long()), TypeError, r"^sskd_head_loss: features must be float32"),
])
def test_sskd_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------------------- HSAKD

def official_distill_kl(y_s, y_t, T):
    """winycg/HSAKD ``train_student_cifar.py`` ``DistillKL``."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * (T ** 2)


def official_hsakd_labels(target):
    return torch.stack([target * 4 + i for i in range(4)], 1).view(-1)


def official_hsakd_teacher(ss_logits, target):
    """HSAKD ``train_teacher_cifar.py`` (frozen backbone): the auxiliary heads' CE on the joint labels."""
    labels = official_hsakd_labels(target)
    loss_cls = torch.tensor(0.0, dtype=torch.float64)
    for i in range(len(ss_logits)):
        loss_cls = loss_cls + F.cross_entropy(ss_logits[i], labels)
    return loss_cls


def official_hsakd_student(logits, t_logits, ss_logits, t_ss_logits, target, T=3.0):
    """HSAKD ``train_student_cifar.py``: ``loss_cls + loss_div``."""
    loss_cls = F.cross_entropy(logits[0::4], target)
    loss_div = 0.0
    for i in range(len(ss_logits)):
        loss_div = loss_div + official_distill_kl(ss_logits[i], t_ss_logits[i].detach(), T)
    loss_div = loss_div + official_distill_kl(logits, t_logits.detach(), T)
    return loss_cls + loss_div


def test_hsakd_joint_labels_are_class_major():
    target = torch.tensor([2, 0, 1])
    assert torch.equal(kdkernels.hsakd_joint_labels(target), official_hsakd_labels(target))
    assert kdkernels.hsakd_joint_labels(target, copies=2).tolist() == [4, 5, 0, 1, 2, 3]


def test_hsakd_head_loss_is_the_official_teacher_objective():
    target = torch.tensor([3, 0, 4, 1])
    heads = [randn(16, 20, seed=60 + i, scale=2.0, grad=True) for i in range(3)]
    assert_equals_official(lambda *h: kdkernels.hsakd_head_loss(list(h), target),
                           lambda *h: official_hsakd_teacher(list(h), target), *heads, what="hsakd head")


def test_hsakd_loss_is_the_official_student_loss():
    target = torch.tensor([3, 0, 4, 1, 2])
    logits, t_logits = randn(20, 5, seed=70, grad=True), randn(20, 5, seed=71, scale=3.0, grad=True)
    ss = [randn(20, 20, seed=72 + i, grad=True) for i in range(2)]
    t_ss = [randn(20, 20, seed=74 + i, scale=2.0) for i in range(2)]
    assert_equals_official(lambda s, t, *h: kdkernels.hsakd_loss(s, t.detach(), list(h), t_ss, target),
                           lambda s, t, *h: official_hsakd_student(s, t, list(h), t_ss, target), logits, t_logits,
                           *ss, what="hsakd")
    one = kdkernels.hsakd_loss(logits, t_logits, ss[0], t_ss[0], target, temperature=2.0, ce_weight=0.0)
    torch.testing.assert_close(one, official_hsakd_student(logits, t_logits, ss[:1], t_ss[:1], target, 2.0)
                               - F.cross_entropy(logits[0::4], target), rtol=1e-10, atol=1e-12)
    half = kdkernels.hsakd_loss(logits.half(), t_logits.half(), [h.half() for h in ss], t_ss, target)
    assert half.dtype == torch.float32


HSAKD_Z, HSAKD_A, HSAKD_Y = torch.randn(12, 5), torch.randn(12, 20), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, [HSAKD_A], [HSAKD_A, HSAKD_A], HSAKD_Y), ValueError,
     r"^hsakd_loss: teacher_aux_logits must hold one head per student head \(1\)"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, [HSAKD_A], [HSAKD_A[:, :16]], HSAKD_Y), ValueError,
     r"^hsakd_loss: teacher_aux_logits must have the same shape as student_aux_logits"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, [HSAKD_A[:8]], [HSAKD_A[:8]], HSAKD_Y), ValueError,
     r"^hsakd_loss: student_aux_logits must have one row per logits row \(12\)"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z[:10], HSAKD_Z[:10], [HSAKD_A[:10]], [HSAKD_A[:10]], HSAKD_Y), ValueError,
     r"^hsakd_loss: student_logits must hold 4 rows per image"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, HSAKD_A, HSAKD_A, HSAKD_Y[:2]), ValueError,
     r"^hsakd_loss: labels must have the logits' leading shape \(3,\)"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, HSAKD_A, HSAKD_A, HSAKD_Y, temperature=0.0), ValueError,
     r"^hsakd_loss: temperature must be"),
    (lambda: kdkernels.hsakd_loss(HSAKD_Z, HSAKD_Z, "a", HSAKD_A, HSAKD_Y), TypeError,
     r"^hsakd_loss: student_aux_logits\[0\] must be a torch.Tensor"),
    (lambda: kdkernels.hsakd_head_loss([HSAKD_A[:, :18]], HSAKD_Y), ValueError,
     r"^hsakd_head_loss: aux_logits must hold 4 rows per label and 4·C columns"),
    (lambda: kdkernels.hsakd_head_loss([HSAKD_A], HSAKD_Y.float()), TypeError,
     r"^hsakd_head_loss: labels must be an integer tensor"),
    (lambda: kdkernels.hsakd_head_loss([HSAKD_A], torch.tensor([0, 1, 5])), ValueError,
     r"^hsakd_head_loss: labels must be class indices in \[0, 20\)"),
])
def test_hsakd_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
