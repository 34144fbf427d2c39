// CPU kernels of the dist family: DIST's Pearson correlations of y_s = softmax(s / T) and y_t = softmax(t / T) over
// a batch [N, V], and their gradients. Spec: kdkernels/reference/dist.py.
//
//   pearson = S_st / (sqrt(S_ss) sqrt(S_tt) + 1e-8),   S_ab = sum (y_a - centre_a) (y_b - centre_b)
// per row (centre 1/V) and per column (centre: the column's mean across the batch).
// Forward: each column's sums, squares and products of y minus the column's value in the first row are summed in
// acc_t over tiles of 4 rows, then in double, and centred at the column mean at the end (a constant column gives
// exactly 0); each row's centred sums come from the same y. Two strategies:
//   V <= 4096: rows in parallel, each row's softmax formed once (max, then exp, then scale); per-thread column
//      accumulators (in cache) added up at the end;
//   V > 4096: every row's (max, log_sum) first, then column blocks in parallel, each thread walking every row of its
//      blocks, so that its column accumulators stay in cache.
// Backward, rows in parallel, with a = y_s - centre, b = y_t - centre, D = sqrt(S_ss) sqrt(S_tt) + 1e-8:
//   dr/dy_s = b / D - S_st sqrt(S_tt) / (sqrt(S_ss) D^2) a   (second term 0 when S_ss = 0; swap s and t for y_t)
//   g_s[n, c] = grad_row[n] dr_row/dy_s + grad_col[c] dr_col/dy_s,   grad_s = 1/T y_s (g_s - sum_j g_s y_s)
// in two walks of each row: the dot product (keeping y and y dL/dy of the row), then the write. Per-row and
// per-column sums and coefficients are double; per-element arithmetic is vectorised float (double for double inputs).
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
#include <vector>

#include "../common/cpu_rows.h"
#include "dist_host.h"

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;

constexpr double kEps = 1e-8;             // the reference's cosine epsilon
constexpr int64_t kMaxBlockWidth = 1024;  // columns per block of the column-block forward: row segments of <= 8 KiB
constexpr int64_t kRowWiseMaxCols = 4096;  // up to this V the forward walks rows (its accumulators fit in L2)

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
// row: at high temperatures y is close to 1/V and its centred values are small differences, which an exponent
// formed as (x - max) / T - log_sum would blur by the rounding of log_sum ~ log V. The forward and the backward
// both form y here, so that they agree bit for bit (a constant column's centred values are then exactly 0 in both).
template <typename acc_t>
struct RowSoftmax {
  Vectorized<acc_t> max, inv_t, inv_sum;

  RowSoftmax(const acc_t* stats, acc_t inv_t_)
      : max(stats[0]), inv_t(inv_t_), inv_sum(static_cast<acc_t>(std::exp(-static_cast<double>(stats[1])))) {}

  // The lanes past `count` are 0.
  Vectorized<acc_t> at(const acc_t* x, int64_t count) const {
    return ((load_padded(x, count) - max) * inv_t).exp() * inv_sum;
  }
};

struct CentredSums {
  double st = 0.0, ss = 0.0, tt = 0.0;

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

// The centred sums of n values of a row segment, centre `centre`.
template <typename acc_t>
CentredSums row_centred_sums(const acc_t* y_s, const acc_t* y_t, int64_t n, acc_t centre) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), v_centre(centre);
  Vec st(zero), ss(zero), tt(zero);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec a = Vec::set(zero, Vec::loadu(y_s + j, count) - v_centre, count);
    const Vec b = Vec::set(zero, Vec::loadu(y_t + j, count) - v_centre, count);
    st = at::vec::fmadd(a, b, st);
    ss = at::vec::fmadd(a, a, ss);
    tt = at::vec::fmadd(b, b, tt);
  }
  auto add = [](Vec& p, Vec& q) { return p + q; };
  return {at::vec::vec_reduce_all<acc_t>(add, st), at::vec::vec_reduce_all<acc_t>(add, ss),
          at::vec::vec_reduce_all<acc_t>(add, tt)};
}

