"""Triton backend of the ``dist`` op: DIST's Pearson correlations of y = softmax(x / T) (spec:
kdkernels/reference/dist.py)::

    row_pearson[n] = S_st / (sqrt(S_ss) sqrt(S_tt) + 1e-8)   over the columns of row n, values centred at 1/V
    col_pearson[c] = the same over the rows of column c, values centred at the column means

Custom ops ``kdkernels::triton_dist_forward`` / ``_backward`` with the schemas of the C++ ops in csrc/kdkernels.cpp;
autograd is registered by kdkernels/ops. Every centred sum is accumulated from centred values (never as
S_xx - N mean^2), and a constant row or column is centred to exactly 0.

Forward, two launches and no atomics: a kernel per row (online (max, sum) per side, then a pass for the row moments),
then a kernel per block of columns that walks all rows twice (the column means, then the centred column sums), with
y recomputed from the row statistics. Backward, one program per row and two passes over it: with
dr/da = b / D - S_ab sqrt(S_bb) / (sqrt(S_aa) D^2) a (second coefficient 0 when S_aa = 0) for r = S_ab / D,

    g_s[n, c]    = grad_row[n] dr_n/dy_s[n, c] + grad_col[c] dr_c/dy_s[n, c]
    grad_s[n, c] = 1/T y_s[n, c] (g_s[n, c] - sum_j g_s[n, j] y_s[n, j])      (teacher symmetric)

Precision: every kernel computes in float64 for every logits dtype, and the saved statistics (stats, row_moments,
col_moments) are float64; only the Pearson vectors (accumulation dtype) and the gradients (the logits' dtypes) are
rounded. Float32 arithmetic, however ordered, is only as accurate as DIST_KD's own fp32 code: where a column's spread
is far below its values (a few rows, saturated softmaxes) or a correlation is close to +-1 (two rows, two classes),
the centred values and the Pearson slopes cancel, and their error is set by the rounding of y itself.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from kdkernels.ops._checks import check_dist_backward, check_logit_pair
from kdkernels.triton._common import NEG_INF, _eps, _exp, _log, _row_max_and_sum, _scales, _store_stats
from kdkernels.triton._launch import _acc_dtype, _launch_guard, _pair_gradients, _row_launch

__all__ = ["dist_forward", "dist_backward"]

_N_ROW_MOMENTS = 3  # (S_st, S_ss, S_tt)
_N_COL_MOMENTS = 5  # (mean_s, mean_t, S_st, S_ss, S_tt)
_FP64_MAX_BLOCK = 2048  # float64 tiles of the row kernels: 16 KiB per tensor, 4 warps (as softmax_kl's for fp64)


def _float64_launch(temperature: float, student: torch.Tensor, teacher: torch.Tensor):
    """The row launch of the logits with float64 arithmetic whatever their dtype (see the module docstring)."""
    launch = _row_launch(temperature, student, teacher)
    return dataclasses.replace(launch, block=min(launch.block, _FP64_MAX_BLOCK), num_warps=4,
                               inv_t_ptr=torch.full((1,), 1.0 / temperature, dtype=torch.float64,
                                                    device=student.device),
                               dtypes={"ACC": tl.float64, "F64": True})


@triton.jit
def _narrow(x, ptr):
    """float64 x in the dtype of ptr's elements: through float32 unless float64 (the interpreter casts float64 to
    bfloat16 wrongly)."""
    if ptr.dtype.element_ty == tl.float64:
        return x
    else:
        return x.to(tl.float32).to(ptr.dtype.element_ty)


@triton.jit
def _softmax(x, max_x, d, k, F64: tl.constexpr):
    """y = exp((x - max) k) / d, d = the row's sum exp((x - max) k) (d = exp(log_sum) where only the statistics are
    at hand): the per-element exponent is rounded once, which the column Pearson of a small batch needs. NaN on an
    all -inf row, as torch.softmax; a constant row gives exactly 1 / V from the forward's own d."""
    return _exp((x - max_x) * k, F64) / d


