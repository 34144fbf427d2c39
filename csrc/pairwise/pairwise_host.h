// Host side of the pairwise family, shared by the CPU and CUDA launchers: argument checks, the feature preprocessing
// and Gram matrices (ATen, so one code path serves both devices), and the backward through them. The device files
// supply only the Gram-level kernels. Spec: kdkernels/reference/pairwise.py; schema: csrc/kdkernels.cpp.
//
//   features [B, D] --preprocess--> P --> G = P P^T (symmetrised) --gram kernel--> loss, dL/dG
//   dL/dP = (dL/dG + dL/dG^T) P --preprocess backward--> dL/dfeatures
//
// Preprocessing per relation: RKD centres the batch (distances and angles are translation invariant); SP uses the
// raw features; PKT divides each row by (|x| + eps); CC by max(|x|, 1e-12) (F.normalize). Below float64 the
// preprocessing is computed in float64 and rounded once: a row scale rounded to float32 would shift every entry of
// the row by the same relative error, which PKT's loss (a sum of terms of both signs) does not average out.
//
// RKD. The losses depend on the features only through the squared distances D2_ij = |x_i - x_j|^2 and, for the
// angle, the numerators N_abc = (P_b - P_a).(P_c - P_a). From a float32 Gram, D2 = G_ii + G_jj - 2 G_ij and
// N = (G_bc - G_ac) - (G_ab - G_aa) carry errors ~eps |G|: a few eps even for random features (float32 GEMMs
// accumulate in float32), and growing without bound relative to D2 and N for samples close to each other compared
// with their distance from the batch mean (angle gradients ~eps/rho^2 for samples a relative distance rho apart).
// So P is centred in float64 and G = P P^T is a float64 GEMM (RkdGram); the kernel gets D2 rounded once to the
// accumulation dtype and, with the angle, G as fixed-point hi/lo pairs in the accumulation dtype: [B, 2B] rows,
// row i = hi(G_i.) then lo(G_i.), with hi a multiple of the row's quantum q_i = 2^(e_i - p + 4) (2^e_i > max_j
// |G_ij|, p the dtype's mantissa digits) and lo = G - hi rounded (G = hi + lo to ~2^(3 - p) eps q_i). Differences of
// two hi entries of a row are exact, so N = ((hi_bc - hi_ba) - (hi_ac - hi_aa)) + (the same of lo) is rounded once
// relative to itself (its cancellation costs nothing) plus ~eps q_a, q_b: per-row quanta keep that small for rows
// near the batch mean even when one sample lies far from it.
// RKD kernels return dL/dG off the diagonal only, dL/dG_ij = -2 W_ij with W = dL/dD2. The host forms
// S = dL/dG + dL/dG^T with its diagonal set to minus its off-diagonal row sums (InvariantSymmetrize), so that
// dL/dP = S P = 2 sum_b (W_ab + W_ba) (P_a - P_b) holds for W as rounded: a diagonal summed separately (from other
// partial sums) would break the translation invariance by ~eps |W| |P|, and |W_ab| grows as 1/rho^2 for samples a
// distance rho apart. With the angle that GEMM is float64 (W has terms ~B times larger than the gradient they sum
// to); for the distance alone it is in the accumulation dtype, on P rounded once (as precise as the official code's
// backward). It is dL/dx itself: the centring's backward subtracts the mean of dL/dP, 0 for a translation-invariant
// loss.
// The gradients are computed in the forward (the Gram-level backward is as cheap as its forward and shares its loop)
// and the autograd backward scales them by grad_loss.
#pragma once

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/ldexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../common/host.h"

