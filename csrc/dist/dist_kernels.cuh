// CUDA device code of dist: DIST's row and column Pearson correlations of y = softmax(x / T), and their gradients.
//
// Spec: kdkernels/reference/dist.py. With y_s, y_t the row softmaxes of student and teacher [N, V]:
//   pearson(a, b) = S_ab / (sqrt(S_aa) sqrt(S_bb) + 1e-8) of centred a, b (S_ab = sum a b, ...);
//   rows:    a = y_s[n, :] - 1/V, b = y_t[n, :] - 1/V  -> row_moments [N, 3] = (S_st, S_ss, S_tt), row_pearson [N];
//   columns: a = y_s[:, c] - mean_s[c], b likewise     -> col_moments [V, 5] = (mean_s, mean_t, S_st, S_ss, S_tt),
//            col_pearson [V];
//   plus the per-row statistics (max, log_sum) of both sides, y = exp((x - max)/T - log_sum).
// Sums of products are always formed from centred values, so a constant column gives exactly 0 (its mean is exactly
// its value: mean = y[0, c] + sum_n (y[n, c] - y[0, c]) / N).
//
// Forward, four launches:
//   1. rows (the softmax_kl forward's row walk and configurations): per-side online (max, sum), merged so that every
//      lane holds the row's state; then the row again (typically from L2) for the centred row sums;
//   2. column partial sums of y - y[0, c] over chunks of rows: grid (column blocks, row chunks), a thread per column;
//   3. the column means from 2 (chunk partials added in chunk order), then partial centred sums over the chunks;
//   4. the centred column sums (chunk order) and col_pearson.
//   Partials live in a workspace of chunks * V * 5 elements (dist_forward_workspace_elements); no atomics.
// Backward: for r = S_ab / D, D = sqrt(S_aa) sqrt(S_bb) + eps: dr/da = b/D - S_ab sqrt(S_bb) / (sqrt(S_aa) D^2) a
// (second term 0 when S_aa == 0, as torch's norm backward), so per element
//   g_s[n, c] = grad_row[n] dr_n/da + grad_col[c] dr_c/da  (teacher symmetric), then the softmax backward
//   grad_s[n, c] = 1/T y_s (g_s - sum_j g_s[n, j] y_s[n, j]).
// The centring drops out: its correction is constant along a row (removed by the softmax backward) for the row term
// and sums to zero over the batch for the column term. Two launches: the per-row dots sum_j g y (row walk, into a
// workspace of N * 2), then the elementwise gradients (the softmax_kl backward's layout).
// An all -inf row has no softmax: its y is NaN and so is everything it touches (as in the reference).
// Precision: every kernel computes in double (Acc) for every logits dtype, and the saved statistics (stats,
// row_moments, col_moments) and the workspaces are double; only the Pearson vectors and the incoming grad_row /
// grad_col (Out: the accumulation dtype, float or double) and the gradients (the logits' dtypes) are not. Float
// arithmetic, however ordered, is only as accurate as DIST_KD's own fp32 code: where a column's spread is far below
// its values (a few rows, saturated softmaxes) or a correlation is close to +-1 (two rows, two classes), the centred
// values and the Pearson slopes cancel, and their error is set by the rounding of y itself.
#ifndef KDKERNELS_DIST_KERNELS_CUH_
#define KDKERNELS_DIST_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cstdint>

namespace kdkernels {
namespace dist_cuda {

using namespace cuda_rows;

using Acc = double;  // the arithmetic of every kernel (see Precision above)

constexpr int kColumnThreads = 256;
constexpr int64_t kColumnTargetBlocks = 1024;  // about a full wave of 256-thread blocks (132 SMs x 8), whatever V
constexpr int64_t kMaxColumnChunks = 64;

template <typename Acc>
__device__ __forceinline__ Acc pearson(Acc s_ab, Acc s_aa, Acc s_bb) {
  return s_ab / (kd_sqrt(s_aa) * kd_sqrt(s_bb) + Acc(1e-8));
}

// g times the derivatives of r = S_ab / D: dr/da = b inv_d - self_a a, dr/db = a inv_d - self_b b.
template <typename Acc>
struct PearsonGrad {
  Acc inv_d, self_a, self_b;
};

template <typename Acc>
__device__ __forceinline__ PearsonGrad<Acc> pearson_grad(Acc s_ab, Acc s_aa, Acc s_bb, Acc g) {
  const Acc root_aa = kd_sqrt(s_aa), root_bb = kd_sqrt(s_bb);
  const Acc d = root_aa * root_bb + Acc(1e-8);
  const Acc g_r_over_d = g * s_ab / (d * d);
  return PearsonGrad<Acc>{g / d, s_aa == Acc(0) ? Acc(0) : g_r_over_d * root_bb / root_aa,
                          s_bb == Acc(0) ? Acc(0) : g_r_over_d * root_aa / root_bb};
}

// One row's softmax statistics of both sides.
template <typename Acc>
struct RowSoftmax {
  Acc max_s, log_sum_s, max_t, log_sum_t;
};

template <typename Acc>
__device__ __forceinline__ RowSoftmax<Acc> load_row_softmax(const Acc* __restrict__ stats_student,
                                                            const Acc* __restrict__ stats_teacher, int64_t row) {
  return RowSoftmax<Acc>{stats_student[2 * row], stats_student[2 * row + 1], stats_teacher[2 * row],
                         stats_teacher[2 * row + 1]};
}

// y = softmax(x / T) at one entry (NaN for an all -inf row).
template <typename Acc>
__device__ __forceinline__ Acc softmax_prob(Acc x, Acc max, Acc log_sum, Acc inv_t) {
  return kd_exp((x - max) * inv_t - log_sum);
}

template <typename Acc>
struct ProbPair {
  Acc s, t;
};

template <typename Acc>
__device__ __forceinline__ ProbPair<Acc> probs(Acc s, Acc t, const RowSoftmax<Acc>& r, Acc inv_t) {
  return ProbPair<Acc>{softmax_prob(s, r.max_s, r.log_sum_s, inv_t), softmax_prob(t, r.max_t, r.log_sum_t, inv_t)};
}

// ----------------------------------------------------------------------------------------------------------------
// Forward 1: rows.

// Adds a loaded chunk's centred row products (a b, a a, b b), a = y_s - 1/V, b = y_t - 1/V; padding is skipped.
template <int N, typename Acc, typename Columns>
__device__ __forceinline__ void accumulate_row_moments(SumState<Acc, 3>& sums, const Columns& columns,
                                                       const Acc (&s)[N], const Acc (&t)[N], int64_t V,
                                                       const RowSoftmax<Acc>& r, Acc centre, Acc inv_t) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (columns[i] < V) {
      const ProbPair<Acc> y = probs(s[i], t[i], r, inv_t);
      const Acc a = y.s - centre, b = y.t - centre;
      sums.v[0] += a * b;
      sums.v[1] += a * a;
      sums.v[2] += b * b;
    }
  }
}

