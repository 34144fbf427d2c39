// CUDA launcher of the softmax_kl family: checks the tensors, allocates the outputs, dispatches on the
// (student, teacher) dtype pair and launches the kernels of softmax_kl_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/softmax_kl.py; the kernels' design and launch heuristics are described at the
// top of softmax_kl_kernels.cuh. Logits in {float32, float16, bfloat16} (student and teacher may differ) accumulate
// in float32; float64 logits (both) accumulate in float64. Per-row outputs are in the accumulation dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "softmax_kl_kernels.cuh"

namespace kdkernels {
namespace {

template <typename X>
struct TypeTag {
  using type = X;
};

// Calls fn(TypeTag<X>{}) with X the device element type of a logits dtype.
template <typename Fn>
void dispatch_logits_type(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(TypeTag<float>{});
    case at::kHalf:
      return fn(TypeTag<__half>{});
    case at::kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    case at::kDouble:
      return fn(TypeTag<double>{});
    default:
      TORCH_CHECK(false, "softmax_kl (cuda): ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  }
}

// Calls fn(TypeTag<S>{}, TypeTag<T>{}) for a supported (student, teacher) pair: float64 only with float64.
template <typename Fn>
void dispatch_logits_pair(const at::Tensor& student, const at::Tensor& teacher, Fn&& fn) {
  dispatch_logits_type(student.scalar_type(), "student", [&](auto s_tag) {
    dispatch_logits_type(teacher.scalar_type(), "teacher", [&](auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      if constexpr (std::is_same_v<S, double> != std::is_same_v<T, double>) {
        TORCH_CHECK(false, "softmax_kl (cuda): float64 logits must be paired with float64, got student ",
                    student.scalar_type(), " and teacher ", teacher.scalar_type());
      } else {
        fn(s_tag, t_tag);
      }
    });
  });
}

template <typename S>
using acc_type_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

at::ScalarType accumulation_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "softmax_kl (cuda): expected 2-D logits, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "softmax_kl (cuda): student shape ", student.sizes(),
              " != teacher shape ", teacher.sizes());
  TORCH_CHECK(student.is_cuda(), "softmax_kl (cuda): student must be a CUDA tensor, got ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "softmax_kl (cuda): teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(student.size(1) <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
              "softmax_kl (cuda): the last dim of the logits must have unit stride, got strides ", student.strides(),
              " and ", teacher.strides());
  TORCH_CHECK(student.size(0) <= std::numeric_limits<int32_t>::max(), "softmax_kl (cuda): at most 2^31 - 1 rows, got ",
              student.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cuda(const at::Tensor& student,
                                                                       const at::Tensor& teacher,
                                                                       double temperature) {
  check_logits(student, teacher);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "softmax_kl (cuda): temperature must be positive and finite, got ", temperature);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher};
  TORCH_CHECK(cols > 0, "softmax_kl (cuda): logits need at least one column");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_logits_pair(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Acc = acc_type_t<S>;
    softmax_kl_cuda::launch_softmax_kl_forward<S, T, Acc>(
        static_cast<const S*>(student.const_data_ptr()), student.stride(0),
        static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), rows, cols,
        static_cast<Acc>(1.0 / temperature), static_cast<Acc*>(loss.mutable_data_ptr()),
        static_cast<Acc*>(stats_student.mutable_data_ptr()), static_cast<Acc*>(stats_teacher.mutable_data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& stats_student,
                                                            const at::Tensor& stats_teacher, const at::Tensor& loss,
                                                            double temperature, bool student_grad, bool teacher_grad) {
  check_logits(student, teacher);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "softmax_kl_backward (cuda): temperature must be positive and finite, got ", temperature);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto acc = accumulation_dtype(student);
  struct RowStatistic {
    const at::Tensor* tensor;
    const char* name;
    int64_t width;  // 1: shape [N]; 2: shape [N, 2]
  };
  const RowStatistic statistics[] = {
      {&grad_loss, "grad_loss", 1}, {&loss, "loss", 1}, {&stats_student, "stats_student", 2},
      {&stats_teacher, "stats_teacher", 2}};
  for (const auto& [stat, name, width] : statistics) {
    const bool shape_ok = width == 1 ? (stat->dim() == 1 && stat->size(0) == rows)
                                     : (stat->dim() == 2 && stat->size(0) == rows && stat->size(1) == width);
    TORCH_CHECK(shape_ok && stat->scalar_type() == acc && stat->is_contiguous() && stat->device() == student.device(),
                "softmax_kl_backward (cuda): ", name, " must be a contiguous ", acc, " tensor of shape [", rows,
                width == 1 ? "]" : ", 2]", " on ", student.device(), ", got ", stat->sizes(), " ",
                stat->scalar_type(), " on ", stat->device());
  }
  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_logits_pair(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Acc = acc_type_t<S>;
    softmax_kl_cuda::launch_softmax_kl_backward<S, T, Acc>(
        static_cast<const Acc*>(grad_loss.const_data_ptr()), static_cast<const S*>(student.const_data_ptr()),
        student.stride(0), static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0),
        static_cast<const Acc*>(stats_student.const_data_ptr()), static_cast<const Acc*>(stats_teacher.const_data_ptr()),
        static_cast<const Acc*>(loss.const_data_ptr()), rows, cols, static_cast<Acc>(1.0 / temperature),
        student_grad ? static_cast<S*>(grad_student.mutable_data_ptr()) : nullptr,
        teacher_grad ? static_cast<T*>(grad_teacher.mutable_data_ptr()) : nullptr, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("softmax_kl_forward", &softmax_kl_forward_cuda);
  m.impl("softmax_kl_backward", &softmax_kl_backward_cuda);
}

}  // namespace kdkernels
