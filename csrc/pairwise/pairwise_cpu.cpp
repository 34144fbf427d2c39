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
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

// Rows of a [B, B] matrix per parallel task: about 32K elements, so that the B^2 passes of B = 256 (tens of
// microseconds each) run on two threads: the GEMM before them leaves the Gram spread over both cores' caches, and
// the OpenMP workers are still spinning from it (measured on 2 cores: 256K elements per task, one thread, was
// 10-20 % slower end to end). The angle's rows are B^2 triples each.
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
// fn goes through std::function (as in parallel_rows) so that it is compiled once: at::parallel_for calls it from a
// serial and a parallel site, and two inlined copies may contract different multiply-adds into FMAs, which made the
// results depend on the thread count.
inline double parallel_row_sum(int64_t rows, const std::function<double(int64_t)>& fn) {
  std::vector<double> partial(rows, 0.0);
  at::parallel_for(0, rows, rows_per_task(rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) partial[i] = fn(i);
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0);
}

// Calls fn(row) for every row of a [rows, cols] matrix (square by default) in parallel.
inline void parallel_rows(int64_t rows, const std::function<void(int64_t)>& fn, int64_t cols = 0) {
  at::parallel_for(0, rows, rows_per_task(cols > 0 ? cols : rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

void add_loss(const GramProblem& problem, double value) {
  problem.loss.add_(value);
}

// ---------------------------------------------------------------------------------------------------- distance

// Vectorised walk over the columns of one row: fn(c, count) for blocks of Vec::size() (count < size at the end).
template <typename acc_t, typename Fn>
void for_each_block(int64_t n, Fn&& fn) {
  for (int64_t c = 0; c < n; c += Vectorized<acc_t>::size()) {
    fn(c, std::min<int64_t>(Vectorized<acc_t>::size(), n - c));
  }
}

template <typename acc_t>
double reduce_sum(const Vectorized<acc_t>& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<acc_t>([](const auto& x, const auto& y) { return x + y; }, v));
}

template <typename acc_t>
Vectorized<acc_t> huber_vec(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  const Vec magnitude = x.abs(), half(0.5);
  return Vec::blendv(magnitude - half, half * x * x, magnitude < Vec(1));
}

template <typename acc_t>
Vectorized<acc_t> huber_grad_vec(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  return at::vec::minimum(Vec(1), at::vec::maximum(Vec(-1), x));
}

template <typename acc_t>
std::vector<acc_t> diagonal(const Square<acc_t>& g) {
  std::vector<acc_t> result(g.n);
  for (int64_t i = 0; i < g.n; ++i) result[i] = g.at(i, i);
  return result;
}

// Squared distances of row i to a block of columns, with Gram rounding noise snapped to 0 (coincident points).
template <typename acc_t>
Vectorized<acc_t> squared_distances(const Square<acc_t>& g, const acc_t* diag, int64_t i, int64_t c, int64_t count) {
  using Vec = Vectorized<acc_t>;
  const Vec sums = Vec(g.at(i, i)) + Vec::loadu(diag + c, count);
  const Vec d2 = sums - Vec(2) * Vec::loadu(g.row(i) + c, count);
  const Vec noise = Vec(acc_t(kCoincidentUlps) * std::numeric_limits<acc_t>::epsilon()) * sums;
  return Vec::blendv(d2, Vec(0), d2 <= noise);
}

template <typename acc_t>
struct DistanceSide {
  std::vector<acc_t> d;   // [B, B] clamped distances, 0 on the diagonal
  std::vector<acc_t> passes;  // [B, B] 1 where the clamp passes the gradient (off the diagonal), else 0
  double mean = 0.0;      // mean off-diagonal distance
};

template <typename acc_t>
DistanceSide<acc_t> distances(const Square<acc_t>& g) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = g.n;
  const std::vector<acc_t> diag = diagonal(g);
  DistanceSide<acc_t> side{std::vector<acc_t>(n * n), std::vector<acc_t>(n * n), 0.0};
  const double total = parallel_row_sum(n, [&](int64_t i) {
    Vec sum(0);
    acc_t* d_row = side.d.data() + i * n;
    acc_t* pass_row = side.passes.data() + i * n;
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec d2 = squared_distances(g, diag.data(), i, c, count);
      const Vec d = at::vec::maximum(d2, Vec(acc_t(kDistanceClamp))).sqrt();
      d.store(d_row + c, count);
      Vec::blendv(Vec(0), Vec(1), d2 >= Vec(acc_t(kDistanceClamp))).store(pass_row + c, count);
      sum = sum + Vec::set(Vec(0), d, count);
    });
    const double diagonal_distance = d_row[i];
    d_row[i] = acc_t(0);
    pass_row[i] = acc_t(0);
    return reduce_sum(sum) - diagonal_distance;
  });
  side.mean = total / static_cast<double>(n * n - n);
  return side;
}

