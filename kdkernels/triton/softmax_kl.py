"""Triton backend of the ``softmax_kl`` family: per-row KL(softmax(teacher / T) || softmax(student / T)).

Two ``torch.library.custom_op``s with hand-written fake (meta) kernels; autograd is registered by
``kdkernels/ops/softmax_kl.py`` for all backends. The contract (and the numerical specification, which lives in
``kdkernels/reference/softmax_kl.py``) is the one of the C++ ops ``torch.ops.kdkernels.softmax_kl_forward`` and
``softmax_kl_backward``:

* ``triton_softmax_kl_forward(student, teacher, T) -> (loss, stats_student, stats_teacher)``: inputs [N, V] with
  unit stride in the last dim (any row stride), each fp32 / fp16 / bf16 (they may differ) or both fp64; loss is [N]
  and each stats tensor [N, 2] = (max, log_sum) per row with log p = (x - max) / T - log_sum, in the accumulation
  dtype (fp32, fp64 for fp64 inputs).
* ``triton_softmax_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, T, student_grad,
  teacher_grad) -> (grad_student, grad_teacher)``: contiguous [N, V] gradients in the dtype of their input, or an
  empty tensor of shape [0] when that gradient is not requested.

Kernel design
-------------
Forward: grid ``(N,)``, one program per row. The program streams the row in ``BLOCK``-wide tiles, reading each input
exactly once, and keeps the online state ``(M_s, d_s, M_t, d_t, acc)`` of the CPU and CUDA kernels (see the
reference docstring and ``_softmax_kl_fwd_kernel``): per tile it takes the tile maxima, moves the state to the new
maxima, then accumulates the tile. Two implementation details that do not change the state's meaning:

* the maxima are tracked on the raw logits (``M_s = max s`` rather than ``max s / T``; ``T > 0`` so the arg-max is the
  same) and a shifted exponent is formed as ``(s - M_s) / T``. The subtraction of two nearby logits is exact, so the
  loss of rows with large logits (|s / T| ~ 1e5) does not inherit the rounding of ``s / T``;
* everything is in natural units (``x^ = (x - M) / T``, exponentiated by ``_common._exp_natural``); the sums and
  the KL moment ``acc = sum e_t (t^ - s^)`` accumulate in fp64 scalars, its log-ratios formed in fp64
  (``_common._wide_log_ratio``), and the loss ``acc / d_t + log d_s - log d_t`` is rounded once.

The backward's teacher gradient forms its log-ratio the same way and rounds it once before subtracting the loss: where
the teacher is one-hot (log-ratio == loss) both round the same value and the gradient vanishes, as the eager one.

Backward: grid ``(N, cdiv(V, BLOCK))``, elementwise from the saved per-row statistics, so small batches still fill
the GPU. Log-probabilities are formed as ``(x - max) / T - log_sum`` and exponentiated by ``_common._exp_natural``
(a rounded conversion to log2 units would cost the teacher gradient a factor ~3 in accuracy against the eager formula
at low T and large logits). Rows with ``grad_loss == 0`` or an all ``-inf`` teacher skip their loads and
write zeros.

``triton_softmax_jsd_forward(student, teacher, T, beta)`` / ``triton_softmax_jsd_backward(...)`` are the twins of
the C++ ``softmax_jsd_forward`` / ``softmax_jsd_backward`` (generalised JSD, 0 < beta < 1, spec
``softmax_jsd_rows``): the forward makes two passes over each row (pass 1 the KL kernel's online (max, sum) per side,
so the stats are the same; pass 2 the mixture KLs, with the log-ratios formed from d = log p_s - log p_t as the CPU
and CUDA kernels do, see ``_jsd_terms``); the backward is elementwise like the KL backward. Triton has no
expm1 / log1p: ``_expm1_nonpositive`` / ``_log1p_nonpositive`` cover the ranges used, to a few ulp.

Triton passes Python floats to kernels as fp32, so for fp64 inputs ``1 / T`` is passed as a one-element fp64 tensor.
Loads are upcast to the accumulation dtype immediately (the Triton interpreter computes bf16 arithmetic wrongly).
"""

import torch
import triton
import triton.language as tl

from kdkernels.ops._checks import check_jsd_backward, check_jsd_forward, check_kl_backward, check_logit_pair
from kdkernels.triton._common import (_exp_natural, _log1p_nonpositive, _rescaled_sum, _rescaled_teacher_moment,
                                      _scales, _teacher_weighted_sum, _wide_log_ratio, _wide_sum)
