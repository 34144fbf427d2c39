// CPU Gram-level kernels of the pairwise family: each turns the Gram matrices G = P P^T of the preprocessed student
// and teacher features (for RKD: the squared distances D2 and the angle's hi/lo Grams; pairwise_host.h) into the
// weighted loss and its gradient dL/dG. Spec: kdkernels/reference/pairwise.py. With huber the smooth L1 (beta = 1):
//   rkd_distance  d = sqrt(max(D2, 1e-12)) off the diagonal, mu = mean off-diagonal d, L = mean huber(d_s/mu_s - d_t/mu_t)
//   rkd_angle     r = 1/sqrt(D2) (0 on the diagonal and for coincident points),
//                 psi_abc = N_abc r_ab r_ac with N_abc = (P_b - P_a).(P_c - P_a) = (G_bc - G_ac) - (G_ab - G_aa),
//                 L = mean over B^3 huber(psi_s - psi_t)
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
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pairwise_host.h"

namespace kdkernels {
namespace {

using at::vec::Vectorized;
using namespace kdkernels::pairwise;
using Wide = Vectorized<double>;

// Rows of a [B, B] matrix per parallel task: about 32K elements, so that the B^2 passes of B = 256 (tens of
// microseconds each) run on two threads: the GEMM before them leaves the Gram spread over both cores' caches, and
// the OpenMP workers are still spinning from it (measured on 2 cores: 256K elements per task, one thread, was
// 10-20 % slower end to end). The angle's rows are B^2 triples each.
constexpr int64_t kElementsPerTask = 32768;
inline int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
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

// Vectorised walk over the columns of one row: fn(c, count) for blocks of Vec::size() (count < size at the end).
template <typename acc_t, typename Fn>
void for_each_block(int64_t n, Fn&& fn) {
  for (int64_t c = 0; c < n; c += Vectorized<acc_t>::size()) {
    fn(c, std::min<int64_t>(Vectorized<acc_t>::size(), n - c));
  }
}

// Vectorized<T>::loadu of a whole vector (kFull) or of its first `count` entries (the others 0), and the store.
template <bool kFull, typename T>
Vectorized<T> load(const T* src, int64_t count) {
  if constexpr (kFull) {
    return Vectorized<T>::loadu(src);
  } else {
    return Vectorized<T>::loadu(src, count);
  }
}

template <bool kFull, typename T>
void store(const Vectorized<T>& v, T* dst, int64_t count) {
  if constexpr (kFull) {
    v.store(dst);
  } else {
    v.store(dst, count);
  }
}

template <typename acc_t>
double reduce_sum(const Vectorized<acc_t>& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<acc_t>([](const auto& x, const auto& y) { return x + y; }, v));
}

// The float64 lanes summed pairwise (at::vec's generic reduction, which float64 gets, reloads the whole vector for
// every lane).
inline double reduce_sum(const Vectorized<double>& v) {
  alignas(64) double lanes[Vectorized<double>::size()];
  v.store(lanes);
  for (int width = Vectorized<double>::size() / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// ------------------------------------------------------------------------------------------------ float64 vectors
// The RKD geometry, PKT's rows and the unit preprocessings compute in float64 from acc_t arrays.

// `count` (<= Wide::size()) entries of src widened to float64, the other lanes 0 (whole float vectors by one
// conversion instruction where the ISA has it; the same values either way).
template <typename T>
Wide load_wide(const T* src, int64_t count) {
  if constexpr (std::is_same_v<T, double>) {
    return Wide::loadu(src, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<T, float> && count == Wide::size()) return Wide(_mm512_cvtps_pd(_mm256_loadu_ps(src)));
#elif defined(CPU_CAPABILITY_AVX2)
    if (std::is_same_v<T, float> && count == Wide::size()) return Wide(_mm256_cvtps_pd(_mm_loadu_ps(src)));
#endif
    alignas(64) double wide[Wide::size()];
    for (int k = 0; k < Wide::size(); ++k) wide[k] = k < count ? static_cast<double>(src[k]) : 0.0;
    return Wide::loadu(wide);
  }
}

// The first `count` lanes of v rounded to T, stored at dst.
template <typename T>
void store_narrow(const Wide& v, T* dst, int64_t count) {
  if constexpr (std::is_same_v<T, double>) {
    v.store(dst, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<T, float> && count == Wide::size()) {
      _mm256_storeu_ps(reinterpret_cast<float*>(dst), _mm512_cvtpd_ps(v));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if (std::is_same_v<T, float> && count == Wide::size()) {
      _mm_storeu_ps(reinterpret_cast<float*>(dst), _mm256_cvtpd_ps(v));
      return;
    }
#endif
    alignas(64) double wide[Wide::size()];
    v.store(wide);
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(wide[k]);
  }
}

// sum_i x_i y_i (y = nullptr: sum_i x_i) in float64, over four accumulators (a fixed order).
template <typename T>
double wide_dot(const T* x, const T* y, int64_t n) {
  constexpr int64_t kWidth = Wide::size();
  Wide sum[4] = {Wide(0.0), Wide(0.0), Wide(0.0), Wide(0.0)};
  const auto term = [&](int64_t c, int64_t count) {
    return y == nullptr ? load_wide(x + c, count) : load_wide(x + c, count) * load_wide(y + c, count);
  };
  int64_t c = 0;
  for (; c + 4 * kWidth <= n; c += 4 * kWidth) {
    for (int64_t k = 0; k < 4; ++k) sum[k] = sum[k] + term(c + k * kWidth, kWidth);
  }
  for (; c < n; c += kWidth) sum[0] = sum[0] + term(c, std::min(kWidth, n - c));
  return reduce_sum((sum[0] + sum[1]) + (sum[2] + sum[3]));
}

// ------------------------------------------------------------------------------------------------------- RKD
// Kernels read the squared distances D2 [B, B] (and, for the angle, the [B, 2B] hi/lo Gram) of pairwise_host.h and
// write dL/dG = -2 dL/dD2 off the diagonal.

// ---------------------------------------------------------------------------------------------------- distance
// The loss and gradient arithmetic is float64 (B^2 work next to B^2 D GEMMs): the loss sums smooth-L1 terms of both
// signs, and a float32 1 / mu would scale all of them by one rounding error.

template <typename T>
Vectorized<T> huber_vec(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  const Vec magnitude = x.abs(), half(0.5);
  return Vec::blendv(magnitude - half, half * x * x, magnitude < Vec(1));
}

template <typename T>
Vectorized<T> huber_grad_vec(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  return at::vec::minimum(Vec(1), at::vec::maximum(Vec(-1), x));
}

// One side's distances d = sqrt(max(D2, 1e-12)) off the diagonal, stored with the sign of "the clamp passes the
// gradient" (D2 >= 1e-12): negated where clamped, 0 on the diagonal; and their mean.
template <typename acc_t>
struct DistanceSide {
  std::vector<acc_t> d;
  double mean = 0.0;
};

template <typename acc_t>
DistanceSide<acc_t> distances(const Square<acc_t>& d2) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = d2.n;
  DistanceSide<acc_t> side{std::vector<acc_t>(n * n), 0.0};
  const Vec clamp(static_cast<acc_t>(kDistanceClamp));
  const double total = parallel_row_sum(n, [&](int64_t i) {
    acc_t* d_row = side.d.data() + i * n;
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec squared = Vec::loadu(d2.row(i) + c, count);
      const Vec d = at::vec::maximum(squared, clamp).sqrt();
      Vec::blendv(Vec(0) - d, d, squared >= clamp).store(d_row + c, count);
    });
    d_row[i] = acc_t(0);
    Wide sum(0.0);
    for_each_block<double>(n, [&](int64_t c, int64_t count) { sum = sum + load_wide(d_row + c, count).abs(); });
    return reduce_sum(sum);
  });
  side.mean = total / static_cast<double>(n * n - n);
  return side;
}

// u = |d_s| / mu_s - |d_t| / mu_t on a block of row i, in float64.
template <typename acc_t>
struct NormalizedDifference {
  const DistanceSide<acc_t>& s;
  const DistanceSide<acc_t>& t;
  Wide inv_s, inv_t;
  NormalizedDifference(const DistanceSide<acc_t>& s, const DistanceSide<acc_t>& t)
      : s(s), t(t), inv_s(1.0 / s.mean), inv_t(1.0 / t.mean) {}
  Wide operator()(int64_t offset, int64_t count, Wide& d_s, Wide& d_t) const {
    d_s = load_wide(s.d.data() + offset, count);
    d_t = load_wide(t.d.data() + offset, count);
    return d_s.abs() * inv_s - d_t.abs() * inv_t;
  }
};

// dL/dG of one side off the diagonal (times `sign`: +1 student, -1 teacher) with g = huber'(u):
// dL/dd = sign (g / mu - moment / (mu^2 (B^2 - B))) with moment = sum g |d|, dL/dD2 = dL/dd / (2 d) where the clamp
// passes, dG = -2 weight dL/dD2.
template <typename acc_t>
void distance_gram_grad(const NormalizedDifference<acc_t>& difference, bool student_side, double moment,
                        double weight, const Square<acc_t>& dgram) {
  const int64_t n = dgram.n;
  const DistanceSide<acc_t>& side = student_side ? difference.s : difference.t;
  const double sign = student_side ? 1.0 : -1.0, inv_mean = 1.0 / side.mean;
  const Wide shift(moment * inv_mean * inv_mean / static_cast<double>(n * n - n)), v_inv_mean(inv_mean);
  const Wide minus_weight(-sign * weight), zero(0.0), one(1.0);
  parallel_rows(n, [&](int64_t i) {
    for_each_block<double>(n, [&](int64_t c, int64_t count) {
      Wide d_s, d_t;
      const Wide g = huber_grad_vec(difference(i * n + c, count, d_s, d_t));
      const Wide d = student_side ? d_s : d_t;
      const Wide passes = d > zero;
      const Wide step = minus_weight * (g * v_inv_mean - shift) / Wide::blendv(one, d, passes);
      store_narrow(load_wide(dgram.row(i) + c, count) + (step & passes), dgram.row(i) + c, count);
    });
  });
}

template <typename acc_t>
void rkd_distance(const GramTerm& term, const GramProblem& problem) {
  const Square<acc_t> d2_s = square<acc_t>(problem.sqdist_student), d2_t = square<acc_t>(problem.sqdist_teacher);
  const int64_t n = d2_s.n;
  const DistanceSide<acc_t> s = distances(d2_s), t = distances(d2_t);
  const NormalizedDifference<acc_t> difference(s, t);
  std::vector<double> moments_s(n, 0.0), moments_t(n, 0.0);  // per row: sum g |d_s|, sum g |d_t|
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    Wide sum(0.0), moment_s(0.0), moment_t(0.0);
    for_each_block<double>(n, [&](int64_t c, int64_t count) {
      Wide d_s, d_t;
      const Wide u = difference(i * n + c, count, d_s, d_t);
      const Wide g = huber_grad_vec(u);
      sum = sum + Wide::set(Wide(0.0), huber_vec(u), count);
      moment_s = at::vec::fmadd(g, d_s.abs(), moment_s);
      moment_t = at::vec::fmadd(g, d_t.abs(), moment_t);
    });
    moments_s[i] = reduce_sum(moment_s);
    moments_t[i] = reduce_sum(moment_t);
    return reduce_sum(sum);
  });
  const double inv_count = 1.0 / static_cast<double>(n * n);
  add_loss(problem, term.weight * loss * inv_count);
  const auto total = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0); };
  if (problem.dgram_student.defined()) {
    distance_gram_grad(difference, true, total(moments_s), term.weight * inv_count,
                       square<acc_t>(problem.dgram_student));
  }
  if (problem.dgram_teacher.defined()) {
    distance_gram_grad(difference, false, total(moments_t), term.weight * inv_count,
                       square<acc_t>(problem.dgram_teacher));
  }
}

