// CPU kernels of the dist family: DIST's Pearson correlations of y_s = softmax(s / T) and y_t = softmax(t / T) over
// a batch [N, V], and their gradients. Spec: kdkernels/reference/dist.py.
//
//   pearson = S_st / (sqrt(S_ss) sqrt(S_tt) + 1e-8),   S_ab = sum (y_a - centre_a) (y_b - centre_b)
// per row (centre 1/V) and per column (centre: the column's mean across the batch).
//
// Precision: every per-element quantity (y, its centred values, dL/dy, the softmax backward) is formed in double
// for every logits dtype, and the saved statistics (stats, row_moments, col_moments) are double; only the Pearson
// vectors and the gradients are rounded to their dtypes. Float arithmetic, however ordered, is only as accurate as
// DIST_KD's own fp32 code, not measurably better: where a column's spread is far below its values (a few rows,
// saturated softmaxes) or a correlation is close to +-1 (two rows, two classes), the centred values and the Pearson
// slopes b / D - S_st sqrt(S_tt) / (sqrt(S_ss) D^2) a cancel, and their error is set by the rounding of y itself.
//
// Forward: blocks of rows in parallel, each row's softmax formed once (max, then exp, then scale) and walked once
// for its centred sums (centre 1/V) and for the column moments: each block sums its rows' values minus the
// column's value in the first row, their squares and products in its own double accumulators, added up in block
// order and centred at the column means at the end (S - N offset^2, offset = mean - shift: a constant column gives
// exactly 0). One exponential per element: with double exponentials this beats walking column blocks (in cache)
// after a pass for the row statistics. The blocks depend on the shape only, so results do not depend on the thread
// count.
// Backward, rows in parallel, with a = y_s - centre, b = y_t - centre, D = sqrt(S_ss) sqrt(S_tt) + 1e-8:
//   dr/dy_s = b / D - S_st sqrt(S_tt) / (sqrt(S_ss) D^2) a   (second term 0 when S_ss = 0; swap s and t for y_t)
//   g_s[n, c] = grad_row[n] dr_row/dy_s + grad_col[c] dr_col/dy_s,   grad_s = 1/T y_s (g_s - sum_j g_s y_s)
// in two walks of each row: the dot product (keeping y and y dL/dy of the row), then the write.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/cpu_rows.h"
#include "dist_host.h"

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;
using Vec = Vectorized<double>;

constexpr double kEps = 1e-8;          // the reference's cosine epsilon
constexpr int64_t kMaxRowBlocks = 64;  // row blocks of the forward; each has 5 V double column accumulators, so at
constexpr int64_t kMinBlockRows = 32;  //   most 64 of them, of at least 32 rows (1/6 of fp32 logits' bytes)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline double add_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<double>([](Vec& p, Vec& q) { return p + q; }, v);
}

