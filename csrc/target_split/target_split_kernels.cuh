// CUDA device code of target_split: DKD's and NKD's per-row terms and their gradients.
//
// Spec: kdkernels/reference/target_split.py. For a row with label y, a = s/T, b = t/T and the non-target softmaxes
// q_s, q_t (over the V - 1 columns c != y), the forward returns
//   terms = (log p_s[y], log(1 - p_s[y]), log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t))
// and per side the statistics (max, log_sum) over the NON-target columns, so that log q = (x - max)/T - log_sum.
//
// Forward: the softmax_kl forward's row walk and launch configurations (../common/cuda_rows.cuh), one pass with
// column y masked to -inf, accumulating the KlState with entropy (per side max and sum exp((x - ~m)/T),
// acc = sum e_t (t^ - s^), h = sum e_t t^ in raw units); then the row's first lane loads x_y directly and, per side,
//   x^_y = (x_y - ~max)/T, L = log sum, full = logaddexp(x^_y, L), log p[y] = x^_y - full, log(1 - p[y]) = L - full
//   (both -inf when full == -inf: a side with every column -inf);
//   KL = (acc / dt)/T - L_t + L_s  (0 if the teacher's non-target set is empty, +inf if only the student's is),
//   H  = L_t - (h / dt)/T           (0 if the teacher's non-target set is empty).
// Backward (elementwise, the softmax_kl backward's layout), g = grad_terms row, q = exp((x - max)/T - L) (0 for an
// empty non-target set), p[y] = exp(term0), 1 - p[y] = exp(term1):
//   c != y: grad_s = 1/T (q_s (g1 p_s[y] - g0 (1 - p_s[y]) + g4) - g4 q_t)
//           grad_t = 1/T q_t (g3 p_t[y] - g2 (1 - p_t[y]) + g4 (log q_t - log q_s - KL) - g5 (log q_t + H)),
//                    0 where q_t == 0
//   c == y: grad_s = 1/T (g0 (1 - p_s[y]) - g1 p_s[y]),  grad_t = 1/T (g2 (1 - p_t[y]) - g3 p_t[y]).
// g4 is taken as 0 where the KL term is a constant of the spec (teacher non-target set empty: KL = 0; a student -inf
// under teacher mass: KL = +inf), as the reference's autograd does wherever it is finite.
// A label outside [0, V) is never used as an index: that row's terms, statistics and gradients are NaN.
// Deterministic (fixed reduction order, no atomics).
#ifndef KDKERNELS_TARGET_SPLIT_KERNELS_CUH_
#define KDKERNELS_TARGET_SPLIT_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cstdint>