// group <= 32: group mode (blockDim.x / group rows per block); group == blockDim.x > 32: one block per row.
template <typename S, typename T, typename Out, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    dist_row_forward_kernel(const S* __restrict__ student, int64_t student_row_stride, const T* __restrict__ teacher,
                            int64_t teacher_row_stride, int64_t N, int64_t V, Acc inv_t, Acc k, int group,
                            Acc* __restrict__ stats_student, Acc* __restrict__ stats_teacher,
                            Acc* __restrict__ row_moments, Out* __restrict__ row_pearson) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  const S* s_row = student + row * student_row_stride;
  const T* t_row = teacher + row * teacher_row_stride;

  SoftmaxPairState<Acc> st = empty_pair_state<Acc>();
  if (row < N) accumulate_row<VEC, UNROLL>(st, V, rl.lane, group, k, s_row, t_row);
  reduce_row(st, rl, empty_pair_state<Acc>(), k);
  const RowSoftmax<Acc> r{st.ms, kd_log(st.ds), st.mt, kd_log(st.dt)};

  const Acc centre = Acc(1) / static_cast<Acc>(V);
  SumState<Acc, 3> sums = empty_sum_state<Acc, 3>();
  if (row < N) {
    for_each_row_chunk<VEC, UNROLL, Acc>(
        V, rl.lane, group,
        [&](const auto& columns, const auto& s, const auto& t) {
          accumulate_row_moments(sums, columns, s, t, V, r, centre, inv_t);
        },
        s_row, t_row);
  }
  reduce_row(sums, rl, empty_sum_state<Acc, 3>(), k);
  if (rl.lane != 0 || row >= N) return;

  stats_student[2 * row] = r.max_s;
  stats_student[2 * row + 1] = r.log_sum_s;
  stats_teacher[2 * row] = r.max_t;
  stats_teacher[2 * row + 1] = r.log_sum_t;
  for (int i = 0; i < 3; ++i) row_moments[3 * row + i] = sums.v[i];
  row_pearson[row] = static_cast<Out>(pearson(sums.v[0], sums.v[1], sums.v[2]));
}

// ----------------------------------------------------------------------------------------------------------------
// Forward 2-4: columns. Grid (ceil(V / kColumnThreads), chunks), a thread per column, block y = a chunk of rows.

struct ColumnChunks {
  int64_t rows_per_chunk, chunks;
};

template <typename S, typename T, typename Acc>
struct ColumnInputs {
  const S* student;
  int64_t student_row_stride;
  const T* teacher;
  int64_t teacher_row_stride;
  const Acc* stats_student;
  const Acc* stats_teacher;
  int64_t N, V;
  Acc inv_t;

  __device__ __forceinline__ ProbPair<Acc> at(int64_t row, int64_t col) const {
    return probs(static_cast<Acc>(widen(student[row * student_row_stride + col])),
                 static_cast<Acc>(widen(teacher[row * teacher_row_stride + col])),
                 load_row_softmax(stats_student, stats_teacher, row), inv_t);
  }
};

// This thread's column (or -1) and its block's rows [first, last).
struct ColumnTask {
  int64_t col, first, last;
};

__device__ __forceinline__ ColumnTask column_task(int64_t N, int64_t V, int64_t rows_per_chunk) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < N ? first + rows_per_chunk : N;
  return ColumnTask{col < V ? col : -1, first, last};
}

// mean = y[0, c] + (sum of the chunks' sums of y - y[0, c]) / N, the chunks added in order.
template <typename Acc>
__device__ __forceinline__ ProbPair<Acc> column_means(const Acc* __restrict__ shifted_sums, int64_t chunks, int64_t V,
                                                      int64_t col, ProbPair<Acc> first_row, int64_t N) {
  Acc sum_s = Acc(0), sum_t = Acc(0);
  for (int64_t c = 0; c < chunks; ++c) {
    sum_s += shifted_sums[2 * (c * V + col)];
    sum_t += shifted_sums[2 * (c * V + col) + 1];
  }
  return ProbPair<Acc>{first_row.s + sum_s / static_cast<Acc>(N), first_row.t + sum_t / static_cast<Acc>(N)};
}

// 2: shifted_sums [chunks, V, 2] = per chunk sum of (y_s - y_s[0, c], y_t - y_t[0, c]).
template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kColumnThreads)
    dist_column_sums_kernel(ColumnInputs<S, T, Acc> in, int64_t rows_per_chunk, Acc* __restrict__ shifted_sums) {
  const ColumnTask task = column_task(in.N, in.V, rows_per_chunk);
  if (task.col < 0) return;
  const ProbPair<Acc> first_row = in.at(0, task.col);
  Acc sum_s = Acc(0), sum_t = Acc(0);
#pragma unroll 4
  for (int64_t row = task.first; row < task.last; ++row) {
    const ProbPair<Acc> y = in.at(row, task.col);
    sum_s += y.s - first_row.s;
    sum_t += y.t - first_row.t;
  }
  Acc* out = shifted_sums + 2 * (static_cast<int64_t>(blockIdx.y) * in.V + task.col);
  out[0] = sum_s;
  out[1] = sum_t;
}

