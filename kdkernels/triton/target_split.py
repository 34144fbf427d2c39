"""Triton backend of the ``target_split`` op: DKD's and NKD's per-row terms (spec: kdkernels/reference/target_split.py).

For a row with label y and q = softmax(x / T) over its non-target columns (one side, student s or teacher t)::

    terms = (log p_s[y], log (1 - p_s[y]), log p_t[y], log (1 - p_t[y]), KL(q_t || q_s), H(q_t))
    log p[y] = x^_y - logaddexp(x^_y, L),  log (1 - p[y]) = L - logaddexp(x^_y, L)
    with x^_y = (x_y - max) / T and (max, L = log_sum) the statistics of the non-target columns.

Custom ops ``kdkernels::triton_target_split_forward`` / ``_backward`` with the schemas of the C++ ops in
csrc/kdkernels.cpp; autograd is registered by kdkernels/ops. Forward: one program per row, one online pass over the
non-target columns (column y masked out) keeping both sides' (max, sum) and, as the KL kernel of softmax_kl.py,
acc_kl = sum e_t (t^ - s^) and acc_h = sum e_t t^ rescaled with the teacher's sum (in fp64: KL(q_t || q_s) is
often far below its terms); the target logits are loaded directly. Backward: elementwise over (row, column block)
from the saved statistics and terms::

    c != y:  d/ds = 1/T (q_s (g1 p_s[y] - g0 (1 - p_s[y]) + g4) - g4 q_t)
             d/dt = 1/T q_t (g3 p_t[y] - g2 (1 - p_t[y]) + g4 (log q_t - log q_s - KL) - g5 (log q_t + H))
    c == y:  d/ds = 1/T (g0 (1 - p_s[y]) - g1 p_s[y]),  d/dt = 1/T (g2 (1 - p_t[y]) - g3 p_t[y])

with q = 0 on a side whose non-target set is empty and g4 = 0 in the rows where KL is the constant 0 or +inf.

A label outside [0, V) is never used as an address: its row's outputs are NaN.
"""

import torch
import triton
import triton.language as tl

from kdkernels.ops._checks import check_target_split_backward, check_target_split_forward
from kdkernels.triton._common import (NEG_INF, _exp_natural, _log1p_nonpositive, _log_prob, _prob, _rescaled_sum,
                                      _rescaled_teacher_moment, _scales, _store_stats, _teacher_weighted_sum,
                                      _wide_sum)
from kdkernels.triton._launch import _acc_dtype, _launch_guard, _pair_gradients, _row_launch

__all__ = ["target_split_forward", "target_split_backward"]

_N_TERMS = 6


@triton.jit
def _log1p_exp(d, F64: tl.constexpr):
    # log(1 + exp(d)) for d <= 0 (softplus), as -log1p(-u / (1 + u)) with u = exp(d) in (0, 1]: the argument lies in
    # [-1/2, 0], where _log1p_nonpositive is accurate to a few ulp. d = -inf gives 0.
    u = tl.exp(d)
    return -_log1p_nonpositive(-u / (1.0 + u), F64)


@triton.jit
def _target_log_probs(x_y, max_rest, log_sum_rest, inv_t, F64: tl.constexpr):
    """(log p[y], log (1 - p[y])) of one side from its target logit and non-target statistics; both -inf for an
    all -inf row. With top = max(x^_y, L) one of the differences to top is exactly 0, so the log of a probability
    near 1 is -softplus(-gap) to full relative precision instead of the rounding error of x^_y - logaddexp."""
    target = (x_y - tl.where(max_rest == NEG_INF, 0.0, max_rest)) * inv_t
    top = tl.maximum(target, log_sum_rest)
    softplus = _log1p_exp(tl.minimum(target, log_sum_rest) - top, F64)
    empty = top == NEG_INF
    log_p_target = tl.where(empty, NEG_INF, (target - top) - softplus)
    log_p_rest = tl.where(empty, NEG_INF, (log_sum_rest - top) - softplus)
    return log_p_target, log_p_rest