// Per-column accumulators of the forward, in double: the first row's y (the shift), the sums of y - shift (then
// the means) and the centred sums.
struct ColumnAccumulators {
  std::vector<double> mean_s, mean_t, st, ss, tt;

  explicit ColumnAccumulators(int64_t cols)
      : mean_s(cols), mean_t(cols), st(cols), ss(cols), tt(cols) {}
};

constexpr int64_t kTileRows = 4;  // rows summed in acc_t before they are added to the double column sums

// Column sums, squares and products of values minus their column's shift, over a tile of kTileRows rows in acc_t
// (vectorised, in cache), then added to the double accumulators: fp32 rounding over 4 terms, double over the batch.
template <typename acc_t>
struct ShiftedMomentTile {
  std::vector<acc_t> sum_s, sum_t, st, ss, tt;

  explicit ShiftedMomentTile(int64_t cols) : sum_s(cols), sum_t(cols), st(cols), ss(cols), tt(cols) {}

  void add(const acc_t* y_s, const acc_t* y_t, const acc_t* shift_s, const acc_t* shift_t, int64_t first,
           int64_t n) {
    using Vec = Vectorized<acc_t>;
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      const int64_t c = first + j;
      const Vec a = Vec::loadu(y_s + j, count) - Vec::loadu(shift_s + c, count);
      const Vec b = Vec::loadu(y_t + j, count) - Vec::loadu(shift_t + c, count);
      (Vec::loadu(sum_s.data() + c, count) + a).store(sum_s.data() + c, count);
      (Vec::loadu(sum_t.data() + c, count) + b).store(sum_t.data() + c, count);
      at::vec::fmadd(a, b, Vec::loadu(st.data() + c, count)).store(st.data() + c, count);
      at::vec::fmadd(a, a, Vec::loadu(ss.data() + c, count)).store(ss.data() + c, count);
      at::vec::fmadd(b, b, Vec::loadu(tt.data() + c, count)).store(tt.data() + c, count);
    }
  }

  void flush_into(ColumnAccumulators& columns, int64_t first, int64_t n) {
    const std::pair<std::vector<acc_t>*, std::vector<double>*> pairs[] = {
        {&sum_s, &columns.mean_s}, {&sum_t, &columns.mean_t}, {&st, &columns.st}, {&ss, &columns.ss},
        {&tt, &columns.tt}};
    for (const auto& [tile, total] : pairs) {
      for (int64_t c = first; c < first + n; ++c) (*total)[c] += static_cast<double>((*tile)[c]);
      std::fill(tile->begin() + first, tile->begin() + first + n, acc_t(0));
    }
  }
};

template <typename acc_t>
struct ForwardOutputs {
  acc_t *row_pearson, *col_pearson, *row_moments, *col_moments, *stats_student, *stats_teacher;
};

// One row's softmax of both sides into y_s, y_t [cols] (acc_t), and its stats (max, log_sum): the max first, then
// e = exp((x - max) / T) once per element, y = e * exp(-log_sum) with exp(-log_sum) formed from the stored log_sum
// exactly as RowSoftmax does, so that the backward recomputes the very same y.
template <typename acc_t, typename X>
void row_softmax(const X* x, int64_t cols, acc_t inv_t, acc_t* widened, acc_t* y, acc_t* stats) {
  using Vec = Vectorized<acc_t>;
  const acc_t* values = as_acc(x, widened, cols);
  const acc_t max = max_of(values, cols);
  const double shift = safe_shift(max);
  const Vec v_shift(static_cast<acc_t>(shift)), v_inv_t(inv_t);
  double sum = 0.0;
  for (int64_t c = 0; c < cols; c += kChunk) {
    const int64_t n = std::min(kChunk, cols - c);
    Vec partial(acc_t(0));
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      const Vec e = ((load_padded(values + c + j, count) - v_shift) * v_inv_t).exp();
      partial += e;
      e.store(y + c + j, count);
    }
    sum += at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, partial);
  }
  stats[0] = max;
  stats[1] = static_cast<acc_t>(std::log(sum));
  const Vec inv_sum(static_cast<acc_t>(std::exp(-static_cast<double>(stats[1]))));
  for (int64_t j = 0; j < cols; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), cols - j);
    (Vec::loadu(y + j, count) * inv_sum).store(y + j, count);
  }
}

