// CUDA device code of the softmax_kl family: per-row KL(softmax(t/T) || softmax(s/T)) and the beta-skew
// Jensen-Shannon divergence (softmax_jsd), and their gradients.
//
// No torch include: raw pointers, int64 sizes and row strides, so this header compiles with plain nvcc. The torch
// launcher (softmax_kl_cuda.cu) checks the tensors and calls launch_softmax_{kl,jsd}_forward / _backward below, which
// pick the launch configuration and launch exactly one kernel each on the given stream.
//
// Numerical spec: kdkernels/reference/softmax_kl.py. Inputs: student/teacher logits S, T in {float, __half,
// __nv_bfloat16} with float accumulation, or double/double with double accumulation. Each element is widened to
// Acc as soon as it is loaded; all arithmetic is in Acc. The building blocks shared with the other families
// (conversions, per-side softmax states, reductions, row walks, launch configurations) are in ../common/cuda_rows.cuh.
//
// ---------------------------------------------------------------------------------------------------------------
// Forward (one pass over s and t). The online state of a subset of a row is kept in *raw logit units* (the units of
// s and t, before the 1/T scaling), which is the spec's natural-log state multiplied through by T:
//
//   ms, mt     running max of raw s, raw t              (spec: M_s = ms/T, M_t = mt/T; max commutes with *1/T)
//   ~m         = (m == -inf) ? 0 : m                     (the "safe shift")
//   ds         = sum exp((s - ~ms)/T)                    (unitless: identical to the spec's d_s)
//   dt         = sum exp((t - ~mt)/T)                    (identical to the spec's d_t)
//   acc        = sum e_t ((t - ~mt) - (s - ~ms)),  e_t = exp((t - ~mt)/T), term := 0 when e_t == 0
//                                                        (= T * the spec's acc)
//
// Exponentials are exp2((x - ~m) * k) with k = log2(e)/T: the difference x - ~m is formed before scaling (exact
// for entries within a factor 2 of the max), so large logits (1e4 at T = 0.1) do not lose the exponent to the
// rounding of x/T.
// Moving a state to larger maxima (ms' >= ms, mt' >= mt), with deltas in raw units:
//   old mt == -inf: dt = acc = 0 stay 0;  else c = exp2((~mt - ~mt') k), acc' = c (acc + (dS - dT) dt), dt' = c dt,
//                   dS = ~ms' - ~ms, dT = ~mt' - ~mt; and if c underflows to 0 both become 0 (every old term has
//                   e_t' == 0, so it contributes 0 by the spec; this also keeps an acc of +inf from giving NaN);
//   old ms == -inf: ds stays 0;         else ds' = ds exp2((~ms - ~ms') k).
// Merging two states = move both to the larger maxima, then add ds, dt, acc.
// Final: per-row statistics (max, log_sum) = (ms, log(ds)) and (mt, log(dt)) (an all -inf row gives (-inf, -inf)),
//        so that log p = (x - max)/T - log_sum;
//        loss  = 0 if mt == -inf (empty teacher row); +inf if ms == -inf (teacher finite somewhere, student all
//                -inf: the true KL, as in the reference); else (acc/dt)/T - log(dt) + log(ds).
//
// Backward (elementwise, given the statistics, loss, g = grad_loss[row]): zeros when g == 0 or max_t == -inf; else
//   x_s = (s - max_s)/T - log_sum_s (= log p_s; -inf when max_s == -inf), x_t likewise (exact near the max),
//   p = exp2(x * log2 e),  grad_s = g/T (p_s - p_t),  grad_t = g/T p_t (x_t - x_s - loss), 0 where p_t == 0.
//
// ---------------------------------------------------------------------------------------------------------------
// softmax_jsd (spec: softmax_jsd_rows), 0 < beta < 1: loss = beta kl_t + (1 - beta) kl_s, kl_t = KL(p_t || m),
// kl_s = KL(p_s || m), log m = logaddexp(log beta + log p_t, log1p(-beta) + log p_s). log m is not an online sum,
// so the forward makes two passes over each row with the KL forward's thread layout and configs:
//   1. the per-side online (max, sum) of the KL state without acc (SoftmaxPairState; same rebase rules for ds, dt),
//      merged so that every thread of the row holds the row's (max, log_sum) per side (stats exactly as the KL op);
//   2. the row again (typically L2-resident), with lp = (x - max)/T - log_sum and d = lp_t - lp_s + log(beta/(1-beta)):
//        lp_t - log m = -log beta - softplus(-d),  lp_s - log m = -log1p(-beta) - softplus(d),
//        softplus(x) = max(x, 0) + log1p(exp(-|x|))      (= the spec's hi + log1p(exp(lo - hi)), rearranged)
//      kl_t += p_t (lp_t - log m) where p_t = exp(lp_t) > 0 (else exactly 0), kl_s likewise; summed per row.
//   Outputs: stats as the KL forward, mixture_kl [N, 2] = (kl_t, kl_s), loss; a row with either side all -inf is
//   empty: loss 0, mixture_kl (0, 0).
// Backward (elementwise, the KL backward's layout), g = grad_loss[row]: zeros when g == 0 or either max is -inf; else
//   grad_s = g (1 - beta)/T p_s (lp_s - log m - kl_s),  grad_t = g beta/T p_t (lp_t - log m - kl_t), 0 where p == 0.
// exp / log1p are the precise expf / log1pf (exp / log1p for double); beta's logs are formed on the host in double.
//
// ---------------------------------------------------------------------------------------------------------------
// Launch heuristics (shared by softmax_kl and softmax_jsd) (bandwidth-bound; see ../shared/reference/kernels.md §6):
// * Vector width: VEC = 16 / max(sizeof(S), sizeof(T)) elements per load (fp32 4, fp16/bf16 8, mixed 4, fp64 2),
//   so the wider input uses 16-byte loads. Used when both row base pointers are aligned to VEC elements and both
//   row strides are multiples of VEC (the backward also needs V % VEC == 0 and aligned outputs, which are contiguous
//   [N, V]); otherwise the scalar path (VEC = 1). The forward handles a V % VEC tail with scalar loads.
// * Forward, with U = ceil(V / VEC) load units per row:
//     U <= 256 : "group" mode: 256-thread blocks, G = clamp(next_pow2(ceil(U / 4)), 1, 32) lanes per row (so a lane
//                does <= 8 units), 256/G rows per block, states merged with warp shuffles.
//     U  > 256 : "block" mode: one block per row, G = clamp(next_pow2(ceil(U / 8)), 64, 512) threads (a thread does
//                4-8 units for U <= 4096, more above: V = 128256 bf16 -> 512 threads, ~31 units each), warp shuffles
//                then shared memory. 512 rather than 1024 so that two row-blocks are resident per SM.
//   Each thread loads UNROLL units of s and t (2 for vector loads, 4 scalar) before any arithmetic, so that enough
//   bytes are in flight per SM; the chunk's maxima move the state once, then the chunk is accumulated.
// * Backward: 256-thread blocks of (TX, 256/TX) threads, TX = min(256, next_pow2(U)) columns (units) by 256/TX rows;
//   grid (ceil(N / rows_per_block), min(ceil(U / TX), 65535)), one unit per thread per column tile.
// Deterministic (fixed reduction order, no atomics).
#ifndef KDKERNELS_SOFTMAX_KL_KERNELS_CUH_
#define KDKERNELS_SOFTMAX_KL_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cstdint>

