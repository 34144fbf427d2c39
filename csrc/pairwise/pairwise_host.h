// Host side of the pairwise family, shared by the CPU and CUDA launchers: argument checks, the feature preprocessing
// and Gram matrices (ATen, so one code path serves both devices), and the backward through them. The device files
// supply only the Gram-level kernels. Spec: kdkernels/reference/pairwise.py; schema: csrc/kdkernels.cpp.
//
//   features [B, D] --preprocess--> P (acc dtype) --> G = P P^T (symmetrised) --gram kernel--> loss, dL/dG
//   dL/dP = (dL/dG + dL/dG^T) P --preprocess backward--> dL/dfeatures
//
// Preprocessing per relation: RKD centres the batch (distances and angles are translation invariant; the Gram of
// centred features keeps fp32 accurate under large mean offsets); SP uses the raw features; PKT divides each row by
// (|x| + eps); CC by max(|x|, 1e-12) (F.normalize). The gradients are computed in the forward (the Gram-level
// backward is as cheap as its forward and shares its loop) and the autograd backward scales them by grad_loss.
#pragma once

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace kdkernels::pairwise {

enum class Relation { kRkdDistance, kRkdAngle, kSp, kPkt, kCc };
enum class Preprocess { kCentre, kNone, kUnitPlusEps, kUnitClamped };

// One loss term on the Gram matrices: loss += weight * L(G_s, G_t), dG += weight * dL/dG.
struct GramTerm {
  Relation relation;
  double weight = 1.0;
  double eps = 1e-7;       // pkt: the log and norm epsilon
  double gamma = 0.4;      // cc: RBF width
  int64_t order = 2;       // cc: Taylor order
  bool bilinear = false;   // cc: K = S instead of the Gaussian series
};

// What a Gram kernel reads and accumulates into. Grams [B, B] are contiguous, symmetric, in the accumulation dtype
// (float32; float64 for float64 features). loss is a 0-dim tensor; the dgram tensors, when defined, are [B, B]; all
// outputs start at zero and kernels add their weighted term. A kernel may split the gradient of a symmetric entry
// between (i, j) and (j, i) as it likes: only dG + dG^T is used.
struct GramProblem {
  at::Tensor gram_student, gram_teacher;
  at::Tensor loss;
  at::Tensor dgram_student, dgram_teacher;  // undefined when that gradient is not requested
  int64_t batch() const { return gram_student.size(0); }
};

using GramKernel = void (*)(const GramTerm& term, const GramProblem& problem);

// Coincident points: a squared distance |x_i - x_j|^2 = G_ii + G_jj - 2 G_ij at or below
// kCoincidentUlps * eps(acc) * (G_ii + G_jj) is rounding noise of the Gram formula and counts as exactly 0, the
// official code's zero difference vector (distance: clamp to 1e-12 with zero gradient; angle: zero unit vector).
constexpr double kCoincidentUlps = 64.0;
constexpr double kDistanceClamp = 1e-12;    // lenscloth pdist's clamp of squared distances
constexpr double kNormalizeEps = 1e-12;     // F.normalize

inline std::vector<GramTerm> parse_terms(c10::string_view relation, at::ArrayRef<double> params) {
  const auto expect = [&](size_t count) {
    TORCH_CHECK(params.size() == count, "pairwise: relation '", std::string(relation), "' takes ", count,
                " parameters, got ", params.size());
  };
  if (relation == "rkd_distance" || relation == "rkd_angle" || relation == "sp") {
    expect(0);
    const Relation r = relation == "rkd_distance" ? Relation::kRkdDistance
                       : relation == "rkd_angle"  ? Relation::kRkdAngle
                                                  : Relation::kSp;
    return {GramTerm{r}};
  }
  if (relation == "rkd") {  // (distance_weight, angle_weight): both terms from one pair of Grams
    expect(2);
    GramTerm distance{Relation::kRkdDistance}, angle{Relation::kRkdAngle};
    distance.weight = params[0];
    angle.weight = params[1];
    return {distance, angle};
  }
  if (relation == "pkt") {  // (eps)
    expect(1);
    TORCH_CHECK(params[0] > 0 && std::isfinite(params[0]), "pairwise: pkt eps must be positive, got ", params[0]);
    GramTerm term{Relation::kPkt};
    term.eps = params[0];
    return {term};
  }
  if (relation == "cc") {  // (gamma, order, bilinear)
    expect(3);
    TORCH_CHECK(std::isfinite(params[0]), "pairwise: cc gamma must be finite, got ", params[0]);
    TORCH_CHECK(params[1] >= 0 && params[1] <= 64 && params[1] == std::floor(params[1]),
                "pairwise: cc order must be an integer in [0, 64], got ", params[1]);
    GramTerm term{Relation::kCc};
    term.gamma = params[0];
    term.order = static_cast<int64_t>(params[1]);
    term.bilinear = params[2] != 0.0;
    return {term};
  }
  TORCH_CHECK(false, "pairwise: unknown relation '", std::string(relation),
              "'; expected rkd_distance, rkd_angle, rkd, sp, pkt or cc");
}

inline Preprocess preprocess_of(Relation relation) {
  switch (relation) {
    case Relation::kRkdDistance:
    case Relation::kRkdAngle: return Preprocess::kCentre;
    case Relation::kSp: return Preprocess::kNone;
    case Relation::kPkt: return Preprocess::kUnitPlusEps;
    case Relation::kCc: return Preprocess::kUnitClamped;
  }
  return Preprocess::kNone;
}

inline at::ScalarType accumulation_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_features(const at::Tensor& student, const at::Tensor& teacher, at::DeviceType device_type) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "pairwise: expected 2-D features [B, D], got student ",
              student.sizes(), " and teacher ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0), "pairwise: student has ", student.size(0),
              " samples but teacher has ", teacher.size(0));
  TORCH_CHECK(student.size(0) >= 2, "pairwise: a batch relation needs at least 2 samples, got ", student.size(0));
  TORCH_CHECK(student.size(1) >= 1 && teacher.size(1) >= 1, "pairwise: features need at least one column, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device().type() == device_type, "pairwise: this kernel runs ", device_type,
              " tensors, got ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "pairwise: teacher is on ", teacher.device(),
              " but student is on ", student.device());
  for (const auto* x : {&student, &teacher}) {
    const auto dtype = x->scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                "pairwise: features must be float32, float16, bfloat16 or float64, got ", dtype);
  }
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
              "pairwise: float64 features must be paired with float64, got student ", student.scalar_type(),
              " and teacher ", teacher.scalar_type());
}

