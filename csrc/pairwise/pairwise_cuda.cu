// CUDA launcher of pairwise_forward: the device-agnostic host glue of pairwise_host.h (checks, preprocessing, Gram
// GEMMs, backward GEMM) with a Gram kernel that launches pairwise_kernels.cuh on the current CUDA stream.
//
// Numerical spec: kdkernels/reference/pairwise.py; the Gram-level formulas are stated at the top of
// pairwise_kernels.cuh. Inputs and gradients are float32 (float64 for float64 features), the RKD distance and PKT
// arithmetic float64; each term adds weight * L to the loss and weight * dL/dG to the requested Gram gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "pairwise_host.h"
#include "pairwise_kernels.cuh"

namespace kdkernels {
namespace {

using pairwise::GramProblem;
using pairwise::GramTerm;
using pairwise::Relation;

static_assert(pairwise_cuda::kDistanceClamp == pairwise::kDistanceClamp, "distance clamp differs");
static_assert(pairwise_cuda::kNormalizeEps == pairwise::kNormalizeEps, "normalize eps differs");

template <typename Acc>
Acc* optional_data(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.mutable_data_ptr<Acc>() : nullptr;
}

template <typename Acc>
const Acc* optional_input(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<Acc>() : nullptr;
}

template <typename Acc>
void launch_term(const GramTerm& term, const GramProblem& problem, cudaStream_t stream) {
  const int64_t B = problem.batch();
  const pairwise_cuda::GramArgs<Acc> gram{optional_input<Acc>(problem.gram_student),
                                          optional_input<Acc>(problem.gram_teacher),
                                          optional_input<Acc>(problem.sqdist_student),
                                          optional_input<Acc>(problem.sqdist_teacher),
                                          optional_data<Acc>(problem.dgram_student),
                                          optional_data<Acc>(problem.dgram_teacher), B};
  Acc* loss = problem.loss.mutable_data_ptr<Acc>();
  const auto workspace = [&](int64_t elements) { return at::empty({elements}, problem.loss.options()); };
  const auto wide_workspace = [&](int64_t elements) {
    return at::empty({elements}, problem.loss.options().dtype(at::kDouble));
  };
  switch (term.relation) {
    case Relation::kRkdDistance: {
      at::Tensor wide = wide_workspace(pairwise_cuda::rkd_distance_wide_workspace_elements(B));
      pairwise_cuda::launch_rkd_distance<Acc>(gram, term.weight, loss, wide.mutable_data_ptr<double>(), stream);
      break;
    }
    case Relation::kRkdAngle: {
      at::Tensor ws = workspace(pairwise_cuda::rkd_angle_workspace_elements(B, gram.dgram_student != nullptr,
                                                                             gram.dgram_teacher != nullptr));
      at::Tensor wide = wide_workspace(pairwise_cuda::rkd_angle_wide_workspace_elements(B));
      pairwise_cuda::launch_rkd_angle<Acc>(gram, term.weight, loss, ws.mutable_data_ptr<Acc>(),
                                           wide.mutable_data_ptr<double>(), stream);
      break;
    }
    case Relation::kSp: {
      at::Tensor ws = workspace(pairwise_cuda::sp_workspace_elements(B));
      pairwise_cuda::launch_sp<Acc>(gram, term.weight, loss, ws.mutable_data_ptr<Acc>(), stream);
      break;
    }
    case Relation::kPkt: {
      at::Tensor wide = wide_workspace(pairwise_cuda::pkt_wide_workspace_elements(B));
      pairwise_cuda::launch_pkt<Acc>(gram, term.weight, term.eps, loss, wide.mutable_data_ptr<double>(), stream);
      break;
    }
    case Relation::kCc: {
      at::Tensor ws = workspace(pairwise_cuda::cc_workspace_elements(B));
      pairwise_cuda::launch_cc<Acc>(gram, term.weight, term.gamma, term.order, term.bilinear, loss,
                                    ws.mutable_data_ptr<Acc>(), stream);
      break;
    }
  }
}

void cuda_gram_kernel(const GramTerm& term, const GramProblem& problem) {
  TORCH_CHECK(problem.batch() <= std::numeric_limits<int32_t>::max(), "pairwise (cuda): at most 2^31 - 1 samples, got ",
              problem.batch());
  TORCH_CHECK(term.order >= 0 && term.order <= pairwise_cuda::kMaxCcOrder, "pairwise (cuda): cc order must be in [0, ",
              pairwise_cuda::kMaxCcOrder, "], got ", term.order);
  const c10::cuda::CUDAGuard device_guard(problem.loss.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (problem.loss.scalar_type() == at::kDouble) {
    launch_term<double>(term, problem, stream);
  } else {
    launch_term<float>(term, problem, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_forward_cuda(const at::Tensor& student,
                                                                     const at::Tensor& teacher,
                                                                     c10::string_view relation,
                                                                     at::ArrayRef<double> params, bool student_grad,
                                                                     bool teacher_grad) {
  return pairwise::relation_forward(student, teacher, relation, params, student_grad, teacher_grad, at::kCUDA,
                                    &cuda_gram_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("pairwise_forward", &pairwise_forward_cuda); }

}  // namespace kdkernels
