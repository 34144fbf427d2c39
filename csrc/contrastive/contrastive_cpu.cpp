// CPU kernel of the contrastive family: CRD's NCE loss rows, score logsumexps and embedding gradient in one pass
// over the gathered memory rows. Spec: kdkernels/reference/contrastive.py; formula: contrastive_host.h.
//
// Work is split into tasks of (row b, chunk of kChunkContrasts contrasts), run by at::parallel_for. A task walks its
// contrasts in blocks of kBlock: the block's memory rows are widened to acc_t (in cache), their dot products with
// the row's embedding give the scores, the per-contrast terms (softplus, sigmoid, exp for the logsumexp) are
// vectorised across the block, and the gradient adds w_k memory[idx_k] from the cached rows. Each task writes its
// partial sums (loss, (max, sum) of the logsumexp, gradient) to a workspace; a second parallel pass adds each row's
// partials in chunk order. The chunking does not depend on the thread count: results are bit-for-bit deterministic.
// Nothing of size B x (K+1) x d is allocated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/cpu_rows.h"
#include "contrastive_host.h"

namespace kdkernels {
namespace {

using namespace kdkernels::cpu;

constexpr int64_t kChunkContrasts = 1024;  // contrasts per task
constexpr int64_t kBlock = 16;             // contrasts whose terms are vectorised together

template <typename acc_t>
struct Problem {
  const acc_t* log_normalizer;
  const int64_t* indices;  // [B, K+1] contiguous
  contrastive::Shape shape;
  contrastive::Constants constants;
  int64_t chunks;  // per row
};

// A task's partial results: the loss sum, the logsumexp's running (max, sum) and the gradient [d].
struct Partial {
  double loss = 0.0, max = kNegInf, sum = 0.0;
  int64_t bad_index = -1;  // position in contrast_indices of an out-of-range index, or -1
};

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    sum0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), sum0);
    sum1 = at::vec::fmadd(Vec::loadu(a + j + Vec::size()), Vec::loadu(b + j + Vec::size()), sum1);
  }
  for (; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    sum0 = at::vec::fmadd(Vec::loadu(a + j, count), Vec::loadu(b + j, count), sum0);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum0 + sum1);
}

// y += w x over n elements.
template <typename acc_t>
void add_scaled(acc_t* y, const acc_t* x, acc_t w, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vw(w);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    at::vec::fmadd(vw, Vec::loadu(x + j, count), Vec::loadu(y + j, count)).store(y + j, count);
  }
}

// Per-contrast terms of one block, vectorised: z = sign (u - log c), loss term softplus(z) + shift, weight
// sign sigmoid(z), and exp(s - block max) for the logsumexp. sign = -1 and shift = 0 for the positive (column 0),
// +1 and log c - log noise_mass for a negative.
template <typename acc_t>
struct BlockTerms {
  acc_t loss_sum;     // sum of the loss terms
  acc_t max, exp_sum; // the block's max score and sum exp(s - max)
};

template <typename acc_t>
BlockTerms<acc_t> block_terms(const acc_t* scores, const acc_t* signs, const acc_t* shifts, int64_t n, acc_t log_z,
                              acc_t log_c, acc_t* weights) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), one(acc_t(1)), v_log_z(log_z), v_log_c(log_c);
  Vec loss(zero);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec sign = Vec::loadu(signs + j, count);  // 0 past count: z = 0, masked below
    const Vec z = sign * (Vec::loadu(scores + j, count) - v_log_z - v_log_c);
    const Vec e = (zero - z.abs()).exp();
    const Vec softplus = at::vec::maximum(z, zero) + e.log1p();
    const Vec sigmoid = Vec::blendv(e, one, z >= zero) / (one + e);
    loss += Vec::set(zero, softplus + Vec::loadu(shifts + j, count), count);
    (sign * sigmoid).store(weights + j, count);
  }
  const acc_t max = max_of(scores, n);
  const acc_t shift = static_cast<acc_t>(safe_shift(max));
  Vec exp_sum(zero);
  for (int64_t j = 0; j < n; j += Vec::size()) exp_sum += (load_padded(scores + j, n - j) - Vec(shift)).exp();
  auto add = [](Vec& p, Vec& q) { return p + q; };
  return {at::vec::vec_reduce_all<acc_t>(add, loss), max, at::vec::vec_reduce_all<acc_t>(add, exp_sum)};
}

