// CUDA building blocks shared by the row kernels of every family (softmax_kl, target_split, logsoftmax_gather,
// dist): element conversions and math in the accumulation type, aligned vector loads, the per-side online softmax
// state (max, sum exp((x - max)/T)) in raw logit units, warp / block reductions of any mergeable state, the row walk
// of the forward-style kernels (a group of lanes or a whole block per row) and the elementwise row loop of the
// backward-style kernels, and the launch heuristics both use (see softmax_kl_kernels.cuh for their rationale).
//
// No torch include: this header compiles with plain nvcc. Everything lives in kdkernels::cuda_rows; each family's
// namespace pulls it in with a using-directive.
#ifndef KDKERNELS_COMMON_CUDA_ROWS_CUH_
#define KDKERNELS_COMMON_CUDA_ROWS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace kdkernels {
namespace cuda_rows {

// The backend's element types, as the host dispatch (common/host.h: dispatch_logits_pair) names them.
struct CudaElements {
  using half = __half;
  using bfloat16 = __nv_bfloat16;
};

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
__device__ __forceinline__ float kd_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double kd_min(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float kd_exp(float x) { return expf(x); }
__device__ __forceinline__ double kd_exp(double x) { return exp(x); }
__device__ __forceinline__ float kd_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double kd_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float kd_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double kd_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float kd_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double kd_abs(double x) { return fabs(x); }
__device__ __forceinline__ float kd_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double kd_sqrt(double x) { return sqrt(x); }

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
__device__ __forceinline__ Acc quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return CUDART_NAN_F;
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return CUDART_NAN;
}

template <typename Acc>
__host__ __device__ __forceinline__ constexpr Acc log2e() {
  return static_cast<Acc>(1.44269504088896340735992468100189214);
}

// log(exp(a) + exp(b)), -inf when both are -inf.
template <typename Acc>
__device__ __forceinline__ Acc log_add_exp(Acc a, Acc b) {
  const Acc hi = kd_max(a, b), lo = kd_min(a, b);
  return hi == -pos_inf<Acc>() ? hi : hi + kd_log1p(kd_exp(lo - hi));
}

// ----------------------------------------------------------------------------------------------------------------
// Vector loads.

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
// Online softmax state of one side in raw logit units: m = running max, d = sum exp((x - ~m)/T) with the safe shift
// ~m = (m == -inf) ? 0 : m, so that an all -inf side is (-inf, 0) and log p = (x - m)/T - log(d).

template <typename Acc>
__device__ __forceinline__ Acc safe_shift(Acc m) {
  return m == -pos_inf<Acc>() ? Acc(0) : m;
}

// Moves one side's (m, d) to the max new_m >= m. k = log2(e)/T.
template <typename Acc>
__device__ __forceinline__ void rebase_side(Acc& m, Acc& d, Acc new_m, Acc k) {
  if (m != -pos_inf<Acc>()) d *= kd_exp2((safe_shift(m) - safe_shift(new_m)) * k);  // else d == 0 stays 0
  m = new_m;
}

template <typename Acc>
__device__ __forceinline__ void merge_side(Acc& m, Acc& d, Acc other_m, Acc other_d, Acc k) {
  const Acc new_m = kd_max(m, other_m);
  rebase_side(m, d, new_m, k);
  rebase_side(other_m, other_d, new_m, k);
  d += other_d;
}

// Adds N loaded elements of one side (padding entries are -inf and contribute nothing).
template <int N, typename Acc>
__device__ __forceinline__ void accumulate_side(Acc& m, Acc& d, const Acc (&x)[N], Acc k) {
  Acc chunk_m = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) chunk_m = kd_max(chunk_m, x[j]);
  if (chunk_m > m) rebase_side(m, d, chunk_m, k);
  const Acc shift = safe_shift(m);
  Acc sum = Acc(0);
#pragma unroll
  for (int j = 0; j < N; ++j) sum += kd_exp2((x[j] - shift) * k);
  d += sum;
}

