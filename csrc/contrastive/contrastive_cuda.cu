// CUDA launcher of crd_nce_forward: checks the tensors, allocates the outputs and the per-(row, chunk) workspace,
// dispatches on the (embed, memory) dtype pair and launches the kernels of contrastive_kernels.cuh on the current
// CUDA stream. Spec: kdkernels/reference/contrastive.py; formula and index policy: contrastive_host.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/cuda_launch.h"
#include "../common/host.h"
#include "contrastive_host.h"
#include "contrastive_kernels.cuh"

namespace kdkernels {
namespace {

using cuda_rows::CudaElements;

void check_sizes_for_cuda(const contrastive::Shape& shape) {
  TORCH_CHECK_VALUE(shape.features <= contrastive_cuda::kMaxFeatures, contrastive::kOp, " (cuda): at most ",
                    contrastive_cuda::kMaxFeatures, " features, got ", shape.features);
  TORCH_CHECK_VALUE(
      shape.batch * contrastive_cuda::crd_nce_chunks(shape.contrasts) <= std::numeric_limits<int32_t>::max(),
      contrastive::kOp, " (cuda): B * ceil((K+1) / ", contrastive_cuda::kChunkContrasts, ") must be < 2^31, got B = ",
      shape.batch, " and K+1 = ", shape.contrasts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_forward_cuda(const at::Tensor& embed, const at::Tensor& memory,
                                                                    const at::Tensor& contrast_indices,
                                                                    const at::Tensor& log_normalizer,
                                                                    double temperature, double noise_mass, double eps,
                                                                    bool embed_grad) {
  contrastive::check_tensors(embed, memory, contrast_indices, log_normalizer, at::kCUDA);
  const contrastive::Constants constants = contrastive::check_constants(temperature, noise_mass, eps);
  const contrastive::Shape shape = contrastive::shape_of(embed, memory, contrast_indices);
  check_sizes_for_cuda(shape);
  at::Tensor loss_rows, score_lse, grad_embed;
  std::tie(loss_rows, score_lse, grad_embed) = contrastive::allocate_outputs(embed, embed_grad);
  const at::Tensor embed_rows = contrastive::unit_stride_rows(embed);
  const at::Tensor memory_rows = contrastive::unit_stride_rows(memory);
  const at::Tensor indices = contrast_indices.contiguous();
  const auto acc_options = embed.options().dtype(contrastive::accumulation_dtype(embed));
  at::Tensor workspace = at::empty(
      {contrastive_cuda::crd_nce_workspace_elements(shape.batch, shape.features, shape.contrasts, embed_grad)},
      acc_options);
  cuda_launch::launch_on(embed, [&](cudaStream_t stream) {
    cudaError_t status = cudaSuccess;
    host::dispatch_logits_pair<CudaElements>(embed_rows, memory_rows, [&](auto e_tag, auto m_tag) {
      using E = typename decltype(e_tag)::type;
      using M = typename decltype(m_tag)::type;
      using Acc = host::acc_type_t<E>;
      status = contrastive_cuda::launch_crd_nce_forward<E, M, Acc>(
          static_cast<const E*>(embed_rows.const_data_ptr()), embed_rows.stride(0),
          static_cast<const M*>(memory_rows.const_data_ptr()), memory_rows.stride(0),
          indices.const_data_ptr<int64_t>(), static_cast<const Acc*>(log_normalizer.const_data_ptr()), shape.batch,
          shape.features, shape.contrasts, shape.bank, static_cast<Acc>(constants.inv_t),
          static_cast<Acc>(constants.log_c), static_cast<Acc>(constants.negative_shift),
          static_cast<Acc*>(loss_rows.mutable_data_ptr()), static_cast<Acc*>(score_lse.mutable_data_ptr()),
          embed_grad ? static_cast<E*>(grad_embed.mutable_data_ptr()) : nullptr,
          static_cast<Acc*>(workspace.mutable_data_ptr()), stream);
    });
    return status;
  });
  return {loss_rows, score_lse, grad_embed};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("crd_nce_forward", &crd_nce_forward_cuda); }

}  // namespace kdkernels
