"""Triton backend of the ``pairwise`` op: batch-relation losses on Gram matrices (spec: kdkernels/reference/pairwise.py;
the C++ twin is csrc/pairwise/pairwise_host.h, whose glue this module mirrors step by step)::

    features [B, D] --preprocess--> P --> G = P P^T (fp32/fp64, no TF32, symmetrised) --Triton--> loss, dL/dG
    dL/dP = (dL/dG + dL/dG^T) P --preprocess backward--> dL/dfeatures

The Gram-level kernels (D2_ij = G_ii + G_jj - 2 G_ij, 0 when <= 64 eps (G_ii + G_jj): coincident points):

* rkd_distance: d = sqrt(max(D2, 1e-12)) off the diagonal, mu = sum d / (B^2 - B), L = mean huber(d_s/mu_s - d_t/mu_t);
  dL/dd_ij = (h_ij - sum(h d) / (mu (B^2 - B))) / mu with h = huber' / B^2 (negated for the teacher), then
  dL/dD2 = dL/dd / (2 d) where D2 > 1e-12. Three row launches: the sums of d, the loss and sum(h d), dG.
* rkd_angle: r_ab = 1 / sqrt(D2_ab) (0 when coincident), psi_abc = ((G_bc - G_ab) - (G_ac - G_aa)) r_ab r_ac,
  L = mean_{B^3} huber(psi_s - psi_t). With g = huber' / B^3 and W = g r_ab r_ac, a program per middle index b owns
  P[a, b] = sum_c W, T[a, b] = -r_ab^2 sum_c g psi (= dL/dD2_ab) and, in the same pass, Q[b, c] = sum_a W; then
  dG = Q - 2 P - 2 T + diag(rowsum P + rowsum T + colsum T) (only dG + dG^T is used, so P and T stay transposed).
* sp: Gn = G / max(|G_i.|, 1e-12) row-wise, L = sum (Gn_t - Gn_s)^2 / B^2, F.normalize's backward per row.
* pkt: S = (G + 1) / 2, P = S / rowsum(S), L = mean P_t log((P_t + eps) / (P_s + eps)), the row-stochastic backward.
* cc: K = sum_p c_p G^p (c_p = exp(-2 gamma) (2 gamma)^p / p!; bilinear: c = (0, 1)), L = mean (K_s - K_t)^2.

Each row kernel has one program per Gram row that owns that row of dG (load, add, store; no atomics). The loss is
summed from per-program partials by torch on the device (no host synchronisation).
"""

import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl

from kdkernels.triton._launch import _SUPPORTED_DTYPES, _acc_dtype, _launch_guard

__all__ = ["pairwise_forward"]

_COINCIDENT_ULPS = 64.0
_NORMALIZE_EPS = 1e-12  # F.normalize


# ------------------------------------------------------------------------------------------------------------------
# Gram-level building blocks
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _squared_distance(g_ii, g_jj, g_ij, coincident):
    """D2 = G_ii + G_jj - 2 G_ij, exactly 0 where it is rounding noise of the Gram formula."""
    norms = g_ii + g_jj
    d2 = norms - 2.0 * g_ij
    return tl.where(d2 <= coincident * norms, 0.0, d2)


@triton.jit
def _inverse_distance(g_ii, g_jj, g_ij, coincident):
    d2 = _squared_distance(g_ii, g_jj, g_ij, coincident)
    return tl.where(d2 > 0.0, 1.0 / tl.sqrt(tl.where(d2 > 0.0, d2, 1.0)), 0.0)


@triton.jit
def _huber(x):
    magnitude = tl.abs(x)
    return tl.where(magnitude < 1.0, 0.5 * x * x, magnitude - 0.5)


@triton.jit
def _huber_slope(x):
    return tl.minimum(tl.maximum(x, -1.0), 1.0)


@triton.jit
def _row(g_ptr, row, cols, mask, B, ACC: tl.constexpr):
    return tl.load(g_ptr + row * B + cols, mask=mask, other=0.0).to(ACC)


@triton.jit
def _diagonal(g_ptr, index, mask, B, ACC: tl.constexpr):
    return tl.load(g_ptr + index * (B + 1), mask=mask, other=0.0).to(ACC)


