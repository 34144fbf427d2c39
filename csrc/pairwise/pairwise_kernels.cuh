// CUDA device code of the pairwise family: the Gram-level losses and their gradients dL/dG. Each launch adds
// weight * L to *loss and weight * dL/dG_s, weight * dL/dG_t to the requested dG (nullptr = not requested).
//
// Spec: kdkernels/reference/pairwise.py, through the Gram contract of pairwise_host.h: SP, PKT and CC read
// G = P P^T of the preprocessed features, symmetric, contiguous [B, B] in Acc = float or double; only dG + dG^T is
// used, so a term of a symmetric entry may land on (i, j) or on (j, i). RKD reads the squared distances D2 [B, B]
// (0 on the diagonal and for coincident points) and, for the angle, the float64 Gram as fixed-point hi/lo pairs
// [B, 2B] in Acc (row i: hi(G_i.), lo(G_i.); differences of two hi entries of a row are exact); RKD kernels write dG
// off the diagonal only (the host derives the diagonal). With huber = smooth_l1 with beta 1:
//   rkd_distance  d_ij = sqrt(max(D2_ij, 1e-12)) (i != j; zero gradient where clamped), d_ii = 0,
//                 mu = sum_{i != j} d_ij / (B^2 - B), L = mean_{B x B} huber(d_s / mu_s - d_t / mu_t);
//                 with g = huber'(u) / B^2: dL/dd_ij = g_ij / mu - (sum g d) / (mu^2 (B^2 - B)) (teacher: -g),
//                 dG_ij = -2 dL/dD2_ij = -dL/dd_ij / d_ij. In double arithmetic (the loss sums terms of both signs,
//                 which one rounded 1 / mu would scale alike).
//   rkd_angle     r_ij = 1 / sqrt(D2_ij) (0 when i == j or coincident), psi_abc = N_abc r_ab r_ac with
//                 N_abc = ((hi_bc - hi_ba) - (hi_ac - hi_aa)) + ((lo_bc - lo_ba) - (lo_ac - lo_aa)) (rows b and a),
//                 L = mean_{B^3} huber(psi_s - psi_t). With g = huber'(psi_s - psi_t) / B^3 (teacher: -g and its
//                 own r), M_abc = g r_ab r_ac: W_ab = sum_c M_abc - r_ab^2 sum_c g psi_abc = r_ab sum_c g (r_ac -
//                 r_ab psi_abc) is dL/dD2_ab (D2_ab's roles in psi = (D2_ab + D2_ac - D2_bc) r_ab r_ac / 2, and
//                 r_ab), Q_bc = sum_a M_abc gives dL/dD2_bc -= Q_bc / 2, so dG = Q - 2 W off the diagonal.
//   sp            n_i = |G_i.|, Gn = G / max(n, 1e-12), L = sum (Gn_t - Gn_s)^2 / B^2.
//   pkt           S = (G + 1) / 2, P = S / rowsum(S), L = mean P_t log((P_t + eps) / (P_s + eps)); in double
//                 arithmetic (the loss is a KL-like sum of terms of both signs, and dL/dS cancels O(1) parts).
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

constexpr double kDistanceClamp = 1e-12;  // pairwise_host.h's constants (the launcher asserts they agree)
constexpr double kNormalizeEps = 1e-12;
constexpr int kMaxRowThreads = 256;
constexpr int kAngleColumnsPerThread = 4;  // a block covers kMaxRowThreads * 4 columns c per pass over the apexes
constexpr int kAngleApexChunk = 16;        // apexes per block reduction: 2 sides x 16 = one value per lane
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 1024;
constexpr int kMaxCcOrder = 64;

static_assert(2 * kAngleApexChunk == 32, "the apex chunk's two sides fill one warp");

