"""crd_nce kernels (cpu, cuda, triton) against the float64 reference: CRD's NCE loss rows, score logsumexps and the
embedding gradient under random upstream gradients; dtypes, K+1 = 2, small banks with repeated indices, huge scores,
strided inputs, determinism, out-of-range indices, opcheck and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd_testing import backend_params, check_op_against_reference, require_backend
from kdkernels.ops.contrastive import crd_nce
from kdkernels.reference.contrastive import eager_contrast_scores

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def problem(batch, contrasts, features, bank, dtype=torch.float32, device="cpu", seed=0, scale=1.0,
            memory_dtype=None, log_z=3.0):
    """(embed, memory, contrast_indices, log_normalizer): unit-norm rows times `scale`, column 0 = the row's own
    index in the bank."""
    generator = torch.Generator().manual_seed(seed)
    embed = F.normalize(torch.randn(batch, features, generator=generator, dtype=torch.float64), dim=1) * scale
    memory = F.normalize(torch.randn(bank, features, generator=generator, dtype=torch.float64), dim=1) * scale
    indices = torch.randint(0, bank, (batch, contrasts), generator=generator)
    indices[:, 0] = torch.arange(batch) % bank
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (embed.to(dtype).to(device), memory.to(memory_dtype or dtype).to(device), indices.to(device),
            torch.tensor(log_z, dtype=acc, device=device))


def check(backend, embed, memory, indices, log_z, temperature=0.07, eps=1e-7):
    noise_mass = (indices.shape[1] - 1) / memory.shape[0]
    fn = lambda name, e, m, i, z: crd_nce(e, m, i, z, temperature, noise_mass, eps, name)  # noqa: E731
    return check_op_against_reference(fn, backend, [embed, memory, indices, log_z], [True, False, False, False],
                                      what="crd_nce")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, dtype):
    """K+1 = 1100 spans several chunks of every kernel (CPU: 1024 contrasts per task)."""
    device = require_backend(backend)
    check(backend, *problem(7, 1100, 24, 500, dtype, device, seed=1))
    check(backend, *problem(3, 40, 33, 60, dtype, device, seed=2, log_z=8.0), temperature=0.5, eps=1e-3)


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_embed_and_memory_dtypes(backend):
    """A bf16 (autocast) embedding against an fp32 bank, and the reverse."""
    device = require_backend(backend)
    check(backend, *problem(5, 70, 16, 90, torch.bfloat16, device, seed=3, memory_dtype=torch.float32))
    check(backend, *problem(5, 70, 16, 90, torch.float32, device, seed=4, memory_dtype=torch.float16))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("batch,contrasts,features,bank", [(1, 2, 1, 1), (4, 2, 7, 3), (9, 5, 128, 2),
                                                           (2, 17, 130, 4)])
def test_small_shapes_and_repeated_indices(backend, batch, contrasts, features, bank):
    """K+1 = 2 and banks smaller than the batch: every index repeats, within a row and across rows."""
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(batch, contrasts, features, bank, torch.float32, device, seed=5)
    if bank > 1:
        assert indices.unique().numel() < indices.numel()
    check(backend, embed, memory, indices, log_z)


@pytest.mark.parametrize("backend", backend_params())
def test_huge_scores_stay_finite(backend):
    """T = 0.01 and fp16 rows of norm 8: scores up to 6400, whose exp overflows fp16 and fp32 in RepDistiller's
    formula; every term here is in log space, so the loss rows and the gradient are finite and match float64."""
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(6, 50, 32, 40, torch.float16, device, seed=6, scale=8.0)
    assert not torch.isfinite(eager_contrast_scores(embed.float().cpu(), memory.float().cpu(), indices.cpu(),
                                                    0.01)).all()
    (loss_rows, score_lse), (grad,) = check(backend, embed, memory, indices, log_z, temperature=0.01)
    assert torch.isfinite(loss_rows).all() and torch.isfinite(score_lse).all() and torch.isfinite(grad).all()
    assert score_lse.max() > 1000


@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(backend):
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(6, 30, 40, 50, torch.float32, device, seed=7)
    wide_embed = torch.zeros(6, 80, device=device)
    wide_embed[:, ::2] = embed
    check(backend, wide_embed[:, ::2], memory.t().contiguous().t(), indices.t().contiguous().t(), log_z)


@pytest.mark.parametrize("backend", backend_params())
def test_gradient_not_requested_and_no_grad(backend):
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(4, 20, 8, 30, torch.float32, device, seed=8)
    with torch.no_grad():
        loss_rows, _ = crd_nce(embed.requires_grad_(), memory, indices, log_z, 0.07, 0.5, 1e-7, backend)
    assert not loss_rows.requires_grad
    reference_rows, _ = crd_nce(embed.double(), memory.double(), indices, log_z.double(), 0.07, 0.5, 1e-7,
                                "reference")
    torch.testing.assert_close(loss_rows.double(), reference_rows.detach(), rtol=1e-5, atol=0)


def test_cpu_is_deterministic_across_thread_counts():
    require_backend("cpu")
    embed, memory, indices, log_z = problem(3, 5000, 64, 300, torch.float32, seed=9)
    op = torch.ops.kdkernels.crd_nce_forward
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op(embed, memory, indices, log_z, 0.07, 0.5, 1e-7, True)
        torch.set_num_threads(max(2, threads))
        multi = op(embed, memory, indices, log_z, 0.07, 0.5, 1e-7, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_cpu_rejects_out_of_range_indices():
    require_backend("cpu")
    embed, memory, indices, log_z = problem(3, 10, 8, 20, seed=10)
    for bad in (20, -1):
        indices_bad = indices.clone()
        indices_bad[2, 7] = bad
        message = rf"contrast_indices must lie in \[0, 20\).*got {bad} at row 2, column 7"
        with pytest.raises(ValueError, match=message):
            torch.ops.kdkernels.crd_nce_forward(embed, memory, indices_bad, log_z, 0.07, 0.5, 1e-7, True)


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
def test_gpu_kernels_flag_out_of_range_indices_with_nan(backend):
    """No host synchronisation to raise: the index is clamped (no out-of-bounds read) and its row's loss is NaN."""
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(3, 10, 8, 20, device=device, seed=10)
    indices[1, 4] = 10 ** 9
    indices[2, 0] = -5
    op = torch.ops.kdkernels.triton_crd_nce_forward if backend == "triton" else torch.ops.kdkernels.crd_nce_forward
    loss_rows, score_lse, grad = op(embed, memory, indices, log_z, 0.07, 0.5, 1e-7, True)
    assert torch.isnan(loss_rows.cpu()).tolist() == [False, True, True]
    assert torch.isfinite(score_lse).all() and torch.isfinite(grad).all()