// dL/dG of one side from g = dL/du (u = d / mu): dd = g / mu - (sum g d) / (mu^2 (B^2 - B)), dD2 = dd / (2 d) where
// the clamp passes; D2 = G_ii + G_jj - 2 G_ij with dD2 symmetric, so row i collects 2 sum_j dD2_ij on its diagonal.
template <typename acc_t>
void distance_gram_grad(const DistanceSide<acc_t>& side, const std::vector<acc_t>& grad_u, double weighted_sum,
                        double weight, const Square<acc_t>& dgram) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = dgram.n;
  const double inv_mean = 1.0 / side.mean;
  const Vec through_mean(static_cast<acc_t>(weighted_sum * inv_mean * inv_mean / static_cast<double>(n * n - n)));
  const Vec v_inv_mean(static_cast<acc_t>(inv_mean)), half_weight(static_cast<acc_t>(0.5 * weight)), two(2);
  parallel_rows(n, [&](int64_t i) {
    Vec diagonal_sum(0);
    const int64_t row = i * n;
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec dd = Vec::loadu(grad_u.data() + row + c, count) * v_inv_mean - through_mean;
      const Vec passes = Vec::loadu(side.passes.data() + row + c, count);
      const Vec d = Vec::blendv(Vec(1), Vec::loadu(side.d.data() + row + c, count), passes > Vec(0));
      const Vec dd2 = half_weight * dd / d * passes;
      (Vec::loadu(dgram.row(i) + c, count) - two * dd2).store(dgram.row(i) + c, count);
      diagonal_sum = diagonal_sum + Vec::set(Vec(0), dd2, count);
    });
    dgram.at(i, i) += static_cast<acc_t>(2.0 * reduce_sum(diagonal_sum));
  });
}

template <typename acc_t>
void rkd_distance(const GramTerm& term, const GramProblem& problem) {
  using Vec = Vectorized<acc_t>;
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const int64_t n = gs.n;
  const DistanceSide<acc_t> s = distances(gs), t = distances(gt);
  const Vec inv_s(static_cast<acc_t>(1.0 / s.mean)), inv_t(static_cast<acc_t>(1.0 / t.mean));
  const bool student = problem.dgram_student.defined(), teacher = problem.dgram_teacher.defined();
  std::vector<acc_t> grad_u(student || teacher ? n * n : 0);  // huber'(u), u = d_s / mu_s - d_t / mu_t
  std::vector<double> weighted_s(n, 0.0), weighted_t(n, 0.0);  // per row: sum g d_s, sum g d_t
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    Vec sum(0), sum_s(0), sum_t(0);
    const int64_t row = i * n;
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec d_s = Vec::loadu(s.d.data() + row + c, count), d_t = Vec::loadu(t.d.data() + row + c, count);
      const Vec u = d_s * inv_s - d_t * inv_t;
      sum = sum + huber_vec(u);
      if (!grad_u.empty()) {
        const Vec g = huber_grad_vec(u);
        g.store(grad_u.data() + row + c, count);
        sum_s = at::vec::fmadd(g, d_s, sum_s);
        sum_t = at::vec::fmadd(g, d_t, sum_t);
      }
    });
    weighted_s[i] = reduce_sum(sum_s);
    weighted_t[i] = reduce_sum(sum_t);
    return reduce_sum(sum);
  });
  const double inv_count = 1.0 / static_cast<double>(n * n);
  add_loss(problem, term.weight * loss * inv_count);
  const auto total = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0); };
  if (student) {
    distance_gram_grad(s, grad_u, total(weighted_s), term.weight * inv_count,
                       square<acc_t>(problem.dgram_student));
  }
  if (teacher) {
    for (acc_t& g : grad_u) g = -g;
    distance_gram_grad(t, grad_u, -total(weighted_t), term.weight * inv_count,
                       square<acc_t>(problem.dgram_teacher));
  }
}