// Preprocessed features in the accumulation dtype, and what the backward through the preprocessing needs.
struct Prepared {
  at::Tensor features;  // P [B, D], contiguous: the Gram's input
  at::Tensor norms;     // [B, 1] row norms of the raw features (unit preprocessings), else undefined
};

inline double unit_eps(Preprocess preprocess, const GramTerm& term) {
  return preprocess == Preprocess::kUnitPlusEps ? term.eps : kNormalizeEps;
}

inline bool is_unit(Preprocess preprocess) {
  return preprocess == Preprocess::kUnitPlusEps || preprocess == Preprocess::kUnitClamped;
}

// Divides the rows of a unit preprocessing: x / (|x| + eps) or x / max(|x|, eps).
inline at::Tensor unit_denominators(const at::Tensor& norms, Preprocess preprocess, double eps) {
  return preprocess == Preprocess::kUnitPlusEps ? norms + eps : norms.clamp_min(eps);
}

// features -> P. `eps` is the unit preprocessings' (unit_eps). Devices may fuse it into loops of their own.
using Prepare = Prepared (*)(const at::Tensor& features, Preprocess preprocess, double eps);

inline Prepared prepare_with_aten(const at::Tensor& features, Preprocess preprocess, double eps) {
  at::Tensor x = features.to(accumulation_dtype(features));
  switch (preprocess) {
    case Preprocess::kCentre: return {x - x.mean(0, /*keepdim=*/true), at::Tensor()};
    case Preprocess::kNone: return {x.contiguous(), at::Tensor()};
    case Preprocess::kUnitPlusEps:
    case Preprocess::kUnitClamped: {
      at::Tensor norms = x.norm(2, {1}, /*keepdim=*/true);
      return {(x / unit_denominators(norms, preprocess, eps)).contiguous(), norms};
    }
  }
  return {x, at::Tensor()};
}

// dL/dx (in `dtype`, contiguous) from dL/dP. Centre: dP minus its batch mean. P = x / n' with n' = |x| + eps or
// max(|x|, eps): dL/dx = (dP - P (P.dP) n' / |x|) / n' where the norm is differentiable (|x| > 0, and |x| > eps when
// clamped), else dP / n' (torch's norm backward is 0 at 0). The device version may overwrite grad_prepared.
using PreprocessBackward = at::Tensor (*)(at::Tensor& grad_prepared, const Prepared& prepared, Preprocess preprocess,
                                          double eps, at::ScalarType dtype);