@triton.jit
def _row_sum(log_sum, to_exp, F64: tl.constexpr):
    return _exp(log_sum * to_exp, F64)


@triton.jit
def _pearson(s_st, s_ss, s_tt, eps):
    return s_st / (tl.sqrt(s_ss) * tl.sqrt(s_tt) + eps)


@triton.jit
def _pearson_slopes(s_st, s_ss, s_tt, eps):
    """(1 / D, coef_s, coef_t) with dr/da = b / D - coef_s a and dr/db = a / D - coef_t b for r = S_st / D; a
    coefficient is 0 where its own sum of squares is 0 (as torch's norm backward)."""
    root_ss = tl.sqrt(s_ss)
    root_tt = tl.sqrt(s_tt)
    denominator = root_ss * root_tt + eps
    d2 = denominator * denominator
    coef_s = tl.where(s_ss == 0.0, 0.0, s_st * root_tt / (root_ss * d2))
    coef_t = tl.where(s_tt == 0.0, 0.0, s_st * root_ss / (root_tt * d2))
    return 1.0 / denominator, coef_s, coef_t


@triton.jit
def _dist_row_kernel(
    s_ptr,
    t_ptr,
    row_pearson_ptr,  # [N]
    row_moments_ptr,  # [N, 3] contiguous
    stats_s_ptr,  # [N, 2] contiguous: (max, log_sum)
    stats_t_ptr,
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_s,
    stride_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    _, k, _, unit = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    max_s, d_s = _row_max_and_sum(s_row, V, k, BLOCK, ACC, F64)
    max_t, d_t = _row_max_and_sum(t_row, V, k, BLOCK, ACC, F64)
    log_sum_s = _log(d_s, F64) * unit
    log_sum_t = _log(d_t, F64) * unit
    _store_stats(stats_s_ptr, row, max_s, log_sum_s)
    _store_stats(stats_t_ptr, row, max_t, log_sum_t)

    # A row of y sums to 1: its mean is exactly 1 / V. A constant row gives y == centre exactly (S = 0, so the
    # backward's coefficient of that side is 0, as the reference's).
    centre = tl.full([], 1.0, ACC) / V
    offs = tl.arange(0, BLOCK)
    s_st = tl.full([], 0.0, ACC)
    s_ss = tl.full([], 0.0, ACC)
    s_tt = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC)
        a = tl.where(mask, _softmax(s, max_s, d_s, k, F64) - centre, 0.0)
        b = tl.where(mask, _softmax(t, max_t, d_t, k, F64) - centre, 0.0)
        s_st += tl.sum(a * b, axis=0)
        s_ss += tl.sum(a * a, axis=0)
        s_tt += tl.sum(b * b, axis=0)

    tl.store(row_pearson_ptr + row, _narrow(_pearson(s_st, s_ss, s_tt, _eps(ACC)), row_pearson_ptr))
    out = row_moments_ptr + _N_ROW_MOMENTS * row
    tl.store(out, s_st)
    tl.store(out + 1, s_ss)
    tl.store(out + 2, s_tt)


@triton.jit
def _probs_tile(x_ptr, stats_ptr, rows, cols, mask, stride_x, k, to_exp, ACC: tl.constexpr, F64: tl.constexpr):
    """y = softmax(x / T) on a [rows, cols] tile from the saved row statistics; 0 on masked lanes."""
    max_x = tl.load(stats_ptr + 2 * rows, mask=rows >= 0, other=0.0).to(ACC)
    d = _row_sum(tl.load(stats_ptr + 2 * rows + 1, mask=rows >= 0, other=0.0).to(ACC), to_exp, F64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=NEG_INF).to(ACC)
    return tl.where(mask, _softmax(x, max_x[:, None], d[:, None], k, F64), 0.0)


