"""Triton backend of the ``logsoftmax_gather`` op: log_softmax(x / T) at int64 indices [N, k] (the student side of
sparse top-k teachers; spec: kdkernels/reference/logsoftmax_gather.py)::

    gathered[n, j] = (x[n, i_j] - max_n) / T - log_sum_n
    d/dx[n, c]     = 1/T (sum_j g[n, j] [i_j == c] - p[n, c] sum_j g[n, j])

Custom ops ``kdkernels::triton_logsoftmax_gather_forward`` / ``_backward`` with the schemas of the C++ ops in
csrc/kdkernels.cpp; autograd is registered by kdkernels/ops. Forward: one program per row, an online (max, sum) pass
then the gather. Backward, two launches on the same stream: a dense elementwise kernel writes -p G / T (G = sum_j g)
everywhere, then a kernel over the indices overwrites each indexed column with its complete value, the sum of the
upstream gradients of every index equal to it found by comparing the row's indices pairwise, so repeated indices
accumulate without atomics and every gradient is rounded once. An all -inf row gathers -inf and gets a zero
gradient. An index outside [0, V) is never used as an address: it gathers NaN and makes its row's gradient NaN.
"""

import torch
import triton
import triton.language as tl

from kdkernels.ops._checks import check_logsoftmax_gather_backward, check_logsoftmax_gather_forward
from kdkernels.triton._common import NEG_INF, _log_prob, _prob, _row_max_and_log_sum, _scales, _store_stats
from kdkernels.triton._launch import _acc_dtype, _launch_guard, _row_launch, _unit_last_stride

__all__ = ["logsoftmax_gather_forward", "logsoftmax_gather_backward"]