def _op(backend):
    return torch.ops.kdkernels.triton_crd_nce_forward if backend == "triton" else torch.ops.kdkernels.crd_nce_forward


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(4, 9, 12, 15, torch.float32, device, seed=11)
    for embed_grad in (False, True):
        torch.library.opcheck(_op(backend), (embed.clone().requires_grad_(embed_grad), memory, indices, log_z, 0.07,
                                             0.6, 1e-7, embed_grad))
    half = problem(4, 9, 12, 15, torch.bfloat16, device, seed=12)
    torch.library.opcheck(_op(backend), (half[0].requires_grad_(), half[1], half[2], half[3], 0.5, 0.6, 0.0, True))


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_float64(backend):
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(3, 12, 5, 10, torch.float64, device, seed=13)
    fn = lambda e: crd_nce(e, memory, indices, log_z, 0.3, 1.1, 1e-7, backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (embed.requires_grad_(),))


def test_backward_without_requested_gradient_raises():
    require_backend("cpu")
    embed, memory, indices, log_z = problem(2, 4, 3, 5, seed=14)
    embed.requires_grad_()
    loss_rows, _, _ = torch.ops.kdkernels.crd_nce_forward(embed, memory, indices, log_z, 0.07, 0.6, 1e-7, False)
    with pytest.raises(RuntimeError, match="embed_grad=False"):
        loss_rows.sum().backward()


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, "embed": a["embed"][:, :5]}, ValueError,
     "(memory rows have 8 features but embed rows have 5)|memory"),
    (lambda a: {**a, "contrast_indices": a["contrast_indices"][:, :1]}, ValueError, "K\\+1"),
    (lambda a: {**a, "contrast_indices": a["contrast_indices"].int()}, TypeError, "int64"),
    (lambda a: {**a, "contrast_indices": a["contrast_indices"][:2]}, ValueError, "contrast_indices"),
    (lambda a: {**a, "embed": a["embed"].double()}, TypeError, "float64"),
    (lambda a: {**a, "log_normalizer": a["log_normalizer"].reshape(1)}, ValueError, "log_normalizer"),
    (lambda a: {**a, "log_normalizer": a["log_normalizer"].double()}, TypeError, "log_normalizer"),
    (lambda a: {**a, "embed": a["embed"][:0]}, ValueError, "embed"),
    (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature"),
    (lambda a: {**a, "temperature": math.inf}, ValueError, "temperature"),
    (lambda a: {**a, "noise_mass": 0.0}, ValueError, "noise_mass"),
    (lambda a: {**a, "eps": -1e-7}, ValueError, "eps"),
])
def test_errors(backend, change, error, message):
    """TypeError for a wrong dtype, ValueError for a wrong shape or value (the triton op's checks are moving to the
    same policy: until then it may raise either)."""
    device = require_backend(backend)
    embed, memory, indices, log_z = problem(3, 6, 8, 10, device=device, seed=15)
    args = change(dict(embed=embed, memory=memory, contrast_indices=indices, log_normalizer=log_z, temperature=0.07,
                       noise_mass=0.5, eps=1e-7, embed_grad=True))
    with pytest.raises(error if backend == "cpu" else (ValueError, TypeError), match=message):
        _op(backend)(**args)