@triton.jit
def _target_split_fwd_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    terms_ptr,  # [N, 6] contiguous
    stats_s_ptr,  # [N, 2] contiguous: (max, log_sum) of the non-target columns
    stats_t_ptr,
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_s,
    stride_t,
    stride_labels,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    y = tl.load(labels_ptr + row * stride_labels)
    valid = (y >= 0) & (y < V)
    offs = tl.arange(0, BLOCK)

    # Online state over the non-target columns, as _softmax_kl_fwd_kernel (safe shifts m~ = (M == -inf) ? 0 : M,
    # x^ = (x - m~) / T, e_t = exp(t^); sums and moments in fp64):  d_* = sum e_*,  acc_kl = sum e_t (t^ - s^),
    # acc_h = sum e_t t^, a term := 0 where e_t == 0.
    m_s = tl.full([], NEG_INF, ACC)
    m_t = tl.full([], NEG_INF, ACC)
    d_s = tl.full([], 0.0, tl.float64)
    d_t = tl.full([], 0.0, tl.float64)
    acc_kl = tl.full([], 0.0, tl.float64)
    acc_h = tl.full([], 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = (cols < V) & (cols != y)
        s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC)

        m_s_new, sh_s, d_s, moved_s, _ = _rescaled_sum(m_s, d_s, s, inv_t)
        m_t_new, sh_t, d_t_rescaled, moved_t, c_t = _rescaled_sum(m_t, d_t, t, inv_t)
        acc_kl = _rescaled_teacher_moment(acc_kl, m_t, c_t, d_t, moved_t, moved_s, inv_t)
        acc_h = _rescaled_teacher_moment(acc_h, m_t, c_t, d_t, moved_t, 0.0, inv_t)
        d_t = d_t_rescaled

        s_hat = (s - sh_s) * inv_t
        t_hat = (t - sh_t) * inv_t
        e_t = _exp_natural(t_hat, F64)
        d_s += _wide_sum(_exp_natural(s_hat, F64))
        d_t += _wide_sum(e_t)
        acc_kl += _teacher_weighted_sum(e_t, t_hat - s_hat)
        acc_h += _teacher_weighted_sum(e_t, t_hat)
        m_s = m_s_new
        m_t = m_t_new

    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    log_sum_s = log_d_s.to(ACC)
    log_sum_t = log_d_t.to(ACC)
    # KL = acc_kl / d_t + log d_s - log d_t and H = log d_t - acc_h / d_t, rounded once: KL = +inf when the student's
    # non-target columns are all -inf under a finite teacher; KL = H = 0 when the teacher's are (empty q_t).
    kl = (acc_kl / d_t + (log_d_s - log_d_t)).to(ACC)
    kl = tl.where(m_s == NEG_INF, float("inf"), kl)
    kl = tl.where(m_t == NEG_INF, 0.0, kl)
    entropy = tl.where(m_t == NEG_INF, 0.0, (log_d_t - acc_h / d_t).to(ACC))

    s_y = tl.load(s_row + y, mask=valid, other=NEG_INF).to(ACC)
    t_y = tl.load(t_row + y, mask=valid, other=NEG_INF).to(ACC)
    log_p_s, log_rest_s = _target_log_probs(s_y, m_s, log_sum_s, inv_t, F64)
    log_p_t, log_rest_t = _target_log_probs(t_y, m_t, log_sum_t, inv_t, F64)

    nan = float("nan")
    out = terms_ptr + _N_TERMS * row
    tl.store(out, tl.where(valid, log_p_s, nan))
    tl.store(out + 1, tl.where(valid, log_rest_s, nan))
    tl.store(out + 2, tl.where(valid, log_p_t, nan))
    tl.store(out + 3, tl.where(valid, log_rest_t, nan))
    tl.store(out + 4, tl.where(valid, kl, nan))
    tl.store(out + 5, tl.where(valid, entropy, nan))
    _store_stats(stats_s_ptr, row, tl.where(valid, m_s, nan), tl.where(valid, log_sum_s, nan))
    _store_stats(stats_t_ptr, row, tl.where(valid, m_t, nan), tl.where(valid, log_sum_t, nan))


