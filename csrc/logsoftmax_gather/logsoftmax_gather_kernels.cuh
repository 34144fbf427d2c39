// CUDA device code of logsoftmax_gather: log_softmax(x / T) at int64 indices [N, k] (the student side of sparse
// top-k teachers), and its gradient.
//
// Spec: kdkernels/reference/logsoftmax_gather.py.
// Forward: the softmax_kl forward's row walk and launch configurations (../common/cuda_rows.cuh) with a one-sided
// online state -> per-row statistics (max, log_sum = log sum exp((x - max)/T)), every lane of the row holding them;
// then the row's lanes share its k indices: gathered[j] = (x[idx_j] - max)/T - log_sum (-inf for an all -inf row).
// Backward (elementwise, the softmax_kl backward's layout), g = grad_gathered row, G = sum_j g_j,
// p = exp((x - max)/T - log_sum):  grad[c] = 1/T (sum_{j: idx_j == c} g_j - p[c] G),  zeros for an all -inf row.
// Each thread sums the matching g_j of its columns by walking the row's k indices in order (O(V k) compares per row,
// for the small k of top-k teachers; repeated indices add up; deterministic, no atomics).
// An index outside [0, V) is never dereferenced: that row's gathered values and gradients are NaN (its statistics are
// those of the logits, which do not depend on the indices).
#ifndef KDKERNELS_LOGSOFTMAX_GATHER_KERNELS_CUH_
#define KDKERNELS_LOGSOFTMAX_GATHER_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cstdint>

namespace kdkernels {
namespace logsoftmax_gather_cuda {

using namespace cuda_rows;

__device__ __forceinline__ bool any_index_out_of_range(const int64_t* __restrict__ indices, int64_t count,
                                                       int64_t V) {
  bool bad = false;
  for (int64_t j = 0; j < count; ++j) bad = bad || indices[j] < 0 || indices[j] >= V;
  return bad;
}

// group <= 32: group mode (blockDim.x / group rows per block); group == blockDim.x > 32: one block per row.
template <typename X, typename Acc, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    logsoftmax_gather_forward_kernel(const X* __restrict__ logits, int64_t row_stride,
                                     const int64_t* __restrict__ indices, int64_t num_indices, int64_t N, int64_t V,
                                     Acc inv_t, Acc k, int group, Acc* __restrict__ gathered,
                                     Acc* __restrict__ stats) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  const X* x_row = logits + row * row_stride;
  SoftmaxState<Acc> st = empty_softmax_state<Acc>();
  if (row < N) accumulate_row<VEC, UNROLL>(st, V, rl.lane, group, k, x_row);
  reduce_row(st, rl, empty_softmax_state<Acc>(), k);
  if (row >= N) return;

  const Acc log_sum = kd_log(st.d);  // -inf for an all -inf row
  if (rl.lane == 0) {
    stats[2 * row] = st.m;
    stats[2 * row + 1] = log_sum;
  }
  if (rl.lane >= num_indices) return;
  const int64_t* idx_row = indices + row * num_indices;
  Acc* out_row = gathered + row * num_indices;
  const bool bad_row = any_index_out_of_range(idx_row, num_indices, V);
  const bool empty_row = st.m == -pos_inf<Acc>();
  for (int64_t j = rl.lane; j < num_indices; j += group) {
    Acc value;
    if (bad_row) {
      value = quiet_nan<Acc>();
    } else if (empty_row) {
      value = -pos_inf<Acc>();
    } else {
      value = (widen(x_row[idx_row[j]]) - st.m) * inv_t - log_sum;
    }
    out_row[j] = value;
  }
}

// Backward: block (TX, TY), row = blockIdx.x * TY + threadIdx.y, units (VEC columns) blockIdx.y * TX + threadIdx.x
// (+ tiles). grad: contiguous [N, V].
template <typename X, typename Acc, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    logsoftmax_gather_backward_kernel(const Acc* __restrict__ grad_gathered, const X* __restrict__ logits,
                                      int64_t row_stride, const int64_t* __restrict__ indices, int64_t num_indices,
                                      const Acc* __restrict__ stats, int64_t N, int64_t V, Acc inv_t,
                                      X* __restrict__ grad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  const X* x_row = logits + row * row_stride;
  const int64_t* idx_row = indices + row * num_indices;
  const Acc* g_row = grad_gathered + row * num_indices;
  X* grad_row = grad + row * V;
  const Acc max = stats[2 * row], log_sum = stats[2 * row + 1];
  const bool bad_row = any_index_out_of_range(idx_row, num_indices, V);
  const bool empty_row = max == -pos_inf<Acc>();
  Acc g_total = Acc(0);
  for (int64_t j = 0; j < num_indices; ++j) g_total += g_row[j];

  for_each_row_unit(V / VEC, [&](int64_t unit) {
    const int64_t col = unit * VEC;
    AlignedVec<X, VEC> out;
    if (bad_row || empty_row) {
      const Acc fill = bad_row ? quiet_nan<Acc>() : Acc(0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.val[i] = Narrow<X>::from(fill);
    } else {
      Acc scattered[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) scattered[i] = Acc(0);
      for (int64_t j = 0; j < num_indices; ++j) {
        const int64_t offset = idx_row[j] - col;
        if (offset >= 0 && offset < VEC) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) scattered[i] += i == offset ? g_row[j] : Acc(0);
        }
      }
      const AlignedVec<X, VEC> xv = load_vec<X, VEC>(x_row + col);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const Acc p = kd_exp((widen(xv.val[i]) - max) * inv_t - log_sum);
        out.val[i] = Narrow<X>::from(inv_t * (scattered[i] - p * g_total));
      }
    }
    store_vec<X, VEC>(grad_row + col, out);
  });
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers (one kernel launch each, on `stream`; the caller checks the launch).

// Requires N >= 1, V >= 1, N < 2^31 (the launcher checks). indices: contiguous [N, num_indices] (any values: out of
// range -> NaN row); gathered: contiguous [N, num_indices]; stats [N, 2].
template <typename X, typename Acc>
void launch_logsoftmax_gather_forward(const X* logits, int64_t row_stride, const int64_t* indices,
                                      int64_t num_indices, int64_t N, int64_t V, Acc inv_t, Acc* gathered, Acc* stats,
                                      cudaStream_t stream) {
  constexpr int kVec = VecWidth<X, X>::value;
  const bool vectorised = forward_vectorised(logits, row_stride, logits, row_stride, N);
  const Acc k = inv_t * log2e<Acc>();
  if (vectorised) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    logsoftmax_gather_forward_kernel<X, Acc, kVec, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        logits, row_stride, indices, num_indices, N, V, inv_t, k, cfg.group, gathered, stats);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    logsoftmax_gather_forward_kernel<X, Acc, 1, 4><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        logits, row_stride, indices, num_indices, N, V, inv_t, k, cfg.group, gathered, stats);
  }
}

// Requires N >= 1, V >= 1, N < 2^31. grad_gathered / indices contiguous [N, num_indices]; grad contiguous [N, V].
template <typename X, typename Acc>
void launch_logsoftmax_gather_backward(const Acc* grad_gathered, const X* logits, int64_t row_stride,
                                       const int64_t* indices, int64_t num_indices, const Acc* stats, int64_t N,
                                       int64_t V, Acc inv_t, X* grad, cudaStream_t stream) {
  constexpr int kVec = VecWidth<X, X>::value;
  const bool vectorised =
      backward_vectorised(logits, row_stride, logits, row_stride, N, V, grad, static_cast<const X*>(nullptr));
  const BackwardConfig cfg = backward_config(N, V / (vectorised ? kVec : 1));
  if (vectorised) {
    logsoftmax_gather_backward_kernel<X, Acc, kVec><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_gathered, logits, row_stride, indices, num_indices, stats, N, V, inv_t, grad);
  } else {
    logsoftmax_gather_backward_kernel<X, Acc, 1><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_gathered, logits, row_stride, indices, num_indices, stats, N, V, inv_t, grad);
  }
}

}  // namespace logsoftmax_gather_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_LOGSOFTMAX_GATHER_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc):
// every kernel the launchers can launch, for every logits dtype the launcher dispatches to.
#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE(X, ACC)                                                                \
  template void kdkernels::logsoftmax_gather_cuda::launch_logsoftmax_gather_forward<X, ACC>(                           \
      const X*, int64_t, const int64_t*, int64_t, int64_t, int64_t, ACC, ACC*, ACC*, cudaStream_t);                   \
  template void kdkernels::logsoftmax_gather_cuda::launch_logsoftmax_gather_backward<X, ACC>(                          \
      const ACC*, const X*, int64_t, const int64_t*, int64_t, const ACC*, int64_t, int64_t, ACC, X*, cudaStream_t);

KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE(float, float)
KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE(__half, float)
KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE(__nv_bfloat16, float)
KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE(double, double)
#undef KDKERNELS_LOGSOFTMAX_GATHER_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