// ------------------------------------------------------------------------------------------------------- angle

// r_ij = 1 / |x_i - x_j| (0 on the diagonal and for coincident points).
template <typename acc_t>
std::vector<acc_t> inverse_distances(const Square<acc_t>& g) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = g.n;
  const std::vector<acc_t> diag = diagonal(g);
  std::vector<acc_t> r(n * n);
  parallel_rows(n, [&](int64_t i) {
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec d2 = squared_distances(g, diag.data(), i, c, count);
      Vec::blendv(Vec(0), d2.rsqrt(), d2 > Vec(0)).store(r.data() + i * n + c, count);
    });
    r[i * n + i] = acc_t(0);
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

// One (anchor a, middle b) row over every c, vectorised. Returns the row's sum of huber(psi_s - psi_t). Not inlined,
// so that the serial and the parallel call sites of angle_rows run the same code (see parallel_row_sum).
template <typename acc_t, bool kStudent, bool kTeacher>
C10_NOINLINE double angle_row(const AngleSide<acc_t>& st, const AngleSide<acc_t>& te, int64_t a, int64_t b, acc_t* q_s,
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

template <typename acc_t>
double row_sum_of_squares(const acc_t* row, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec sum(0);
  for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
    const Vec x = Vec::loadu(row + c, count);
    sum = at::vec::fmadd(x, x, sum);
  });
  return reduce_sum(sum);
}

// The sum of a row in double, in a fixed order: blocks widened to double vectors.
template <typename acc_t>
double row_sum(const acc_t* row, int64_t n) {
  using Wide = Vectorized<double>;
  constexpr int64_t kWidth = Wide::size();
  alignas(64) double wide[kWidth];
  Wide sum(0.0);
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) {
    for (int64_t k = 0; k < kWidth; ++k) wide[k] = static_cast<double>(row[c + k]);
    sum = sum + Wide::loadu(wide);
  }
  double tail = 0.0;
  for (; c < n; ++c) tail += static_cast<double>(row[c]);
  return reduce_sum(sum) + tail;
}

// row[0, n) += value.
template <typename acc_t>
void add_to_row(acc_t* row, int64_t n, acc_t value) {
  using Vec = Vectorized<acc_t>;
  const Vec v(value);
  for_each_block<acc_t>(n, [&](int64_t c, int64_t count) { (Vec::loadu(row + c, count) + v).store(row + c, count); });
}

