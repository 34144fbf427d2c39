// CPU Gram-level kernels of the pairwise family: each turns the Gram matrices G = P P^T of the preprocessed student
// and teacher features (pairwise_host.h) into the weighted loss and its gradient dL/dG. Spec:
// kdkernels/reference/pairwise.py. With D2_ij = G_ii + G_jj - 2 G_ij (0 for coincident points) and huber the
// smooth L1 with beta = 1:
//   rkd_distance  d = sqrt(max(D2, 1e-12)) off the diagonal, mu = mean off-diagonal d, L = mean huber(d_s/mu_s - d_t/mu_t)
//   rkd_angle     r = 1/sqrt(D2) (0 on the diagonal and for coincident points),
//                 psi_abc = ((G_bc - G_ab) - (G_ac - G_aa)) r_ab r_ac,  L = mean over B^3 huber(psi_s - psi_t)
//   sp            Gn = G / max(|G_i.|, 1e-12) per row,  L = sum (Gn_t - Gn_s)^2 / B^2
//   pkt           S = (G + 1) / 2 over its row sums,  L = mean S_t log((S_t + eps) / (S_s + eps))
//   cc            K = sum_p exp(-2 gamma) (2 gamma)^p / p! G^p (or K = G),  L = mean (K_s - K_t)^2
// Rows run in parallel; every reduction is per row (or per angle row) in a fixed order, then summed serially, so
// results do not depend on the thread count. The angle never forms a B^3 or B^2 x D tensor: see angle_rows.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <vector>

#include "pairwise_host.h"

namespace kdkernels {
namespace {

using at::vec::Vectorized;
using namespace kdkernels::pairwise;

// Rows of a [B, B] matrix per parallel task: about 32K elements, so that small batches (launch-bound, like eager
// PyTorch's small ops) stay on one thread. The angle's rows are B^2 triples each.
constexpr int64_t kElementsPerTask = 32768;
inline int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
}

template <typename acc_t>
acc_t huber(acc_t x) {
  const acc_t magnitude = std::abs(x);
  return magnitude < acc_t(1) ? acc_t(0.5) * x * x : magnitude - acc_t(0.5);
}

template <typename acc_t>
acc_t huber_grad(acc_t x) {
  return std::min(acc_t(1), std::max(acc_t(-1), x));
}

// A [B, B] matrix of the acc dtype, read or written by row.
template <typename acc_t>
struct Square {
  acc_t* data;
  int64_t n;
  acc_t* row(int64_t i) const { return data + i * n; }
  acc_t& at(int64_t i, int64_t j) const { return data[i * n + j]; }
};

template <typename acc_t>
Square<acc_t> square(const at::Tensor& t) {
  return {t.defined() ? static_cast<acc_t*>(t.data_ptr()) : nullptr, t.defined() ? t.size(0) : 0};
}

// Calls fn(row) for every row of a square matrix in parallel and returns the sum of fn's double results in row order.
template <typename Fn>
double parallel_row_sum(int64_t rows, Fn&& fn) {
  std::vector<double> partial(rows, 0.0);
  at::parallel_for(0, rows, rows_per_task(rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) partial[i] = fn(i);
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0);
}

inline void parallel_rows(int64_t rows, const std::function<void(int64_t)>& fn) {
  at::parallel_for(0, rows, rows_per_task(rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

template <typename acc_t>
acc_t squared_distance(const Square<acc_t>& g, int64_t i, int64_t j) {
  const acc_t diagonal = g.at(i, i) + g.at(j, j);
  const acc_t d2 = diagonal - acc_t(2) * g.at(i, j);
  const acc_t noise = acc_t(kCoincidentUlps) * std::numeric_limits<acc_t>::epsilon() * diagonal;
  return d2 <= noise ? acc_t(0) : d2;
}

void add_loss(const GramProblem& problem, double value) {
  problem.loss.add_(value);
}

// ---------------------------------------------------------------------------------------------------- distance

template <typename acc_t>
struct DistanceSide {
  std::vector<acc_t> d;   // [B, B] clamped distances, 0 on the diagonal
  double mean = 0.0;      // mean off-diagonal distance
};

template <typename acc_t>
DistanceSide<acc_t> distances(const Square<acc_t>& g) {
  const int64_t n = g.n;
  DistanceSide<acc_t> side{std::vector<acc_t>(n * n), 0.0};
  const double total = parallel_row_sum(n, [&](int64_t i) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d = i == j ? acc_t(0) : std::sqrt(std::max(squared_distance(g, i, j), acc_t(kDistanceClamp)));
      side.d[i * n + j] = d;
      sum += d;
    }
    return sum;
  });
  side.mean = total / static_cast<double>(n * n - n);
  return side;
}

// dL/dG of one side from dL/du (u = d / mu): dd = g / mu - (sum g d) / (mu^2 (B^2 - B)), dD2 = dd / (2 d) where the
// clamp passes; D2 = G_ii + G_jj - 2 G_ij with dD2 symmetric, so row i collects 2 sum_j dD2_ij on its diagonal.
template <typename acc_t, typename GradU>
void distance_gram_grad(const Square<acc_t>& g, const DistanceSide<acc_t>& side, GradU&& grad_u, double weight,
                        const Square<acc_t>& dgram) {
  const int64_t n = g.n;
  const double inv_mean = 1.0 / side.mean;
  const double weighted_sum = parallel_row_sum(n, [&](int64_t i) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(grad_u(i, j)) * side.d[i * n + j];
    return sum;
  });
  const double through_mean = weighted_sum * inv_mean * inv_mean / static_cast<double>(n * n - n);
  parallel_rows(n, [&](int64_t i) {
    double diagonal = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i || squared_distance(g, i, j) < acc_t(kDistanceClamp)) continue;
      const double dd = grad_u(i, j) * inv_mean - through_mean;
      const double dd2 = weight * dd / (2.0 * side.d[i * n + j]);
      dgram.at(i, j) -= static_cast<acc_t>(2.0 * dd2);
      diagonal += 2.0 * dd2;
    }
    dgram.at(i, i) += static_cast<acc_t>(diagonal);
  });
}