// The Gram-level inputs of both sides (pairwise_host.h's GramProblem) and the gradients to accumulate into (nullptr:
// not requested).
template <typename Acc>
struct GramArgs {
  const Acc* gram_student;  // SP, PKT, CC: [B, B]; RKD angle: [B, 2B] hi/lo; RKD distance: unused
  const Acc* gram_teacher;
  const Acc* sqdist_student;  // RKD: [B, B]
  const Acc* sqdist_teacher;
  Acc* dgram_student;
  Acc* dgram_teacher;
  int64_t batch;
};

// ----------------------------------------------------------------------------------------------------------------
// Scalar math.

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

// *loss += scale * sum(values[0:n]), summed in Value. One block.
template <typename Value, typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    add_scaled_sum_kernel(const Value* __restrict__ values, int64_t n, double scale, Acc* __restrict__ loss) {
  const SumState<Value, 1> total = sum_components<Value, 1>(values, n);
  if (threadIdx.x == 0) *loss += static_cast<Acc>(scale * static_cast<double>(total.v[0]));
}

// ----------------------------------------------------------------------------------------------------------------
// RKD distance: three row passes (one block per row i) and the loss, in double.

struct ClampedDistance {
  double d;
  bool clamped;  // D2 < 1e-12: d is the constant sqrt(1e-12)
};

__device__ __forceinline__ ClampedDistance clamped_distance(double d2) {
  return d2 >= kDistanceClamp ? ClampedDistance{sqrt(d2), false} : ClampedDistance{sqrt(kDistanceClamp), true};
}

struct DistancePair {
  ClampedDistance s, t;
};

template <typename Acc>
__device__ __forceinline__ DistancePair distance_pair(const GramArgs<Acc>& g, int64_t i, int64_t j) {
  const int64_t B = g.batch;
  return DistancePair{clamped_distance(static_cast<double>(g.sqdist_student[i * B + j])),
                      clamped_distance(static_cast<double>(g.sqdist_teacher[i * B + j]))};
}

// The normalisers (mu_s, mu_t) from the rows' distance sums [2, B].
__device__ __forceinline__ SumState<double, 2> distance_means(const double* __restrict__ row_sums, int64_t B) {
  SumState<double, 2> mu = sum_components<double, 2>(row_sums, B);
  const double pairs = static_cast<double>(B) * static_cast<double>(B - 1);
  mu.v[0] /= pairs;
  mu.v[1] /= pairs;
  return mu;
}

// Pass 1: row_sums [2, B] = per row sum_{j != i} (d_s, d_t).
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_distance_sums_kernel(GramArgs<Acc> g, double* __restrict__ row_sums) {
  const int64_t B = g.batch, i = blockIdx.x;
  SumState<double, 2> sums = empty_sum_state<double, 2>();
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair d = distance_pair(g, i, j);
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
    rkd_distance_loss_kernel(GramArgs<Acc> g, const double* __restrict__ row_sums, double* __restrict__ partials) {
  const int64_t B = g.batch, i = blockIdx.x;
  const SumState<double, 2> mu = distance_means(row_sums, B);
  SumState<double, 3> sums = empty_sum_state<double, 3>();
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair d = distance_pair(g, i, j);
    const double u = d.s.d / mu.v[0] - d.t.d / mu.v[1];
    const double h = huber_grad(u);
    sums.v[0] += huber(u);
    sums.v[1] += h * d.s.d;
    sums.v[2] += h * d.t.d;
  });
  sums = block_sum(sums);
  if (threadIdx.x != 0) return;
  for (int w = 0; w < 3; ++w) partials[w * B + i] = sums.v[w];
}

// dG's share of one side's dL/dd at (i, j): -2 dL/dD2 = -dL/dd / d (zero where the clamp holds d constant).
__device__ __forceinline__ double distance_gram_grad(const ClampedDistance& d, double grad_d) {
  return d.clamped ? 0.0 : -grad_d / d.d;
}

