"""Building blocks shared by the Triton kernels of target_split, logsoftmax_gather and dist.

The row statistics follow softmax_kl.py: (max raw logit, log_sum) with log p = (x - max) / T - log_sum; online sums
are formed in exponent units (log2 units with exp2 for fp32 accumulation, natural units for fp64) and converted back
to natural units at the end. The numerical building blocks of softmax_kl.py (``_exp``, ``_log``, ``_rescaled_sum``,
the launch helpers) are imported from there rather than repeated; this module adds the kernel pieces and the host-side
launch setup the three new families share.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from kdkernels.triton.softmax_kl import (_LN2, _LOG2E, _acc_dtype, _block_and_warps, _exp, _inv_t_args,
                                         _rescaled_sum, _unit_last_stride)

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _scales(inv_t_ptr, inv_t_arg, ACC: tl.constexpr, F64: tl.constexpr):
    """(1 / T, k = exponent units per unit of x, to_exp = exponent units per natural-log unit, unit = its inverse).

    fp64 reads 1 / T from a one-element fp64 tensor (a Triton scalar argument is fp32), see _inv_t_args."""
    if F64:
        inv_t = tl.load(inv_t_ptr).to(ACC)
        to_exp = 1.0
        unit = 1.0
    else:
        inv_t = tl.cast(inv_t_arg, ACC)
        to_exp = _LOG2E
        unit = _LN2
    return inv_t, inv_t * to_exp, to_exp, unit


@triton.jit
def _row_max_and_sum(row_ptr, V, k, BLOCK: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
    """One row's online (max raw logit M, d = sum exp((x - m~) k)) with the safe shift m~ = (M == -inf) ? 0 : M."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], NEG_INF, ACC)
    d = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=NEG_INF).to(ACC)
        m, shift, d, _, _ = _rescaled_sum(m, d, x, k, F64)
        d += tl.sum(_exp((x - shift) * k, F64), axis=0)
    return m, d


@triton.jit
def _log_prob(x, max_x, log_sum, inv_t):
    # Natural units; the subtraction of nearby raw logits is exact, so large |x| / T costs nothing.
    return (x - max_x) * inv_t - log_sum


@triton.jit
def _prob(x, max_x, log_sum, inv_t, to_exp, F64: tl.constexpr):
    """p = exp(log p), 0 on an all -inf row (an empty distribution) instead of the NaN of -inf - -inf."""
    return tl.where(max_x == NEG_INF, 0.0, _exp(_log_prob(x, max_x, log_sum, inv_t) * to_exp, F64))


@triton.jit
def _store_stats(stats_ptr, row, max_x, log_sum):
    tl.store(stats_ptr + 2 * row, max_x)
    tl.store(stats_ptr + 2 * row + 1, log_sum)


@triton.jit
def _eps(ACC: tl.constexpr):
    # DIST's 1e-8, rounded once in the accumulation dtype (a float literal may be materialised as fp32).
    return tl.full([], 1.0, ACC) / 100000000.0


def _check_index_tensor(name: str, x: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """An int64 label / index tensor of the given shape on the logits' device."""
    if x.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (the logits'), got {x.device}")


@dataclasses.dataclass
class _RowLaunch:
    """What every launch over [N, V] logits needs: the logits with unit last stride, BLOCK / num_warps for V, 1 / T
    (see _inv_t_args) and the ACC / F64 constexprs."""

    logits: tuple
    block: int
    num_warps: int
    inv_t_ptr: torch.Tensor
    inv_t_arg: float
    dtypes: dict


def _row_launch(temperature: float, *logits: torch.Tensor) -> _RowLaunch:
    acc_dtype = _acc_dtype(logits[0], logits[-1])
    block, num_warps = _block_and_warps(logits[0].shape[1], acc_dtype, max(x.element_size() for x in logits))
    f64 = acc_dtype == torch.float64
    return _RowLaunch(tuple(_unit_last_stride(x) for x in logits), block, num_warps,
                      *_inv_t_args(temperature, acc_dtype, logits[0]),
                      {"ACC": tl.float64 if f64 else tl.float32, "F64": f64})


def _pair_gradients(student: torch.Tensor, teacher: torch.Tensor, student_grad: bool, teacher_grad: bool):
    """(grad_s, grad_t, launch): gradient buffers in the inputs' dtypes, the empty [0] tensor for one not requested,
    and whether a kernel has anything to write."""
    N, V = student.shape
    grad_s = torch.empty((N, V) if student_grad else (0,), dtype=student.dtype, device=student.device)
    grad_t = torch.empty((N, V) if teacher_grad else (0,), dtype=teacher.dtype, device=teacher.device)
    return grad_s, grad_t, N > 0 and V > 0 and (student_grad or teacher_grad)

