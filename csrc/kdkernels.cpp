// Op schemas for every kdkernels op, and the `kdkernels._C` Python module that reports how it was built.
//
// Kernels register per dispatch key in their own files: csrc/<family>/<family>_cuda.cu (CUDA, built into _C) and
// csrc/<family>/<family>_cpu.cpp (CPU, built once per vector ISA into kdkernels/_cpu_<isa>*.so, one of which
// kdkernels/_extension.py loads). Fake (meta) kernels and autograd live in kdkernels/ops/<family>.py.
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
  // target_split: DKD's and NKD's per-row terms for int64 labels [N] in [0, V). Returns (terms [N, 6],
  // stats_student [N, 2], stats_teacher [N, 2]) in the accumulation dtype. terms = (log p_s[y], log(1 - p_s[y]),
  // log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t)) with q = the softmax over the non-target columns; a side's
  // stats are (max, log_sum) over its non-target columns only, log q = (x - max) / T - log_sum.
  // Spec: kdkernels/reference/target_split.py.
  m.def(
      "target_split_forward(Tensor student, Tensor teacher, Tensor labels, float temperature) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of sum(grad_terms * terms) ([N, 6]) with respect to student and teacher.
  m.def(
      "target_split_backward(Tensor grad_terms, Tensor student, Tensor teacher, Tensor labels, Tensor stats_student, "
      "Tensor stats_teacher, Tensor terms, float temperature, bool student_grad, bool teacher_grad) "
      "-> (Tensor, Tensor)");
  // logsoftmax_gather: log_softmax(logits / T) at int64 indices [N, k] -> (gathered [N, k], stats [N, 2]) in the
  // accumulation dtype; stats as for softmax_kl. Spec: kdkernels/reference/logsoftmax_gather.py.
  m.def("logsoftmax_gather_forward(Tensor logits, Tensor indices, float temperature) -> (Tensor, Tensor)");
  m.def(
      "logsoftmax_gather_backward(Tensor grad_gathered, Tensor logits, Tensor indices, Tensor stats, "
      "float temperature) -> Tensor");
  // dist: DIST's Pearson correlations of y = softmax(x / T): (row_pearson [N], col_pearson [V]) in the accumulation
  // dtype, and (row_moments [N, 3], col_moments [V, 5], stats_student [N, 2], stats_teacher [N, 2]) in float64 for
  // every logits dtype (the backward's centred values cancel below float precision). row_moments = (S_st, S_ss,
  // S_tt), the centred sums of each row (centre 1/V); col_moments = (mean_s, mean_t, S_st, S_ss, S_tt) of each column
  // across the batch; stats as for softmax_kl. grad_row, grad_col: accumulation dtype. Spec:
  // kdkernels/reference/dist.py.
  m.def(
      "dist_forward(Tensor student, Tensor teacher, float temperature) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dist_backward(Tensor grad_row, Tensor grad_col, Tensor student, Tensor teacher, Tensor row_moments, "
      "Tensor col_moments, Tensor stats_student, Tensor stats_teacher, float temperature, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  // pairwise: a batch-relation loss between student features [B, D_s] and teacher features [B, D_t] (B >= 2), with
  // its gradients computed in the same call: (loss [] in the accumulation dtype, grad_student, grad_teacher), the
  // gradients of the loss (unit upstream) in the features' dtypes, or empty [0] tensors when not requested.
  // relation (params): rkd_distance (), rkd_angle (), rkd (distance_weight, angle_weight), sp (), pkt (eps),
  // cc (gamma, order, bilinear 0/1). Spec: kdkernels/reference/pairwise.py.
  m.def(
      "pairwise_forward(Tensor student, Tensor teacher, str relation, float[] params, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // contrastive: CRD's NCE of embeddings [B, d] against rows of the other side's memory bank [N, d] picked by int64
  // contrast_indices [B, K+1] (column 0: the positive). With s = memory[idx] . embed / T, x = exp(s - log Z) and
  // c = noise_mass + eps (noise_mass = K / N): loss_rows[b] = -log(x_b0 / (x_b0 + c)) - sum_{k>=1}
  // log(noise_mass / (x_bk + c)) and score_lse[b] = logsumexp_k s_bk, both [B] in the accumulation dtype, computed
  // in log space; grad_embed = d sum(loss_rows) / d embed in embed's dtype when embed_grad, else empty [0].
  // log_normalizer: 0-dim log Z in the accumulation dtype. Spec: kdkernels/reference/contrastive.py.
  m.def(
      "crd_nce_forward(Tensor embed, Tensor memory, Tensor contrast_indices, Tensor log_normalizer, "
      "float temperature, float noise_mass, float eps, bool embed_grad) -> (Tensor, Tensor, Tensor)");
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
    pybind11::list backends;  // of this module; the CPU kernels are separate libraries
    if (built_with_cuda()) backends.append("cuda");
    info["compiled_backends"] = backends;
    info["cuda_archs"] = std::string(KDKERNELS_CUDA_ARCHS);
    return info;
  });
}