namespace kdkernels::pairwise {

enum class Relation { kRkdDistance, kRkdAngle, kSp, kPkt, kCc };
// kCentre: P = x - mean(x) in float64 (RKD, see the top).
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

// What a Gram kernel reads and accumulates into, all in the accumulation dtype (float32; float64 for float64
// features). SP, PKT and CC: Grams [B, B], contiguous and symmetric. RKD: squared distances [B, B] (symmetric,
// 0 on the diagonal and for coincident points) and, with the angle, the hi/lo Grams [B, 2B] (see the top). loss is
// a 0-dim tensor; the dgram tensors, when defined, are [B, B]; all outputs start at zero and kernels add their
// weighted term. A kernel may split the gradient of a symmetric entry between (i, j) and (j, i) as it likes: only
// dG + dG^T is used. RKD kernels need not write the diagonal (the host derives it).
struct GramProblem {
  at::Tensor gram_student, gram_teacher;      // undefined for rkd_distance alone
  at::Tensor sqdist_student, sqdist_teacher;  // RKD only
  at::Tensor loss;
  at::Tensor dgram_student, dgram_teacher;  // undefined when that gradient is not requested
  int64_t batch_size = 0;
  int64_t batch() const { return batch_size; }
};

using GramKernel = void (*)(const GramTerm& term, const GramProblem& problem);

// Coincident points: a squared distance |x_i - x_j|^2 = G_ii + G_jj - 2 G_ij at or below
// kCoincidentUlps * eps(float64) * (G_ii + G_jj) is rounding noise of the float64 Gram formula and counts as exactly
// 0, the official code's zero difference vector (distance: clamp to 1e-12 with zero gradient; angle: zero unit
// vector): samples closer than ~1.7e-7 of their distance to the batch mean, about the resolution of float32 features.
constexpr double kCoincidentUlps = 64.0;
constexpr double kDistanceClamp = 1e-12;    // lenscloth pdist's clamp of squared distances
constexpr double kNormalizeEps = 1e-12;     // F.normalize

inline std::vector<GramTerm> parse_terms(c10::string_view relation, at::ArrayRef<double> params) {
  constexpr const char* op = "pairwise_forward";
  const auto expect = [&](size_t count) {
    TORCH_CHECK_VALUE(params.size() == count, op, ": relation '", std::string(relation), "' takes ", count,
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
    TORCH_CHECK_VALUE(params[0] > 0 && std::isfinite(params[0]), op, ": pkt eps must be positive, got ", params[0]);
    GramTerm term{Relation::kPkt};
    term.eps = params[0];
    return {term};
  }
  if (relation == "cc") {  // (gamma, order, bilinear)
    expect(3);
    TORCH_CHECK_VALUE(std::isfinite(params[0]), op, ": cc gamma must be finite, got ", params[0]);
    TORCH_CHECK_VALUE(params[1] >= 0 && params[1] <= 64 && params[1] == std::floor(params[1]), op,
                      ": cc order must be an integer in [0, 64], got ", params[1]);
    GramTerm term{Relation::kCc};
    term.gamma = params[0];
    term.order = static_cast<int64_t>(params[1]);
    term.bilinear = params[2] != 0.0;
    return {term};
  }
  TORCH_CHECK_VALUE(false, op, ": unknown relation '", std::string(relation),
                    "'; expected one of rkd_distance, rkd_angle, sp, rkd, pkt, cc");
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

inline bool has_angle(const std::vector<GramTerm>& terms) {
  for (const GramTerm& term : terms) {
    if (term.relation == Relation::kRkdAngle) return true;
  }
  return false;
}

using host::accumulation_dtype;

// Features [B, D_s], [B, D_t] (B >= 2, D >= 1) on one device of the kernel's type; float64 only with float64.
// The same checks as kdkernels/ops/_checks.py::check_pairwise_forward (the shared fake and the Triton twin).
inline void check_features(const at::Tensor& student, const at::Tensor& teacher, at::DeviceType device_type) {
  constexpr const char* op = "pairwise_forward";
  host::check_float_pair(op, "student", student, "teacher", teacher);
  const auto check_2d = [&](const char* name, const at::Tensor& x) {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, op, ": ", name,
                      " must be 2-D features [B, D] with D >= 1, got shape ", x.sizes());
  };
  check_2d("student", student);
  check_2d("teacher", teacher);
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0), op, ": teacher must have the student's ", student.size(0),
                    " samples, got ", teacher.size(0));
  TORCH_CHECK_VALUE(student.size(0) >= 2, op, ": a batch relation needs at least 2 samples, got ", student.size(0));
  host::check_device_type(op, "student", student, device_type);
  host::check_same_device(op, "teacher", teacher, "student", student);
}