// Centres the column accumulators and writes col_moments and col_pearson. Sums of values shifted by a sample of
// their own column are centred by subtracting n mean^2 (in double, with |mean - shift| of the order of the column's
// spread, this loses about one digit; a constant column is exactly 0).
template <typename acc_t>
void write_column_outputs(ColumnAccumulators& columns, const std::vector<acc_t>& shifts_s,
                          const std::vector<acc_t>& shifts_t, int64_t row_count, int64_t cols,
                          const ForwardOutputs<acc_t>& out) {
  const double rows = static_cast<double>(row_count);
  for (int64_t c = 0; c < cols; ++c) {
    const double offset_s = columns.mean_s[c] / rows, offset_t = columns.mean_t[c] / rows;
    columns.st[c] -= rows * offset_s * offset_t;
    columns.ss[c] = std::max(0.0, columns.ss[c] - rows * offset_s * offset_s);
    columns.tt[c] = std::max(0.0, columns.tt[c] - rows * offset_t * offset_t);
    columns.mean_s[c] = static_cast<double>(shifts_s[c]) + offset_s;
    columns.mean_t[c] = static_cast<double>(shifts_t[c]) + offset_t;
  }

  for (int64_t c = 0; c < cols; ++c) {
    const CentredSums sums{columns.st[c], columns.ss[c], columns.tt[c]};
    acc_t* moments = out.col_moments + 5 * c;
    moments[0] = static_cast<acc_t>(columns.mean_s[c]);
    moments[1] = static_cast<acc_t>(columns.mean_t[c]);
    moments[2] = static_cast<acc_t>(sums.st);
    moments[3] = static_cast<acc_t>(sums.ss);
    moments[4] = static_cast<acc_t>(sums.tt);
    out.col_pearson[c] = static_cast<acc_t>(sums.pearson());
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The column blocks of pass 2: a multiple of the thread count, at most kMaxBlockWidth wide, whole vectors.
struct ColumnBlocks {
  int64_t width, count;

  explicit ColumnBlocks(int64_t cols) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t wanted = ceil_div(std::max(ceil_div(cols, kMaxBlockWidth), threads), threads) * threads;
    constexpr int64_t kLanes = 16;  // a whole number of vectors of every acc_t and ISA
    width = ceil_div(ceil_div(cols, wanted), kLanes) * kLanes;
    count = ceil_div(cols, width);
  }
};

// Pass 1: each row's (max, log_sum) of both sides.
template <typename S, typename T>
void row_statistics(const Logits<S, T>& x, acc_type_t<S, T> inv_t, acc_type_t<S, T>* stats_student,
                    acc_type_t<S, T>* stats_teacher) {
  using acc_t = acc_type_t<S, T>;
  at::parallel_for(0, x.rows, rows_per_task(x.cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      LogSumState side_s, side_t;
      for_each_chunk_pair(x.student_row(row), x.teacher_row(row), x.cols, s_buffer, t_buffer,
                          [&](int64_t, const acc_t* s, const acc_t* t, int64_t n) {
                            log_sum_chunk<acc_t>(side_s, s, n, inv_t);
                            log_sum_chunk<acc_t>(side_t, t, n, inv_t);
                          });
      stats_student[2 * row] = static_cast<acc_t>(side_s.max);
      stats_student[2 * row + 1] = static_cast<acc_t>(std::log(side_s.sum));
      stats_teacher[2 * row] = static_cast<acc_t>(side_t.max);
      stats_teacher[2 * row + 1] = static_cast<acc_t>(std::log(side_t.sum));
    }
  });
}

