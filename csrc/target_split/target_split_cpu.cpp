// CPU kernels of target_split: DKD's and NKD's six per-row terms and their gradients.
//
// Spec: kdkernels/reference/target_split.py. With x^ = (x - max) / T over a side's non-target columns,
// L = log sum exp(x^) and q = exp(x^ - L) (the non-target softmax):
//   log p[y] = x^[y] - logaddexp(x^[y], L) = -softplus(L - x^[y]),  log(1 - p[y]) = -softplus(x^[y] - L),
//   KL(q_t || q_s) = sum e_t (t^ - s^) / sum e_t - L_t + L_s,  H(q_t) = L_t - sum e_t t^ / sum e_t.
// The forward walks each row's non-target columns once ([0, y) then (y, V), in chunks) with an online state like
// softmax_kl's; the backward is one elementwise pass from per-row coefficients, then a write of column y.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/cpu_rows.h"
#include "target_split_host.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;
using target_split::kTerms;

constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t checked_label(const int64_t* labels, int64_t label_stride, int64_t row, int64_t cols) {
  const int64_t label = labels[row * label_stride];
  TORCH_CHECK_VALUE(label >= 0 && label < cols, "target_split: labels must be in [0, V) = [0, ", cols, "), got ",
                    label, " in row ", row);
  return label;
}

// Online state of one row's non-target columns, in raw-logit units: M = running max, m~ = safe_shift(M),
// x^ = (x - m~) / T. sum = sum exp(x^) per side; over entries with e_t = exp(t^) > 0, kl = sum e_t (t^ - s^) and
// entropy = sum e_t t^.
struct NonTargetState {
  double max_s = kNegInf, sum_s = 0.0;
  double max_t = kNegInf, sum_t = 0.0;
  double kl = 0.0, entropy = 0.0;

  // Re-expresses the sums against larger maxima, c = exp(-dt): kl' = c (kl + (ds - dt) sum_t),
  // entropy' = c (entropy - dt sum_t), with dt = (m~_t' - m~_t) / T and ds = (m~_s' - m~_s) / T.
  void rebase(double new_max_s, double new_max_t, double inv_t) {
    const double delta_s = (safe_shift(new_max_s) - safe_shift(max_s)) * inv_t;
    const double delta_t = (safe_shift(new_max_t) - safe_shift(max_t)) * inv_t;
    if (max_t != kNegInf) {
      const double c = std::exp(-delta_t);
      // c == 0: the old teacher mass underflows and contributes 0 (never 0 * inf)
      kl = c == 0.0 ? 0.0 : c * (kl + (delta_s - delta_t) * sum_t);
      entropy = c == 0.0 ? 0.0 : c * (entropy - delta_t * sum_t);
      sum_t *= c;
    }
    if (max_s != kNegInf) sum_s *= std::exp(-delta_s);
    max_s = new_max_s;
    max_t = new_max_t;
  }
};

template <typename acc_t>
void accumulate_chunk(NonTargetState& state, const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t) {
  using Vec = Vectorized<acc_t>;
  state.rebase(std::max<double>(state.max_s, max_of(s, n)), std::max<double>(state.max_t, max_of(t, n)), inv_t);
  const Vec v_inv_t(inv_t), v_shift_s(static_cast<acc_t>(safe_shift(state.max_s))),
      v_shift_t(static_cast<acc_t>(safe_shift(state.max_t))), zero(acc_t(0));
  Vec sum_s(acc_t(0)), sum_t(acc_t(0)), kl(acc_t(0)), entropy(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const Vec s_hat = (load_padded(s + j, n - j) - v_shift_s) * v_inv_t;
    const Vec t_hat = (load_padded(t + j, n - j) - v_shift_t) * v_inv_t;
    const Vec e_t = t_hat.exp();
    const Vec no_teacher_mass = e_t == zero;
    sum_s += s_hat.exp();
    sum_t += e_t;
    kl += Vec::blendv(e_t * (t_hat - s_hat), zero, no_teacher_mass);
    entropy += Vec::blendv(e_t * t_hat, zero, no_teacher_mass);
  }
  auto add = [](Vec& p, Vec& q) { return p + q; };
  state.sum_s += at::vec::vec_reduce_all<acc_t>(add, sum_s);
  state.sum_t += at::vec::vec_reduce_all<acc_t>(add, sum_t);
  state.kl += at::vec::vec_reduce_all<acc_t>(add, kl);
  state.entropy += at::vec::vec_reduce_all<acc_t>(add, entropy);
}