// Pass 3: dG[i, j] += -dL/dd_ij / d_ij (j != i), scaled by weight / B^2.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_distance_grad_kernel(GramArgs<Acc> g, const double* __restrict__ row_sums,
                             const double* __restrict__ partials, double scale) {
  const int64_t B = g.batch, i = blockIdx.x;
  const SumState<double, 2> mu = distance_means(row_sums, B);
  const SumState<double, 3> totals = sum_components<double, 3>(partials, B);
  const double pairs = static_cast<double>(B) * static_cast<double>(B - 1);
  // dL/dd = scale (+-h / mu -+ shift), shift = sum h d / (mu^2 (B^2 - B)).
  const double shift_s = totals.v[1] / (mu.v[0] * mu.v[0] * pairs);
  const double shift_t = totals.v[2] / (mu.v[1] * mu.v[1] * pairs);
  for_each_column(B, [&](int64_t j) {
    if (j == i) return;
    const DistancePair d = distance_pair(g, i, j);
    const double h = huber_grad(d.s.d / mu.v[0] - d.t.d / mu.v[1]);
    if (g.dgram_student != nullptr) {
      g.dgram_student[i * B + j] += static_cast<Acc>(distance_gram_grad(d.s, scale * (h / mu.v[0] - shift_s)));
    }
    if (g.dgram_teacher != nullptr) {
      g.dgram_teacher[i * B + j] += static_cast<Acc>(distance_gram_grad(d.t, scale * (shift_t - h / mu.v[1])));
    }
  });
}

// ----------------------------------------------------------------------------------------------------------------
// RKD angle.

// inverse_distances [2, B, B] = (r_s, r_t) from D2.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    rkd_angle_inverse_distances_kernel(GramArgs<Acc> g, Acc* __restrict__ inverse_distances) {
  const int64_t B = g.batch, i = blockIdx.x;
  for_each_column(B, [&](int64_t j) {
    const Acc d2_s = g.sqdist_student[i * B + j], d2_t = g.sqdist_teacher[i * B + j];
    inverse_distances[i * B + j] = d2_s > Acc(0) ? Acc(1) / kd_sqrt(d2_s) : Acc(0);
    inverse_distances[B * B + i * B + j] = d2_t > Acc(0) ? Acc(1) / kd_sqrt(d2_t) : Acc(0);
  });
}

