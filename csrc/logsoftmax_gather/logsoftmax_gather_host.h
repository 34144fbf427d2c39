// Host-side checks shared by the CPU and CUDA launchers of logsoftmax_gather (log_softmax(x / T) at int64 indices
// [N, k]): the logits and temperature (csrc/common/host.h), the indices, and the per-row tensors of the backward.
// Index values are not checked here (that would read device memory): the CPU kernel checks them, the GPU kernels
// must only never read or write out of bounds for a bad one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../common/host.h"

namespace kdkernels::logsoftmax_gather {

// Logits [N, V] (at least one column when there is a row), a valid temperature, int64 indices of shape [N, k] on
// the logits' device (any strides).
inline void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& indices, double temperature,
                         at::DeviceType device_type) {
  host::check_logits(op, "logits", logits, device_type);
  host::check_temperature(op, temperature);
  TORCH_CHECK_VALUE(logits.size(0) == 0 || logits.size(1) > 0, op, ": logits need at least one column, got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == logits.size(0), op, ": indices must have shape [",
                    logits.size(0), ", k], got ", indices.sizes());
  host::check_same_device(op, "indices", indices, "logits", logits);
}

inline void check_forward_inputs(const at::Tensor& logits, const at::Tensor& indices, double temperature,
                                 at::DeviceType device_type) {
  check_inputs("logsoftmax_gather_forward", logits, indices, temperature, device_type);
}

// The forward's checks, plus grad_gathered [N, k] and stats [N, 2] in the accumulation dtype.
inline void check_backward_inputs(const at::Tensor& grad_gathered, const at::Tensor& logits,
                                  const at::Tensor& indices, const at::Tensor& stats, double temperature,
                                  at::DeviceType device_type) {
  constexpr const char* op = "logsoftmax_gather_backward";
  check_inputs(op, logits, indices, temperature, device_type);
  const auto acc = host::accumulation_dtype(logits);
  host::check_acc_tensor(op, "grad_gathered", grad_gathered, indices.sizes(), acc, logits.device());
  host::check_row_statistic(op, "stats", stats, logits.size(0), 2, acc, logits.device());
}

}  // namespace kdkernels::logsoftmax_gather
