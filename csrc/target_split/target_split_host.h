// Host-side checks shared by the CPU and CUDA launchers of target_split (DKD's and NKD's per-row terms): the
// logits and temperature as for softmax_kl, plus the labels and the per-row tensors of the backward.
// Label values are not checked here (that would read device memory): the CPU kernel checks them, the GPU kernels
// must only never read out of bounds for a bad one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../softmax_kl/softmax_kl_host.h"

namespace kdkernels::target_split {

constexpr int64_t kTerms = 6;  // (log p_s[y], log(1 - p_s[y]), log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t))

// int64 labels of shape [rows] on the logits' device (any stride).
inline void check_labels(const at::Tensor& labels, const at::Tensor& student) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "target_split: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == student.size(0), "target_split: labels must have shape [",
              student.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.device() == student.device(), "target_split: labels are on ", labels.device(),
              " but the logits are on ", student.device());
}

inline void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                 double temperature, at::DeviceType device_type) {
  softmax_kl::check_logits(student, teacher, device_type);
  softmax_kl::check_temperature(temperature);
  check_labels(labels, student);
}

inline void check_backward_inputs(const at::Tensor& grad_terms, const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& labels, const at::Tensor& stats_student,
                                  const at::Tensor& stats_teacher, const at::Tensor& terms, double temperature,
                                  at::DeviceType device_type) {
  check_forward_inputs(student, teacher, labels, temperature, device_type);
  const int64_t rows = student.size(0);
  const auto acc = softmax_kl::accumulation_dtype(student);
  softmax_kl::check_row_statistic(grad_terms, "grad_terms", rows, kTerms, acc, student.device());
  softmax_kl::check_row_statistic(terms, "terms", rows, kTerms, acc, student.device());
  softmax_kl::check_row_statistic(stats_student, "stats_student", rows, 2, acc, student.device());
  softmax_kl::check_row_statistic(stats_teacher, "stats_teacher", rows, 2, acc, student.device());
}

}  // namespace kdkernels::target_split
