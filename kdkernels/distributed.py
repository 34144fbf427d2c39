"""All-gather of a batch across data-parallel processes, for batch-relation losses on the global batch.

    gathered = cat(x_0, x_1, ..., x_{W-1}) along dim 0 (rank order),   d loss / d x_r = W * grad[slice r]

Every rank computes the same loss on the same gathered batch (BAKE's ``GLOBAL_KE``, the relation losses with
``gather=True``), so the sum over ranks of the gradients reaching ``x_r`` is ``W`` times the gradient this rank
already holds for its own slice: the backward returns that, with no collective. DDP then averages the parameter
gradients over the W ranks, which gives exactly the gradient of the loss of the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# Newer torch (2.13 here) names it all_gather_single and deprecates all_gather_into_tensor.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is unavailable or not
    initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _AllGatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, x.shape[0]
        gathered = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _ALL_GATHER_SINGLE(gathered, x.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)
        return local * ctx.world_size, None, None


def all_gather_batch(x: torch.Tensor) -> torch.Tensor:
    """The concatenation along dim 0 of every rank's ``x`` (rank order); ``x`` itself when not distributed.

    Differentiable: the gradient reaching ``x`` is ``W`` times the gathered gradient of this rank's slice, which is
    the sum of all ranks' gradients of that slice *when every rank computes the same loss on the gathered batch*
    (see the module docstring); after DDP's averaging the parameters get the gradient of the global-batch loss.
    A loss that differs between ranks (say, one that keeps only this rank's rows) must not rely on this gradient.

    Every rank must pass the same shape (equal per-rank batch sizes, as a DistributedSampler with
    ``drop_last=True`` gives). It is not checked here, since that would cost one more collective per call: on a
    mismatch, gloo raises on the rank whose size differs and aborts its peers' processes, and nccl may hang.
    Works with gloo (CPU tensors) and nccl (CUDA tensors). torch.compile traces it (dynamo turns the collective into
    a traceable functional collective; checked with ``fullgraph=True`` on torch 2.13).
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return x
    return _AllGatherBatch.apply(x, rank, world_size)