// Preprocessed features in the accumulation dtype, and what the backward through the preprocessing needs.
struct Prepared {
  at::Tensor features;  // P [B, D], contiguous: the Gram's input
  at::Tensor norms;     // [B, 1] float64 row norms of the raw features (unit preprocessings), else undefined
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

// features -> P: float64 for kCentre, else the accumulation dtype (computed in float64, see the top). `eps` is the
// unit preprocessings' (unit_eps). Devices may fuse it into loops of their own.
using Prepare = Prepared (*)(const at::Tensor& features, Preprocess preprocess, double eps);

inline Prepared prepare_with_aten(const at::Tensor& features, Preprocess preprocess, double eps) {
  if (preprocess == Preprocess::kNone) return {features.to(accumulation_dtype(features)).contiguous(), at::Tensor()};
  const at::Tensor x = features.to(at::kDouble);
  if (preprocess == Preprocess::kCentre) return {(x - x.mean(0, /*keepdim=*/true)).contiguous(), at::Tensor()};
  at::Tensor norms = x.norm(2, {1}, /*keepdim=*/true);
  return {(x / unit_denominators(norms, preprocess, eps)).to(accumulation_dtype(features)).contiguous(), norms};
}

// dL/dx (in `dtype`, contiguous) from dL/dP. Centre: dL/dP itself (see the top). P = x / n' with n' = |x| + eps or
// max(|x|, eps): dL/dx = (dP - P (P.dP) n' / |x|) / n' where the norm is differentiable (|x| > 0, and |x| > eps when
// clamped), else dP / n' (torch's norm backward is 0 at 0); in float64. The device version may overwrite
// grad_prepared.
using PreprocessBackward = at::Tensor (*)(at::Tensor& grad_prepared, const Prepared& prepared, Preprocess preprocess,
                                          double eps, at::ScalarType dtype);

inline at::Tensor preprocess_backward_with_aten(at::Tensor& grad_prepared, const Prepared& prepared,
                                                Preprocess preprocess, double eps, at::ScalarType dtype) {
  at::Tensor grad;
  switch (preprocess) {
    case Preprocess::kCentre:
    case Preprocess::kNone: grad = grad_prepared; break;
    case Preprocess::kUnitPlusEps:
    case Preprocess::kUnitClamped: {
      const at::Tensor unit = prepared.features.to(at::kDouble), &norms = prepared.norms;
      const at::Tensor dp = grad_prepared.to(at::kDouble);
      const at::Tensor denominators = unit_denominators(norms, preprocess, eps);
      const at::Tensor differentiable = preprocess == Preprocess::kUnitPlusEps ? norms > 0 : norms > eps;
      const at::Tensor radial = (unit * dp).sum(1, /*keepdim=*/true) * denominators /
                                norms.clamp_min(std::numeric_limits<double>::min());
      grad = (dp - unit * radial * differentiable) / denominators;
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

// RKD (see the top): (the fixed-point hi/lo Gram [B, 2B] in acc when `split`, else undefined; D2 [B, B] in acc) from
// the float64 P. D2 is 0 on the diagonal and where D2 <= kCoincidentUlps eps(float64) (G_ii + G_jj).
using RkdGram = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& prepared, at::ScalarType acc, bool split);

// The quantum of a hi/lo row whose largest magnitude is `row_max`.
inline double split_quantum(double row_max, at::ScalarType acc) {
  const int digits = acc == at::kDouble ? std::numeric_limits<double>::digits : std::numeric_limits<float>::digits;
  int exponent = 0;
  std::frexp(row_max, &exponent);  // row_max < 2^exponent
  return std::ldexp(1.0, exponent - digits + 4);
}

inline std::tuple<at::Tensor, at::Tensor> rkd_gram_with_aten(const at::Tensor& prepared, at::ScalarType acc,
                                                             bool split) {
  at::Tensor gram = exact_mm(prepared, prepared.t());
  gram = (gram + gram.t()) * 0.5;
  const at::Tensor diagonal = gram.diagonal();
  const at::Tensor sums = diagonal.unsqueeze(1) + diagonal.unsqueeze(0);
  at::Tensor d2 = sums - 2.0 * gram;
  d2.masked_fill_(d2 <= sums * (kCoincidentUlps * std::numeric_limits<double>::epsilon()), 0.0);
  d2.diagonal().zero_();
  if (!split) return {at::Tensor(), d2.to(acc).contiguous()};
  // The rows' split_quantum without a host synchronisation.
  const int digits = acc == at::kDouble ? std::numeric_limits<double>::digits : std::numeric_limits<float>::digits;
  const at::Tensor exponent = std::get<1>(at::frexp(gram.abs().amax(1, /*keepdim=*/true)));
  const at::Tensor q = at::ldexp(at::ones_like(exponent, gram.options()), exponent - (digits - 4));
  const at::Tensor hi = (gram / q).round() * q;
  return {at::cat({hi.to(acc), (gram - hi).to(acc)}, 1).contiguous(), d2.to(acc).contiguous()};
}

// RKD's S = dG + dG^T in `dtype` with its diagonal minus its off-diagonal row sums (summed in float64).
using InvariantSymmetrize = at::Tensor (*)(const at::Tensor& dgram, at::ScalarType dtype);

inline at::Tensor invariant_symmetrize_with_aten(const at::Tensor& dgram, at::ScalarType dtype) {
  at::Tensor s = dgram.to(at::kDouble);
  s = s + s.t();
  s.diagonal().zero_();
  s.diagonal().copy_(-s.sum(1));
  return s.to(dtype);
}

// What a device may do its own way instead of with ATen ops.
struct DeviceHooks {
  SymmetricGram symmetric_gram = &symmetric_gram_with_aten;
  Symmetrize symmetrize = &symmetrize_with_aten;
  Prepare prepare = &prepare_with_aten;
  PreprocessBackward preprocess_backward = &preprocess_backward_with_aten;
  RkdGram rkd_gram = &rkd_gram_with_aten;
  InvariantSymmetrize invariant_symmetrize = &invariant_symmetrize_with_aten;
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
  const bool rkd = preprocess == Preprocess::kCentre, angle = has_angle(terms);
  const at::ScalarType acc = accumulation_dtype(student);
  const double eps = unit_eps(preprocess, terms.front());
  Prepared prepared_student = hooks.prepare(student, preprocess, eps);
  Prepared prepared_teacher = hooks.prepare(teacher, preprocess, eps);

  GramProblem problem;
  problem.batch_size = student.size(0);
  const auto inputs = [&](const Prepared& prepared, at::Tensor& gram, at::Tensor& sqdist) {
    if (rkd) {
      std::tie(gram, sqdist) = hooks.rkd_gram(prepared.features, acc, angle);
    } else {
      gram = hooks.symmetric_gram(prepared.features);
    }
  };
  inputs(prepared_student, problem.gram_student, problem.sqdist_student);
  inputs(prepared_teacher, problem.gram_teacher, problem.sqdist_teacher);
  if (!student_grad) prepared_student = Prepared{};  // no backward: freed before the kernel (at B = 1024 the
  if (!teacher_grad) prepared_teacher = Prepared{};  // float64 P is half a Gram)
  const at::TensorOptions options = student.options().dtype(acc);
  problem.loss = at::zeros({}, options);
  if (student_grad) problem.dgram_student = at::zeros({problem.batch(), problem.batch()}, options);
  if (teacher_grad) problem.dgram_teacher = at::zeros({problem.batch(), problem.batch()}, options);
  for (const GramTerm& term : terms) kernel(term, problem);
  problem.gram_student = problem.gram_teacher = problem.sqdist_student = problem.sqdist_teacher = at::Tensor();

  const auto feature_grad = [&](at::Tensor& dgram, const Prepared& prepared, const at::Tensor& features) {
    if (rkd) {
      const at::Tensor s = hooks.invariant_symmetrize(dgram, angle ? at::kDouble : acc);
      return exact_mm(s, prepared.features.to(s.scalar_type())).to(features.scalar_type());
    }
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