// 3: the means (chunk 0 writes them to col_moments[:, 0:2]) and centred_sums [chunks, V, 3] = per chunk
// (sum a b, sum a a, sum b b) with a = y_s - mean_s, b = y_t - mean_t.
template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kColumnThreads)
    dist_column_centred_kernel(ColumnInputs<S, T, Acc> in, int64_t rows_per_chunk, int64_t chunks,
                               const Acc* __restrict__ shifted_sums, Acc* __restrict__ centred_sums,
                               Acc* __restrict__ col_moments) {
  const ColumnTask task = column_task(in.N, in.V, rows_per_chunk);
  if (task.col < 0) return;
  const ProbPair<Acc> mean = column_means(shifted_sums, chunks, in.V, task.col, in.at(0, task.col), in.N);
  if (blockIdx.y == 0) {
    col_moments[5 * task.col] = mean.s;
    col_moments[5 * task.col + 1] = mean.t;
  }
  Acc s_ab = Acc(0), s_aa = Acc(0), s_bb = Acc(0);
#pragma unroll 4
  for (int64_t row = task.first; row < task.last; ++row) {
    const ProbPair<Acc> y = in.at(row, task.col);
    const Acc a = y.s - mean.s, b = y.t - mean.t;
    s_ab += a * b;
    s_aa += a * a;
    s_bb += b * b;
  }
  Acc* out = centred_sums + 3 * (static_cast<int64_t>(blockIdx.y) * in.V + task.col);
  out[0] = s_ab;
  out[1] = s_aa;
  out[2] = s_bb;
}

// 4: col_moments[:, 2:5] = the chunks' centred sums added in order, and col_pearson. Grid (column blocks, 1).
template <typename Out>
__global__ void __launch_bounds__(kColumnThreads)
    dist_column_finish_kernel(const Acc* __restrict__ centred_sums, int64_t chunks, int64_t V,
                              Acc* __restrict__ col_moments, Out* __restrict__ col_pearson) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= V) return;
  Acc sums[3] = {Acc(0), Acc(0), Acc(0)};
  for (int64_t c = 0; c < chunks; ++c) {
    for (int i = 0; i < 3; ++i) sums[i] += centred_sums[3 * (c * V + col) + i];
  }
  for (int i = 0; i < 3; ++i) col_moments[5 * col + 2 + i] = sums[i];
  col_pearson[col] = static_cast<Out>(pearson(sums[0], sums[1], sums[2]));
}

// ----------------------------------------------------------------------------------------------------------------
// Backward.

template <typename Acc>
struct DistRowGrad {
  RowSoftmax<Acc> softmax;
  Acc centre;                 // 1/V
  PearsonGrad<Acc> pearson;   // grad_row[n] times the row correlation's derivatives
};

template <typename Acc, typename Out>
__device__ __forceinline__ DistRowGrad<Acc> dist_row_grad(const Out* __restrict__ grad_row,
                                                          const Acc* __restrict__ row_moments,
                                                          const Acc* __restrict__ stats_student,
                                                          const Acc* __restrict__ stats_teacher, int64_t row,
                                                          int64_t V) {
  const Acc* m = row_moments + 3 * row;
  return DistRowGrad<Acc>{load_row_softmax(stats_student, stats_teacher, row), Acc(1) / static_cast<Acc>(V),
                          pearson_grad(m[0], m[1], m[2], static_cast<Acc>(grad_row[row]))};
}

// y and the upstream gradient g (with respect to y) of both sides at one entry.
template <typename Acc>
struct DistUpstream {
  Acc y_s, y_t, g_s, g_t;
};