namespace kdkernels {
namespace softmax_kl_cuda {

using namespace cuda_rows;  // widen / Narrow / kd_* math, online softmax states, row walks, launch heuristics

// group <= 32: group mode (blockDim.x / group rows per block); group == blockDim.x > 32: one block per row.
template <typename S, typename T, typename Acc, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    softmax_kl_forward_kernel(const S* __restrict__ student, int64_t student_row_stride, const T* __restrict__ teacher,
                              int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, Acc k, int group,
                              Acc* __restrict__ loss, Acc* __restrict__ stats_student, Acc* __restrict__ stats_teacher) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  KlState<Acc> st = empty_kl_state<Acc>();
  if (row < N) {  // out-of-range lanes keep the empty state but still take part in the shuffles
    accumulate_row<VEC, UNROLL>(st, V, rl.lane, group, k, student + row * student_row_stride,
                                teacher + row * teacher_row_stride);
  }
  reduce_row(st, rl, empty_kl_state<Acc>(), k);
  if (rl.lane != 0 || row >= N) return;

  const Acc neg_inf = -pos_inf<Acc>();
  stats_student[2 * row] = st.ms;
  stats_student[2 * row + 1] = kd_log(st.ds);  // -inf when ds == 0 (all -inf row)
  stats_teacher[2 * row] = st.mt;
  stats_teacher[2 * row + 1] = kd_log(st.dt);
  Acc row_loss;
  if (st.mt == neg_inf) {
    row_loss = Acc(0);  // teacher all -inf: empty row
  } else if (st.ms == neg_inf) {
    row_loss = pos_inf<Acc>();  // teacher finite somewhere, student all -inf
  } else {
    row_loss = (st.acc / st.dt) * inv_t - kd_log(st.dt) + kd_log(st.ds);
  }
  loss[row] = row_loss;
}

// ----------------------------------------------------------------------------------------------------------------
// Backward: block (TX, TY), row = blockIdx.x * TY + threadIdx.y, units blockIdx.y * TX + threadIdx.x (+ tiles).
// grad_student / grad_teacher are contiguous [N, V] or nullptr when not requested.

template <typename S, typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    softmax_kl_backward_kernel(const Acc* __restrict__ grad_loss, const S* __restrict__ student,
                               int64_t student_row_stride, const T* __restrict__ teacher, int64_t teacher_row_stride,
                               const Acc* __restrict__ stats_student, const Acc* __restrict__ stats_teacher,
                               const Acc* __restrict__ loss, int64_t N, int64_t V, Acc inv_t,
                               S* __restrict__ grad_student, T* __restrict__ grad_teacher) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  const Acc neg_inf = -pos_inf<Acc>();
  const Acc g = grad_loss[row];
  const Acc max_t = stats_teacher[2 * row];
  const Acc log_sum_t = stats_teacher[2 * row + 1];
  const bool zero_row = g == Acc(0) || max_t == neg_inf;
  const Acc max_s = stats_student[2 * row];
  const Acc log_sum_s = stats_student[2 * row + 1];
  const bool student_empty = max_s == neg_inf;  // then p_s = 0 (and x_s = -inf)
  const Acc row_loss = loss[row];
  const Acc scale = g * inv_t;
  const Acc l2e = log2e<Acc>();
  backward_row_elementwise<S, T, Acc, VEC>(
      row, student, student_row_stride, teacher, teacher_row_stride, V, zero_row, grad_student, grad_teacher,
      [&](int64_t, Acc s, Acc t, Acc& grad_s, Acc& grad_t) {
        const Acc x_s = student_empty ? neg_inf : (s - max_s) * inv_t - log_sum_s;  // log p_s
        const Acc x_t = (t - max_t) * inv_t - log_sum_t;                            // log p_t
        const Acc p_s = kd_exp2(x_s * l2e);
        const Acc p_t = kd_exp2(x_t * l2e);
        grad_s = scale * (p_s - p_t);
        grad_t = p_t == Acc(0) ? Acc(0) : scale * p_t * (x_t - x_s - row_loss);
      });
}