from kdkernels.triton._launch import (_acc_dtype, _block_and_warps, _inv_t_args, _launch_guard, _pair_gradients,
                                      _unit_last_stride)

__all__ = [
    "softmax_kl_forward",
    "softmax_kl_backward",
    "softmax_jsd_forward",
    "softmax_jsd_backward",
]


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _softmax_kl_fwd_kernel(
    s_ptr,
    t_ptr,
    loss_ptr,
    stats_s_ptr,  # [N, 2] contiguous: (max, log_sum) per row
    stats_t_ptr,
    inv_t_ptr,  # fp64 [1] holding 1 / T (read only when F64)
    inv_t_arg,  # fp32 scalar 1 / T (used only when not F64)
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
    inv_t, _, _, _ = _scales(inv_t_ptr, inv_t_arg, ACC, F64)

    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK)

    # Online state. M_* are maxima of the raw logits (in ACC); the safe shift is m~ = (M == -inf) ? 0 : M, and
    # x^ = (x - m~) / T. In fp64 (see _common._wide_sum):
    #   d_s = sum exp(s^),  d_t = sum e_t with e_t = exp(t^),
    #   acc = sum e_t (t^ - s^)  (the backward's log-ratios up to a row constant, formed in fp64: _wide_log_ratio),
    #   a term := 0 where e_t == 0.
    m_s = tl.full([], neg_inf, ACC)
    m_t = tl.full([], neg_inf, ACC)
    d_s = tl.full([], 0.0, tl.float64)
    d_t = tl.full([], 0.0, tl.float64)
    acc = tl.full([], 0.0, tl.float64)

    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)

        # 1-2. move the state to the tile's maxima. A state whose old maximum was -inf is empty (stays 0) and its
        #    factors (possibly inf) are discarded by tl.where.
        m_s_new, sh_s, d_s, moved_s, _ = _rescaled_sum(m_s, d_s, s, inv_t)
        m_t_new, sh_t, d_t_rescaled, moved_t, c_t = _rescaled_sum(m_t, d_t, t, inv_t)
        acc = _rescaled_teacher_moment(acc, m_t, c_t, d_t, moved_t, moved_s, inv_t)
        d_t = d_t_rescaled

        # 3. accumulate the tile (masked lanes and -inf logits give x^ = -inf -> e == 0)
        e_t = _exp_natural((t - sh_t) * inv_t, F64)
        d_s += _wide_sum(_exp_natural((s - sh_s) * inv_t, F64))
        d_t += _wide_sum(e_t)
        acc += _teacher_weighted_sum(e_t, _wide_log_ratio(t, sh_t, s, sh_s, inv_t))

        m_s = m_s_new
        m_t = m_t_new

    # Per-row statistics (max, log_sum) with log p = (x - max) / T - log_sum; an all -inf row has (-inf, -inf).
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    log_sum_s = log_d_s.to(ACC)
    log_sum_t = log_d_t.to(ACC)
    # loss = acc / d_t + log d_s - log d_t, rounded once; +inf for a student row that is all -inf under a finite
    # teacher (log 0); 0 for an all -inf teacher row.
    loss = (acc / d_t + (log_d_s - log_d_t)).to(ACC)
    loss = tl.where(m_s == neg_inf, float("inf"), loss)
    loss = tl.where(m_t == neg_inf, 0.0, loss)

    tl.store(loss_ptr + row, loss)
    tl.store(stats_s_ptr + 2 * row, m_s)
    tl.store(stats_s_ptr + 2 * row + 1, log_sum_s)
    tl.store(stats_t_ptr + 2 * row, m_t)
    tl.store(stats_t_ptr + 2 * row + 1, log_sum_t)