@triton.jit
def _dist_col_kernel(
    s_ptr,
    t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    col_pearson_ptr,  # [V]
    col_moments_ptr,  # [V, 5] contiguous
    inv_t_ptr,
    inv_t_arg,
    N,
    V,
    stride_s,
    stride_t,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < V
    _, k, to_exp, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    row_offs = tl.arange(0, BLOCK_R)

    # Pass 1: the column means, as first row + mean offset from it, so a constant column has its value as mean
    # exactly (and centred values of exactly 0). Rows past N are clamped to -1, which masks them (stats loads
    # included: see _probs_tile).
    first = tl.where(row_offs < tl.minimum(N, 1), row_offs, -1).to(tl.int64)
    first_mask = (first[:, None] >= 0) & col_mask[None, :]
    first_s = tl.sum(_probs_tile(s_ptr, stats_s_ptr, first, cols, first_mask, stride_s, k, to_exp, ACC, F64), axis=0)
    first_t = tl.sum(_probs_tile(t_ptr, stats_t_ptr, first, cols, first_mask, stride_t, k, to_exp, ACC, F64), axis=0)
    offset_s = tl.zeros([BLOCK_C], ACC)
    offset_t = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_R):
        rows = tl.where(start + row_offs < N, start + row_offs, -1).to(tl.int64)
        mask = (rows[:, None] >= 0) & col_mask[None, :]
        y_s = _probs_tile(s_ptr, stats_s_ptr, rows, cols, mask, stride_s, k, to_exp, ACC, F64)
        y_t = _probs_tile(t_ptr, stats_t_ptr, rows, cols, mask, stride_t, k, to_exp, ACC, F64)
        offset_s += tl.sum(tl.where(mask, y_s - first_s[None, :], 0.0), axis=0)
        offset_t += tl.sum(tl.where(mask, y_t - first_t[None, :], 0.0), axis=0)
    mean_s = first_s + offset_s / N
    mean_t = first_t + offset_t / N

    # Pass 2: the centred sums.
    s_st = tl.zeros([BLOCK_C], ACC)
    s_ss = tl.zeros([BLOCK_C], ACC)
    s_tt = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_R):
        rows = tl.where(start + row_offs < N, start + row_offs, -1).to(tl.int64)
        mask = (rows[:, None] >= 0) & col_mask[None, :]
        y_s = _probs_tile(s_ptr, stats_s_ptr, rows, cols, mask, stride_s, k, to_exp, ACC, F64)
        y_t = _probs_tile(t_ptr, stats_t_ptr, rows, cols, mask, stride_t, k, to_exp, ACC, F64)
        a = tl.where(mask, y_s - mean_s[None, :], 0.0)
        b = tl.where(mask, y_t - mean_t[None, :], 0.0)
        s_st += tl.sum(a * b, axis=0)
        s_ss += tl.sum(a * a, axis=0)
        s_tt += tl.sum(b * b, axis=0)

    tl.store(col_pearson_ptr + cols, _narrow(_pearson(s_st, s_ss, s_tt, _eps(ACC)), col_pearson_ptr), mask=col_mask)
    out = col_moments_ptr + _N_COL_MOMENTS * cols
    tl.store(out, mean_s, mask=col_mask)
    tl.store(out + 1, mean_t, mask=col_mask)
    tl.store(out + 2, s_st, mask=col_mask)
    tl.store(out + 3, s_ss, mask=col_mask)
    tl.store(out + 4, s_tt, mask=col_mask)


