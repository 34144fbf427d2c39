// CUDA device code of the pairwise family: the Gram-level losses and their gradients dL/dG. Each launch adds
// weight * L to *loss and weight * dL/dG_s, weight * dL/dG_t to the requested dG (nullptr = not requested).
//
// Spec: kdkernels/reference/pairwise.py, through the Gram contract of pairwise_host.h (G = P P^T of the preprocessed
// features, symmetric, contiguous [B, B] in Acc = float or double; only dG + dG^T is used, so a term of a symmetric
// entry may land on (i, j) or on (j, i)). With D2_ij = G_ii + G_jj - 2 G_ij, counted as 0 (coincident points) when
// D2_ij <= 64 eps(Acc) (G_ii + G_jj), and huber = smooth_l1 with beta 1:
//   rkd_distance  d_ij = sqrt(max(D2_ij, 1e-12)) (i != j; zero gradient where clamped), d_ii = 0,
//                 mu = sum_{i != j} d_ij / (B^2 - B), L = mean_{B x B} huber(d_s / mu_s - d_t / mu_t);
//                 with g = huber'(u) / B^2: dL/dd_ij = g_ij / mu - (sum g d) / (mu^2 (B^2 - B)) (teacher: -g),
//                 dD2 = dd / (2 d): dG_ii += dD2, dG_jj += dD2, dG_ij -= 2 dD2.
//   rkd_angle     r_ij = 1 / sqrt(D2_ij) (0 when i == j or coincident), psi_abc = ((G_bc - G_ab) - (G_ac - G_aa))
//                 r_ab r_ac, L = mean_{B^3} huber(psi_s - psi_t). With g = huber'(psi_s - psi_t) / B^3 (teacher:
//                 -g and its own r) and M_abc = g r_ab r_ac: dG_bc += sum_a M, dG_ab -= 2 sum_c M, dG_aa += sum_bc M,
//                 dD2_ab = -r_ab^2 sum_c g psi (applied like the distance's). Writing W_ab = sum_c M_abc + dD2_ab =
//                 r_ab sum_c g (r_ac - r_ab psi_abc): dG_ab -= 2 W_ab, dG_aa += sum_b W_ab, dG_bb += sum_a dD2_ab.
//   sp            n_i = |G_i.|, Gn = G / max(n, 1e-12), L = sum (Gn_t - Gn_s)^2 / B^2.
//   pkt           S = (G + 1) / 2, P = S / rowsum(S), L = mean P_t log((P_t + eps) / (P_s + eps)).
//   cc            K = sum_{p <= order} exp(-2 gamma) (2 gamma)^p / p! G^p (elementwise; bilinear: K = G),
//                 L = mean (K_s - K_t)^2.
//
// Parallelisation. O(B^2) relations run one block per row (threads over columns, block reductions) or, for CC, a
// grid-stride elementwise loop. RKD angle runs one block per middle index b, threads over c, keeping row b of both
// Grams and the sums Q[b, c] = sum_a M_abc in registers; the block reduces sum_c over chunks of 16 apexes a (both
// sides: 32 values, one warp transpose-reduction) into W[a, b], which only block b writes; an O(B^2) row kernel then
// assembles dG. Workspace at B = 1024 in float: 24 MB with both gradients (r, Q, W: 2 B^2 each).
// Deterministic: every sum has a fixed order (per-block partials in a workspace, then one reducing block); no atomics.
#ifndef KDKERNELS_PAIRWISE_KERNELS_CUH_
#define KDKERNELS_PAIRWISE_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace kdkernels {
namespace pairwise_cuda {

using namespace cuda_rows;

constexpr double kCoincidentUlps = 64.0;  // pairwise_host.h's constants (the launcher asserts they agree)
constexpr double kDistanceClamp = 1e-12;
constexpr double kNormalizeEps = 1e-12;
constexpr int kMaxRowThreads = 256;
constexpr int kAngleColumnsPerThread = 4;  // a block covers kMaxRowThreads * 4 columns c per pass over the apexes
constexpr int kAngleApexChunk = 16;        // apexes per block reduction: 2 sides x 16 = one value per lane
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 1024;
constexpr int kMaxCcOrder = 64;

static_assert(2 * kAngleApexChunk == 32, "the apex chunk's two sides fill one warp");

// The Gram matrices [B, B] of both sides and the gradients to accumulate into (nullptr: not requested).
template <typename Acc>
struct GramArgs {
  const Acc* gram_student;
  const Acc* gram_teacher;
  Acc* dgram_student;
  Acc* dgram_teacher;
  int64_t batch;
};

template <typename Acc>
__host__ __device__ constexpr Acc machine_eps() {
  return sizeof(Acc) == sizeof(float) ? static_cast<Acc>(FLT_EPSILON) : static_cast<Acc>(DBL_EPSILON);
}

// ----------------------------------------------------------------------------------------------------------------
// Scalar math.

// |x_i - x_j|^2 from the Gram, 0 for coincident points (the formula's rounding noise).
template <typename Acc>
__device__ __forceinline__ Acc squared_distance(Acc g_ii, Acc g_jj, Acc g_ij) {
  const Acc d2 = g_ii + g_jj - Acc(2) * g_ij;
  return d2 <= static_cast<Acc>(kCoincidentUlps) * machine_eps<Acc>() * (g_ii + g_jj) ? Acc(0) : d2;
}

template <typename Acc>
__device__ __forceinline__ Acc huber(Acc x) {
  const Acc a = kd_abs(x);
  return a < Acc(1) ? Acc(0.5) * x * x : a - Acc(0.5);
}

template <typename Acc>
__device__ __forceinline__ Acc huber_grad(Acc x) {
  return kd_max(Acc(-1), kd_min(Acc(1), x));
}

// ----------------------------------------------------------------------------------------------------------------
// Block-level building blocks (blockDim.x a multiple of 32, at most 1024).

// Every thread ends with the block's sums.
template <typename Acc, int W>
__device__ __forceinline__ SumState<Acc, W> block_sum(SumState<Acc, W> st) {
  reduce_lanes(st, 32, Acc(0));
  merge_warps(st, empty_sum_state<Acc, W>(), Acc(0));
  return st;
}

// Sums of the W component arrays values[w * n + i] over i, in the same order in every block.
template <typename Acc, int W>
__device__ __forceinline__ SumState<Acc, W> sum_components(const Acc* __restrict__ values, int64_t n) {
  SumState<Acc, W> st = empty_sum_state<Acc, W>();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
#pragma unroll
    for (int w = 0; w < W; ++w) st.v[w] += values[w * n + i];
  }
  return block_sum(st);
}

