// CPU kernels of the softmax_kl family: per-row KL(softmax(t/T) || softmax(s/T)) and its gradients.
//
// Numerical spec: kdkernels/reference/softmax_kl.py. Rows run in parallel (at::parallel_for). Each row is walked
// in L1-sized chunks: a chunk's maxima move the row's online state, then the chunk is accumulated with vectorised
// exp, so the forward reads each input from memory once. Half/bfloat16 chunks are widened to float first; all
// arithmetic is float (double for double inputs) and the per-row state is kept in double.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include "../common/cpu_rows.h"
#include "softmax_kl_host.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;

// Online state of one row, in raw-logit units: M = running max of the raw logits, m~ = safe_shift(M) and
// x^ = (x - m~) / T. Then sum_s = sum exp(s^), sum_t = sum exp(t^) and acc = sum e_t (t^ - s^) over entries with
// e_t = exp(t^) > 0. Exponents formed as (x - m~) / T are exact near the max, however large |x| / T is.
struct RowState {
  double max_s = kNegInf, sum_s = 0.0;
  double max_t = kNegInf, sum_t = 0.0;
  double acc = 0.0;

  // Re-expresses the sums against larger maxima: acc' = c (acc + (ds - dt) sum_t), c = exp(-dt),
  // with dt = (m~_t' - m~_t) / T and ds = (m~_s' - m~_s) / T.
  void rebase(double new_max_s, double new_max_t, double inv_t) {
    const double delta_s = (safe_shift(new_max_s) - safe_shift(max_s)) * inv_t;
    const double delta_t = (safe_shift(new_max_t) - safe_shift(max_t)) * inv_t;
    if (max_t != kNegInf) {
      const double c = std::exp(-delta_t);
      // c == 0: the old teacher mass underflows, so its terms have p_t == 0 and contribute 0 (an acc of +inf from a
      // student -inf under a finite teacher entry must not become 0 * inf = NaN).
      acc = c == 0.0 ? 0.0 : c * (acc + (delta_s - delta_t) * sum_t);
      sum_t *= c;
    }
    if (max_s != kNegInf) sum_s *= std::exp(-delta_s);
    max_s = new_max_s;
    max_t = new_max_t;
  }

  // KL from the final state and the row's log-sums (log p = (x - max) / T - log_sum).
  double loss(double log_sum_s, double log_sum_t) const {
    if (max_t == kNegInf) return 0.0;                                      // empty teacher row
    if (max_s == kNegInf) return std::numeric_limits<double>::infinity();  // all -inf student, finite teacher
    return acc / sum_t - log_sum_t + log_sum_s;
  }
};

// The sum of a vector's lanes in double: the row state is double, and an acc_t horizontal reduction would round the
// chunk's partial sum once per level (where the KL cancels, a loss far below its terms, that alone costs several times
// the eager formula's error).
template <typename acc_t>
double lane_sum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double sum = 0.0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) sum += lanes[i];
  return sum;
}

// `maxima_final`: the state already holds the row's maxima (taken first on multi-chunk rows), so no rebase.
template <typename acc_t>
void accumulate_chunk(RowState& state, const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t, bool maxima_final) {
  using Vec = Vectorized<acc_t>;
  if (!maxima_final) {
    state.rebase(std::max<double>(state.max_s, max_of(s, n)), std::max<double>(state.max_t, max_of(t, n)), inv_t);
  }
  const acc_t shift_s = static_cast<acc_t>(safe_shift(state.max_s));
  const acc_t shift_t = static_cast<acc_t>(safe_shift(state.max_t));

  const Vec v_inv_t(inv_t), v_shift_s(shift_s), v_shift_t(shift_t), zero(acc_t(0));
  Vec sum_s(acc_t(0)), sum_t(acc_t(0)), acc(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const Vec s_hat = (load_padded(s + j, n - j) - v_shift_s) * v_inv_t;
    const Vec t_hat = (load_padded(t + j, n - j) - v_shift_t) * v_inv_t;
    const Vec e_t = t_hat.exp();
    sum_s += s_hat.exp();
    sum_t += e_t;
    acc += Vec::blendv(e_t * (t_hat - s_hat), zero, e_t == zero);
  }
  state.sum_s += lane_sum(sum_s);
  state.sum_t += lane_sum(sum_t);
  state.acc += lane_sum(acc);
}

