"""BAKE: targets against the official knowledge_ensemble and its propagation series in float64, the loss and its
gradient against the official KDLoss on every backend and dtype, edge cases, torch.compile, errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
from kd_testing import assert_close_to_reference, backend_params, logits, require_backend
from kdkernels.reference.bake import eager_bake_loss, eager_bake_targets

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def batch(rows=16, classes=10, dtype=torch.float64, seed=0, feature_shape=(3, 4)):
    features = logits((rows, *feature_shape), dtype, seed=seed, scale=1.0)
    return features, logits((rows, classes), dtype, seed=seed + 1)


def propagation_series(features, logits_, temperature, omega, terms):
    """sum_{t < terms} (1 - omega) (omega A)^t P, A from the official -1e9 mask (methods.md §1.14)."""
    unit = torch.nn.functional.normalize(features.flatten(1), dim=1)
    affinity = torch.softmax(unit @ unit.t() - 1e9 * torch.eye(unit.shape[0], dtype=unit.dtype), dim=1)
    term = (1 - omega) * torch.softmax(logits_ / temperature, dim=1)
    total = torch.zeros_like(term)
    for _ in range(terms):
        total, term = total + term, omega * affinity @ term
    return total


@pytest.mark.parametrize("omega,temperature", [(0.5, 4.0), (0.9, 4.0), (0.5, 1.0), (0.3, 0.5)])
def test_targets_match_official_and_series_in_float64(omega, temperature):
    features, z = batch()
    targets = kdkernels.bake_targets(features, z, temperature, omega)
    assert targets.dtype == torch.float64 and targets.shape == z.shape
    official = eager_bake_targets(features, z, temperature, omega)
    assert_close_to_reference(targets, official, "targets vs official", rtol=1e-12)
    assert_close_to_reference(targets, propagation_series(features, z, temperature, omega, 500),
                              "targets vs series", rtol=1e-12)
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_targets_dtypes_are_detached_and_accumulate_in_fp32(dtype):
    features, z = batch(dtype=dtype, seed=3)
    features.requires_grad_(True)
    z.requires_grad_(True)
    targets = kdkernels.bake_targets(features, z)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert targets.dtype == expected_dtype and not targets.requires_grad
    exact = eager_bake_targets(features.detach().double(), z.detach().double())
    low = eager_bake_targets(features.detach().float(), z.detach().float())
    assert_close_to_reference(targets, exact, f"{dtype} targets", eager=low)
    torch.testing.assert_close(targets.sum(dim=1).double(), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-6)


def test_omega_zero_gives_the_tempered_softmax():
    features, z = batch(seed=5)
    targets = kdkernels.bake_targets(features, z, 2.0, 0.0)
    torch.testing.assert_close(targets, torch.softmax(z / 2.0, dim=1), rtol=1e-15, atol=0)


def test_two_samples_mix_with_each_other_in_closed_form():
    """B = 2: A = [[0, 1], [1, 0]], so (1 - w)(I - wA)^-1 = [[1, w], [w, 1]] / (1 + w)."""
    features, z = batch(rows=2, seed=7)
    omega = 0.6
    p = torch.softmax(z / 4.0, dim=1)
    expected = torch.stack([p[0] + omega * p[1], p[1] + omega * p[0]]) / (1 + omega)
    assert_close_to_reference(kdkernels.bake_targets(features, z, 4.0, omega), expected, "B=2 targets", rtol=1e-13)


def test_duplicate_features_and_flat_features():
    """Identical samples (affinity ties) and [B, D] features; targets still match the official formula."""
    features, z = batch(rows=6, seed=9, feature_shape=(5,))
    features[3] = features[0]
    assert_close_to_reference(kdkernels.bake_targets(features, z, 4.0, 0.5), eager_bake_targets(features, z),
                              "duplicate features", rtol=1e-12)


def loss_and_grad(fn, z, features):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, features)
    (grad,) = torch.autograd.grad(loss * 0.75, z)
    return loss, grad


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton", "reference")))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_loss_and_gradient_match_official(backend, dtype):
    device = "cpu" if backend == "reference" else require_backend(backend)
    features, z = batch(rows=12, classes=37, dtype=dtype, seed=11)
    features, z = features.to(device), z.to(device)
    loss, grad = loss_and_grad(lambda s, f: kdkernels.bake_loss(s, f, 4.0, 0.5, backend=backend), z, features)
    exact_loss, exact_grad = loss_and_grad(eager_bake_loss, z.cpu().double(), features.cpu().double())
    low_loss, low_grad = loss_and_grad(eager_bake_loss, z.cpu().float(), features.cpu().float())
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == z.shape
    assert_close_to_reference(loss, exact_loss, "loss", eager=low_loss)
    assert_close_to_reference(grad, exact_grad, "grad", eager=low_grad)


def test_features_get_no_gradient_and_module_matches_functional():
    features, z = batch(seed=13)
    features.requires_grad_(True)
    z.requires_grad_(True)
    module = kdkernels.nn.BAKELoss(temperature=3.0, omega=0.7)
    loss = module(z, features)
    assert torch.equal(loss, kdkernels.bake_loss(z, features, 3.0, 0.7))
    grad_z, grad_features = torch.autograd.grad(loss, (z, features), allow_unused=True)
    assert grad_features is None and grad_z.abs().max() > 0  # the targets are detached, as in BAKE
    assert "omega=0.7" in repr(module)


def test_saturated_logits_give_zero_targets_and_a_finite_loss():
    """omega = 0 and |z| / T ~ 1e3: most targets are exact zeros, i.e. -inf teacher logits in the KL kernel."""
    features, z = batch(rows=4, classes=20, seed=15)
    z = z * 1e3
    targets = kdkernels.bake_targets(features, z, 1.0, 0.0)
    assert (targets == 0).any()
    loss, grad = loss_and_grad(lambda s, f: kdkernels.bake_loss(s, f, 1.0, 0.0), z, features)
    exact_loss, exact_grad = loss_and_grad(lambda s, f: eager_bake_loss(s, f, 1.0, 0.0), z, features)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_to_reference(loss, exact_loss, "saturated loss", atol=1e-12)
    assert_close_to_reference(grad, exact_grad, "saturated grad", atol=1e-12)


def test_gather_without_a_process_group_is_the_local_batch():
    features, z = batch(seed=17)
    assert torch.equal(kdkernels.bake_targets(features, z, gather=True), kdkernels.bake_targets(features, z))


def test_targets_compile_fullgraph_without_host_sync():
    """No .item(), no inverse's error check, no data-dependent control flow: dynamo traces it in one graph."""
    features, z = batch(rows=8, dtype=torch.float32, seed=19)
    compiled = torch.compile(kdkernels.bake_targets, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(features, z, 4.0, 0.5), kdkernels.bake_targets(features, z, 4.0, 0.5))


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