// Calls fn(j) for this thread's columns j of a row of B.
template <typename Fn>
__device__ __forceinline__ void for_each_column(int64_t B, Fn&& fn) {
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) fn(j);
}

// *loss += scale * sum(values[0:n]). One block.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    add_scaled_sum_kernel(const Acc* __restrict__ values, int64_t n, Acc scale, Acc* __restrict__ loss) {
  const SumState<Acc, 1> total = sum_components<Acc, 1>(values, n);
  if (threadIdx.x == 0) *loss += scale * total.v[0];
}

// diagonals [2, B] = (diag G_s, diag G_t): contiguous for the distance passes.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads) gram_diagonals_kernel(GramArgs<Acc> g, Acc* __restrict__ diagonals) {
  const int64_t B = g.batch;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  diagonals[i] = g.gram_student[i * B + i];
  diagonals[B + i] = g.gram_teacher[i * B + i];
}

// ----------------------------------------------------------------------------------------------------------------
// RKD distance: three row passes (one block per row i) and the loss.

template <typename Acc>
struct ClampedDistance {
  Acc d;
  bool clamped;  // D2 <= 1e-12: d is the constant sqrt(1e-12)
};

template <typename Acc>
__device__ __forceinline__ ClampedDistance<Acc> clamped_distance(Acc g_ii, Acc g_jj, Acc g_ij) {
  const Acc d2 = squared_distance(g_ii, g_jj, g_ij);
  const Acc clamp = static_cast<Acc>(kDistanceClamp);
  return d2 > clamp ? ClampedDistance<Acc>{kd_sqrt(d2), false} : ClampedDistance<Acc>{kd_sqrt(clamp), true};
}

template <typename Acc>
struct DistancePair {
  ClampedDistance<Acc> s, t;
};

template <typename Acc>
__device__ __forceinline__ DistancePair<Acc> distance_pair(const GramArgs<Acc>& g, const Acc* __restrict__ diagonals,
                                                           int64_t i, int64_t j) {
  const int64_t B = g.batch;
  return DistancePair<Acc>{clamped_distance(diagonals[i], diagonals[j], g.gram_student[i * B + j]),
                           clamped_distance(diagonals[B + i], diagonals[B + j], g.gram_teacher[i * B + j])};
}

// The normalisers (mu_s, mu_t) from the rows' distance sums [2, B].
template <typename Acc>
__device__ __forceinline__ SumState<Acc, 2> distance_means(const Acc* __restrict__ row_sums, int64_t B) {
  SumState<Acc, 2> mu = sum_components<Acc, 2>(row_sums, B);
  const Acc pairs = static_cast<Acc>(B) * static_cast<Acc>(B - 1);
  mu.v[0] /= pairs;
  mu.v[1] /= pairs;
  return mu;
}

// Pass 1: row_sums [2, B] = per row sum_{j != i} (d_s, d_t).
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_distance_sums_kernel(GramArgs<Acc> g, const Acc* __restrict__ diagonals, Acc* __restrict__ row_sums) {
  const int64_t B = g.batch, i = blockIdx.x;
  SumState<Acc, 2> sums = empty_sum_state<Acc, 2>();
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair<Acc> d = distance_pair(g, diagonals, i, j);
    sums.v[0] += d.s.d;
    sums.v[1] += d.t.d;
  });
  sums = block_sum(sums);
  if (threadIdx.x != 0) return;
  row_sums[i] = sums.v[0];
  row_sums[B + i] = sums.v[1];
}

