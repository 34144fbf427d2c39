// CUDA device code of the contrastive family: CRD's NCE loss rows, score logsumexps and embedding gradient.
//
// Spec: kdkernels/reference/contrastive.py; formula (log space) at the top of contrastive_host.h:
//   s_bk = memory[idx_bk] . embed_b / T, u = s - log Z, z_b0 = log c - u_b0, z_bk = u_bk - log c (k >= 1)
//   loss_rows[b] = sum_k softplus(z_bk) + K (log c - log noise_mass),  score_lse[b] = logsumexp_k s_bk
//   grad_embed[b] = sum_k w_bk memory[idx_bk] / T,  w_b0 = -sigmoid(z_b0), w_bk = sigmoid(z_bk)
//
// Two launches, deterministic (no atomics), nothing of size B x (K+1) x d:
//   1. chunk kernel, one block of kWarps warps per (row b, chunk of kChunkContrasts contrasts): warp w takes the
//      chunk's contrasts w, w + kWarps, ... in order; its lanes read the memory row (coalesced, each element once
//      from DRAM), form the dot product with the row's embedding (in shared memory) by a butterfly reduction (every
//      lane holds the same bits), evaluate the per-contrast terms (identical on every lane), and add w_bk / T times
//      the row (re-read from L1) to the warp's gradient row in shared memory. The warps' partials are merged in warp
//      order into the workspace: per (b, chunk) the loss, the logsumexp's (max, sum exp(s - max)) and the gradient.
//   2. reduce kernel, one block per row: the chunks' partials in chunk order -> loss_rows, score_lse, grad_embed.
// Out-of-range indices are clamped into [0, N) (no out-of-bounds read) and make their row's loss NaN.
#ifndef KDKERNELS_CONTRASTIVE_KERNELS_CUH_
#define KDKERNELS_CONTRASTIVE_KERNELS_CUH_

#include "../common/cuda_rows.cuh"

#include <cstdint>

namespace kdkernels {
namespace contrastive_cuda {

using namespace cuda_rows;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kChunkContrasts = 64;  // contrasts per block of the chunk kernel: 16 per warp
constexpr int64_t kMaxFeatures = 4096;   // shared memory: (kWarps + 1) d accumulators (160 KiB for double)

// The formula's constants, in the accumulation type.
template <typename Acc>
struct NceConstants {
  Acc inv_t, log_c, negative_shift;  // 1 / T, log(noise_mass + eps), log c - log noise_mass
};

// Running partial sums of one warp or chunk: the loss, and the scores' logsumexp as (max, sum exp(s - max)).
template <typename Acc>
struct NcePartial {
  Acc loss, max, sum;
};

template <typename Acc>
__device__ __forceinline__ NcePartial<Acc> empty_partial() {
  return NcePartial<Acc>{Acc(0), -pos_inf<Acc>(), Acc(0)};
}

// Adds (max, sum) of a logsumexp to p's; an empty (max = -inf) side adds nothing.
template <typename Acc>
__device__ __forceinline__ void merge_logsumexp(NcePartial<Acc>& p, Acc max, Acc sum) {
  if (max == -pos_inf<Acc>()) return;
  if (max > p.max) {
    p.sum = (p.max == -pos_inf<Acc>() ? Acc(0) : p.sum * kd_exp(p.max - max)) + sum;
    p.max = max;
  } else {
    p.sum += sum * kd_exp(max - p.max);
  }
}

// One contrast's loss term and gradient weight (already divided by T) from its score s.
template <typename Acc>
struct ContrastTerm {
  Acc loss, weight;
};

template <typename Acc>
__device__ __forceinline__ ContrastTerm<Acc> contrast_term(Acc s, Acc log_z, bool positive,
                                                           const NceConstants<Acc>& c) {
  const Acc u = s - log_z;
  const Acc z = positive ? c.log_c - u : u - c.log_c;
  const Acc e = kd_exp(-kd_abs(z));
  const Acc softplus = kd_max(z, Acc(0)) + kd_log1p(e);
  const Acc sigmoid = (z >= Acc(0) ? Acc(1) : e) / (Acc(1) + e);
  return ContrastTerm<Acc>{positive ? softplus : softplus + c.negative_shift,
                           (positive ? -sigmoid : sigmoid) * c.inv_t};
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename E, typename M, typename Acc>
struct ChunkArgs {
  const E* embed;
  int64_t embed_row_stride;
  const M* memory;
  int64_t memory_row_stride;
  const int64_t* indices;  // [B, K+1] contiguous
  const Acc* log_normalizer;
  int64_t batch, features, contrasts, bank, chunks;
  NceConstants<Acc> constants;
  Acc* partials;  // [B * chunks, 3] (loss, max, sum)
  Acc* grads;     // [B * chunks, d], or nullptr when no gradient is wanted
};

// Dynamic shared memory: the row's embedding [d] then kWarps gradient rows [d].
template <typename E, typename M, typename Acc>
__global__ void __launch_bounds__(kThreads) crd_nce_chunk_kernel(ChunkArgs<E, M, Acc> args) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Acc* embed_row = reinterpret_cast<Acc*>(shared_bytes);
  Acc* warp_grads = embed_row + args.features;
  __shared__ NcePartial<Acc> warp_partials[kWarps];
  __shared__ int warp_bad[kWarps];

  const int64_t task = blockIdx.x;
  const int64_t row = task / args.chunks, chunk = task % args.chunks;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t d = args.features;
  const bool want_grad = args.grads != nullptr;

  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    embed_row[j] = widen(args.embed[row * args.embed_row_stride + j]);
  }
  Acc* grad = warp_grads + warp * d;
  if (want_grad) {
    for (int64_t j = lane; j < d; j += 32) grad[j] = Acc(0);
  }
  __syncthreads();

