// Host-side checks shared by the CPU and CUDA launchers of target_split (DKD's and NKD's per-row terms): the
// logits and temperature (csrc/common/host.h), the labels and the per-row tensors of the backward.
// Label values are not checked here (that would read device memory): the CPU kernel checks them, the GPU kernels
// must only never read out of bounds for a bad one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../common/host.h"

namespace kdkernels::target_split {

constexpr int64_t kTerms = 6;  // (log p_s[y], log(1 - p_s[y]), log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t))

// Logits [N, V] (at least one column when there is a row), a valid temperature, int64 labels of shape [N] on the
// logits' device (any stride).
inline void check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& labels, double temperature, at::DeviceType device_type) {
  host::check_logit_pair(op, student, teacher, device_type);
  host::check_temperature(op, temperature);
  TORCH_CHECK_VALUE(student.size(0) == 0 || student.size(1) > 0, op,
                    ": logits need at least one column, got shape ", student.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == student.size(0), op, ": labels must have shape [",
                    student.size(0), "], got ", labels.sizes());
  host::check_same_device(op, "labels", labels, "student", student);
}

inline void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                 double temperature, at::DeviceType device_type) {
  check_inputs("target_split_forward", student, teacher, labels, temperature, device_type);
}

// The forward's checks, plus grad_terms and terms [N, 6] and the statistics [N, 2] in the accumulation dtype.
inline void check_backward_inputs(const at::Tensor& grad_terms, const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& labels, const at::Tensor& stats_student,
                                  const at::Tensor& stats_teacher, const at::Tensor& terms, double temperature,
                                  at::DeviceType device_type) {
  constexpr const char* op = "target_split_backward";
  check_inputs(op, student, teacher, labels, temperature, device_type);
  const int64_t rows = student.size(0);
  const auto acc = host::accumulation_dtype(student);
  host::check_row_statistic(op, "grad_terms", grad_terms, rows, kTerms, acc, student.device());
  host::check_row_statistic(op, "terms", terms, rows, kTerms, acc, student.device());
  host::check_row_statistic(op, "stats_student", stats_student, rows, 2, acc, student.device());
  host::check_row_statistic(op, "stats_teacher", stats_teacher, rows, 2, acc, student.device());
}

}  // namespace kdkernels::target_split