// One side's state, and a (student, teacher) pair of them.
template <typename Acc>
struct SoftmaxState {
  Acc m, d;
};

template <typename Acc>
struct SoftmaxPairState {
  Acc ms, ds, mt, dt;
};

template <typename Acc>
__device__ __forceinline__ SoftmaxState<Acc> empty_softmax_state() {
  return SoftmaxState<Acc>{-pos_inf<Acc>(), Acc(0)};
}

template <typename Acc>
__device__ __forceinline__ SoftmaxPairState<Acc> empty_pair_state() {
  return SoftmaxPairState<Acc>{-pos_inf<Acc>(), Acc(0), -pos_inf<Acc>(), Acc(0)};
}

template <typename Acc>
__device__ __forceinline__ void merge_into(SoftmaxState<Acc>& st, SoftmaxState<Acc> other, Acc k) {
  merge_side(st.m, st.d, other.m, other.d, k);
}

template <typename Acc>
__device__ __forceinline__ void merge_into(SoftmaxPairState<Acc>& st, SoftmaxPairState<Acc> other, Acc k) {
  merge_side(st.ms, st.ds, other.ms, other.ds, k);
  merge_side(st.mt, st.dt, other.mt, other.dt, k);
}

template <int N, typename Acc>
__device__ __forceinline__ void accumulate_chunk(SoftmaxState<Acc>& st, const Acc (&x)[N], Acc k) {
  accumulate_side(st.m, st.d, x, k);
}

template <int N, typename Acc>
__device__ __forceinline__ void accumulate_chunk(SoftmaxPairState<Acc>& st, const Acc (&s)[N], const Acc (&t)[N],
                                                 Acc k) {
  accumulate_side(st.ms, st.ds, s, k);
  accumulate_side(st.mt, st.dt, t, k);
}

template <typename Acc>
__device__ __forceinline__ SoftmaxState<Acc> shfl_xor_state(const SoftmaxState<Acc>& st, int offset) {
  return SoftmaxState<Acc>{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.d, offset)};
}

template <typename Acc>
__device__ __forceinline__ SoftmaxPairState<Acc> shfl_xor_state(const SoftmaxPairState<Acc>& st, int offset) {
  SoftmaxPairState<Acc> other;
  other.ms = __shfl_xor_sync(0xffffffffu, st.ms, offset);
  other.ds = __shfl_xor_sync(0xffffffffu, st.ds, offset);
  other.mt = __shfl_xor_sync(0xffffffffu, st.mt, offset);
  other.dt = __shfl_xor_sync(0xffffffffu, st.dt, offset);
  return other;
}

// Both sides' states plus the KL accumulator (softmax_kl, target_split), in raw logit units:
//   acc = sum e_t ((t - ~mt) - (s - ~ms)),  e_t = exp((t - ~mt)/T), a term with e_t == 0 is 0;
//   h   = sum e_t (t - ~mt)                 (only with kEntropy; else it stays 0 and costs nothing).
// Moving to larger maxima with deltas dS = ~ms' - ~ms, dT = ~mt' - ~mt: old mt == -inf: dt = acc = h = 0 stay 0;
// else c = exp2(-dT k), acc' = c (acc + (dS - dT) dt), h' = c (h - dT dt), dt' = c dt, and if c underflows to 0 all
// become 0 (every old term has e_t' == 0, so it contributes 0; this also keeps an acc of +inf from giving NaN).
template <typename Acc, bool kEntropy = false>
struct KlState {
  Acc ms, ds, mt, dt, acc, h;
};

template <typename Acc, bool kEntropy = false>
__device__ __forceinline__ KlState<Acc, kEntropy> empty_kl_state() {
  return KlState<Acc, kEntropy>{-pos_inf<Acc>(), Acc(0), -pos_inf<Acc>(), Acc(0), Acc(0), Acc(0)};
}

