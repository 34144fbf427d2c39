"""logsoftmax_gather kernels (cpu, cuda, triton) against the float64 reference: gathered log-probabilities and the
dense gradient, repeated indices, -inf rows, dtypes, strides, opcheck."""
import pytest
import torch

from kd_testing import backend_params, check_op_against_reference, logits, op_pair, require_backend
from kdkernels.ops.logsoftmax_gather import logsoftmax_gather

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def topk_indices(rows, classes, k, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(classes, generator=generator)[:k] for _ in range(rows)]).to(device)


def check(backend, x, indices, temperature=2.0):
    fn = lambda name, logits_: logsoftmax_gather(logits_, indices.to(logits_.device), temperature, name)  # noqa: E731
    return check_op_against_reference(fn, backend, [x], [True], what="logsoftmax_gather")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("classes,k", [(1, 1), (3, 2), (300, 20), (9000, 64)])
def test_matches_reference(backend, dtype, classes, k):
    device = require_backend(backend)
    x = logits((5, classes), dtype, device, seed=1)
    check(backend, x, topk_indices(5, classes, k, device))


@pytest.mark.parametrize("backend", backend_params())
def test_full_permutation_repeated_indices_and_strides(backend):
    device = require_backend(backend)
    x = logits((4, 70), torch.float32, device, seed=2)[:, 3:67]  # row stride 70
    (gathered,), _ = check(backend, x, topk_indices(4, 64, 64, device, 1), temperature=0.7)
    assert torch.allclose(gathered.exp().sum(-1), torch.ones(4, device=device), atol=1e-5), "k = V sums to 1"
    repeated = torch.tensor([[5, 5, 1], [0, 63, 0], [2, 2, 2], [9, 8, 7]], device=device)
    check(backend, x, repeated)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [0.1, 1.0, 50.0])
def test_extreme_logits(backend, temperature):
    device = require_backend(backend)
    x = logits((3, 513), torch.float32, device, scale=1e4, seed=3)
    (gathered,), (grad,) = check(backend, x, topk_indices(3, 513, 8, device, 2), temperature)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", backend_params())
def test_negative_infinity_rows(backend):
    device = require_backend(backend)
    x = logits((3, 40), torch.float64, seed=4)
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x = x.to(device)
    indices = torch.tensor([[1, 3, 0], [0, 1, 2], [7, 8, 9]], device=device)
    x = x.requires_grad_()
    gathered = logsoftmax_gather(x, indices, 2.0, backend)
    assert torch.isneginf(gathered[0, 1:]).all() and torch.isfinite(gathered[0, 0])
    assert torch.isneginf(gathered[1]).all() and torch.isfinite(gathered[2]).all()
    (grad,) = torch.autograd.grad(gathered[[0, 2]][:, [0]].sum() + gathered[2].sum(), x)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all() and (grad[0, ::3] == 0).all()
    check(backend, x.detach()[[0, 2]], indices[[0, 2]][:, :1])


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = require_backend(backend)
    forward, backward = op_pair("logsoftmax_gather", backend)
    indices = topk_indices(4, 19, 5, device, 3)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits((4, 19), dtype, device, seed=5)
        torch.library.opcheck(forward, (x.requires_grad_(), indices, 2.0))
        gathered, stats = forward(x.detach(), indices, 2.0)
        torch.library.opcheck(backward, (torch.rand_like(gathered), x.detach(), indices, stats, 2.0))


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_kernel_rejects_bad_indices(backend):
    require_backend(backend)
    with pytest.raises(ValueError, match=r"indices must be in \[0, V\) = \[0, 5\), got 5 at \[1, 0\]"):
        torch.ops.kdkernels.logsoftmax_gather_forward(logits((2, 5)), torch.tensor([[0], [5]]), 1.0)