// ----------------------------------------------------------------------------------------------------------------
// softmax_jsd: per-row beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (see the header
// comment). Per-row weights in Acc, computed on the host in double (jsd_weights).

// beta and 1 - beta split into their Acc rounding and the rest (the expm1 factor is weighted by an fma of both): the
// mixture KLs cancel terms of both signs, and the rounding of beta alone would bias every row's KL by ~2 ulp.
template <typename Acc>
struct JsdWeights {
  Acc beta, one_minus_beta, beta_lo, one_minus_beta_lo;
};

template <typename Acc>
inline JsdWeights<Acc> jsd_weights(double beta) {
  const Acc hi = static_cast<Acc>(beta), one_minus_hi = static_cast<Acc>(1.0 - beta);
  return JsdWeights<Acc>{hi, one_minus_hi, static_cast<Acc>(beta - static_cast<double>(hi)),
                         static_cast<Acc>((1.0 - beta) - static_cast<double>(one_minus_hi))};
}

template <typename Acc>
struct JsdRowStats {
  Acc max_s, log_sum_s, max_t, log_sum_t;
  Acc log_sum_difference;  // log_sum_t - log_sum_s, formed as log(d_t / d_s) in the forward
};

// For one entry: log p_s, log p_t and the mixture log-ratios rt = log p_t - log m, rs = log p_s - log m. With
// d = log p_s - log p_t = ((s - max_s) - (t - max_t))/T + (log_sum_t - log_sum_s), each difference exact near the
// maxima:  d <= 0: rt = -log1p((1 - beta) expm1(d)), rs = d + rt;  d > 0: rs = -log1p(beta expm1(-d)), rt = rs - d.
// Accurate to ~eps |d| however close the distributions are (log p - log m would cancel O(log V) terms). Meaningful
// only where the matching p > 0; d is NaN when both are -inf (callers select such terms away).
template <typename Acc>
__device__ __forceinline__ void jsd_terms(Acc x_s, Acc x_t, const JsdRowStats<Acc>& r, Acc inv_t,
                                          const JsdWeights<Acc>& w, Acc& lp_s, Acc& lp_t, Acc& rt, Acc& rs) {
  const Acc below_s = x_s - r.max_s, below_t = x_t - r.max_t;
  lp_s = below_s * inv_t - r.log_sum_s;
  lp_t = below_t * inv_t - r.log_sum_t;
  const Acc d = (below_s - below_t) * inv_t + r.log_sum_difference;
  const bool non_positive = d <= Acc(0);
  const Acc e = kd_expm1(-kd_abs(d));
  const Acc l = kd_log1p(non_positive ? fma(w.one_minus_beta, e, w.one_minus_beta_lo * e)
                                      : fma(w.beta, e, w.beta_lo * e));
  rt = non_positive ? -l : -d - l;
  rs = non_positive ? d - l : -l;
}