// (log p[y], log(1 - p[y])) of one side from its target logit and its non-target (max, log_sum). With
// d = x^[y] - L they are -softplus(-d) and -softplus(d): no cancellation when either probability is tiny.
struct TargetSplit {
  double log_p_target, log_p_rest;
};

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

TargetSplit split_at_target(double target, double max, double log_sum, double inv_t) {
  const double target_hat = (target - safe_shift(max)) * inv_t;
  if (target_hat == kNegInf && log_sum == kNegInf) return {kNegInf, kNegInf};  // every column -inf
  const double d = target_hat - log_sum;  // +inf for an empty non-target set, -inf for a -inf target
  return {-softplus(-d), -softplus(d)};
}

template <typename S, typename T>
void forward_rows(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                  const int64_t* labels, int64_t label_stride, int64_t rows, int64_t cols, double temperature,
                  acc_type_t<S, T>* terms, acc_type_t<S, T>* stats_student, acc_type_t<S, T>* stats_teacher) {
  using acc_t = acc_type_t<S, T>;
  const double inv_t = 1.0 / temperature;
  const acc_t vec_inv_t = static_cast<acc_t>(inv_t);
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = checked_label(labels, label_stride, row, cols);
      const S* s_row = student + row * student_row_stride;
      const T* t_row = teacher + row * teacher_row_stride;
      NonTargetState state;
      auto walk = [&](int64_t first, int64_t last) {  // the online state does not care where a segment splits
        for (int64_t c = first; c < last; c += kChunk) {
          const int64_t n = std::min(kChunk, last - c);
          accumulate_chunk<acc_t>(state, as_acc(s_row + c, s_buffer, n), as_acc(t_row + c, t_buffer, n), n,
                                  vec_inv_t);
        }
      };
      walk(0, label);
      walk(label + 1, cols);
      const double log_sum_s = std::log(state.sum_s), log_sum_t = std::log(state.sum_t);
      const TargetSplit split_s = split_at_target(static_cast<acc_t>(s_row[label]), state.max_s, log_sum_s, inv_t);
      const TargetSplit split_t = split_at_target(static_cast<acc_t>(t_row[label]), state.max_t, log_sum_t, inv_t);
      double kl = 0.0, entropy = 0.0;  // an empty teacher q_t: both 0
      if (state.max_t != kNegInf) {
        kl = state.max_s == kNegInf ? kInf : state.kl / state.sum_t - log_sum_t + log_sum_s;
        entropy = log_sum_t - state.entropy / state.sum_t;
      }
      const double row_terms[kTerms] = {split_s.log_p_target, split_s.log_p_rest, split_t.log_p_target,
                                        split_t.log_p_rest, kl, entropy};
      for (int64_t k = 0; k < kTerms; ++k) terms[kTerms * row + k] = static_cast<acc_t>(row_terms[k]);
      stats_student[2 * row] = static_cast<acc_t>(state.max_s);
      stats_student[2 * row + 1] = static_cast<acc_t>(log_sum_s);
      stats_teacher[2 * row] = static_cast<acc_t>(state.max_t);
      stats_teacher[2 * row + 1] = static_cast<acc_t>(log_sum_t);
    }
  });
}

// Per-row coefficients of the non-target gradients, all scaled by 1/T (g_k = grad_terms[k]):
//   grad_s[c] = q_s[c] student_scale - kl_grad q_t[c],
//   grad_t[c] = q_t[c] (teacher_scale + kl_grad (log q_t[c] - log q_s[c] - kl) - entropy_grad (log q_t[c] + entropy)),
// with log q = (x - max) / T - log_sum. An empty side gets log_sum = +inf, so q = 0. A term without gradient (an
// empty q_t: both; KL = +inf, a student -inf under teacher mass: the KL) has its g zeroed and its branch skipped,
// as the -inf log q_s it would meet gives NaN.
template <typename acc_t>
struct SplitRow {
  acc_t max_s, log_sum_s, max_t, log_sum_t;
  acc_t student_scale;  // (g1 p_s[y] - g0 (1 - p_s[y]) + g4) / T
  acc_t teacher_scale;  // (g3 p_t[y] - g2 (1 - p_t[y])) / T
  acc_t kl_grad, kl, entropy_grad, entropy;
  bool kl_active, entropy_active;