template <typename acc_t>
void rkd_distance(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const int64_t n = gs.n;
  const DistanceSide<acc_t> s = distances(gs), t = distances(gt);
  const acc_t inv_s = acc_t(1.0 / s.mean), inv_t = acc_t(1.0 / t.mean);
  const auto difference = [&](int64_t i, int64_t j) { return s.d[i * n + j] * inv_s - t.d[i * n + j] * inv_t; };
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += huber(difference(i, j));
    return sum;
  });
  add_loss(problem, term.weight * loss * inv_count);
  if (problem.dgram_student.defined()) {
    distance_gram_grad(gs, s, [&](int64_t i, int64_t j) { return huber_grad(difference(i, j)) * inv_count; },
                       term.weight, square<acc_t>(problem.dgram_student));
  }
  if (problem.dgram_teacher.defined()) {
    distance_gram_grad(gt, t, [&](int64_t i, int64_t j) { return -huber_grad(difference(i, j)) * inv_count; },
                       term.weight, square<acc_t>(problem.dgram_teacher));
  }
}

// ------------------------------------------------------------------------------------------------------- angle

// r_ij = 1 / |x_i - x_j| (0 on the diagonal and for coincident points).
template <typename acc_t>
std::vector<acc_t> inverse_distances(const Square<acc_t>& g) {
  const int64_t n = g.n;
  std::vector<acc_t> r(n * n);
  parallel_rows(n, [&](int64_t i) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d2 = i == j ? acc_t(0) : squared_distance(g, i, j);
      r[i * n + j] = d2 > acc_t(0) ? acc_t(1) / std::sqrt(d2) : acc_t(0);
    }
  });
  return r;
}

// Per-side sums of the angle backward, indexed as in the derivation (g_abc = huber'(psi_s - psi_t), negated for the
// teacher; M_abc = g_abc r_ab r_ac):
//   Q[b][c] = sum_a M_abc,  P[a][b] = sum_c M_abc,  S[a][b] = sum_c g_abc psi_abc.
template <typename acc_t>
struct AngleSums {
  std::vector<acc_t> q, p, s;
  explicit AngleSums(int64_t n) : q(n * n, acc_t(0)), p(n * n, acc_t(0)), s(n * n, acc_t(0)) {}
};

template <typename acc_t>
struct AngleSide {
  Square<acc_t> g;
  const acc_t* r;
  AngleSums<acc_t>* sums;  // null when this side's gradient is not requested
};