@triton.jit
def _target_split_bwd_kernel(
    g_ptr,  # [N, 6] contiguous
    s_ptr,
    t_ptr,
    labels_ptr,
    stats_s_ptr,
    stats_t_ptr,
    terms_ptr,  # [N, 6] contiguous
    gs_ptr,  # [N, V] contiguous (written only when STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous (written only when TEACHER_GRAD)
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_s,
    stride_t,
    stride_labels,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)
    y = tl.load(labels_ptr + row * stride_labels)
    valid = (y >= 0) & (y < V)

    g_row = g_ptr + _N_TERMS * row
    terms_row = terms_ptr + _N_TERMS * row
    max_s = tl.load(stats_s_ptr + 2 * row).to(ACC)
    log_sum_s = tl.load(stats_s_ptr + 2 * row + 1).to(ACC)
    max_t = tl.load(stats_t_ptr + 2 * row).to(ACC)
    log_sum_t = tl.load(stats_t_ptr + 2 * row + 1).to(ACC)
    s = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=NEG_INF).to(ACC)
    t = tl.load(t_ptr + row * stride_t + cols, mask=mask, other=NEG_INF).to(ACC)

    is_target = cols == y
    # q on the non-target columns (0 where that side's non-target set is empty); column y is overwritten below.
    q_s = _prob(s, max_s, log_sum_s, inv_t, F64)
    q_t = _prob(t, max_t, log_sum_t, inv_t, F64)
    kl = tl.load(terms_row + 4).to(ACC)
    # KL is a constant (0 or +inf) where the teacher's non-target set is empty or the student has a hole under it:
    # g4 then has no effect (as the reference, whose forward selects the constant there).
    g4 = tl.load(g_row + 4).to(ACC)
    g4 = tl.where((max_t == NEG_INF) | (kl == float("inf")), 0.0, g4)
    nan = float("nan")
    out_offs = row * V + cols
    if STUDENT_GRAD:
        g0 = tl.load(g_row).to(ACC)
        g1 = tl.load(g_row + 1).to(ACC)
        p_y = _exp_natural(tl.load(terms_row).to(ACC), F64)
        rest = _exp_natural(tl.load(terms_row + 1).to(ACC), F64)
        grad_rest = q_s * (g1 * p_y - g0 * rest + g4) - g4 * q_t
        grad_s = inv_t * tl.where(is_target, g0 * rest - g1 * p_y, grad_rest)
        grad_s = tl.where(valid, grad_s, nan)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        g2 = tl.load(g_row + 2).to(ACC)
        g3 = tl.load(g_row + 3).to(ACC)
        g5 = tl.load(g_row + 5).to(ACC)
        p_y = _exp_natural(tl.load(terms_row + 2).to(ACC), F64)
        rest = _exp_natural(tl.load(terms_row + 3).to(ACC), F64)
        entropy = tl.load(terms_row + 5).to(ACC)
        log_q_t = _log_prob(t, max_t, log_sum_t, inv_t)
        log_q_s = _log_prob(s, max_s, log_sum_s, inv_t)
        # A zero upstream gradient contributes 0 even where its factor is infinite (log q_s = -inf).
        kl_part = tl.where(g4 != 0.0, g4 * (log_q_t - log_q_s - kl), 0.0)
        entropy_part = tl.where(g5 != 0.0, g5 * (log_q_t + entropy), 0.0)
        grad_rest = tl.where(q_t != 0.0, q_t * (g3 * p_y - g2 * rest + kl_part - entropy_part), 0.0)
        grad_t = inv_t * tl.where(is_target, g2 * rest - g3 * p_y, grad_rest)
        grad_t = tl.where(valid, grad_t, nan)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


_FORWARD = "triton_target_split_forward"
_BACKWARD = "triton_target_split_backward"


@torch.library.custom_op("kdkernels::triton_target_split_forward", mutates_args=())
def target_split_forward(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: terms [N, 6] and the non-target (max, log_sum) statistics [N, 2] per side, in the
    accumulation dtype."""
    check_target_split_forward(_FORWARD, student, teacher, labels, temperature)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    terms = torch.empty((N, _N_TERMS), dtype=acc_dtype, device=student.device)
    stats_s = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    stats_t = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    if N == 0:
        return terms, stats_s, stats_t
    launch = _row_launch(temperature, student, teacher)
    student, teacher = launch.logits
    with _launch_guard(student):
        _target_split_fwd_kernel[(N,)](
            student, teacher, labels, terms, stats_s, stats_t, launch.inv_t_ptr, launch.inv_t_arg,
            V, student.stride(0), teacher.stride(0), labels.stride(0),
            BLOCK=launch.block, **launch.dtypes, num_warps=launch.num_warps,
        )
    return terms, stats_s, stats_t


@torch.library.custom_op("kdkernels::triton_target_split_backward", mutates_args=())
def target_split_backward(
    grad_terms: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    stats_student: torch.Tensor,
    stats_teacher: torch.Tensor,
    terms: torch.Tensor,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad_terms * terms) w.r.t. student and teacher ([0]-shaped if not
    requested)."""
    check_target_split_backward(_BACKWARD, grad_terms, student, teacher, labels, stats_student, stats_teacher, terms,
                                temperature)
    grad_s, grad_t, needed = _pair_gradients(student, teacher, student_grad, teacher_grad)
    if not needed:
        return grad_s, grad_t
    N, V = student.shape
    launch = _row_launch(temperature, student, teacher)
    student, teacher = launch.logits
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _target_split_bwd_kernel[(N, triton.cdiv(V, launch.block))](
            grad_terms.contiguous(), student, teacher, labels, stats_student.contiguous(),
            stats_teacher.contiguous(), terms.contiguous(),
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            launch.inv_t_ptr, launch.inv_t_arg,
            V, student.stride(0), teacher.stride(0), labels.stride(0),
            BLOCK=launch.block, **launch.dtypes,
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad),
            num_warps=launch.num_warps,
        )
    return grad_s, grad_t


