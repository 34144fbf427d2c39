// Host-side checks of the dist family (DIST's row and column Pearson correlations of softmax(x / T)), shared by the
// CPU and CUDA launchers. Spec: kdkernels/reference/dist.py; schemas: csrc/kdkernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../common/host.h"

namespace kdkernels::dist {

// Logits [N, V] (csrc/common/host.h), at least one column when there is a row, and a valid temperature.
inline void check_logits_and_temperature(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                         double temperature, at::DeviceType device_type) {
  host::check_logit_pair(op, student, teacher, device_type);
  host::check_temperature(op, temperature);
  TORCH_CHECK_VALUE(student.size(0) == 0 || student.size(1) > 0, op, ": logits need at least one column, got shape ",
                    student.sizes());
}

inline void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                 at::DeviceType device_type) {
  check_logits_and_temperature("dist_forward", student, teacher, temperature, device_type);
}

// The forward's checks, plus grad_row [N] and grad_col [V] (accumulation dtype), row_moments [N, 3], col_moments
// [V, 5] and stats_student / stats_teacher [N, 2] (float64): contiguous, on the logits' device.
inline void check_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& student,
                                  const at::Tensor& teacher, const at::Tensor& row_moments,
                                  const at::Tensor& col_moments, const at::Tensor& stats_student,
                                  const at::Tensor& stats_teacher, double temperature, at::DeviceType device_type) {
  constexpr const char* op = "dist_backward";
  check_logits_and_temperature(op, student, teacher, temperature, device_type);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto acc = host::accumulation_dtype(student);
  const auto& device = student.device();
  host::check_row_statistic(op, "grad_row", grad_row, rows, 1, acc, device);
  host::check_row_statistic(op, "grad_col", grad_col, cols, 1, acc, device);
  host::check_row_statistic(op, "row_moments", row_moments, rows, 3, at::kDouble, device);
  host::check_row_statistic(op, "col_moments", col_moments, cols, 5, at::kDouble, device);
  host::check_row_statistic(op, "stats_student", stats_student, rows, 2, at::kDouble, device);
  host::check_row_statistic(op, "stats_teacher", stats_teacher, rows, 2, at::kDouble, device);
}

}  // namespace kdkernels::dist