// One (anchor a, middle b) row over every c, vectorised. Returns the row's sum of huber(psi_s - psi_t).
template <typename acc_t, bool kStudent, bool kTeacher>
double angle_row(const AngleSide<acc_t>& st, const AngleSide<acc_t>& te, int64_t a, int64_t b, acc_t* q_s,
                 acc_t* q_t) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = st.g.n;
  const acc_t rs_ab = st.r[a * n + b], rt_ab = te.r[a * n + b];
  if (rs_ab == acc_t(0) && rt_ab == acc_t(0)) return 0.0;  // both psi rows are 0: no loss, no gradient
  const Vec gs_base(st.g.at(a, b) - st.g.at(a, a)), gt_base(te.g.at(a, b) - te.g.at(a, a));
  const Vec vs_ab(rs_ab), vt_ab(rt_ab), one(1), minus_one(-1), half(0.5);
  const acc_t *gs_b = st.g.row(b), *gs_a = st.g.row(a), *rs_a = st.r + a * n;
  const acc_t *gt_b = te.g.row(b), *gt_a = te.g.row(a), *rt_a = te.r + a * n;
  Vec loss(0), p_s(0), s_s(0), p_t(0), s_t(0);
  for (int64_t c = 0; c < n; c += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - c);
    // N_abc = (G_bc - G_ab) - (G_ac - G_aa), with the a-terms grouped so that N is exactly 0 for b == a or c == a.
    const Vec ms = Vec::loadu(rs_a + c, count) * vs_ab;
    const Vec mt = Vec::loadu(rt_a + c, count) * vt_ab;
    const Vec psi_s = ((Vec::loadu(gs_b + c, count) - Vec::loadu(gs_a + c, count)) - gs_base) * ms;
    const Vec psi_t = ((Vec::loadu(gt_b + c, count) - Vec::loadu(gt_a + c, count)) - gt_base) * mt;
    const Vec x = psi_s - psi_t;
    const Vec magnitude = x.abs();
    loss = loss + Vec::blendv(magnitude - half, half * x * x, magnitude < one);
    const Vec grad = at::vec::minimum(one, at::vec::maximum(minus_one, x));
    if constexpr (kStudent) {
      const Vec m = grad * ms;
      (Vec::loadu(q_s + c, count) + m).store(q_s + c, count);
      p_s = p_s + m;
      s_s = at::vec::fmadd(grad, psi_s, s_s);
    }
    if constexpr (kTeacher) {
      const Vec m = grad * mt;
      (Vec::loadu(q_t + c, count) - m).store(q_t + c, count);
      p_t = p_t - m;
      s_t = s_t - grad * psi_t;
    }
  }
  const auto total = [](const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](const auto& x, const auto& y) { return x + y; }, v);
  };
  if constexpr (kStudent) {
    st.sums->p[a * n + b] = total(p_s);
    st.sums->s[a * n + b] = total(s_s);
  }
  if constexpr (kTeacher) {
    te.sums->p[a * n + b] = total(p_t);
    te.sums->s[a * n + b] = total(s_t);
  }
  return static_cast<double>(total(loss));
}

// Middle indices b in parallel: each task owns its rows Q[b][.] and the entries P[.][b], S[.][b], so that nothing
// is shared between threads; a block of b rows shares every loaded anchor row a (it stays in cache).
template <typename acc_t, bool kStudent, bool kTeacher>
double angle_rows(const AngleSide<acc_t>& st, const AngleSide<acc_t>& te) {
  const int64_t n = st.g.n;
  std::vector<double> partial(n, 0.0);
  acc_t* q_s = kStudent ? st.sums->q.data() : nullptr;
  acc_t* q_t = kTeacher ? te.sums->q.data() : nullptr;
  at::parallel_for(0, n, rows_per_task(n * n), [&](int64_t begin, int64_t end) {
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = begin; b < end; ++b) {
        partial[b] += angle_row<acc_t, kStudent, kTeacher>(st, te, a, b, q_s ? q_s + b * n : nullptr,
                                                           q_t ? q_t + b * n : nullptr);
      }
    }
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0);
}

// dG from the sums: dG[b][c] += Q[b][c]; dG[a][b] -= 2 P[a][b]; dG[a][a] += sum_b P[a][b]; and through the
// distances, dD2_ab = -r_ab^2 S[a][b]: dG[a][a] += dD2_ab, dG[b][b] += dD2_ab, dG[a][b] -= 2 dD2_ab.
template <typename acc_t>
void angle_gram_grad(const AngleSide<acc_t>& side, double scale, const Square<acc_t>& dgram) {
  const int64_t n = side.g.n;
  const AngleSums<acc_t>& sums = *side.sums;
  std::vector<acc_t> dd2(n * n);
  parallel_rows(n, [&](int64_t a) {
    for (int64_t b = 0; b < n; ++b) {
      const acc_t r = side.r[a * n + b];
      dd2[a * n + b] = -r * r * sums.s[a * n + b];
    }
  });
  parallel_rows(n, [&](int64_t a) {
    double diagonal = 0.0;
    for (int64_t b = 0; b < n; ++b) {
      const double p = sums.p[a * n + b], d = dd2[a * n + b];
      diagonal += p + d + dd2[b * n + a];
      dgram.at(a, b) += static_cast<acc_t>(scale * (static_cast<double>(sums.q[a * n + b]) - 2.0 * (p + d)));
    }
    dgram.at(a, a) += static_cast<acc_t>(scale * diagonal);
  });
}