// Moves `st` to the maxima (new_ms >= st.ms, new_mt >= st.mt). k = log2(e)/T.
template <typename Acc, bool kEntropy>
__device__ __forceinline__ void rebase(KlState<Acc, kEntropy>& st, Acc new_ms, Acc new_mt, Acc k) {
  const Acc old_shift_s = safe_shift(st.ms), new_shift_s = safe_shift(new_ms);
  const Acc old_shift_t = safe_shift(st.mt), new_shift_t = safe_shift(new_mt);
  if (st.mt != -pos_inf<Acc>()) {  // else dt == acc == h == 0: nothing to scale
    const Acc c = kd_exp2((old_shift_t - new_shift_t) * k);
    if (c == Acc(0)) {
      st.acc = Acc(0);
      st.h = Acc(0);
      st.dt = Acc(0);
    } else {
      st.acc = c * (st.acc + ((new_shift_s - old_shift_s) - (new_shift_t - old_shift_t)) * st.dt);
      if constexpr (kEntropy) st.h = c * (st.h - (new_shift_t - old_shift_t) * st.dt);
      st.dt *= c;
    }
  }
  if (st.ms != -pos_inf<Acc>()) st.ds *= kd_exp2((old_shift_s - new_shift_s) * k);
  st.ms = new_ms;
  st.mt = new_mt;
}

template <typename Acc, bool kEntropy>
__device__ __forceinline__ void merge_into(KlState<Acc, kEntropy>& st, KlState<Acc, kEntropy> other, Acc k) {
  const Acc ms = kd_max(st.ms, other.ms), mt = kd_max(st.mt, other.mt);
  rebase(st, ms, mt, k);
  rebase(other, ms, mt, k);
  st.ds += other.ds;
  st.dt += other.dt;
  st.acc += other.acc;
  if constexpr (kEntropy) st.h += other.h;
}

// Adds N loaded elements (already widened; padding entries are -inf in both, which contribute nothing).
template <int N, typename Acc, bool kEntropy>
__device__ __forceinline__ void accumulate_chunk(KlState<Acc, kEntropy>& st, const Acc (&s)[N], const Acc (&t)[N],
                                                 Acc k) {
  Acc chunk_ms = s[0], chunk_mt = t[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
    chunk_ms = kd_max(chunk_ms, s[j]);
    chunk_mt = kd_max(chunk_mt, t[j]);
  }
  if (chunk_ms > st.ms || chunk_mt > st.mt) rebase(st, kd_max(st.ms, chunk_ms), kd_max(st.mt, chunk_mt), k);
  const Acc shift_s = safe_shift(st.ms), shift_t = safe_shift(st.mt);
  Acc ds = Acc(0), dt = Acc(0), acc = Acc(0), h = Acc(0);
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
    if constexpr (kEntropy) h += e_t > Acc(0) ? e_t * rel_t : Acc(0);
  }
  st.ds += ds;
  st.dt += dt;
  st.acc += acc;
  if constexpr (kEntropy) st.h += h;
}

template <typename Acc, bool kEntropy>
__device__ __forceinline__ KlState<Acc, kEntropy> shfl_xor_state(const KlState<Acc, kEntropy>& st, int offset) {
  KlState<Acc, kEntropy> other;
  other.ms = __shfl_xor_sync(0xffffffffu, st.ms, offset);
  other.ds = __shfl_xor_sync(0xffffffffu, st.ds, offset);
  other.mt = __shfl_xor_sync(0xffffffffu, st.mt, offset);
  other.dt = __shfl_xor_sync(0xffffffffu, st.dt, offset);
  other.acc = __shfl_xor_sync(0xffffffffu, st.acc, offset);
  other.h = kEntropy ? __shfl_xor_sync(0xffffffffu, st.h, offset) : Acc(0);
  return other;
}

// Plain sums of W values (merged by addition; the k argument of merge_into is unused).
template <typename Acc, int W>
struct SumState {
  Acc v[W];
};

template <typename Acc, int W>
__device__ __forceinline__ SumState<Acc, W> empty_sum_state() {
  SumState<Acc, W> st;
#pragma unroll
  for (int i = 0; i < W; ++i) st.v[i] = Acc(0);
  return st;
}

template <typename Acc, int W>
__device__ __forceinline__ void merge_into(SumState<Acc, W>& st, const SumState<Acc, W>& other, Acc) {
#pragma unroll
  for (int i = 0; i < W; ++i) st.v[i] += other.v[i];
}

template <typename Acc, int W>
__device__ __forceinline__ SumState<Acc, W> shfl_xor_state(const SumState<Acc, W>& st, int offset) {
  SumState<Acc, W> other;
#pragma unroll
  for (int i = 0; i < W; ++i) other.v[i] = __shfl_xor_sync(0xffffffffu, st.v[i], offset);
  return other;
}

// ----------------------------------------------------------------------------------------------------------------
// Reductions of a mergeable state (merge_into / shfl_xor_state found by argument-dependent lookup).

// Merges the states of `width` consecutive lanes (power of two <= 32, aligned); all 32 lanes must be active. Every
// lane ends with the same bits (a butterfly of commutative merges).
template <typename State, typename Acc>
__device__ __forceinline__ void reduce_lanes(State& st, int width, Acc k) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    merge_into(st, shfl_xor_state(st, offset), k);
  }
}

// Merges the warp states of a block (already reduced within each warp; at most 32 warps) so that every thread ends
// with the block's state. Every thread of the block must call it; it may be called again for another state.
template <typename State, typename Acc>
__device__ __forceinline__ void merge_warps(State& st, const State& empty, Acc k) {
  __shared__ State partial[32];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid % 32 == 0) partial[tid / 32] = st;
  __syncthreads();
  const int i = tid % 32;  // every warp merges all partials the same way
  st = i < static_cast<int>(blockDim.x) / 32 ? partial[i] : empty;
  __syncthreads();  // the partials are read before a later call overwrites them
  reduce_lanes(st, 32, k);
}

// ----------------------------------------------------------------------------------------------------------------
// Forward-style row walk. The launch (forward_config) gives each row `group` lanes: group <= 32 is "group mode"
// (blockDim.x / group rows per block, merged with warp shuffles), group == blockDim.x > 32 is "block mode" (one
// block per row, shuffles then shared memory).

struct RowLane {
  int64_t row;
  int lane;    // this thread's index among the row's `group` lanes
  int group;   // lanes per row
  bool block_mode;
};

__device__ __forceinline__ RowLane row_lane(int group) {
  const int tid = static_cast<int>(threadIdx.x);
  if (group > 32) return RowLane{static_cast<int64_t>(blockIdx.x), tid, group, true};
  return RowLane{static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + tid / group, tid % group, group, false};
}

// Merges st over the row's lanes: afterwards every lane of the row holds the row's state. Every thread of the block
// must call it (lanes of rows past the end included, holding `empty`).
template <typename State, typename Acc>
__device__ __forceinline__ void reduce_row(State& st, const RowLane& rl, const State& empty, Acc k) {
  reduce_lanes(st, rl.block_mode ? 32 : rl.group, k);
  if (rl.block_mode) merge_warps(st, empty, k);
}

// The row columns of a loaded chunk's elements: element i is column first + (i / VEC) * unit_stride + i % VEC, or
// kPaddingColumn (>= any V) for padding past the last whole unit (which may overlap the V % VEC tail's columns).
constexpr int64_t kPaddingColumn = INT64_MAX;

template <int VEC>
struct ChunkColumns {
  int64_t first, unit_stride, end;  // end: columns >= end are padding
  __device__ __forceinline__ int64_t operator[](int i) const {
    const int64_t col = first + (i / VEC) * unit_stride + i % VEC;
    return col < end ? col : kPaddingColumn;
  }
};

template <typename Acc, int N>
struct Chunk {
  Acc v[N];
};

// Loads unit u of a chunk (units base, base + group, ... of VEC elements) of one row into out; -inf for a unit
// past the last whole unit.
template <int VEC, int N, typename Acc, typename X>
__device__ __forceinline__ void load_unit(Acc (&out)[N], int u, const X* __restrict__ row, int64_t unit,
                                          int64_t units) {
  if (unit < units) {
    if constexpr (VEC == 1) {
      out[u] = widen(row[unit]);
    } else {
      const AlignedVec<X, VEC> xv = load_vec<X, VEC>(row + unit * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[u * VEC + j] = widen(xv.val[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[u * VEC + j] = -pos_inf<Acc>();
  }
}

// Loads UNROLL units of every row (unit by unit, the rows interleaved), then calls fn(columns, x...).
template <int VEC, int UNROLL, typename Acc, typename Columns, typename Fn, std::size_t... I, typename... X>
__device__ __forceinline__ void load_chunk_and_visit(const Columns& columns, int64_t base, int group, int64_t units,
                                                     Fn&& fn, std::index_sequence<I...>,
                                                     const X* __restrict__... rows) {
  Chunk<Acc, UNROLL * VEC> chunk[sizeof...(X)];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t unit = base + static_cast<int64_t>(u) * group;
    (load_unit<VEC>(chunk[I].v, u, rows, unit, units), ...);
  }
  fn(columns, chunk[I].v...);
}

// Visits this lane's share of one row in each of the given rows (same length V, same positions): UNROLL units are
// loaded from every row before fn(columns, x...) is called with ChunkColumns<VEC> and one Acc array of
// UNROLL * VEC elements per row (padding past the last whole unit: -inf, column kPaddingColumn); then, when VEC > 1,
// the V % VEC tail with scalar loads, as ChunkColumns<1> and arrays of 1 element.
template <int VEC, int UNROLL, typename Acc, typename Fn, typename... X>
__device__ __forceinline__ void for_each_row_chunk(int64_t V, int lane, int group, Fn&& fn,
                                                   const X* __restrict__... rows) {
  const int64_t units = V / VEC;
  const int64_t step = static_cast<int64_t>(group) * UNROLL;
  for (int64_t base = lane; base < units; base += step) {
    const ChunkColumns<VEC> columns{base * VEC, static_cast<int64_t>(group) * VEC, units * VEC};
    load_chunk_and_visit<VEC, UNROLL, Acc>(columns, base, group, units, fn, std::index_sequence_for<X...>{}, rows...);
  }
  if constexpr (VEC > 1) {
    for (int64_t j = units * VEC + lane; j < V; j += group) {
      fn(ChunkColumns<1>{j, 0, V}, Chunk<Acc, 1>{{widen(rows[j])}}.v...);
    }
  }
}

// Accumulates this lane's share of the rows into st with accumulate_chunk(st, x..., k).
template <int VEC, int UNROLL, typename State, typename Acc, typename... X>
__device__ __forceinline__ void accumulate_row(State& st, int64_t V, int lane, int group, Acc k,
                                               const X* __restrict__... rows) {
  for_each_row_chunk<VEC, UNROLL, Acc>(
      V, lane, group, [&](const auto&, const auto&... x) { accumulate_chunk(st, x..., k); }, rows...);
}

// ----------------------------------------------------------------------------------------------------------------
// Backward-style elementwise rows: block (TX, TY), row = blockIdx.x * TY + threadIdx.y, units
// blockIdx.y * TX + threadIdx.x (+ tiles of gridDim.y * TX).

template <typename Fn>
__device__ __forceinline__ void for_each_row_unit(int64_t units, Fn&& fn) {
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; unit < units; unit += step) {
    fn(unit);
  }
}

// The elementwise backward of one row of a (student, teacher) pair: writes zeros when `zero_row`, else for every
// entry element(column, s, t, grad_s, grad_t) with the widened logits, then narrows and stores the requested
// gradients (grad_student / grad_teacher: contiguous [N, V] or nullptr).
template <typename S, typename T, typename Acc, int VEC, typename Element>
__device__ __forceinline__ void backward_row_elementwise(int64_t row, const S* __restrict__ student,
                                                         int64_t student_row_stride, const T* __restrict__ teacher,
                                                         int64_t teacher_row_stride, int64_t V, bool zero_row,
                                                         S* __restrict__ grad_student, T* __restrict__ grad_teacher,
                                                         Element element) {
  const S* s_row = student + row * student_row_stride;
  const T* t_row = teacher + row * teacher_row_stride;
  S* gs_row = grad_student != nullptr ? grad_student + row * V : nullptr;
  T* gt_row = grad_teacher != nullptr ? grad_teacher + row * V : nullptr;
  for_each_row_unit(V / VEC, [&](int64_t unit) {
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
        Acc grad_s, grad_t;
        element(col + j, widen(sv.val[j]), widen(tv.val[j]), grad_s, grad_t);
        gs.val[j] = Narrow<S>::from(grad_s);
        gt.val[j] = Narrow<T>::from(grad_t);
      }
    }
    if (gs_row != nullptr) store_vec<S, VEC>(gs_row + col, gs);
    if (gt_row != nullptr) store_vec<T, VEC>(gt_row + col, gt);
  });
}