  const Acc log_z = *args.log_normalizer;
  const int64_t* indices = args.indices + row * args.contrasts;
  const int64_t first = chunk * kChunkContrasts;
  const int64_t last = first + kChunkContrasts < args.contrasts ? first + kChunkContrasts : args.contrasts;
  NcePartial<Acc> partial = empty_partial<Acc>();
  bool bad = false;
  for (int64_t k = first + warp; k < last; k += kWarps) {
    int64_t index = indices[k];
    if (index < 0 || index >= args.bank) {
      bad = true;
      index = index < 0 ? 0 : args.bank - 1;
    }
    const M* memory_row = args.memory + index * args.memory_row_stride;
    Acc dot = Acc(0);
    for (int64_t j = lane; j < d; j += 32) dot = kd_fma(widen(memory_row[j]), embed_row[j], dot);
    const Acc s = warp_sum(dot) * args.constants.inv_t;
    const ContrastTerm<Acc> term = contrast_term(s, log_z, k == 0, args.constants);
    partial.loss += term.loss;
    merge_logsumexp(partial, s, Acc(1));
    if (want_grad) {
      for (int64_t j = lane; j < d; j += 32) grad[j] = kd_fma(term.weight, widen(memory_row[j]), grad[j]);
    }
  }
  if (lane == 0) {
    warp_partials[warp] = partial;
    warp_bad[warp] = bad ? 1 : 0;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    NcePartial<Acc> total = empty_partial<Acc>();
    bool any_bad = false;
    for (int w = 0; w < kWarps; ++w) {
      total.loss += warp_partials[w].loss;
      merge_logsumexp(total, warp_partials[w].max, warp_partials[w].sum);
      any_bad = any_bad || warp_bad[w] != 0;
    }
    Acc* out = args.partials + 3 * task;
    out[0] = any_bad ? quiet_nan<Acc>() : total.loss;
    out[1] = total.max;
    out[2] = total.sum;
  }
  if (want_grad) {
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      Acc sum = Acc(0);
      for (int w = 0; w < kWarps; ++w) sum += warp_grads[w * d + j];
      args.grads[task * d + j] = sum;
    }
  }
}