// SP row i, with Gn = G / max(|G_i.|, 1e-12) and diff = Gn_t - Gn_s: loss sum diff^2; through the row normalisation
// (its norm differentiable where it passes the clamp), dG = (dGn - Gn (Gn . dGn)) / max(|G_i.|, eps) with
// dGn_s = -2 diff / B^2 and dGn_t = 2 diff / B^2. Three passes over the row: both norms, the loss and the two
// radial sums, the gradients.
template <typename acc_t>
void sp(const GramTerm& term, const GramProblem& problem) {
  using Vec = Vectorized<acc_t>;
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    const acc_t *gs_row = gs.row(i), *gt_row = gt.row(i);
    Vec squares_s(0), squares_t(0);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec x_s = Vec::loadu(gs_row + c, count), x_t = Vec::loadu(gt_row + c, count);
      squares_s = at::vec::fmadd(x_s, x_s, squares_s);
      squares_t = at::vec::fmadd(x_t, x_t, squares_t);
    });
    const double norm_s = std::sqrt(reduce_sum(squares_s)), norm_t = std::sqrt(reduce_sum(squares_t));
    const double inverse_s = 1.0 / std::max(norm_s, kNormalizeEps), inverse_t = 1.0 / std::max(norm_t, kNormalizeEps);
    const Vec inv_s(static_cast<acc_t>(inverse_s)), inv_t(static_cast<acc_t>(inverse_t));
    Vec sum(0), radial_s(0), radial_t(0);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec ns = Vec::loadu(gs_row + c, count) * inv_s, nt = Vec::loadu(gt_row + c, count) * inv_t;
      const Vec diff = nt - ns;
      sum = at::vec::fmadd(diff, diff, sum);
      radial_s = at::vec::fmadd(ns, diff, radial_s);
      radial_t = at::vec::fmadd(nt, diff, radial_t);
    });
    // dG = scale * (diff - Gn * radial) with scale = sign * 2 weight / (B^2 |G_i.|); radial 0 where the clamp stops
    // the norm's gradient.
    const auto side_scale = [&](double inverse, double sign) {
      return Vec(static_cast<acc_t>(sign * 2.0 * inv_count * term.weight * inverse));
    };
    const auto side_radial = [&](double norm, const Vec& radial) {
      return Vec(static_cast<acc_t>(norm >= kNormalizeEps ? reduce_sum(radial) : 0.0));
    };
    const Vec scale_s = side_scale(inverse_s, -1.0), scale_t = side_scale(inverse_t, 1.0);
    const Vec own_s = side_radial(norm_s, radial_s), own_t = side_radial(norm_t, radial_t);
    acc_t *ds_row = dgs.data != nullptr ? dgs.row(i) : nullptr, *dt_row = dgt.data != nullptr ? dgt.row(i) : nullptr;
    if (ds_row == nullptr && dt_row == nullptr) return reduce_sum(sum);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec ns = Vec::loadu(gs_row + c, count) * inv_s, nt = Vec::loadu(gt_row + c, count) * inv_t;
      const Vec diff = nt - ns;
      if (ds_row != nullptr) {
        (Vec::loadu(ds_row + c, count) + scale_s * (diff - ns * own_s)).store(ds_row + c, count);
      }
      if (dt_row != nullptr) {
        (Vec::loadu(dt_row + c, count) + scale_t * (diff - nt * own_t)).store(dt_row + c, count);
      }
    });
    return reduce_sum(sum);
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// PKT row i, with P = (G + 1) / (2 R), R the row sum of (G + 1) / 2, and r = log((P_t + eps) / (P_s + eps)):
// loss sum P_t r; dP_s = -P_t / (P_s + eps) / B^2, dP_t = (r + P_t / (P_t + eps)) / B^2; through the row
// normalisation, dG = (dP - sum(dP P)) / (2 R). Vectorised in acc_t with the row sums in double; r is formed as
// log1p((P_t - P_s) / (P_s + eps)) with the difference from one fused multiply-add, so that it stays accurate when
// the two rows agree (the loss is a KL-like sum of terms of both signs). One pass writes dP / (2 R B^2) and
// accumulates sum(dP P); a cheap second one subtracts that row constant.
template <typename acc_t>
void pkt(const GramTerm& term, const GramProblem& problem) {
  using Vec = Vectorized<acc_t>;
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const Vec eps(static_cast<acc_t>(term.eps)), one(1);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    const acc_t *gs_row = gs.row(i), *gt_row = gt.row(i);
    acc_t *ds_row = dgs.data != nullptr ? dgs.row(i) : nullptr, *dt_row = dgt.data != nullptr ? dgt.row(i) : nullptr;
    const double half_sum_s = 0.5 * (row_sum(gs_row, n) + static_cast<double>(n));  // R
    const double half_sum_t = 0.5 * (row_sum(gt_row, n) + static_cast<double>(n));
    const Vec scale_s(static_cast<acc_t>(0.5 / half_sum_s)), scale_t(static_cast<acc_t>(0.5 / half_sum_t));
    // dG = weight * (dP - sum(dP P)) / (2 R B^2), with dP here without its 1 / B^2
    const double weight_s = term.weight * inv_count * 0.5 / half_sum_s;
    const double weight_t = term.weight * inv_count * 0.5 / half_sum_t;
    const Vec v_weight_s(static_cast<acc_t>(weight_s)), v_weight_t(static_cast<acc_t>(weight_t));
    Vec sum(0), dot_s(0), dot_t(0);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec x_s = Vec::loadu(gs_row + c, count) + one, x_t = Vec::loadu(gt_row + c, count) + one;
      const Vec p_s = x_s * scale_s, p_t = x_t * scale_t;
      const Vec inv_s = one / (p_s + eps);
      const Vec r = (at::vec::fmadd(x_t, scale_t, Vec(0) - p_s) * inv_s).log1p();
      sum = sum + Vec::set(Vec(0), p_t * r, count);
      if (ds_row != nullptr) {
        const Vec grad = Vec(0) - p_t * inv_s;
        dot_s = dot_s + Vec::set(Vec(0), grad * p_s, count);
        at::vec::fmadd(v_weight_s, grad, Vec::loadu(ds_row + c, count)).store(ds_row + c, count);
      }
      if (dt_row != nullptr) {
        const Vec grad = r + p_t / (p_t + eps);
        dot_t = dot_t + Vec::set(Vec(0), grad * p_t, count);
        at::vec::fmadd(v_weight_t, grad, Vec::loadu(dt_row + c, count)).store(dt_row + c, count);
      }
    });
    if (ds_row != nullptr) add_to_row(ds_row, n, static_cast<acc_t>(-weight_s * reduce_sum(dot_s)));
    if (dt_row != nullptr) add_to_row(dt_row, n, static_cast<acc_t>(-weight_t * reduce_sum(dot_t)));
    return reduce_sum(sum);
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// K(G) and K'(G) of the CC kernel: the Taylor series of the Gaussian RBF by Horner's rule, or the identity.
template <typename acc_t>
struct CorrelationKernel {
  using Vec = Vectorized<acc_t>;
  std::vector<acc_t> coefficients;  // c_p = exp(-2 gamma) (2 gamma)^p / p!
  bool bilinear;

