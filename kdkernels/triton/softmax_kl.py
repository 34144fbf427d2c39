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
  same) and a shifted exponent is formed as ``(s - M_s) * k``. The subtraction of two nearby logits is exact, so the
  loss of rows with large logits (|s / T| ~ 1e5) does not inherit the rounding of ``s / T``;
* for fp32 accumulation ``k = log2(e) / T`` and the kernel works with ``exp2`` / ``log2`` (results are converted back
  to natural units by ``ln 2`` at the end); for fp64 accumulation ``k = 1 / T`` with ``exp`` / ``log``.

Backward: grid ``(N, cdiv(V, BLOCK))``, elementwise from the saved per-row statistics, so small batches still fill
the GPU. Rows with ``grad_loss == 0`` or an all ``-inf`` teacher skip their loads and write zeros.

``triton_softmax_jsd_forward(student, teacher, T, beta)`` / ``triton_softmax_jsd_backward(...)`` are the twins of
the C++ ``softmax_jsd_forward`` / ``softmax_jsd_backward`` (generalised JSD, 0 < beta < 1, spec
``softmax_jsd_rows``): the forward makes two passes over each row (pass 1 the KL kernel's online (max, sum) per side,
so the stats are the same; pass 2 the mixture KLs, with the log-ratios formed from d = log p_s - log p_t as the CPU
and CUDA kernels do, see ``_jsd_terms``); the backward is elementwise like the KL backward. Triton has no
expm1 / log1p: ``_expm1_nonpositive`` / ``_log1p_nonpositive`` cover the ranges used, to a few ulp.

Triton passes Python floats to kernels as fp32, so for fp64 inputs ``1 / T`` is passed as a one-element fp64 tensor.
Loads are upcast to the accumulation dtype immediately (the Triton interpreter computes bf16 arithmetic wrongly).
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

__all__ = [
    "softmax_kl_forward",
    "softmax_kl_backward",
    "softmax_jsd_forward",
    "softmax_jsd_backward",
]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _exp(x, F64: tl.constexpr):
    # fp32: exponents are in log2 units (k = log2(e) / T); fp64: natural units (k = 1 / T).
    if F64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, F64: tl.constexpr):
    if F64:
        return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def _rescaled_sum(m, d, tile, k, F64: tl.constexpr):
    """One side's online sum d = sum exp((x - m~) k) moved to the max of a new tile, with m~ = (m == -inf) ? 0 : m.

    Returns (new max, its safe shift m~', d rescaled to it, delta = (m~' - m~) k, c = exp(-delta)). A side whose
    old max was -inf is empty: its sum stays 0 (c, possibly inf, is discarded)."""
    neg_inf = float("-inf")
    m_new = tl.maximum(m, tl.max(tile, axis=0))
    shift_old = tl.where(m == neg_inf, 0.0, m)
    shift = tl.where(m_new == neg_inf, 0.0, m_new)
    delta = (shift - shift_old) * k
    c = _exp(-delta, F64)
    return m_new, shift, tl.where(m == neg_inf, 0.0, c * d), delta, c


@triton.jit
def _rescaled_teacher_moment(acc, m_t, c_t, d_t, delta_t, delta_x):
    """acc = sum e_t (t^ - x^) moved to new shifts (t^ -= delta_t, x^ -= delta_x, e_t *= c_t), d_t = the teacher's
    sum before the move. A teacher whose old max was -inf is empty; c_t == 0 (the old teacher mass underflows) also
    zeroes acc, which keeps an acc of +inf (a -inf x^ under a finite teacher) from becoming 0 * inf = NaN: the
    underflowed terms have p_t == 0 and contribute 0."""
    return tl.where((m_t == float("-inf")) | (c_t == 0.0), 0.0, c_t * (acc + (delta_x - delta_t) * d_t))