template <typename Acc, typename Out>
__device__ __forceinline__ DistUpstream<Acc> dist_upstream(Acc s, Acc t, int64_t col, const DistRowGrad<Acc>& r,
                                                           const Acc* __restrict__ col_moments,
                                                           const Out* __restrict__ grad_col, Acc inv_t) {
  const ProbPair<Acc> y = probs(s, t, r.softmax, inv_t);
  const Acc a = y.s - r.centre, b = y.t - r.centre;
  const Acc* m = col_moments + 5 * col;
  const Acc a_col = y.s - m[0], b_col = y.t - m[1];
  const PearsonGrad<Acc> pc = pearson_grad(m[2], m[3], m[4], static_cast<Acc>(grad_col[col]));
  return DistUpstream<Acc>{y.s, y.t,
                           (b * r.pearson.inv_d - r.pearson.self_a * a) + (b_col * pc.inv_d - pc.self_a * a_col),
                           (a * r.pearson.inv_d - r.pearson.self_b * b) + (a_col * pc.inv_d - pc.self_b * b_col)};
}

// Adds a loaded chunk's (g_s y_s, g_t y_t); padding is skipped.
template <int N, typename Acc, typename Out, typename Columns>
__device__ __forceinline__ void accumulate_row_dots(SumState<Acc, 2>& dots, const Columns& columns, const Acc (&s)[N],
                                                    const Acc (&t)[N], int64_t V, const DistRowGrad<Acc>& r,
                                                    const Acc* __restrict__ col_moments,
                                                    const Out* __restrict__ grad_col, Acc inv_t) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (columns[i] < V) {
      const DistUpstream<Acc> u = dist_upstream(s[i], t[i], columns[i], r, col_moments, grad_col, inv_t);
      dots.v[0] += u.g_s * u.y_s;
      dots.v[1] += u.g_t * u.y_t;
    }
  }
}

// row_dots [N, 2] = (sum_j g_s y_s, sum_j g_t y_t); the forward's row walk and configurations.
template <typename S, typename T, typename Out, int VEC, int UNROLL>
__global__ void __launch_bounds__(kForwardMaxThreads, ForwardMinBlocksPerSm<Acc>::value)
    dist_backward_dot_kernel(const Out* __restrict__ grad_row, const Out* __restrict__ grad_col,
                             const S* __restrict__ student, int64_t student_row_stride, const T* __restrict__ teacher,
                             int64_t teacher_row_stride, const Acc* __restrict__ row_moments,
                             const Acc* __restrict__ col_moments, const Acc* __restrict__ stats_student,
                             const Acc* __restrict__ stats_teacher, int64_t N, int64_t V, Acc inv_t, int group,
                             Acc* __restrict__ row_dots) {
  const RowLane rl = row_lane(group);
  const int64_t row = rl.row;
  SumState<Acc, 2> dots = empty_sum_state<Acc, 2>();
  if (row < N) {
    const DistRowGrad<Acc> r = dist_row_grad(grad_row, row_moments, stats_student, stats_teacher, row, V);
    for_each_row_chunk<VEC, UNROLL, Acc>(
        V, rl.lane, group,
        [&](const auto& columns, const auto& s, const auto& t) {
          accumulate_row_dots(dots, columns, s, t, V, r, col_moments, grad_col, inv_t);
        },
        student + row * student_row_stride, teacher + row * teacher_row_stride);
  }
  reduce_row(dots, rl, empty_sum_state<Acc, 2>(), Acc(0));
  if (rl.lane != 0 || row >= N) return;
  row_dots[2 * row] = dots.v[0];
  row_dots[2 * row + 1] = dots.v[1];
}