  explicit CorrelationKernel(const GramTerm& term) : bilinear(term.bilinear) {
    double c = std::exp(-2.0 * term.gamma);
    for (int64_t p = 0; p <= term.order; ++p) {
      coefficients.push_back(static_cast<acc_t>(c));
      c *= 2.0 * term.gamma / static_cast<double>(p + 1);
    }
  }
  Vec value(const Vec& x) const {
    if (bilinear) return x;
    Vec result(0);
    for (auto c = coefficients.rbegin(); c != coefficients.rend(); ++c) result = at::vec::fmadd(result, x, Vec(*c));
    return result;
  }
  Vec derivative(const Vec& x) const {
    if (bilinear) return Vec(1);
    Vec result(0);
    for (size_t p = coefficients.size() - 1; p >= 1; --p) {
      result = at::vec::fmadd(result, x, Vec(static_cast<acc_t>(p) * coefficients[p]));
    }
    return result;
  }
};

// CC: loss sum (K_s - K_t)^2 / B^2, dG_s = 2 (K_s - K_t) K'(G_s) / B^2, dG_t = -2 (K_s - K_t) K'(G_t) / B^2.
template <typename acc_t>
void cc(const GramTerm& term, const GramProblem& problem) {
  using Vec = Vectorized<acc_t>;
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const CorrelationKernel<acc_t> kernel(term);
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const Vec scale(static_cast<acc_t>(2.0 * inv_count * term.weight));
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    Vec sum(0);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec x_s = Vec::loadu(gs.row(i) + c, count), x_t = Vec::loadu(gt.row(i) + c, count);
      const Vec difference = Vec::set(Vec(0), kernel.value(x_s) - kernel.value(x_t), count);
      sum = at::vec::fmadd(difference, difference, sum);
      if (dgs.data != nullptr) {
        const Vec step = scale * difference * kernel.derivative(x_s);
        (Vec::loadu(dgs.row(i) + c, count) + step).store(dgs.row(i) + c, count);
      }
      if (dgt.data != nullptr) {
        const Vec step = scale * difference * kernel.derivative(x_t);
        (Vec::loadu(dgt.row(i) + c, count) - step).store(dgt.row(i) + c, count);
      }
    });
    return reduce_sum(sum);
  });
  add_loss(problem, term.weight * loss * inv_count);
}

// ------------------------------------------------------------------------------------------------- preprocessing
// prepare_with_aten and preprocess_backward_with_aten of pairwise_host.h in one or two passes over the features
// instead of 3 to 10 ATen ops (each costs about as much as the pass at B = 256); float16 and bfloat16 features are
// widened by ATen first.