// Pass 2: partials [3, B] = per row sum_j (huber(u), h d_s, h d_t), u = d_s / mu_s - d_t / mu_t, h = huber'(u).
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_distance_loss_kernel(GramArgs<Acc> g, const Acc* __restrict__ diagonals, const Acc* __restrict__ row_sums,
                             Acc* __restrict__ partials) {
  const int64_t B = g.batch, i = blockIdx.x;
  const SumState<Acc, 2> mu = distance_means(row_sums, B);
  SumState<Acc, 3> sums = empty_sum_state<Acc, 3>();
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair<Acc> d = distance_pair(g, diagonals, i, j);
    const Acc u = d.s.d / mu.v[0] - d.t.d / mu.v[1];
    const Acc h = huber_grad(u);
    sums.v[0] += huber(u);
    sums.v[1] += h * d.s.d;
    sums.v[2] += h * d.t.d;
  });
  sums = block_sum(sums);
  if (threadIdx.x != 0) return;
  for (int w = 0; w < 3; ++w) partials[w * B + i] = sums.v[w];
}

// dG's share of one side's dL/dd at (i, j): -2 dD2 (returned as dD2; zero where the clamp holds d constant).
template <typename Acc>
__device__ __forceinline__ Acc distance_d2_grad(const ClampedDistance<Acc>& d, Acc grad_d) {
  return d.clamped ? Acc(0) : grad_d / (Acc(2) * d.d);
}

// Pass 3: dG[i, j] += -2 dD2_ij (j != i), dG[i, i] += 2 sum_j dD2_ij (dD2 symmetric), both scaled by weight / B^2.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_distance_grad_kernel(GramArgs<Acc> g, const Acc* __restrict__ diagonals, const Acc* __restrict__ row_sums,
                             const Acc* __restrict__ partials, Acc scale) {
  const int64_t B = g.batch, i = blockIdx.x;
  const SumState<Acc, 2> mu = distance_means(row_sums, B);
  const SumState<Acc, 3> totals = sum_components<Acc, 3>(partials, B);
  const Acc pairs = static_cast<Acc>(B) * static_cast<Acc>(B - 1);
  // dL/dd = scale (+-h / mu -+ shift), shift = sum h d / (mu^2 (B^2 - B)).
  const Acc shift_s = totals.v[1] / (mu.v[0] * mu.v[0] * pairs), shift_t = totals.v[2] / (mu.v[1] * mu.v[1] * pairs);
  SumState<Acc, 2> diagonal = empty_sum_state<Acc, 2>();
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair<Acc> d = distance_pair(g, diagonals, i, j);
    const Acc h = huber_grad(d.s.d / mu.v[0] - d.t.d / mu.v[1]);
    if (g.dgram_student != nullptr) {
      const Acc dd2 = distance_d2_grad(d.s, scale * (h / mu.v[0] - shift_s));
      g.dgram_student[i * B + j] -= Acc(2) * dd2;
      diagonal.v[0] += dd2;
    }
    if (g.dgram_teacher != nullptr) {
      const Acc dd2 = distance_d2_grad(d.t, scale * (shift_t - h / mu.v[1]));
      g.dgram_teacher[i * B + j] -= Acc(2) * dd2;
      diagonal.v[1] += dd2;
    }
  });
  diagonal = block_sum(diagonal);
  if (threadIdx.x != 0) return;
  if (g.dgram_student != nullptr) g.dgram_student[i * B + i] += Acc(2) * diagonal.v[0];
  if (g.dgram_teacher != nullptr) g.dgram_teacher[i * B + i] += Acc(2) * diagonal.v[1];
}

// ----------------------------------------------------------------------------------------------------------------
// RKD angle.

// inverse_distances [2, B, B] = (r_s, r_t).
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_angle_inverse_distances_kernel(GramArgs<Acc> g, const Acc* __restrict__ diagonals,
                                       Acc* __restrict__ inverse_distances) {
  const int64_t B = g.batch, i = blockIdx.x;
  for_each_column(B, [&](int64_t j) {
    const Acc d2_s = squared_distance(diagonals[i], diagonals[j], g.gram_student[i * B + j]);
    const Acc d2_t = squared_distance(diagonals[B + i], diagonals[B + j], g.gram_teacher[i * B + j]);
    inverse_distances[i * B + j] = d2_s > Acc(0) && j != i ? Acc(1) / kd_sqrt(d2_s) : Acc(0);
    inverse_distances[B * B + i * B + j] = d2_t > Acc(0) && j != i ? Acc(1) / kd_sqrt(d2_t) : Acc(0);
  });
}

