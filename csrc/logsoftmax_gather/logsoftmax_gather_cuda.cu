// CUDA launcher of logsoftmax_gather: checks the tensors, allocates the outputs, dispatches on the logits dtype and
// launches the kernels of logsoftmax_gather_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/logsoftmax_gather.py; the kernels' contract is described at the top of
// logsoftmax_gather_kernels.cuh. Logits in {float32, float16, bfloat16} accumulate in float32, float64 in float64;
// gathered [N, k] and stats [N, 2] are in the accumulation dtype, the gradient in the logits' dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../softmax_kl/softmax_kl_host.h"
#include "logsoftmax_gather_host.h"
#include "logsoftmax_gather_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;
using softmax_kl::acc_type_t;

void check_rows_fit_the_grid(const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(),
              "logsoftmax_gather (cuda): at most 2^31 - 1 rows, got ", logits.size(0));
}

std::tuple<at::Tensor, at::Tensor> logsoftmax_gather_forward_cuda(const at::Tensor& logits, const at::Tensor& indices,
                                                                  double temperature) {
  logsoftmax_gather::check_forward_inputs(logits, indices, temperature, at::kCUDA);
  check_rows_fit_the_grid(logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = logits.size(0), cols = logits.size(1), num_indices = indices.size(1);
  const auto options = logits.options().dtype(softmax_kl::accumulation_dtype(logits));
  at::Tensor gathered = at::empty({rows, num_indices}, options);
  at::Tensor stats = at::empty({rows, 2}, options);
  if (rows == 0) return {gathered, stats};
  TORCH_CHECK(cols > 0, "logsoftmax_gather (cuda): logits need at least one column");
  const at::Tensor indices_c = indices.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_type<CudaElements>(logits.scalar_type(), "logits", [&](auto tag) {
    using X = typename decltype(tag)::type;
    using Acc = acc_type_t<X>;
    logsoftmax_gather_cuda::launch_logsoftmax_gather_forward<X, Acc>(
        static_cast<const X*>(logits.const_data_ptr()), logits.stride(0), indices_c.const_data_ptr<int64_t>(),
        num_indices, rows, cols, static_cast<Acc>(1.0 / temperature), static_cast<Acc*>(gathered.mutable_data_ptr()),
        static_cast<Acc*>(stats.mutable_data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gathered, stats};
}

at::Tensor logsoftmax_gather_backward_cuda(const at::Tensor& grad_gathered, const at::Tensor& logits,
                                           const at::Tensor& indices, const at::Tensor& stats, double temperature) {
  logsoftmax_gather::check_backward_inputs(grad_gathered, logits, indices, stats, temperature, at::kCUDA);
  check_rows_fit_the_grid(logits);
  const int64_t rows = logits.size(0), cols = logits.size(1), num_indices = indices.size(1);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor grad = at::empty({rows, cols}, logits.options());
  if (rows == 0 || cols == 0) return grad;
  const at::Tensor indices_c = indices.contiguous();
  const at::Tensor grad_gathered_c = grad_gathered.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  softmax_kl::dispatch_logits_type<CudaElements>(logits.scalar_type(), "logits", [&](auto tag) {
    using X = typename decltype(tag)::type;
    using Acc = acc_type_t<X>;
    logsoftmax_gather_cuda::launch_logsoftmax_gather_backward<X, Acc>(
        static_cast<const Acc*>(grad_gathered_c.const_data_ptr()), static_cast<const X*>(logits.const_data_ptr()),
        logits.stride(0), indices_c.const_data_ptr<int64_t>(), num_indices,
        static_cast<const Acc*>(stats.const_data_ptr()), rows, cols, static_cast<Acc>(1.0 / temperature),
        static_cast<X*>(grad.mutable_data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("logsoftmax_gather_forward", &logsoftmax_gather_forward_cuda);
  m.impl("logsoftmax_gather_backward", &logsoftmax_gather_backward_cuda);
}

}  // namespace kdkernels
