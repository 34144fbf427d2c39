// Host-side pieces every family's CPU and CUDA launchers share: the supported floating dtypes and their
// accumulation type, the dispatch from a dtype to the backend's element type, and the checks of logits,
// temperature and per-row statistics.
//
// Every check takes the calling op's name (e.g. "dist_forward"), which starts each message it raises. A wrong dtype
// raises TypeError (TORCH_CHECK_TYPE), a wrong shape, device or value ValueError (TORCH_CHECK_VALUE); messages name
// the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace kdkernels::host {

template <typename X>
struct TypeTag {
  using type = X;
};

// Inputs in {float, half, bfloat16} accumulate in float; double inputs (paired only with double) in double.
template <typename X>
using acc_type_t = std::conditional_t<std::is_same_v<X, double>, double, float>;

inline at::ScalarType accumulation_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

// `name` has a supported floating dtype.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
}

// Two inputs that accumulate together: each has a supported dtype, and float64 comes only with float64.
inline void check_float_pair(const char* op, const char* first_name, const at::Tensor& first,
                             const char* second_name, const at::Tensor& second) {
  check_float_dtype(op, first_name, first);
  check_float_dtype(op, second_name, second);
  TORCH_CHECK_TYPE((first.scalar_type() == at::kDouble) == (second.scalar_type() == at::kDouble), op,
                   ": float64 ", first_name, " and ", second_name, " go together, got ", first_name, " ",
                   first.scalar_type(), " and ", second_name, " ", second.scalar_type());
}

// Calls fn(TypeTag<X>{}) with X the backend's element type for a dtype that the checks above accepted. Elements
// names the backend's C++ types `half` and `bfloat16` (at::Half / at::BFloat16 on CPU, __half / __nv_bfloat16 on
// CUDA).
template <typename Elements, typename Fn>
void dispatch_logits_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kHalf: return fn(TypeTag<typename Elements::half>{});
    case at::kBFloat16: return fn(TypeTag<typename Elements::bfloat16>{});
    case at::kDouble: return fn(TypeTag<double>{});
    default: TORCH_CHECK(false, "dispatch_logits_type: unchecked dtype ", dtype);
  }
}

// Calls fn(TypeTag<A>{}, TypeTag<B>{}) for a pair that check_float_pair accepted.
template <typename Elements, typename Fn>
void dispatch_logits_pair(const at::Tensor& first, const at::Tensor& second, Fn&& fn) {
  dispatch_logits_type<Elements>(first.scalar_type(), [&](auto a_tag) {
    dispatch_logits_type<Elements>(second.scalar_type(), [&](auto b_tag) {
      using A = typename decltype(a_tag)::type;
      using B = typename decltype(b_tag)::type;
      if constexpr (std::is_same_v<A, double> != std::is_same_v<B, double>) {
        TORCH_CHECK(false, "dispatch_logits_pair: unchecked pair ", first.scalar_type(), " and ",
                    second.scalar_type());
      } else {
        fn(a_tag, b_tag);
      }
    });
  });
}

// `x` is on a device of the kernel's type.
inline void check_device_type(const char* op, const char* name, const at::Tensor& x, at::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.device().type() == device_type, op, ": this kernel runs ", device_type, " tensors, got ", name,
                    " on ", x.device());
}

// `x` is on the same device as `reference`.
inline void check_same_device(const char* op, const char* name, const at::Tensor& x, const char* reference_name,
                              const at::Tensor& reference) {
  TORCH_CHECK_VALUE(x.device() == reference.device(), op, ": ", name, " is on ", x.device(), " but ",
                    reference_name, " is on ", reference.device());
}

// 2-D [N, V] logits of a supported dtype on a device of the kernel's type, last dim unit-stride.
inline void check_logits(const char* op, const char* name, const at::Tensor& logits, at::DeviceType device_type) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": ", name, " must be 2-D [N, V], got shape ", logits.sizes());
  check_float_dtype(op, name, logits);
  check_device_type(op, name, logits, device_type);
  TORCH_CHECK_VALUE(logits.size(1) <= 1 || logits.stride(1) == 1, op, ": the last dim of ", name,
                    " must have unit stride, got strides ", logits.strides());
}

// Student and teacher logits: each as check_logits, equal shapes, one device, float64 only with float64.
inline void check_logit_pair(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                             at::DeviceType device_type) {
  check_logits(op, "student", student, device_type);
  check_logits(op, "teacher", teacher, device_type);
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": student and teacher must have the same shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  check_same_device(op, "teacher", teacher, "student", student);
  check_float_pair(op, "student", student, "teacher", teacher);
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be positive and finite, got ", temperature);
}

// A tensor the op reads in the accumulation dtype: dtype `acc`, exactly `shape`, contiguous, on `device`.
inline void check_acc_tensor(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape,
                             at::ScalarType acc, const at::Device& device) {
  TORCH_CHECK_TYPE(x.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.sizes() == shape && x.is_contiguous() && x.device() == device, op, ": ", name,
                    " must be a contiguous tensor of shape ", shape, " on ", device, ", got shape ", x.sizes(),
                    x.is_contiguous() ? "" : " (not contiguous)", " on ", x.device());
}

// A per-row tensor: [rows] (width 1) or [rows, width], as check_acc_tensor.
inline void check_row_statistic(const char* op, const char* name, const at::Tensor& stat, int64_t rows,
                                int64_t width, at::ScalarType acc, const at::Device& device) {
  if (width == 1) {
    check_acc_tensor(op, name, stat, {rows}, acc, device);
  } else {
    check_acc_tensor(op, name, stat, {rows, width}, acc, device);
  }
}

}  // namespace kdkernels::host