// One block per row: the chunks' partials in chunk order.
template <typename E, typename Acc>
__global__ void __launch_bounds__(kThreads)
    crd_nce_reduce_kernel(const Acc* __restrict__ partials, const Acc* __restrict__ grads, int64_t chunks,
                          int64_t features, Acc* __restrict__ loss_rows, Acc* __restrict__ score_lse,
                          E* __restrict__ grad_embed) {
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    NcePartial<Acc> total = empty_partial<Acc>();
    for (int64_t c = 0; c < chunks; ++c) {
      const Acc* p = partials + 3 * (row * chunks + c);
      total.loss += p[0];
      merge_logsumexp(total, p[1], p[2]);
    }
    loss_rows[row] = total.loss;
    score_lse[row] = total.max == -pos_inf<Acc>() ? total.max : total.max + kd_log(total.sum);
  }
  if (grad_embed == nullptr) return;
  for (int64_t j = threadIdx.x; j < features; j += kThreads) {
    Acc sum = Acc(0);
    for (int64_t c = 0; c < chunks; ++c) sum += grads[(row * chunks + c) * features + j];
    grad_embed[row * features + j] = Narrow<E>::from(sum);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Host side.

inline int64_t crd_nce_chunks(int64_t contrasts) { return (contrasts + kChunkContrasts - 1) / kChunkContrasts; }

// Accumulation-type elements of the workspace: 3 per (row, chunk), plus d per (row, chunk) with a gradient.
inline int64_t crd_nce_workspace_elements(int64_t batch, int64_t features, int64_t contrasts, bool embed_grad) {
  return batch * crd_nce_chunks(contrasts) * (3 + (embed_grad ? features : 0));
}

template <typename Acc>
inline size_t crd_nce_shared_bytes(int64_t features) {
  return static_cast<size_t>(kWarps + 1) * static_cast<size_t>(features) * sizeof(Acc);
}

// Launches both kernels on `stream`; inv_t, log_c and negative_shift as in NceConstants. grad_embed (contiguous
// [B, d]) is nullptr when no gradient is wanted. Returns the first launch error (cudaSuccess otherwise).
template <typename E, typename M, typename Acc>
cudaError_t launch_crd_nce_forward(const E* embed, int64_t embed_row_stride, const M* memory,
                                   int64_t memory_row_stride, const int64_t* indices, const Acc* log_normalizer,
                                   int64_t batch, int64_t features, int64_t contrasts, int64_t bank, Acc inv_t,
                                   Acc log_c, Acc negative_shift, Acc* loss_rows, Acc* score_lse, E* grad_embed,
                                   Acc* workspace, cudaStream_t stream) {
  const int64_t chunks = crd_nce_chunks(contrasts);
  ChunkArgs<E, M, Acc> args{embed, embed_row_stride, memory, memory_row_stride, indices, log_normalizer, batch,
                            features, contrasts, bank, chunks, NceConstants<Acc>{inv_t, log_c, negative_shift},
                            workspace, grad_embed != nullptr ? workspace + 3 * batch * chunks : nullptr};
  const size_t shared = crd_nce_shared_bytes<Acc>(features);
  constexpr size_t kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in
  cudaError_t status = cudaSuccess;
  if (shared > kDefaultSharedBytes) {
    status = cudaFuncSetAttribute(crd_nce_chunk_kernel<E, M, Acc>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(shared));
    if (status != cudaSuccess) return status;
  }
  crd_nce_chunk_kernel<E, M, Acc><<<static_cast<unsigned>(batch * chunks), kThreads, shared, stream>>>(args);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  crd_nce_reduce_kernel<E, Acc><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      workspace, args.grads, chunks, features, loss_rows, score_lse, grad_embed);
  return cudaGetLastError();
}

}  // namespace contrastive_cuda
}  // namespace kdkernels

#ifdef KDKERNELS_STANDALONE_INSTANTIATE
#define KDKERNELS_CRD_NCE_INSTANTIATE(E, M, ACC)                                                                     \
  template cudaError_t kdkernels::contrastive_cuda::launch_crd_nce_forward<E, M, ACC>(                               \
      const E*, int64_t, const M*, int64_t, const int64_t*, const ACC*, int64_t, int64_t, int64_t, int64_t, ACC, ACC, \
      ACC, ACC*, ACC*, E*, ACC*, cudaStream_t);

KDKERNELS_CRD_NCE_INSTANTIATE(float, float, float)
KDKERNELS_CRD_NCE_INSTANTIATE(float, __half, float)
KDKERNELS_CRD_NCE_INSTANTIATE(float, __nv_bfloat16, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__half, float, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__half, __half, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__half, __nv_bfloat16, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__nv_bfloat16, float, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__nv_bfloat16, __half, float)
KDKERNELS_CRD_NCE_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, float)
KDKERNELS_CRD_NCE_INSTANTIATE(double, double, double)
#undef KDKERNELS_CRD_NCE_INSTANTIATE
#endif  // KDKERNELS_STANDALONE_INSTANTIATE

#endif  // KDKERNELS_CONTRASTIVE_KERNELS_CUH_