// Column blocks in parallel; within a block, every row in order: visit(block, first_column, n, row, y_s, y_t) with
// the row's n values of y_s and y_t in the block.
template <typename S, typename T, typename Visit>
void walk_column_blocks(const Logits<S, T>& x, const ColumnBlocks& blocks, const acc_type_t<S, T>* stats_student,
                        const acc_type_t<S, T>* stats_teacher, acc_type_t<S, T> inv_t, Visit visit) {
  using acc_t = acc_type_t<S, T>;
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kMaxBlockWidth];
    alignas(64) acc_t t_buffer[kMaxBlockWidth];
    alignas(64) acc_t y_s[kMaxBlockWidth];
    alignas(64) acc_t y_t[kMaxBlockWidth];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * blocks.width;
      const int64_t n = std::min(blocks.width, x.cols - first);
      for (int64_t row = 0; row < x.rows; ++row) {
        const acc_t* s = as_acc(x.student_row(row) + first, s_buffer, n);
        const acc_t* t = as_acc(x.teacher_row(row) + first, t_buffer, n);
        const RowSoftmax<acc_t> softmax_s(stats_student + 2 * row, inv_t), softmax_t(stats_teacher + 2 * row, inv_t);
        for (int64_t j = 0; j < n; j += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), n - j);
          softmax_s.at(s + j, count).store(y_s + j, count);
          softmax_t.at(t + j, count).store(y_t + j, count);
        }
        visit(block, first, n, row, y_s, y_t);
      }
    }
  });
}

// Short rows (the column accumulators stay in cache): rows in parallel, each row's softmax formed once.
template <typename S, typename T>
void forward_by_rows(const Logits<S, T>& x, double temperature, const ForwardOutputs<acc_type_t<S, T>>& out) {
  using acc_t = acc_type_t<S, T>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t row_centre = static_cast<acc_t>(1.0 / static_cast<double>(x.cols));
  // Row 0's y are the column shifts (a constant column then has values - shift exactly 0).
  std::vector<acc_t> shifts_s(x.cols), shifts_t(x.cols), scratch(x.cols);
  row_softmax(x.student_row(0), x.cols, inv_t, scratch.data(), shifts_s.data(), out.stats_student);
  row_softmax(x.teacher_row(0), x.cols, inv_t, scratch.data(), shifts_t.data(), out.stats_teacher);
  // Rows in parallel; each thread sums its rows' column moments in its own accumulators, added up afterwards.
  std::vector<ColumnAccumulators> partials(at::get_num_threads(), ColumnAccumulators(x.cols));
  at::parallel_for(0, x.rows, rows_per_task(x.cols), [&](int64_t begin, int64_t end) {
    ColumnAccumulators& columns = partials[at::get_thread_num()];
    ShiftedMomentTile<acc_t> tile(x.cols);
    std::vector<acc_t> widened(x.cols), y_s(x.cols), y_t(x.cols);
    int64_t tile_rows = 0;
    for (int64_t row = begin; row < end; ++row) {
      row_softmax(x.student_row(row), x.cols, inv_t, widened.data(), y_s.data(), out.stats_student + 2 * row);
      row_softmax(x.teacher_row(row), x.cols, inv_t, widened.data(), y_t.data(), out.stats_teacher + 2 * row);
      CentredSums sums;  // vector sums in acc_t per chunk, added up in double
      for (int64_t c = 0; c < x.cols; c += kChunk) {
        const CentredSums part = row_centred_sums(y_s.data() + c, y_t.data() + c, std::min(kChunk, x.cols - c),
                                                  row_centre);
        sums.st += part.st;
        sums.ss += part.ss;
        sums.tt += part.tt;
      }
      out.row_moments[3 * row] = static_cast<acc_t>(sums.st);
      out.row_moments[3 * row + 1] = static_cast<acc_t>(sums.ss);
      out.row_moments[3 * row + 2] = static_cast<acc_t>(sums.tt);
      out.row_pearson[row] = static_cast<acc_t>(sums.pearson());
      tile.add(y_s.data(), y_t.data(), shifts_s.data(), shifts_t.data(), 0, x.cols);
      if (++tile_rows == kTileRows || row + 1 == end) {
        tile.flush_into(columns, 0, x.cols);
        tile_rows = 0;
      }
    }
  });
  ColumnAccumulators& columns = partials[0];
  for (size_t part = 1; part < partials.size(); ++part) {
    for (int64_t c = 0; c < x.cols; ++c) {
      columns.mean_s[c] += partials[part].mean_s[c];
      columns.mean_t[c] += partials[part].mean_t[c];
      columns.st[c] += partials[part].st[c];
      columns.ss[c] += partials[part].ss[c];
      columns.tt[c] += partials[part].tt[c];
    }
  }
  write_column_outputs(columns, shifts_s, shifts_t, x.rows, x.cols, out);
}