@triton.jit
def _teacher_weighted_sum(e_t, r):
    # sum e_t r over a tile, a term := 0 where e_t == 0 (so r = +-inf there gives no NaN)
    return tl.sum(tl.where(e_t == 0.0, 0.0, e_t * r), axis=0)


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
    if F64:
        inv_t = tl.load(inv_t_ptr).to(ACC)
        k = inv_t  # exponent scale: natural units
        unit = 1.0  # natural-log units per exponent unit
    else:
        inv_t = tl.cast(inv_t_arg, ACC)
        k = inv_t * _LOG2E  # exponent scale: log2 units
        unit = _LN2

    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK)

    # Online state. M_* are maxima of the raw logits; the safe shift is m~ = (M == -inf) ? 0 : M.
    #   d_s = sum exp((s - m~_s) k),  d_t = sum exp((t - m~_t) k),
    #   acc = sum e_t * ((t - m~_t) k - (s - m~_s) k)   with e_t = exp((t - m~_t) k), a term := 0 where e_t == 0.
    m_s = tl.full([], neg_inf, ACC)
    m_t = tl.full([], neg_inf, ACC)
    d_s = tl.full([], 0.0, ACC)
    d_t = tl.full([], 0.0, ACC)
    acc = tl.full([], 0.0, ACC)

    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)

        # 1-2. move the state to the tile's maxima. delta_* >= 0 when the old maximum was finite; a state whose old
        #    maximum was -inf is empty (stays 0) and its factors (possibly inf) are discarded by tl.where.
        m_s_new, sh_s, d_s, delta_s, _ = _rescaled_sum(m_s, d_s, s, k, F64)
        m_t_new, sh_t, d_t_rescaled, delta_t, c_t = _rescaled_sum(m_t, d_t, t, k, F64)
        acc = _rescaled_teacher_moment(acc, m_t, c_t, d_t, delta_t, delta_s)
        d_t = d_t_rescaled

        # 3. accumulate the tile (masked lanes and -inf logits give exponent -inf -> e == 0)
        x_s = (s - sh_s) * k
        x_t = (t - sh_t) * k
        e_s = _exp(x_s, F64)
        e_t = _exp(x_t, F64)
        d_s += tl.sum(e_s, axis=0)
        d_t += tl.sum(e_t, axis=0)
        acc += _teacher_weighted_sum(e_t, x_t - x_s)

        m_s = m_s_new
        m_t = m_t_new

    # Per-row statistics (max, log_sum) with log p = (x - max) / T - log_sum; an all -inf row has (-inf, -inf).
    log_sum_s = _log(d_s, F64) * unit
    log_sum_t = _log(d_t, F64) * unit
    # loss = acc / d_t - log d_t + log d_s; +inf for a student row that is all -inf under a finite teacher (log 0);
    # 0 for an all -inf teacher row.
    loss = (acc / d_t - _log(d_t, F64) + _log(d_s, F64)) * unit
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
    if F64:
        inv_t = tl.load(inv_t_ptr).to(ACC)
        to_exp = 1.0  # natural units -> exponent units
    else:
        inv_t = tl.cast(inv_t_arg, ACC)
        to_exp = _LOG2E
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
    p_t = _exp(log_p_t * to_exp, F64)
    out_offs = row * V + cols
    if STUDENT_GRAD:
        p_s = tl.where(max_s == neg_inf, 0.0, _exp(log_p_s * to_exp, F64))
        grad_s = tl.where(active, gi * (p_s - p_t), 0.0)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        r = log_p_t - log_p_s - loss
        grad_t = tl.where(active, tl.where(p_t != 0.0, gi * p_t * r, 0.0), 0.0)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