template <typename S, typename T>
void forward_rows(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                  int64_t rows, int64_t cols, double temperature, acc_type_t<S, T>* loss,
                  acc_type_t<S, T>* stats_student, acc_type_t<S, T>* stats_teacher) {
  using acc_t = acc_type_t<S, T>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t grain = rows_per_task(cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const S* s_row = student + row * student_row_stride;
      const T* t_row = teacher + row * teacher_row_stride;
      RowState state;
      const bool maxima_first = cols > kChunk;
      if (maxima_first) {
        // Several chunks: the row maxima first, so that every chunk forms t^ - s^ against the final shifts, rounded
        // as the backward rounds its log-ratios (a shift moved later would be applied in double to values rounded
        // against the old one; where the teacher is one-hot, log-ratio minus loss would then not cancel exactly).
        for (int64_t c = 0; c < cols; c += kChunk) {
          const int64_t n = std::min(kChunk, cols - c);
          state.max_s = std::max<double>(state.max_s, max_of(as_acc(s_row + c, s_buffer, n), n));
          state.max_t = std::max<double>(state.max_t, max_of(as_acc(t_row + c, t_buffer, n), n));
        }
      }
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        accumulate_chunk<acc_t>(state, as_acc(s_row + c, s_buffer, n), as_acc(t_row + c, t_buffer, n), n, inv_t,
                                maxima_first);
      }
      const double log_sum_s = std::log(state.sum_s), log_sum_t = std::log(state.sum_t);
      loss[row] = static_cast<acc_t>(state.loss(log_sum_s, log_sum_t));
      stats_student[2 * row] = static_cast<acc_t>(state.max_s);
      stats_student[2 * row + 1] = static_cast<acc_t>(log_sum_s);
      stats_teacher[2 * row] = static_cast<acc_t>(state.max_t);
      stats_teacher[2 * row + 1] = static_cast<acc_t>(log_sum_t);
    }
  });
}

// With log p = (x - max) / T - log_sum:  grad_s = g/T (p_s - p_t),
// grad_t = g/T p_t (log p_t - log p_s - loss), 0 where p_t == 0.
template <typename acc_t>
void backward_chunk(const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t, acc_t scale, acc_t max_s,
                    acc_t log_sum_s, acc_t max_t, acc_t log_sum_t, acc_t loss, acc_t* grad_s, acc_t* grad_t) {
  using Vec = Vectorized<acc_t>;
  const Vec v_inv_t(inv_t), v_scale(scale), v_max_s(max_s), v_max_t(max_t), v_log_sum_s(log_sum_s),
      v_log_sum_t(log_sum_t), v_loss(loss), zero(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec log_p_s = (load_padded(s + j, count) - v_max_s) * v_inv_t - v_log_sum_s;
    const Vec log_p_t = (load_padded(t + j, count) - v_max_t) * v_inv_t - v_log_sum_t;
    const Vec p_t = log_p_t.exp();
    if (grad_s != nullptr) (v_scale * (log_p_s.exp() - p_t)).store(grad_s + j, count);
    if (grad_t != nullptr) {
      const Vec g = v_scale * p_t * (log_p_t - log_p_s - v_loss);
      Vec::blendv(g, zero, p_t == zero).store(grad_t + j, count);
    }
  }
}

template <typename S, typename T>
void backward_rows(const acc_type_t<S, T>* grad_loss, const S* student, int64_t student_row_stride,
                   const T* teacher, int64_t teacher_row_stride, const acc_type_t<S, T>* stats_student,
                   const acc_type_t<S, T>* stats_teacher, const acc_type_t<S, T>* loss, int64_t rows, int64_t cols,
                   double temperature, S* grad_student, T* grad_teacher) {
  using acc_t = acc_type_t<S, T>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  backward_rows_chunked(
      student, student_row_stride, teacher, teacher_row_stride, rows, cols, grad_student, grad_teacher,
      // no upstream gradient, or an empty (all -inf) teacher row
      [&](int64_t row) { return grad_loss[row] == acc_t(0) || stats_teacher[2 * row] == -inf; },
      [&](int64_t row, const acc_t* s, const acc_t* t, int64_t n, acc_t* gs, acc_t* gt) {
        // An all -inf student row has p_s = 0: a +inf log-sum makes every log p_s -inf.
        const bool student_empty = stats_student[2 * row] == -inf;
        const acc_t max_s = student_empty ? acc_t(0) : stats_student[2 * row];
        const acc_t log_sum_s = student_empty ? inf : stats_student[2 * row + 1];
        backward_chunk<acc_t>(s, t, n, inv_t, grad_loss[row] * inv_t, max_s, log_sum_s, stats_teacher[2 * row],
                              stats_teacher[2 * row + 1], loss[row], gs, gt);
      });
}