// exp(x) for x <= 0 or NaN (-inf gives 0, NaN stays NaN), the only arguments the kernels form. With AVX512,
// 2^(n/8) exp(r), r = x - n ln2/8 in [-ln2/16, ln2/16], exp(r) by its Taylor polynomial of degree 7 (truncation
// 3e-16 relative) and 2^(n/8) from an 8-entry table in a register: about 3e-16 relative, in two thirds of the time
// of Sleef's general double exp (the double exponentials are most of these kernels' work). Elsewhere Sleef's.
inline Vec exp_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d z = _mm512_max_pd(_mm512_set1_pd(-800.0), x);  // exp(-800) = 0; max keeps a NaN second operand
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(z, _mm512_set1_pd(8.0 / 0x1.62e42fefa39efp-1)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = z - n ln2/8 with ln2/8 split so that n times its high part is exact (|n| < 2^11).
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(0x1.62e42fefa3800p-4), z);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(0x1.ef35793c76730p-48), r);
  __m512d p = _mm512_set1_pd(1.0 / 5040);
  for (const double coefficient : {1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0}) {
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(coefficient));
  }
  // n = 8 q + j: exp(z) = 2^q 2^(j/8) exp(r)
  const __m512d q = _mm512_roundscale_pd(_mm512_mul_pd(n, _mm512_set1_pd(0.125)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512i j = _mm512_cvtpd_epi64(_mm512_fnmadd_pd(q, _mm512_set1_pd(8.0), n));
  const __m512d powers = _mm512_set_pd(0x1.d5818dcfba487p+0, 0x1.ae89f995ad3adp+0, 0x1.8ace5422aa0dbp+0,
                                       0x1.6a09e667f3bcdp+0, 0x1.4bfdad5362a27p+0, 0x1.306fe0a31b715p+0,
                                       0x1.172b83c7d517bp+0, 1.0);  // 2^(7/8), ..., 2^(1/8), 1
  return Vec(_mm512_scalef_pd(_mm512_mul_pd(p, _mm512_permutexvar_pd(j, powers)), q));
#else
  return x.exp();
#endif
}

template <typename S, typename T>
struct Logits {
  const S* student;
  int64_t student_stride;
  const T* teacher;
  int64_t teacher_stride;
  int64_t rows, cols;

  const S* student_row(int64_t row) const { return student + row * student_stride; }
  const T* teacher_row(int64_t row) const { return teacher + row * teacher_stride; }
};

// y = exp((x - max) / T) / sum of one row from its (max, log_sum), with 1 / sum = exp(-log_sum) rounded once per
// row. The forward and the backward both form y here, so that they agree bit for bit (a constant column's centred
// values are then exactly 0 in both).
struct RowSoftmax {
  Vec max, inv_t, inv_sum;

  RowSoftmax(const double* stats, double inv_t_) : max(stats[0]), inv_t(inv_t_), inv_sum(std::exp(-stats[1])) {}

  // The lanes past `count` are 0.
  Vec at(const double* x, int64_t count) const {
    return exp_nonpositive((load_padded(x, count) - max) * inv_t) * inv_sum;
  }
};

struct CentredSums {
  double st = 0.0, ss = 0.0, tt = 0.0;

  void add(const CentredSums& other) {
    st += other.st;
    ss += other.ss;
    tt += other.tt;
  }
  double pearson() const { return st / (std::sqrt(ss) * std::sqrt(tt) + kEps); }
};

// grad * dr/dy_s = alpha b - beta_s a and grad * dr/dy_t = alpha a - beta_t b, for r the Pearson correlation of
// the centred sums (st, ss, tt).
struct PearsonCoefficients {
  double alpha, beta_s, beta_t;

  PearsonCoefficients(double grad, double st, double ss, double tt) {
    const double root_ss = std::sqrt(ss), root_tt = std::sqrt(tt);
    const double d = root_ss * root_tt + kEps;
    alpha = grad / d;
    beta_s = ss > 0.0 ? grad * st * root_tt / (root_ss * d * d) : 0.0;
    beta_t = tt > 0.0 ? grad * st * root_ss / (root_tt * d * d) : 0.0;
  }
};

// Per-column sums over rows of values minus their column's shift (the first row's y): sums of both sides (then
// the means), products and squares (then the centred sums).
struct ColumnAccumulators {
  std::vector<double> mean_s, mean_t, st, ss, tt;

  explicit ColumnAccumulators(int64_t cols) : mean_s(cols), mean_t(cols), st(cols), ss(cols), tt(cols) {}

  void add(const ColumnAccumulators& other) {
    for (auto [total, part] : {std::pair{&mean_s, &other.mean_s}, std::pair{&mean_t, &other.mean_t},
                               std::pair{&st, &other.st}, std::pair{&ss, &other.ss}, std::pair{&tt, &other.tt}}) {
      for (size_t c = 0; c < total->size(); ++c) (*total)[c] += (*part)[c];
    }
  }
};

// One walk over a row segment of n values at columns [first, first + n), whose y come from probs(j, count) ->
// (y_s, y_t) of the `count` values at j: returns the segment's centred row sums (centre `centre`) and adds its
// values minus the shifts to the column accumulators.
template <typename Probs>
CentredSums accumulate_segment(Probs probs, int64_t n, double centre, const double* shift_s, const double* shift_t,
                               ColumnAccumulators& columns, int64_t first) {
  const Vec zero(0.0), v_centre(centre);
  Vec row_st(zero), row_ss(zero), row_tt(zero);
  double* __restrict__ sum_s = columns.mean_s.data() + first;
  double* __restrict__ sum_t = columns.mean_t.data() + first;
  double* __restrict__ st = columns.st.data() + first;
  double* __restrict__ ss = columns.ss.data() + first;
  double* __restrict__ tt = columns.tt.data() + first;
  shift_s += first;
  shift_t += first;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const auto [y_s, y_t] = probs(j, count);
    const Vec a_row = Vec::set(zero, y_s - v_centre, count), b_row = Vec::set(zero, y_t - v_centre, count);
    row_st = at::vec::fmadd(a_row, b_row, row_st);
    row_ss = at::vec::fmadd(a_row, a_row, row_ss);
    row_tt = at::vec::fmadd(b_row, b_row, row_tt);
    const Vec a = y_s - Vec::loadu(shift_s + j, count), b = y_t - Vec::loadu(shift_t + j, count);
    (Vec::loadu(sum_s + j, count) + a).store(sum_s + j, count);
    (Vec::loadu(sum_t + j, count) + b).store(sum_t + j, count);
    at::vec::fmadd(a, b, Vec::loadu(st + j, count)).store(st + j, count);
    at::vec::fmadd(a, a, Vec::loadu(ss + j, count)).store(ss + j, count);
    at::vec::fmadd(b, b, Vec::loadu(tt + j, count)).store(tt + j, count);
  }
  return {add_lanes(row_st), add_lanes(row_ss), add_lanes(row_tt)};
}