# JSD scalars. For fp32 accumulation they are passed as (fp32) scalar arguments; for fp64 as one fp64 tensor with
# these slots (a Triton scalar argument is fp32). All are computed on the host in double precision.
_P_INV_T = tl.constexpr(0)  # 1 / T
_P_BETA = tl.constexpr(1)  # beta
_P_ONE_M_BETA = tl.constexpr(2)  # 1 - beta
_P_COEF_T = tl.constexpr(3)  # beta / T
_P_COEF_S = tl.constexpr(4)  # (1 - beta) / T
_N_JSD_PARAMS = 5


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
def _log1p_nonpositive(y, F64: tl.constexpr):
    # log1p(y) for -1 < y <= 0 (Triton has no log1p). For y >= -0.3: log1p(y) = 2 atanh(z), z = y / (2 + y), |z| <=
    # 0.177, by its odd series through z^9/9 (fp32) or z^19/19 (fp64) (truncation < 3e-9 resp. 4e-17 relative);
    # below, log(1 + y), where 1 + y is nearly exact and |result| > 0.35. NaN stays NaN.
    # The coefficients 1 / (2k + 1) are formed by a division in the accumulation dtype (a float literal may be
    # materialised as fp32, which would cost fp64 ~1e-9).
    z = y / (2.0 + y)
    z2 = z * z
    one = tl.full([], 1.0, z.dtype)
    if F64:
        a = one / 19
        for i in tl.static_range(1, 10):
            a = one / (19 - 2 * i) + z2 * a
    else:
        a = one / 9
        for i in tl.static_range(1, 5):
            a = one / (9 - 2 * i) + z2 * a
    return tl.where(y >= -0.3, 2.0 * z * a, tl.log(1.0 + y))


@triton.jit
def _jsd_terms(s, t, max_s, log_sum_s, max_t, log_sum_t, log_sum_diff, inv_t, beta, one_m_beta,
               F64: tl.constexpr):
    # log p_s, log p_t and the mixture log-ratios rt = log p_t - log m, rs = log p_s - log m (natural units), as the
    # CPU and CUDA kernels form them: with d = log p_s - log p_t = ((s - max_s) - (t - max_t)) / T + log_sum_diff
    # (log_sum_diff = log_sum_t - log_sum_s), each difference exact near the maxima,
    #   d <= 0:  rt = -log1p((1 - beta) expm1(d)),  rs = d + rt;    d > 0:  rs = -log1p(beta expm1(-d)),  rt = rs - d,
    # accurate to ~eps |d| however close the distributions are (log p - log m would cancel O(log V) terms).
    # Meaningful only where the matching p > 0 (d = +-inf gives the exact -log beta / -log(1 - beta) there); NaN
    # where both logits are -inf (callers select such terms away).
    below_s = s - max_s
    below_t = t - max_t
    log_p_s = below_s * inv_t - log_sum_s
    log_p_t = below_t * inv_t - log_sum_t
    d = (below_s - below_t) * inv_t + log_sum_diff
    non_positive = d <= 0.0
    w = _expm1_nonpositive(-tl.abs(d), F64)
    l = _log1p_nonpositive(tl.where(non_positive, one_m_beta, beta) * w, F64)
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
    if F64:
        k = inv_t  # pass-1 exponent scale: natural units
        unit = 1.0  # natural-log units per exponent unit
        to_exp = 1.0  # natural units -> exponent units
    else:
        k = inv_t * _LOG2E  # pass-1 exponent scale: log2 units
        unit = _LN2
        to_exp = _LOG2E

    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK)

    # Pass 1: online (max, sum) per side, as _softmax_kl_fwd_kernel without its acc term (the statistics are the
    # same, bit for bit). M_* are maxima of the raw logits; the safe shift is m~ = (M == -inf) ? 0 : M and
    # d_* = sum exp((x - m~) k).
    m_s = tl.full([], neg_inf, ACC)
    m_t = tl.full([], neg_inf, ACC)
    d_s = tl.full([], 0.0, ACC)
    d_t = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)

        m_s, sh_s, d_s, _, _ = _rescaled_sum(m_s, d_s, s, k, F64)
        m_t, sh_t, d_t, _, _ = _rescaled_sum(m_t, d_t, t, k, F64)
        d_s += tl.sum(_exp((s - sh_s) * k, F64), axis=0)
        d_t += tl.sum(_exp((t - sh_t) * k, F64), axis=0)

    log_sum_s = _log(d_s, F64) * unit
    log_sum_t = _log(d_t, F64) * unit
    log_sum_diff = _log(d_t / d_s, F64) * unit  # log_sum_t - log_sum_s, rounded once (as the CUDA kernel)

    # Pass 2: the mixture terms, in natural units (only the argument of exp is converted). A row in which either
    # side is all -inf is empty: its loads are skipped (NaN results are discarded below).
    empty = (m_s == neg_inf) | (m_t == neg_inf)
    bound = tl.where(empty, 0, V)
    kl_t = tl.full([], 0.0, ACC)
    kl_s = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        lmask = cols < bound
        s = tl.load(s_row + cols, mask=lmask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=lmask, other=neg_inf).to(ACC)
        log_p_s, log_p_t, rt, rs = _jsd_terms(s, t, m_s, log_sum_s, m_t, log_sum_t, log_sum_diff, inv_t, beta,
                                              one_m_beta, F64)
        p_s = _exp(log_p_s * to_exp, F64)
        p_t = _exp(log_p_t * to_exp, F64)
        # A term with p > 0 is finite (its ratio is at most -log beta resp. -log(1 - beta)); others are exactly 0.
        kl_t += tl.sum(tl.where(p_t > 0.0, p_t * rt, 0.0), axis=0)
        kl_s += tl.sum(tl.where(p_s > 0.0, p_s * rs, 0.0), axis=0)

    kl_t = tl.where(empty, 0.0, kl_t)
    kl_s = tl.where(empty, 0.0, kl_s)
    loss = beta * kl_t + one_m_beta * kl_s

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
    if F64:
        to_exp = 1.0
    else:
        to_exp = _LOG2E
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
                                          beta, one_m_beta, F64)
    out_offs = row * V + cols
    if STUDENT_GRAD:
        gc = g * _param(params_ptr, _P_COEF_S, coef_s_arg, ACC, F64)  # g (1 - beta) / T
        p_s = _exp(log_p_s * to_exp, F64)
        # p last: only the final product can be subnormal (one rounding), not an intermediate g coef p
        grad_s = tl.where(p_s != 0.0, (gc * (rs - kl_s)) * p_s, 0.0)
        grad_s = tl.where(active, grad_s, 0.0)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        gc = g * _param(params_ptr, _P_COEF_T, coef_t_arg, ACC, F64)  # g beta / T
        p_t = _exp(log_p_t * to_exp, F64)
        grad_t = tl.where(p_t != 0.0, (gc * (rt - kl_t)) * p_t, 0.0)
        grad_t = tl.where(active, grad_t, 0.0)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------------------