template <typename Acc>
struct AngleArgs {
  GramArgs<Acc> gram;
  const Acc* diagonals;          // [2, B]
  const Acc* inverse_distances;  // [2, B, B]
  Acc* column_sums[2];           // Q_side[b, c] = sum_a M_abc (rows written by block b), when that side is requested
  Acc* apex_sums[2];             // W_side[a, b] (column b written by block b), when that side is requested
  Acc* partials;                 // [3, B]: per b sum huber, sum_a dD2_ab (student), sum_a dD2_ab (teacher)
};

// One step of the warp transpose-reduction: lanes with bit HALF set keep the upper half of v[0, 2 HALF), the others
// the lower half, each adding its partner's copy, so that v[0, HALF) holds pair sums.
template <int HALF, typename Acc>
__device__ __forceinline__ void transpose_sum_step(Acc (&v)[32]) {
  const bool upper = (static_cast<int>(threadIdx.x) & HALF) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const Acc send = upper ? v[i] : v[i + HALF];
    const Acc keep = upper ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, HALF);
  }
}

// Reduces 32 values over a warp: afterwards lane l holds the warp's sum of v[l] (31 shuffles).
template <typename Acc>
__device__ __forceinline__ Acc warp_transpose_sum(Acc (&v)[32]) {
  transpose_sum_step<16>(v);
  transpose_sum_step<8>(v);
  transpose_sum_step<4>(v);
  transpose_sum_step<2>(v);
  transpose_sum_step<1>(v);
  return v[0];
}

// One side's quantities of the apex a seen from the block's b.
template <typename Acc>
struct Apex {
  Acc g_ab, g_aa, r_ab, r_ab2;
};

template <typename Acc>
__device__ __forceinline__ Apex<Acc> load_apex(const Acc* __restrict__ gram, const Acc* __restrict__ diagonal,
                                               const Acc* __restrict__ inverse, int64_t B, int64_t a, int64_t b) {
  const Acc r = inverse[b * B + a];
  return Apex<Acc>{gram[b * B + a], diagonal[a], r, r * r};
}

template <typename Acc>
__device__ __forceinline__ Acc angle(Acc g_bc, Acc g_ac, Acc r_ac, const Apex<Acc>& apex) {
  return ((g_bc - apex.g_ab) - (g_ac - apex.g_aa)) * apex.r_ab * r_ac;
}

// The block's sums over c of a chunk of 16 apexes (index side * 16 + i): W_side[a0 + i, b] = r_ab * sum (tile 0
// stores, later tiles add). The two buffers of `exchange` alternate between chunks, so one barrier per chunk suffices.
template <typename Acc, bool kStudentGrad, bool kTeacherGrad>
__device__ __forceinline__ void store_apex_chunk(const AngleArgs<Acc>& args, Acc (&chunk)[32], int64_t a0, int64_t b,
                                                 bool first_tile, Acc (*exchange)[32], int parity) {
  const int tid = static_cast<int>(threadIdx.x), warps = static_cast<int>(blockDim.x) / 32;
  const Acc warp_total = warp_transpose_sum(chunk);
  exchange[parity * warps + tid / 32][tid % 32] = warp_total;
  __syncthreads();
  if (tid >= 32) return;
  Acc total = Acc(0);
  for (int w = 0; w < warps; ++w) total += exchange[parity * warps + w][tid];
  const int side = tid / kAngleApexChunk;
  const int64_t B = args.gram.batch, a = a0 + tid % kAngleApexChunk;
  if (a >= B || (side == 0 && !kStudentGrad) || (side == 1 && !kTeacherGrad)) return;
  const Acc r_ab = args.inverse_distances[side * B * B + b * B + a];
  Acc* w = (side == 0 ? args.apex_sums[0] : args.apex_sums[1]) + a * B + b;
  *w = (first_tile ? Acc(0) : *w) + r_ab * total;
}