template <typename Out>
struct ForwardOutputs {
  Out *row_pearson, *col_pearson;
  double *row_moments, *col_moments, *stats_student, *stats_teacher;
};

template <typename Out>
void write_row_outputs(const CentredSums& sums, int64_t row, const ForwardOutputs<Out>& out) {
  out.row_moments[3 * row] = sums.st;
  out.row_moments[3 * row + 1] = sums.ss;
  out.row_moments[3 * row + 2] = sums.tt;
  out.row_pearson[row] = static_cast<Out>(sums.pearson());
}

// One row's e = exp((x - max) / T) into e [cols] and its stats (max, log_sum); returns exp(-log_sum), formed from
// the stored log_sum exactly as RowSoftmax does, so that y = e * exp(-log_sum) is the very y the backward
// recomputes.
template <typename X>
double row_exponentials(const X* x, int64_t cols, double inv_t, double* widened, double* e, double* stats) {
  const double* values = as_acc(x, widened, cols);
  double max;
  if constexpr (std::is_same_v<X, float>) {
    max = max_of(x, cols);  // exact, twice the lanes
  } else {
    max = max_of(values, cols);
  }
  const Vec v_shift(safe_shift(max)), v_inv_t(inv_t);
  double sum = 0.0;
  for (int64_t c = 0; c < cols; c += kChunk) {
    const int64_t n = std::min(kChunk, cols - c);
    Vec partial(0.0);
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      const Vec exponential = exp_nonpositive((load_padded(values + c + j, count) - v_shift) * v_inv_t);
      partial += exponential;
      exponential.store(e + c + j, count);
    }
    sum += add_lanes(partial);
  }
  stats[0] = max;
  stats[1] = std::log(sum);
  return std::exp(-stats[1]);
}

// Centres the column accumulators (sums of values minus their column's shift) and writes col_moments and
// col_pearson. With offset = mean - shift, S = sum (y - shift)^2 - N offset^2 (in double: sum (y - shift)^2 is at
// most (N + 1) S, so S keeps all but log10(N + 1) of double's digits; a constant column is exactly 0).
template <typename Out>
void write_column_outputs(const ColumnAccumulators& columns, const std::vector<double>& shifts_s,
                          const std::vector<double>& shifts_t, int64_t row_count, int64_t cols,
                          const ForwardOutputs<Out>& out) {
  const double rows = static_cast<double>(row_count);
  for (int64_t c = 0; c < cols; ++c) {
    const double offset_s = columns.mean_s[c] / rows, offset_t = columns.mean_t[c] / rows;
    const CentredSums sums{columns.st[c] - rows * offset_s * offset_t,
                           std::max(0.0, columns.ss[c] - rows * offset_s * offset_s),
                           std::max(0.0, columns.tt[c] - rows * offset_t * offset_t)};
    double* moments = out.col_moments + 5 * c;
    moments[0] = shifts_s[c] + offset_s;
    moments[1] = shifts_t[c] + offset_t;
    moments[2] = sums.st;
    moments[3] = sums.ss;
    moments[4] = sums.tt;
    out.col_pearson[c] = static_cast<Out>(sums.pearson());
  }
}