template <typename acc_t>
void rkd_angle(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const int64_t n = gs.n;
  const std::vector<acc_t> rs = inverse_distances(gs), rt = inverse_distances(gt);
  const bool student = problem.dgram_student.defined(), teacher = problem.dgram_teacher.defined();
  std::unique_ptr<AngleSums<acc_t>> sums_s(student ? new AngleSums<acc_t>(n) : nullptr);
  std::unique_ptr<AngleSums<acc_t>> sums_t(teacher ? new AngleSums<acc_t>(n) : nullptr);
  const AngleSide<acc_t> st{gs, rs.data(), sums_s.get()}, te{gt, rt.data(), sums_t.get()};
  double loss;
  if (student && teacher) loss = angle_rows<acc_t, true, true>(st, te);
  else if (student) loss = angle_rows<acc_t, true, false>(st, te);
  else if (teacher) loss = angle_rows<acc_t, false, true>(st, te);
  else loss = angle_rows<acc_t, false, false>(st, te);
  const double scale = term.weight / (static_cast<double>(n) * n * n);
  add_loss(problem, loss * scale);
  if (student) angle_gram_grad(st, scale, square<acc_t>(problem.dgram_student));
  if (teacher) angle_gram_grad(te, scale, square<acc_t>(problem.dgram_teacher));
}

// ------------------------------------------------------------------------------------------------- row-wise terms

// Gn = G / max(|G_i.|, 1e-12) of one row into `out`; returns the row's norm.
template <typename acc_t>
double normalized_row(const Square<acc_t>& g, int64_t i, std::vector<acc_t>& out) {
  double sum = 0.0;
  for (int64_t j = 0; j < g.n; ++j) sum += static_cast<double>(g.at(i, j)) * g.at(i, j);
  const double norm = std::sqrt(sum), inverse = 1.0 / std::max(norm, kNormalizeEps);
  for (int64_t j = 0; j < g.n; ++j) out[j] = static_cast<acc_t>(g.at(i, j) * inverse);
  return norm;
}

// dL/dG of a row normalised by max(|G_i.|, eps) from dL/dGn: (dGn - Gn (Gn . dGn)) / |G_i.| when the norm passes
// the clamp, else dGn / eps.
template <typename acc_t>
void normalized_row_grad(const std::vector<acc_t>& gn, const std::vector<double>& dgn, double norm, double weight,
                         acc_t* dgram_row) {
  const int64_t n = static_cast<int64_t>(gn.size());
  double radial = 0.0;
  if (norm >= kNormalizeEps) {
    for (int64_t j = 0; j < n; ++j) radial += gn[j] * dgn[j];
  }
  const double inverse = 1.0 / std::max(norm, kNormalizeEps);
  for (int64_t j = 0; j < n; ++j) dgram_row[j] += static_cast<acc_t>(weight * (dgn[j] - gn[j] * radial) * inverse);
}

template <typename acc_t>
void sp(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    std::vector<acc_t> ns(n), nt(n);
    const double norm_s = normalized_row(gs, i, ns), norm_t = normalized_row(gt, i, nt);
    std::vector<double> grad(n);
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double difference = static_cast<double>(nt[j]) - ns[j];
      sum += difference * difference;
      grad[j] = -2.0 * difference * inv_count;
    }
    if (dgs.data != nullptr) normalized_row_grad(ns, grad, norm_s, term.weight, dgs.row(i));
    if (dgt.data != nullptr) {
      for (double& x : grad) x = -x;
      normalized_row_grad(nt, grad, norm_t, term.weight, dgt.row(i));
    }
    return sum;
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// S = (G + 1) / 2 of one row divided by its sum into `out`; returns the row sum.
template <typename acc_t>
double pkt_row(const Square<acc_t>& g, int64_t i, std::vector<double>& out) {
  double sum = 0.0;
  for (int64_t j = 0; j < g.n; ++j) sum += out[j] = (static_cast<double>(g.at(i, j)) + 1.0) * 0.5;
  for (int64_t j = 0; j < g.n; ++j) out[j] /= sum;
  return sum;
}

