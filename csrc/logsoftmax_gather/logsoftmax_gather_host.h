// Host-side checks shared by the CPU and CUDA launchers of logsoftmax_gather (log_softmax(x / T) at int64 indices
// [N, k]): the logits and temperature as for softmax_kl, the indices, and the per-row tensors of the backward.
// Index values are not checked here (that would read device memory): the CPU kernel checks them, the GPU kernels
// must only never read or write out of bounds for a bad one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../softmax_kl/softmax_kl_host.h"

namespace kdkernels::logsoftmax_gather {

// int64 indices of shape [rows, k] on the logits' device (any strides).
inline void check_indices(const at::Tensor& indices, const at::Tensor& logits) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, "logsoftmax_gather: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == logits.size(0), "logsoftmax_gather: indices must have shape [",
              logits.size(0), ", k], got ", indices.sizes());
  TORCH_CHECK(indices.device() == logits.device(), "logsoftmax_gather: indices are on ", indices.device(),
              " but the logits are on ", logits.device());
}

inline void check_forward_inputs(const at::Tensor& logits, const at::Tensor& indices, double temperature,
                                 at::DeviceType device_type) {
  softmax_kl::check_logits(logits, logits, device_type);
  softmax_kl::check_temperature(temperature);
  check_indices(indices, logits);
}

inline void check_backward_inputs(const at::Tensor& grad_gathered, const at::Tensor& logits,
                                  const at::Tensor& indices, const at::Tensor& stats, double temperature,
                                  at::DeviceType device_type) {
  check_forward_inputs(logits, indices, temperature, device_type);
  const auto acc = softmax_kl::accumulation_dtype(logits);
  TORCH_CHECK(grad_gathered.sizes() == indices.sizes() && grad_gathered.scalar_type() == acc &&
                  grad_gathered.is_contiguous() && grad_gathered.device() == logits.device(),
              "logsoftmax_gather: grad_gathered must be a contiguous ", acc, " tensor of shape ", indices.sizes(),
              " on ", logits.device(), ", got ", grad_gathered.sizes(), " ", grad_gathered.scalar_type(), " on ",
              grad_gathered.device());
  softmax_kl::check_row_statistic(stats, "stats", logits.size(0), 2, acc, logits.device());
}

}  // namespace kdkernels::logsoftmax_gather