namespace kdkernels {
namespace target_split_cuda {

using namespace cuda_rows;

template <typename Acc>
using SplitState = KlState<Acc, /*kEntropy=*/true>;

__device__ __forceinline__ bool label_in_range(int64_t label, int64_t V) { return label >= 0 && label < V; }

// A copy of a loaded chunk with the label's column (if it is in the chunk) set to -inf.
template <int N, typename Acc, typename Columns>
__device__ __forceinline__ Chunk<Acc, N> without_column(const Acc (&x)[N], const Columns& columns, int64_t label) {
  Chunk<Acc, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.v[i] = columns[i] == label ? -pos_inf<Acc>() : x[i];
  return out;
}

template <typename Acc>
struct SideTerms {
  Acc log_p_target, log_p_rest;
};

// log p[y] and log(1 - p[y]) of one side from its raw target logit and non-target (max, log_sum).
template <typename Acc>
__device__ __forceinline__ SideTerms<Acc> side_terms(Acc x_target, Acc max, Acc log_sum, Acc inv_t) {
  const Acc scaled_target = (x_target - safe_shift(max)) * inv_t;
  const Acc full = log_add_exp(scaled_target, log_sum);
  if (full == -pos_inf<Acc>()) return SideTerms<Acc>{full, full};
  return SideTerms<Acc>{scaled_target - full, log_sum - full};
}

template <typename Acc>
__device__ __forceinline__ void write_nan_row(Acc* __restrict__ terms, Acc* __restrict__ stats_student,
                                              Acc* __restrict__ stats_teacher, int64_t row) {
  const Acc nan = quiet_nan<Acc>();
  for (int i = 0; i < 6; ++i) terms[6 * row + i] = nan;
  for (int i = 0; i < 2; ++i) {
    stats_student[2 * row + i] = nan;
    stats_teacher[2 * row + i] = nan;
  }
}

// group <= 32: group mode (blockDim.x / group rows per block); group == blockDim.x > 32: one block per row.
template <typename S, typename T, typename Acc, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    target_split_forward_kernel(const S* __restrict__ student, int64_t student_row_stride,
                                const T* __restrict__ teacher, int64_t teacher_row_stride,
                                const int64_t* __restrict__ labels, int64_t N, int64_t V, Acc inv_t, Acc k, int group,
                                Acc* __restrict__ terms, Acc* __restrict__ stats_student,
                                Acc* __restrict__ stats_teacher) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  const S* s_row = student + row * student_row_stride;
  const T* t_row = teacher + row * teacher_row_stride;
  const int64_t label = row < N ? labels[row] : -1;
  SplitState<Acc> st = empty_kl_state<Acc, true>();
  if (row < N) {  // out-of-range lanes keep the empty state but still take part in the shuffles
    for_each_row_chunk<VEC, UNROLL, Acc>(
        V, rl.lane, group,
        [&](const auto& columns, const auto& s, const auto& t) {
          accumulate_chunk(st, without_column(s, columns, label).v, without_column(t, columns, label).v, k);
        },
        s_row, t_row);
  }
  reduce_row(st, rl, empty_kl_state<Acc, true>(), k);
  if (rl.lane != 0 || row >= N) return;
  if (!label_in_range(label, V)) {
    write_nan_row(terms, stats_student, stats_teacher, row);
    return;
  }