inline void merge_logsumexp(Partial& p, double max, double sum) {
  if (max == kNegInf) return;
  if (max > p.max) {
    p.sum = p.sum * std::exp(safe_shift(p.max) - max) + sum;
    p.max = max;
  } else {
    p.sum += sum * std::exp(max - p.max);
  }
}

// One task: row b, contrasts [first, last). grad (d values, zeroed here) is null when no gradient is wanted.
template <typename E, typename M, typename acc_t>
Partial run_task(const Problem<acc_t>& problem, const E* embed_row, const M* memory, int64_t memory_stride,
                 int64_t b, int64_t first, int64_t last, acc_t* grad, std::vector<acc_t>& rows_buffer,
                 std::vector<acc_t>& embed_buffer) {
  const contrastive::Shape& shape = problem.shape;
  const int64_t d = shape.features;
  const acc_t* v = as_acc(embed_row, embed_buffer.data(), d);
  const int64_t* indices = problem.indices + b * shape.contrasts;
  const acc_t inv_t = static_cast<acc_t>(problem.constants.inv_t);
  const acc_t log_c = static_cast<acc_t>(problem.constants.log_c);
  const acc_t log_z = *problem.log_normalizer;
  if (grad != nullptr) std::fill(grad, grad + d, acc_t(0));

  Partial partial;
  alignas(64) acc_t scores[kBlock], signs[kBlock], shifts[kBlock], weights[kBlock];
  const acc_t* rows[kBlock];
  for (int64_t k0 = first; k0 < last; k0 += kBlock) {
    const int64_t n = std::min(kBlock, last - k0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t index = indices[k0 + j];
      const bool valid = index >= 0 && index < shape.bank;
      if (!valid && partial.bad_index < 0) partial.bad_index = b * shape.contrasts + k0 + j;
      rows[j] = as_acc(memory + (valid ? index : 0) * memory_stride, rows_buffer.data() + j * d, d);
      scores[j] = dot(rows[j], v, d) * inv_t;
      const bool positive = k0 + j == 0;
      signs[j] = positive ? acc_t(-1) : acc_t(1);
      shifts[j] = positive ? acc_t(0) : static_cast<acc_t>(problem.constants.negative_shift);
    }
    const BlockTerms<acc_t> terms = block_terms(scores, signs, shifts, n, log_z, log_c, weights);
    partial.loss += static_cast<double>(terms.loss_sum);
    merge_logsumexp(partial, terms.max, terms.exp_sum);
    if (grad != nullptr) {
      for (int64_t j = 0; j < n; ++j) add_scaled(grad, rows[j], weights[j] * inv_t, d);
    }
  }
  return partial;
}

// Adds each row's task partials in chunk order into the outputs.
template <typename E, typename acc_t>
void reduce_rows(const Problem<acc_t>& problem, const std::vector<Partial>& partials,
                 const std::vector<acc_t>& grads, acc_t* loss_rows, acc_t* score_lse, E* grad_embed) {
  const int64_t d = problem.shape.features, chunks = problem.chunks;
  at::parallel_for(0, problem.shape.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(d), narrow_buffer(d);
    for (int64_t b = begin; b < end; ++b) {
      Partial row;
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial& p = partials[b * chunks + c];
        row.loss += p.loss;
        merge_logsumexp(row, p.max, p.sum);
      }
      loss_rows[b] = static_cast<acc_t>(row.loss);
      score_lse[b] = static_cast<acc_t>(row.max == kNegInf ? kNegInf : row.max + std::log(row.sum));
      if (grad_embed == nullptr) continue;
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t c = 0; c < chunks; ++c) add_scaled(total.data(), grads.data() + (b * chunks + c) * d, acc_t(1), d);
      if constexpr (std::is_same_v<E, acc_t>) {
        std::copy(total.begin(), total.end(), grad_embed + b * d);
      } else {
        at::vec::convert(total.data(), grad_embed + b * d, d);
      }
    }
  });
}