// Row blocks of the forward, from the shape only.
struct RowBlocks {
  int64_t rows_per_block, count;

  RowBlocks(int64_t rows, int64_t cols) {
    rows_per_block = std::max({kMinBlockRows, rows_per_task(cols), ceil_div(rows, kMaxRowBlocks)});
    count = ceil_div(rows, rows_per_block);
  }
};

template <typename S, typename T, typename Out>
void forward(const Logits<S, T>& x, double temperature, const ForwardOutputs<Out>& out) {
  const double inv_t = 1.0 / temperature;
  const double row_centre = 1.0 / static_cast<double>(x.cols);
  // Row 0's y are the column shifts (a constant column then has values - shift exactly 0).
  std::vector<double> shifts_s(x.cols), shifts_t(x.cols), scratch(x.cols);
  auto first_row = [&](const auto* logits_row, std::vector<double>& shifts, double* stats) {
    const double inv_sum = row_exponentials(logits_row, x.cols, inv_t, scratch.data(), shifts.data(), stats);
    for (double& y : shifts) y *= inv_sum;
  };
  first_row(x.student_row(0), shifts_s, out.stats_student);
  first_row(x.teacher_row(0), shifts_t, out.stats_teacher);

  const RowBlocks blocks(x.rows, x.cols);
  std::vector<ColumnAccumulators> partials(blocks.count, ColumnAccumulators(x.cols));
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> widened(x.cols), e_s(x.cols), e_t(x.cols);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * blocks.rows_per_block;
      const int64_t last = std::min(x.rows, first + blocks.rows_per_block);
      for (int64_t row = first; row < last; ++row) {
        const Vec inv_sum_s(row_exponentials(x.student_row(row), x.cols, inv_t, widened.data(), e_s.data(),
                                             out.stats_student + 2 * row));
        const Vec inv_sum_t(row_exponentials(x.teacher_row(row), x.cols, inv_t, widened.data(), e_t.data(),
                                             out.stats_teacher + 2 * row));
        const double* es = e_s.data();
        const double* et = e_t.data();
        CentredSums sums;
        for (int64_t c = 0; c < x.cols; c += kChunk) {
          auto probs = [&](int64_t j, int64_t count) {
            return std::pair{Vec::loadu(es + c + j, count) * inv_sum_s, Vec::loadu(et + c + j, count) * inv_sum_t};
          };
          sums.add(accumulate_segment(probs, std::min(kChunk, x.cols - c), row_centre, shifts_s.data(),
                                      shifts_t.data(), partials[block], c));
        }
        write_row_outputs(sums, row, out);
      }
    }
  });
  for (int64_t block = 1; block < blocks.count; ++block) partials[0].add(partials[block]);
  write_column_outputs(partials[0], shifts_s, shifts_t, x.rows, x.cols, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// Per column: the centre (mean) of each side and grad_col[c] times the column's Pearson coefficients.
struct ColumnTerms {
  std::vector<double> mean_s, mean_t, alpha, beta_s, beta_t;

  template <typename Out>
  ColumnTerms(const Out* grad_col, const double* col_moments, int64_t cols)
      : mean_s(cols), mean_t(cols), alpha(cols), beta_s(cols), beta_t(cols) {
    for (int64_t c = 0; c < cols; ++c) {
      const double* moments = col_moments + 5 * c;
      const PearsonCoefficients k(static_cast<double>(grad_col[c]), moments[2], moments[3], moments[4]);
      mean_s[c] = moments[0];
      mean_t[c] = moments[1];
      alpha[c] = k.alpha;
      beta_s[c] = k.beta_s;
      beta_t[c] = k.beta_t;
    }
  }
};

// dL/dy of one row, at `count` entries from a column: its row term (centre 1/V) plus the columns' terms.
struct RowGradientTerms {
  RowSoftmax softmax_s, softmax_t;
  Vec centre, alpha, beta_s, beta_t;
  const ColumnTerms& columns;

  RowGradientTerms(const double* stats_student, const double* stats_teacher, double inv_t, double row_centre,
                   const PearsonCoefficients& row, const ColumnTerms& columns_)
      : softmax_s(stats_student, inv_t), softmax_t(stats_teacher, inv_t), centre(row_centre), alpha(row.alpha),
        beta_s(row.beta_s), beta_t(row.beta_t), columns(columns_) {}

  // dL/dy of the student (kStudent) or of the teacher at these y_s, y_t.
  template <bool kStudent>
  Vec gradient(const Vec& y_s, const Vec& y_t, int64_t column, int64_t count) const {
    const Vec a_row = y_s - centre, b_row = y_t - centre;
    const Vec a_col = y_s - Vec::loadu(columns.mean_s.data() + column, count);
    const Vec b_col = y_t - Vec::loadu(columns.mean_t.data() + column, count);
    const Vec alpha_col = Vec::loadu(columns.alpha.data() + column, count);
    if constexpr (kStudent) {
      const Vec beta_col = Vec::loadu(columns.beta_s.data() + column, count);
      return alpha * b_row - beta_s * a_row + alpha_col * b_col - beta_col * a_col;
    } else {
      const Vec beta_col = Vec::loadu(columns.beta_t.data() + column, count);
      return alpha * a_row - beta_t * b_row + alpha_col * a_col - beta_col * b_col;
    }
  }
};

template <typename Out>
struct BackwardInputs {
  const Out *grad_row, *grad_col;
  const double *row_moments, *col_moments, *stats_student, *stats_teacher;
};

// Writes one row's gradient 1/T (gy - dot y) from the row's kept y and y dL/dy, narrowing chunk by chunk.
template <typename X>
void write_row_gradient(const double* y, const double* gy, double dot, double inv_t, int64_t cols, X* grad_row,
                        double* buffer) {
  const Vec v_inv_t(inv_t), v_dot(dot);
  for (int64_t c = 0; c < cols; c += kChunk) {
    const int64_t n = std::min(kChunk, cols - c);
    double* out = chunk_destination(grad_row, c, buffer);
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      (v_inv_t * (Vec::loadu(gy + c + j, count) - v_dot * Vec::loadu(y + c + j, count))).store(out + j, count);
    }
    store_from_acc(out, grad_row + c, n);
  }
}