// Long rows: (max, log_sum) of every row first, then column blocks in parallel, each thread walking every row of
// its blocks, so that its column accumulators stay in cache.
template <typename S, typename T>
void forward_by_column_blocks(const Logits<S, T>& x, double temperature, const ForwardOutputs<acc_type_t<S, T>>& out) {
  using acc_t = acc_type_t<S, T>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  row_statistics(x, inv_t, out.stats_student, out.stats_teacher);

  const ColumnBlocks blocks(x.cols);
  const acc_t row_centre = static_cast<acc_t>(1.0 / static_cast<double>(x.cols));
  std::vector<CentredSums> row_partials(x.rows * blocks.count);
  ColumnAccumulators columns(x.cols);
  ShiftedMomentTile<acc_t> tile(x.cols);  // each block's columns belong to one thread
  std::vector<acc_t> shifts_s(x.cols), shifts_t(x.cols);
  walk_column_blocks(x, blocks, out.stats_student, out.stats_teacher, inv_t,
                     [&](int64_t block, int64_t first, int64_t n, int64_t row, const acc_t* y_s, const acc_t* y_t) {
                       row_partials[row * blocks.count + block] = row_centred_sums(y_s, y_t, n, row_centre);
                       if (row == 0) {
                         std::copy(y_s, y_s + n, shifts_s.data() + first);
                         std::copy(y_t, y_t + n, shifts_t.data() + first);
                       }
                       tile.add(y_s, y_t, shifts_s.data(), shifts_t.data(), first, n);
                       if ((row + 1) % kTileRows == 0 || row + 1 == x.rows) tile.flush_into(columns, first, n);
                     });

  for (int64_t row = 0; row < x.rows; ++row) {
    CentredSums sums;
    for (int64_t block = 0; block < blocks.count; ++block) {
      const CentredSums& part = row_partials[row * blocks.count + block];
      sums.st += part.st;
      sums.ss += part.ss;
      sums.tt += part.tt;
    }
    out.row_moments[3 * row] = static_cast<acc_t>(sums.st);
    out.row_moments[3 * row + 1] = static_cast<acc_t>(sums.ss);
    out.row_moments[3 * row + 2] = static_cast<acc_t>(sums.tt);
    out.row_pearson[row] = static_cast<acc_t>(sums.pearson());
  }
  write_column_outputs(columns, shifts_s, shifts_t, x.rows, x.cols, out);
}