// One block per middle index b; thread tid covers columns c = tile + tid + k * blockDim.x (k < 4) of each tile.
template <typename Acc, bool kStudentGrad, bool kTeacherGrad>
__global__ void __launch_bounds__(kMaxRowThreads) rkd_angle_kernel(AngleArgs<Acc> args) {
  constexpr bool kGrad = kStudentGrad || kTeacherGrad;
  constexpr int kCols = kAngleColumnsPerThread;
  __shared__ Acc exchange[2 * (kMaxRowThreads / 32)][32];
  const GramArgs<Acc>& g = args.gram;
  const int64_t B = g.batch, b = blockIdx.x, threads = blockDim.x;
  const Acc* r_s = args.inverse_distances;
  const Acc* r_t = args.inverse_distances + B * B;
  Acc loss = Acc(0), col_s = Acc(0), col_t = Acc(0);  // col: sum over (a, c) of r_ab^2 g psi (= -sum_a dD2_ab)
  int parity = 0;
  for (int64_t tile = 0; tile < B; tile += threads * kCols) {
    Acc g_bc_s[kCols], g_bc_t[kCols], q_s[kCols], q_t[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = tile + threadIdx.x + k * threads;
      g_bc_s[k] = c < B ? g.gram_student[b * B + c] : Acc(0);
      g_bc_t[k] = c < B ? g.gram_teacher[b * B + c] : Acc(0);
      q_s[k] = q_t[k] = Acc(0);
    }
    for (int64_t a0 = 0; a0 < B; a0 += kAngleApexChunk) {
      Acc chunk[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) chunk[i] = Acc(0);
#pragma unroll
      for (int i = 0; i < kAngleApexChunk; ++i) {
        const int64_t a = a0 + i;
        if (a >= B) continue;
        const Apex<Acc> as = load_apex(g.gram_student, args.diagonals, r_s, B, a, b);
        const Apex<Acc> at = load_apex(g.gram_teacher, args.diagonals + B, r_t, B, a, b);
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          const int64_t c = tile + threadIdx.x + k * threads;
          if (c >= B) continue;
          const Acc r_ac_s = r_s[a * B + c], r_ac_t = r_t[a * B + c];
          const Acc psi_s = angle(g_bc_s[k], g.gram_student[a * B + c], r_ac_s, as);
          const Acc psi_t = angle(g_bc_t[k], g.gram_teacher[a * B + c], r_ac_t, at);
          const Acc diff = psi_s - psi_t;
          loss += huber(diff);
          if constexpr (kGrad) {
            const Acc h = huber_grad(diff);
            if constexpr (kStudentGrad) {
              q_s[k] += h * as.r_ab * r_ac_s;
              chunk[i] += h * (r_ac_s - as.r_ab * psi_s);
              col_s += h * psi_s * as.r_ab2;
            }
            if constexpr (kTeacherGrad) {
              q_t[k] -= h * at.r_ab * r_ac_t;
              chunk[kAngleApexChunk + i] -= h * (r_ac_t - at.r_ab * psi_t);
              col_t -= h * psi_t * at.r_ab2;
            }
          }
        }
      }
      if constexpr (kGrad) {
        store_apex_chunk<Acc, kStudentGrad, kTeacherGrad>(args, chunk, a0, b, tile == 0, exchange, parity);
        parity ^= 1;
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = tile + threadIdx.x + k * threads;
      if (c >= B) continue;
      if constexpr (kStudentGrad) args.column_sums[0][b * B + c] = q_s[k];
      if constexpr (kTeacherGrad) args.column_sums[1][b * B + c] = q_t[k];
    }
  }
  const SumState<Acc, 3> sums = block_sum(SumState<Acc, 3>{{loss, -col_s, -col_t}});
  if (threadIdx.x != 0) return;
  for (int w = 0; w < 3; ++w) args.partials[w * B + b] = sums.v[w];
}