// kl_t += sum p_t rt, kl_s += sum p_s rs over the chunk; zero-probability terms are exactly 0.
template <int N, typename Acc>
__device__ __forceinline__ void accumulate_jsd_chunk(Acc& kl_t, Acc& kl_s, const Acc (&s)[N], const Acc (&t)[N],
                                                     const JsdRowStats<Acc>& r, Acc inv_t, const JsdWeights<Acc>& w) {
  Acc sum_t = Acc(0), sum_s = Acc(0);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    Acc lp_s, lp_t, rt, rs;
    jsd_terms(s[j], t[j], r, inv_t, w, lp_s, lp_t, rt, rs);
    const Acc p_s = kd_exp(lp_s), p_t = kd_exp(lp_t);
    sum_t += p_t > Acc(0) ? p_t * rt : Acc(0);
    sum_s += p_s > Acc(0) ? p_s * rs : Acc(0);
  }
  kl_t += sum_t;
  kl_s += sum_s;
}

// Sums (a, b) over `width` consecutive lanes (power of two <= 32, aligned) into the first lane of each group; all
// 32 lanes must be active.
template <typename Acc>
__device__ __forceinline__ void sum_lanes(Acc& a, Acc& b, int width) {
  for (int offset = 1; offset < width; offset *= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
}

// Two passes over each row, with the forward's thread layout (group / block mode, same configs):
//   1. per-side online (max, sum) (SoftmaxPairState), merged so that every thread of the row holds the row's state;
//   2. the row again (typically from L2), kl_t and kl_s with the final statistics; summed to the row's first thread.
// Outputs as the KL forward's stats, plus mixture_kl [N, 2] = (kl_t, kl_s) and loss = beta kl_t + (1 - beta) kl_s;
// a row with either side all -inf gets loss 0 and mixture_kl (0, 0).
template <typename S, typename T, typename Acc, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    softmax_jsd_forward_kernel(const S* __restrict__ student, int64_t student_row_stride,
                               const T* __restrict__ teacher, int64_t teacher_row_stride, int64_t N, int64_t V,
                               Acc inv_t, Acc k, JsdWeights<Acc> w, int group, Acc* __restrict__ loss,
                               Acc* __restrict__ stats_student, Acc* __restrict__ stats_teacher,
                               Acc* __restrict__ mixture_kl) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  const int lane = rl.lane;
  const bool block_mode = rl.block_mode;
  const S* s_row = student + row * student_row_stride;
  const T* t_row = teacher + row * teacher_row_stride;

  // Pass 1 (afterwards every thread of the row holds the row's state).
  SoftmaxPairState<Acc> st = empty_pair_state<Acc>();
  if (row < N) accumulate_row<VEC, UNROLL>(st, V, lane, group, k, s_row, t_row);
  reduce_row(st, rl, empty_pair_state<Acc>(), k);

  // Pass 2.
  const Acc neg_inf = -pos_inf<Acc>();
  const bool empty_row = st.ms == neg_inf || st.mt == neg_inf;  // uniform over the row's threads
  // log(0) = -inf for an all -inf side (an empty row, never read then)
  const JsdRowStats<Acc> r{st.ms, kd_log(st.ds), st.mt, kd_log(st.dt), kd_log(st.dt / st.ds)};
  Acc kl_t = Acc(0), kl_s = Acc(0);
  if (row < N && !empty_row) {
    for_each_row_chunk<VEC, UNROLL, Acc>(
        V, lane, group,
        [&](const auto&, const auto& s, const auto& t) { accumulate_jsd_chunk(kl_t, kl_s, s, t, r, inv_t, w); }, s_row,
        t_row);
  }
  sum_lanes(kl_t, kl_s, block_mode ? 32 : group);
  if (block_mode) {
    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid / 32;
    const int num_warps = static_cast<int>(blockDim.x) / 32;
    __shared__ Acc kl_partial[2][32];
    if (tid % 32 == 0) {
      kl_partial[0][warp] = kl_t;
      kl_partial[1][warp] = kl_s;
    }
    __syncthreads();
    if (tid != 0) return;
    kl_t = kl_partial[0][0];
    kl_s = kl_partial[1][0];
    for (int i = 1; i < num_warps; ++i) {
      kl_t += kl_partial[0][i];
      kl_s += kl_partial[1][i];
    }
  } else if (lane != 0 || row >= N) {
    return;
  }

  Acc* row_stats_s = stats_student + 2 * row;
  Acc* row_stats_t = stats_teacher + 2 * row;
  row_stats_s[0] = r.max_s;
  row_stats_s[1] = r.log_sum_s;
  row_stats_t[0] = r.max_t;
  row_stats_t[1] = r.log_sum_t;
  mixture_kl[2 * row] = kl_t;  // both 0 for an empty row
  mixture_kl[2 * row + 1] = kl_s;
  const double beta = static_cast<double>(w.beta) + static_cast<double>(w.beta_lo);
  const double one_minus_beta = static_cast<double>(w.one_minus_beta) + static_cast<double>(w.one_minus_beta_lo);
  loss[row] = empty_row ? Acc(0) : static_cast<Acc>(beta * kl_t + one_minus_beta * kl_s);
}