// The rows of the requested gradients (kStudent, kTeacher: which).
template <bool kStudent, bool kTeacher, typename S, typename T, typename Out>
void backward_rows(const Logits<S, T>& x, double temperature, const BackwardInputs<Out>& in, S* grad_student,
                   T* grad_teacher) {
  const double inv_t = 1.0 / temperature;
  const double row_centre = 1.0 / static_cast<double>(x.cols);
  const ColumnTerms columns(in.grad_col, in.col_moments, x.cols);
  at::parallel_for(0, x.rows, rows_per_task(x.cols), [&](int64_t begin, int64_t end) {
    alignas(64) double s_buffer[kChunk];
    alignas(64) double t_buffer[kChunk];
    alignas(64) double grad_buffer[kChunk];
    // The first walk keeps y and y dL/dy of the row (a few hundred KiB at most: in cache) so that the second walk
    // writes the gradient without re-reading the logits or recomputing an exponential.
    std::vector<double> kept(2 * (int{kStudent} + int{kTeacher}) * x.cols);
    double* __restrict__ y_s_row = kept.data();
    double* __restrict__ gy_s_row = y_s_row + x.cols;
    double* __restrict__ y_t_row = kStudent ? gy_s_row + x.cols : kept.data();
    double* __restrict__ gy_t_row = y_t_row + x.cols;
    for (int64_t row = begin; row < end; ++row) {
      const double* moments = in.row_moments + 3 * row;
      const RowGradientTerms terms(
          in.stats_student + 2 * row, in.stats_teacher + 2 * row, inv_t, row_centre,
          PearsonCoefficients(static_cast<double>(in.grad_row[row]), moments[0], moments[1], moments[2]), columns);
      double dot_s = 0.0, dot_t = 0.0;
      for_each_chunk_pair(x.student_row(row), x.teacher_row(row), x.cols, s_buffer, t_buffer,
                          [&](int64_t c, const double* s, const double* t, int64_t n) {
                            Vec sum_s(0.0), sum_t(0.0);
                            for (int64_t j = 0; j < n; j += Vec::size()) {
                              const int64_t count = std::min<int64_t>(Vec::size(), n - j);
                              const Vec y_s = terms.softmax_s.at(s + j, count);
                              const Vec y_t = terms.softmax_t.at(t + j, count);
                              if constexpr (kStudent) {
                                const Vec gy = terms.gradient<true>(y_s, y_t, c + j, count) * y_s;
                                sum_s += gy;
                                y_s.store(y_s_row + c + j, count);
                                gy.store(gy_s_row + c + j, count);
                              }
                              if constexpr (kTeacher) {
                                const Vec gy = terms.gradient<false>(y_s, y_t, c + j, count) * y_t;
                                sum_t += gy;
                                y_t.store(y_t_row + c + j, count);
                                gy.store(gy_t_row + c + j, count);
                              }
                            }
                            dot_s += add_lanes(sum_s);
                            dot_t += add_lanes(sum_t);
                          });
      // grad = 1/T y (dL/dy - dot) = 1/T (y dL/dy - dot y)
      if constexpr (kStudent) {
        write_row_gradient(y_s_row, gy_s_row, dot_s, inv_t, x.cols, grad_student + row * x.cols, grad_buffer);
      }
      if constexpr (kTeacher) {
        write_row_gradient(y_t_row, gy_t_row, dot_t, inv_t, x.cols, grad_teacher + row * x.cols, grad_buffer);
      }
    }
  });
}