  const Acc neg_inf = -pos_inf<Acc>();
  const Acc log_sum_s = kd_log(st.ds), log_sum_t = kd_log(st.dt);  // -inf for an empty non-target set
  const SideTerms<Acc> ts = side_terms(widen(s_row[label]), st.ms, log_sum_s, inv_t);
  const SideTerms<Acc> tt = side_terms(widen(t_row[label]), st.mt, log_sum_t, inv_t);
  Acc kl, entropy;
  if (st.mt == neg_inf) {
    kl = entropy = Acc(0);  // empty teacher non-target set
  } else {
    kl = st.ms == neg_inf ? pos_inf<Acc>() : (st.acc / st.dt) * inv_t - log_sum_t + log_sum_s;
    entropy = log_sum_t - (st.h / st.dt) * inv_t;
  }
  Acc* out = terms + 6 * row;
  out[0] = ts.log_p_target;
  out[1] = ts.log_p_rest;
  out[2] = tt.log_p_target;
  out[3] = tt.log_p_rest;
  out[4] = kl;
  out[5] = entropy;
  stats_student[2 * row] = st.ms;
  stats_student[2 * row + 1] = log_sum_s;
  stats_teacher[2 * row] = st.mt;
  stats_teacher[2 * row + 1] = log_sum_t;
}

// The per-row constants of the backward.
template <typename Acc>
struct SplitRowGrad {
  Acc max_s, log_sum_s, max_t, log_sum_t;
  bool empty_s, empty_t;    // a side's non-target set is all -inf (q = 0)
  Acc student_weight;       // g1 p_s[y] - g0 (1 - p_s[y]) + g4
  Acc teacher_weight;       // g3 p_t[y] - g2 (1 - p_t[y])
  Acc grad_target_s;        // 1/T (g0 (1 - p_s[y]) - g1 p_s[y])
  Acc grad_target_t;        // 1/T (g2 (1 - p_t[y]) - g3 p_t[y])
  Acc g4, g5, kl, entropy;  // g4 = 0 where KL is a constant of the spec
  bool zero;                // every g is 0
};

template <typename Acc>
__device__ __forceinline__ SplitRowGrad<Acc> split_row_grad(const Acc* __restrict__ g, const Acc* __restrict__ terms,
                                                            const Acc* __restrict__ stats_s,
                                                            const Acc* __restrict__ stats_t, Acc inv_t) {
  SplitRowGrad<Acc> r;
  r.max_s = stats_s[0];
  r.log_sum_s = stats_s[1];
  r.max_t = stats_t[0];
  r.log_sum_t = stats_t[1];
  r.empty_s = r.max_s == -pos_inf<Acc>();
  r.empty_t = r.max_t == -pos_inf<Acc>();
  const Acc p_s = kd_exp(terms[0]), rest_s = kd_exp(terms[1]);
  const Acc p_t = kd_exp(terms[2]), rest_t = kd_exp(terms[3]);
  r.kl = terms[4];
  r.entropy = terms[5];
  const bool kl_varies = !r.empty_t && r.kl < pos_inf<Acc>();
  r.g4 = kl_varies ? g[4] : Acc(0);
  r.g5 = g[5];
  r.student_weight = g[1] * p_s - g[0] * rest_s + r.g4;
  r.teacher_weight = g[3] * p_t - g[2] * rest_t;
  r.grad_target_s = inv_t * (g[0] * rest_s - g[1] * p_s);
  r.grad_target_t = inv_t * (g[2] * rest_t - g[3] * p_t);
  r.zero = true;
  for (int i = 0; i < 6; ++i) r.zero = r.zero && g[i] == Acc(0);
  return r;
}

// Backward: block (TX, TY), row = blockIdx.x * TY + threadIdx.y, units blockIdx.y * TX + threadIdx.x (+ tiles).
template <typename S, typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    target_split_backward_kernel(const Acc* __restrict__ grad_terms, const S* __restrict__ student,
                                 int64_t student_row_stride, const T* __restrict__ teacher,
                                 int64_t teacher_row_stride, const int64_t* __restrict__ labels,
                                 const Acc* __restrict__ stats_student, const Acc* __restrict__ stats_teacher,
                                 const Acc* __restrict__ terms, int64_t N, int64_t V, Acc inv_t,
                                 S* __restrict__ grad_student, T* __restrict__ grad_teacher) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  const int64_t label = labels[row];
  const bool bad_label = !label_in_range(label, V);
  const SplitRowGrad<Acc> r =
      split_row_grad(grad_terms + 6 * row, terms + 6 * row, stats_student + 2 * row, stats_teacher + 2 * row, inv_t);
  const Acc neg_inf = -pos_inf<Acc>();
  backward_row_elementwise<S, T, Acc, VEC>(
      row, student, student_row_stride, teacher, teacher_row_stride, V, r.zero && !bad_label, grad_student,
      grad_teacher, [&](int64_t col, Acc s, Acc t, Acc& grad_s, Acc& grad_t) {
        if (bad_label) {
          grad_s = grad_t = quiet_nan<Acc>();
        } else if (col == label) {
          grad_s = r.grad_target_s;
          grad_t = r.grad_target_t;
        } else {
          const Acc log_q_s = r.empty_s ? neg_inf : (s - r.max_s) * inv_t - r.log_sum_s;
          const Acc log_q_t = r.empty_t ? neg_inf : (t - r.max_t) * inv_t - r.log_sum_t;
          const Acc q_s = kd_exp(log_q_s), q_t = kd_exp(log_q_t);
          grad_s = inv_t * (q_s * r.student_weight - r.g4 * q_t);
          if (q_t == Acc(0)) {
            grad_t = Acc(0);
          } else {
            const Acc kl_part =
                r.g4 == Acc(0) || log_q_s == neg_inf ? Acc(0) : r.g4 * (log_q_t - log_q_s - r.kl);
            grad_t = inv_t * q_t * (r.teacher_weight + kl_part - r.g5 * (log_q_t + r.entropy));
          }
        }
      });
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers (one kernel launch each, on `stream`; the caller checks the launch).

// Requires N >= 1, V >= 1, N < 2^31 (the launcher checks). labels: N int64 values (any: out of range -> NaN row).
template <typename S, typename T, typename Acc>
void launch_target_split_forward(const S* student, int64_t student_row_stride, const T* teacher,
                                 int64_t teacher_row_stride, const int64_t* labels, int64_t N, int64_t V, Acc inv_t,
                                 Acc* terms, Acc* stats_student, Acc* stats_teacher, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = forward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N);
  const Acc k = inv_t * log2e<Acc>();
  if (vectorised) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    target_split_forward_kernel<S, T, Acc, kVec, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, labels, N, V, inv_t, k, cfg.group, terms,
        stats_student, stats_teacher);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    target_split_forward_kernel<S, T, Acc, 1, 4><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, labels, N, V, inv_t, k, cfg.group, terms,
        stats_student, stats_teacher);
  }
}