@triton.jit
def _add_to_row(dg_ptr, row, cols, mask, B, value):
    out = dg_ptr + row * B + cols
    tl.store(out, tl.load(out, mask=mask, other=0.0) + value, mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# RKD distance
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _distance_row(g_ptr, i, cols, mask, B, coincident, ACC: tl.constexpr):
    """(d_ij, live_ij) of row i: the clamped distance (0 on the diagonal and masked lanes) and where it has a
    gradient (D2 above the clamp)."""
    clamp = tl.full([], 1e-12, ACC)
    g_ii = tl.load(g_ptr + i * (B + 1)).to(ACC)
    d2 = _squared_distance(g_ii, _diagonal(g_ptr, cols, mask, B, ACC), _row(g_ptr, i, cols, mask, B, ACC), coincident)
    off_diagonal = mask & (cols != i)
    return tl.where(off_diagonal, tl.sqrt(tl.maximum(d2, clamp)), 0.0), off_diagonal & (d2 > clamp)


@triton.jit
def _rkd_distance_sums_kernel(gs_ptr, gt_ptr, sums_ptr, B, coincident, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sums[0, i] = sum_j d_s[i, j], sums[1, i] = sum_j d_t[i, j]."""
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    sum_s = tl.zeros([BLOCK], ACC)
    sum_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        d_s, _ = _distance_row(gs_ptr, i, cols, mask, B, coincident, ACC)
        d_t, _ = _distance_row(gt_ptr, i, cols, mask, B, coincident, ACC)
        sum_s += d_s
        sum_t += d_t
    tl.store(sums_ptr + i, tl.sum(sum_s, axis=0))
    tl.store(sums_ptr + B + i, tl.sum(sum_t, axis=0))


@triton.jit
def _normalized_difference(gs_ptr, gt_ptr, i, cols, mask, B, mu_s, mu_t, coincident, ACC: tl.constexpr):
    """(e = d_s / mu_s - d_t / mu_t, d_s, live_s, d_t, live_t) on a block of row i."""
    d_s, live_s = _distance_row(gs_ptr, i, cols, mask, B, coincident, ACC)
    d_t, live_t = _distance_row(gt_ptr, i, cols, mask, B, coincident, ACC)
    return d_s / mu_s - d_t / mu_t, d_s, live_s, d_t, live_t


@triton.jit
def _rkd_distance_loss_kernel(gs_ptr, gt_ptr, mu_ptr, partials_ptr, B, coincident, BLOCK: tl.constexpr,
                              ACC: tl.constexpr):
    """partials[:, i] = (sum_j huber(e_ij), sum_j huber'(e_ij) d_s[i, j], sum_j huber'(e_ij) d_t[i, j])."""
    i = tl.program_id(0)
    mu_s = tl.load(mu_ptr)
    mu_t = tl.load(mu_ptr + 1)
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], ACC)
    moment_s = tl.zeros([BLOCK], ACC)
    moment_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        e, d_s, _, d_t, _ = _normalized_difference(gs_ptr, gt_ptr, i, cols, mask, B, mu_s, mu_t, coincident, ACC)
        loss += _huber(e)
        slope = _huber_slope(e)
        moment_s += slope * d_s
        moment_t += slope * d_t
    tl.store(partials_ptr + i, tl.sum(loss, axis=0))
    tl.store(partials_ptr + B + i, tl.sum(moment_s, axis=0))
    tl.store(partials_ptr + 2 * B + i, tl.sum(moment_t, axis=0))


@triton.jit
def _distance_grad_row(dg_ptr, i, cols, mask, B, slope, d, live, moment, mu, sign, scale):
    """Adds dL/dG of one side to row i of dg off the diagonal; returns this block's share of the diagonal.
    dL/dd = sign (h - moment / (mu (B^2 - B))) / mu with h = scale huber', and dL/dD2 = dL/dd / (2 d)."""
    pairs = B * B - B
    grad_d = sign * scale * (slope - moment / (mu * pairs)) / mu
    grad_d2 = tl.where(live, grad_d * 0.5 / tl.where(live, d, 1.0), 0.0)
    _add_to_row(dg_ptr, i, cols, mask & (cols != i), B, -2.0 * grad_d2)
    return 2.0 * grad_d2


@triton.jit
def _rkd_distance_grad_kernel(gs_ptr, gt_ptr, dgs_ptr, dgt_ptr, mu_ptr, moments_ptr, consts_ptr, B, coincident,
                              BLOCK: tl.constexpr, ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr,
                              TEACHER_GRAD: tl.constexpr):
    """Row i of dL/dG (consts = (weight / B^2,)); the diagonal entry is written once, after the row."""
    i = tl.program_id(0)
    mu_s = tl.load(mu_ptr)
    mu_t = tl.load(mu_ptr + 1)
    moment_s = tl.load(moments_ptr)
    moment_t = tl.load(moments_ptr + 1)
    scale = tl.load(consts_ptr)
    offs = tl.arange(0, BLOCK)
    diagonal_s = tl.zeros([BLOCK], ACC)
    diagonal_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        e, d_s, live_s, d_t, live_t = _normalized_difference(gs_ptr, gt_ptr, i, cols, mask, B, mu_s, mu_t,
                                                             coincident, ACC)
        slope = _huber_slope(e)
        if STUDENT_GRAD:
            diagonal_s += _distance_grad_row(dgs_ptr, i, cols, mask, B, slope, d_s, live_s, moment_s, mu_s, 1.0,
                                             scale)
        if TEACHER_GRAD:
            diagonal_t += _distance_grad_row(dgt_ptr, i, cols, mask, B, slope, d_t, live_t, moment_t, mu_t, -1.0,
                                             scale)
    if STUDENT_GRAD:
        out = dgs_ptr + i * (B + 1)
        tl.store(out, tl.load(out) + tl.sum(diagonal_s, axis=0))
    if TEACHER_GRAD:
        out = dgt_ptr + i * (B + 1)
        tl.store(out, tl.load(out) + tl.sum(diagonal_t, axis=0))


# ------------------------------------------------------------------------------------------------------------------
# RKD angle
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _angle_tile(g_ptr, b, a, a_mask, c, c_mask, B, coincident, ACC: tl.constexpr):
    """(psi [a, c], r_ab [a], r_ac [a, c]) for the middle index b: psi_abc = ((G_bc - G_ab) - (G_ac - G_aa)) r_ab
    r_ac, 0 on masked lanes."""
    g_aa = _diagonal(g_ptr, a, a_mask, B, ACC)
    g_bb = tl.load(g_ptr + b * (B + 1)).to(ACC)
    g_ab = _row(g_ptr, b, a, a_mask, B, ACC)
    g_bc = _row(g_ptr, b, c, c_mask, B, ACC)
    g_cc = _diagonal(g_ptr, c, c_mask, B, ACC)
    tile_mask = a_mask[:, None] & c_mask[None, :]
    g_ac = tl.load(g_ptr + a[:, None] * B + c[None, :], mask=tile_mask, other=0.0).to(ACC)
    r_ab = tl.where(a_mask, _inverse_distance(g_aa, g_bb, g_ab, coincident), 0.0)
    r_ac = tl.where(tile_mask, _inverse_distance(g_aa[:, None], g_cc[None, :], g_ac, coincident), 0.0)
    psi = ((g_bc[None, :] - g_ab[:, None]) - (g_ac - g_aa[:, None])) * r_ab[:, None] * r_ac
    return psi, r_ab, r_ac


@triton.jit
def _rkd_angle_kernel(gs_ptr, gt_ptr, partials_ptr, ps_ptr, ts_ptr, qs_ptr, pt_ptr, tt_ptr, qt_ptr, consts_ptr, B,
                      coincident, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                      STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Program b, in one pass over its B^2 triples: partials[b] = sum_{a,c} huber(psi_s - psi_t); per side (row b of
    the transposed layout) P[b, a] = sum_c g r_ab r_ac and T[b, a] = -r_ab^2 sum_c g psi, and Q[b, c] =
    sum_a g r_ab r_ac accumulated into the zeroed row b (owned by this program), with g = scale huber'
    (consts = (scale,)), the teacher's g negated."""
    b = tl.program_id(0)
    scale = tl.load(consts_ptr)
    loss = tl.zeros([BLOCK_A], ACC)
    for a_start in range(0, B, BLOCK_A):
        a = a_start + tl.arange(0, BLOCK_A)
        a_mask = a < B
        weights_s = tl.zeros([BLOCK_A], ACC)
        moments_s = tl.zeros([BLOCK_A], ACC)
        weights_t = tl.zeros([BLOCK_A], ACC)
        moments_t = tl.zeros([BLOCK_A], ACC)
        for c_start in range(0, B, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < B
            psi_s, r_ab_s, r_ac_s = _angle_tile(gs_ptr, b, a, a_mask, c, c_mask, B, coincident, ACC)
            psi_t, r_ab_t, r_ac_t = _angle_tile(gt_ptr, b, a, a_mask, c, c_mask, B, coincident, ACC)
            difference = psi_s - psi_t
            loss += tl.sum(_huber(difference), axis=1)
            g = scale * _huber_slope(difference)
            if STUDENT_GRAD:
                weights_s += tl.sum(g * r_ac_s, axis=1) * r_ab_s
                moments_s += tl.sum(g * psi_s, axis=1)
                _add_to_row(qs_ptr, b, c, c_mask, B, tl.sum(g * r_ab_s[:, None] * r_ac_s, axis=0))
            if TEACHER_GRAD:
                weights_t -= tl.sum(g * r_ac_t, axis=1) * r_ab_t
                moments_t -= tl.sum(g * psi_t, axis=1)
                _add_to_row(qt_ptr, b, c, c_mask, B, -tl.sum(g * r_ab_t[:, None] * r_ac_t, axis=0))
        if STUDENT_GRAD:
            tl.store(ps_ptr + b * B + a, weights_s, mask=a_mask)
            tl.store(ts_ptr + b * B + a, -r_ab_s * r_ab_s * moments_s, mask=a_mask)
        if TEACHER_GRAD:
            tl.store(pt_ptr + b * B + a, weights_t, mask=a_mask)
            tl.store(tt_ptr + b * B + a, -r_ab_t * r_ab_t * moments_t, mask=a_mask)
    tl.store(partials_ptr + b, tl.sum(loss, axis=0))


# ------------------------------------------------------------------------------------------------------------------
# SP
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_norm(g_ptr, i, B, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        g = _row(g_ptr, i, cols, cols < B, B, ACC)
        squares += g * g
    return tl.sqrt(tl.sum(squares, axis=0))


@triton.jit
def _sp_normalized_rows(gs_ptr, gt_ptr, i, cols, mask, B, den_s, den_t, ACC: tl.constexpr):
    return _row(gs_ptr, i, cols, mask, B, ACC) / den_s, _row(gt_ptr, i, cols, mask, B, ACC) / den_t


@triton.jit
def _normalize_backward_row(dg_ptr, i, cols, mask, B, upstream, y, dot, norm, den, eps):
    """F.normalize's backward: (U - y (y.U)) / n where the norm is above eps, else U / eps."""
    _add_to_row(dg_ptr, i, cols, mask, B, (upstream - tl.where(norm > eps, y * dot, 0.0)) / den)


@triton.jit
def _sp_kernel(gs_ptr, gt_ptr, dgs_ptr, dgt_ptr, partials_ptr, consts_ptr, B, BLOCK: tl.constexpr, ACC: tl.constexpr,
               STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Row i: partials[i] = sum_j (Gn_t - Gn_s)^2 and the rows of dL/dG; consts = (weight / B^2, 1e-12)."""
    i = tl.program_id(0)
    scale = tl.load(consts_ptr)
    eps = tl.load(consts_ptr + 1)
    norm_s = _row_norm(gs_ptr, i, B, BLOCK, ACC)
    norm_t = _row_norm(gt_ptr, i, B, BLOCK, ACC)
    den_s = tl.maximum(norm_s, eps)
    den_t = tl.maximum(norm_t, eps)
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], ACC)
    dot_s = tl.zeros([BLOCK], ACC)
    dot_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        y_s, y_t = _sp_normalized_rows(gs_ptr, gt_ptr, i, cols, cols < B, B, den_s, den_t, ACC)
        difference = y_t - y_s
        loss += difference * difference
        dot_s -= 2.0 * scale * difference * y_s
        dot_t += 2.0 * scale * difference * y_t
    tl.store(partials_ptr + i, tl.sum(loss, axis=0))
    if STUDENT_GRAD or TEACHER_GRAD:
        total_s = tl.sum(dot_s, axis=0)
        total_t = tl.sum(dot_t, axis=0)
        for start in range(0, B, BLOCK):
            cols = start + offs
            mask = cols < B
            y_s, y_t = _sp_normalized_rows(gs_ptr, gt_ptr, i, cols, mask, B, den_s, den_t, ACC)
            upstream = 2.0 * scale * (y_t - y_s)
            if STUDENT_GRAD:
                _normalize_backward_row(dgs_ptr, i, cols, mask, B, -upstream, y_s, total_s, norm_s, den_s, eps)
            if TEACHER_GRAD:
                _normalize_backward_row(dgt_ptr, i, cols, mask, B, upstream, y_t, total_t, norm_t, den_t, eps)


# ------------------------------------------------------------------------------------------------------------------
# PKT
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _similarity_row_sum(g_ptr, i, B, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        total += tl.where(mask, (_row(g_ptr, i, cols, mask, B, ACC) + 1.0) * 0.5, 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _pkt_terms(gs_ptr, gt_ptr, i, cols, mask, B, sum_s, sum_t, eps, scale, ACC: tl.constexpr):
    """(P_s, P_t, loss term, dL/dP_s, dL/dP_t) on a block of row i; masked lanes give zeros."""
    p_s = tl.where(mask, (_row(gs_ptr, i, cols, mask, B, ACC) + 1.0) * 0.5 / sum_s, 0.0)
    p_t = tl.where(mask, (_row(gt_ptr, i, cols, mask, B, ACC) + 1.0) * 0.5 / sum_t, 0.0)
    log_ratio = tl.log((p_t + eps) / (p_s + eps))
    grad_s = -scale * p_t / (p_s + eps)
    grad_t = scale * (log_ratio + p_t / (p_t + eps))
    return p_s, p_t, p_t * log_ratio, tl.where(mask, grad_s, 0.0), tl.where(mask, grad_t, 0.0)


@triton.jit
def _pkt_kernel(gs_ptr, gt_ptr, dgs_ptr, dgt_ptr, partials_ptr, consts_ptr, B, BLOCK: tl.constexpr,
                ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Row i: partials[i] = sum_j P_t log((P_t + eps) / (P_s + eps)) and the rows of dL/dG, through
    dS_ij = (dP_ij - sum_k dP_ik P_ik) / rowsum(S) and dG = dS / 2; consts = (weight / B^2, eps)."""
    i = tl.program_id(0)
    scale = tl.load(consts_ptr)
    eps = tl.load(consts_ptr + 1)
    sum_s = _similarity_row_sum(gs_ptr, i, B, BLOCK, ACC)
    sum_t = _similarity_row_sum(gt_ptr, i, B, BLOCK, ACC)
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], ACC)
    dot_s = tl.zeros([BLOCK], ACC)
    dot_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        p_s, p_t, term, grad_s, grad_t = _pkt_terms(gs_ptr, gt_ptr, i, cols, cols < B, B, sum_s, sum_t, eps, scale,
                                                    ACC)
        loss += tl.where(cols < B, term, 0.0)
        dot_s += grad_s * p_s
        dot_t += grad_t * p_t
    tl.store(partials_ptr + i, tl.sum(loss, axis=0))
    if STUDENT_GRAD or TEACHER_GRAD:
        total_s = tl.sum(dot_s, axis=0)
        total_t = tl.sum(dot_t, axis=0)
        for start in range(0, B, BLOCK):
            cols = start + offs
            mask = cols < B
            _, _, _, grad_s, grad_t = _pkt_terms(gs_ptr, gt_ptr, i, cols, mask, B, sum_s, sum_t, eps, scale, ACC)
            if STUDENT_GRAD:
                _add_to_row(dgs_ptr, i, cols, mask, B, 0.5 * (grad_s - total_s) / sum_s)
            if TEACHER_GRAD:
                _add_to_row(dgt_ptr, i, cols, mask, B, 0.5 * (grad_t - total_t) / sum_t)


# ------------------------------------------------------------------------------------------------------------------
# CC
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _polynomial(coefficients_ptr, degree, x):
    """sum_{p <= degree} c_p x^p by Horner's rule (c_0 alone for degree 0)."""
    value = tl.zeros_like(x) + tl.load(coefficients_ptr + degree)
    for k in range(1, degree + 1):
        value = value * x + tl.load(coefficients_ptr + degree - k)
    return value


@triton.jit
def _cc_kernel(gs_ptr, gt_ptr, dgs_ptr, dgt_ptr, partials_ptr, kernel_ptr, slope_ptr, order, consts_ptr, B,
               BLOCK: tl.constexpr, ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Row i: partials[i] = sum_j (K_s - K_t)^2 and the rows of dL/dG = 2 scale (K_s - K_t) K'(G) (teacher negated),
    with K and K' polynomials of degree order and order - 1 (coefficients kernel_ptr, slope_ptr); consts =
    (weight / B^2,)."""
    i = tl.program_id(0)
    scale = tl.load(consts_ptr)
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        g_s = _row(gs_ptr, i, cols, mask, B, ACC)
        g_t = _row(gt_ptr, i, cols, mask, B, ACC)
        difference = tl.where(mask, _polynomial(kernel_ptr, order, g_s) - _polynomial(kernel_ptr, order, g_t), 0.0)
        loss += difference * difference
        if order > 0:
            if STUDENT_GRAD:
                _add_to_row(dgs_ptr, i, cols, mask, B, 2.0 * scale * difference * _polynomial(slope_ptr, order - 1,
                                                                                               g_s))
            if TEACHER_GRAD:
                _add_to_row(dgt_ptr, i, cols, mask, B, -2.0 * scale * difference * _polynomial(slope_ptr, order - 1,
                                                                                                g_t))
    tl.store(partials_ptr + i, tl.sum(loss, axis=0))


# ------------------------------------------------------------------------------------------------------------------
# Host glue (mirrors csrc/pairwise/pairwise_host.h)
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GramTerm:
    """One loss term on the Gram matrices: loss += weight * L(G_s, G_t), dG += weight * dL/dG."""

    relation: str
    weight: float = 1.0
    eps: float = 1e-7  # pkt
    gamma: float = 0.4  # cc
    order: int = 2  # cc
    bilinear: bool = False  # cc


def _parse_terms(relation: str, params) -> list:
    params = [float(p) for p in params]

    def expect(count: int) -> None:
        if len(params) != count:
            raise ValueError(f"pairwise: relation '{relation}' takes {count} parameters, got {len(params)}")

    if relation in ("rkd_distance", "rkd_angle", "sp"):
        expect(0)
        return [_GramTerm(relation)]
    if relation == "rkd":  # (distance_weight, angle_weight): both terms from one pair of Grams
        expect(2)
        return [_GramTerm("rkd_distance", weight=params[0]), _GramTerm("rkd_angle", weight=params[1])]
    if relation == "pkt":
        expect(1)
        if not (params[0] > 0 and math.isfinite(params[0])):
            raise ValueError(f"pairwise: pkt eps must be positive, got {params[0]}")
        return [_GramTerm("pkt", eps=params[0])]
    if relation == "cc":
        expect(3)
        gamma, order, bilinear = params
        if not math.isfinite(gamma):
            raise ValueError(f"pairwise: cc gamma must be finite, got {gamma}")
        if not (0 <= order <= 64 and order == math.floor(order)):
            raise ValueError(f"pairwise: cc order must be an integer in [0, 64], got {order}")
        return [_GramTerm("cc", gamma=gamma, order=int(order), bilinear=bilinear != 0.0)]
    raise ValueError(f"pairwise: unknown relation '{relation}'; expected rkd_distance, rkd_angle, rkd, sp, pkt or cc")


def _check_features(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"pairwise: expected 2-D features [B, D], got student {list(student.shape)} and teacher "
                         f"{list(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"pairwise: student has {student.shape[0]} samples but teacher has {teacher.shape[0]}")
    if student.shape[0] < 2:
        raise ValueError(f"pairwise: a batch relation needs at least 2 samples, got {student.shape[0]}")
    if student.shape[1] < 1 or teacher.shape[1] < 1:
        raise ValueError(f"pairwise: features need at least one column, got {list(student.shape)} and "
                         f"{list(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"pairwise: teacher is on {teacher.device} but student is on {student.device}")
    for x in (student, teacher):
        if x.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"pairwise: features must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise ValueError(f"pairwise: float64 features must be paired with float64, got student {student.dtype} and "
                         f"teacher {teacher.dtype}")


@dataclasses.dataclass
class _Prepared:
    """Preprocessed features P in the accumulation dtype, the raw row norms (unit preprocessings) and the
    denominators they were divided by."""

    features: torch.Tensor
    norms: torch.Tensor | None = None
    denominators: torch.Tensor | None = None


def _preprocess_of(relation: str) -> str:
    return {"rkd_distance": "centre", "rkd_angle": "centre", "sp": "none", "pkt": "unit_plus_eps",
            "cc": "unit_clamped"}[relation]


def _prepare(features: torch.Tensor, preprocess: str, eps: float) -> _Prepared:
    x = features.to(_acc_dtype(features, features))
    if preprocess == "centre":
        return _Prepared(x - x.mean(0, keepdim=True))
    if preprocess == "none":
        return _Prepared(x.contiguous())
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denominators = norms + eps if preprocess == "unit_plus_eps" else norms.clamp_min(eps)
    return _Prepared((x / denominators).contiguous(), norms, denominators)


def _preprocess_backward(grad: torch.Tensor, prepared: _Prepared, preprocess: str, eps: float) -> torch.Tensor:
    """dL/dx from dL/dP. Centre: minus the batch mean. x / n': (dP - P (P.dP) n' / |x|) / n' where the norm is
    differentiable (|x| > 0, and |x| > eps when clamped), else dP / n' (torch's norm backward is 0 at 0)."""
    if preprocess == "centre":
        return grad - grad.mean(0, keepdim=True)
    if preprocess == "none":
        return grad
    unit, norms, denominators = prepared.features, prepared.norms, prepared.denominators
    differentiable = norms > 0 if preprocess == "unit_plus_eps" else norms > eps
    radial = (unit * grad).sum(1, keepdim=True) * denominators / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    return (grad - unit * radial * differentiable) / denominators


@contextlib.contextmanager
def _without_tf32():
    """Full-precision fp32 GEMMs: a TF32 Gram loses the distances."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _symmetric_gram(prepared: torch.Tensor) -> torch.Tensor:
    with _without_tf32():
        gram = torch.mm(prepared, prepared.t())
    return ((gram + gram.t()) * 0.5).contiguous()


@dataclasses.dataclass
class _GramProblem:
    """Grams [B, B] (contiguous, symmetric, accumulation dtype); the dgram buffers are None when not requested.
    Kernels add their weighted term to dgram; the loss terms are collected and summed at the end."""

    gram_student: torch.Tensor
    gram_teacher: torch.Tensor
    dgram_student: torch.Tensor | None
    dgram_teacher: torch.Tensor | None
    loss_terms: list

    @property
    def batch(self) -> int:
        return self.gram_student.shape[0]

    @property
    def coincident(self) -> float:
        return _COINCIDENT_ULPS * torch.finfo(self.gram_student.dtype).eps

    def new(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.gram_student.dtype, device=self.gram_student.device)

    def constants(self, *values: float) -> torch.Tensor:
        """Kernel constants in the accumulation dtype (a Triton float argument would be fp32)."""
        return torch.tensor(values, dtype=self.gram_student.dtype, device=self.gram_student.device)

    def launch_flags(self) -> dict:
        f64 = self.gram_student.dtype == torch.float64
        return {"ACC": tl.float64 if f64 else tl.float32, "STUDENT_GRAD": self.dgram_student is not None,
                "TEACHER_GRAD": self.dgram_teacher is not None}

    def grad_buffers(self) -> tuple:
        """The dgram pointers to pass (a Gram stands in for one not requested: it is never written)."""
        return (self.gram_student if self.dgram_student is None else self.dgram_student,
                self.gram_teacher if self.dgram_teacher is None else self.dgram_teacher)


def _row_block(batch: int) -> int:
    """Columns per step of a row kernel (a power of two, 16 to 1024). Not tuned on a GPU yet."""
    return min(max(triton.next_power_of_2(batch), 16), 1024)


def _angle_blocks(batch: int, device: torch.device) -> tuple:
    """(BLOCK_A, BLOCK_C) of the angle tiles: at most 32 x 64 on a GPU (not tuned yet). The interpreter (CPU tensors)
    pays per tile operation, not per element: up to 128 x 128 there, a single tile per program for B <= 128."""
    block = max(triton.next_power_of_2(batch), 16)
    if device.type != "cuda":
        return min(block, 128), min(block, 128)
    return min(block, 32), min(block, 64)


def _rkd_distance(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    gs, gt = problem.gram_student, problem.gram_teacher
    grid, block, flags = (B,), _row_block(B), problem.launch_flags()
    sums = problem.new(2, B)
    _rkd_distance_sums_kernel[grid](gs, gt, sums, B, problem.coincident, BLOCK=block, ACC=flags["ACC"])
    mu = (sums.sum(1) / (B * B - B)).contiguous()
    partials = problem.new(3, B)
    _rkd_distance_loss_kernel[grid](gs, gt, mu, partials, B, problem.coincident, BLOCK=block, ACC=flags["ACC"])
    problem.loss_terms.append(partials[0].sum() * (term.weight / (B * B)))
    if flags["STUDENT_GRAD"] or flags["TEACHER_GRAD"]:
        moments = partials[1:].sum(1).contiguous()
        _rkd_distance_grad_kernel[grid](gs, gt, *problem.grad_buffers(), mu, moments,
                                        problem.constants(term.weight / (B * B)), B, problem.coincident,
                                        BLOCK=block, **flags)


def _angle_gram_gradient(q: torch.Tensor, p_transposed: torch.Tensor, t_transposed: torch.Tensor) -> torch.Tensor:
    """dG = Q - 2 P - 2 T + diag(rowsum P + rowsum T + colsum T), with P and T given transposed (only dG + dG^T is
    used, so the transposed off-diagonal parts serve as well)."""
    diagonal = p_transposed.sum(0) + t_transposed.sum(0) + t_transposed.sum(1)
    return (q - 2.0 * (p_transposed + t_transposed)) + torch.diag(diagonal)


def _rkd_angle(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    gs, gt = problem.gram_student, problem.gram_teacher
    block_a, block_c = _angle_blocks(B, gs.device)
    flags = problem.launch_flags()
    consts = problem.constants(term.weight / B ** 3)
    needed = [side for side, flag in (("student", "STUDENT_GRAD"), ("teacher", "TEACHER_GRAD")) if flags[flag]]
    # P^T, T^T, and Q (accumulated by the kernel: zeroed)
    buffers = {side: (problem.new(B, B), problem.new(B, B), torch.zeros_like(gs)) for side in needed}
    placeholder = (gs, gs, gs)
    p_s, t_s, q_s = buffers.get("student", placeholder)
    p_t, t_t, q_t = buffers.get("teacher", placeholder)
    partials = problem.new(B)
    _rkd_angle_kernel[(B,)](gs, gt, partials, p_s, t_s, q_s, p_t, t_t, q_t, consts, B, problem.coincident,
                            BLOCK_A=block_a, BLOCK_C=block_c, **flags)
    problem.loss_terms.append(partials.sum() * (term.weight / B ** 3))
    if "student" in buffers:
        problem.dgram_student += _angle_gram_gradient(q_s, p_s, t_s)
    if "teacher" in buffers:
        problem.dgram_teacher += _angle_gram_gradient(q_t, p_t, t_t)


def _row_kernel_launch(kernel, problem: _GramProblem, *args) -> None:
    """A kernel with one program per Gram row: (gs, gt, dgs, dgt, partials, *args, B)."""
    B = problem.batch
    partials = problem.new(B)
    kernel[(B,)](problem.gram_student, problem.gram_teacher, *problem.grad_buffers(), partials, *args, B,
                 BLOCK=_row_block(B), **problem.launch_flags())
    return partials


def _sp(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    partials = _row_kernel_launch(_sp_kernel, problem, problem.constants(term.weight / (B * B), _NORMALIZE_EPS))
    problem.loss_terms.append(partials.sum() * (term.weight / (B * B)))


def _pkt(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    partials = _row_kernel_launch(_pkt_kernel, problem, problem.constants(term.weight / (B * B), term.eps))
    problem.loss_terms.append(partials.sum() * (term.weight / (B * B)))


def _cc_coefficients(term: _GramTerm) -> list:
    """K's polynomial coefficients c_0..c_order (bilinear: K = G, i.e. (0, 1))."""
    if term.bilinear:
        return [0.0, 1.0]
    return [math.exp(-2 * term.gamma) * (2 * term.gamma) ** p / math.factorial(p) for p in range(term.order + 1)]


def _cc(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    coefficients = _cc_coefficients(term)
    order = len(coefficients) - 1
    slopes = [p * c for p, c in enumerate(coefficients)][1:] or [0.0]
    partials = _row_kernel_launch(_cc_kernel, problem, problem.constants(*coefficients), problem.constants(*slopes),
                                  order, problem.constants(term.weight / (B * B)))
    problem.loss_terms.append(partials.sum() * (term.weight / (B * B)))


_GRAM_KERNELS = {"rkd_distance": _rkd_distance, "rkd_angle": _rkd_angle, "sp": _sp, "pkt": _pkt, "cc": _cc}


def _unit_eps(preprocess: str, term: _GramTerm) -> float:
    return term.eps if preprocess == "unit_plus_eps" else _NORMALIZE_EPS


def _empty_gradient(features: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=features.dtype, device=features.device)


@torch.library.custom_op("kdkernels::triton_pairwise_forward", mutates_args=())
def pairwise_forward(student: torch.Tensor, teacher: torch.Tensor, relation: str, params: list[float],
                     student_grad: bool, teacher_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton pairwise op: (loss [] in the accumulation dtype, grad_student, grad_teacher), the gradients of the loss
    (unit upstream) in the features' dtypes and shapes, or empty [0] tensors when not requested."""
    _check_features(student, teacher)
    terms = _parse_terms(relation, params)
    preprocess = _preprocess_of(terms[0].relation)
    eps = _unit_eps(preprocess, terms[0])
    prepared_student, prepared_teacher = _prepare(student, preprocess, eps), _prepare(teacher, preprocess, eps)
    with _launch_guard(student):
        gram_student = _symmetric_gram(prepared_student.features)
        gram_teacher = _symmetric_gram(prepared_teacher.features)
        problem = _GramProblem(gram_student, gram_teacher,
                               torch.zeros_like(gram_student) if student_grad else None,
                               torch.zeros_like(gram_teacher) if teacher_grad else None, [])
        for term in terms:
            _GRAM_KERNELS[term.relation](term, problem)
    loss = torch.stack(problem.loss_terms).sum()

    def feature_grad(dgram: torch.Tensor, prepared: _Prepared, features: torch.Tensor) -> torch.Tensor:
        with _without_tf32():
            grad_prepared = torch.mm(dgram + dgram.t(), prepared.features)
        return _preprocess_backward(grad_prepared, prepared, preprocess, eps).to(features.dtype).contiguous()

    grad_student = feature_grad(problem.dgram_student, prepared_student, student) if student_grad \
        else _empty_gradient(student)
    grad_teacher = feature_grad(problem.dgram_teacher, prepared_teacher, teacher) if teacher_grad \
        else _empty_gradient(teacher)
    return loss, grad_student, grad_teacher


@pairwise_forward.register_fake
def _pairwise_forward_fake(student, teacher, relation, params, student_grad, teacher_grad):
    _check_features(student, teacher)
    _parse_terms(relation, params)
    loss = student.new_empty((), dtype=_acc_dtype(student, teacher))
    grad_student = torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad \
        else _empty_gradient(student)
    grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad \
        else _empty_gradient(teacher)
    return loss, grad_student, grad_teacher
