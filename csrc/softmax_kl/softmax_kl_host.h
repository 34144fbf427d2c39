// Host-side checks of the softmax_kl family (softmax_kl and softmax_jsd), shared by the CPU and CUDA launchers: the
// inputs of each op, on top of the common checks of csrc/common/host.h. Spec: kdkernels/reference/softmax_kl.py;
// schemas: csrc/kdkernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../common/host.h"

namespace kdkernels::softmax_kl {

// Logits [N, V] (at least one column when there is a row) and a valid temperature.
inline void check_logits_and_temperature(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                         double temperature, at::DeviceType device_type) {
  host::check_logit_pair(op, student, teacher, device_type);
  host::check_temperature(op, temperature);
  TORCH_CHECK_VALUE(student.size(0) == 0 || student.size(1) > 0, op,
                    ": logits need at least one column, got shape ", student.sizes());
}

inline void check_beta(const char* op, double beta) {
  TORCH_CHECK_VALUE(beta > 0 && beta < 1, op, ": beta must be in (0, 1), got ", beta);
}

inline void check_kl_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                             at::DeviceType device_type) {
  check_logits_and_temperature("softmax_kl_forward", student, teacher, temperature, device_type);
}

// The forward's checks, plus grad_loss and loss [N] and the statistics [N, 2] in the accumulation dtype.
inline void check_kl_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& stats_student, const at::Tensor& stats_teacher, const at::Tensor& loss,
                              double temperature, at::DeviceType device_type) {
  constexpr const char* op = "softmax_kl_backward";
  check_logits_and_temperature(op, student, teacher, temperature, device_type);
  const int64_t rows = student.size(0);
  const auto acc = host::accumulation_dtype(student);
  host::check_row_statistic(op, "grad_loss", grad_loss, rows, 1, acc, student.device());
  host::check_row_statistic(op, "loss", loss, rows, 1, acc, student.device());
  host::check_row_statistic(op, "stats_student", stats_student, rows, 2, acc, student.device());
  host::check_row_statistic(op, "stats_teacher", stats_teacher, rows, 2, acc, student.device());
}

inline void check_jsd_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature, double beta,
                              at::DeviceType device_type) {
  check_logits_and_temperature("softmax_jsd_forward", student, teacher, temperature, device_type);
  check_beta("softmax_jsd_forward", beta);
}

// The forward's checks, plus grad_loss [N] and the statistics and mixture_kl [N, 2] in the accumulation dtype.
inline void check_jsd_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& stats_student, const at::Tensor& stats_teacher,
                               const at::Tensor& mixture_kl, double temperature, double beta,
                               at::DeviceType device_type) {
  constexpr const char* op = "softmax_jsd_backward";
  check_logits_and_temperature(op, student, teacher, temperature, device_type);
  check_beta(op, beta);
  const int64_t rows = student.size(0);
  const auto acc = host::accumulation_dtype(student);
  host::check_row_statistic(op, "grad_loss", grad_loss, rows, 1, acc, student.device());
  host::check_row_statistic(op, "stats_student", stats_student, rows, 2, acc, student.device());
  host::check_row_statistic(op, "stats_teacher", stats_teacher, rows, 2, acc, student.device());
  host::check_row_statistic(op, "mixture_kl", mixture_kl, rows, 2, acc, student.device());
}

}  // namespace kdkernels::softmax_kl
