"""at_loss against RepDistiller's attention transfer transcribed here in eager PyTorch, value and gradients in float64
(maps of different sizes and channel counts, other exponents, every reduction), and its argument errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, randn


def repdistiller_at(f_s, f_t, p=2.0):
    """RepDistiller ``AT.py`` (= attention-transfer ``utils.py::at_loss``) for one stage."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (at(f_s) - at(f_t)).pow(2).mean()


SHAPES = [((4, 3, 4, 4), (4, 3, 4, 4)), ((3, 4, 8, 8), (3, 6, 4, 4)), ((3, 5, 2, 2), (3, 2, 4, 4)),
          ((2, 3, 6, 6), (2, 16, 6, 6))]
SHAPE_IDS = ["equal", "student-larger", "teacher-larger", "unequal-channels"]


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
def test_at_is_repdistiller(shapes):
    student = randn(*shapes[0], seed=1, grad=True)
    teacher = randn(*shapes[1], seed=2, scale=2.0, grad=True)
    assert_equals_official(kdkernels.at_loss, repdistiller_at, student, teacher, what="at")


@pytest.mark.parametrize("p", [1.0, 1.5, 4.0])
def test_at_other_exponents(p):
    """A fractional p needs non-negative maps (post-ReLU features, as AT taps them)."""
    student = randn(3, 4, 4, 4, seed=3).abs().requires_grad_()
    teacher = randn(3, 6, 4, 4, seed=4).abs().requires_grad_()
    assert_equals_official(lambda s, t: kdkernels.at_loss(s, t, p), lambda s, t: repdistiller_at(s, t, p), student,
                           teacher, what=f"at p={p}")


def test_at_reductions_are_over_the_batch_times_positions_terms():
    student, teacher = randn(3, 4, 8, 8, seed=5), randn(3, 6, 4, 4, seed=6)
    rows = kdkernels.at_loss(student, teacher, reduction="none")
    assert rows.shape == (3,)
    torch.testing.assert_close(rows.sum() / (3 * 16), repdistiller_at(student, teacher), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.at_loss(student, teacher, reduction="batchmean"), rows.sum() / 3,
                               rtol=1e-12, atol=0)


