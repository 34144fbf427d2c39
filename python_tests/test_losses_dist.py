"""dist_loss (kdkernels/losses/dist.py, on the fused dist op) against DIST_KD's official code
(kdkernels.reference.dist.eager_dist, hunto/image_classification_sota) in float64, with clear errors for bad input."""
import pytest
import torch

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, logits, require_backend
from kdkernels.reference.dist import eager_dist
from losses_testing import ALL_BACKENDS, assert_matches_eager, device_of


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


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = require_backend(backend)
    student = logits((6, 64), device=device, seed=20).requires_grad_()
    teacher = logits((6, 64), device=device, seed=21)

    def distill(s, t):
        return kdkernels.dist_loss(s, t, backend=backend)

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-5, atol=1e-6, grad_rtol=1e-5,
                              grad_atol=1e-7)


def test_nn_module_matches_the_function():
    student, teacher = logits((6, 30), seed=22), logits((6, 30), seed=23)
    assert torch.equal(kdkernels.nn.DISTLoss(4.0, 2.0, 1.0)(student, teacher),
                       kdkernels.dist_loss(student, teacher, 4.0, 2.0))


@pytest.mark.parametrize("call,error,match", [
    (lambda s, t: kdkernels.dist_loss(s, t, temperature=0), ValueError, "temperature must be positive"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    student, teacher = logits((6, 30), seed=24), logits((6, 30), seed=25)
    with pytest.raises(error, match=match):
        call(student, teacher)


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
    """Finite differences through the fused DIST, both inputs."""
    device = require_backend(backend)
    student = logits((3, 7), torch.float64, device, seed=32).requires_grad_()
    teacher = logits((3, 7), torch.float64, device, seed=33).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: kdkernels.dist_loss(s, t, 1.3, 1.0, 0.5, backend=backend),
                                    (student, teacher))
