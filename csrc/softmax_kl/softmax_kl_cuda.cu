// CUDA launcher of the softmax_kl family (softmax_kl and softmax_jsd): checks the tensors, allocates the outputs, dispatches on the
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

#include "softmax_kl_host.h"
#include "softmax_kl_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using softmax_kl::acc_type_t;

void check_rows_fit_the_grid(const at::Tensor& student) {
  TORCH_CHECK(student.size(0) <= std::numeric_limits<int32_t>::max(), "softmax_kl (cuda): at most 2^31 - 1 rows, got ",
              student.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cuda(const at::Tensor& student,
                                                                       const at::Tensor& teacher,
                                                                       double temperature) {
  softmax_kl::check_logits(student, teacher, at::kCUDA);
  softmax_kl::check_temperature(temperature);
  check_rows_fit_the_grid(student);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(softmax_kl::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher};
  TORCH_CHECK(cols > 0, "softmax_kl (cuda): logits need at least one column");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
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
  softmax_kl::check_backward_inputs(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature,
                                    at::kCUDA);
  check_rows_fit_the_grid(student);
  const int64_t rows = student.size(0), cols = student.size(1);
  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
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

void check_jsd_beta(double beta) {
  TORCH_CHECK(beta > 0 && beta < 1, "softmax_jsd: beta must be in (0, 1), got ", beta);
}

// The checks of the JSD backward, before anything is allocated.
void check_jsd_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& stats_student, const at::Tensor& stats_teacher,
                               const at::Tensor& mixture_kl, double temperature, double beta) {
  softmax_kl::check_logits(student, teacher, at::kCUDA);
  softmax_kl::check_temperature(temperature);
  check_jsd_beta(beta);
  const int64_t rows = student.size(0);
  const auto acc = softmax_kl::accumulation_dtype(student);
  softmax_kl::check_row_statistic(grad_loss, "grad_loss", rows, 1, acc, student.device());
  softmax_kl::check_row_statistic(stats_student, "stats_student", rows, 2, acc, student.device());
  softmax_kl::check_row_statistic(stats_teacher, "stats_teacher", rows, 2, acc, student.device());
  softmax_kl::check_row_statistic(mixture_kl, "mixture_kl", rows, 2, acc, student.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_jsd_forward_cuda(const at::Tensor& student,
                                                                                    const at::Tensor& teacher,
                                                                                    double temperature, double beta) {
  softmax_kl::check_logits(student, teacher, at::kCUDA);
  softmax_kl::check_temperature(temperature);
  check_jsd_beta(beta);
  check_rows_fit_the_grid(student);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(softmax_kl::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  at::Tensor mixture_kl = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher, mixture_kl};
  TORCH_CHECK(cols > 0, "softmax_jsd (cuda): logits need at least one column");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Acc = acc_type_t<S>;
    softmax_kl_cuda::launch_softmax_jsd_forward<S, T, Acc>(
        static_cast<const S*>(student.const_data_ptr()), student.stride(0),
        static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), rows, cols,
        static_cast<Acc>(1.0 / temperature), beta, static_cast<Acc*>(loss.mutable_data_ptr()),
        static_cast<Acc*>(stats_student.mutable_data_ptr()), static_cast<Acc*>(stats_teacher.mutable_data_ptr()),
        static_cast<Acc*>(mixture_kl.mutable_data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats_student, stats_teacher, mixture_kl};
}

std::tuple<at::Tensor, at::Tensor> softmax_jsd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                             const at::Tensor& teacher, const at::Tensor& stats_student,
                                                             const at::Tensor& stats_teacher,
                                                             const at::Tensor& mixture_kl, double temperature,
                                                             double beta, bool student_grad, bool teacher_grad) {
  check_jsd_backward_inputs(grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature, beta);
  check_rows_fit_the_grid(student);
  const int64_t rows = student.size(0), cols = student.size(1);
  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Acc = acc_type_t<S>;
    softmax_kl_cuda::launch_softmax_jsd_backward<S, T, Acc>(
        static_cast<const Acc*>(grad_loss.const_data_ptr()), static_cast<const S*>(student.const_data_ptr()),
        student.stride(0), static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0),
        static_cast<const Acc*>(stats_student.const_data_ptr()), static_cast<const Acc*>(stats_teacher.const_data_ptr()),
        static_cast<const Acc*>(mixture_kl.const_data_ptr()), rows, cols, static_cast<Acc>(1.0 / temperature), beta,
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
  m.impl("softmax_jsd_forward", &softmax_jsd_forward_cuda);
  m.impl("softmax_jsd_backward", &softmax_jsd_backward_cuda);
}

}  // namespace kdkernels