// Column means of a [rows, cols] matrix, summed in double over the rows in order.
template <typename acc_t>
std::vector<double> column_means(const acc_t* x, int64_t rows, int64_t cols) {
  std::vector<double> sum(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* row = x + i * cols;
    for (int64_t j = 0; j < cols; ++j) sum[j] += static_cast<double>(row[j]);
  }
  for (double& value : sum) value /= static_cast<double>(rows);
  return sum;
}

// out = x minus its column means; out may be x.
template <typename acc_t>
void subtract_column_means(const acc_t* x, acc_t* out, int64_t rows, int64_t cols) {
  const std::vector<double> means = column_means(x, rows, cols);
  parallel_rows(rows, [&](int64_t i) {
    const acc_t* row = x + i * cols;
    acc_t* out_row = out + i * cols;
    for (int64_t j = 0; j < cols; ++j) out_row[j] = static_cast<acc_t>(static_cast<double>(row[j]) - means[j]);
  }, cols);
}

template <typename acc_t>
double row_dot(const acc_t* x, const acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec sum(0);
  for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
    sum = at::vec::fmadd(Vec::loadu(x + c, count), Vec::loadu(y + c, count), sum);
  });
  return reduce_sum(sum);
}

// n' of a unit preprocessing: |x| + eps or max(|x|, eps).
inline double unit_denominator(double norm, Preprocess preprocess, double eps) {
  return preprocess == Preprocess::kUnitPlusEps ? norm + eps : std::max(norm, eps);
}

// P = x / n' per row, and the norms |x|.
template <typename acc_t>
void unit_rows(const acc_t* x, acc_t* out, acc_t* norms, int64_t rows, int64_t cols, Preprocess preprocess,
               double eps) {
  using Vec = Vectorized<acc_t>;
  parallel_rows(rows, [&](int64_t i) {
    const acc_t* row = x + i * cols;
    acc_t* out_row = out + i * cols;
    const double norm = std::sqrt(row_sum_of_squares(row, cols));
    norms[i] = static_cast<acc_t>(norm);
    const Vec inverse(static_cast<acc_t>(1.0 / unit_denominator(norm, preprocess, eps)));
    for_each_block<acc_t>(cols, [&](int64_t c, int64_t count) {
      (Vec::loadu(row + c, count) * inverse).store(out_row + c, count);
    });
  }, cols);
}

// dL/dx = (dP - P (P.dP) n' / |x|) / n' in place of dP, the radial term only where the norm is differentiable.
template <typename acc_t>
void unit_rows_backward(acc_t* grad, const acc_t* unit, const acc_t* norms, int64_t rows, int64_t cols,
                        Preprocess preprocess, double eps) {
  using Vec = Vectorized<acc_t>;
  parallel_rows(rows, [&](int64_t i) {
    acc_t* grad_row = grad + i * cols;
    const acc_t* unit_row = unit + i * cols;
    const double norm = norms[i], denominator = unit_denominator(norm, preprocess, eps);
    const bool differentiable = preprocess == Preprocess::kUnitPlusEps ? norm > 0.0 : norm > eps;
    const Vec radial(static_cast<acc_t>(differentiable ? row_dot(unit_row, grad_row, cols) * denominator / norm : 0.0));
    const Vec inverse(static_cast<acc_t>(1.0 / denominator));
    for_each_block<acc_t>(cols, [&](int64_t c, int64_t count) {
      const Vec g = Vec::loadu(grad_row + c, count) - Vec::loadu(unit_row + c, count) * radial;
      (g * inverse).store(grad_row + c, count);
    });
  }, cols);
}

Prepared cpu_prepare(const at::Tensor& features, Preprocess preprocess, double eps) {
  at::Tensor x = features.to(accumulation_dtype(features)).contiguous();
  if (preprocess == Preprocess::kNone) return {x, at::Tensor()};
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty_like(x);
  at::Tensor norms = is_unit(preprocess) ? at::empty({rows, 1}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_prepare", [&] {
    if (preprocess == Preprocess::kCentre) {
      subtract_column_means(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, cols);
    } else {
      unit_rows(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), rows, cols,
                preprocess, eps);
    }
  });
  return {out, norms};
}