@triton.jit
def _softmax_kl_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    loss_ptr,
    gs_ptr,  # [N, V] contiguous (written only when STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous (written only when TEACHER_GRAD)
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_g,
    stride_s,
    stride_t,
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
    neg_inf = float("-inf")

    g = tl.load(g_ptr + row * stride_g).to(ACC)
    max_s = tl.load(stats_s_ptr + 2 * row).to(ACC)
    log_sum_s = tl.load(stats_s_ptr + 2 * row + 1).to(ACC)
    max_t = tl.load(stats_t_ptr + 2 * row).to(ACC)
    log_sum_t = tl.load(stats_t_ptr + 2 * row + 1).to(ACC)
    loss = tl.load(loss_ptr + row).to(ACC)
    # Rows with g == 0 or an all -inf teacher have zero gradients: skip their loads. (`block_mask & scalar_bool`
    # is avoided on purpose: the Triton 3.9 interpreter splats a scalar comparison result with the operands' dtype
    # and then fails in np.bitwise_and; comparing against a selected bound and a scalar-condition tl.where work.)
    active = (g != 0.0) & (max_t != neg_inf)
    lmask = cols < tl.where(active, V, 0)
    s = tl.load(s_ptr + row * stride_s + cols, mask=lmask, other=neg_inf).to(ACC)
    t = tl.load(t_ptr + row * stride_t + cols, mask=lmask, other=neg_inf).to(ACC)

    gi = g * inv_t
    # log p = (x - max) / T - log_sum: the subtraction of nearby logits is exact, so large |x| / T costs nothing.
    # NaN only on inactive rows, where tl.where discards it.
    log_p_t = (t - max_t) * inv_t - log_sum_t
    log_p_s = (s - max_s) * inv_t - log_sum_s
    p_t = _exp_natural(log_p_t, F64)
    out_offs = row * V + cols
    if STUDENT_GRAD:
        p_s = tl.where(max_s == neg_inf, 0.0, _exp_natural(log_p_s, F64))
        grad_s = tl.where(active, gi * (p_s - p_t), 0.0)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        # The log-ratio log p_t - log p_s in fp64, rounded once before the loss is subtracted: where the teacher is
        # one-hot it rounds the same exact value as the forward's loss, so r = 0 there, as in the eager gradient.
        log_ratio = _wide_log_ratio(t, max_t, s, max_s, inv_t) - (log_sum_t.to(tl.float64) - log_sum_s.to(tl.float64))
        r = log_ratio.to(ACC) - loss
        # p last: only the final product can be subnormal (one rounding), not an intermediate g p / T
        grad_t = tl.where(active, tl.where(p_t != 0.0, (gi * r) * p_t, 0.0), 0.0)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


# JSD scalars. For fp32 accumulation they are passed as (fp32) scalar arguments; for fp64 as one fp64 tensor with
# these slots (a Triton scalar argument is fp32). All are computed on the host in double precision.
_P_INV_T = tl.constexpr(0)  # 1 / T
_P_BETA = tl.constexpr(1)  # beta
_P_ONE_M_BETA = tl.constexpr(2)  # 1 - beta
_P_COEF_T = tl.constexpr(3)  # beta / T
_P_COEF_S = tl.constexpr(4)  # (1 - beta) / T
_P_BETA_LO = tl.constexpr(5)  # beta - beta rounded to the accumulation dtype (0 for fp64)
_P_ONE_M_BETA_LO = tl.constexpr(6)  # (1 - beta) - (1 - beta) rounded likewise
_N_JSD_PARAMS = 7


@triton.jit
def _param(params_ptr, idx: tl.constexpr, arg, ACC: tl.constexpr, F64: tl.constexpr):
    if F64:
        return tl.load(params_ptr + idx).to(ACC)
    else:
        return tl.cast(arg, ACC)


@triton.jit
def _expm1_nonpositive(x, F64: tl.constexpr):
    # expm1(x) for x <= 0 (Triton has no expm1). For x > -0.35 the Taylor series through x^8/8! (fp32) or x^13/13!
    # (fp64), in Horner form with exact integer divisors (truncation < 2e-8 resp. 2e-17 relative); below, exp(x) - 1,
    # whose result has |.| > 0.29, so the subtraction costs at most ~2 ulp. -inf -> -1; NaN stays NaN.
    if F64:
        e = 1.0 + x / 13
        for i in tl.static_range(1, 12):
            e = 1.0 + (x / (13 - i)) * e
    else:
        e = 1.0 + x / 8
        for i in tl.static_range(1, 7):
            e = 1.0 + (x / (8 - i)) * e
    return tl.where(x > -0.35, x * e, tl.exp(x) - 1.0)


