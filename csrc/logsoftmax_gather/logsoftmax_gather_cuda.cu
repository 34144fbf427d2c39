// CUDA launcher of logsoftmax_gather: checks the tensors, allocates the outputs, dispatches on the logits dtype and
// launches the kernels of logsoftmax_gather_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/logsoftmax_gather.py; the kernels' contract is described at the top of
// logsoftmax_gather_kernels.cuh. Logits in {float32, float16, bfloat16} accumulate in float32, float64 in float64;
// gathered [N, k] and stats [N, 2] are in the accumulation dtype, the gradient in the logits' dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../common/cuda_launch.h"
#include "../common/host.h"
#include "logsoftmax_gather_host.h"
#include "logsoftmax_gather_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using host::acc_type_t;

std::tuple<at::Tensor, at::Tensor> logsoftmax_gather_forward_cuda(const at::Tensor& logits, const at::Tensor& indices,
                                                                  double temperature) {
  logsoftmax_gather::check_forward_inputs(logits, indices, temperature, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("logsoftmax_gather_forward", logits.size(0));
  const int64_t rows = logits.size(0), cols = logits.size(1), num_indices = indices.size(1);
  const auto options = logits.options().dtype(host::accumulation_dtype(logits));
  at::Tensor gathered = at::empty({rows, num_indices}, options);
  at::Tensor stats = at::empty({rows, 2}, options);
  if (rows == 0) return {gathered, stats};
  const at::Tensor indices_c = indices.contiguous();
  cuda_launch::launch_on(logits, [&](cudaStream_t stream) {
    host::dispatch_logits_type<CudaElements>(logits.scalar_type(), [&](auto tag) {
      using X = typename decltype(tag)::type;
      using Acc = acc_type_t<X>;
      logsoftmax_gather_cuda::launch_logsoftmax_gather_forward<X, Acc>(
          static_cast<const X*>(logits.const_data_ptr()), logits.stride(0), indices_c.const_data_ptr<int64_t>(),
          num_indices, rows, cols, static_cast<Acc>(1.0 / temperature),
          static_cast<Acc*>(gathered.mutable_data_ptr()), static_cast<Acc*>(stats.mutable_data_ptr()), stream);
    });
  });
  return {gathered, stats};
}

at::Tensor logsoftmax_gather_backward_cuda(const at::Tensor& grad_gathered, const at::Tensor& logits,
                                           const at::Tensor& indices, const at::Tensor& stats, double temperature) {
  logsoftmax_gather::check_backward_inputs(grad_gathered, logits, indices, stats, temperature, at::kCUDA);
  cuda_launch::check_rows_fit_the_grid("logsoftmax_gather_backward", logits.size(0));
  const int64_t rows = logits.size(0), cols = logits.size(1), num_indices = indices.size(1);
  at::Tensor grad = at::empty({rows, cols}, logits.options());
  if (rows == 0 || cols == 0) return grad;
  const at::Tensor indices_c = indices.contiguous();
  const at::Tensor grad_gathered_c = grad_gathered.contiguous();
  cuda_launch::launch_on(logits, [&](cudaStream_t stream) {
    host::dispatch_logits_type<CudaElements>(logits.scalar_type(), [&](auto tag) {
      using X = typename decltype(tag)::type;
      using Acc = acc_type_t<X>;
      logsoftmax_gather_cuda::launch_logsoftmax_gather_backward<X, Acc>(
          static_cast<const Acc*>(grad_gathered_c.const_data_ptr()), static_cast<const X*>(logits.const_data_ptr()),
          logits.stride(0), indices_c.const_data_ptr<int64_t>(), num_indices,
          static_cast<const Acc*>(stats.const_data_ptr()), rows, cols, static_cast<Acc>(1.0 / temperature),
          static_cast<X*>(grad.mutable_data_ptr()), stream);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("logsoftmax_gather_forward", &logsoftmax_gather_forward_cuda);
  m.impl("logsoftmax_gather_backward", &logsoftmax_gather_backward_cuda);
}

}  // namespace kdkernels
