// Host-side pieces shared by the CPU and CUDA launchers of the softmax_kl family: which (student, teacher) dtype
// pairs are supported, their accumulation dtype, and the checks on logits and per-row statistics.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <type_traits>

namespace kdkernels::softmax_kl {

template <typename X>
struct TypeTag {
  using type = X;
};

// Logits in {float, half, bfloat16} accumulate in float; double logits (only paired with double) in double.
template <typename S>
using acc_type_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

inline at::ScalarType accumulation_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls fn(TypeTag<X>{}) with X the backend's element type for a logits dtype. Elements names the backend's C++
// types: `half` and `bfloat16` (at::Half / at::BFloat16 on CPU, __half / __nv_bfloat16 on CUDA).
template <typename Elements, typename Fn>
void dispatch_logits_type(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kHalf: return fn(TypeTag<typename Elements::half>{});
    case at::kBFloat16: return fn(TypeTag<typename Elements::bfloat16>{});
    case at::kDouble: return fn(TypeTag<double>{});
    default: TORCH_CHECK(false, "softmax_kl: ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  }
}

// Calls fn(TypeTag<S>{}, TypeTag<T>{}) for a supported (student, teacher) pair: float64 only with float64.
template <typename Elements, typename Fn>
void dispatch_logits_pair(const at::Tensor& student, const at::Tensor& teacher, Fn&& fn) {
  dispatch_logits_type<Elements>(student.scalar_type(), "student", [&](auto s_tag) {
    dispatch_logits_type<Elements>(teacher.scalar_type(), "teacher", [&](auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      if constexpr (std::is_same_v<S, double> != std::is_same_v<T, double>) {
        TORCH_CHECK(false, "softmax_kl: float64 logits must be paired with float64, got student ",
                    student.scalar_type(), " and teacher ", teacher.scalar_type());
      } else {
        fn(s_tag, t_tag);
      }
    });
  });
}

// 2-D logits of equal shape on one device of the backend's type, last dim unit-stride.
inline void check_logits(const at::Tensor& student, const at::Tensor& teacher, at::DeviceType device_type) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "softmax_kl: expected 2-D logits, got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "softmax_kl: student shape ", student.sizes(),
              " != teacher shape ", teacher.sizes());
  TORCH_CHECK(student.device().type() == device_type, "softmax_kl: this kernel runs ", device_type,
              " tensors, got ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "softmax_kl: teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(student.size(1) <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
              "softmax_kl: the last dim of the logits must have unit stride, got strides ", student.strides(), " and ",
              teacher.strides());
}

inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "softmax_kl: temperature must be positive and finite, got ",
              temperature);
}

// A per-row tensor of the backward: [rows] (width 1) or [rows, width], contiguous, acc dtype, on `device`.
inline void check_row_statistic(const at::Tensor& stat, const char* name, int64_t rows, int64_t width,
                                at::ScalarType acc, const at::Device& device) {
  const bool shape_ok = width == 1 ? (stat.dim() == 1 && stat.size(0) == rows)
                                   : (stat.dim() == 2 && stat.size(0) == rows && stat.size(1) == width);
  TORCH_CHECK(shape_ok && stat.scalar_type() == acc && stat.is_contiguous() && stat.device() == device,
              name, " must be a contiguous ", acc, " tensor of shape [", rows,
              width == 1 ? "" : ", " + std::to_string(width), "] on ", device, ", got ", stat.sizes(), " ",
              stat.scalar_type(), " on ", stat.device());
}

// The checks every backward launcher runs before allocating anything.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& stats_student, const at::Tensor& stats_teacher,
                                  const at::Tensor& loss, double temperature, at::DeviceType device_type) {
  check_logits(student, teacher, device_type);
  check_temperature(temperature);
  const int64_t rows = student.size(0);
  const auto acc = accumulation_dtype(student);
  check_row_statistic(grad_loss, "grad_loss", rows, 1, acc, student.device());
  check_row_statistic(loss, "loss", rows, 1, acc, student.device());
  check_row_statistic(stats_student, "stats_student", rows, 2, acc, student.device());
  check_row_statistic(stats_teacher, "stats_teacher", rows, 2, acc, student.device());
}

}  // namespace kdkernels::softmax_kl