@triton.jit
def _jsd_terms(s, t, max_s, log_sum_s, max_t, log_sum_t, log_sum_diff, inv_t, beta, one_m_beta, beta_lo,
               one_m_beta_lo, F64: tl.constexpr):
    # log p_s, log p_t and the mixture log-ratios rt = log p_t - log m, rs = log p_s - log m (natural units), as the
    # CPU and CUDA kernels form them: with d = log p_s - log p_t = ((s - max_s) - (t - max_t)) / T + log_sum_diff
    # (log_sum_diff = log_sum_t - log_sum_s), each difference exact near the maxima,
    #   d <= 0:  rt = -log1p((1 - beta) expm1(d)),  rs = d + rt;    d > 0:  rs = -log1p(beta expm1(-d)),  rt = rs - d,
    # accurate to ~eps |d| however close the distributions are (log p - log m would cancel O(log V) terms).
    # Meaningful only where the matching p > 0 (d = +-inf gives the exact -log beta / -log(1 - beta) there); NaN
    # where both logits are -inf (callers select such terms away). The weight multiplying expm1 is beta (resp.
    # 1 - beta) split into its rounded value and the rest: the KLs cancel terms of both signs, and the rounding of
    # beta alone would bias every row's KL by ~2 ulp (always the same way for a given beta).
    below_s = s - max_s
    below_t = t - max_t
    log_p_s = below_s * inv_t - log_sum_s
    log_p_t = below_t * inv_t - log_sum_t
    d = (below_s - below_t) * inv_t + log_sum_diff
    non_positive = d <= 0.0
    w = _expm1_nonpositive(-tl.abs(d), F64)
    weight = tl.where(non_positive, one_m_beta, beta)
    weight_lo = tl.where(non_positive, one_m_beta_lo, beta_lo)
    l = _log1p_nonpositive(tl.fma(weight, w, weight_lo * w), F64)
    rt = tl.where(non_positive, -l, -d - l)
    rs = tl.where(non_positive, d - l, -l)
    return log_p_s, log_p_t, rt, rs