  SplitRow(const acc_t* g, const acc_t* terms, const acc_t* stats_s, const acc_t* stats_t, double inv_t) {
    const bool teacher_empty = stats_t[0] == -std::numeric_limits<acc_t>::infinity();
    const double g4 = teacher_empty || std::isinf(terms[4]) ? 0.0 : g[4];
    const double g5 = teacher_empty ? 0.0 : g[5];
    kl_active = g4 != 0.0;
    entropy_active = g5 != 0.0;
    set_side(stats_s, max_s, log_sum_s);
    set_side(stats_t, max_t, log_sum_t);
    const double p_s = std::exp(double(terms[0])), rest_s = std::exp(double(terms[1]));
    const double p_t = std::exp(double(terms[2])), rest_t = std::exp(double(terms[3]));
    student_scale = static_cast<acc_t>((g[1] * p_s - g[0] * rest_s + g4) * inv_t);
    teacher_scale = static_cast<acc_t>((g[3] * p_t - g[2] * rest_t) * inv_t);
    kl_grad = static_cast<acc_t>(g4 * inv_t);
    entropy_grad = static_cast<acc_t>(g5 * inv_t);
    kl = kl_active ? terms[4] : acc_t(0);
    entropy = entropy_active ? terms[5] : acc_t(0);
  }

  static void set_side(const acc_t* stats, acc_t& max, acc_t& log_sum) {
    const bool empty = stats[0] == -std::numeric_limits<acc_t>::infinity();
    max = empty ? acc_t(0) : stats[0];
    log_sum = empty ? std::numeric_limits<acc_t>::infinity() : stats[1];
  }
};

template <typename acc_t>
void backward_chunk(const SplitRow<acc_t>& r, const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t, acc_t* grad_s,
                    acc_t* grad_t) {
  using Vec = Vectorized<acc_t>;
  const Vec v_inv_t(inv_t), v_max_s(r.max_s), v_log_sum_s(r.log_sum_s), v_max_t(r.max_t), v_log_sum_t(r.log_sum_t),
      v_student_scale(r.student_scale), v_teacher_scale(r.teacher_scale), v_kl_grad(r.kl_grad), v_kl(r.kl),
      v_entropy_grad(r.entropy_grad), v_entropy(r.entropy), zero(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec log_q_s = (load_padded(s + j, count) - v_max_s) * v_inv_t - v_log_sum_s;
    const Vec log_q_t = (load_padded(t + j, count) - v_max_t) * v_inv_t - v_log_sum_t;
    const Vec q_t = log_q_t.exp();
    if (grad_s != nullptr) {
      Vec g = v_student_scale * log_q_s.exp();
      if (r.kl_active) g = g - v_kl_grad * q_t;
      g.store(grad_s + j, count);
    }
    if (grad_t != nullptr) {
      Vec inner = v_teacher_scale;
      if (r.kl_active) inner = inner + v_kl_grad * (log_q_t - log_q_s - v_kl);
      if (r.entropy_active) inner = inner - v_entropy_grad * (log_q_t + v_entropy);
      Vec::blendv(q_t * inner, zero, q_t == zero).store(grad_t + j, count);
    }
  }
}

// Column y of one side (first = 0: student, 2: teacher): 1/T (g_first (1 - p[y]) - g_{first+1} p[y]).
template <typename acc_t, typename X>
void write_target_gradients(X* grad, const int64_t* labels, int64_t label_stride, int64_t rows, int64_t cols,
                            const acc_t* grad_terms, const acc_t* terms, int first, double inv_t) {
  if (grad == nullptr) return;
  for (int64_t row = 0; row < rows; ++row) {
    const acc_t* g = grad_terms + kTerms * row;
    const acc_t* term = terms + kTerms * row;
    const double value = (g[first] * std::exp(double(term[first + 1])) - g[first + 1] * std::exp(double(term[first])));
    grad[row * cols + checked_label(labels, label_stride, row, cols)] = static_cast<X>(value * inv_t);
  }
}