template <typename Acc>
struct AngleArgs {
  GramArgs<Acc> gram;
  const Acc* inverse_distances;  // [2, B, B]
  Acc* column_sums[2];           // Q_side[b, c] = sum_a M_abc (rows written by block b), when that side is requested
  Acc* apex_sums[2];             // W_side[a, b] (column b written by block b), when that side is requested
  double* partials;              // [B]: per b sum huber
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

// One side's hi/lo Gram entry G[i, j] of the [B, 2B] layout.
template <typename Acc>
struct HiLo {
  Acc hi, lo;
};

template <typename Acc>
__device__ __forceinline__ HiLo<Acc> hilo_at(const Acc* __restrict__ gram, int64_t B, int64_t i, int64_t j) {
  return HiLo<Acc>{gram[2 * i * B + j], gram[2 * i * B + B + j]};
}

// One side's quantities of the apex a seen from the block's b: G_ba (row b), G_aa (row a), r_ab.
template <typename Acc>
struct Apex {
  HiLo<Acc> ba, aa;
  Acc r_ab;
};

template <typename Acc>
__device__ __forceinline__ Apex<Acc> load_apex(const Acc* __restrict__ gram, const Acc* __restrict__ inverse,
                                               int64_t B, int64_t a, int64_t b) {
  return Apex<Acc>{hilo_at(gram, B, b, a), hilo_at(gram, B, a, a), inverse[b * B + a]};
}

// psi_abc = N_abc r_ab r_ac, with N's two hi row differences exact.
template <typename Acc>
__device__ __forceinline__ Acc angle(const HiLo<Acc>& bc, const HiLo<Acc>& ac, Acc r_ac, const Apex<Acc>& apex) {
  const Acc high = (bc.hi - apex.ba.hi) - (ac.hi - apex.aa.hi);
  const Acc numerator = high + ((bc.lo - apex.ba.lo) - (ac.lo - apex.aa.lo));
  return numerator * apex.r_ab * r_ac;
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

// One block per middle index b; thread tid covers columns c = tile + tid + k * blockDim.x (k < 4) of each tile. The
// loss is summed in Acc over each chunk of apexes and in double across chunks.
template <typename Acc, bool kStudentGrad, bool kTeacherGrad>
__global__ void __launch_bounds__(kMaxRowThreads) rkd_angle_kernel(AngleArgs<Acc> args) {
  constexpr bool kGrad = kStudentGrad || kTeacherGrad;
  constexpr int kCols = kAngleColumnsPerThread;
  __shared__ Acc exchange[2 * (kMaxRowThreads / 32)][32];
  const GramArgs<Acc>& g = args.gram;
  const int64_t B = g.batch, b = blockIdx.x, threads = blockDim.x;
  const Acc* r_s = args.inverse_distances;
  const Acc* r_t = args.inverse_distances + B * B;
  double loss = 0.0;
  int parity = 0;
  for (int64_t tile = 0; tile < B; tile += threads * kCols) {
    HiLo<Acc> bc_s[kCols], bc_t[kCols];
    Acc q_s[kCols], q_t[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = tile + threadIdx.x + k * threads;
      bc_s[k] = c < B ? hilo_at(g.gram_student, B, b, c) : HiLo<Acc>{Acc(0), Acc(0)};
      bc_t[k] = c < B ? hilo_at(g.gram_teacher, B, b, c) : HiLo<Acc>{Acc(0), Acc(0)};
      q_s[k] = q_t[k] = Acc(0);
    }
    for (int64_t a0 = 0; a0 < B; a0 += kAngleApexChunk) {
      Acc chunk[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) chunk[i] = Acc(0);
      Acc chunk_loss = Acc(0);
#pragma unroll
      for (int i = 0; i < kAngleApexChunk; ++i) {
        const int64_t a = a0 + i;
        if (a >= B) continue;
        const Apex<Acc> as = load_apex(g.gram_student, r_s, B, a, b);
        const Apex<Acc> at = load_apex(g.gram_teacher, r_t, B, a, b);
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          const int64_t c = tile + threadIdx.x + k * threads;
          if (c >= B) continue;
          const Acc r_ac_s = r_s[a * B + c], r_ac_t = r_t[a * B + c];
          const Acc psi_s = angle(bc_s[k], hilo_at(g.gram_student, B, a, c), r_ac_s, as);
          const Acc psi_t = angle(bc_t[k], hilo_at(g.gram_teacher, B, a, c), r_ac_t, at);
          const Acc diff = psi_s - psi_t;
          chunk_loss += huber(diff);
          if constexpr (kGrad) {
            const Acc h = huber_grad(diff);
            if constexpr (kStudentGrad) {
              q_s[k] += h * as.r_ab * r_ac_s;
              chunk[i] += h * (r_ac_s - as.r_ab * psi_s);
            }
            if constexpr (kTeacherGrad) {
              q_t[k] -= h * at.r_ab * r_ac_t;
              chunk[kAngleApexChunk + i] -= h * (r_ac_t - at.r_ab * psi_t);
            }
          }
        }
      }
      loss += static_cast<double>(chunk_loss);
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
  const SumState<double, 1> sums = block_sum(SumState<double, 1>{{loss}});
  if (threadIdx.x == 0) args.partials[b] = sums.v[0];
}

// dG[a, c] += scale (Q[a, c] - 2 W[a, c]) (the diagonal too: the host ignores it). One block per row a.
template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads) rkd_angle_grad_kernel(AngleArgs<Acc> args, Acc scale) {
  const int64_t B = args.gram.batch, a = blockIdx.x;
  Acc* dgram[2] = {args.gram.dgram_student, args.gram.dgram_teacher};
  for_each_column(B, [&](int64_t c) {
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      if (dgram[side] == nullptr) continue;
      dgram[side][a * B + c] += scale * (args.column_sums[side][a * B + c] - Acc(2) * args.apex_sums[side][a * B + c]);
    }
  });
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

// One PKT entry in double: P_s, P_t, the loss term and the gradients h = dL/dP (unscaled by 1/B^2 and the weight).
struct PktEntry {
  double p_s, p_t, loss, h_s, h_t;
};

__device__ __forceinline__ PktEntry pkt_entry(double g_s, double g_t, double sum_s, double sum_t, double eps) {
  const double p_s = (g_s + 1.0) / 2.0 / sum_s, p_t = (g_t + 1.0) / 2.0 / sum_t;
  const double log_ratio = log((p_t + eps) / (p_s + eps));
  return PktEntry{p_s, p_t, p_t * log_ratio, -p_t / (p_s + eps), log_ratio + p_t / (p_t + eps)};
}

template <typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads)
    pkt_kernel(GramArgs<Acc> g, double eps, double scale, double* __restrict__ partials) {
  const int64_t B = g.batch, i = blockIdx.x;
  const auto entry_at = [&](int64_t j, const SumState<double, 2>& row) {
    return pkt_entry(static_cast<double>(gram_at(g.gram_student, B, i, j)),
                     static_cast<double>(gram_at(g.gram_teacher, B, i, j)), row.v[0], row.v[1], eps);
  };
  SumState<double, 2> row = empty_sum_state<double, 2>();
  for_each_column(B, [&](int64_t j) {
    row.v[0] += (static_cast<double>(gram_at(g.gram_student, B, i, j)) + 1.0) / 2.0;
    row.v[1] += (static_cast<double>(gram_at(g.gram_teacher, B, i, j)) + 1.0) / 2.0;
  });
  row = block_sum(row);
  // sums: loss, h_s . P_s, h_t . P_t.
  SumState<double, 3> sums = empty_sum_state<double, 3>();
  for_each_column(B, [&](int64_t j) {
    const PktEntry e = entry_at(j, row);
    sums.v[0] += e.loss;
    sums.v[1] += e.h_s * e.p_s;
    sums.v[2] += e.h_t * e.p_t;
  });
  sums = block_sum(sums);
  // dL/dS_ij = (h_j - h . P_i) / rowsum; dS/dG = 1/2.
  if (g.dgram_student != nullptr || g.dgram_teacher != nullptr) {
    for_each_column(B, [&](int64_t j) {
      const PktEntry e = entry_at(j, row);
      if (g.dgram_student != nullptr) {
        g.dgram_student[i * B + j] += static_cast<Acc>(scale * (e.h_s - sums.v[1]) / (2.0 * row.v[0]));
      }
      if (g.dgram_teacher != nullptr) {
        g.dgram_teacher[i * B + j] += static_cast<Acc>(scale * (e.h_t - sums.v[2]) / (2.0 * row.v[1]));
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
// Host-side launch helpers. Requirements (the launcher's host glue checks them): 2 <= B < 2^31, inputs as in
// GramArgs (contiguous), dgram contiguous [B, B] or nullptr, loss a single Acc; workspaces of *_workspace_elements
// Acc and *_wide_workspace_elements double. weight: the term's weight; each helper adds weight * L to *loss and
// weight * dL/dG to the dgram.

// Threads of a row block: whole warps, at most kMaxRowThreads.
inline int row_threads(int64_t B) { return static_cast<int>(clamp64((B + 31) / 32 * 32, 32, kMaxRowThreads)); }

inline unsigned row_blocks(int64_t B) { return static_cast<unsigned>(B); }

inline int64_t cc_blocks(int64_t B) {
  return clamp64((B * B + kElementwiseThreads - 1) / kElementwiseThreads, 1, kElementwiseMaxBlocks);
}

inline int64_t rkd_distance_wide_workspace_elements(int64_t B) { return 2 * B + 3 * B; }

inline int64_t rkd_angle_workspace_elements(int64_t B, bool student_grad, bool teacher_grad) {
  const int64_t sides = (student_grad ? 1 : 0) + (teacher_grad ? 1 : 0);
  return 2 * B * B + sides * 2 * B * B;
}

inline int64_t rkd_angle_wide_workspace_elements(int64_t B) { return B; }
inline int64_t sp_workspace_elements(int64_t B) { return B; }
inline int64_t pkt_wide_workspace_elements(int64_t B) { return B; }
inline int64_t cc_workspace_elements(int64_t B) { return cc_blocks(B); }

template <typename Value, typename Acc>
void launch_add_scaled_sum(const Value* values, int64_t n, double scale, Acc* loss, cudaStream_t stream) {
  add_scaled_sum_kernel<Value, Acc><<<1, kMaxRowThreads, 0, stream>>>(values, n, scale, loss);
}

template <typename Acc>
void launch_rkd_distance(const GramArgs<Acc>& g, double weight, Acc* loss, double* wide_workspace,
                         cudaStream_t stream) {
  const int64_t B = g.batch;
  double* row_sums = wide_workspace;         // [2, B]
  double* partials = wide_workspace + 2 * B;  // [3, B]
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  const int threads = row_threads(B);
  rkd_distance_sums_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, row_sums);
  rkd_distance_loss_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, row_sums, partials);
  if (g.dgram_student != nullptr || g.dgram_teacher != nullptr) {
    rkd_distance_grad_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, row_sums, partials, scale);
  }
  launch_add_scaled_sum(partials, B, scale, loss, stream);
}

template <typename Acc>
void launch_rkd_angle(const GramArgs<Acc>& g, double weight, Acc* loss, Acc* workspace, double* wide_workspace,
                      cudaStream_t stream) {
  const int64_t B = g.batch;
  const bool student_grad = g.dgram_student != nullptr, teacher_grad = g.dgram_teacher != nullptr;
  Acc* inverse_distances = workspace;  // [2, B, B]
  AngleArgs<Acc> args{g, inverse_distances, {nullptr, nullptr}, {nullptr, nullptr}, wide_workspace};
  Acc* next = workspace + 2 * B * B;
  for (int side = 0; side < 2; ++side) {
    if (!(side == 0 ? student_grad : teacher_grad)) continue;
    args.column_sums[side] = next;
    args.apex_sums[side] = next + B * B;
    next += 2 * B * B;
  }
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B) * static_cast<double>(B));
  const int threads = row_threads(B);
  rkd_angle_inverse_distances_kernel<Acc><<<row_blocks(B), threads, 0, stream>>>(g, inverse_distances);
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
void launch_pkt(const GramArgs<Acc>& g, double weight, double eps, Acc* loss, double* wide_workspace,
                cudaStream_t stream) {
  const int64_t B = g.batch;
  const double scale = weight / (static_cast<double>(B) * static_cast<double>(B));
  pkt_kernel<Acc><<<row_blocks(B), row_threads(B), 0, stream>>>(g, eps, scale, wide_workspace);
  launch_add_scaled_sum(wide_workspace, B, scale, loss, stream);
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
                                                                   double, ACC*, double*, cudaStream_t);             \
  template void kdkernels::pairwise_cuda::launch_rkd_angle<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&,      \
                                                                double, ACC*, ACC*, double*, cudaStream_t);          \
  template void kdkernels::pairwise_cuda::launch_sp<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,     \
                                                         ACC*, ACC*, cudaStream_t);                                  \
  template void kdkernels::pairwise_cuda::launch_pkt<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,    \
                                                          double, ACC*, double*, cudaStream_t);                      \
  template void kdkernels::pairwise_cuda::launch_cc<ACC>(const kdkernels::pairwise_cuda::GramArgs<ACC>&, double,     \
                                                         double, int64_t, bool, ACC*, ACC*, cudaStream_t);

KDKERNELS_PAIRWISE_INSTANTIATE(float)
KDKERNELS_PAIRWISE_INSTANTIATE(double)
#undef KDKERNELS_PAIRWISE_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE
