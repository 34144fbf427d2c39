"""gather=True across 2 gloo processes on CPU: all_gather_batch's values and gradients, BAKE's global-batch targets
and loss, and every relation loss on the gathered batch, each against one process computing the whole batch.

The gradient rule under test: every rank computes the same loss L on the gathered batch, so the gradient reaching
rank r's slice is W * dL/dx[slice r] (what DDP's averaging turns into the global-batch gradient).

One spawn of 2 processes runs every case; each rank writes its results to a JSON file after each case and the
tests below read them.
"""
import datetime

import pytest
import torch

import kdkernels
from kdkernels.distributed import all_gather_batch
from kdkernels.reference.bake import eager_bake_targets
from distributed_testing import WORLD_SIZE, assert_case, run_cases

ROWS = 4  # per rank
RELATION_LOSSES = ("rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "sp_loss", "pkt_loss", "cc_loss")
TIMEOUT = datetime.timedelta(seconds=30)


def whole_batch(shape, seed):
    return torch.randn((WORLD_SIZE * ROWS, *shape), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def rank_rows(x, rank):
    return x[rank * ROWS:(rank + 1) * ROWS]


def assert_gradient_rule(local_grad, whole_grad, rank, what):
    """The gathered loss's gradient on this rank's slice is W times the single-process gradient of that slice."""
    torch.testing.assert_close(local_grad, WORLD_SIZE * rank_rows(whole_grad, rank), rtol=1e-10, atol=1e-14,
                               msg=lambda m: f"{what}: {m}")


def coupled_loss(y, weights):
    """Couples rows (a batch statistic) and is nonlinear, so a wrong slice or scale cannot pass."""
    return (weights * y.pow(3)).sum() + y.flatten(1).sum(dim=1).pow(2).mean() * y.mean()


def case_all_gather(rank):
    whole, weights = whole_batch((3, 5), seed=1), whole_batch((5, 3), seed=2)
    # A non-contiguous local input: the transpose of this rank's rows of the whole batch.
    x = rank_rows(whole, rank).transpose(1, 2).requires_grad_(True)
    gathered = all_gather_batch(x)
    assert torch.equal(gathered, whole.transpose(1, 2)), "gathered values are not the rank-ordered concatenation"
    (grad,) = torch.autograd.grad(coupled_loss(gathered, weights), x)
    single = whole.transpose(1, 2).clone().requires_grad_(True)
    (whole_grad,) = torch.autograd.grad(coupled_loss(single, weights), single)
    assert grad.shape == x.shape
    assert_gradient_rule(grad, whole_grad, rank, "all_gather_batch gradient")


def case_compiled(rank):
    """The gather traces into one graph (no graph break at the collective) with the same values and gradients."""
    whole, weights = whole_batch((3,), seed=9), whole_batch((3,), seed=10)
    x = rank_rows(whole, rank).clone().requires_grad_(True)
    compiled = torch.compile(lambda y: coupled_loss(all_gather_batch(y), weights), fullgraph=True,
                             backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), x)
    single = whole.clone().requires_grad_(True)
    (whole_grad,) = torch.autograd.grad(coupled_loss(single, weights), single)
    assert_gradient_rule(grad, whole_grad, rank, "compiled all_gather_batch gradient")
    features, z = whole_batch((6,), seed=11), whole_batch((10,), seed=12)
    targets = torch.compile(kdkernels.bake_targets, fullgraph=True, backend="aot_eager")(
        rank_rows(features, rank), rank_rows(z, rank), 4.0, 0.5, gather=True)
    torch.testing.assert_close(targets, rank_rows(kdkernels.bake_targets(features, z), rank), rtol=1e-12, atol=1e-15)


def case_bake_targets(rank):
    features, z = whole_batch((6,), seed=3), 3 * whole_batch((10,), seed=4)
    local = kdkernels.bake_targets(rank_rows(features, rank), rank_rows(z, rank), 4.0, 0.5, gather=True)
    expected = rank_rows(kdkernels.bake_targets(features, z, 4.0, 0.5), rank)
    torch.testing.assert_close(local, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(local, rank_rows(eager_bake_targets(features, z), rank), rtol=1e-12, atol=1e-15)


def case_bake_loss(rank):
    """Each rank's loss covers its own rows against the global-batch targets (BAKE's GLOBAL_KE)."""
    features, z = whole_batch((6,), seed=5), 3 * whole_batch((10,), seed=6)
    local_z = rank_rows(z, rank).clone().requires_grad_(True)
    loss = kdkernels.bake_loss(local_z, rank_rows(features, rank), gather=True)
    (grad,) = torch.autograd.grad(loss, local_z)
    targets = rank_rows(kdkernels.bake_targets(features, z), rank)
    expected_z = rank_rows(z, rank).clone().requires_grad_(True)
    log_p = torch.log_softmax(expected_z / 4.0, dim=1)
    expected = torch.nn.functional.kl_div(log_p, targets, reduction="sum") * 16.0 / ROWS
    (expected_grad,) = torch.autograd.grad(expected, expected_z)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)


def relation_case(name):
    def case(rank):
        loss_fn = getattr(kdkernels, name)
        student, teacher = whole_batch((3, 4), seed=7), whole_batch((5,), seed=8)
        local = [rank_rows(x, rank).clone().requires_grad_(True) for x in (student, teacher)]
        loss = loss_fn(*local, gather=True)
        grads = torch.autograd.grad(loss, local)
        single = [x.clone().requires_grad_(True) for x in (student, teacher)]
        expected = loss_fn(*single)
        expected_grads = torch.autograd.grad(expected, single)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-15)
        for side, grad, whole_grad in zip(("student", "teacher"), grads, expected_grads):
            assert_gradient_rule(grad, whole_grad, rank, f"{name} {side} gradient")
    return case


CASES = {"all_gather": case_all_gather, "compiled": case_compiled, "bake_targets": case_bake_targets, "bake_loss": case_bake_loss,
         **{name: relation_case(name) for name in RELATION_LOSSES}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(__name__, tmp_path_factory.mktemp("distributed"), timeout_s=TIMEOUT.total_seconds())


@pytest.mark.parametrize("name", ["all_gather", "compiled", "bake_targets", "bake_loss"])
def test_gathered(results, name):
    assert_case(results, name)


@pytest.mark.parametrize("name", RELATION_LOSSES)
def test_relation_loss_gathered(results, name):
    assert_case(results, name)