// ---------------------------------------------------------------------------------------------------------------
// softmax_jsd: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s formed in log space.
// Forward: pass 1 takes each side's (max, log_sum) with an online rescaled sum; pass 2 (the row again, from cache)
// accumulates both mixture KLs. Backward: one elementwise pass from those per-row values.

// For one vector of entries: log p_s, log p_t and the two mixture log-ratios a = log p_t - log m and
// b = log p_s - log m. With d = log p_s - log p_t = ((s - max_s) - (t - max_t)) / T + (log_sum_t - log_sum_s), each
// difference exact near the maxima and the log-sum difference rounded once per row from double, the ratios are
//   d <= 0:  a = -log1p((1 - beta) expm1(d)),   b = d + a
//   d >  0:  b = -log1p(beta expm1(-d)),        a = b - d
// accurate to ~eps |d| however close the two distributions are (log p - log m would carry eps log V). Entries with
// a zero probability give +-inf or NaN ratios: callers discard them with the probability.
template <typename acc_t>
struct MixtureLogs {
  Vectorized<acc_t> log_p_s, log_p_t, ratio_t, ratio_s;
};

template <typename acc_t>
struct JsdRow {
  acc_t max_s, log_sum_s, max_t, log_sum_t, beta, inv_t;
  acc_t log_sum_difference;  // log_sum_t - log_sum_s, rounded once
  // beta and 1 - beta split into their acc_t rounding and the rest: the KLs cancel terms of both signs, and the
  // rounding of beta alone would bias every row's KL by ~2 ulp (always the same way for a given beta).
  acc_t one_minus_beta, beta_lo, one_minus_beta_lo;
  double beta_exact, one_minus_beta_exact;

  JsdRow(double max_s_, double log_sum_s_, double max_t_, double log_sum_t_, double beta_, acc_t inv_t_)
      : max_s(static_cast<acc_t>(max_s_)), log_sum_s(static_cast<acc_t>(log_sum_s_)),
        max_t(static_cast<acc_t>(max_t_)), log_sum_t(static_cast<acc_t>(log_sum_t_)),
        beta(static_cast<acc_t>(beta_)), inv_t(inv_t_), log_sum_difference(static_cast<acc_t>(log_sum_t_ - log_sum_s_)),
        one_minus_beta(static_cast<acc_t>(1.0 - beta_)), beta_lo(static_cast<acc_t>(beta_ - static_cast<double>(beta))),
        one_minus_beta_lo(static_cast<acc_t>((1.0 - beta_) - static_cast<double>(one_minus_beta))),
        beta_exact(beta_), one_minus_beta_exact(1.0 - beta_) {}

  // weight * w rounded once, weight = hi + lo (its acc_t rounding and the rest): an fma where the vector ISA has one;
  // the generic vectors of the default ISA round hi * w first (which would lose lo), so there a double product.
  Vectorized<acc_t> weigh(const Vectorized<acc_t>& w, acc_t hi, acc_t lo, double exact) const {
#ifdef CPU_CAPABILITY_DEFAULT
    (void)hi, (void)lo;
    __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
    w.store(lanes);
    for (int i = 0; i < Vectorized<acc_t>::size(); ++i) lanes[i] = static_cast<acc_t>(exact * lanes[i]);
    return Vectorized<acc_t>::loadu(lanes);
#else
    (void)exact;
    return at::vec::fmadd(Vectorized<acc_t>(hi), w, Vectorized<acc_t>(lo) * w);
#endif
  }

  MixtureLogs<acc_t> at(const acc_t* s, const acc_t* t, int64_t count) const {
    using Vec = Vectorized<acc_t>;
    const Vec v_inv_t(inv_t);
    const Vec below_max_s = load_padded(s, count) - Vec(max_s), below_max_t = load_padded(t, count) - Vec(max_t);
    const Vec log_p_s = below_max_s * v_inv_t - Vec(log_sum_s);
    const Vec log_p_t = below_max_t * v_inv_t - Vec(log_sum_t);
    const Vec d = (below_max_s - below_max_t) * v_inv_t + Vec(log_sum_difference);
    const Vec d_non_positive = d <= Vec(acc_t(0));
    const Vec w = (-d.abs()).expm1();
    const Vec weighted_w = Vec::blendv(weigh(w, beta, beta_lo, beta_exact),
                                       weigh(w, one_minus_beta, one_minus_beta_lo, one_minus_beta_exact),
                                       d_non_positive);
    const Vec l = weighted_w.log1p();
    const Vec ratio_t = Vec::blendv(-d - l, -l, d_non_positive);
    const Vec ratio_s = Vec::blendv(-l, d - l, d_non_positive);
    return {log_p_s, log_p_t, ratio_t, ratio_s};
  }
};