// dG[a, c] += scale (Q[a, c] - 2 W[a, c]); dG[a, a] += scale (sum_c W[a, c] + sum_x dD2_xa). One block per row a.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads) rkd_angle_grad_kernel(AngleArgs<Acc> args, Acc scale) {
  const int64_t B = args.gram.batch, a = blockIdx.x;
  Acc* dgram[2] = {args.gram.dgram_student, args.gram.dgram_teacher};
  SumState<Acc, 2> row = empty_sum_state<Acc, 2>();
  for_each_column(B, [&](int64_t c) {
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      if (dgram[side] == nullptr) continue;
      const Acc w = args.apex_sums[side][a * B + c];
      dgram[side][a * B + c] += scale * (args.column_sums[side][a * B + c] - Acc(2) * w);
      row.v[side] += w;
    }
  });
  row = block_sum(row);
  if (threadIdx.x != 0) return;
  for (int side = 0; side < 2; ++side) {
    if (dgram[side] != nullptr) dgram[side][a * B + a] += scale * (row.v[side] + args.partials[(1 + side) * B + a]);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// SP and PKT: one block per row i does the whole row (its sums, the loss, the gradient); partials [B] = row losses.

template <typename Acc>
__device__ __forceinline__ Acc gram_at(const Acc* __restrict__ gram, int64_t B, int64_t i, int64_t j) {
  return gram[i * B + j];
}

// F.normalize of row i: x / max(|x|, eps) with norm n (the norm is differentiable where n >= eps).
template <typename Acc>
struct RowScale {
  Acc norm, denominator;
};

template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    sp_kernel(GramArgs<Acc> g, Acc scale, Acc* __restrict__ partials) {
  const int64_t B = g.batch, i = blockIdx.x;
  const Acc eps = static_cast<Acc>(kNormalizeEps);
  SumState<Acc, 2> squares = empty_sum_state<Acc, 2>();
  for_each_column(B, [&](int64_t j) {
    const Acc s = gram_at(g.gram_student, B, i, j), t = gram_at(g.gram_teacher, B, i, j);
    squares.v[0] += s * s;
    squares.v[1] += t * t;
  });
  squares = block_sum(squares);
  const Acc n_s = kd_sqrt(squares.v[0]), n_t = kd_sqrt(squares.v[1]);
  const RowScale<Acc> rs{n_s, kd_max(n_s, eps)}, rt{n_t, kd_max(n_t, eps)};
  // sums: loss, y_s . h_s, y_t . h_t with h = dL/dy = -+2 scale (y_t - y_s).
  SumState<Acc, 3> sums = empty_sum_state<Acc, 3>();
  for_each_column(B, [&](int64_t j) {
    const Acc y_s = gram_at(g.gram_student, B, i, j) / rs.denominator;
    const Acc y_t = gram_at(g.gram_teacher, B, i, j) / rt.denominator;
    const Acc diff = y_t - y_s;
    sums.v[0] += diff * diff;
    sums.v[1] -= Acc(2) * scale * diff * y_s;
    sums.v[2] += Acc(2) * scale * diff * y_t;
  });
  sums = block_sum(sums);
  if (g.dgram_student != nullptr || g.dgram_teacher != nullptr) {
    const Acc radial_s = rs.norm >= eps ? sums.v[1] : Acc(0), radial_t = rt.norm >= eps ? sums.v[2] : Acc(0);
    for_each_column(B, [&](int64_t j) {
      const Acc y_s = gram_at(g.gram_student, B, i, j) / rs.denominator;
      const Acc y_t = gram_at(g.gram_teacher, B, i, j) / rt.denominator;
      const Acc h = Acc(2) * scale * (y_t - y_s);
      if (g.dgram_student != nullptr) g.dgram_student[i * B + j] += (-h - y_s * radial_s) / rs.denominator;
      if (g.dgram_teacher != nullptr) g.dgram_teacher[i * B + j] += (h - y_t * radial_t) / rt.denominator;
    });
  }
  if (threadIdx.x == 0) partials[i] = sums.v[0];
}

// One PKT entry: P_s, P_t, the loss term and the gradients h = dL/dP (unscaled by 1/B^2 and the weight).
template <typename Acc>
struct PktEntry {
  Acc p_s, p_t, loss, h_s, h_t;
};

template <typename Acc>
__device__ __forceinline__ PktEntry<Acc> pkt_entry(Acc g_s, Acc g_t, Acc sum_s, Acc sum_t, Acc eps) {
  const Acc p_s = (g_s + Acc(1)) / Acc(2) / sum_s, p_t = (g_t + Acc(1)) / Acc(2) / sum_t;
  const Acc log_ratio = kd_log((p_t + eps) / (p_s + eps));
  return PktEntry<Acc>{p_s, p_t, p_t * log_ratio, -p_t / (p_s + eps), log_ratio + p_t / (p_t + eps)};
}

template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    pkt_kernel(GramArgs<Acc> g, Acc eps, Acc scale, Acc* __restrict__ partials) {
  const int64_t B = g.batch, i = blockIdx.x;
  SumState<Acc, 2> row = empty_sum_state<Acc, 2>();
  for_each_column(B, [&](int64_t j) {
    row.v[0] += (gram_at(g.gram_student, B, i, j) + Acc(1)) / Acc(2);
    row.v[1] += (gram_at(g.gram_teacher, B, i, j) + Acc(1)) / Acc(2);
  });
  row = block_sum(row);
  // sums: loss, h_s . P_s, h_t . P_t.
  SumState<Acc, 3> sums = empty_sum_state<Acc, 3>();
  for_each_column(B, [&](int64_t j) {
    const PktEntry<Acc> e =
        pkt_entry(gram_at(g.gram_student, B, i, j), gram_at(g.gram_teacher, B, i, j), row.v[0], row.v[1], eps);
    sums.v[0] += e.loss;
    sums.v[1] += e.h_s * e.p_s;
    sums.v[2] += e.h_t * e.p_t;
  });
  sums = block_sum(sums);
  // dL/dS_ij = (h_j - h . P_i) / rowsum; dS/dG = 1/2.
  if (g.dgram_student != nullptr || g.dgram_teacher != nullptr) {
    for_each_column(B, [&](int64_t j) {
      const PktEntry<Acc> e =
          pkt_entry(gram_at(g.gram_student, B, i, j), gram_at(g.gram_teacher, B, i, j), row.v[0], row.v[1], eps);
      if (g.dgram_student != nullptr) {
        g.dgram_student[i * B + j] += scale * (e.h_s - sums.v[1]) / (Acc(2) * row.v[0]);
      }
      if (g.dgram_teacher != nullptr) {
        g.dgram_teacher[i * B + j] += scale * (e.h_t - sums.v[2]) / (Acc(2) * row.v[1]);
      }
    });
  }
  if (threadIdx.x == 0) partials[i] = sums.v[0];
}

// ----------------------------------------------------------------------------------------------------------------
// CC: elementwise over the B^2 entries (grid-stride); partials [gridDim.x] = the blocks' loss sums.

template <typename Acc>
struct CcSeries {
  Acc coefficient[kMaxCcOrder + 1];  // exp(-2 gamma) (2 gamma)^p / p!
  int order;
  bool bilinear;
};

template <typename Acc>
struct KernelValue {
  Acc k, dk;  // K(G) and dK/dG
};

// Horner's scheme for the series and its derivative.
template <typename Acc>
__device__ __forceinline__ KernelValue<Acc> cc_kernel_value(const CcSeries<Acc>& series, Acc x) {
  if (series.bilinear) return KernelValue<Acc>{x, Acc(1)};
  Acc k = series.coefficient[series.order], dk = Acc(0);
  for (int p = series.order - 1; p >= 0; --p) {
    dk = dk * x + k;
    k = k * x + series.coefficient[p];
  }
  return KernelValue<Acc>{k, dk};
}

template <typename Acc>
__global__ void __launch_bounds__(kElementwiseThreads)
    cc_kernel(GramArgs<Acc> g, CcSeries<Acc> series, Acc scale, Acc* __restrict__ partials) {
  const int64_t entries = g.batch * g.batch;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  SumState<Acc, 1> loss = empty_sum_state<Acc, 1>();
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries; e += step) {
    const KernelValue<Acc> ks = cc_kernel_value(series, g.gram_student[e]);
    const KernelValue<Acc> kt = cc_kernel_value(series, g.gram_teacher[e]);
    const Acc diff = ks.k - kt.k;
    loss.v[0] += diff * diff;
    if (g.dgram_student != nullptr) g.dgram_student[e] += Acc(2) * scale * diff * ks.dk;
    if (g.dgram_teacher != nullptr) g.dgram_teacher[e] -= Acc(2) * scale * diff * kt.dk;
  }
  loss = block_sum(loss);
  if (threadIdx.x == 0) partials[blockIdx.x] = loss.v[0];
}