// Backward: block (TX, TY), row = blockIdx.x * TY + threadIdx.y, units blockIdx.y * TX + threadIdx.x (+ tiles).
template <typename S, typename T, typename Out, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    dist_backward_kernel(const Out* __restrict__ grad_row, const Out* __restrict__ grad_col,
                         const S* __restrict__ student, int64_t student_row_stride, const T* __restrict__ teacher,
                         int64_t teacher_row_stride, const Acc* __restrict__ row_moments,
                         const Acc* __restrict__ col_moments, const Acc* __restrict__ stats_student,
                         const Acc* __restrict__ stats_teacher, const Acc* __restrict__ row_dots, int64_t N,
                         int64_t V, Acc inv_t, S* __restrict__ grad_student, T* __restrict__ grad_teacher) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  const DistRowGrad<Acc> r = dist_row_grad(grad_row, row_moments, stats_student, stats_teacher, row, V);
  const Acc dot_s = row_dots[2 * row], dot_t = row_dots[2 * row + 1];
  backward_row_elementwise<S, T, Acc, VEC>(
      row, student, student_row_stride, teacher, teacher_row_stride, V, false, grad_student, grad_teacher,
      [&](int64_t col, Acc s, Acc t, Acc& grad_s, Acc& grad_t) {
        const DistUpstream<Acc> u = dist_upstream(s, t, col, r, col_moments, grad_col, inv_t);
        grad_s = inv_t * u.y_s * (u.g_s - dot_s);
        grad_t = inv_t * u.y_t * (u.g_t - dot_t);
      });
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers (several launches each, on `stream`; the caller checks the launches).

inline ColumnChunks column_chunks(int64_t N, int64_t V) {
  const int64_t column_blocks = (V + kColumnThreads - 1) / kColumnThreads;
  const int64_t wanted = clamp64((kColumnTargetBlocks + column_blocks - 1) / column_blocks, 1, kMaxColumnChunks);
  const int64_t chunks = clamp64(wanted, 1, N);
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  return ColumnChunks{rows_per_chunk, (N + rows_per_chunk - 1) / rows_per_chunk};
}

// Elements (double) of the forward's workspace.
inline int64_t dist_forward_workspace_elements(int64_t N, int64_t V) { return column_chunks(N, V).chunks * V * 5; }

// Elements (double) of the backward's workspace.
inline int64_t dist_backward_workspace_elements(int64_t N) { return 2 * N; }

// Requires N >= 1, V >= 1, N < 2^31 (the launcher checks). Outputs contiguous: stats [N, 2], row_moments [N, 3],
// row_pearson [N], col_moments [V, 5], col_pearson [V]; workspace: dist_forward_workspace_elements(N, V).
template <typename S, typename T, typename Out>
void launch_dist_forward(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                         int64_t N, int64_t V, Acc inv_t, Acc* stats_student, Acc* stats_teacher, Acc* row_moments,
                         Out* row_pearson, Acc* col_moments, Out* col_pearson, Acc* workspace, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  const Acc k = inv_t * log2e<Acc>();
  if (forward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N)) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    dist_row_forward_kernel<S, T, Out, kVec, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, cfg.group, stats_student,
        stats_teacher, row_moments, row_pearson);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    dist_row_forward_kernel<S, T, Out, 1, 4><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        student, student_row_stride, teacher, teacher_row_stride, N, V, inv_t, k, cfg.group, stats_student,
        stats_teacher, row_moments, row_pearson);
  }

  const ColumnChunks split = column_chunks(N, V);
  const ColumnInputs<S, T, Acc> in{student, student_row_stride, teacher, teacher_row_stride, stats_student,
                                   stats_teacher, N, V, inv_t};
  Acc* shifted_sums = workspace;                       // [chunks, V, 2]
  Acc* centred_sums = workspace + split.chunks * V * 2;  // [chunks, V, 3]
  const unsigned column_blocks = static_cast<unsigned>((V + kColumnThreads - 1) / kColumnThreads);
  const dim3 grid(column_blocks, static_cast<unsigned>(split.chunks));
  dist_column_sums_kernel<S, T, Acc><<<grid, kColumnThreads, 0, stream>>>(in, split.rows_per_chunk, shifted_sums);
  dist_column_centred_kernel<S, T, Acc><<<grid, kColumnThreads, 0, stream>>>(in, split.rows_per_chunk, split.chunks,
                                                                             shifted_sums, centred_sums, col_moments);
  dist_column_finish_kernel<Out><<<column_blocks, kColumnThreads, 0, stream>>>(centred_sums, split.chunks, V,
                                                                               col_moments, col_pearson);
}