// ------------------------------------------------------------------------------------------------------- angle
// The B^3 loop runs in acc_t on N_abc formed from the hi/lo Gram (AngleNumerator) and r from D2; its sums give
// dL/dD2 (W below), which the host turns into dL/dP = 2 sum_b (W_ab + W_ba) (P_a - P_b) in float64.

// The angle's Gram: [B, 2B] rows of hi(G_i.) then lo(G_i.) in acc_t (pairwise_host.h).
template <typename acc_t>
struct HiLoGram {
  const acc_t* data;
  int64_t n;
  const acc_t* hi(int64_t i) const { return data + 2 * i * n; }
  const acc_t* lo(int64_t i) const { return data + 2 * i * n + n; }
};

template <typename acc_t>
HiLoGram<acc_t> hilo_gram(const at::Tensor& t) {
  return {static_cast<const acc_t*>(t.data_ptr()), t.size(0)};
}

// r_ij = 1 / sqrt(D2_ij), 0 where D2 is (0 on the diagonal and for coincident points).
template <typename acc_t>
std::vector<acc_t> inverse_distances(const Square<acc_t>& d2) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = d2.n;
  std::vector<acc_t> r(n * n);
  parallel_rows(n, [&](int64_t i) {
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      const Vec squared = Vec::loadu(d2.row(i) + c, count);
      const Vec positive = squared > Vec(0);
      (Vec(1) / Vec::blendv(Vec(1), squared, positive).sqrt() & positive).store(r.data() + i * n + c, count);
    });
  });
  return r;
}