inline at::Tensor preprocess_backward_with_aten(at::Tensor& grad_prepared, const Prepared& prepared,
                                                Preprocess preprocess, double eps, at::ScalarType dtype) {
  at::Tensor grad;
  switch (preprocess) {
    case Preprocess::kCentre: grad = grad_prepared - grad_prepared.mean(0, /*keepdim=*/true); break;
    case Preprocess::kNone: grad = grad_prepared; break;
    case Preprocess::kUnitPlusEps:
    case Preprocess::kUnitClamped: {
      const at::Tensor& unit = prepared.features;
      const at::Tensor denominators = unit_denominators(prepared.norms, preprocess, eps);
      const at::Tensor differentiable = preprocess == Preprocess::kUnitPlusEps ? prepared.norms > 0
                                                                              : prepared.norms > eps;
      const double tiny = prepared.norms.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                                        : std::numeric_limits<float>::min();
      const at::Tensor radial = (unit * grad_prepared).sum(1, /*keepdim=*/true) * denominators /
                                prepared.norms.clamp_min(tiny);
      grad = (grad_prepared - unit * radial * differentiable) / denominators;
      break;
    }
  }
  return grad.to(dtype).contiguous();
}

// a @ b with TF32 off: a TF32 Gram loses the distances (10-bit mantissas), and its gradient would too.
inline at::Tensor exact_mm(const at::Tensor& a, const at::Tensor& b) {
  auto& context = at::globalContext();
  const bool tf32 = context.allowTF32CuBLAS();
  if (tf32) context.setAllowTF32CuBLAS(false);
  at::Tensor product = at::mm(a, b);
  if (tf32) context.setAllowTF32CuBLAS(true);
  return product;
}

// m <- (m + m^T) * scale for a contiguous square matrix. Devices may supply a faster one than ATen's transposed add
// (on the CPU that add is a strided walk costing more than the Gram itself at B = 256).
using Symmetrize = void (*)(at::Tensor& matrix, double scale);

inline void symmetrize_with_aten(at::Tensor& matrix, double scale) {
  matrix = ((matrix + matrix.t()) * scale).contiguous();
}

// G = P P^T, exactly symmetric so that kernels may read either triangle.
using SymmetricGram = at::Tensor (*)(const at::Tensor& prepared);

inline at::Tensor symmetric_gram_with_aten(const at::Tensor& prepared) {
  at::Tensor gram = exact_mm(prepared, prepared.t()).contiguous();
  symmetrize_with_aten(gram, 0.5);
  return gram;
}

// What a device may do its own way instead of with ATen ops.
struct DeviceHooks {
  SymmetricGram symmetric_gram = &symmetric_gram_with_aten;
  Symmetrize symmetrize = &symmetrize_with_aten;
  Prepare prepare = &prepare_with_aten;
  PreprocessBackward preprocess_backward = &preprocess_backward_with_aten;
};

// The whole op for one device: (loss [] acc dtype, grad_student, grad_teacher) with the gradients of the loss in
// the features' dtypes and shapes, or empty [0] tensors when not requested.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_forward(
    const at::Tensor& student, const at::Tensor& teacher, c10::string_view relation, at::ArrayRef<double> params,
    bool student_grad, bool teacher_grad, at::DeviceType device_type, GramKernel kernel,
    const DeviceHooks& hooks = DeviceHooks{}) {
  check_features(student, teacher, device_type);
  const std::vector<GramTerm> terms = parse_terms(relation, params);
  const Preprocess preprocess = preprocess_of(terms.front().relation);
  const double eps = unit_eps(preprocess, terms.front());
  const Prepared prepared_student = hooks.prepare(student, preprocess, eps);
  const Prepared prepared_teacher = hooks.prepare(teacher, preprocess, eps);

  GramProblem problem;
  problem.gram_student = hooks.symmetric_gram(prepared_student.features);
  problem.gram_teacher = hooks.symmetric_gram(prepared_teacher.features);
  problem.loss = at::zeros({}, prepared_student.features.options());
  if (student_grad) problem.dgram_student = at::zeros_like(problem.gram_student);
  if (teacher_grad) problem.dgram_teacher = at::zeros_like(problem.gram_teacher);
  for (const GramTerm& term : terms) kernel(term, problem);

  const auto feature_grad = [&](at::Tensor& dgram, const Prepared& prepared, const at::Tensor& features) {
    hooks.symmetrize(dgram, 1.0);  // dL/dP = (dG + dG^T) P
    at::Tensor grad_prepared = exact_mm(dgram, prepared.features);
    return hooks.preprocess_backward(grad_prepared, prepared, preprocess, eps, features.scalar_type());
  };
  at::Tensor grad_student = student_grad ? feature_grad(problem.dgram_student, prepared_student, student)
                                         : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? feature_grad(problem.dgram_teacher, prepared_teacher, teacher)
                                         : at::empty({0}, teacher.options());
  return {problem.loss, grad_student, grad_teacher};
}

}  // namespace kdkernels::pairwise