// Requires N >= 1, V >= 1, N < 2^31. grad_terms / terms [N, 6], stats [N, 2] contiguous; grad_student /
// grad_teacher: contiguous [N, V] or nullptr (at least one non-null).
template <typename S, typename T, typename Acc>
void launch_target_split_backward(const Acc* grad_terms, const S* student, int64_t student_row_stride,
                                  const T* teacher, int64_t teacher_row_stride, const int64_t* labels,
                                  const Acc* stats_student, const Acc* stats_teacher, const Acc* terms, int64_t N,
                                  int64_t V, Acc inv_t, S* grad_student, T* grad_teacher, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = backward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N, V,
                                              grad_student, grad_teacher);
  const BackwardConfig cfg = backward_config(N, V / (vectorised ? kVec : 1));
  if (vectorised) {
    target_split_backward_kernel<S, T, Acc, kVec><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_terms, student, student_row_stride, teacher, teacher_row_stride, labels, stats_student, stats_teacher,
        terms, N, V, inv_t, grad_student, grad_teacher);
  } else {
    target_split_backward_kernel<S, T, Acc, 1><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_terms, student, student_row_stride, teacher, teacher_row_stride, labels, stats_student, stats_teacher,
        terms, N, V, inv_t, grad_student, grad_teacher);
  }
}

}  // namespace target_split_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_TARGET_SPLIT_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc):
// every kernel the launchers can launch, for every (student, teacher) type pair the launcher dispatches to.
#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_TARGET_SPLIT_INSTANTIATE(S, T, ACC)                                                                  \
  template void kdkernels::target_split_cuda::launch_target_split_forward<S, T, ACC>(                                  \
      const S*, int64_t, const T*, int64_t, const int64_t*, int64_t, int64_t, ACC, ACC*, ACC*, ACC*, cudaStream_t);   \
  template void kdkernels::target_split_cuda::launch_target_split_backward<S, T, ACC>(                                 \
      const ACC*, const S*, int64_t, const T*, int64_t, const int64_t*, const ACC*, const ACC*, const ACC*, int64_t,  \
      int64_t, ACC, S*, T*, cudaStream_t);

KDKERNELS_TARGET_SPLIT_INSTANTIATE(float, float, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(float, __half, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(float, __nv_bfloat16, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__half, float, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__half, __half, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__half, __nv_bfloat16, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__nv_bfloat16, float, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__nv_bfloat16, __half, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, float)
KDKERNELS_TARGET_SPLIT_INSTANTIATE(double, double, double)
#undef KDKERNELS_TARGET_SPLIT_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
