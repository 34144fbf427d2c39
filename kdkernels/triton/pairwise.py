"""Triton backend of the ``pairwise`` op: batch-relation losses on Gram matrices (spec: kdkernels/reference/pairwise.py;
the C++ twin is csrc/pairwise/pairwise_host.h, whose glue and numerics this module mirrors step by step)::

    features [B, D] --preprocess--> P --> G = P P^T (no TF32, symmetrised) --Triton--> loss, dL/dG
    dL/dP = (dL/dG + dL/dG^T) P --preprocess backward--> dL/dfeatures

Preprocessing is computed in float64 and rounded once. RKD centres the batch in float64 and takes its float64 Gram,
from which the kernels get the squared distances D2 (0 on the diagonal and where D2 <= 64 eps64 (G_ii + G_jj):
coincident points) and, for the angle, G as fixed-point hi/lo pairs (see _rkd_gram); they return dL/dG off the
diagonal only, and the host completes it so that its rows sum to zero (_invariant_symmetrize). The Gram-level
kernels:

* rkd_distance (float64 arithmetic): d = sqrt(max(D2, 1e-12)) off the diagonal, mu = sum d / (B^2 - B),
  L = mean huber(d_s/mu_s - d_t/mu_t); dL/dd_ij = (h_ij - sum(h d) / (mu (B^2 - B))) / mu with h = huber' / B^2
  (negated for the teacher), then dL/dG_ij = -2 dL/dD2_ij = -dL/dd_ij / d_ij where D2 >= 1e-12. Three row
  launches: the sums of d, the loss and sum(h d), dG.
* rkd_angle: r_ab = 1 / sqrt(D2_ab) (0 when coincident), psi_abc = N_abc r_ab r_ac with
  N_abc = ((hi_bc - hi_ba) - (hi_ac - hi_aa)) + (the same of lo) from rows b and a (the hi differences exact),
  L = mean_{B^3} huber(psi_s - psi_t). With g = huber' / B^3 and M = g r_ab r_ac, a program per middle index b owns
  P[a, b] = sum_c M, T[a, b] = -r_ab^2 sum_c g psi and, in the same pass, Q[b, c] = sum_a M; W = P + T is dL/dD2
  (both roles of D2_ab in psi), -Q/2 that of D2_bc, so dG = Q - 2 W off the diagonal (P and T stay transposed:
  only dG + dG^T is used).
* sp: Gn = G / max(|G_i.|, 1e-12) row-wise, L = sum (Gn_t - Gn_s)^2 / B^2, F.normalize's backward per row.
* pkt (float64 arithmetic): S = (G + 1) / 2, P = S / rowsum(S), L = mean P_t log((P_t + eps) / (P_s + eps)), the
  row-stochastic backward.
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

from kdkernels.ops._checks import check_pairwise_forward
from kdkernels.triton._launch import _acc_dtype, _launch_guard

__all__ = ["pairwise_forward"]

_COINCIDENT_ULPS = 64.0
_NORMALIZE_EPS = 1e-12  # F.normalize


# ------------------------------------------------------------------------------------------------------------------
# Gram-level building blocks
# ------------------------------------------------------------------------------------------------------------------


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
# RKD distance (ACC = float64: the loss sums smooth-L1 terms of both signs, which one rounded 1 / mu would scale)
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _distance_row(d2_ptr, i, cols, mask, B, ACC: tl.constexpr):
    """(d_ij, live_ij) of row i: the clamped distance (0 on the diagonal and masked lanes) and where it has a
    gradient (D2 at or above the clamp)."""
    clamp = tl.full([], 1e-12, ACC)
    d2 = _row(d2_ptr, i, cols, mask, B, ACC)
    off_diagonal = mask & (cols != i)
    return tl.where(off_diagonal, tl.sqrt(tl.maximum(d2, clamp)), 0.0), off_diagonal & (d2 >= clamp)


@triton.jit
def _rkd_distance_sums_kernel(ds_ptr, dt_ptr, sums_ptr, B, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sums[0, i] = sum_j d_s[i, j], sums[1, i] = sum_j d_t[i, j]."""
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    sum_s = tl.zeros([BLOCK], ACC)
    sum_t = tl.zeros([BLOCK], ACC)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        d_s, _ = _distance_row(ds_ptr, i, cols, mask, B, ACC)
        d_t, _ = _distance_row(dt_ptr, i, cols, mask, B, ACC)
        sum_s += d_s
        sum_t += d_t
    tl.store(sums_ptr + i, tl.sum(sum_s, axis=0))
    tl.store(sums_ptr + B + i, tl.sum(sum_t, axis=0))


