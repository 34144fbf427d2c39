// CUDA device code of the softmax_kl family: per-row KL(softmax(t/T) || softmax(s/T)) and its gradients.
//
// No torch include: raw pointers, int64 sizes and row strides, so this header compiles with plain nvcc. The torch
// launcher (softmax_kl_cuda.cu) checks the tensors and calls launch_softmax_kl_forward / _backward below, which pick
// the launch configuration and launch exactly one kernel each on the given stream.
//
// Numerical spec: kdkernels/reference/softmax_kl.py. Inputs: student/teacher logits S, T in {float, __half,
// __nv_bfloat16} with float accumulation, or double/double with double accumulation. Each element is widened to
// Acc as soon as it is loaded; all arithmetic is in Acc.
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
// Launch heuristics (bandwidth-bound; see ../shared/reference/kernels.md §6):
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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

namespace kdkernels {
namespace softmax_kl_cuda {

// ----------------------------------------------------------------------------------------------------------------
// Element conversions and math in the accumulation type. Explicit intrinsics only: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename Out>
struct Narrow;
template <>
struct Narrow<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
};
template <>
struct Narrow<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Narrow<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Narrow<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
};

__device__ __forceinline__ float kd_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double kd_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float kd_log(float x) { return logf(x); }
__device__ __forceinline__ double kd_log(double x) { return log(x); }
__device__ __forceinline__ float kd_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double kd_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float kd_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double kd_max(double a, double b) { return fmax(a, b); }

template <typename Acc>
__device__ __forceinline__ Acc pos_inf();
template <>
__device__ __forceinline__ float pos_inf<float>() {
  return CUDART_INF_F;
}
template <>
__device__ __forceinline__ double pos_inf<double>() {
  return CUDART_INF;
}

template <typename Acc>
__host__ __device__ __forceinline__ constexpr Acc log2e() {
  return static_cast<Acc>(1.44269504088896340735992468100189214);
}

// 16 / max(sizeof(S), sizeof(T)) elements: the wider input gets 16-byte loads.
template <typename S, typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
};

template <typename X, int N>
struct alignas(sizeof(X) * N) AlignedVec {
  X val[N];
};

template <typename X, int N>
__device__ __forceinline__ AlignedVec<X, N> load_vec(const X* __restrict__ p) {
  return *reinterpret_cast<const AlignedVec<X, N>*>(p);
}

template <typename X, int N>
__device__ __forceinline__ void store_vec(X* __restrict__ p, const AlignedVec<X, N>& v) {
  *reinterpret_cast<AlignedVec<X, N>*>(p) = v;
}

// ----------------------------------------------------------------------------------------------------------------
// Forward online state (raw logit units; see the header comment).

template <typename Acc>
struct KlState {
  Acc ms, ds, mt, dt, acc;
};

template <typename Acc>
__device__ __forceinline__ KlState<Acc> empty_state() {
  return KlState<Acc>{-pos_inf<Acc>(), Acc(0), -pos_inf<Acc>(), Acc(0), Acc(0)};
}

template <typename Acc>
__device__ __forceinline__ Acc safe_shift(Acc m) {
  return m == -pos_inf<Acc>() ? Acc(0) : m;
}

// Moves `st` to the maxima (new_ms >= st.ms, new_mt >= st.mt). k = log2(e)/T.
template <typename Acc>
__device__ __forceinline__ void rebase(KlState<Acc>& st, Acc new_ms, Acc new_mt, Acc k) {
  const Acc old_shift_s = safe_shift(st.ms), new_shift_s = safe_shift(new_ms);
  const Acc old_shift_t = safe_shift(st.mt), new_shift_t = safe_shift(new_mt);
  if (st.mt != -pos_inf<Acc>()) {  // else dt == acc == 0: nothing to scale
    const Acc c = kd_exp2((old_shift_t - new_shift_t) * k);
    if (c == Acc(0)) {
      st.acc = Acc(0);
      st.dt = Acc(0);
    } else {
      st.acc = c * (st.acc + ((new_shift_s - old_shift_s) - (new_shift_t - old_shift_t)) * st.dt);
      st.dt *= c;
    }
  }
  if (st.ms != -pos_inf<Acc>()) st.ds *= kd_exp2((old_shift_s - new_shift_s) * k);
  st.ms = new_ms;
  st.mt = new_mt;
}

