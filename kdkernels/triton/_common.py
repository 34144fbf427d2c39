"""Device-side numerics shared by the Triton kernels of kdkernels (softmax_kl, target_split, logsoftmax_gather, dist).

Row statistics: every family describes a row x of logits at temperature T by (M, log_sum), M = max x and
log_sum = log sum exp((x - M) / T), so that log p = (x - M) / T - log_sum: the subtraction of nearby raw logits is
exact, and a log-probability carries the rounding of its own size, not that of x / T.

Units and precision: everything is in natural units. Online sums d = sum exp((x - m~) / T), with the safe shift
m~ = (M == -inf) ? 0 : M, and the KL moments accumulate in fp64 scalars (``_wide_sum``), their terms computed in the
accumulation dtype; the logs of the sums are taken in fp64 and rounded once, as the CPU kernels do. Exponentials of
natural-unit arguments go through ``_exp_natural``, which keeps the speed of exp2 without the rounding of a
conversion to log2 units. The exponent-unit helpers of the last section (log2 units with exp2 / log2 for fp32,
k = log2(e) / T) serve dist.py.

Nothing here knows a family; the host-side setup and the input checks live in ``_launch.py``.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); as an fp32 operand it rounds to _LOG2E_HI
_LOG2E_HI = tl.constexpr(1.44269502162933349609375)  # log2(e) rounded to fp32
_LOG2E_LO = tl.constexpr(1.9259629911266175e-08)  # log2(e) - _LOG2E_HI
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


# ------------------------------------------------------------------------------------------------------------------
# Elementary functions
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _exp(x, F64: tl.constexpr):
    """2^x for fp32 accumulation (x in log2 units), e^x for fp64 (natural units)."""
    if F64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, F64: tl.constexpr):
    """log2 x for fp32 accumulation, ln x for fp64 (the inverse of _exp)."""
    if F64:
        return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def _exp_natural(x, F64: tl.constexpr):
    """e^x for a natural-unit x, to the accuracy of exp2 itself.

    fp32: 2^y with y = x log2(e) rounded would err by |y| half-ulps of y (5e-6 relative at x = -85, three times the
    error of the eager exp); the rounding error r = x log2(e) - y, recovered exactly by an fma plus the low part of
    log2(e), is applied as e^x = 2^y (1 + r ln 2) (|r| <= 2^-16, so the dropped r^2 term is below 2^-33).
    x = -inf gives 0."""
    if F64:
        return tl.exp(x)
    else:
        y = x * _LOG2E_HI
        r = tl.fma(x, _LOG2E_HI, -y) + x * _LOG2E_LO
        e = tl.exp2(y)
        return tl.where(e == 0.0, 0.0, tl.fma(e, r * _LN2, e))


@triton.jit
def _log1p_nonpositive(y, F64: tl.constexpr):
    """log1p(y) for -1 <= y <= 0 (Triton has no log1p), to a few ulp; -1 gives -inf, NaN stays NaN.

    For y >= -0.3: log1p(y) = 2 atanh(z), z = y / (2 + y), |z| <= 0.177, by its odd series through z^9/9 (fp32) or
    z^19/19 (fp64) (truncation < 3e-9 resp. 4e-17 relative). Below, log(u) y / (u - 1) with u = 1 + y rounded: u - 1
    is exact (u >= 1/2, or 1 + y itself exact), so the factor corrects the rounding of u, which log(u) alone would
    pass on as an absolute error of up to 2^-24 / u (1.2 ulp of the result at y = -1/2). The coefficients
    1 / (2k + 1) are formed by a division in the accumulation dtype (a float literal may be materialised as fp32,
    which would cost fp64 ~1e-9)."""
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
    u = 1.0 + y
    return tl.where(y >= -0.3, 2.0 * z * a, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _eps(ACC: tl.constexpr):
    """DIST's 1e-8, rounded once in the accumulation dtype (a float literal may be materialised as fp32)."""
    return tl.full([], 1.0, ACC) / 100000000.0