@triton.jit
def _normalized_difference(ds_ptr, dt_ptr, i, cols, mask, B, mu_s, mu_t, ACC: tl.constexpr):
    """(e = d_s / mu_s - d_t / mu_t, d_s, live_s, d_t, live_t) on a block of row i."""
    d_s, live_s = _distance_row(ds_ptr, i, cols, mask, B, ACC)
    d_t, live_t = _distance_row(dt_ptr, i, cols, mask, B, ACC)
    return d_s / mu_s - d_t / mu_t, d_s, live_s, d_t, live_t


@triton.jit
def _rkd_distance_loss_kernel(ds_ptr, dt_ptr, mu_ptr, partials_ptr, B, BLOCK: tl.constexpr, ACC: tl.constexpr):
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
        e, d_s, _, d_t, _ = _normalized_difference(ds_ptr, dt_ptr, i, cols, mask, B, mu_s, mu_t, ACC)
        loss += _huber(e)
        slope = _huber_slope(e)
        moment_s += slope * d_s
        moment_t += slope * d_t
    tl.store(partials_ptr + i, tl.sum(loss, axis=0))
    tl.store(partials_ptr + B + i, tl.sum(moment_s, axis=0))
    tl.store(partials_ptr + 2 * B + i, tl.sum(moment_t, axis=0))


@triton.jit
def _distance_grad_row(dg_ptr, i, cols, mask, B, slope, d, live, moment, mu, sign, scale):
    """Adds dL/dG of one side to row i of dg off the diagonal: dL/dd = sign (h - moment / (mu (B^2 - B))) / mu with
    h = scale huber', and dL/dG = -2 dL/dD2 = -dL/dd / d."""
    pairs = B * B - B
    grad_d = sign * scale * (slope - moment / (mu * pairs)) / mu
    _add_to_row(dg_ptr, i, cols, mask & (cols != i), B, tl.where(live, -grad_d / tl.where(live, d, 1.0), 0.0))


@triton.jit
def _rkd_distance_grad_kernel(ds_ptr, dt_ptr, dgs_ptr, dgt_ptr, mu_ptr, moments_ptr, consts_ptr, B,
                              BLOCK: tl.constexpr, ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr,
                              TEACHER_GRAD: tl.constexpr):
    """Row i of dL/dG off the diagonal (consts = (weight / B^2,))."""
    i = tl.program_id(0)
    mu_s = tl.load(mu_ptr)
    mu_t = tl.load(mu_ptr + 1)
    moment_s = tl.load(moments_ptr)
    moment_t = tl.load(moments_ptr + 1)
    scale = tl.load(consts_ptr)
    offs = tl.arange(0, BLOCK)
    for start in range(0, B, BLOCK):
        cols = start + offs
        mask = cols < B
        e, d_s, live_s, d_t, live_t = _normalized_difference(ds_ptr, dt_ptr, i, cols, mask, B, mu_s, mu_t, ACC)
        slope = _huber_slope(e)
        if STUDENT_GRAD:
            _distance_grad_row(dgs_ptr, i, cols, mask, B, slope, d_s, live_s, moment_s, mu_s, 1.0, scale)
        if TEACHER_GRAD:
            _distance_grad_row(dgt_ptr, i, cols, mask, B, slope, d_t, live_t, moment_t, mu_t, -1.0, scale)