template <typename S, typename T>
void jsd_forward_rows(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                      int64_t rows, int64_t cols, double temperature, double beta, acc_type_t<S, T>* loss,
                      acc_type_t<S, T>* stats_student, acc_type_t<S, T>* stats_teacher,
                      acc_type_t<S, T>* mixture_kl) {
  using acc_t = acc_type_t<S, T>;
  using Vec = Vectorized<acc_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const S* s_row = student + row * student_row_stride;
      const T* t_row = teacher + row * teacher_row_stride;
      LogSumState side_s, side_t;
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        log_sum_chunk<acc_t>(side_s, as_acc(s_row + c, s_buffer, n), n, inv_t);
        log_sum_chunk<acc_t>(side_t, as_acc(t_row + c, t_buffer, n), n, inv_t);
      }
      const double log_sum_s = std::log(side_s.sum), log_sum_t = std::log(side_t.sum);
      stats_student[2 * row] = static_cast<acc_t>(side_s.max);
      stats_student[2 * row + 1] = static_cast<acc_t>(log_sum_s);
      stats_teacher[2 * row] = static_cast<acc_t>(side_t.max);
      stats_teacher[2 * row + 1] = static_cast<acc_t>(log_sum_t);
      double kl_t = 0.0, kl_s = 0.0;
      if (side_s.max != kNegInf && side_t.max != kNegInf) {  // else an empty row: 0
        const JsdRow<acc_t> jsd(side_s.max, log_sum_s, side_t.max, log_sum_t, beta, inv_t);
        const Vec zero(acc_t(0));
        for (int64_t c = 0; c < cols; c += kChunk) {
          const int64_t n = std::min(kChunk, cols - c);
          const acc_t* s = as_acc(s_row + c, s_buffer, n);
          const acc_t* t = as_acc(t_row + c, t_buffer, n);
          Vec acc_t_side(acc_t(0)), acc_s_side(acc_t(0));
          for (int64_t j = 0; j < n; j += Vec::size()) {
            const MixtureLogs<acc_t> l = jsd.at(s + j, t + j, n - j);
            const Vec p_t = l.log_p_t.exp(), p_s = l.log_p_s.exp();
            acc_t_side += Vec::blendv(p_t * l.ratio_t, zero, p_t == zero);
            acc_s_side += Vec::blendv(p_s * l.ratio_s, zero, p_s == zero);
          }
          kl_t += lane_sum(acc_t_side);
          kl_s += lane_sum(acc_s_side);
        }
        // p = exp(log p) against the rounded log_sum is the exact p times exp(log_sum - log d): undo that factor (a
        // rounded log_sum ~ log V would otherwise scale each mixture KL by up to half an ulp of log V, several ulp).
        kl_t *= std::exp(static_cast<double>(jsd.log_sum_t) - log_sum_t);
        kl_s *= std::exp(static_cast<double>(jsd.log_sum_s) - log_sum_s);
      }
      mixture_kl[2 * row] = static_cast<acc_t>(kl_t);
      mixture_kl[2 * row + 1] = static_cast<acc_t>(kl_s);
      loss[row] = static_cast<acc_t>(beta * kl_t + (1.0 - beta) * kl_s);
    }
  });
}