@triton.jit
def _logsoftmax_gather_fwd_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,  # [N, K] contiguous
    stats_ptr,  # [N, 2] contiguous: (max, log_sum)
    inv_t_ptr,
    inv_t_arg,
    V,
    K,
    stride_x,
    stride_idx,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    max_x, log_sum = _row_max_and_log_sum(x_row, V, inv_t, BLOCK, ACC, F64)
    _store_stats(stats_ptr, row, max_x, log_sum)

    for start in range(0, K, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        jmask = j < K
        idx = tl.load(idx_ptr + row * stride_idx + j, mask=jmask, other=0)
        valid = (idx >= 0) & (idx < V)
        x = tl.load(x_row + idx, mask=jmask & valid, other=NEG_INF).to(ACC)
        gathered = tl.where(max_x == NEG_INF, NEG_INF, _log_prob(x, max_x, log_sum, inv_t))
        gathered = tl.where(valid, gathered, float("nan"))
        tl.store(out_ptr + row * K + j, gathered, mask=jmask)


@triton.jit
def _upstream_sum_and_bad_count(g_ptr, idx_ptr, row, V, K, stride_g, stride_idx, BLOCK_K: tl.constexpr,
                                ACC: tl.constexpr):
    """(G = sum_j g[row, j], the number of the row's indices outside [0, V))."""
    total = tl.full([], 0.0, ACC)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, K, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        jmask = j < K
        g = tl.load(g_ptr + row * stride_g + j, mask=jmask, other=0.0).to(ACC)
        idx = tl.load(idx_ptr + row * stride_idx + j, mask=jmask, other=0)
        total += tl.sum(g, axis=0)
        bad += tl.sum(tl.where(jmask & ((idx < 0) | (idx >= V)), 1, 0), axis=0)
    return total, bad


@triton.jit
def _logsoftmax_gather_bwd_dense_kernel(
    g_ptr,
    x_ptr,
    idx_ptr,
    stats_ptr,
    grad_ptr,  # [N, V] contiguous
    inv_t_ptr,
    inv_t_arg,
    V,
    K,
    stride_g,
    stride_x,
    stride_idx,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    total, bad = _upstream_sum_and_bad_count(g_ptr, idx_ptr, row, V, K, stride_g, stride_idx, BLOCK_K, ACC)
    max_x = tl.load(stats_ptr + 2 * row).to(ACC)
    log_sum = tl.load(stats_ptr + 2 * row + 1).to(ACC)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=NEG_INF).to(ACC)
    p = _prob(x, max_x, log_sum, inv_t, F64)
    # p last: only the final product can be subnormal (one rounding)
    grad = tl.where(p != 0.0, (-inv_t * total) * p, 0.0)
    grad = tl.where(bad == 0, grad, float("nan"))
    tl.store(grad_ptr + row * V + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logsoftmax_gather_bwd_indexed_kernel(
    g_ptr,
    x_ptr,
    idx_ptr,
    stats_ptr,
    grad_ptr,  # [N, V] contiguous, written by the dense kernel first
    inv_t_ptr,
    inv_t_arg,
    V,
    K,
    stride_g,
    stride_x,
    stride_idx,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = j < K
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    g_row = g_ptr + row * stride_g
    idx_row = idx_ptr + row * stride_idx
    idx = tl.load(idx_row + j, mask=jmask, other=0)

    # scattered[j] = sum of g[j'] over the indices j' equal to idx[j] (j itself included)
    scattered = tl.zeros([BLOCK_K], ACC)
    total = tl.full([], 0.0, ACC)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, K, BLOCK_K):
        other_j = start + tl.arange(0, BLOCK_K)
        other_mask = other_j < K
        other_g = tl.load(g_row + other_j, mask=other_mask, other=0.0).to(ACC)
        other_idx = tl.load(idx_row + other_j, mask=other_mask, other=-1)
        same = (idx[:, None] == other_idx[None, :]) & other_mask[None, :]
        scattered += tl.sum(tl.where(same, other_g[None, :], 0.0), axis=1)
        total += tl.sum(other_g, axis=0)
        bad += tl.sum(tl.where(other_mask & ((other_idx < 0) | (other_idx >= V)), 1, 0), axis=0)

    max_x = tl.load(stats_ptr + 2 * row).to(ACC)
    log_sum = tl.load(stats_ptr + 2 * row + 1).to(ACC)
    # A row with a bad index keeps the NaN of the dense kernel (the bound also keeps bad indices from being addresses).
    store_mask = jmask & (idx >= 0) & (idx < tl.where(bad == 0, V, 0))
    x = tl.load(x_ptr + row * stride_x + idx, mask=store_mask, other=NEG_INF).to(ACC)
    p = _prob(x, max_x, log_sum, inv_t, F64)
    grad = inv_t * (scattered - tl.where(p != 0.0, total * p, 0.0))
    grad = tl.where(max_x == NEG_INF, 0.0, grad)
    # Equal indices store the same value.
    tl.store(grad_ptr + row * V + idx, grad.to(grad_ptr.dtype.element_ty), mask=store_mask)


def _index_block(K: int) -> int:
    # Tile of the index loops; the pairwise comparison of the backward is BLOCK_K x BLOCK_K.
    return min(max(triton.next_power_of_2(max(K, 1)), 16), 64)


_FORWARD = "triton_logsoftmax_gather_forward"
_BACKWARD = "triton_logsoftmax_gather_backward"


@torch.library.custom_op("kdkernels::triton_logsoftmax_gather_forward", mutates_args=())
def logsoftmax_gather_forward(
    logits: torch.Tensor, indices: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: gathered log-probabilities [N, k] and (max, log_sum) statistics [N, 2], in the accumulation
    dtype."""
    check_logsoftmax_gather_forward(_FORWARD, logits, indices, temperature)
    acc_dtype = _acc_dtype(logits)
    N, V = logits.shape
    K = indices.shape[1]
    gathered = torch.empty((N, K), dtype=acc_dtype, device=logits.device)
    stats = torch.empty((N, 2), dtype=acc_dtype, device=logits.device)
    if N == 0:
        return gathered, stats
    launch = _row_launch(temperature, logits)
    (logits,) = launch.logits
    indices = _unit_last_stride(indices)
    with _launch_guard(logits):
        _logsoftmax_gather_fwd_kernel[(N,)](
            logits, indices, gathered, stats, launch.inv_t_ptr, launch.inv_t_arg,
            V, K, logits.stride(0), indices.stride(0),
            BLOCK=launch.block, BLOCK_K=_index_block(K), **launch.dtypes, num_warps=launch.num_warps,
        )
    return gathered, stats


@torch.library.custom_op("kdkernels::triton_logsoftmax_gather_backward", mutates_args=())
def logsoftmax_gather_backward(
    grad_gathered: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor, stats: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Triton backward: the gradient [N, V] of sum(grad_gathered * gathered) w.r.t. the logits, in their dtype."""
    check_logsoftmax_gather_backward(_BACKWARD, grad_gathered, logits, indices, stats, temperature)
    N, V = logits.shape
    K = indices.shape[1]
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0 or V == 0:
        return grad
    launch = _row_launch(temperature, logits)
    (logits,) = launch.logits
    indices = _unit_last_stride(indices)
    grad_gathered = _unit_last_stride(grad_gathered)
    block_k = _index_block(K)
    args = (grad_gathered, logits, indices, stats.contiguous(), grad, launch.inv_t_ptr, launch.inv_t_arg,
            V, K, grad_gathered.stride(0), logits.stride(0), indices.stride(0))
    with _launch_guard(logits):
        _logsoftmax_gather_bwd_dense_kernel[(N, triton.cdiv(V, launch.block))](
            *args, BLOCK=launch.block, BLOCK_K=block_k, **launch.dtypes, num_warps=launch.num_warps,
        )
        if K > 0:
            _logsoftmax_gather_bwd_indexed_kernel[(N, triton.cdiv(K, block_k))](
                *args, BLOCK_K=block_k, **launch.dtypes, num_warps=4,
            )
    return grad