@triton.jit
def _softmax_jsd_fwd_kernel(
    s_ptr,
    t_ptr,
    loss_ptr,
    stats_s_ptr,  # [N, 2] contiguous: (max, log_sum) per row
    stats_t_ptr,
    mkl_ptr,  # [N, 2] contiguous: (KL(p_t || m), KL(p_s || m)) per row
    params_ptr,  # fp64 [_N_JSD_PARAMS] (read only when F64)
    inv_t_arg,  # fp32 scalars (used only when not F64)
    beta_arg,
    one_m_beta_arg,
    beta_lo_arg,
    one_m_beta_lo_arg,
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
    inv_t = _param(params_ptr, _P_INV_T, inv_t_arg, ACC, F64)
    beta = _param(params_ptr, _P_BETA, beta_arg, ACC, F64)
    one_m_beta = _param(params_ptr, _P_ONE_M_BETA, one_m_beta_arg, ACC, F64)
    beta_lo = _param(params_ptr, _P_BETA_LO, beta_lo_arg, ACC, F64)
    one_m_beta_lo = _param(params_ptr, _P_ONE_M_BETA_LO, one_m_beta_lo_arg, ACC, F64)
    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK)

    # Pass 1: online (max, sum) per side, as _softmax_kl_fwd_kernel without its acc term (the statistics are the
    # same, bit for bit). M_* are maxima of the raw logits; the safe shift is m~ = (M == -inf) ? 0 : M and
    # d_* = sum exp((x - m~) / T) (fp64).
    m_s = tl.full([], neg_inf, ACC)
    m_t = tl.full([], neg_inf, ACC)
    d_s = tl.full([], 0.0, tl.float64)
    d_t = tl.full([], 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)

        m_s, sh_s, d_s, _, _ = _rescaled_sum(m_s, d_s, s, inv_t)
        m_t, sh_t, d_t, _, _ = _rescaled_sum(m_t, d_t, t, inv_t)
        d_s += _wide_sum(_exp_natural((s - sh_s) * inv_t, F64))
        d_t += _wide_sum(_exp_natural((t - sh_t) * inv_t, F64))

    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    log_sum_s = log_d_s.to(ACC)
    log_sum_t = log_d_t.to(ACC)
    log_sum_diff = (log_d_t - log_d_s).to(ACC)  # log_sum_t - log_sum_s, rounded once

    # Pass 2: the mixture terms, in natural units (only the argument of exp is converted). A row in which either
    # side is all -inf is empty: its loads are skipped (NaN results are discarded below).
    empty = (m_s == neg_inf) | (m_t == neg_inf)
    bound = tl.where(empty, 0, V)
    kl_t = tl.full([], 0.0, tl.float64)
    kl_s = tl.full([], 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        lmask = cols < bound
        s = tl.load(s_row + cols, mask=lmask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=lmask, other=neg_inf).to(ACC)
        log_p_s, log_p_t, rt, rs = _jsd_terms(s, t, m_s, log_sum_s, m_t, log_sum_t, log_sum_diff, inv_t, beta,
                                              one_m_beta, beta_lo, one_m_beta_lo, F64)
        p_s = _exp_natural(log_p_s, F64)
        p_t = _exp_natural(log_p_t, F64)
        # A term with p > 0 is finite (its ratio is at most -log beta resp. -log(1 - beta)); others are exactly 0.
        kl_t += _wide_sum(tl.where(p_t > 0.0, p_t * rt, 0.0))
        kl_s += _wide_sum(tl.where(p_s > 0.0, p_s * rs, 0.0))

    # p = exp(log p) against the rounded log_sum is the exact p times exp(log_sum - log d): undo that factor in fp64
    # (a rounded log_sum ~ log V would otherwise scale each mixture KL by up to half an ulp of log V, several ulp).
    kl_t *= tl.exp(log_sum_t.to(tl.float64) - log_d_t)
    kl_s *= tl.exp(log_sum_s.to(tl.float64) - log_d_s)
    kl_t = tl.where(empty, 0.0, kl_t)
    kl_s = tl.where(empty, 0.0, kl_s)
    beta_64 = beta.to(tl.float64) + beta_lo.to(tl.float64)
    one_m_beta_64 = one_m_beta.to(tl.float64) + one_m_beta_lo.to(tl.float64)
    loss = (beta_64 * kl_t + one_m_beta_64 * kl_s).to(ACC)
    kl_t = kl_t.to(ACC)
    kl_s = kl_s.to(ACC)

    tl.store(loss_ptr + row, loss)
    tl.store(stats_s_ptr + 2 * row, m_s)
    tl.store(stats_s_ptr + 2 * row + 1, log_sum_s)
    tl.store(stats_t_ptr + 2 * row, m_t)
    tl.store(stats_t_ptr + 2 * row + 1, log_sum_t)
    tl.store(mkl_ptr + 2 * row, kl_t)
    tl.store(mkl_ptr + 2 * row + 1, kl_s)


@triton.jit
def _softmax_jsd_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    mkl_ptr,
    gs_ptr,  # [N, V] contiguous (written only when STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous (written only when TEACHER_GRAD)
    params_ptr,
    inv_t_arg,
    beta_arg,
    one_m_beta_arg,
    coef_t_arg,
    coef_s_arg,
    beta_lo_arg,
    one_m_beta_lo_arg,
    V,
    stride_g,
    stride_s,
    stride_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    inv_t = _param(params_ptr, _P_INV_T, inv_t_arg, ACC, F64)
    beta = _param(params_ptr, _P_BETA, beta_arg, ACC, F64)
    one_m_beta = _param(params_ptr, _P_ONE_M_BETA, one_m_beta_arg, ACC, F64)
    beta_lo = _param(params_ptr, _P_BETA_LO, beta_lo_arg, ACC, F64)
    one_m_beta_lo = _param(params_ptr, _P_ONE_M_BETA_LO, one_m_beta_lo_arg, ACC, F64)
    neg_inf = float("-inf")

    g = tl.load(g_ptr + row * stride_g).to(ACC)
    max_s = tl.load(stats_s_ptr + 2 * row).to(ACC)
    log_sum_s = tl.load(stats_s_ptr + 2 * row + 1).to(ACC)
    max_t = tl.load(stats_t_ptr + 2 * row).to(ACC)
    log_sum_t = tl.load(stats_t_ptr + 2 * row + 1).to(ACC)
    kl_t = tl.load(mkl_ptr + 2 * row).to(ACC)
    kl_s = tl.load(mkl_ptr + 2 * row + 1).to(ACC)
    # Rows with g == 0 or an empty side (all -inf) have zero gradients: skip their loads (same interpreter-safe
    # masking as _softmax_kl_bwd_kernel: no `block_mask & scalar_bool`).
    active = (g != 0.0) & (max_s != neg_inf) & (max_t != neg_inf)
    lmask = cols < tl.where(active, V, 0)
    s = tl.load(s_ptr + row * stride_s + cols, mask=lmask, other=neg_inf).to(ACC)
    t = tl.load(t_ptr + row * stride_t + cols, mask=lmask, other=neg_inf).to(ACC)

    # NaN only on inactive rows, where tl.where discards it.
    log_p_s, log_p_t, rt, rs = _jsd_terms(s, t, max_s, log_sum_s, max_t, log_sum_t, log_sum_t - log_sum_s, inv_t,
                                          beta, one_m_beta, beta_lo, one_m_beta_lo, F64)
    out_offs = row * V + cols
    if STUDENT_GRAD:
        gc = g * _param(params_ptr, _P_COEF_S, coef_s_arg, ACC, F64)  # g (1 - beta) / T
        p_s = _exp_natural(log_p_s, F64)
        # p last: only the final product can be subnormal (one rounding), not an intermediate g coef p
        grad_s = tl.where(p_s != 0.0, (gc * (rs - kl_s)) * p_s, 0.0)
        grad_s = tl.where(active, grad_s, 0.0)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        gc = g * _param(params_ptr, _P_COEF_T, coef_t_arg, ACC, F64)  # g beta / T
        p_t = _exp_natural(log_p_t, F64)
        grad_t = tl.where(p_t != 0.0, (gc * (rt - kl_t)) * p_t, 0.0)
        grad_t = tl.where(active, grad_t, 0.0)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------------------

_KL_FORWARD = "triton_softmax_kl_forward"
_KL_BACKWARD = "triton_softmax_kl_backward"
_JSD_FORWARD = "triton_softmax_jsd_forward"
_JSD_BACKWARD = "triton_softmax_jsd_backward"


def _row_outputs(student: torch.Tensor, teacher: torch.Tensor, count: int):
    """`count` empty outputs in the accumulation dtype: the loss [N], then [N, 2] tensors (statistics, mixture KLs)."""
    acc_dtype = _acc_dtype(student, teacher)
    N = student.shape[0]
    return tuple(student.new_empty((N,) if i == 0 else (N, 2), dtype=acc_dtype) for i in range(count))


def _launch_setup(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher with unit last stride, BLOCK, num_warps, ACC / F64 constexprs)."""
    acc_dtype = _acc_dtype(student, teacher)
    block, num_warps = _block_and_warps(student.shape[1], acc_dtype, max(student.element_size(),
                                                                        teacher.element_size()))
    f64 = acc_dtype == torch.float64
    return (_unit_last_stride(student), _unit_last_stride(teacher), block, num_warps,
            {"ACC": tl.float64 if f64 else tl.float32, "F64": f64})


@torch.library.custom_op("kdkernels::triton_softmax_kl_forward", mutates_args=())
def softmax_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: per-row loss [N] and (max, log_sum) statistics [N, 2] in the accumulation dtype."""
    check_logit_pair(_KL_FORWARD, student, teacher, temperature)
    loss, stats_s, stats_t = _row_outputs(student, teacher, 3)
    N, V = student.shape
    if N == 0:
        return loss, stats_s, stats_t
    student, teacher, block, num_warps, dtypes = _launch_setup(student, teacher)
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, loss.dtype, student)
    with _launch_guard(student):
        _softmax_kl_fwd_kernel[(N,)](
            student, teacher, loss, stats_s, stats_t, inv_t_ptr, inv_t_arg,
            V, student.stride(0), teacher.stride(0),
            BLOCK=block, **dtypes, num_warps=num_warps,
        )
    return loss, stats_s, stats_t