// N_abc = (P_b - P_a).(P_c - P_a) = ((hi_bc - hi_ba) - (hi_ac - hi_aa)) + (the same of lo) for one apex a and
// middle b over blocks of c, from the fixed-point hi/lo Gram rows b and a (pairwise_host.h): the two hi differences
// are exact, so N is rounded once relative to itself, plus ~eps (q_a + q_b) from the lo parts. From a float32 Gram
// its error would be ~eps |G|, with |G| ~ |P|^2 far above |N| = |P_b - P_a| |P_c - P_a| for close samples.
template <typename acc_t>
struct AngleNumerator {
  using Vec = Vectorized<acc_t>;
  const acc_t *hi_b, *hi_a, *lo_b, *lo_a;
  Vec hi_ba, hi_aa, lo_ba, lo_aa;

  AngleNumerator(const HiLoGram<acc_t>& g, int64_t a, int64_t b)
      : hi_b(g.hi(b)), hi_a(g.hi(a)), lo_b(g.lo(b)), lo_a(g.lo(a)),
        hi_ba(g.hi(b)[a]), hi_aa(g.hi(a)[a]), lo_ba(g.lo(b)[a]), lo_aa(g.lo(a)[a]) {}

  template <bool kFull>
  Vec block(int64_t c, int64_t count) const {
    const Vec high = (load<kFull>(hi_b + c, count) - hi_ba) - (load<kFull>(hi_a + c, count) - hi_aa);
    return high + ((load<kFull>(lo_b + c, count) - lo_ba) - (load<kFull>(lo_a + c, count) - lo_aa));
  }
};