template <typename Acc>
__device__ __forceinline__ void merge_into(KlState<Acc>& st, KlState<Acc> other, Acc k) {
  const Acc ms = kd_max(st.ms, other.ms), mt = kd_max(st.mt, other.mt);
  rebase(st, ms, mt, k);
  rebase(other, ms, mt, k);
  st.ds += other.ds;
  st.dt += other.dt;
  st.acc += other.acc;
}

// Adds n loaded elements (already widened; padding entries are -inf in both, which contribute nothing).
template <int N, typename Acc>
__device__ __forceinline__ void accumulate_chunk(KlState<Acc>& st, const Acc (&s)[N], const Acc (&t)[N], Acc k) {
  Acc chunk_ms = s[0], chunk_mt = t[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
    chunk_ms = kd_max(chunk_ms, s[j]);
    chunk_mt = kd_max(chunk_mt, t[j]);
  }
  if (chunk_ms > st.ms || chunk_mt > st.mt) rebase(st, kd_max(st.ms, chunk_ms), kd_max(st.mt, chunk_mt), k);
  const Acc shift_s = safe_shift(st.ms), shift_t = safe_shift(st.mt);
  Acc ds = Acc(0), dt = Acc(0), acc = Acc(0);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const Acc rel_s = s[j] - shift_s;  // raw units, <= 0
    const Acc rel_t = t[j] - shift_t;
    const Acc e_s = kd_exp2(rel_s * k);
    const Acc e_t = kd_exp2(rel_t * k);
    ds += e_s;
    dt += e_t;
    // e_t == 0 terms are exactly 0 (avoids 0 * inf = NaN when both entries are -inf).
    acc += e_t > Acc(0) ? e_t * (rel_t - rel_s) : Acc(0);
  }
  st.ds += ds;
  st.dt += dt;
  st.acc += acc;
}

// Merges the states of `width` consecutive lanes (power of two <= 32, aligned); all 32 lanes must be active.
template <typename Acc>
__device__ __forceinline__ void reduce_lanes(KlState<Acc>& st, int width, Acc k) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    KlState<Acc> other;
    other.ms = __shfl_xor_sync(0xffffffffu, st.ms, offset);
    other.ds = __shfl_xor_sync(0xffffffffu, st.ds, offset);
    other.mt = __shfl_xor_sync(0xffffffffu, st.mt, offset);
    other.dt = __shfl_xor_sync(0xffffffffu, st.dt, offset);
    other.acc = __shfl_xor_sync(0xffffffffu, st.acc, offset);
    merge_into(st, other, k);
  }
}