template <typename S, typename T, typename Out>
void backward(const Logits<S, T>& x, double temperature, const BackwardInputs<Out>& in, S* grad_student,
              T* grad_teacher) {
  if (grad_student && grad_teacher) {
    backward_rows<true, true>(x, temperature, in, grad_student, grad_teacher);
  } else if (grad_student) {
    backward_rows<true, false>(x, temperature, in, grad_student, grad_teacher);
  } else {
    backward_rows<false, true>(x, temperature, in, grad_student, grad_teacher);
  }
}

template <typename S, typename T>
Logits<S, T> logits_view(const at::Tensor& student, const at::Tensor& teacher) {
  return {student.const_data_ptr<S>(), student.stride(0), teacher.const_data_ptr<T>(), teacher.stride(0),
          student.size(0), student.size(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dist_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  dist::check_forward_inputs(student, teacher, temperature, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  const auto saved = student.options().dtype(at::kDouble);
  at::Tensor row_pearson = at::empty({rows}, options);
  at::Tensor row_moments = at::empty({rows, 3}, saved);
  at::Tensor stats_student = at::empty({rows, 2}, saved);
  at::Tensor stats_teacher = at::empty({rows, 2}, saved);
  // An empty batch has no column statistics: zeros.
  at::Tensor col_pearson = rows == 0 ? at::zeros({cols}, options) : at::empty({cols}, options);
  at::Tensor col_moments = rows == 0 ? at::zeros({cols, 5}, saved) : at::empty({cols, 5}, saved);
  if (rows > 0) {
    host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using Out = acc_type_t<S, T>;
      forward(logits_view<S, T>(student, teacher), temperature,
              ForwardOutputs<Out>{row_pearson.mutable_data_ptr<Out>(), col_pearson.mutable_data_ptr<Out>(),
                                  row_moments.mutable_data_ptr<double>(), col_moments.mutable_data_ptr<double>(),
                                  stats_student.mutable_data_ptr<double>(), stats_teacher.mutable_data_ptr<double>()});
    });
  }
  return {row_pearson, col_pearson, row_moments, col_moments, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> dist_backward_cpu(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                     const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& row_moments, const at::Tensor& col_moments,
                                                     const at::Tensor& stats_student, const at::Tensor& stats_teacher,
                                                     double temperature, bool student_grad, bool teacher_grad) {
  dist::check_backward_inputs(grad_row, grad_col, student, teacher, row_moments, col_moments, stats_student,
                              stats_teacher, temperature, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student = student_grad ? empty_gradient(rows, cols, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? empty_gradient(rows, cols, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Out = acc_type_t<S, T>;
    backward(logits_view<S, T>(student, teacher), temperature,
             BackwardInputs<Out>{grad_row.const_data_ptr<Out>(), grad_col.const_data_ptr<Out>(),
                                 row_moments.const_data_ptr<double>(), col_moments.const_data_ptr<double>(),
                                 stats_student.const_data_ptr<double>(), stats_teacher.const_data_ptr<double>()},
             student_grad ? grad_student.mutable_data_ptr<S>() : nullptr,
             teacher_grad ? grad_teacher.mutable_data_ptr<T>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("dist_forward", &dist_forward_cpu);
  m.impl("dist_backward", &dist_backward_cpu);
}

}  // namespace kdkernels