// One side of the angle loop. With g_abc = huber'(psi_s - psi_t) (negated for the teacher), M_abc = g r_ab r_ac:
//   dL/dD2_ab += W_ab = sum_c M_abc - r_ab^2 sum_c g psi_abc  (D2_ab and D2_ac of psi = (D2_ab + D2_ac - D2_bc)
//                                                              r_ab r_ac / 2, both roles summed, and r_ab),
//   dL/dD2_bc -= Q_bc / 2 with Q_bc = sum_a M_abc;
// so that dG (off the diagonal) = -2 dL/dD2 = Q - 2 W, all times scale = weight / B^3.
template <typename acc_t>
struct AngleSide {
  HiLoGram<acc_t> g;
  const acc_t* r;
  acc_t* q;      // [B, B] Q (row b accumulated by the task that owns b), null when the gradient is not requested
  acc_t* dgram;  // receives -2 scale W_ab at (a, b), null when the gradient is not requested
};

// One (apex a, middle b) row over every c, vectorised. Returns the row's sum of huber(psi_s - psi_t). Not inlined,
// so that the serial and the parallel call sites of angle_rows run the same code (see parallel_row_sum).
template <typename acc_t, bool kStudent, bool kTeacher>
C10_NOINLINE double angle_row(const AngleSide<acc_t>& st, const AngleSide<acc_t>& te, int64_t a, int64_t b,
                              double scale) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = st.g.n;
  const acc_t rs_ab = st.r[a * n + b], rt_ab = te.r[a * n + b];
  if (rs_ab == acc_t(0) && rt_ab == acc_t(0)) return 0.0;  // both psi rows are 0: no loss, no gradient
  const AngleNumerator<acc_t> numerator_s(st.g, a, b), numerator_t(te.g, a, b);
  const Vec vs_ab(rs_ab), vt_ab(rt_ab), one(1), minus_one(-1), half(0.5);
  const acc_t *rs_a = st.r + a * n, *rt_a = te.r + a * n;
  acc_t* q_s = kStudent ? st.q + b * n : nullptr;
  acc_t* q_t = kTeacher ? te.q + b * n : nullptr;
  Vec loss(0), p_s(0), s_s(0), p_t(0), s_t(0);
  const auto block = [&](auto full, int64_t c, int64_t count) {
    constexpr bool kFull = decltype(full)::value;
    const Vec ms = load<kFull>(rs_a + c, count) * vs_ab;
    const Vec mt = load<kFull>(rt_a + c, count) * vt_ab;
    const Vec psi_s = numerator_s.template block<kFull>(c, count) * ms;
    const Vec psi_t = numerator_t.template block<kFull>(c, count) * mt;
    const Vec x = psi_s - psi_t;
    const Vec grad = at::vec::clamp(x, minus_one, one);
    loss = at::vec::fmadd(grad, x - half * grad, loss);  // huber(x) = huber'(x) (x - huber'(x) / 2)
    if constexpr (kStudent) {
      const Vec m = grad * ms;
      store<kFull>(load<kFull>(q_s + c, count) + m, q_s + c, count);
      p_s = p_s + m;
      s_s = at::vec::fmadd(grad, psi_s, s_s);
    }
    if constexpr (kTeacher) {
      const Vec m = grad * mt;
      store<kFull>(load<kFull>(q_t + c, count) - m, q_t + c, count);
      p_t = p_t - m;
      s_t = s_t - grad * psi_t;
    }
  };
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) block(std::true_type{}, c, Vec::size());
  if (c < n) block(std::false_type{}, c, n - c);
  const auto side_w = [](const Vec& p, const Vec& s, acc_t r) {
    return reduce_sum(p) - static_cast<double>(r) * static_cast<double>(r) * reduce_sum(s);
  };
  if constexpr (kStudent) st.dgram[a * n + b] += static_cast<acc_t>(-2.0 * scale * side_w(p_s, s_s, rs_ab));
  if constexpr (kTeacher) te.dgram[a * n + b] += static_cast<acc_t>(-2.0 * scale * side_w(p_t, s_t, rt_ab));
  return reduce_sum(loss);
}