@torch.library.custom_op("kdkernels::triton_softmax_kl_backward", mutates_args=())
def softmax_kl_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    stats_student: torch.Tensor,
    stats_teacher: torch.Tensor,
    loss: torch.Tensor,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad_loss * loss) w.r.t. student and teacher ([0]-shaped if not requested)."""
    check_kl_backward(_KL_BACKWARD, grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature)
    grad_s, grad_t, needed = _pair_gradients(student, teacher, student_grad, teacher_grad)
    if not needed:
        return grad_s, grad_t
    N, V = student.shape
    student, teacher, block, num_warps, dtypes = _launch_setup(student, teacher)
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, _acc_dtype(student, teacher), student)
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _softmax_kl_bwd_kernel[(N, triton.cdiv(V, block))](
            grad_loss, student, teacher, stats_student.contiguous(), stats_teacher.contiguous(), loss.contiguous(),
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            inv_t_ptr, inv_t_arg,
            V, grad_loss.stride(0), student.stride(0), teacher.stride(0),
            BLOCK=block, **dtypes,
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad),
            num_warps=num_warps,
        )
    return grad_s, grad_t


def _jsd_params(temperature: float, beta: float, acc_dtype: torch.dtype, dummy: torch.Tensor):
    """(params_ptr, scalars): the JSD scalars in double precision, in the order of the _P_* slots; for fp64 also as an
    fp64 tensor, which the kernels read instead (see _launch._inv_t_args)."""
    inv_t = 1.0 / temperature
    if acc_dtype == torch.float64:
        beta_lo = one_m_beta_lo = 0.0
    else:
        beta_lo = beta - float(torch.tensor(beta, dtype=acc_dtype))
        one_m_beta_lo = (1.0 - beta) - float(torch.tensor(1.0 - beta, dtype=acc_dtype))
    scalars = (inv_t, beta, 1.0 - beta, beta * inv_t, (1.0 - beta) * inv_t, beta_lo, one_m_beta_lo)
    assert len(scalars) == _N_JSD_PARAMS
    if acc_dtype == torch.float64:
        return torch.tensor(scalars, dtype=torch.float64, device=dummy.device), scalars
    return dummy, scalars


@torch.library.custom_op("kdkernels::triton_softmax_jsd_forward", mutates_args=())
def softmax_jsd_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: per-row loss [N], (max, log_sum) statistics [N, 2] per side and mixture_kl [N, 2] =
    (KL(p_t || m), KL(p_s || m)), all in the accumulation dtype."""
    check_jsd_forward(_JSD_FORWARD, student, teacher, temperature, beta)
    loss, stats_s, stats_t, mixture_kl = _row_outputs(student, teacher, 4)
    N, V = student.shape
    if N == 0:
        return loss, stats_s, stats_t, mixture_kl
    student, teacher, block, num_warps, dtypes = _launch_setup(student, teacher)
    params_ptr, (inv_t, beta_, one_m_beta, _, _, beta_lo, one_m_beta_lo) = _jsd_params(temperature, beta,
                                                                                       loss.dtype, student)
    with _launch_guard(student):
        _softmax_jsd_fwd_kernel[(N,)](
            student, teacher, loss, stats_s, stats_t, mixture_kl, params_ptr,
            inv_t, beta_, one_m_beta, beta_lo, one_m_beta_lo,
            V, student.stride(0), teacher.stride(0),
            BLOCK=block, **dtypes, num_warps=num_warps,
        )
    return loss, stats_s, stats_t, mixture_kl