@triton.jit
def _dist_upstream_tile(s_row, t_row, cols, mask, grad_col_ptr, col_moments_ptr, max_s, sum_s, max_t, sum_t,
                        grad_row, inv_d_row, coef_s_row, coef_t_row, centre, k, eps, ACC: tl.constexpr,
                        F64: tl.constexpr):
    """(y_s, y_t, g_s, g_t) on one tile of a row: g = d(grad_row r_row + sum_c grad_col[c] r_col[c]) / dy."""
    y_s = _softmax(tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC), max_s, sum_s, k, F64)
    y_t = _softmax(tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC), max_t, sum_t, k, F64)
    y_s = tl.where(mask, y_s, 0.0)
    y_t = tl.where(mask, y_t, 0.0)
    grad_col = tl.load(grad_col_ptr + cols, mask=mask, other=0.0).to(ACC)
    moments = col_moments_ptr + _N_COL_MOMENTS * cols
    mean_s = tl.load(moments, mask=mask, other=0.0).to(ACC)
    mean_t = tl.load(moments + 1, mask=mask, other=0.0).to(ACC)
    inv_d_col, coef_s_col, coef_t_col = _pearson_slopes(tl.load(moments + 2, mask=mask, other=0.0).to(ACC),
                                                        tl.load(moments + 3, mask=mask, other=0.0).to(ACC),
                                                        tl.load(moments + 4, mask=mask, other=0.0).to(ACC), eps)
    a_row = y_s - centre
    b_row = y_t - centre
    a_col = y_s - mean_s
    b_col = y_t - mean_t
    g_s = grad_row * (b_row * inv_d_row - coef_s_row * a_row) + grad_col * (b_col * inv_d_col - coef_s_col * a_col)
    g_t = grad_row * (a_row * inv_d_row - coef_t_row * b_row) + grad_col * (a_col * inv_d_col - coef_t_col * b_col)
    return y_s, y_t, g_s, g_t