template <typename S, typename T>
void forward(const Logits<S, T>& x, double temperature, const ForwardOutputs<acc_type_t<S, T>>& out) {
  if (x.cols <= kRowWiseMaxCols) {
    forward_by_rows(x, temperature, out);
  } else {
    forward_by_column_blocks(x, temperature, out);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// Per column, in acc_t: the centre (mean) of each side and grad_col[c] times the column's Pearson coefficients.
template <typename acc_t>
struct ColumnTerms {
  std::vector<acc_t> mean_s, mean_t, alpha, beta_s, beta_t;

  ColumnTerms(const acc_t* grad_col, const acc_t* col_moments, int64_t cols)
      : mean_s(cols), mean_t(cols), alpha(cols), beta_s(cols), beta_t(cols) {
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t* moments = col_moments + 5 * c;
      const PearsonCoefficients k(grad_col[c], moments[2], moments[3], moments[4]);
      mean_s[c] = moments[0];
      mean_t[c] = moments[1];
      alpha[c] = static_cast<acc_t>(k.alpha);
      beta_s[c] = static_cast<acc_t>(k.beta_s);
      beta_t[c] = static_cast<acc_t>(k.beta_t);
    }
  }
};

template <typename acc_t>
struct ElementTerms {
  Vectorized<acc_t> y_s, y_t, g_s, g_t;  // g = dL/dy
};

// dL/dy of one row at `count` entries from a column: its row term (centre 1/V) plus the columns' terms.
template <typename acc_t>
struct RowGradientTerms {
  using Vec = Vectorized<acc_t>;
  RowSoftmax<acc_t> softmax_s, softmax_t;
  Vec centre, alpha, beta_s, beta_t;
  const ColumnTerms<acc_t>& columns;

  RowGradientTerms(const acc_t* stats_student, const acc_t* stats_teacher, acc_t inv_t, acc_t row_centre,
                   const PearsonCoefficients& row, const ColumnTerms<acc_t>& columns_)
      : softmax_s(stats_student, inv_t), softmax_t(stats_teacher, inv_t), centre(row_centre),
        alpha(static_cast<acc_t>(row.alpha)), beta_s(static_cast<acc_t>(row.beta_s)),
        beta_t(static_cast<acc_t>(row.beta_t)), columns(columns_) {}

  ElementTerms<acc_t> at(const acc_t* s, const acc_t* t, int64_t column, int64_t count) const {
    const Vec y_s = softmax_s.at(s, count), y_t = softmax_t.at(t, count);
    const Vec a_row = y_s - centre, b_row = y_t - centre;
    const Vec a_col = y_s - Vec::loadu(columns.mean_s.data() + column, count);
    const Vec b_col = y_t - Vec::loadu(columns.mean_t.data() + column, count);
    const Vec alpha_col = Vec::loadu(columns.alpha.data() + column, count);
    const Vec beta_s_col = Vec::loadu(columns.beta_s.data() + column, count);
    const Vec beta_t_col = Vec::loadu(columns.beta_t.data() + column, count);
    const Vec g_s = alpha * b_row - beta_s * a_row + alpha_col * b_col - beta_s_col * a_col;
    const Vec g_t = alpha * a_row - beta_t * b_row + alpha_col * a_col - beta_t_col * b_col;
    return {y_s, y_t, g_s, g_t};
  }
};

template <typename acc_t>
struct BackwardInputs {
  const acc_t *grad_row, *grad_col, *row_moments, *col_moments, *stats_student, *stats_teacher;
};

// Writes one row's gradient 1/T (gy - dot y) from the row's kept y and y dL/dy, narrowing chunk by chunk.
template <typename acc_t, typename X>
void write_row_gradient(const acc_t* y, const acc_t* gy, acc_t dot, acc_t inv_t, int64_t cols, X* grad_row,
                        acc_t* buffer) {
  using Vec = Vectorized<acc_t>;
  const Vec v_inv_t(inv_t), v_dot(dot);
  for (int64_t c = 0; c < cols; c += kChunk) {
    const int64_t n = std::min(kChunk, cols - c);
    acc_t* out = chunk_destination(grad_row, c, buffer);
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      (v_inv_t * (Vec::loadu(gy + c + j, count) - v_dot * Vec::loadu(y + c + j, count))).store(out + j, count);
    }
    store_from_acc(out, grad_row + c, n);
  }
}