def _block_and_warps(V: int, acc_dtype: torch.dtype, widest_input_bytes: int):
    """BLOCK (tile width, a power of two) and num_warps for both kernels.

    Heuristic: BLOCK = min(next_pow2(V), cap) with cap = 8192 for two 16-bit inputs, 4096 when an input is fp32 and
    2048 for fp64, and num_warps = clamp(BLOCK / 512, 4, 16), i.e. 4 warps up to BLOCK 2048, 8 at 4096, 16 at 8192.
    Each thread then holds at most 16 elements per tensor and tile (upcast to the accumulation dtype), which keeps
    register pressure low (unlike Liger's JSD kernel, 4 warps for blocks up to 65536) while a tile still moves
    16 KiB per tensor (8192 x 2 B, 4096 x 4 B, 2048 x 8 B). Not tuned on a GPU yet.
    """
    if acc_dtype == torch.float64:
        cap = 2048
    elif widest_input_bytes >= 4:
        cap = 4096
    else:
        cap = 8192
    block = min(max(triton.next_power_of_2(max(V, 1)), 16), cap)
    num_warps = min(max(block // 512, 4), 16)
    return block, num_warps


def _acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if (student.dtype == torch.float64 or teacher.dtype == torch.float64) else torch.float32


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    _check_logits("student", student)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher: expected shape {tuple(student.shape)} (the student's), got {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher: expected device {student.device} (the student's), got {teacher.device}")
    _check_logits("teacher", teacher)
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError(f"student, teacher: float64 must be used for both inputs, got {student.dtype} and "
                        f"{teacher.dtype}")
    _check_temperature(temperature)


def _check_logits(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, V] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels address x[row, col] as base + row * stride(0) + col.
    return x if (x.size(1) <= 1 or x.stride(1) == 1) else x.contiguous()


def _inv_t_args(temperature: float, acc_dtype: torch.dtype, dummy: torch.Tensor):
    """(inv_t_ptr, inv_t_arg): fp64 needs 1/T in full precision, which a Triton scalar argument (fp32) cannot hold."""
    inv_t = 1.0 / temperature
    if acc_dtype == torch.float64:
        return torch.full((1,), inv_t, dtype=torch.float64, device=dummy.device), inv_t
    return dummy, inv_t


# ------------------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdkernels::triton_softmax_kl_forward", mutates_args=())
def softmax_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: per-row loss [N] and (max, log_sum) statistics [N, 2] in the accumulation dtype."""
    _check_inputs(student, teacher, temperature)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    loss = torch.empty(N, dtype=acc_dtype, device=student.device)
    stats_s = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    stats_t = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    if N == 0:
        return loss, stats_s, stats_t
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, acc_dtype, student)
    with _launch_guard(student):
        _softmax_kl_fwd_kernel[(N,)](
            student, teacher, loss, stats_s, stats_t, inv_t_ptr, inv_t_arg,
            V, student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            num_warps=num_warps,
        )
    return loss, stats_s, stats_t


@softmax_kl_forward.register_fake
def _softmax_kl_forward_fake(student, teacher, temperature):
    _check_inputs(student, teacher, temperature)
    acc_dtype = _acc_dtype(student, teacher)
    N = student.shape[0]
    return (student.new_empty((N,), dtype=acc_dtype), student.new_empty((N, 2), dtype=acc_dtype),
            student.new_empty((N, 2), dtype=acc_dtype))


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
    _check_inputs(student, teacher, temperature)
    _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    device = student.device
    grad_s = (torch.empty((N, V), dtype=student.dtype, device=device) if student_grad
              else torch.empty(0, dtype=student.dtype, device=device))
    grad_t = (torch.empty((N, V), dtype=teacher.dtype, device=device) if teacher_grad
              else torch.empty(0, dtype=teacher.dtype, device=device))
    if N == 0 or V == 0 or not (student_grad or teacher_grad):
        return grad_s, grad_t
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    stats_student = stats_student.contiguous()
    stats_teacher = stats_teacher.contiguous()
    loss = loss.contiguous()
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, acc_dtype, student)
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _softmax_kl_bwd_kernel[(N, triton.cdiv(V, block))](
            grad_loss, student, teacher, stats_student, stats_teacher, loss,
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            inv_t_ptr, inv_t_arg,
            V, grad_loss.stride(0), student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            STUDENT_GRAD=bool(student_grad),
            TEACHER_GRAD=bool(teacher_grad),
            num_warps=num_warps,
        )
    return grad_s, grad_t


@softmax_kl_backward.register_fake
def _softmax_kl_backward_fake(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature,
                              student_grad, teacher_grad):
    _check_inputs(student, teacher, temperature)
    _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss)
    N, V = student.shape
    grad_s = student.new_empty((N, V)) if student_grad else student.new_empty((0,))
    grad_t = teacher.new_empty((N, V)) if teacher_grad else teacher.new_empty((0,))
    return grad_s, grad_t


def _check_beta(beta: float) -> None:
    if not 0.0 < beta < 1.0:  # also rejects NaN
        raise ValueError(f"beta: expected a value in (0, 1), got {beta}")


def _jsd_params(temperature: float, beta: float, acc_dtype: torch.dtype, dummy: torch.Tensor):
    """(params_ptr, scalars): the JSD scalars in double precision, in the order of the _P_* slots; for fp64 also as an
    fp64 tensor, which the kernels read instead (see _inv_t_args)."""
    inv_t = 1.0 / temperature
    scalars = (inv_t, beta, 1.0 - beta, beta * inv_t, (1.0 - beta) * inv_t)
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
    _check_inputs(student, teacher, temperature)
    _check_beta(beta)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    loss = torch.empty(N, dtype=acc_dtype, device=student.device)
    stats_s = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    stats_t = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    mixture_kl = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    if N == 0:
        return loss, stats_s, stats_t, mixture_kl
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    params_ptr, (inv_t, beta_, one_m_beta, _, _) = _jsd_params(temperature, beta, acc_dtype, student)
    with _launch_guard(student):
        _softmax_jsd_fwd_kernel[(N,)](
            student, teacher, loss, stats_s, stats_t, mixture_kl, params_ptr,
            inv_t, beta_, one_m_beta,
            V, student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            num_warps=num_warps,
        )
    return loss, stats_s, stats_t, mixture_kl


@softmax_jsd_forward.register_fake
def _softmax_jsd_forward_fake(student, teacher, temperature, beta):
    _check_inputs(student, teacher, temperature)
    _check_beta(beta)
    acc_dtype = _acc_dtype(student, teacher)
    N = student.shape[0]
    return (student.new_empty((N,), dtype=acc_dtype), student.new_empty((N, 2), dtype=acc_dtype),
            student.new_empty((N, 2), dtype=acc_dtype), student.new_empty((N, 2), dtype=acc_dtype))


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
    _check_inputs(student, teacher, temperature)
    _check_beta(beta)
    _check_jsd_row_stats(student, grad_loss, stats_student, stats_teacher, mixture_kl)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    device = student.device
    grad_s = (torch.empty((N, V), dtype=student.dtype, device=device) if student_grad
              else torch.empty(0, dtype=student.dtype, device=device))
    grad_t = (torch.empty((N, V), dtype=teacher.dtype, device=device) if teacher_grad
              else torch.empty(0, dtype=teacher.dtype, device=device))
    if N == 0 or V == 0 or not (student_grad or teacher_grad):
        return grad_s, grad_t
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    stats_student = stats_student.contiguous()
    stats_teacher = stats_teacher.contiguous()
    mixture_kl = mixture_kl.contiguous()
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    params_ptr, (inv_t, beta_, one_m_beta, coef_t, coef_s) = _jsd_params(temperature, beta, acc_dtype, student)
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _softmax_jsd_bwd_kernel[(N, triton.cdiv(V, block))](
            grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl,
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            params_ptr, inv_t, beta_, one_m_beta, coef_t, coef_s,
            V, grad_loss.stride(0), student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            STUDENT_GRAD=bool(student_grad),
            TEACHER_GRAD=bool(teacher_grad),
            num_warps=num_warps,
        )
    return grad_s, grad_t


@softmax_jsd_backward.register_fake
def _softmax_jsd_backward_fake(grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature,
                               beta, student_grad, teacher_grad):
    _check_inputs(student, teacher, temperature)
    _check_beta(beta)
    _check_jsd_row_stats(student, grad_loss, stats_student, stats_teacher, mixture_kl)
    N, V = student.shape
    grad_s = student.new_empty((N, V)) if student_grad else student.new_empty((0,))
    grad_t = teacher.new_empty((N, V)) if teacher_grad else teacher.new_empty((0,))
    return grad_s, grad_t


def _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss) -> None:
    N = student.shape[0]
    _check_row_tensors(student, (("grad_loss", grad_loss, (N,)), ("stats_student", stats_student, (N, 2)),
                                 ("stats_teacher", stats_teacher, (N, 2)), ("loss", loss, (N,))))


def _check_jsd_row_stats(student, grad_loss, stats_student, stats_teacher, mixture_kl) -> None:
    N = student.shape[0]
    _check_row_tensors(student, (("grad_loss", grad_loss, (N,)), ("stats_student", stats_student, (N, 2)),
                                 ("stats_teacher", stats_teacher, (N, 2)), ("mixture_kl", mixture_kl, (N, 2))))


def _check_row_tensors(student, specs) -> None:
    for name, x, shape in specs:
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
        if x.device != student.device:
            raise ValueError(f"{name}: expected device {student.device} (the student's), got {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _launch_guard(x: torch.Tensor):
    """Context for a launch on x's device.

    CUDA: Triton launches on the current device (and its current stream), so make it x's device. Interpreter
    (TRITON_INTERPRET=1, numpy): the kernels form inf / NaN intermediates on purpose (exp overflow of a discarded
    factor, -inf - -inf in masked lanes) and discard them with tl.where; silence numpy's floating-point warnings.
    """
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if type(_softmax_kl_fwd_kernel).__name__ == "InterpretedFunction":
        import numpy

        return numpy.errstate(all="ignore")
    return contextlib.nullcontext()
