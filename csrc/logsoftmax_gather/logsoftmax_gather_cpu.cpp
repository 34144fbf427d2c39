// CPU kernels of logsoftmax_gather: log_softmax(x / T) at int64 indices [N, k], and its gradient.
//
// Spec: kdkernels/reference/logsoftmax_gather.py. Forward: the row's (max, log_sum) by the online log-sum, then
// gathered[j] = (x[idx_j] - max) / T - log_sum. Backward: grad[c] = 1/T (sum_{j: idx_j = c} g_j - p[c] sum_j g_j)
// with p = exp((x - max) / T - log_sum), one elementwise pass per row. An all -inf row gathers -inf and gets a
// zero gradient.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/cpu_rows.h"
#include "logsoftmax_gather_host.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;

// The row's [k] indices, read through their strides; each read is checked against [0, V).
struct RowIndices {
  const int64_t* data;
  int64_t row_stride, stride, count, cols;

  int64_t at(int64_t row, int64_t j) const {
    const int64_t index = data[row * row_stride + j * stride];
    TORCH_CHECK_VALUE(index >= 0 && index < cols, "logsoftmax_gather: indices must be in [0, V) = [0, ", cols,
                      "), got ", index, " at [", row, ", ", j, "]");
    return index;
  }
};

template <typename X>
void forward_rows(const X* logits, int64_t row_stride, const RowIndices& indices, int64_t rows, int64_t cols,
                  double temperature, acc_type_t<X, X>* gathered, acc_type_t<X, X>* stats) {
  using acc_t = acc_type_t<X, X>;
  const double inv_t = 1.0 / temperature;
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const X* x_row = logits + row * row_stride;
      LogSumState state;
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        log_sum_chunk<acc_t>(state, as_acc(x_row + c, buffer, n), n, static_cast<acc_t>(inv_t));
      }
      const double log_sum = std::log(state.sum);
      stats[2 * row] = static_cast<acc_t>(state.max);
      stats[2 * row + 1] = static_cast<acc_t>(log_sum);
      for (int64_t j = 0; j < indices.count; ++j) {
        const double x = static_cast<acc_t>(x_row[indices.at(row, j)]);
        gathered[row * indices.count + j] =
            static_cast<acc_t>(state.max == kNegInf ? kNegInf : (x - state.max) * inv_t - log_sum);
      }
    }
  });
}

template <typename X>
void backward_rows(const acc_type_t<X, X>* grad_gathered, const X* logits, int64_t row_stride,
                   const RowIndices& indices, const acc_type_t<X, X>* stats, int64_t rows, int64_t cols,
                   double temperature, X* grad) {
  using acc_t = acc_type_t<X, X>;
  using Vec = Vectorized<acc_t>;
  const double inv_t = 1.0 / temperature;
  backward_rows_chunked(
      logits, row_stride, rows, cols, grad,
      [&](int64_t row) { return stats[2 * row] == -std::numeric_limits<acc_t>::infinity(); },
      [&](int64_t row, int64_t column, const acc_t* x, int64_t n, acc_t* g) {
        const acc_t* g_row = grad_gathered + row * indices.count;
        const double total = std::accumulate(g_row, g_row + indices.count, 0.0);
        const Vec v_inv_t(static_cast<acc_t>(inv_t)), v_max(stats[2 * row]), v_log_sum(stats[2 * row + 1]),
            v_scale(static_cast<acc_t>(-total * inv_t));
        for (int64_t j = 0; j < n; j += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), n - j);
          const Vec p = ((load_padded(x + j, count) - v_max) * v_inv_t - v_log_sum).exp();
          (v_scale * p).store(g + j, count);
        }
        for (int64_t j = 0; j < indices.count; ++j) {  // repeated indices accumulate
          const int64_t offset = indices.at(row, j) - column;
          if (offset >= 0 && offset < n) g[offset] += static_cast<acc_t>(g_row[j] * inv_t);
        }
      });
}

RowIndices row_indices(const at::Tensor& indices, int64_t cols) {
  return {indices.const_data_ptr<int64_t>(), indices.stride(0), indices.stride(1), indices.size(1), cols};
}

std::tuple<at::Tensor, at::Tensor> logsoftmax_gather_forward_cpu(const at::Tensor& logits, const at::Tensor& indices,
                                                                 double temperature) {
  logsoftmax_gather::check_forward_inputs(logits, indices, temperature, at::kCPU);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const auto options = logits.options().dtype(host::accumulation_dtype(logits));
  at::Tensor gathered = at::empty({rows, indices.size(1)}, options);
  at::Tensor stats = at::empty({rows, 2}, options);
  if (rows == 0) return {gathered, stats};
  host::dispatch_logits_type<CpuElements>(logits.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using acc_t = acc_type_t<X, X>;
    forward_rows<X>(logits.const_data_ptr<X>(), logits.stride(0), row_indices(indices, cols), rows, cols,
                    temperature, gathered.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {gathered, stats};
}

at::Tensor logsoftmax_gather_backward_cpu(const at::Tensor& grad_gathered, const at::Tensor& logits,
                                          const at::Tensor& indices, const at::Tensor& stats, double temperature) {
  logsoftmax_gather::check_backward_inputs(grad_gathered, logits, indices, stats, temperature, at::kCPU);
  at::Tensor grad = requested_gradient(true, logits);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  if (rows == 0 || cols == 0) return grad;
  host::dispatch_logits_type<CpuElements>(logits.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using acc_t = acc_type_t<X, X>;
    backward_rows<X>(grad_gathered.const_data_ptr<acc_t>(), logits.const_data_ptr<X>(), logits.stride(0),
                     row_indices(indices, cols), stats.const_data_ptr<acc_t>(), rows, cols, temperature,
                     grad.mutable_data_ptr<X>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("logsoftmax_gather_forward", &logsoftmax_gather_forward_cpu);
  m.impl("logsoftmax_gather_backward", &logsoftmax_gather_backward_cpu);
}

}  // namespace kdkernels