// dL/dG of a PKT row from dL/dP: dS = (dP - sum(dP P)) / rowsum, dG = dS / 2.
template <typename acc_t>
void pkt_row_grad(const std::vector<double>& p, const std::vector<double>& dp, double row_sum, double weight,
                  acc_t* dgram_row) {
  double dot = 0.0;
  for (size_t j = 0; j < p.size(); ++j) dot += dp[j] * p[j];
  const double scale = weight * 0.5 / row_sum;
  for (size_t j = 0; j < p.size(); ++j) dgram_row[j] += static_cast<acc_t>(scale * (dp[j] - dot));
}

template <typename acc_t>
void pkt(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const double eps = term.eps, inv_count = 1.0 / static_cast<double>(n * n);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    std::vector<double> ps(n), pt(n), grad(n);
    const double sum_s = pkt_row(gs, i, ps), sum_t = pkt_row(gt, i, pt);
    double total = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      // log((t + eps) / (s + eps)) as log1p of the relative difference: exact when t = s.
      const double log_ratio = std::log1p((pt[j] - ps[j]) / (ps[j] + eps));
      total += pt[j] * log_ratio;
      grad[j] = log_ratio;
    }
    if (dgs.data != nullptr) {
      std::vector<double> dp(n);
      for (int64_t j = 0; j < n; ++j) dp[j] = -pt[j] / (ps[j] + eps) * inv_count;
      pkt_row_grad(ps, dp, sum_s, term.weight, dgs.row(i));
    }
    if (dgt.data != nullptr) {
      for (int64_t j = 0; j < n; ++j) grad[j] = (grad[j] + pt[j] / (pt[j] + eps)) * inv_count;
      pkt_row_grad(pt, grad, sum_t, term.weight, dgt.row(i));
    }
    return total;
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// K(G) and K'(G) of the CC kernel: the Taylor series of the Gaussian RBF by Horner's rule, or the identity.
struct CorrelationKernel {
  std::vector<double> coefficients;  // c_p = exp(-2 gamma) (2 gamma)^p / p!
  bool bilinear;

  explicit CorrelationKernel(const GramTerm& term) : bilinear(term.bilinear) {
    double c = std::exp(-2.0 * term.gamma);
    for (int64_t p = 0; p <= term.order; ++p) {
      coefficients.push_back(c);
      c *= 2.0 * term.gamma / static_cast<double>(p + 1);
    }
  }
  double value(double x) const {
    if (bilinear) return x;
    double result = 0.0;
    for (auto c = coefficients.rbegin(); c != coefficients.rend(); ++c) result = result * x + *c;
    return result;
  }
  double derivative(double x) const {
    if (bilinear) return 1.0;
    double result = 0.0;
    for (size_t p = coefficients.size() - 1; p >= 1; --p) result = result * x + static_cast<double>(p) * coefficients[p];
    return result;
  }
};

template <typename acc_t>
void cc(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const CorrelationKernel kernel(term);
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double x_s = gs.at(i, j), x_t = gt.at(i, j);
      const double difference = kernel.value(x_s) - kernel.value(x_t);
      sum += difference * difference;
      const double grad = 2.0 * difference * inv_count * term.weight;
      if (dgs.data != nullptr) dgs.at(i, j) += static_cast<acc_t>(grad * kernel.derivative(x_s));
      if (dgt.data != nullptr) dgt.at(i, j) -= static_cast<acc_t>(grad * kernel.derivative(x_t));
    }
    return sum;
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// ------------------------------------------------------------------------------------------------- registration

template <typename acc_t>
void run_term(const GramTerm& term, const GramProblem& problem) {
  switch (term.relation) {
    case Relation::kRkdDistance: return rkd_distance<acc_t>(term, problem);
    case Relation::kRkdAngle: return rkd_angle<acc_t>(term, problem);
    case Relation::kSp: return sp<acc_t>(term, problem);
    case Relation::kPkt: return pkt<acc_t>(term, problem);
    case Relation::kCc: return cc<acc_t>(term, problem);
  }
}

void cpu_gram_kernel(const GramTerm& term, const GramProblem& problem) {
  if (problem.gram_student.scalar_type() == at::kDouble) {
    run_term<double>(term, problem);
  } else {
    run_term<float>(term, problem);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_forward_cpu(const at::Tensor& student,
                                                                    const at::Tensor& teacher,
                                                                    c10::string_view relation,
                                                                    at::ArrayRef<double> params, bool student_grad,
                                                                    bool teacher_grad) {
  return relation_forward(student, teacher, relation, params, student_grad, teacher_grad, at::kCPU,
                          &cpu_gram_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("pairwise_forward", &pairwise_forward_cpu); }

}  // namespace kdkernels