// Backward, elementwise with the KL backward's layout: zeros when g == 0 or either side's max is -inf; else
//   grad_s = g (1 - beta)/T p_s (rs - kl_s),  grad_t = g beta/T p_t (rt - kl_t),  0 where the p is 0.
template <typename S, typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    softmax_jsd_backward_kernel(const Acc* __restrict__ grad_loss, const S* __restrict__ student,
                                int64_t student_row_stride, const T* __restrict__ teacher, int64_t teacher_row_stride,
                                const Acc* __restrict__ stats_student, const Acc* __restrict__ stats_teacher,
                                const Acc* __restrict__ mixture_kl, int64_t N, int64_t V, Acc inv_t,
                                JsdWeights<Acc> w, S* __restrict__ grad_student, T* __restrict__ grad_teacher) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  const Acc g = grad_loss[row];
  const JsdRowStats<Acc> r{stats_student[2 * row], stats_student[2 * row + 1], stats_teacher[2 * row],
                           stats_teacher[2 * row + 1], stats_teacher[2 * row + 1] - stats_student[2 * row + 1]};
  const bool zero = g == Acc(0) || r.max_s == -pos_inf<Acc>() || r.max_t == -pos_inf<Acc>();
  const Acc kl_t = mixture_kl[2 * row], kl_s = mixture_kl[2 * row + 1];
  const Acc scale_s = g * w.one_minus_beta * inv_t;
  const Acc scale_t = g * w.beta * inv_t;
  backward_row_elementwise<S, T, Acc, VEC>(
      row, student, student_row_stride, teacher, teacher_row_stride, V, zero, grad_student, grad_teacher,
      [&](int64_t, Acc s, Acc t, Acc& grad_s, Acc& grad_t) {
        Acc lp_s, lp_t, rt, rs;
        jsd_terms(s, t, r, inv_t, w, lp_s, lp_t, rt, rs);
        const Acc p_s = kd_exp(lp_s), p_t = kd_exp(lp_t);
        grad_s = p_s > Acc(0) ? scale_s * p_s * (rs - kl_s) : Acc(0);
        grad_t = p_t > Acc(0) ? scale_t * p_t * (rt - kl_t) : Acc(0);
      });
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers (one kernel launch each, on `stream`; the caller checks the launch).