@torch.library.custom_op("kdkernels::triton_softmax_jsd_backward", mutates_args=())
def softmax_jsd_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    stats_student: torch.Tensor,
    stats_teacher: torch.Tensor,
    mixture_kl: torch.Tensor,
    temperature: float,
    beta: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad_loss * loss) w.r.t. student and teacher ([0]-shaped if not requested)."""
    check_jsd_backward(_JSD_BACKWARD, grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl,
                       temperature, beta)
    grad_s, grad_t, needed = _pair_gradients(student, teacher, student_grad, teacher_grad)
    if not needed:
        return grad_s, grad_t
    N, V = student.shape
    student, teacher, block, num_warps, dtypes = _launch_setup(student, teacher)
    params_ptr, (inv_t, beta_, one_m_beta, coef_t, coef_s, beta_lo, one_m_beta_lo) = _jsd_params(
        temperature, beta, _acc_dtype(student, teacher), student)
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _softmax_jsd_bwd_kernel[(N, triton.cdiv(V, block))](
            grad_loss, student, teacher, stats_student.contiguous(), stats_teacher.contiguous(),
            mixture_kl.contiguous(),
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            params_ptr, inv_t, beta_, one_m_beta, coef_t, coef_s, beta_lo, one_m_beta_lo,
            V, grad_loss.stride(0), student.stride(0), teacher.stride(0),
            BLOCK=block, **dtypes,
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad),
            num_warps=num_warps,
        )
    return grad_s, grad_t