// ----------------------------------------------------------------------------------------------------------------
// Host-side launch helpers. Requirements (the launcher's host glue checks them): 2 <= B < 2^31, Grams contiguous
// symmetric [B, B], dgram contiguous [B, B] or nullptr, loss a single Acc, workspace of *_workspace_elements Acc.
// weight: the term's weight; each helper adds weight * L to *loss and weight * dL/dG to the dgram.

// Threads of a row block: whole warps, at most kMaxRowThreads.
inline int row_threads(int64_t B) { return static_cast<int>(clamp64((B + 31) / 32 * 32, 32, kMaxRowThreads)); }

inline unsigned row_blocks(int64_t B) { return static_cast<unsigned>(B); }

inline int64_t cc_blocks(int64_t B) {
  return clamp64((B * B + kElementwiseThreads - 1) / kElementwiseThreads, 1, kElementwiseMaxBlocks);
}

inline int64_t rkd_distance_workspace_elements(int64_t B) { return 2 * B + 2 * B + 3 * B; }

inline int64_t rkd_angle_workspace_elements(int64_t B, bool student_grad, bool teacher_grad) {
  const int64_t sides = (student_grad ? 1 : 0) + (teacher_grad ? 1 : 0);
  return 2 * B + 3 * B + 2 * B * B + sides * 2 * B * B;
}

inline int64_t sp_workspace_elements(int64_t B) { return B; }
inline int64_t pkt_workspace_elements(int64_t B) { return B; }
inline int64_t cc_workspace_elements(int64_t B) { return cc_blocks(B); }

template <typename Acc>
void launch_add_scaled_sum(const Acc* values, int64_t n, double scale, Acc* loss, cudaStream_t stream) {
  add_scaled_sum_kernel<Acc><<<1, kMaxRowThreads, 0, stream>>>(values, n, static_cast<Acc>(scale), loss);
}

template <typename Acc>
void launch_gram_diagonals(const GramArgs<Acc>& g, Acc* diagonals, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((g.batch + kMaxRowThreads - 1) / kMaxRowThreads);
  gram_diagonals_kernel<Acc><<<blocks, kMaxRowThreads, 0, stream>>>(g, diagonals);
}

template <typename Acc>
void launch_rkd_distance(const GramArgs<Acc>& g, double weight, Acc* loss, Acc* workspace, cudaStream_t stream) {
  const int64_t B = g.batch;
  Acc* diagonals = workspace;         // [2, B]
  Acc* row_sums = workspace + 2 * B;  // [2, B]
  Acc* partials = workspace + 4 * B;  // [3, B]
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  const int threads = row_threads(B);
  launch_gram_diagonals(g, diagonals, stream);
  rkd_distance_sums_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, diagonals, row_sums);
  rkd_distance_loss_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, diagonals, row_sums, partials);
  if (g.dgram_student != nullptr || g.dgram_teacher != nullptr) {
    rkd_distance_grad_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, diagonals, row_sums, partials,
                                                                         static_cast<Acc>(scale));
  }
  launch_add_scaled_sum(partials, B, scale, loss, stream);
}

