// CPU kernels of the streaming semi-hard and batch-all triplet losses, which
// never hold the B×B matrix: the forward mines each
// row block of distances as it is computed and keeps per-anchor sums; the
// backward recomputes each block, mines it again (same GEMM shapes, same
// selections) and applies its coefficients with pairwise_distance_backward
// of the block's rows. Extra memory O(block_rows * B + B * D).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cpu/distance_rows.h"
#include "cpu/triplet_rows.h"

namespace metricops {
namespace cpu {
namespace {

// The streaming backwards' common loop: for each row block of distances,
// fill_row(i, row, coef_row) writes d(loss)/d(d[i, :]) for anchor i into a
// zeroed row, and the block goes through pairwise_distance_backward.
template <typename scalar_t, Metric kMetric, typename FillRow>
at::Tensor streaming_distance_backward(const at::Tensor& x, const at::Tensor& aux, int64_t block_rows,
                                       c10::string_view metric, const FillRow& fill_row) {
  const int64_t B = x.size(0);
  at::Tensor grad = at::zeros_like(x);
  for_each_distance_block<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t r0, at::Tensor& block) {
    const int64_t rows = block.size(0);
    at::Tensor coef = at::zeros({rows, B}, x.options());
    const scalar_t* bp = block.const_data_ptr<scalar_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fill_row(r0 + r, bp + r * B, cp + r * B);
    });
    accumulate_distance_rows_backward(coef, x, block, r0, metric, grad);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_streaming_cpu(const at::Tensor& embeddings,
                                                                              const at::Tensor& labels_in,
                                                                              double margin,
                                                                              c10::string_view metric_name,
                                                                              int64_t block_rows) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor row_sum = at::zeros({B}, x.options());
  at::Tensor row_valid = at::zeros({B}, labels.options());
  at::Tensor row_active = at::zeros({B}, labels.options());
  if (B == 0) return {row_sum, row_valid, row_active};
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_streaming_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* sp = row_sum.mutable_data_ptr<scalar_t>();
    int64_t* vp = row_valid.mutable_data_ptr<int64_t>();
    int64_t* ap = row_active.mutable_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t i, const scalar_t* row) {
        double sum = 0;  // in p order, as the matrix path's sum visits row i
        int64_t valid = 0, active = 0;
        semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], [&](int64_t, int64_t, scalar_t term) {
          sum += static_cast<double>(term);
          ++valid;
          active += term > scalar_t(0);
        });
        sp[i] = static_cast<scalar_t>(sum);
        vp[i] = valid;
        ap[i] = active;
      });
    });
  });
  return {row_sum, row_valid, row_active};
}

at::Tensor semihard_triplet_streaming_backward_cpu(const at::Tensor& grad_row_sum, const at::Tensor& embeddings,
                                                   const at::Tensor& labels_in, double margin,
                                                   c10::string_view metric_name, int64_t block_rows) {
  const auto [metric, x, labels, B] =
      prepare_streaming_backward("semihard_triplet_streaming_backward", grad_row_sum, {embeddings.size(0)}, embeddings,
                                 labels_in, margin, metric_name);
  at::Tensor grad = at::zeros_like(x);
  if (B == 0) return grad;
  const at::Tensor g = grad_row_sum.to(x.scalar_type()).contiguous();
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_streaming_backward_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      grad = streaming_distance_backward<scalar_t, kMetric>(
          x, aux, block_rows, metric_name, [&](int64_t i, const scalar_t* row, scalar_t* coef) {
            semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()],
                                   [&](int64_t p, int64_t n, scalar_t term) {
                                     if (!semihard_term_has_gradient(n, term)) return;
                                     coef[p] += gp[i];
                                     coef[n] -= gp[i];
                                   });
          });
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_streaming_cpu(const at::Tensor& embeddings,
                                                                               const at::Tensor& labels_in,
                                                                               double margin,
                                                                               c10::string_view metric_name,
                                                                               int64_t block_rows) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor loss_sum = at::zeros({}, x.options());
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B == 0) return {loss_sum, num_valid, num_active};
  const at::Tensor aux = row_aux_cpu(x, metric);
  BatchAllRowResults rows(B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_streaming_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t i, const scalar_t* row) {
        BatchAllWorkspace<scalar_t>& ws = buffers[at::get_thread_num()];
        ws.scratch.assign(B, scalar_t(0));
        batch_all_row<scalar_t>(row, lab, B, i, m, ws, ws.scratch.data(), rows.sum[i], rows.valid[i], rows.active[i]);
      });
    });
  });
  rows.fill_totals(loss_sum, num_valid, num_active);
  return {loss_sum, num_valid, num_active};
}

at::Tensor batch_all_triplet_streaming_backward_cpu(const at::Tensor& grad_sum, const at::Tensor& embeddings,
                                                    const at::Tensor& labels_in, double margin,
                                                    c10::string_view metric_name, int64_t block_rows) {
  const auto [metric, x, labels, B] = prepare_streaming_backward("batch_all_triplet_streaming_backward", grad_sum, {},
                                                                 embeddings, labels_in, margin, metric_name);
  at::Tensor grad = at::zeros_like(x);
  if (B == 0) return grad;
  const at::Tensor aux = row_aux_cpu(x, metric);
  // The multiplicities are built for a unit upstream gradient; scaling the
  // result by grad_sum (0-dim, on the device) keeps the host out of it.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_streaming_backward_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      grad = streaming_distance_backward<scalar_t, kMetric>(
          x, aux, block_rows, metric_name, [&](int64_t i, const scalar_t* row, scalar_t* coef) {
            double sum;
            int64_t valid, active;
            batch_all_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], coef, sum, valid, active);
          });
    });
  });
  return grad.mul_(grad_sum.to(x.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("semihard_triplet_streaming", &semihard_triplet_streaming_cpu);
  m.impl("semihard_triplet_streaming_backward", &semihard_triplet_streaming_backward_cpu);
  m.impl("batch_all_triplet_streaming", &batch_all_triplet_streaming_cpu);
  m.impl("batch_all_triplet_streaming_backward", &batch_all_triplet_streaming_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