template <typename S, typename T>
void backward_rows(const acc_type_t<S, T>* grad_terms, const S* student, int64_t student_row_stride,
                   const T* teacher, int64_t teacher_row_stride, const int64_t* labels, int64_t label_stride,
                   const acc_type_t<S, T>* stats_student, const acc_type_t<S, T>* stats_teacher,
                   const acc_type_t<S, T>* terms, int64_t rows, int64_t cols, double temperature, S* grad_student,
                   T* grad_teacher) {
  using acc_t = acc_type_t<S, T>;
  const double inv_t = 1.0 / temperature;
  backward_rows_chunked(
      student, student_row_stride, teacher, teacher_row_stride, rows, cols, grad_student, grad_teacher,
      [&](int64_t row) {
        const acc_t* g = grad_terms + kTerms * row;
        return std::all_of(g, g + kTerms, [](acc_t v) { return v == acc_t(0); });
      },
      [&](int64_t row, const acc_t* s, const acc_t* t, int64_t n, acc_t* gs, acc_t* gt) {
        const SplitRow<acc_t> split(grad_terms + kTerms * row, terms + kTerms * row, stats_student + 2 * row,
                                    stats_teacher + 2 * row, inv_t);
        backward_chunk<acc_t>(split, s, t, n, static_cast<acc_t>(inv_t), gs, gt);
      });
  // the chunks wrote column y as a non-target column: overwrite it
  write_target_gradients(grad_student, labels, label_stride, rows, cols, grad_terms, terms, 0, inv_t);
  write_target_gradients(grad_teacher, labels, label_stride, rows, cols, grad_terms, terms, 2, inv_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_split_forward_cpu(const at::Tensor& student,
                                                                        const at::Tensor& teacher,
                                                                        const at::Tensor& labels, double temperature) {
  target_split::check_forward_inputs(student, teacher, labels, temperature, at::kCPU);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto options = student.options().dtype(host::accumulation_dtype(student));
  at::Tensor terms = at::empty({rows, kTerms}, options);
  at::Tensor stats_student = at::empty({rows, 2}, options);
  at::Tensor stats_teacher = at::empty({rows, 2}, options);
  if (rows == 0) return {terms, stats_student, stats_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    forward_rows<S, T>(student.const_data_ptr<S>(), student.stride(0), teacher.const_data_ptr<T>(), teacher.stride(0),
                       labels.const_data_ptr<int64_t>(), labels.stride(0), rows, cols, temperature,
                       terms.mutable_data_ptr<acc_t>(), stats_student.mutable_data_ptr<acc_t>(),
                       stats_teacher.mutable_data_ptr<acc_t>());
  });
  return {terms, stats_student, stats_teacher};
}

std::tuple<at::Tensor, at::Tensor> target_split_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& student,
                                                             const at::Tensor& teacher, const at::Tensor& labels,
                                                             const at::Tensor& stats_student,
                                                             const at::Tensor& stats_teacher, const at::Tensor& terms,
                                                             double temperature, bool student_grad,
                                                             bool teacher_grad) {
  target_split::check_backward_inputs(grad_terms, student, teacher, labels, stats_student, stats_teacher, terms,
                                      temperature, at::kCPU);
  at::Tensor grad_student = requested_gradient(student_grad, student);
  at::Tensor grad_teacher = requested_gradient(teacher_grad, teacher);
  const int64_t rows = student.size(0), cols = student.size(1);
  if (rows == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};
  host::dispatch_logits_pair<CpuElements>(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using acc_t = acc_type_t<S, T>;
    backward_rows<S, T>(grad_terms.const_data_ptr<acc_t>(), student.const_data_ptr<S>(), student.stride(0),
                        teacher.const_data_ptr<T>(), teacher.stride(0), labels.const_data_ptr<int64_t>(),
                        labels.stride(0), stats_student.const_data_ptr<acc_t>(), stats_teacher.const_data_ptr<acc_t>(),
                        terms.const_data_ptr<acc_t>(), rows, cols, temperature,
                        student_grad ? grad_student.mutable_data_ptr<S>() : nullptr,
                        teacher_grad ? grad_teacher.mutable_data_ptr<T>() : nullptr);
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("target_split_forward", &target_split_forward_cpu);
  m.impl("target_split_backward", &target_split_backward_cpu);
}

}  // namespace kdkernels