X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.at_loss(X, X, p=0), ValueError, r"^at_loss: p must be positive and finite, got 0.0$"),
    (lambda: kdkernels.at_loss([1.0], X), TypeError, r"^at_loss: student must be a torch.Tensor, got list$"),
    (lambda: kdkernels.at_loss(X, torch.randn(3, 3, 4, 4)), ValueError,
     r"^at_loss: teacher must have the same batch size as student \(2, 3, 4, 4\), got shape \(3, 3, 4, 4\)$"),
    (lambda: kdkernels.at_loss(X, torch.randn(2, 16)), ValueError, r"^at_loss: teacher must have 4 dims, got shape "
                                                                   r"\(2, 16\)$"),
    (lambda: kdkernels.at_loss(X, X, reduction="avg"), ValueError, r"^at_loss: reduction must be one of"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------- TTKD

def tat_masked_fm(s, q, v, t, k, heads):
    """sihaoevery/TaT ``torchdistill/losses/single.py`` ``MaskedFM.batch_loss`` with the einops rearranges written as
    view/permute: ``'b (h d) x y -> b h (x y) d'``, similarity q·kᵀ, softmax over the teacher positions, out = A v,
    back to ``'b (h d) x y'``, ``nn.MSELoss()(out, t)``. ``s`` (the raw student map) is unused, as in the official."""
    b, c, h, w = v.shape

    def to_tokens(x):
        return x.reshape(b, heads, c // heads, h * w).permute(0, 1, 3, 2)

    q, k, v = to_tokens(q), to_tokens(k), to_tokens(v)
    sim = torch.einsum("bhid,bhjd->bhij", q, k).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", sim, v)
    out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
    return torch.nn.MSELoss()(out, t)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_ttkd_is_the_official_masked_fm(heads):
    q = randn(3, 8, 3, 2, seed=11, grad=True)
    v = randn(3, 8, 3, 2, seed=12, grad=True)
    t = randn(3, 8, 3, 2, seed=13, scale=2.0, grad=True)
    assert_equals_official(lambda q, v, t: kdkernels.ttkd_loss(q, v, t, heads=heads),
                           lambda q, v, t: tat_masked_fm(None, q, v, t, t, heads), q, v, t, what=f"ttkd heads={heads}")


def test_ttkd_with_a_separate_key_and_the_reductions():
    q, v, t, k = (randn(2, 4, 2, 3, seed=seed, grad=True) for seed in (21, 22, 23, 24))
    assert_equals_official(lambda q, v, t, k: kdkernels.ttkd_loss(q, v, t, k),
                           lambda q, v, t, k: tat_masked_fm(None, q, v, t, k, 1), q, v, t, k, what="ttkd key")
    rows = kdkernels.ttkd_loss(q, v, t, reduction="none")
    assert rows.shape == (2,)
    torch.testing.assert_close(rows.sum() / (2 * 4 * 6), tat_masked_fm(None, q, v, t, t, 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.ttkd_loss(q, v, t, reduction="batchmean"), rows.sum() / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdkernels.ttkd_loss(q, v, t, reduction="sum"), rows.sum(), rtol=1e-12, atol=0)


def tat_seg_grid_tensor_seq(x, n, m):
    """TaT-seg ``distiller_tat.py`` ``grid_tensor_seq``: unfold into n × m patches -> [b, c, n·m, h // n, w // m]."""
    b, c, h, w = x.shape
    k_size_h, k_size_w = h // n, w // m
    temp = x.unfold(2, k_size_h, k_size_h).unfold(3, k_size_w, k_size_w)
    return temp.contiguous().view(temp.size(0), temp.size(1), -1, temp.size(4), temp.size(5))


def tat_seg_patchgroup(q, k, v, f_t, n, m, heads):
    """``distillation_patchgroup`` with ``attn_type='stack_attn'``: the patches stacked along the channels, then
    ``sub_loss`` (= ``MaskedFM.batch_loss``) with ``heads``."""
    q, k, v, f_t = (tat_seg_grid_tensor_seq(x, n, m) for x in (q, k, v, f_t))
    q, k, v, f_t = (x.permute(0, 2, 1, 3, 4).reshape(x.size(0), -1, x.size(3), x.size(4)) for x in (q, k, v, f_t))
    return tat_masked_fm(None, q, v, f_t, k, heads)


def tat_seg_anchorpoint(q, k, v, f_t, anchor_h, anchor_w):
    """``distillation_anchorpoint``: ``AvgPool2d`` with kernel = stride = (H // anchor_h, W // anchor_w), 1 head."""
    kernel = [q.size(2) // anchor_h, q.size(3) // anchor_w]
    q, k, v, f_t = (torch.nn.AvgPool2d(kernel, kernel)(x) for x in (q, k, v, f_t))
    return tat_masked_fm(None, q, v, f_t, k, 1)


@pytest.mark.parametrize("patches, heads", [((2, 2), 4), ((2, 3), 6), ((3, 2), 1), ((1, 1), 2)])
def test_ttkd_patch_groups_are_tat_seg_stack_attn(patches, heads):
    q, v, t, k = (randn(2, 4, 6, 6, seed=seed, grad=True) for seed in (41, 42, 43, 44))
    assert_equals_official(lambda q, v, t, k: kdkernels.ttkd_loss(q, v, t, k, heads=heads, patches=patches),
                           lambda q, v, t, k: tat_seg_patchgroup(q, k, v, t, *patches, heads), q, v, t, k,
                           what=f"ttkd patches={patches}")


@pytest.mark.parametrize("anchors", [(2, 2), (3, 2), (4, 5)])
def test_ttkd_anchor_points_are_tat_seg_pooled_attention(anchors):
    q, v, t = (randn(2, 4, 8, 7, seed=seed, grad=True) for seed in (51, 52, 53))
    assert_equals_official(lambda q, v, t: kdkernels.ttkd_loss(q, v, t, anchors=anchors),
                           lambda q, v, t: tat_seg_anchorpoint(q, t, v, t, *anchors), q, v, t,
                           what=f"ttkd anchors={anchors}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ttkd_low_precision_inputs_compute_in_float32(dtype):
    q, v, t = (randn(2, 4, 2, 2, seed=seed) for seed in (31, 32, 33))
    value = kdkernels.ttkd_loss(q.to(dtype), v.to(dtype), t.to(dtype))
    assert value.dtype == torch.float32
    expected = tat_masked_fm(None, *(x.to(dtype).double() for x in (q, v, t, t)), 1)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.ttkd_loss(X, X, torch.randn(2, 5, 4, 4)), ValueError,
     r"^ttkd_loss: teacher_map must have the same shape as student_query \(2, 3, 4, 4\) \(map the student"),
    (lambda: kdkernels.ttkd_loss(X, torch.randn(2, 3, 2, 2), X), ValueError,
     r"^ttkd_loss: student_value must have the same shape as student_query"),
    (lambda: kdkernels.ttkd_loss(X, X, X, torch.randn(2, 3, 2, 2)), ValueError,
     r"^ttkd_loss: teacher_key must have the same shape as student_query"),
    (lambda: kdkernels.ttkd_loss(X, X, X, heads=2), ValueError, r"^ttkd_loss: heads must divide the channels \(3\), "
                                                                 r"got 2$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, heads=0), ValueError, r"^ttkd_loss: heads must be an int >= 1, got 0$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, heads=1.0), TypeError, r"^ttkd_loss: heads must be an int"),
    (lambda: kdkernels.ttkd_loss([1.0], X, X), TypeError, r"^ttkd_loss: student_query must be a torch.Tensor"),
    (lambda: kdkernels.ttkd_loss(X, X, torch.randn(2, 48)), ValueError, r"^ttkd_loss: teacher_map must have 4 dims"),
    (lambda: kdkernels.ttkd_loss(X, X, X, reduction="avg"), ValueError, r"^ttkd_loss: reduction must be one of"),
    (lambda: kdkernels.ttkd_loss(X, X, X, patches=(2, 2), heads=8), ValueError,
     r"^ttkd_loss: heads must divide the channels \(12 = patches × channels\), got 8$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, patches=(5, 1)), ValueError,
     r"^ttkd_loss: patches\[0\] must be an int in \[1, 4\], got 5$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, patches=2), TypeError,
     r"^ttkd_loss: patches must be a pair of ints \(rows, columns\) or None, got 2$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, anchors=(2, 0)), ValueError,
     r"^ttkd_loss: anchors\[1\] must be an int in \[1, 4\], got 0$"),
    (lambda: kdkernels.ttkd_loss(X, X, X, patches=(2, 2), anchors=(2, 2)), ValueError,
     r"^ttkd_loss: anchors must be None when patches is given"),
])
def test_ttkd_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