// Middle indices b in parallel: each task owns its rows Q[b][.] and the entries dG[.][b], so that nothing is shared
// between threads; a block of b rows shares every loaded apex row a (it stays in cache).
template <typename acc_t, bool kStudent, bool kTeacher>
double angle_rows(const AngleSide<acc_t>& st, const AngleSide<acc_t>& te, double scale) {
  const int64_t n = st.g.n;
  std::vector<double> partial(n, 0.0);
  at::parallel_for(0, n, rows_per_task(n * n), [&](int64_t begin, int64_t end) {
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = begin; b < end; ++b) partial[b] += angle_row<acc_t, kStudent, kTeacher>(st, te, a, b, scale);
    }
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0);
}

// dG += scale Q (the diagonal included: the host ignores it).
template <typename acc_t>
void add_scaled(const std::vector<acc_t>& q, double scale, const Square<acc_t>& dgram) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = dgram.n;
  const Vec v_scale(static_cast<acc_t>(scale));
  parallel_rows(n, [&](int64_t i) {
    acc_t* row = dgram.row(i);
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      at::vec::fmadd(Vec::loadu(q.data() + i * n + c, count), v_scale, Vec::loadu(row + c, count))
          .store(row + c, count);
    });
  });
}

template <typename acc_t>
void rkd_angle(const GramTerm& term, const GramProblem& problem) {
  const HiLoGram<acc_t> gs = hilo_gram<acc_t>(problem.gram_student), gt = hilo_gram<acc_t>(problem.gram_teacher);
  const int64_t n = gs.n;
  const std::vector<acc_t> rs = inverse_distances(square<acc_t>(problem.sqdist_student));
  const std::vector<acc_t> rt = inverse_distances(square<acc_t>(problem.sqdist_teacher));
  const bool student = problem.dgram_student.defined(), teacher = problem.dgram_teacher.defined();
  std::vector<acc_t> q_s(student ? n * n : 0, acc_t(0)), q_t(teacher ? n * n : 0, acc_t(0));
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const AngleSide<acc_t> st{gs, rs.data(), q_s.data(), dgs.data}, te{gt, rt.data(), q_t.data(), dgt.data};
  const double scale = term.weight / (static_cast<double>(n) * n * n);
  double loss;
  if (student && teacher) loss = angle_rows<acc_t, true, true>(st, te, scale);
  else if (student) loss = angle_rows<acc_t, true, false>(st, te, scale);
  else if (teacher) loss = angle_rows<acc_t, false, true>(st, te, scale);
  else loss = angle_rows<acc_t, false, false>(st, te, scale);
  add_loss(problem, loss * scale);
  if (student) add_scaled(q_s, scale, dgs);
  if (teacher) add_scaled(q_t, scale, dgt);
}

// ------------------------------------------------------------------------------------------------- row-wise terms

