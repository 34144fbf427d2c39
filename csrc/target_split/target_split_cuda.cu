// CUDA launcher of target_split: checks the tensors, allocates the outputs, dispatches on the (student, teacher)
// dtype pair and launches the kernels of target_split_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/target_split.py; the kernels' contract is described at the top of
// target_split_kernels.cuh. Logits in {float32, float16, bfloat16} (student and teacher may differ) accumulate in
// float32; float64 logits (both) accumulate in float64. terms [N, 6] and stats [N, 2] are in the accumulation dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../common/cuda_launch.h"
#include "../common/host.h"
#include "target_split_host.h"
#include "target_split_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using host::acc_type_t;

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_split_forward_cuda(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         const at::Tensor& labels,
                                                                         double temperature) {
  target_split::check_forward_inputs(student, teacher, labels, temperature, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("target_split_forward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor terms = at::empty({rows, 6}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {terms, stats_student, stats_teacher};
  const at::Tensor labels_c = labels.contiguous();
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      target_split_cuda::launch_target_split_forward<S, T, Acc>(
          static_cast<const S*>(student.const_data_ptr()), student.stride(0),
          static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), labels_c.const_data_ptr<int64_t>(),
          rows, cols, static_cast<Acc>(1.0 / temperature), static_cast<Acc*>(terms.mutable_data_ptr()),
          static_cast<Acc*>(stats_student.mutable_data_ptr()), static_cast<Acc*>(stats_teacher.mutable_data_ptr()),
          stream);
    });
  });
  return {terms, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> target_split_backward_cuda(const at::Tensor& grad_terms, const at::Tensor& student,
                                                              const at::Tensor& teacher, const at::Tensor& labels,
                                                              const at::Tensor& stats_student,
                                                              const at::Tensor& stats_teacher,
                                                              const at::Tensor& terms, double temperature,
                                                              bool student_grad, bool teacher_grad) {
  target_split::check_backward_inputs(grad_terms, student, teacher, labels, stats_student, stats_teacher, terms,
                                      temperature, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("target_split_backward", student.size(0));
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || cols == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  const at::Tensor labels_c = labels.contiguous();
  cuda_launch::launch_on(student, [&](cudaStream_t stream) {
    host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Acc = acc_type_t<S>;
      target_split_cuda::launch_target_split_backward<S, T, Acc>(
          static_cast<const Acc*>(grad_terms.const_data_ptr()), static_cast<const S*>(student.const_data_ptr()),
          student.stride(0), static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0),
          labels_c.const_data_ptr<int64_t>(), static_cast<const Acc*>(stats_student.const_data_ptr()),
          static_cast<const Acc*>(stats_teacher.const_data_ptr()), static_cast<const Acc*>(terms.const_data_ptr()),
          rows, cols, static_cast<Acc>(1.0 / temperature),
          student_grad ? static_cast<S*>(grad_student.mutable_data_ptr()) : nullptr,
          teacher_grad ? static_cast<T*>(grad_teacher.mutable_data_ptr()) : nullptr, stream);
    });
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("target_split_forward", &target_split_forward_cuda);
  m.impl("target_split_backward", &target_split_backward_cuda);
}

}  // namespace kdkernels
