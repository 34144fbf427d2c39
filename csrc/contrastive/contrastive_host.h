// Host side of the contrastive family (CRD's NCE over a memory bank), shared by the CPU and CUDA launchers: the
// argument checks, the constants of the formula and the output allocation. Spec: kdkernels/reference/contrastive.py;
// schema: csrc/kdkernels.cpp.
//
//   s_bk = memory[idx_bk] . embed_b / T,  u = s - log Z,  log c = log(noise_mass + eps)
//   loss_rows[b] = softplus(log c - u_b0) + sum_{k>=1} (softplus(u_bk - log c) + log c - log noise_mass)
//   score_lse[b] = logsumexp_k s_bk
//   grad_embed[b] = sum_k w_bk memory[idx_bk] / T,  w_b0 = -sigmoid(log c - u_b0),  w_bk = sigmoid(u_bk - log c)
//
// Out-of-range contrast indices: the CPU kernel raises; the CUDA kernel clamps them into [0, N) (no out-of-bounds
// read) and writes NaN to loss_rows of their row (a check that needs no host synchronisation).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common/host.h"

namespace kdkernels::contrastive {

constexpr const char* kOp = "crd_nce_forward";

// Embeddings and memory in {float32, float16, bfloat16} accumulate in float32 (they may differ: a bf16 autocast
// embedding against an fp32 bank); float64 only with float64, accumulating in float64.
inline at::ScalarType accumulation_dtype(const at::Tensor& embed) { return host::accumulation_dtype(embed); }

inline void check_tensors(const at::Tensor& embed, const at::Tensor& memory, const at::Tensor& contrast_indices,
                          const at::Tensor& log_normalizer, at::DeviceType device_type) {
  TORCH_CHECK_VALUE(embed.dim() == 2, kOp, ": embed must be 2-D [B, d], got shape ", embed.sizes());
  TORCH_CHECK_VALUE(memory.dim() == 2, kOp, ": memory must be 2-D [N, d], got shape ", memory.sizes());
  TORCH_CHECK_VALUE(contrast_indices.dim() == 2, kOp, ": contrast_indices must be 2-D [B, K+1], got shape ",
                    contrast_indices.sizes());
  TORCH_CHECK_VALUE(embed.size(0) >= 1, kOp, ": embed needs at least one row, got shape ", embed.sizes());
  TORCH_CHECK_VALUE(embed.size(1) >= 1, kOp, ": embed needs at least one column, got shape ", embed.sizes());
  TORCH_CHECK_VALUE(memory.size(0) >= 1, kOp, ": memory needs at least one row, got shape ", memory.sizes());
  TORCH_CHECK_VALUE(memory.size(1) == embed.size(1), kOp, ": memory rows have ", memory.size(1),
                    " features but embed rows have ", embed.size(1));
  TORCH_CHECK_VALUE(contrast_indices.size(0) == embed.size(0), kOp, ": contrast_indices has ",
                    contrast_indices.size(0), " rows but embed has ", embed.size(0));
  TORCH_CHECK_VALUE(contrast_indices.size(1) >= 2, kOp,
                    ": contrast_indices needs K+1 >= 2 columns (a positive and a negative), got ",
                    contrast_indices.size(1));
  TORCH_CHECK_TYPE(contrast_indices.scalar_type() == at::kLong, kOp, ": contrast_indices must be int64, got ",
                   contrast_indices.scalar_type());
  host::check_float_pair(kOp, "embed", embed, "memory", memory);
  const auto acc = accumulation_dtype(embed);
  TORCH_CHECK_TYPE(log_normalizer.scalar_type() == acc, kOp, ": log_normalizer must be ", acc, ", got ",
                   log_normalizer.scalar_type());
  TORCH_CHECK_VALUE(log_normalizer.dim() == 0, kOp, ": log_normalizer must be 0-dim, got shape ",
                    log_normalizer.sizes());
  host::check_device_type(kOp, "embed", embed, device_type);
  host::check_same_device(kOp, "memory", memory, "embed", embed);
  host::check_same_device(kOp, "contrast_indices", contrast_indices, "embed", embed);
  host::check_same_device(kOp, "log_normalizer", log_normalizer, "embed", embed);
}

// The scalar constants of the formula, in double.
struct Constants {
  double inv_t;           // 1 / T
  double log_c;           // log(noise_mass + eps)
  double negative_shift;  // log c - log noise_mass, added by every negative
};

inline Constants check_constants(double temperature, double noise_mass, double eps) {
  host::check_temperature(kOp, temperature);
  TORCH_CHECK_VALUE(noise_mass > 0 && std::isfinite(noise_mass), kOp,
                    ": noise_mass (K / N) must be positive and finite, got ", noise_mass);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), kOp, ": eps must be >= 0 and finite, got ", eps);
  const double log_c = std::log(noise_mass + eps);
  return Constants{1.0 / temperature, log_c, log_c - std::log(noise_mass)};
}

// Sizes of a checked problem.
struct Shape {
  int64_t batch, features, contrasts, bank;  // B, d, K+1, N
};

inline Shape shape_of(const at::Tensor& embed, const at::Tensor& memory, const at::Tensor& contrast_indices) {
  return Shape{embed.size(0), embed.size(1), contrast_indices.size(1), memory.size(0)};
}

// A row-major view with unit-stride rows: the tensor itself when it has one, else a contiguous copy.
inline at::Tensor unit_stride_rows(const at::Tensor& x) {
  return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
}

// (loss_rows [B], score_lse [B]) in the accumulation dtype, and grad_embed [B, d] in embed's dtype or empty [0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& embed, bool embed_grad) {
  const auto acc_options = embed.options().dtype(accumulation_dtype(embed));
  at::Tensor grad = embed_grad ? at::empty({embed.size(0), embed.size(1)}, embed.options())
                               : at::empty({0}, embed.options());
  return {at::empty({embed.size(0)}, acc_options), at::empty({embed.size(0)}, acc_options), grad};
}

}  // namespace kdkernels::contrastive