// Accumulates this lane's share of one row: load units lane, lane + G, lane + 2G, ... (a unit is VEC elements),
// then, when VEC > 1, the V % VEC tail with scalar loads.
template <int VEC, int UNROLL, typename S, typename T, typename Acc>
__device__ __forceinline__ void accumulate_row(KlState<Acc>& st, const S* __restrict__ s_row,
                                               const T* __restrict__ t_row, int64_t V, int lane, int group, Acc k) {
  const int64_t units = V / VEC;
  const int64_t step = static_cast<int64_t>(group) * UNROLL;
  for (int64_t base = lane; base < units; base += step) {
    Acc s[UNROLL * VEC], t[UNROLL * VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t unit = base + static_cast<int64_t>(u) * group;
      if (unit < units) {
        if constexpr (VEC == 1) {
          s[u] = widen(s_row[unit]);
          t[u] = widen(t_row[unit]);
        } else {
          const AlignedVec<S, VEC> sv = load_vec<S, VEC>(s_row + unit * VEC);
          const AlignedVec<T, VEC> tv = load_vec<T, VEC>(t_row + unit * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            s[u * VEC + j] = widen(sv.val[j]);
            t[u * VEC + j] = widen(tv.val[j]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          s[u * VEC + j] = -pos_inf<Acc>();
          t[u * VEC + j] = -pos_inf<Acc>();
        }
      }
    }
    accumulate_chunk<UNROLL * VEC>(st, s, t, k);
  }
  if constexpr (VEC > 1) {
    for (int64_t j = units * VEC + lane; j < V; j += group) {
      const Acc s1[1] = {widen(s_row[j])};
      const Acc t1[1] = {widen(t_row[j])};
      accumulate_chunk<1>(st, s1, t1, k);
    }
  }
}

// Block mode uses at most 512 threads a row and asks for 2 resident blocks per SM (<= 64 registers a thread; the
// float kernels need <= 57), so that one block's end-of-row reduction overlaps the other block's loads. Double rows
// ask for 1 (they need ~110 registers; with 64 they spill).
constexpr int kForwardMaxThreads = 512;
template <typename Acc>
struct ForwardMinBlocksPerSm {
  static constexpr int value = sizeof(Acc) > 4 ? 1 : 2;
};
constexpr int kForwardGroupBlock = 256;  // threads per block in group mode
constexpr int kBackwardThreads = 256;

// group <= 32: group mode (blockDim.x / group rows per block); group == blockDim.x > 32: one block per row.
template <typename S, typename T, typename Acc, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    softmax_kl_forward_kernel(const S* __restrict__ student, int64_t student_row_stride, const T* __restrict__ teacher,
                              int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, Acc k, int group,
                              Acc* __restrict__ loss, Acc* __restrict__ stats_student, Acc* __restrict__ stats_teacher) {
  const int tid = static_cast<int>(threadIdx.x);
  const bool block_mode = group > 32;
  int64_t row;
  int lane;
  if (block_mode) {
    row = blockIdx.x;
    lane = tid;
  } else {
    row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + tid / group;
    lane = tid % group;
  }

  KlState<Acc> st = empty_state<Acc>();
  if (row < N) {  // out-of-range lanes keep the empty state but still take part in the shuffles
    accumulate_row<VEC, UNROLL>(st, student + row * student_row_stride, teacher + row * teacher_row_stride, V, lane,
                                group, k);
  }
  reduce_lanes(st, block_mode ? 32 : group, k);

  if (block_mode) {
    __shared__ Acc partial[5][32];
    const int warp = tid / 32;
    const int num_warps = static_cast<int>(blockDim.x) / 32;
    if (tid % 32 == 0) {
      partial[0][warp] = st.ms;
      partial[1][warp] = st.ds;
      partial[2][warp] = st.mt;
      partial[3][warp] = st.dt;
      partial[4][warp] = st.acc;
    }
    __syncthreads();
    if (warp != 0) return;
    st = tid < num_warps ? KlState<Acc>{partial[0][tid], partial[1][tid], partial[2][tid], partial[3][tid],
                                        partial[4][tid]}
                         : empty_state<Acc>();
    reduce_lanes(st, 32, k);
    if (tid != 0) return;
  } else if (lane != 0 || row >= N) {
    return;
  }

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

  const S* s_row = student + row * student_row_stride;
  const T* t_row = teacher + row * teacher_row_stride;
  S* gs_row = grad_student != nullptr ? grad_student + row * V : nullptr;
  T* gt_row = grad_teacher != nullptr ? grad_teacher + row * V : nullptr;

  const int64_t units = V / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; unit < units; unit += step) {
    const int64_t col = unit * VEC;
    AlignedVec<S, VEC> gs;
    AlignedVec<T, VEC> gt;
    if (zero_row) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gs.val[j] = Narrow<S>::from(Acc(0));
        gt.val[j] = Narrow<T>::from(Acc(0));
      }
    } else {
      const AlignedVec<S, VEC> sv = load_vec<S, VEC>(s_row + col);
      const AlignedVec<T, VEC> tv = load_vec<T, VEC>(t_row + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const Acc x_s = student_empty ? neg_inf : (widen(sv.val[j]) - max_s) * inv_t - log_sum_s;  // log p_s
        const Acc x_t = (widen(tv.val[j]) - max_t) * inv_t - log_sum_t;                            // log p_t
        const Acc p_s = kd_exp2(x_s * l2e);
        const Acc p_t = kd_exp2(x_t * l2e);
        gs.val[j] = Narrow<S>::from(scale * (p_s - p_t));
        gt.val[j] = Narrow<T>::from(p_t == Acc(0) ? Acc(0) : scale * p_t * (x_t - x_s - row_loss));
      }
    }
    if (gs_row != nullptr) store_vec<S, VEC>(gs_row + col, gs);
    if (gt_row != nullptr) store_vec<T, VEC>(gt_row + col, gt);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers (one kernel launch each, on `stream`; the caller checks the launch).

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

struct ForwardConfig {
  int group;    // lanes per row (<= 32: group mode) or threads per block (> 32: one block per row)
  int threads;  // blockDim.x
  int64_t blocks;
};

inline ForwardConfig forward_config(int64_t N, int64_t units) {
  ForwardConfig cfg;
  if (units <= 256) {
    cfg.group = static_cast<int>(clamp64(next_pow2((units + 3) / 4), 1, 32));
    cfg.threads = kForwardGroupBlock;
    const int64_t rows_per_block = kForwardGroupBlock / cfg.group;
    cfg.blocks = (N + rows_per_block - 1) / rows_per_block;
  } else {
    cfg.group = static_cast<int>(clamp64(next_pow2((units + 7) / 8), 64, kForwardMaxThreads));
    cfg.threads = cfg.group;
    cfg.blocks = N;
  }
  return cfg;
}

// Requires N >= 1, V >= 1, N < 2^31 (the launcher checks). inv_t = 1/T in Acc.
template <typename S, typename T, typename Acc>
void launch_softmax_kl_forward(const S* student, int64_t student_row_stride, const T* teacher,
                               int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, Acc* loss,
                               Acc* stats_student, Acc* stats_teacher, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const bool vectorised = kVec > 1 && is_aligned(student, kVec * sizeof(S)) && is_aligned(teacher, kVec * sizeof(T)) &&
                          (N == 1 || (student_row_stride % kVec == 0 && teacher_row_stride % kVec == 0));
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
  const bool vectorised =
      kVec > 1 && V % kVec == 0 && is_aligned(student, kVec * sizeof(S)) && is_aligned(teacher, kVec * sizeof(T)) &&
      (grad_student == nullptr || is_aligned(grad_student, kVec * sizeof(S))) &&
      (grad_teacher == nullptr || is_aligned(grad_teacher, kVec * sizeof(T))) &&
      (N == 1 || (student_row_stride % kVec == 0 && teacher_row_stride % kVec == 0));
  const int vec = vectorised ? kVec : 1;
  const int64_t units = V / vec;
  const int tx = static_cast<int>(clamp64(next_pow2(units), 1, kBackwardThreads));
  const int ty = kBackwardThreads / tx;
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  const dim3 grid(static_cast<unsigned>((N + ty - 1) / ty), static_cast<unsigned>(clamp64((units + tx - 1) / tx, 1, 65535)));
  if (vectorised) {
    softmax_kl_backward_kernel<S, T, Acc, kVec><<<grid, block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, loss, N, V,
        inv_t, grad_student, grad_teacher);
  } else {
    softmax_kl_backward_kernel<S, T, Acc, 1><<<grid, block, 0, stream>>>(
        grad_loss, student, student_row_stride, teacher, teacher_row_stride, stats_student, stats_teacher, loss, N, V,
        inv_t, grad_student, grad_teacher);
  }
}

}  // namespace softmax_kl_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_SOFTMAX_KL_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc).
// Instantiating the two launch helpers for every (student, teacher) type pair the launcher dispatches to
// instantiates every kernel the launcher can launch (vector and scalar variants of both kernels); the kernels are
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
      S*, T*);

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