template <typename S, typename T>
void jsd_backward_rows(const acc_type_t<S, T>* grad_loss, const S* student, int64_t student_row_stride,
                       const T* teacher, int64_t teacher_row_stride, const acc_type_t<S, T>* stats_student,
                       const acc_type_t<S, T>* stats_teacher, const acc_type_t<S, T>* mixture_kl, int64_t rows,
                       int64_t cols, double temperature, double beta, S* grad_student, T* grad_teacher) {
  using acc_t = acc_type_t<S, T>;
  using Vec = Vectorized<acc_t>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  backward_rows_chunked(
      student, student_row_stride, teacher, teacher_row_stride, rows, cols, grad_student, grad_teacher,
      [&](int64_t row) {
        return grad_loss[row] == acc_t(0) || stats_student[2 * row] == -inf || stats_teacher[2 * row] == -inf;
      },
      [&](int64_t row, const acc_t* s, const acc_t* t, int64_t n, acc_t* gs, acc_t* gt) {
        const JsdRow<acc_t> jsd(stats_student[2 * row], stats_student[2 * row + 1], stats_teacher[2 * row],
                                stats_teacher[2 * row + 1], beta, inv_t);
        const double g = grad_loss[row];
        const Vec scale_s(static_cast<acc_t>(g * (1.0 - beta) * inv_t)), scale_t(static_cast<acc_t>(g * beta * inv_t));
        const Vec kl_t(mixture_kl[2 * row]), kl_s(mixture_kl[2 * row + 1]), zero(acc_t(0));
        for (int64_t j = 0; j < n; j += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), n - j);
          const MixtureLogs<acc_t> l = jsd.at(s + j, t + j, count);
          if (gs != nullptr) {
            const Vec p_s = l.log_p_s.exp();
            Vec::blendv(scale_s * p_s * (l.ratio_s - kl_s), zero, p_s == zero).store(gs + j, count);
          }
          if (gt != nullptr) {
            const Vec p_t = l.log_p_t.exp();
            Vec::blendv(scale_t * p_t * (l.ratio_t - kl_t), zero, p_t == zero).store(gt + j, count);
          }
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cpu(const at::Tensor& student,
                                                                      const at::Tensor& teacher,
                                                                      double temperature) {
  softmax_kl::check_kl_forward(student, teacher, temperature, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    forward_rows<S, T>(student.const_data_ptr<S>(), student.stride(0), teacher.const_data_ptr<T>(), teacher.stride(0),
                       rows, cols, temperature, loss.mutable_data_ptr<acc_t>(),
                       stats_student.mutable_data_ptr<acc_t>(), stats_teacher.mutable_data_ptr<acc_t>());
  });
  return {loss, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                           const at::Tensor& teacher, const at::Tensor& stats_student,
                                                           const at::Tensor& stats_teacher, const at::Tensor& loss,
                                                           double temperature, bool student_grad, bool teacher_grad) {
  softmax_kl::check_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature,
                                at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student = student_grad ? empty_gradient(rows, cols, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? empty_gradient(rows, cols, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    backward_rows<S, T>(grad_loss.const_data_ptr<acc_t>(), student.const_data_ptr<S>(), student.stride(0),
                        teacher.const_data_ptr<T>(), teacher.stride(0), stats_student.const_data_ptr<acc_t>(),
                        stats_teacher.const_data_ptr<acc_t>(), loss.const_data_ptr<acc_t>(), rows, cols, temperature,
                        student_grad ? grad_student.mutable_data_ptr<S>() : nullptr,
                        teacher_grad ? grad_teacher.mutable_data_ptr<T>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_jsd_forward_cpu(const at::Tensor& student,
                                                                                   const at::Tensor& teacher,
                                                                                   double temperature, double beta) {
  softmax_kl::check_jsd_forward(student, teacher, temperature, beta, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  at::Tensor mixture_kl = at::empty({rows, 2}, options);
  if (rows == 0) return {loss, stats_student, stats_teacher, mixture_kl};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    jsd_forward_rows<S, T>(student.const_data_ptr<S>(), student.stride(0), teacher.const_data_ptr<T>(),
                           teacher.stride(0), rows, cols, temperature, beta, loss.mutable_data_ptr<acc_t>(),
                           stats_student.mutable_data_ptr<acc_t>(), stats_teacher.mutable_data_ptr<acc_t>(),
                           mixture_kl.mutable_data_ptr<acc_t>());
  });
  return {loss, stats_student, stats_teacher, mixture_kl};
}

std::tuple<at::Tensor, at::Tensor> softmax_jsd_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& stats_student,
                                                            const at::Tensor& stats_teacher,
                                                            const at::Tensor& mixture_kl, double temperature,
                                                            double beta, bool student_grad, bool teacher_grad) {
  softmax_kl::check_jsd_backward(grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature,
                                 beta, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad_student = student_grad ? empty_gradient(rows, cols, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? empty_gradient(rows, cols, teacher.options()) : at::empty({0}, teacher.options());
  if (rows == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    jsd_backward_rows<S, T>(grad_loss.const_data_ptr<acc_t>(), student.const_data_ptr<S>(), student.stride(0),
                            teacher.const_data_ptr<T>(), teacher.stride(0), stats_student.const_data_ptr<acc_t>(),
                            stats_teacher.const_data_ptr<acc_t>(), mixture_kl.const_data_ptr<acc_t>(), rows, cols,
                            temperature, beta, student_grad ? grad_student.mutable_data_ptr<S>() : nullptr,
                            teacher_grad ? grad_teacher.mutable_data_ptr<T>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("softmax_kl_forward", &softmax_kl_forward_cpu);
  m.impl("softmax_kl_backward", &softmax_kl_backward_cpu);
  m.impl("softmax_jsd_forward", &softmax_jsd_forward_cpu);
  m.impl("softmax_jsd_backward", &softmax_jsd_backward_cpu);
}

}  // namespace kdkernels
