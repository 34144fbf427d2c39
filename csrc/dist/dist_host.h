// Host-side checks of the dist family (DIST's row and column Pearson correlations of softmax(x / T)), shared by the
// CPU and CUDA launchers. Spec: kdkernels/reference/dist.py; schemas: csrc/kdkernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../softmax_kl/softmax_kl_host.h"

namespace kdkernels::dist {

// Logits [N, V] as for softmax_kl, at least one column when there is a row, and a valid temperature.
inline void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                 at::DeviceType device_type) {
  softmax_kl::check_logits(student, teacher, device_type);
  softmax_kl::check_temperature(temperature);
  TORCH_CHECK(student.size(0) == 0 || student.size(1) > 0, "dist: logits need at least one column, got ",
              student.sizes());
}

// The forward's checks, plus grad_row [N] and grad_col [V] (accumulation dtype), row_moments [N, 3], col_moments
// [V, 5] and stats_student / stats_teacher [N, 2] (float64): contiguous, on the logits' device.
inline void check_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& student,
                                  const at::Tensor& teacher, const at::Tensor& row_moments,
                                  const at::Tensor& col_moments, const at::Tensor& stats_student,
                                  const at::Tensor& stats_teacher, double temperature, at::DeviceType device_type) {
  check_forward_inputs(student, teacher, temperature, device_type);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto acc = softmax_kl::accumulation_dtype(student);
  const auto& device = student.device();
  softmax_kl::check_row_statistic(grad_row, "dist: grad_row", rows, 1, acc, device);
  softmax_kl::check_row_statistic(grad_col, "dist: grad_col", cols, 1, acc, device);
  softmax_kl::check_row_statistic(row_moments, "dist: row_moments", rows, 3, at::kDouble, device);
  softmax_kl::check_row_statistic(col_moments, "dist: col_moments", cols, 5, at::kDouble, device);
  softmax_kl::check_row_statistic(stats_student, "dist: stats_student", rows, 2, at::kDouble, device);
  softmax_kl::check_row_statistic(stats_teacher, "dist: stats_teacher", rows, 2, at::kDouble, device);
}

}  // namespace kdkernels::dist