// Requires N >= 1, V >= 1, N < 2^31 (the launcher checks). inv_t = 1/T in Acc.
template <typename S, typename T, typename Acc>
void launch_softmax_kl_forward(const S* student, int64_t student_row_stride, const T* teacher,
                               int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, Acc* loss,
                               Acc* stats_student, Acc* stats_teacher, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = forward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N);
  const Acc k = inv_t * log2e<Acc>();
  if (vectorised) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    softmax_kl_forward_kernel<S, T, Acc, kVec, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, cfg.group, loss, stats_student,
        stats_teacher);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    softmax_kl_forward_kernel<S, T, Acc, 1, 4><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, cfg.group, loss, stats_student,
        stats_teacher);
  }
}

// Requires N >= 1, V >= 1, ceil(N / rows per block) < 2^31 (the launcher checks N < 2^31). grad_student /
// grad_teacher: contiguous [N, V] or nullptr (at least one non-null).
template <typename S, typename T, typename Acc>
void launch_softmax_kl_backward(const Acc* grad_loss, const S* student, int64_t student_row_stride, const T* teacher,
                                int64_t teacher_row_stride, const Acc* stats_student, const Acc* stats_teacher,
                                const Acc* loss, int64_t N, int64_t V, Acc inv_t, S* grad_student, T* grad_teacher,
                                cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = backward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N, V,
                                              grad_student, grad_teacher);
  const BackwardConfig cfg = backward_config(N, V / (vectorised ? kVec : 1));
  if (vectorised) {
    softmax_kl_backward_kernel<S, T, Acc, kVec><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, loss, N, V,
        inv_t, grad_student, grad_teacher);
  } else {
    softmax_kl_backward_kernel<S, T, Acc, 1><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, loss, N, V,
        inv_t, grad_student, grad_teacher);
  }
}

// softmax_jsd forward: the KL forward's configuration (forward_config, vector width, UNROLL). Requires N >= 1,
// V >= 1, N < 2^31, 0 < beta < 1 (the launcher checks). inv_t = 1/T in Acc.
template <typename S, typename T, typename Acc>
void launch_softmax_jsd_forward(const S* student, int64_t student_row_stride, const T* teacher,
                                int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, double beta, Acc* loss,
                                Acc* stats_student, Acc* stats_teacher, Acc* mixture_kl, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = forward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N);
  const Acc k = inv_t * log2e<Acc>();
  const JsdWeights<Acc> w = jsd_weights<Acc>(beta);
  if (vectorised) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    softmax_jsd_forward_kernel<S, T, Acc, kVec, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, w, cfg.group, loss, stats_student,
        stats_teacher, mixture_kl);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    softmax_jsd_forward_kernel<S, T, Acc, 1, 4><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, w, cfg.group, loss, stats_student,
        stats_teacher, mixture_kl);
  }
}