SYNCING_OPS = {"_local_scalar_dense", "linalg_inv_ex", "_linalg_check_errors", "nonzero", "masked_select"}


def test_no_host_synchronising_op_runs():
    """The official code's inverse checks its errors on the host; kdkernels' solve does not, nor does the loss."""
    features, z = batch(rows=8, dtype=torch.float32, seed=21)
    with RecordOps() as official:
        eager_bake_targets(features, z)
    assert official.names & SYNCING_OPS  # the recorder sees the sync it is looking for
    for backend in ("auto", "reference"):
        with RecordOps() as ours:
            kdkernels.bake_loss(z.detach().requires_grad_(True), features, backend=backend).backward()
        assert "linalg_solve_ex" in ours.names or "_linalg_solve_ex" in ours.names
        assert not ours.names & SYNCING_OPS, (backend, ours.names & SYNCING_OPS)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(omega=1.0), ValueError, r"omega must be in \[0, 1\), got 1.0"),
    (dict(omega=-0.1), ValueError, r"omega must be in \[0, 1\), got -0.1"),
    (dict(omega=True), TypeError, "omega must be a real number"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(rows=1), ValueError, "at least 2 samples.*got a batch of 1"),
    (dict(feature_rows=5), ValueError, r"same batch size as logits \(4\), got 5"),
    (dict(logits_shape=(4, 2, 3)), ValueError, r"logits must have shape \[B, C\], got \(4, 2, 3\)"),
    (dict(feature_shape=(4,)), ValueError, r"features must have shape \[B, ...\]"),
    (dict(feature_dtype=torch.int64), TypeError, "features must be float32, float16, bfloat16 or float64"),
])
def test_errors_name_the_argument(kwargs, error, match):
    rows = kwargs.get("rows", 4)
    features = torch.randn(kwargs.get("feature_shape", (kwargs.get("feature_rows", rows), 3)))
    features = features.to(kwargs.get("feature_dtype", torch.float32))
    z = torch.randn(kwargs.get("logits_shape", (rows, 5)))
    args = dict(temperature=kwargs.get("temperature", 4.0), omega=kwargs.get("omega", 0.5))
    with pytest.raises(error, match=match):
        kdkernels.bake_targets(features, z, **args)
    with pytest.raises(error, match=match):
        kdkernels.bake_loss(z, features, **args)