template <typename Acc>
void launch_rkd_angle(const GramArgs<Acc>& g, double weight, Acc* loss, Acc* workspace, cudaStream_t stream) {
  const int64_t B = g.batch;
  const bool student_grad = g.dgram_student != nullptr, teacher_grad = g.dgram_teacher != nullptr;
  Acc* inverse_distances = workspace + 5 * B;  // after diagonals [2, B] and partials [3, B]
  AngleArgs<Acc> args{g, workspace, inverse_distances, {nullptr, nullptr}, {nullptr, nullptr}, workspace + 2 * B};
  Acc* next = workspace + 5 * B + 2 * B * B;
  for (int side = 0; side < 2; ++side) {
    if (!(side == 0 ? student_grad : teacher_grad)) continue;
    args.column_sums[side] = next;
    args.apex_sums[side] = next + B * B;
    next += 2 * B * B;
  }
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B) * static_cast<double>(B));
  const int threads = row_threads(B);
  launch_gram_diagonals(g, workspace, stream);
  rkd_angle_inverse_distances_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, args.diagonals,
                                                                                 inverse_distances);
  if (student_grad && teacher_grad) {
    rkd_angle_kernel<Acc, true, true><<<row_blocks(B), threads, 0, stream>>>(args);
  } else if (student_grad) {
    rkd_angle_kernel<Acc, true, false><<<row_blocks(B), threads, 0, stream>>>(args);
  } else if (teacher_grad) {
    rkd_angle_kernel<Acc, false, true><<<row_blocks(B), threads, 0, stream>>>(args);
  } else {
    rkd_angle_kernel<Acc, false, false><<<row_blocks(B), threads, 0, stream>>>(args);
  }
  if (student_grad || teacher_grad) {
    rkd_angle_grad_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(args, static_cast<Acc>(scale));
  }
  launch_add_scaled_sum(args.partials, B, scale, loss, stream);
}

template <typename Acc>
void launch_sp(const GramArgs<Acc>& g, double weight, Acc* loss, Acc* workspace, cudaStream_t stream) {
  const int64_t B = g.batch;
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  sp_kernel<Acc><<<row_blocks(B), row_threads(B), 0, stream>>>(g, static_cast<Acc>(scale), workspace);
  launch_add_scaled_sum(workspace, B, scale, loss, stream);
}

template <typename Acc>
void launch_pkt(const GramArgs<Acc>& g, double weight, double eps, Acc* loss, Acc* workspace, cudaStream_t stream) {
  const int64_t B = g.batch;
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  pkt_kernel<Acc><<<row_blocks(B), row_threads(B), 0, stream>>>(g, static_cast<Acc>(eps), static_cast<Acc>(scale),
                                                               workspace);
  launch_add_scaled_sum(workspace, B, scale, loss, stream);
}

// The series' coefficients in double, rounded once to Acc. Requires 0 <= order <= kMaxCcOrder.
template <typename Acc>
CcSeries<Acc> cc_series(double gamma, int64_t order, bool bilinear) {
  CcSeries<Acc> series{};
  series.order = static_cast<int>(order);
  series.bilinear = bilinear;
  double coefficient = std::exp(-2.0 * gamma);
  for (int p = 0; p <= series.order; ++p) {
    if (p > 0) coefficient *= 2.0 * gamma / p;
    series.coefficient[p] = static_cast<Acc>(coefficient);
  }
  return series;
}

template <typename Acc>
void launch_cc(const GramArgs<Acc>& g, double weight, double gamma, int64_t order, bool bilinear, Acc* loss,
               Acc* workspace, cudaStream_t stream) {
  const int64_t B = g.batch;
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  const int64_t blocks = cc_blocks(B);
  cc_kernel<Acc><<<static_cast<unsigned>(blocks), kElementwiseThreads, 0, stream>>>(
      g, cc_series<Acc>(gamma, order, bilinear), static_cast<Acc>(scale), workspace);
  launch_add_scaled_sum(workspace, blocks, scale, loss, stream);
}

}  // namespace pairwise_cuda
}  // namespace kdkernels

#endif  // KDKERNELS_PAIRWISE_KERNELS_CUH_

// ------------------------------------------------------------------------------------------------------------------
// Standalone compile check (CMake builds a .cu that defines this and includes this header, with plain nvcc): every
// kernel the launchers can launch, in float and double.
#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_PAIRWISE_INSTANTIATE(ACC)                                                                          \
  template void kdkernels::pairwise_cuda::launch_rkd_distance<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&,   \
                                                                   double, ACC*, ACC*, cudaStream_t);                \
  template void kdkernels::pairwise_cuda::launch_rkd_angle<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&,      \
                                                                double, ACC*, ACC*, cudaStream_t);                   \
  template void kdkernels::pairwise_cuda::launch_sp<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,     \
                                                         ACC*, ACC*, cudaStream_t);                                  \
  template void kdkernels::pairwise_cuda::launch_pkt<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,    \
                                                          double, ACC*, ACC*, cudaStream_t);                         \
  template void kdkernels::pairwise_cuda::launch_cc<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,     \
                                                         double, int64_t, bool, ACC*, ACC*, cudaStream_t);

KDKERNELS_PAIRWISE_INSTANTIATE(float)
KDKERNELS_PAIRWISE_INSTANTIATE(double)
#undef KDKERNELS_PAIRWISE_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