@triton.jit
def _dist_bwd_kernel(
    grad_row_ptr,  # [N] contiguous
    grad_col_ptr,  # [V] contiguous
    s_ptr,
    t_ptr,
    row_moments_ptr,
    col_moments_ptr,
    stats_s_ptr,
    stats_t_ptr,
    gs_ptr,  # [N, V] contiguous (written only when STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous (written only when TEACHER_GRAD)
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_s,
    stride_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    inv_t, k, to_exp, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    eps = _eps(ACC)
    centre = tl.full([], 1.0, ACC) / V
    grad_row = tl.load(grad_row_ptr + row).to(ACC)
    moments = row_moments_ptr + _N_ROW_MOMENTS * row
    inv_d_row, coef_s_row, coef_t_row = _pearson_slopes(tl.load(moments).to(ACC), tl.load(moments + 1).to(ACC),
                                                        tl.load(moments + 2).to(ACC), eps)
    max_s = tl.load(stats_s_ptr + 2 * row).to(ACC)
    sum_s = _row_sum(tl.load(stats_s_ptr + 2 * row + 1).to(ACC), to_exp, F64)
    max_t = tl.load(stats_t_ptr + 2 * row).to(ACC)
    sum_t = _row_sum(tl.load(stats_t_ptr + 2 * row + 1).to(ACC), to_exp, F64)
    offs = tl.arange(0, BLOCK)

    # Pass 1: the softmax backward's row sums sum_j g[j] y[j].
    dot_s = tl.full([], 0.0, ACC)
    dot_t = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        y_s, y_t, g_s, g_t = _dist_upstream_tile(s_row, t_row, cols, mask, grad_col_ptr, col_moments_ptr, max_s,
                                                 sum_s, max_t, sum_t, grad_row, inv_d_row, coef_s_row, coef_t_row,
                                                 centre, k, eps, ACC, F64)
        dot_s += tl.sum(tl.where(y_s != 0.0, g_s * y_s, 0.0), axis=0)
        dot_t += tl.sum(tl.where(y_t != 0.0, g_t * y_t, 0.0), axis=0)

    # Pass 2: the gradients.
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        y_s, y_t, g_s, g_t = _dist_upstream_tile(s_row, t_row, cols, mask, grad_col_ptr, col_moments_ptr, max_s,
                                                 sum_s, max_t, sum_t, grad_row, inv_d_row, coef_s_row, coef_t_row,
                                                 centre, k, eps, ACC, F64)
        out_offs = row * V + cols
        if STUDENT_GRAD:
            grad_s = tl.where(y_s != 0.0, inv_t * y_s * (g_s - dot_s), 0.0)
            tl.store(gs_ptr + out_offs, _narrow(grad_s, gs_ptr), mask=mask)
        if TEACHER_GRAD:
            grad_t = tl.where(y_t != 0.0, inv_t * y_t * (g_t - dot_t), 0.0)
            tl.store(gt_ptr + out_offs, _narrow(grad_t, gt_ptr), mask=mask)


def _column_blocks(V: int):
    """(BLOCK_R, BLOCK_C) of the column kernel: 16 rows x up to 128 columns per tile (512 contiguous bytes of an
    fp32 row). Not tuned on a GPU yet."""
    return 16, min(max(triton.next_power_of_2(max(V, 1)), 16), 128)


@torch.library.custom_op("kdkernels::triton_dist_forward", mutates_args=())
def dist_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: (row_pearson [N], col_pearson [V]) in the accumulation dtype, (row_moments [N, 3],
    col_moments [V, 5], stats_student [N, 2], stats_teacher [N, 2]) in float64."""
    check_logit_pair("triton_dist_forward", student, teacher, temperature)
    N, V = student.shape
    new = dict(dtype=_acc_dtype(student, teacher), device=student.device)
    saved = dict(dtype=torch.float64, device=student.device)
    row_pearson, col_pearson = torch.empty(N, **new), torch.empty(V, **new)
    row_moments, col_moments = torch.empty((N, _N_ROW_MOMENTS), **saved), torch.empty((V, _N_COL_MOMENTS), **saved)
    stats_s, stats_t = torch.empty((N, 2), **saved), torch.empty((N, 2), **saved)
    outputs = (row_pearson, col_pearson, row_moments, col_moments, stats_s, stats_t)
    launch = _float64_launch(temperature, student, teacher)
    student, teacher = launch.logits
    block_r, block_c = _column_blocks(V)
    with _launch_guard(student):
        if N > 0:
            _dist_row_kernel[(N,)](
                student, teacher, row_pearson, row_moments, stats_s, stats_t, launch.inv_t_ptr, launch.inv_t_arg,
                V, student.stride(0), teacher.stride(0),
                BLOCK=launch.block, **launch.dtypes, num_warps=launch.num_warps,
            )
        if V > 0:  # N == 0 still gets its (NaN means, zero sums) columns, as the reference
            _dist_col_kernel[(triton.cdiv(V, block_c),)](
                student, teacher, stats_s, stats_t, col_pearson, col_moments, launch.inv_t_ptr, launch.inv_t_arg,
                N, V, student.stride(0), teacher.stride(0),
                BLOCK_R=block_r, BLOCK_C=block_c, **launch.dtypes, num_warps=4,
            )
    return outputs


@torch.library.custom_op("kdkernels::triton_dist_backward", mutates_args=())
def dist_backward(
    grad_row: torch.Tensor,
    grad_col: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_moments: torch.Tensor,
    col_moments: torch.Tensor,
    stats_student: torch.Tensor,
    stats_teacher: torch.Tensor,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad_row * row_pearson) + sum(grad_col * col_pearson) w.r.t. student and
    teacher ([0]-shaped if not requested)."""
    check_dist_backward("triton_dist_backward", grad_row, grad_col, student, teacher, row_moments, col_moments,
                        stats_student, stats_teacher, temperature)
    grad_s, grad_t, needed = _pair_gradients(student, teacher, student_grad, teacher_grad)
    if not needed:
        return grad_s, grad_t
    N, V = student.shape
    launch = _float64_launch(temperature, student, teacher)
    student, teacher = launch.logits
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _dist_bwd_kernel[(N,)](
            grad_row.contiguous(), grad_col.contiguous(), student, teacher, row_moments.contiguous(),
            col_moments.contiguous(), stats_student.contiguous(), stats_teacher.contiguous(),
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            launch.inv_t_ptr, launch.inv_t_arg,
            V, student.stride(0), teacher.stride(0),
            BLOCK=launch.block, **launch.dtypes,
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad),
            num_warps=launch.num_warps,
        )
    return grad_s, grad_t