// Requires N >= 1, V >= 1, N < 2^31. grad_row [N], grad_col [V] and the forward's saved outputs contiguous;
// grad_student / grad_teacher: contiguous [N, V] or nullptr (at least one non-null); workspace:
// dist_backward_workspace_elements(N).
template <typename S, typename T, typename Out>
void launch_dist_backward(const Out* grad_row, const Out* grad_col, const S* student, int64_t student_row_stride,
                          const T* teacher, int64_t teacher_row_stride, const Acc* row_moments, const Acc* col_moments,
                          const Acc* stats_student, const Acc* stats_teacher, int64_t N, int64_t V, Acc inv_t,
                          S* grad_student, T* grad_teacher, Acc* workspace, cudaStream_t stream) {
  constexpr int kVec = VecWidth<S, T>::value;
  Acc* row_dots = workspace;
  // The dot pass does a Pearson derivative per element: half the forward's units in flight keeps it in registers.
  if (forward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N)) {
    const ForwardConfig cfg = forward_config(N, (V + kVec - 1) / kVec);
    dist_backward_dot_kernel<S, T, Out, kVec, 1><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        grad_row, grad_col, student, student_row_stride, teacher, teacher_row_stride, row_moments, col_moments,
        stats_student, stats_teacher, N, V, inv_t, cfg.group, row_dots);
  } else {
    const ForwardConfig cfg = forward_config(N, V);
    dist_backward_dot_kernel<S, T, Out, 1, 2><<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, stream>>>(
        grad_row, grad_col, student, student_row_stride, teacher, teacher_row_stride, row_moments, col_moments,
        stats_student, stats_teacher, N, V, inv_t, cfg.group, row_dots);
  }

  const bool vectorised = backward_vectorised(student, student_row_stride, teacher, teacher_row_stride, N, V,
                                              grad_student, grad_teacher);
  const BackwardConfig cfg = backward_config(N, V / (vectorised ? kVec : 1));
  if (vectorised) {
    dist_backward_kernel<S, T, Out, kVec><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_row, grad_col, student, student_row_stride, teacher, teacher_row_stride, row_moments, col_moments,
        stats_student, stats_teacher, row_dots, N, V, inv_t, grad_student, grad_teacher);
  } else {
    dist_backward_kernel<S, T, Out, 1><<<cfg.grid, cfg.block, 0, stream>>>(
        grad_row, grad_col, student, student_row_stride, teacher, teacher_row_stride, row_moments, col_moments,
        stats_student, stats_teacher, row_dots, N, V, inv_t, grad_student, grad_teacher);
  }
}

}  // namespace dist_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_DIST_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc):
// every kernel the launchers can launch, for every (student, teacher) type pair the launcher dispatches to.
#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_DIST_INSTANTIATE(S, T, OUT)                                                                          \
  template void kdkernels::dist_cuda::launch_dist_forward<S, T, OUT>(const S*, int64_t, const T*, int64_t, int64_t,   \
                                                                     int64_t, double, double*, double*, double*, OUT*, \
                                                                     double*, OUT*, double*, cudaStream_t);            \
  template void kdkernels::dist_cuda::launch_dist_backward<S, T, OUT>(                                                 \
      const OUT*, const OUT*, const S*, int64_t, const T*, int64_t, const double*, const double*, const double*,      \
      const double*, int64_t, int64_t, double, S*, T*, double*, cudaStream_t);

KDKERNELS_DIST_INSTANTIATE(float, float, float)
KDKERNELS_DIST_INSTANTIATE(float, __half, float)
KDKERNELS_DIST_INSTANTIATE(float, __nv_bfloat16, float)
KDKERNELS_DIST_INSTANTIATE(__half, float, float)
KDKERNELS_DIST_INSTANTIATE(__half, __half, float)
KDKERNELS_DIST_INSTANTIATE(__half, __nv_bfloat16, float)
KDKERNELS_DIST_INSTANTIATE(__nv_bfloat16, float, float)
KDKERNELS_DIST_INSTANTIATE(__nv_bfloat16, __half, float)
KDKERNELS_DIST_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, float)
KDKERNELS_DIST_INSTANTIATE(double, double, double)
#undef KDKERNELS_DIST_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
