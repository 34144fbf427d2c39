// CPU building blocks shared by the kernel families: chunked row walks over [N, V] logits with at::vec, the widening
// of half/bfloat16 chunks to the accumulation type, an online log-sum-exp, the parallel backward row loop and a
// huge-page gradient allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "host.h"

// Like ATen's kernels, everything here lives in a namespace named after the vector ISA of the library being
// compiled (CPU_CAPABILITY: DEFAULT, AVX2, AVX512), so the inline functions of two ISA builds never share a symbol.
namespace kdkernels::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

constexpr int64_t kChunk = 2048;  // elements per chunk: 2 inputs x 8 KiB (fp32) stay in L1
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Rows per parallel task: about 8K elements, so that a few hundred short rows already use every core.
inline int64_t rows_per_task(int64_t cols) { return std::max<int64_t>(1, 8192 / cols); }

// Logits in {float, Half, BFloat16} accumulate in float; double accumulates in double.
template <typename S, typename T>
using acc_type_t = host::acc_type_t<S>;

inline double safe_shift(double max) { return max == kNegInf ? 0.0 : max; }

// Returns `n` elements of `src` as acc_t: the pointer itself when no widening is needed, else `buffer`.
template <typename acc_t, typename X>
inline const acc_t* as_acc(const X* src, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<X, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

template <typename acc_t, typename X>
inline void store_from_acc(const acc_t* src, X* dst, int64_t n) {
  if constexpr (std::is_same_v<X, acc_t>) {
    (void)src, (void)dst, (void)n;  // computed in place
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Walks one row of student and teacher in kChunk pieces widened to acc_t: fn(first_column, s, t, n).
template <typename acc_t, typename S, typename T, typename Fn>
void for_each_chunk_pair(const S* s_row, const T* t_row, int64_t cols, acc_t* s_buffer, acc_t* t_buffer, Fn&& fn) {
  for (int64_t c = 0; c < cols; c += kChunk) {
    const int64_t n = std::min(kChunk, cols - c);
    fn(c, as_acc(s_row + c, s_buffer, n), as_acc(t_row + c, t_buffer, n), n);
  }
}

// Where the acc_t gradient of the chunk at `first_column` of a gradient row goes: in place when the gradient is
// acc_t, else `buffer`, narrowed afterwards by store_from_acc. Null for an unrequested gradient (null row).
template <typename acc_t, typename X>
inline acc_t* chunk_destination(X* grad_row, int64_t first_column, acc_t* buffer) {
  if (grad_row == nullptr) return nullptr;
  if constexpr (std::is_same_v<X, acc_t>) {
    (void)buffer;
    return grad_row + first_column;
  } else {
    (void)first_column;
    return buffer;
  }
}

// Loads x[0, count) into a vector whose missing lanes are -inf: they contribute exp(-inf) = 0 to every sum below.
template <typename acc_t>
inline Vectorized<acc_t> load_padded(const acc_t* x, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if (count >= Vec::size()) return Vec::loadu(x);
  return Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), Vec::loadu(x, count), count);
}

template <typename acc_t>
inline acc_t max_of(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec vmax = load_padded(x, n);
  for (int64_t j = Vec::size(); j < n; j += Vec::size()) vmax = at::vec::maximum(vmax, load_padded(x + j, n - j));
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
}

// Online log-sum-exp of one side, in raw-logit units like RowState: sum = sum exp((x - max) / T).
struct LogSumState {
  double max = kNegInf, sum = 0.0;
};

template <typename acc_t>
void log_sum_chunk(LogSumState& state, const acc_t* x, int64_t n, acc_t inv_t) {
  using Vec = Vectorized<acc_t>;
  const double new_max = std::max<double>(state.max, max_of(x, n));
  if (state.max != kNegInf) state.sum *= std::exp((safe_shift(state.max) - safe_shift(new_max)) * inv_t);
  state.max = new_max;
  const Vec shift(static_cast<acc_t>(safe_shift(new_max))), v_inv_t(inv_t);
  Vec sum(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) sum += ((load_padded(x + j, n - j) - shift) * v_inv_t).exp();
  state.sum += at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum);
}