# ------------------------------------------------------------------------------------------------------------------
# RKD angle
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _hilo(g_ptr, row, cols, mask, B):
    """(hi, lo) of G[row, cols] from the [B, 2B] hi/lo Gram."""
    return (tl.load(g_ptr + row * (2 * B) + cols, mask=mask, other=0.0),
            tl.load(g_ptr + row * (2 * B) + B + cols, mask=mask, other=0.0))


@triton.jit
def _angle_tile(g_ptr, r_ptr, b, a, a_mask, c, c_mask, B):
    """(psi [a, c], r_ab [a], r_ac [a, c]) for the middle index b, 0 on masked lanes: psi_abc = N_abc r_ab r_ac with
    N_abc = ((hi_bc - hi_ba) - (hi_ac - hi_aa)) + (the same of lo), rows b and a of the hi/lo Gram."""
    tile_mask = a_mask[:, None] & c_mask[None, :]
    hi_aa, lo_aa = _hilo(g_ptr, a, a, a_mask, B)
    hi_ba, lo_ba = _hilo(g_ptr, b, a, a_mask, B)
    hi_bc, lo_bc = _hilo(g_ptr, b, c, c_mask, B)
    hi_ac, lo_ac = _hilo(g_ptr, a[:, None], c[None, :], tile_mask, B)
    high = (hi_bc[None, :] - hi_ba[:, None]) - (hi_ac - hi_aa[:, None])
    numerator = high + ((lo_bc[None, :] - lo_ba[:, None]) - (lo_ac - lo_aa[:, None]))
    r_ab = tl.load(r_ptr + b * B + a, mask=a_mask, other=0.0)
    r_ac = tl.load(r_ptr + a[:, None] * B + c[None, :], mask=tile_mask, other=0.0)
    return numerator * r_ab[:, None] * r_ac, r_ab, r_ac


