// The launch path every family's CUDA launcher shares (host code, compiled by nvcc against torch): the limit on
// rows that one grid dimension imposes, and a launch on the inputs' device and its current stream followed by the
// check of the launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

namespace kdkernels::cuda_launch {

// Row kernels index rows with a 32-bit grid dimension.
inline void check_rows_fit_the_grid(const char* op, int64_t rows) {
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), op, " (cuda): at most 2^31 - 1 rows, got ", rows);
}

// Calls launch(stream) with `on`'s device current and that device's current stream, then raises the launch's error
// if any: the cudaError_t that launch returns, else cudaGetLastError().
template <typename Launch>
void launch_on(const at::Tensor& on, Launch&& launch) {
  const c10::cuda::CUDAGuard device_guard(on.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
  if constexpr (std::is_same_v<std::invoke_result_t<Launch, cudaStream_t>, cudaError_t>) {
    C10_CUDA_CHECK(std::forward<Launch>(launch)(stream));
  } else {
    std::forward<Launch>(launch)(stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace kdkernels::cuda_launch