// Where a chunk's acc_t gradient is written: the gradient row itself when it has the acc_t dtype, else `buffer`
// (narrowed on store); null when the gradient is not requested.
template <typename acc_t, typename X>
inline acc_t* chunk_gradient(X* grad_row, int64_t column, acc_t* buffer) {
  if (grad_row == nullptr) return nullptr;
  if constexpr (std::is_same_v<X, acc_t>) {
    (void)buffer;
    return grad_row + column;
  } else {
    (void)column;
    return buffer;
  }
}

// The backward of every row, in parallel. Rows for which zero_row(row) holds get zero gradients; the others are
// walked in chunks: chunk(row, s, t, n, grad_s, grad_t) gets the chunk's logits widened to acc_t and writes acc_t
// gradients (null when not requested), which land in place or are narrowed to the gradient's dtype on store.
template <typename S, typename T, typename ZeroRow, typename Chunk>
void backward_rows_chunked(const S* student, int64_t student_row_stride, const T* teacher, int64_t teacher_row_stride,
                           int64_t rows, int64_t cols, S* grad_student, T* grad_teacher, ZeroRow zero_row,
                           Chunk chunk) {
  using acc_t = acc_type_t<S, T>;
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t s_buffer[kChunk];
    alignas(64) acc_t t_buffer[kChunk];
    alignas(64) acc_t gs_buffer[kChunk];
    alignas(64) acc_t gt_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      S* gs_row = grad_student ? grad_student + row * cols : nullptr;
      T* gt_row = grad_teacher ? grad_teacher + row * cols : nullptr;
      if (zero_row(row)) {
        if (gs_row) std::fill(gs_row, gs_row + cols, S(0));
        if (gt_row) std::fill(gt_row, gt_row + cols, T(0));
        continue;
      }
      const S* s_row = student + row * student_row_stride;
      const T* t_row = teacher + row * teacher_row_stride;
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        acc_t* gs = chunk_gradient(gs_row, c, gs_buffer);
        acc_t* gt = chunk_gradient(gt_row, c, gt_buffer);
        chunk(row, as_acc(s_row + c, s_buffer, n), as_acc(t_row + c, t_buffer, n), n, gs, gt);
        if (gs_row) store_from_acc(gs, gs_row + c, n);
        if (gt_row) store_from_acc(gt, gt_row + c, n);
      }
    }
  });
}

// The one-input form of backward_rows_chunked, for ops with a single logits tensor: chunk(row, column, x, n, grad)
// gets the chunk that starts at `column`, widened to acc_t, and writes its acc_t gradient.
template <typename X, typename ZeroRow, typename Chunk>
void backward_rows_chunked(const X* logits, int64_t row_stride, int64_t rows, int64_t cols, X* grad,
                           ZeroRow zero_row, Chunk chunk) {
  using acc_t = host::acc_type_t<X>;
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t x_buffer[kChunk];
    alignas(64) acc_t g_buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      X* g_row = grad + row * cols;
      if (zero_row(row)) {
        std::fill(g_row, g_row + cols, X(0));
        continue;
      }
      const X* x_row = logits + row * row_stride;
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        acc_t* g = chunk_gradient(g_row, c, g_buffer);
        chunk(row, c, as_acc(x_row + c, x_buffer, n), n, g);
        store_from_acc(g, g_row + c, n);
      }
    }
  });
}

// Allocates a gradient. Large ones are backed by transparent huge pages where Linux offers them: the first touch
// of fresh 4 KiB pages of a [4096, 32000] fp32 gradient costs about as much as the whole backward pass, and
// torch's allocator enables huge pages only through a process-wide environment variable.
inline at::Tensor empty_gradient(int64_t rows, int64_t cols, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * options.dtype().itemsize();
  if (bytes >= 4 * kHugePage) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage) == 0) {
      madvise(data, bytes, MADV_HUGEPAGE);  // advisory: failure leaves ordinary pages
      return at::from_blob(data, {rows, cols}, [](void* p) { free(p); }, options);
    }
  }
#endif
  return at::empty({rows, cols}, options);
}

// The gradient of a [rows, cols] input when it is requested, else the empty [0] tensor that stands for none.
inline at::Tensor requested_gradient(bool requested, const at::Tensor& input) {
  return requested ? empty_gradient(input.size(0), input.size(1), input.options()) : at::empty({0}, input.options());
}

struct CpuElements {
  using half = at::Half;
  using bfloat16 = at::BFloat16;
};

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels::cpu
