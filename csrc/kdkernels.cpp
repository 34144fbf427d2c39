// Op schemas for every kdkernels op, and the `kdkernels._C` Python module that reports how it was built.
//
// Kernels register per dispatch key in their own files: csrc/<family>/<family>_cpu.cpp (CPU) and
// csrc/<family>/<family>_cuda.cu (CUDA). Fake (meta) kernels and autograd live in kdkernels/ops/<family>.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

#ifndef KDKERNELS_VERSION
#define KDKERNELS_VERSION "0+unknown"
#endif
#ifndef KDKERNELS_TORCH_VERSION
#define KDKERNELS_TORCH_VERSION "unknown"
#endif
#ifndef KDKERNELS_CUDA_ARCHS
#define KDKERNELS_CUDA_ARCHS ""
#endif
#ifndef KDKERNELS_CPU_CAPABILITY_NAME
#define KDKERNELS_CPU_CAPABILITY_NAME "DEFAULT"
#endif

TORCH_LIBRARY(kdkernels, m) {
  // softmax_kl: per-row KL(softmax(teacher / T) || softmax(student / T)) over 2-D [N, V] logits whose last dim has
  // unit stride. Returns (loss [N], stats_student [N, 2], stats_teacher [N, 2]) in the accumulation dtype (fp32;
  // fp64 for fp64 inputs). A row's stats are (max, log_sum): max = the row's largest raw logit and
  // log_sum = log(sum(exp((x - max) / T))), so log p = (x - max) / T - log_sum is exact near the max.
  m.def("softmax_kl_forward(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor, Tensor)");
  // Gradients of sum(grad_loss * loss) with respect to student and teacher, from the saved per-row statistics.
  // A gradient that is not requested comes back as an empty tensor of shape [0].
  m.def(
      "softmax_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats_student, "
      "Tensor stats_teacher, Tensor loss, float temperature, bool student_grad, bool teacher_grad) "
      "-> (Tensor, Tensor)");
  // softmax_jsd: per-row generalised JSD, beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
  // m = beta p_t + (1 - beta) p_s formed in log space, 0 < beta < 1. Returns (loss [N], stats_student [N, 2],
  // stats_teacher [N, 2], mixture_kl [N, 2] = (KL(p_t || m), KL(p_s || m))), stats as for softmax_kl.
  m.def(
      "softmax_jsd_forward(Tensor student, Tensor teacher, float temperature, float beta) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "softmax_jsd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats_student, "
      "Tensor stats_teacher, Tensor mixture_kl, float temperature, float beta, bool student_grad, bool teacher_grad) "
      "-> (Tensor, Tensor)");
}

namespace {

bool built_with_cuda() {
#ifdef KDKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "kdkernels compiled ops (registered under torch.ops.kdkernels) and build information";
  module.def("build_info", []() {
    pybind11::dict info;
    info["version"] = KDKERNELS_VERSION;
    info["torch_version"] = KDKERNELS_TORCH_VERSION;
    pybind11::list backends;
    backends.append("cpu");
    if (built_with_cuda()) backends.append("cuda");
    info["compiled_backends"] = backends;
    info["cuda_archs"] = std::string(KDKERNELS_CUDA_ARCHS);
    info["cpu_capability"] = KDKERNELS_CPU_CAPABILITY_NAME;
    return info;
  });
}