@triton.jit
def _rkd_angle_kernel(gs_ptr, gt_ptr, rs_ptr, rt_ptr, partials_ptr, ps_ptr, ts_ptr, qs_ptr, pt_ptr, tt_ptr, qt_ptr,
                      consts_ptr, B, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                      STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Program b, in one pass over its B^2 triples: partials[b] = sum_{a,c} huber(psi_s - psi_t) (float64); per side
    (row b of the transposed layout) P[b, a] = sum_c g r_ab r_ac and T[b, a] = -r_ab^2 sum_c g psi, and Q[b, c] =
    sum_a g r_ab r_ac accumulated into the zeroed row b (owned by this program), with g = scale huber'
    (consts = (scale,)), the teacher's g negated."""
    b = tl.program_id(0)
    scale = tl.load(consts_ptr)
    loss = tl.zeros([BLOCK_A], tl.float64)  # tile sums (BLOCK_C terms) added in float64
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
            psi_s, r_ab_s, r_ac_s = _angle_tile(gs_ptr, rs_ptr, b, a, a_mask, c, c_mask, B)
            psi_t, r_ab_t, r_ac_t = _angle_tile(gt_ptr, rt_ptr, b, a, a_mask, c, c_mask, B)
            difference = psi_s - psi_t
            loss += tl.sum(_huber(difference), axis=1).to(tl.float64)
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


@dataclasses.dataclass
class _Prepared:
    """Preprocessed features P (float64 for RKD, else in the accumulation dtype), and for the unit preprocessings
    the float64 row norms and the denominators they were divided by."""

    features: torch.Tensor
    norms: torch.Tensor | None = None
    denominators: torch.Tensor | None = None


def _preprocess_of(relation: str) -> str:
    return {"rkd_distance": "centre", "rkd_angle": "centre", "sp": "none", "pkt": "unit_plus_eps",
            "cc": "unit_clamped"}[relation]


def _prepare(features: torch.Tensor, preprocess: str, eps: float) -> _Prepared:
    """P, computed in float64 and rounded once (a row scale rounded alone would shift a whole row of PKT's terms)."""
    acc = _acc_dtype(features, features)
    if preprocess == "none":
        return _Prepared(features.to(acc).contiguous())
    x = features.to(torch.float64)
    if preprocess == "centre":
        return _Prepared((x - x.mean(0, keepdim=True)).contiguous())
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denominators = norms + eps if preprocess == "unit_plus_eps" else norms.clamp_min(eps)
    return _Prepared((x / denominators).to(acc).contiguous(), norms, denominators)


def _preprocess_backward(grad: torch.Tensor, prepared: _Prepared, preprocess: str, eps: float) -> torch.Tensor:
    """dL/dx from dL/dP, in float64. x / n': (dP - P (P.dP) n' / |x|) / n' where the norm is differentiable
    (|x| > 0, and |x| > eps when clamped), else dP / n' (torch's norm backward is 0 at 0)."""
    if preprocess == "none":
        return grad
    unit, norms, denominators = prepared.features.double(), prepared.norms, prepared.denominators
    grad = grad.double()
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


def _rkd_gram(prepared: torch.Tensor, acc: torch.dtype, split: bool) -> tuple:
    """RKD's Gram inputs from the float64 centred P (pairwise_host.h): (the fixed-point hi/lo Gram [B, 2B] when
    `split`, else None; D2 [B, B]), in acc. D2 = G_ii + G_jj - 2 G_ij of the float64 Gram, 0 on the diagonal and at
    or below 64 eps64 (G_ii + G_jj). Row i's hi is a multiple of q_i = 2^(e_i - p + 4) (2^e_i > max_j |G_ij|, p
    acc's mantissa digits), so that differences of two hi entries of a row are exact; lo = G - hi rounded."""
    gram = prepared @ prepared.t()
    gram = (gram + gram.t()) * 0.5
    diagonal = gram.diagonal()
    sums = diagonal[:, None] + diagonal[None, :]
    d2 = sums - 2.0 * gram
    d2 = d2.masked_fill(d2 <= sums * (_COINCIDENT_ULPS * torch.finfo(torch.float64).eps), 0.0)
    d2.fill_diagonal_(0.0)
    if not split:
        return None, d2.to(acc).contiguous()
    _, exponent = torch.frexp(gram.abs().amax(1, keepdim=True))
    digits = 53 if acc == torch.float64 else 24
    q = torch.ldexp(torch.ones_like(gram[:, :1]), exponent - (digits - 4))
    hi = torch.round(gram / q) * q
    return torch.cat([hi.to(acc), (gram - hi).to(acc)], dim=1).contiguous(), d2.to(acc).contiguous()


def _invariant_symmetrize(dgram: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RKD: S = dG + dG^T in `dtype` with its diagonal minus its off-diagonal row sums (summed in float64), so that
    S P = 2 sum_b (W_ab + W_ba) (P_a - P_b) for W = dL/dD2 as rounded (pairwise_host.h)."""
    s = dgram.double()
    s = s + s.t()
    s.fill_diagonal_(0.0)
    s = s - torch.diag(s.sum(1))
    return s.to(dtype)


@dataclasses.dataclass
class _GramProblem:
    """The kernels' inputs (pairwise_host.h's GramProblem): Grams ([B, B]; RKD with the angle: the [B, 2B] hi/lo
    Grams; the distance alone: None) and, for RKD, squared distances [B, B], in the accumulation dtype; the dgram
    buffers are None when not requested. Kernels add their weighted term to dgram; the loss terms are collected and
    summed at the end."""

    gram_student: torch.Tensor | None
    gram_teacher: torch.Tensor | None
    sqdist_student: torch.Tensor | None
    sqdist_teacher: torch.Tensor | None
    dgram_student: torch.Tensor | None
    dgram_teacher: torch.Tensor | None
    loss_terms: list
    dtype: torch.dtype
    batch: int

    @property
    def device(self) -> torch.device:
        return (self.gram_student if self.gram_student is not None else self.sqdist_student).device

    def new(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def constants(self, *values: float, dtype=None) -> torch.Tensor:
        """Kernel constants in the accumulation dtype or `dtype` (a Triton float argument would be fp32)."""
        return torch.tensor(values, dtype=dtype or self.dtype, device=self.device)

    def launch_flags(self, acc=None) -> dict:
        acc = acc or self.dtype
        return {"ACC": tl.float64 if acc == torch.float64 else tl.float32,
                "STUDENT_GRAD": self.dgram_student is not None, "TEACHER_GRAD": self.dgram_teacher is not None}

    def grad_buffers(self) -> tuple:
        """The dgram pointers to pass (an input stands in for one not requested: it is never written)."""
        stand_in = self.gram_student if self.gram_student is not None else self.sqdist_student
        return (stand_in if self.dgram_student is None else self.dgram_student,
                stand_in if self.dgram_teacher is None else self.dgram_teacher)


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
    ds, dt = problem.sqdist_student, problem.sqdist_teacher
    grid, block = (B,), _row_block(B)
    flags = problem.launch_flags(torch.float64)
    sums = problem.new(2, B, dtype=torch.float64)
    _rkd_distance_sums_kernel[grid](ds, dt, sums, B, BLOCK=block, ACC=flags["ACC"])
    mu = (sums.sum(1) / (B * B - B)).contiguous()
    partials = problem.new(3, B, dtype=torch.float64)
    _rkd_distance_loss_kernel[grid](ds, dt, mu, partials, B, BLOCK=block, ACC=flags["ACC"])
    problem.loss_terms.append(partials[0].sum() * (term.weight / (B * B)))
    if flags["STUDENT_GRAD"] or flags["TEACHER_GRAD"]:
        moments = partials[1:].sum(1).contiguous()
        _rkd_distance_grad_kernel[grid](ds, dt, *problem.grad_buffers(), mu, moments,
                                        problem.constants(term.weight / (B * B), dtype=torch.float64), B,
                                        BLOCK=block, **flags)


def _inverse_distances(d2: torch.Tensor) -> torch.Tensor:
    """r = 1 / sqrt(D2), 0 where D2 is (the diagonal and coincident points)."""
    positive = d2 > 0
    return torch.where(positive, torch.where(positive, d2, 1.0).rsqrt(), 0.0).contiguous()


def _rkd_angle(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    gs, gt = problem.gram_student, problem.gram_teacher
    rs, rt = _inverse_distances(problem.sqdist_student), _inverse_distances(problem.sqdist_teacher)
    block_a, block_c = _angle_blocks(B, gs.device)
    flags = problem.launch_flags()
    consts = problem.constants(term.weight / B ** 3)
    needed = [side for side, flag in (("student", "STUDENT_GRAD"), ("teacher", "TEACHER_GRAD")) if flags[flag]]
    # P^T, T^T, and Q (accumulated by the kernel: zeroed)
    buffers = {side: (problem.new(B, B), problem.new(B, B), torch.zeros_like(rs)) for side in needed}
    placeholder = (rs, rs, rs)
    p_s, t_s, q_s = buffers.get("student", placeholder)
    p_t, t_t, q_t = buffers.get("teacher", placeholder)
    partials = problem.new(B, dtype=torch.float64)
    _rkd_angle_kernel[(B,)](gs, gt, rs, rt, partials, p_s, t_s, q_s, p_t, t_t, q_t, consts, B, BLOCK_A=block_a,
                            BLOCK_C=block_c, **flags)
    problem.loss_terms.append(partials.sum() * (term.weight / B ** 3))
    # dG = Q - 2 W off the diagonal, W = P + T (transposed; only dG + dG^T is used)
    if "student" in buffers:
        problem.dgram_student += q_s - 2.0 * (p_s + t_s)
    if "teacher" in buffers:
        problem.dgram_teacher += q_t - 2.0 * (p_t + t_t)


def _row_kernel_launch(kernel, problem: _GramProblem, *args, acc=None) -> None:
    """A kernel with one program per Gram row: (gs, gt, dgs, dgt, partials, *args, B); partials in `acc`."""
    B = problem.batch
    partials = problem.new(B, dtype=acc)
    kernel[(B,)](problem.gram_student, problem.gram_teacher, *problem.grad_buffers(), partials, *args, B,
                 BLOCK=_row_block(B), **problem.launch_flags(acc))
    return partials


def _sp(term: _GramTerm, problem: _GramProblem) -> None:
    B = problem.batch
    partials = _row_kernel_launch(_sp_kernel, problem, problem.constants(term.weight / (B * B), _NORMALIZE_EPS))
    problem.loss_terms.append(partials.sum() * (term.weight / (B * B)))


def _pkt(term: _GramTerm, problem: _GramProblem) -> None:
    """In float64 arithmetic (the CPU kernel's comment: a loss of terms of both signs summing to ~delta^2)."""
    B = problem.batch
    consts = problem.constants(term.weight / (B * B), term.eps, dtype=torch.float64)
    partials = _row_kernel_launch(_pkt_kernel, problem, consts, acc=torch.float64)
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
    check_pairwise_forward("triton_pairwise_forward", student, teacher, relation, params)
    terms = _parse_terms(relation, params)
    preprocess = _preprocess_of(terms[0].relation)
    rkd, angle = preprocess == "centre", any(term.relation == "rkd_angle" for term in terms)
    acc = _acc_dtype(student, teacher)
    eps = _unit_eps(preprocess, terms[0])
    prepared_student, prepared_teacher = _prepare(student, preprocess, eps), _prepare(teacher, preprocess, eps)
    with _launch_guard(student):
        with _without_tf32():
            if rkd:
                gram_student, sqdist_student = _rkd_gram(prepared_student.features, acc, angle)
                gram_teacher, sqdist_teacher = _rkd_gram(prepared_teacher.features, acc, angle)
            else:
                gram_student, gram_teacher = (_symmetric_gram(prepared_student.features),
                                              _symmetric_gram(prepared_teacher.features))
                sqdist_student = sqdist_teacher = None
        B = student.shape[0]
        dgram = lambda needed: torch.zeros((B, B), dtype=acc, device=student.device) if needed else None  # noqa: E731
        problem = _GramProblem(gram_student, gram_teacher, sqdist_student, sqdist_teacher, dgram(student_grad),
                               dgram(teacher_grad), [], acc, B)
        for term in terms:
            _GRAM_KERNELS[term.relation](term, problem)
    loss = torch.stack([term.to(acc) for term in problem.loss_terms]).sum()

    def feature_grad(dgram: torch.Tensor, prepared: _Prepared, features: torch.Tensor) -> torch.Tensor:
        with _without_tf32():
            if rkd:  # the float64 GEMM with the angle, see pairwise_host.h
                s = _invariant_symmetrize(dgram, torch.float64 if angle else acc)
                return torch.mm(s, prepared.features.to(s.dtype)).to(features.dtype).contiguous()
            grad_prepared = torch.mm(dgram + dgram.t(), prepared.features)
        return _preprocess_backward(grad_prepared, prepared, preprocess, eps).to(features.dtype).contiguous()

    grad_student = feature_grad(problem.dgram_student, prepared_student, student) if student_grad \
        else _empty_gradient(student)
    grad_teacher = feature_grad(problem.dgram_teacher, prepared_teacher, teacher) if teacher_grad \
        else _empty_gradient(teacher)
    return loss, grad_student, grad_teacher


