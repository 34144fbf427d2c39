// CUDA launcher of the softmax_kl family (softmax_kl and softmax_jsd): checks the tensors, allocates the outputs, dispatches on the
// (student, teacher) dtype pair and launches the kernels of softmax_kl_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/softmax_kl.py; the kernels' design and launch heuristics are described at the
// top of softmax_kl_kernels.cuh. Logits in {float32, float16, bfloat16} (student and teacher may differ) accumulate
// in float32; float64 logits (both) accumulate in float64. Per-row outputs are in the accumulation dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../common/cuda_launch.h"
#include "../common/host.h"
#include "softmax_kl_host.h"
#include "softmax_kl_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using host::acc_type_t;

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cuda(const at::Tensor& student,
                                                                       const at::Tensor& teacher,
                                                                       double temperature) {
  softmax_kl::check_kl_forward(student, teacher, temperature, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("softmax_kl_forward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher};
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      softmax_kl_cuda::launch_softmax_kl_forward<S, T, Acc>(
          static_cast<const S*>(student.const_data_ptr()), student.stride(0),
          static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), rows, cols,
          static_cast<Acc>(1.0 / temperature), static_cast<Acc*>(loss.mutable_data_ptr()),
          static_cast<Acc*>(stats_student.mutable_data_ptr()), static_cast<Acc*>(stats_teacher.mutable_data_ptr()),
          stream);
    });
  });
  return {loss, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& stats_student,
                                                            const at::Tensor& stats_teacher, const at::Tensor& loss,
                                                            double temperature, bool student_grad, bool teacher_grad) {
  softmax_kl::check_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature,
                                at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("softmax_kl_backward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      softmax_kl_cuda::launch_softmax_kl_backward<S, T, Acc>(
          static_cast<const Acc*>(grad_loss.const_data_ptr()), static_cast<const S*>(student.const_data_ptr()),
          student.stride(0), static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0),
          static_cast<const Acc*>(stats_student.const_data_ptr()),
          static_cast<const Acc*>(stats_teacher.const_data_ptr()), static_cast<const Acc*>(loss.const_data_ptr()),
          rows, cols, static_cast<Acc>(1.0 / temperature),
          student_grad ? static_cast<S*>(grad_student.mutable_data_ptr()) : nullptr,
          teacher_grad ? static_cast<T*>(grad_teacher.mutable_data_ptr()) : nullptr, stream);
    });
  });
  return {grad_student, grad_teacher};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_jsd_forward_cuda(const at::Tensor& student,
                                                                                    const at::Tensor& teacher,
                                                                                    double temperature, double beta) {
  softmax_kl::check_jsd_forward(student, teacher, temperature, beta, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("softmax_jsd_forward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  at::Tensor mixture_kl = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher, mixture_kl};
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      softmax_kl_cuda::launch_softmax_jsd_forward<S, T, Acc>(
          static_cast<const S*>(student.const_data_ptr()), student.stride(0),
          static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), rows, cols,
          static_cast<Acc>(1.0 / temperature), beta, static_cast<Acc*>(loss.mutable_data_ptr()),
          static_cast<Acc*>(stats_student.mutable_data_ptr()), static_cast<Acc*>(stats_teacher.mutable_data_ptr()),
          static_cast<Acc*>(mixture_kl.mutable_data_ptr()), stream);
    });
  });
  return {loss, stats_student, stats_teacher, mixture_kl};
}

std::tuple<at::Tensor, at::Tensor> softmax_jsd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                             const at::Tensor& teacher, const at::Tensor& stats_student,
                                                             const at::Tensor& stats_teacher,
                                                             const at::Tensor& mixture_kl, double temperature,
                                                             double beta, bool student_grad, bool teacher_grad) {
  softmax_kl::check_jsd_backward(grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature,
                                 beta, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("softmax_jsd_backward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      softmax_kl_cuda::launch_softmax_jsd_backward<S, T, Acc>(
          static_cast<const Acc*>(grad_loss.const_data_ptr()), static_cast<const S*>(student.const_data_ptr()),
          student.stride(0), static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0),
          static_cast<const Acc*>(stats_student.const_data_ptr()),
          static_cast<const Acc*>(stats_teacher.const_data_ptr()), static_cast<const Acc*>(mixture_kl.const_data_ptr()),
          rows, cols, static_cast<Acc>(1.0 / temperature), beta,
          student_grad ? static_cast<S*>(grad_student.mutable_data_ptr()) : nullptr,
          teacher_grad ? static_cast<T*>(grad_teacher.mutable_data_ptr()) : nullptr, stream);
    });
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