template <typename S, typename T>
void backward(const Logits<S, T>& x, double temperature, const BackwardInputs<acc_type_t<S, T>>& in, S* grad_student,
              T* grad_teacher) {
  using acc_t = acc_type_t<S, T>;
  using Vec = Vectorized<acc_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t row_centre = static_cast<acc_t>(1.0 / static_cast<double>(x.cols));
  const ColumnTerms<acc_t> columns(in.grad_col, in.col_moments, x.cols);
  auto add = [](Vec& p, Vec& q) { return p + q; };
  at::parallel_for(0, x.rows, rows_per_task(x.cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    alignas(64) acc_t gs_buffer[kChunk];
    alignas(64) acc_t gt_buffer[kChunk];
    // The first walk keeps y and y * dL/dy of the row (in acc_t, a few hundred KiB at most: in cache) so that the
    // second walk writes the gradient without re-reading the logits or recomputing an exponential.
    std::vector<acc_t> y_s_row(grad_student ? x.cols : 0), gy_s_row(grad_student ? x.cols : 0);
    std::vector<acc_t> y_t_row(grad_teacher ? x.cols : 0), gy_t_row(grad_teacher ? x.cols : 0);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* moments = in.row_moments + 3 * row;
      const RowGradientTerms<acc_t> terms(in.stats_student + 2 * row, in.stats_teacher + 2 * row, inv_t, row_centre,
                                          PearsonCoefficients(in.grad_row[row], moments[0], moments[1], moments[2]),
                                          columns);
      double dot_s = 0.0, dot_t = 0.0;
      for_each_chunk_pair(x.student_row(row), x.teacher_row(row), x.cols, s_buffer, t_buffer,
                          [&](int64_t c, const acc_t* s, const acc_t* t, int64_t n) {
                            Vec sum_s(acc_t(0)), sum_t(acc_t(0));
                            for (int64_t j = 0; j < n; j += Vec::size()) {
                              const int64_t count = std::min<int64_t>(Vec::size(), n - j);
                              const ElementTerms<acc_t> e = terms.at(s + j, t + j, c + j, count);
                              const Vec gy_s = e.g_s * e.y_s, gy_t = e.g_t * e.y_t;
                              sum_s += gy_s;
                              sum_t += gy_t;
                              if (grad_student) {
                                e.y_s.store(y_s_row.data() + c + j, count);
                                gy_s.store(gy_s_row.data() + c + j, count);
                              }
                              if (grad_teacher) {
                                e.y_t.store(y_t_row.data() + c + j, count);
                                gy_t.store(gy_t_row.data() + c + j, count);
                              }
                            }
                            dot_s += at::vec::vec_reduce_all<acc_t>(add, sum_s);
                            dot_t += at::vec::vec_reduce_all<acc_t>(add, sum_t);
                          });
      // grad = 1/T y (dL/dy - dot) = 1/T (y dL/dy - dot y)
      if (grad_student) {
        write_row_gradient(y_s_row.data(), gy_s_row.data(), static_cast<acc_t>(dot_s), inv_t, x.cols,
                           grad_student + row * x.cols, gs_buffer);
      }
      if (grad_teacher) {
        write_row_gradient(y_t_row.data(), gy_t_row.data(), static_cast<acc_t>(dot_t), inv_t, x.cols,
                           grad_teacher + row * x.cols, gt_buffer);
      }
    }
  });
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
  at::Tensor row_pearson = at::empty({rows}, options);
  at::Tensor row_moments = at::empty({rows, 3}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  // An empty batch has no column statistics: zeros.
  at::Tensor col_pearson = rows == 0 ? at::zeros({cols}, options) : at::empty({cols}, options);
  at::Tensor col_moments = rows == 0 ? at::zeros({cols, 5}, options) : at::empty({cols, 5}, options);
  if (rows > 0) {
    host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using acc_t = acc_type_t<S, T>;
      forward(logits_view<S, T>(student, teacher), temperature,
              ForwardOutputs<acc_t>{row_pearson.mutable_data_ptr<acc_t>(), col_pearson.mutable_data_ptr<acc_t>(),
                                    row_moments.mutable_data_ptr<acc_t>(), col_moments.mutable_data_ptr<acc_t>(),
                                    stats_student.mutable_data_ptr<acc_t>(), stats_teacher.mutable_data_ptr<acc_t>()});
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
    using acc_t = acc_type_t<S, T>;
    backward(logits_view<S, T>(student, teacher), temperature,
             BackwardInputs<acc_t>{grad_row.const_data_ptr<acc_t>(), grad_col.const_data_ptr<acc_t>(),
                                   row_moments.const_data_ptr<acc_t>(), col_moments.const_data_ptr<acc_t>(),
                                   stats_student.const_data_ptr<acc_t>(), stats_teacher.const_data_ptr<acc_t>()},
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
