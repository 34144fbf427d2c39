// CUDA launcher of dist: checks the tensors, allocates the outputs and the small workspaces, dispatches on the
// (student, teacher) dtype pair and launches the kernels of dist_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/dist.py; the kernels' contract is described at the top of dist_kernels.cuh.
// Logits in {float32, float16, bfloat16} (student and teacher may differ) and float64 logits (both) are computed in
// float64 (see Precision in dist_kernels.cuh). The Pearson vectors and grad_row / grad_col are in the accumulation
// dtype (float32, or float64 for float64 logits), the saved statistics in float64, the gradients in the logits'
// dtypes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/cuda_launch.h"
#include "../common/host.h"
#include "dist_host.h"
#include "dist_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using host::acc_type_t;

void check_shape_for_cuda(const at::Tensor& student) {
  cuda_launch::check_rows_fit_the_grid("dist", student.size(0));
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0, "dist (cuda): logits need at least one row and column, got ",
              student.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dist_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  dist::check_forward_inputs(student, teacher, temperature, at::kCUDA);
  check_shape_for_cuda(student);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  const auto saved = student.options().dtype(at::kDouble);
  at::Tensor row_pearson = at::empty({rows}, options);
  at::Tensor col_pearson = at::empty({cols}, options);
  at::Tensor row_moments = at::empty({rows, 3}, saved);
  at::Tensor col_moments = at::empty({cols, 5}, saved);
  at::Tensor stats_student = at::empty({rows, 2}, saved);
  at::Tensor stats_teacher = at::empty({rows, 2}, saved);
  at::Tensor workspace = at::empty({dist_cuda::dist_forward_workspace_elements(rows, cols)}, saved);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Out = acc_type_t<S>;
    dist_cuda::launch_dist_forward<S, T, Out>(
        static_cast<const S*>(student.const_data_ptr()), student.stride(0),
        static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), rows, cols, 1.0 / temperature,
        stats_student.mutable_data_ptr<double>(), stats_teacher.mutable_data_ptr<double>(),
        row_moments.mutable_data_ptr<double>(), static_cast<Out*>(row_pearson.mutable_data_ptr()),
        col_moments.mutable_data_ptr<double>(), static_cast<Out*>(col_pearson.mutable_data_ptr()),
        workspace.mutable_data_ptr<double>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_pearson, col_pearson, row_moments, col_moments, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> dist_backward_cuda(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                      const at::Tensor& student, const at::Tensor& teacher,
                                                      const at::Tensor& row_moments, const at::Tensor& col_moments,
                                                      const at::Tensor& stats_student, const at::Tensor& stats_teacher,
                                                      double temperature, bool student_grad, bool teacher_grad) {
  dist::check_backward_inputs(grad_row, grad_col, student, teacher, row_moments, col_moments, stats_student,
                              stats_teacher, temperature, at::kCUDA);
  check_shape_for_cuda(student);
  const int64_t rows = student.size(0), cols = student.size(1);
  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor grad_student =
      student_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher =
      teacher_grad ? at::empty({rows, cols}, teacher.options()) : at::empty({0}, teacher.options());
  if (!student_grad && !teacher_grad) return {grad_student, grad_teacher};
  at::Tensor workspace =
      at::empty({dist_cuda::dist_backward_workspace_elements(rows)}, student.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  host::dispatch_logits_pair<CudaElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Out = acc_type_t<S>;
    dist_cuda::launch_dist_backward<S, T, Out>(
        static_cast<const Out*>(grad_row.const_data_ptr()), static_cast<const Out*>(grad_col.const_data_ptr()),
        static_cast<const S*>(student.const_data_ptr()), student.stride(0),
        static_cast<const T*>(teacher.const_data_ptr()), teacher.stride(0), row_moments.const_data_ptr<double>(),
        col_moments.const_data_ptr<double>(), stats_student.const_data_ptr<double>(),
        stats_teacher.const_data_ptr<double>(), rows, cols, 1.0 / temperature,
        student_grad ? static_cast<S*>(grad_student.mutable_data_ptr()) : nullptr,
        teacher_grad ? static_cast<T*>(grad_teacher.mutable_data_ptr()) : nullptr,
        workspace.mutable_data_ptr<double>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("dist_forward", &dist_forward_cuda);
  m.impl("dist_backward", &dist_backward_cuda);
}

}  // namespace kdkernels