template <typename E, typename M>
void forward(const at::Tensor& embed, const at::Tensor& memory, const at::Tensor& indices,
             const at::Tensor& log_normalizer, const contrastive::Constants& constants, at::Tensor& loss_rows,
             at::Tensor& score_lse, E* grad_embed) {
  using acc_t = host::acc_type_t<E>;
  const contrastive::Shape shape = contrastive::shape_of(embed, memory, indices);
  const int64_t d = shape.features;
  const int64_t chunks = (shape.contrasts + kChunkContrasts - 1) / kChunkContrasts;
  const Problem<acc_t> problem{log_normalizer.const_data_ptr<acc_t>(), indices.const_data_ptr<int64_t>(), shape,
                               constants, chunks};
  const E* embed_data = embed.const_data_ptr<E>();
  const M* memory_data = memory.const_data_ptr<M>();
  std::vector<Partial> partials(shape.batch * chunks);
  std::vector<acc_t> grads(grad_embed != nullptr ? shape.batch * chunks * d : 0);
  at::parallel_for(0, shape.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows_buffer(kBlock * d), embed_buffer(d);  // widening buffers (unused for acc_t inputs)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, first = (task % chunks) * kChunkContrasts;
      const int64_t last = std::min(first + kChunkContrasts, shape.contrasts);
      partials[task] = run_task<E, M, acc_t>(problem, embed_data + b * embed.stride(0), memory_data,
                                             memory.stride(0), b, first, last,
                                             grad_embed != nullptr ? grads.data() + task * d : nullptr,
                                             rows_buffer, embed_buffer);
    }
  });
  for (const Partial& p : partials) {
    TORCH_CHECK_VALUE(p.bad_index < 0, contrastive::kOp, ": contrast_indices must lie in [0, ", shape.bank,
                      ") (the memory's rows), got ", problem.indices[p.bad_index], " at row ",
                      p.bad_index / shape.contrasts, ", column ", p.bad_index % shape.contrasts);
  }
  reduce_rows<E, acc_t>(problem, partials, grads, loss_rows.mutable_data_ptr<acc_t>(),
                        score_lse.mutable_data_ptr<acc_t>(), grad_embed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_forward_cpu(const at::Tensor& embed, const at::Tensor& memory,
                                                                   const at::Tensor& contrast_indices,
                                                                   const at::Tensor& log_normalizer,
                                                                   double temperature, double noise_mass, double eps,
                                                                   bool embed_grad) {
  contrastive::check_tensors(embed, memory, contrast_indices, log_normalizer, at::kCPU);
  const contrastive::Constants constants = contrastive::check_constants(temperature, noise_mass, eps);
  at::Tensor loss_rows, score_lse, grad_embed;
  std::tie(loss_rows, score_lse, grad_embed) = contrastive::allocate_outputs(embed, embed_grad);
  const at::Tensor embed_rows = contrastive::unit_stride_rows(embed);
  const at::Tensor memory_rows = contrastive::unit_stride_rows(memory);
  const at::Tensor indices = contrast_indices.contiguous();
  host::dispatch_logits_pair<CpuElements>(embed_rows, memory_rows, [&](auto e_tag, auto m_tag) {
    using E = typename decltype(e_tag)::type;
    using M = typename decltype(m_tag)::type;
    forward<E, M>(embed_rows, memory_rows, indices, log_normalizer, constants, loss_rows, score_lse,
                  embed_grad ? grad_embed.mutable_data_ptr<E>() : nullptr);
  });
  return {loss_rows, score_lse, grad_embed};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("crd_nce_forward", &crd_nce_forward_cpu); }

}  // namespace kdkernels