# ------------------------------------------------------------------------------------------------------------------
# Online row statistics
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _scales(inv_t_ptr, inv_t_arg, ACC: tl.constexpr, F64: tl.constexpr):
    """(1 / T, k = exponent units per unit of x, to_exp = exponent units per natural-log unit, unit = its inverse).

    fp64 reads 1 / T from a one-element fp64 tensor (a Triton scalar argument is fp32), see _launch._inv_t_args.
    k, to_exp and unit serve the exponent-unit sums of the last section."""
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
def _safe_shift(m):
    """The shift of a row whose maximum so far is m: m, or 0 while the row is empty (m == -inf)."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _wide_sum(x):
    """The sum of a tile in fp64.

    Row statistics (the sums d and the KL moments) accumulate in fp64 scalars, each tile's terms computed in the
    accumulation dtype: an fp32 tree sum rounds a dominant term once per level (log2 BLOCK times), which where the
    KL cancels (a loss far below its terms, the mixture KLs that the JSD backward subtracts) costs several times the
    eager formula's error. One conversion and one add per element, beside the row's loads."""
    return tl.sum(x.to(tl.float64), axis=0)


@triton.jit
def _rescaled_sum(m, d, tile, inv_t):
    """One side's online sum d = sum exp((x - m~) / T) (fp64) moved to the max of a new tile.

    Returns (new max, its safe shift m~', d rescaled to it, moved = m~' - m~ in logit units (fp64, exact),
    c = exp(-moved / T) (fp64)). A side whose old max was -inf is empty: its sum stays 0 (c, possibly inf, is
    discarded)."""
    m_new = tl.maximum(m, tl.max(tile, axis=0))
    shift = _safe_shift(m_new)
    moved = shift.to(tl.float64) - _safe_shift(m).to(tl.float64)
    c = tl.exp(-moved * inv_t.to(tl.float64))
    return m_new, shift, tl.where(m == NEG_INF, 0.0, c * d), moved, c


@triton.jit
def _rescaled_teacher_moment(acc, m_t, c_t, d_t, moved_t, moved_x, inv_t):
    """acc = sum e_t (t^ - x^) (fp64, natural units, t^ = (t - m~_t) / T, x^ likewise) moved to new shifts:
    t^ -= moved_t / T, x^ -= moved_x / T, e_t *= c_t; d_t = the teacher's sum before the move.

    A teacher whose old max was -inf is empty; c_t == 0 (the old teacher mass underflows) also zeroes acc, which keeps
    an acc of +inf (a -inf x^ under a finite teacher) from becoming 0 * inf = NaN: the underflowed terms have p_t == 0
    and contribute 0."""
    shift = (moved_x - moved_t) * inv_t.to(tl.float64)
    return tl.where((m_t == NEG_INF) | (c_t == 0.0), 0.0, c_t * (acc + shift * d_t))


@triton.jit
def _wide_log_ratio(t, shift_t, s, shift_s, inv_t):
    """((t - shift_t) - (s - shift_s)) / T in fp64, from logits and shifts in the accumulation dtype (the differences
    are exact in fp64). A KL's per-element log-ratio at the size of |x| / T, which the forward's moment and the
    backward's teacher gradient must round alike: the gradient's log-ratio minus the loss cancels exactly where the
    teacher is one-hot, and an fp32 rounding at |x| / T ~ 1e5 would leave 1e-2 there. -inf logits give +-inf or NaN,
    which the callers select away with the zero teacher probability."""
    wide_t = t.to(tl.float64) - shift_t.to(tl.float64)
    wide_s = s.to(tl.float64) - shift_s.to(tl.float64)
    return (wide_t - wide_s) * inv_t.to(tl.float64)


@triton.jit
def _teacher_weighted_sum(e_t, r):
    """sum e_t r over a tile (fp64), a term := 0 where e_t == 0 (so r = +-inf there gives no NaN)."""
    return _wide_sum(tl.where(e_t == 0.0, 0.0, e_t * r))


@triton.jit
def _row_max_and_log_sum(row_ptr, V, inv_t, BLOCK: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
    """One row's statistics (max raw logit M, log_sum = log sum exp((x - M) / T)) by one online pass; (-inf, -inf)
    for an all -inf row."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], NEG_INF, ACC)
    d = tl.full([], 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=NEG_INF).to(ACC)
        m, shift, d, _, _ = _rescaled_sum(m, d, x, inv_t)
        d += _wide_sum(_exp_natural((x - shift) * inv_t, F64))
    return m, tl.log(d).to(ACC)


@triton.jit
def _store_stats(stats_ptr, row, max_x, log_sum):
    """Row statistics [N, 2]: (max, log_sum) of row ``row``."""
    tl.store(stats_ptr + 2 * row, max_x)
    tl.store(stats_ptr + 2 * row + 1, log_sum)


# ------------------------------------------------------------------------------------------------------------------
# Probabilities from the statistics
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _log_prob(x, max_x, log_sum, inv_t):
    """log p = (x - max) / T - log_sum (natural units)."""
    return (x - max_x) * inv_t - log_sum


@triton.jit
def _prob(x, max_x, log_sum, inv_t, F64: tl.constexpr):
    """p = exp(log p), 0 on an all -inf row (an empty distribution) instead of the NaN of -inf - -inf."""
    return tl.where(max_x == NEG_INF, 0.0, _exp_natural(_log_prob(x, max_x, log_sum, inv_t), F64))


# ------------------------------------------------------------------------------------------------------------------
# Exponent-unit row sums (the form dist.py uses)
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_max_and_sum(row_ptr, V, k, BLOCK: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
    """One row's online (max raw logit M, d = sum _exp((x - m~) k)) in the accumulation dtype, with k from
    ``_scales`` and the safe shift m~ = (M == -inf) ? 0 : M; log_sum = _log(d) unit."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], NEG_INF, ACC)
    d = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=NEG_INF).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = _safe_shift(m_new)
        d = tl.where(m == NEG_INF, 0.0, _exp((_safe_shift(m) - shift) * k, F64) * d)
        d += tl.sum(_exp((x - shift) * k, F64), axis=0)
        m = m_new
    return m, d