at::Tensor cpu_preprocess_backward(at::Tensor& grad_prepared, const Prepared& prepared, Preprocess preprocess,
                                   double eps, at::ScalarType dtype) {
  at::Tensor grad = grad_prepared.contiguous();
  const int64_t rows = grad.size(0), cols = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "pairwise_preprocess_backward", [&] {
    scalar_t* data = grad.data_ptr<scalar_t>();
    if (preprocess == Preprocess::kCentre) {
      subtract_column_means(data, data, rows, cols);
    } else if (is_unit(preprocess)) {
      unit_rows_backward(data, prepared.features.data_ptr<scalar_t>(), prepared.norms.data_ptr<scalar_t>(), rows,
                         cols, preprocess, eps);
    }
  });
  return grad.to(dtype);
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

// (m + m^T) * scale in place over kTile x kTile tiles of the upper triangle and their mirrors, which move through
// a vector transpose (a column walk at a power-of-two row length maps every element to one cache set).
template <typename acc_t>
void symmetrize_tile_pair(acc_t* m, int64_t n, int64_t i0, int64_t j0, acc_t scale) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kTile = 16;
  const int rows = static_cast<int>(std::min(kTile, n - i0)), cols = static_cast<int>(std::min(kTile, n - j0));
  alignas(64) acc_t mirror[kTile * kTile];  // mirror[r][c] = m[j0 + c][i0 + r]
  at::vec::transpose_mxn<acc_t>(m + j0 * n + i0, n, mirror, kTile, cols, rows);
  const Vec v_scale(scale);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* upper = m + (i0 + r) * n + j0;
    for (int64_t c = 0; c < cols; c += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), cols - c);
      ((Vec::loadu(upper + c, count) + Vec::loadu(mirror + r * kTile + c, count)) * v_scale).store(upper + c, count);
    }
  }
  if (i0 != j0) at::vec::transpose_mxn<acc_t>(m + i0 * n + j0, n, m + j0 * n + i0, n, rows, cols);
}

// The strict lower triangle of m <- its upper triangle, tile by tile (the diagonal tiles element by element).
template <typename acc_t>
void mirror_upper_square(acc_t* m, int64_t n) {
  constexpr int64_t kTile = 16;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, rows_per_task(n * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t i0 = ti * kTile, rows = std::min(kTile, n - i0);
      for (int64_t r = 1; r < rows; ++r) {
        for (int64_t c = 0; c < r; ++c) m[(i0 + r) * n + i0 + c] = m[(i0 + c) * n + i0 + r];
      }
      for (int64_t j0 = i0 + kTile; j0 < n; j0 += kTile) {
        at::vec::transpose_mxn<acc_t>(m + i0 * n + j0, n, m + j0 * n + i0, n, static_cast<int>(rows),
                                      static_cast<int>(std::min(kTile, n - j0)));
      }
    }
  });
}

template <typename acc_t>
void symmetrize_square(acc_t* m, int64_t n, acc_t scale) {
  constexpr int64_t kTile = 16;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, rows_per_task(n * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      for (int64_t tj = ti; tj < tiles; ++tj) symmetrize_tile_pair(m, n, ti * kTile, tj * kTile, scale);
    }
  });
}

void cpu_symmetrize(at::Tensor& matrix, double scale) {
  if (matrix.scalar_type() == at::kDouble) {
    symmetrize_square(matrix.data_ptr<double>(), matrix.size(0), scale);
  } else {
    symmetrize_square(matrix.data_ptr<float>(), matrix.size(0), static_cast<float>(scale));
  }
}

// G = P P^T made exactly symmetric by copying its upper triangle (the GEMM's two triangles differ by rounding at
// most): half the traffic of averaging them.
at::Tensor cpu_symmetric_gram(const at::Tensor& prepared) {
  at::Tensor gram = exact_mm(prepared, prepared.t()).contiguous();
  if (gram.scalar_type() == at::kDouble) {
    mirror_upper_square(gram.data_ptr<double>(), gram.size(0));
  } else {
    mirror_upper_square(gram.data_ptr<float>(), gram.size(0));
  }
  return gram;
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
                          &cpu_gram_kernel,
                          DeviceHooks{&cpu_symmetric_gram, &cpu_symmetrize, &cpu_prepare, &cpu_preprocess_backward});
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("pairwise_forward", &pairwise_forward_cpu); }

}  // namespace kdkernels