// ----------------------------------------------------------------------------------------------------------------
// Launch heuristics (host side).

// Block mode uses at most 512 threads a row and asks for 2 resident blocks per SM (<= 64 registers a thread), so
// that one block's end-of-row reduction overlaps the other block's loads. Double rows ask for 1.
constexpr int kForwardMaxThreads = 512;
template <typename Acc>
struct ForwardMinBlocksPerSm {
  static constexpr int value = sizeof(Acc) > 4 ? 1 : 2;
};
constexpr int kForwardGroupBlock = 256;  // threads per block in group mode
constexpr int kBackwardThreads = 256;

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

// units = load units per row. <= 256: group mode, 256-thread blocks, G = clamp(next_pow2(ceil(units / 4)), 1, 32)
// lanes per row; else block mode, G = clamp(next_pow2(ceil(units / 8)), 64, 512) threads per row.
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

// Whether forward-style walks can use VecWidth<S, T> loads (the V % VEC tail is handled with scalar loads).
template <typename S, typename T>
bool forward_vectorised(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                        int64_t N) {
  constexpr int kVec = VecWidth<S, T>::value;
  return kVec > 1 && is_aligned(student, kVec * sizeof(S)) && is_aligned(teacher, kVec * sizeof(T)) &&
         (N == 1 || (student_row_stride % kVec == 0 && teacher_row_stride % kVec == 0));
}

// Whether elementwise backwards can use VecWidth<S, T> loads and stores (no tail: V % VEC == 0).
template <typename S, typename T>
bool backward_vectorised(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                         int64_t N, int64_t V, const S* grad_student, const T* grad_teacher) {
  constexpr int kVec = VecWidth<S, T>::value;
  return kVec > 1 && V % kVec == 0 && is_aligned(student, kVec * sizeof(S)) && is_aligned(teacher, kVec * sizeof(T)) &&
         (grad_student == nullptr || is_aligned(grad_student, kVec * sizeof(S))) &&
         (grad_teacher == nullptr || is_aligned(grad_teacher, kVec * sizeof(T))) &&
         (N == 1 || (student_row_stride % kVec == 0 && teacher_row_stride % kVec == 0));
}

struct BackwardConfig {
  dim3 grid, block;
};

// (TX, 256 / TX) blocks, TX = min(256, next_pow2(units)); grid (row blocks, min(column tiles, 65535)).
inline BackwardConfig backward_config(int64_t N, int64_t units) {
  const int tx = static_cast<int>(clamp64(next_pow2(units), 1, kBackwardThreads));
  const int ty = kBackwardThreads / tx;
  BackwardConfig cfg;
  cfg.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  cfg.grid = dim3(static_cast<unsigned>((N + ty - 1) / ty),
                  static_cast<unsigned>(clamp64((units + tx - 1) / tx, 1, 65535)));
  return cfg;
}

}  // namespace cuda_rows
}  // namespace kdkernels

#endif  // KDKERNELS_COMMON_CUDA_ROWS_CUH_