// softmax_jsd backward: the KL backward's configuration. Same requirements as launch_softmax_kl_backward, and
// 0 < beta < 1; mixture_kl is the forward's [N, 2] output.
template <typename S, typename T, typename Acc>
void launch_softmax_jsd_backward(const Acc* grad_loss, const S* student, int64_t student_row_stride, const T* teacher,
                                 int64_t teacher_row_stride, const Acc* stats_student, const Acc* stats_teacher,
                                 const Acc* mixture_kl, int64_t N, int64_t V, Acc inv_t, double beta, S* grad_student,
                                 T* grad_teacher, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = backward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N, V,
                                              grad_student, grad_teacher);
  const BackwardConfig cfg = backward_config(N, V / (vectorised ? kVec : 1));
  const JsdWeights<Acc> w = jsd_weights<Acc>(beta);
  if (vectorised) {
    softmax_jsd_backward_kernel<S, T, Acc, kVec><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, mixture_kl,
        N, V, inv_t, w, grad_student, grad_teacher);
  } else {
    softmax_jsd_backward_kernel<S, T, Acc, 1><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, mixture_kl,
        N, V, inv_t, w, grad_student, grad_teacher);
  }
}

}  // namespace softmax_kl_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_SOFTMAX_KL_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc).
// Instantiating the four launch helpers for every (student, teacher) type pair the launcher dispatches to
// instantiates every kernel the launcher can launch (vector and scalar variants of all four kernels); the kernels are
// also instantiated explicitly below so that a kernel the helpers stopped using would still be compiled.
#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_SOFTMAX_KL_INSTANTIATE(S, T, ACC)                                                                    \
  template void kdkernels::softmax_kl_cuda::launch_softmax_kl_forward<S, T, ACC>(                                      \
      const S*, int64_t, const T*, int64_t, int64_t, int64_t, ACC, ACC*, ACC*, ACC*, cudaStream_t);                  \
  template void kdkernels::softmax_kl_cuda::launch_softmax_kl_backward<S, T, ACC>(                                     \
      const ACC*, const S*, int64_t, const T*, int64_t, const ACC*, const ACC*, const ACC*, int64_t, int64_t, ACC,   \
      S*, T*, cudaStream_t);                                                                                           \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_kl_forward_kernel<                                     \
      S, T, ACC, kdkernels::softmax_kl_cuda::VecWidth<S, T>::value, 2>(const S*, int64_t, const T*, int64_t, int64_t, \
                                                                         int64_t, ACC, ACC, int, ACC*, ACC*, ACC*);   \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_kl_forward_kernel<S, T, ACC, 1, 4>(                    \
      const S*, int64_t, const T*, int64_t, int64_t, int64_t, ACC, ACC, int, ACC*, ACC*, ACC*);                       \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_kl_backward_kernel<                                    \
      S, T, ACC, kdkernels::softmax_kl_cuda::VecWidth<S, T>::value>(const ACC*, const S*, int64_t, const T*, int64_t, \
                                                                      const ACC*, const ACC*, const ACC*, int64_t,    \
                                                                      int64_t, ACC, S*, T*);                          \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_kl_backward_kernel<S, T, ACC, 1>(                      \
      const ACC*, const S*, int64_t, const T*, int64_t, const ACC*, const ACC*, const ACC*, int64_t, int64_t, ACC,    \
      S*, T*);                                                                                                         \
  template void kdkernels::softmax_kl_cuda::launch_softmax_jsd_forward<S, T, ACC>(                                     \
      const S*, int64_t, const T*, int64_t, int64_t, int64_t, ACC, double, ACC*, ACC*, ACC*, ACC*, cudaStream_t);    \
  template void kdkernels::softmax_kl_cuda::launch_softmax_jsd_backward<S, T, ACC>(                                    \
      const ACC*, const S*, int64_t, const T*, int64_t, const ACC*, const ACC*, const ACC*, int64_t, int64_t, ACC,   \
      double, S*, T*, cudaStream_t);                                                                                   \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_jsd_forward_kernel<                                    \
      S, T, ACC, kdkernels::softmax_kl_cuda::VecWidth<S, T>::value, 2>(                                                \
      const S*, int64_t, const T*, int64_t, int64_t, int64_t, ACC, ACC, kdkernels::softmax_kl_cuda::JsdWeights<ACC>, \
      int, ACC*, ACC*, ACC*, ACC*);                                                                                    \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_jsd_forward_kernel<S, T, ACC, 1, 4>(                   \
      const S*, int64_t, const T*, int64_t, int64_t, int64_t, ACC, ACC, kdkernels::softmax_kl_cuda::JsdWeights<ACC>, \
      int, ACC*, ACC*, ACC*, ACC*);                                                                                    \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_jsd_backward_kernel<                                   \
      S, T, ACC, kdkernels::softmax_kl_cuda::VecWidth<S, T>::value>(                                                   \
      const ACC*, const S*, int64_t, const T*, int64_t, const ACC*, const ACC*, const ACC*, int64_t, int64_t, ACC,   \
      kdkernels::softmax_kl_cuda::JsdWeights<ACC>, S*, T*);                                                            \
  template __global__ void kdkernels::softmax_kl_cuda::softmax_jsd_backward_kernel<S, T, ACC, 1>(                     \
      const ACC*, const S*, int64_t, const T*, int64_t, const ACC*, const ACC*, const ACC*, int64_t, int64_t, ACC,   \
      kdkernels::softmax_kl_cuda::JsdWeights<ACC>, S*, T*);

KDKERNELS_SOFTMAX_KL_INSTANTIATE(float, float, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(float, __half, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(float, __nv_bfloat16, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__half, float, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__half, __half, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__half, __nv_bfloat16, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__nv_bfloat16, float, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__nv_bfloat16, __half, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, float)
KDKERNELS_SOFTMAX_KL_INSTANTIATE(double, double, double)
#undef KDKERNELS_SOFTMAX_KL_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