// The sum of a row in float64, in a fixed order.
template <typename acc_t>
double row_sum(const acc_t* row, int64_t n) {
  return wide_dot<acc_t>(row, nullptr, n);
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
// loss sum P_t r; h_s = dL/dP_s = -P_t / (P_s + eps), h_t = dL/dP_t = r + P_t / (P_t + eps) (times weight / B^2);
// through the row normalisation, dG = (h - sum(h P)) / (2 R). With P_t = P_s (1 + delta), the loss terms are
// ~delta / B of both signs summing to ~delta^2 (a KL divergence), and h - sum(h P) cancels O(1) parts down to
// ~delta: float32 P (or a float32 1 / R, which scales a whole row) would cost relative errors ~eps / delta^2 and
// ~eps / delta. So P, t = (P_t - P_s) / (P_s + eps), the sums and dG are float64, each output rounded once; only
// r = log1p(t) runs in acc_t (its relative error costs eps |r| ~ eps delta per term). Three passes per row over
// a row buffer: t, then r in place, then the sums with h kept in float64, then dG.
template <typename acc_t>
void pkt(const GramTerm& term, const GramProblem& problem) {
  using Vec = Vectorized<acc_t>;
  const Square<acc_t> gs = square<acc_t>(problem.gram_student), gt = square<acc_t>(problem.gram_teacher);
  const Square<acc_t> dgs = square<acc_t>(problem.dgram_student), dgt = square<acc_t>(problem.dgram_teacher);
  const int64_t n = gs.n;
  const double inv_count = 1.0 / static_cast<double>(n * n);
  const Wide eps(term.eps), one(1.0), zero(0.0);
  const double loss = parallel_row_sum(n, [&](int64_t i) {
    const acc_t *gs_row = gs.row(i), *gt_row = gt.row(i);
    acc_t *ds_row = dgs.data != nullptr ? dgs.row(i) : nullptr, *dt_row = dgt.data != nullptr ? dgt.row(i) : nullptr;
    const double half_sum_s = 0.5 * (row_sum(gs_row, n) + static_cast<double>(n));  // R
    const double half_sum_t = 0.5 * (row_sum(gt_row, n) + static_cast<double>(n));
    const Wide scale_s(0.5 / half_sum_s), scale_t(0.5 / half_sum_t);
    const auto probabilities = [&](int64_t c, int64_t count, Wide& p_s, Wide& p_t) {
      p_s = (load_wide(gs_row + c, count) + one) * scale_s;
      p_t = (load_wide(gt_row + c, count) + one) * scale_t;
    };
    std::vector<acc_t> log_ratio(n);  // t, then r = log1p(t)
    for_each_block<double>(n, [&](int64_t c, int64_t count) {
      Wide p_s, p_t;
      probabilities(c, count, p_s, p_t);
      store_narrow((p_t - p_s) / (p_s + eps), log_ratio.data() + c, count);
    });
    for_each_block<acc_t>(n, [&](int64_t c, int64_t count) {
      Vec::loadu(log_ratio.data() + c, count).log1p().store(log_ratio.data() + c, count);
    });
    std::vector<double> h_s(ds_row != nullptr ? n : 0), h_t(dt_row != nullptr ? n : 0);
    Wide sum(0.0), dot_s(0.0), dot_t(0.0);
    for_each_block<double>(n, [&](int64_t c, int64_t count) {
      Wide p_s, p_t;
      probabilities(c, count, p_s, p_t);
      const Wide r = load_wide(log_ratio.data() + c, count);
      sum = sum + Wide::set(zero, p_t * r, count);
      if (ds_row != nullptr) {
        const Wide h = zero - p_t / (p_s + eps);
        h.store(h_s.data() + c, count);
        dot_s = dot_s + Wide::set(zero, h * p_s, count);
      }
      if (dt_row != nullptr) {
        const Wide h = r + p_t / (p_t + eps);
        h.store(h_t.data() + c, count);
        dot_t = dot_t + Wide::set(zero, h * p_t, count);
      }
    });
    const auto write = [&](acc_t* row, const std::vector<double>& h, const Wide& dot, double half_sum) {
      const Wide shift(reduce_sum(dot)), weight(term.weight * inv_count * 0.5 / half_sum);
      for_each_block<double>(n, [&](int64_t c, int64_t count) {
        const Wide step = (Wide::loadu(h.data() + c, count) - shift) * weight;
        store_narrow(load_wide(row + c, count) + step, row + c, count);
      });
    };
    if (ds_row != nullptr) write(ds_row, h_s, dot_s, half_sum_s);
    if (dt_row != nullptr) write(dt_row, h_t, dot_t, half_sum_t);
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
// instead of 3 to 10 ATen ops (each costs about as much as the pass at B = 256), in float64 like them; float16 and
// bfloat16 features are widened by ATen first.

// out = x minus its column means, in float64.
template <typename scalar_t>
void centre_columns(const scalar_t* x, double* out, int64_t rows, int64_t cols) {
  std::vector<double> means(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + i * cols;
    for (int64_t j = 0; j < cols; ++j) means[j] += static_cast<double>(row[j]);
  }
  for (double& value : means) value /= static_cast<double>(rows);
  parallel_rows(rows, [&](int64_t i) {
    const scalar_t* row = x + i * cols;
    double* out_row = out + i * cols;
    for (int64_t j = 0; j < cols; ++j) out_row[j] = static_cast<double>(row[j]) - means[j];
  }, cols);
}

// n' of a unit preprocessing: |x| + eps or max(|x|, eps).
inline double unit_denominator(double norm, Preprocess preprocess, double eps) {
  return preprocess == Preprocess::kUnitPlusEps ? norm + eps : std::max(norm, eps);
}

// P = x / n' per row and the float64 norms |x|: x (i_hi + i_lo) with the float64 1 / n' split into acc_t parts, by
// one fused multiply-add (rounded once, as x / n' in float64 would be but for ties).
template <typename acc_t>
void unit_rows(const acc_t* x, acc_t* out, double* norms, int64_t rows, int64_t cols, Preprocess preprocess,
               double eps) {
  using Vec = Vectorized<acc_t>;
  parallel_rows(rows, [&](int64_t i) {
    const acc_t* row = x + i * cols;
    acc_t* out_row = out + i * cols;
    const double norm = std::sqrt(wide_dot(row, row, cols));
    norms[i] = norm;
    const double inverse = 1.0 / unit_denominator(norm, preprocess, eps);
    const acc_t high = static_cast<acc_t>(inverse);
    const Vec inverse_hi(high), inverse_lo(static_cast<acc_t>(inverse - static_cast<double>(high)));
    for_each_block<acc_t>(cols, [&](int64_t c, int64_t count) {
      const Vec v = Vec::loadu(row + c, count);
      at::vec::fmadd(v, inverse_hi, v * inverse_lo).store(out_row + c, count);
    });
  }, cols);
}

// dL/dx = (dP - P (P.dP) n' / |x|) / n' in place of dP, the radial term only where the norm is differentiable.
template <typename acc_t>
void unit_rows_backward(acc_t* grad, const acc_t* unit, const double* norms, int64_t rows, int64_t cols,
                        Preprocess preprocess, double eps) {
  parallel_rows(rows, [&](int64_t i) {
    acc_t* grad_row = grad + i * cols;
    const acc_t* unit_row = unit + i * cols;
    const double norm = norms[i], denominator = unit_denominator(norm, preprocess, eps);
    const bool differentiable = preprocess == Preprocess::kUnitPlusEps ? norm > 0.0 : norm > eps;
    const Wide radial(differentiable ? wide_dot(unit_row, grad_row, cols) * denominator / norm : 0.0);
    const Wide inverse(1.0 / denominator);
    for_each_block<double>(cols, [&](int64_t c, int64_t count) {
      const Wide g = load_wide(grad_row + c, count) - load_wide(unit_row + c, count) * radial;
      store_narrow(g * inverse, grad_row + c, count);
    });
  }, cols);
}

Prepared cpu_prepare(const at::Tensor& features, Preprocess preprocess, double eps) {
  at::Tensor x = features.to(accumulation_dtype(features)).contiguous();
  if (preprocess == Preprocess::kNone) return {x, at::Tensor()};
  const int64_t rows = x.size(0), cols = x.size(1);
  if (preprocess == Preprocess::kCentre) {
    at::Tensor out = at::empty({rows, cols}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_centre", [&] {
      centre_columns(x.data_ptr<scalar_t>(), out.data_ptr<double>(), rows, cols);
    });
    return {out, at::Tensor()};
  }
  at::Tensor out = at::empty_like(x);
  at::Tensor norms = at::empty({rows, 1}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_prepare", [&] {
    unit_rows(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norms.data_ptr<double>(), rows, cols, preprocess,
              eps);
  });
  return {out, norms};
}

at::Tensor cpu_preprocess_backward(at::Tensor& grad_prepared, const Prepared& prepared, Preprocess preprocess,
                                   double eps, at::ScalarType dtype) {
  at::Tensor grad = grad_prepared.contiguous();
  if (is_unit(preprocess)) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "pairwise_preprocess_backward", [&] {
      unit_rows_backward(grad.data_ptr<scalar_t>(), prepared.features.data_ptr<scalar_t>(),
                         prepared.norms.data_ptr<double>(), grad.size(0), grad.size(1), preprocess, eps);
    });
  }
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

// RKD's Gram inputs (pairwise_host.h): the float64 G = P P^T made exactly symmetric, D2 from it, and, with the
// angle, its fixed-point hi/lo rows. Below float64 the split is in place: row i of the float64 [B, B] buffer and
// row i of the [B, 2B] float32 view are the same bytes (at B = 1024 a Gram is 8 MB).
template <typename acc_t>
void squared_distances_and_split(double* gram, int64_t n, bool split, acc_t* d2, acc_t* split_out) {
  std::vector<double> diagonal(n);
  for (int64_t i = 0; i < n; ++i) diagonal[i] = gram[i * n + i];
  const Wide noise_ulps(kCoincidentUlps * std::numeric_limits<double>::epsilon()), zero(0.0), two(2.0);
  parallel_rows(n, [&](int64_t i) {
    for_each_block<double>(n, [&](int64_t c, int64_t count) {
      const Wide sums = Wide(diagonal[i]) + Wide::loadu(diagonal.data() + c, count);
      const Wide squared = sums - two * Wide::loadu(gram + i * n + c, count);
      store_narrow(Wide::blendv(squared, zero, squared <= noise_ulps * sums), d2 + i * n + c, count);
    });
    d2[i * n + i] = acc_t(0);
  });
  if (!split) return;
  parallel_rows(n, [&](int64_t i) {
    const std::vector<double> row(gram + i * n, gram + (i + 1) * n);
    double row_max = 0.0;
    for (const double value : row) row_max = std::max(row_max, std::abs(value));
    const double q = split_quantum(row_max, c10::CppTypeToScalarType<acc_t>::value);
    acc_t* out = split_out + 2 * i * n;
    for (int64_t j = 0; j < n; ++j) {
      const double high = std::nearbyint(row[j] / q) * q;
      out[j] = static_cast<acc_t>(high);
      out[n + j] = static_cast<acc_t>(row[j] - high);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cpu_rkd_gram(const at::Tensor& prepared, at::ScalarType acc, bool split) {
  at::Tensor gram = exact_mm(prepared, prepared.t()).contiguous();
  const int64_t n = gram.size(0);
  mirror_upper_square(gram.data_ptr<double>(), n);
  at::Tensor d2 = at::empty({n, n}, gram.options().dtype(acc));
  at::Tensor hilo;
  if (split) hilo = acc == at::kDouble ? at::empty({n, 2 * n}, gram.options()) : gram.view(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "pairwise_rkd_gram", [&] {
    squared_distances_and_split(gram.data_ptr<double>(), n, split, d2.data_ptr<scalar_t>(),
                                split ? hilo.data_ptr<scalar_t>() : nullptr);
  });
  return {hilo, d2};
}

// RKD's S = dG + dG^T in `dtype`, its diagonal minus its off-diagonal row sums (summed in float64).
at::Tensor cpu_invariant_symmetrize(const at::Tensor& dgram, at::ScalarType dtype) {
  at::Tensor s = dgram.to(dtype).contiguous();
  const int64_t n = s.size(0);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pairwise_invariant_symmetrize", [&] {
    scalar_t* data = s.data_ptr<scalar_t>();
    symmetrize_square(data, n, scalar_t(1));
    parallel_rows(n, [&](int64_t i) {
      scalar_t* row = data + i * n;
      row[i] = scalar_t(0);
      Wide sum(0.0);
      for_each_block<double>(n, [&](int64_t c, int64_t count) { sum = sum + load_wide(row + c, count); });
      row[i] = static_cast<scalar_t>(-reduce_sum(sum));
    });
  });
  return s;
}

void cpu_gram_kernel(const GramTerm& term, const GramProblem& problem) {
  if (problem.loss.scalar_type() == at::kDouble) {
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
                          DeviceHooks{&cpu_symmetric_gram, &cpu_symmetrize, &cpu_prepare, &cpu_preprocess_backward,
                                      &cpu_rkd_gram, &cpu_invariant_symmetrize});
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("pairwise_forward", &pairwise_forward_cpu); }

}  // namespace kdkernels
