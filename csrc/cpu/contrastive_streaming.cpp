// Streaming contrastive loss on CPU: the B×B distance matrix is never held.
// Forward sums the terms row block by row block; backward recomputes each
// block (as FlashAttention recomputes attention) and applies it with one GEMM
// per block, so extra memory is O(block_rows * B + B * D).
//
// The loss runs over ordered pairs and d is symmetric, so x_k's gradient is
// twice its "row" side: grad_k = 2 (row_coef_k x_k - sum_j w_kj x_j).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/contrastive_streaming.h"
#include "common/dispatch.h"
#include "common/hinge.h"
#include "common/row_blocks.h"
#include "cpu/distance_rows.h"

namespace metricops {
namespace cpu {
namespace {

// Rows per block for block_rows <= 0 (a direct torch.ops call: Python always
// passes its own choice): a cache-sized block, the CPU default of
// metricops/_memory.py. Never all B rows: the op promises never to hold the
// B×B matrix.
constexpr int64_t kDefaultBlockRows = 256;

std::tuple<at::Tensor, at::Tensor> contrastive_loss_streaming_cpu(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels_in, double pos_margin,
                                                                  double neg_margin, c10::string_view metric_name,
                                                                  bool squared, c10::string_view reduction,
                                                                  int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  const Reduction red = check_contrastive_streaming_inputs(embeddings, labels_in, reduction);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  std::vector<double> row_sum(B, 0.0);
  std::vector<int64_t> row_nonzero(B, 0);
  block_rows = rows_per_block(block_rows, B, kDefaultBlockRows);
  if (B > 0) {
    const at::Tensor aux = row_aux_cpu(x, metric);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_contrastive_streaming_cpu", [&] {
      const int64_t* lab = labels.const_data_ptr<int64_t>();
      const scalar_t pm = static_cast<scalar_t>(pos_margin), nm = static_cast<scalar_t>(neg_margin);
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        for_each_distance_row<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t i, const scalar_t* row) {
          double s = 0;
          int64_t nz = 0;
          for (int64_t j = 0; j < B; ++j) {
            if (j == i) continue;
            scalar_t value, slope;
            contrastive_term<scalar_t>(row[j], lab[j] == lab[i], pm, nm, squared, value, slope);
            s += static_cast<double>(value);
            nz += value > scalar_t(0);
          }
          row_sum[i] = s;
          row_nonzero[i] = nz;
        });
      });
    });
  }
  double total = 0;
  int64_t nonzero = 0;
  for (int64_t i = 0; i < B; ++i) total += row_sum[i], nonzero += row_nonzero[i];
  const double denom = streaming_denominator(red, B, nonzero);
  at::Tensor loss = at::zeros({}, x.options());
  loss.fill_(denom > 0 ? total / denom : total * 0.0);
  at::Tensor denom_t = at::zeros({}, x.options().dtype(at::kDouble));  // exact for any B
  denom_t.fill_(denom);
  return {loss, denom_t};
}

at::Tensor contrastive_loss_streaming_backward_cpu(const at::Tensor& grad, const at::Tensor& embeddings,
                                                   const at::Tensor& labels_in, const at::Tensor& denom,
                                                   double pos_margin, double neg_margin, c10::string_view metric_name,
                                                   bool squared, int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  const auto [x, labels] = prepare_contrastive_streaming_backward(grad, embeddings, labels_in, denom);
  const int64_t B = x.size(0);
  at::Tensor out = at::zeros_like(x);
  if (B == 0) return out;
  block_rows = rows_per_block(block_rows, B, kDefaultBlockRows);
  // Weights are built for a unit upstream gradient, doubled for the symmetric
  // column side (see the top of this file), and scaled by grad / denom at the
  // end (0 when denom is 0).
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_contrastive_streaming_backward_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* ap = aux.const_data_ptr<scalar_t>();
    const scalar_t pm = static_cast<scalar_t>(pos_margin), nm = static_cast<scalar_t>(neg_margin);
    const scalar_t sc = scalar_t(2);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      for_each_distance_block<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t r0, at::Tensor& block) {
        const int64_t rows = block.size(0);
        at::Tensor row_coef = at::empty({rows}, x.options());
        scalar_t* bp = block.mutable_data_ptr<scalar_t>();
        scalar_t* cp = row_coef.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, rows_grain(B), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t i = r0 + r;
            scalar_t* row = bp + r * B;  // distances in, cross weights out
            scalar_t norm_sum = 0;
            for (int64_t j = 0; j < B; ++j) {
              scalar_t w = 0, p = 0;
              if (j != i) {
                scalar_t value, slope;
                contrastive_term<scalar_t>(row[j], lab[j] == lab[i], pm, nm, squared, value, slope);
                distance_grad_weights<scalar_t>(kMetric, sc * slope, row[j], ap[i], ap[j], w, p);
              }
              row[j] = w;
              norm_sum += p;
            }
            cp[r] = norm_sum * norm_term_scale<scalar_t>(kMetric, ap[i]);
          }
        });
        const at::Tensor x_rows = x.narrow(0, r0, rows);
        out.narrow(0, r0, rows).copy_(at::addmm(x_rows.mul(row_coef.unsqueeze(1)), block, x, 1, -1));
      });
    });
  });
  return out.mul_(streaming_grad_scale(grad, denom));
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("contrastive_loss_streaming", &contrastive_loss_streaming_cpu);
  m.impl("contrastive_loss_streaming_backward", &contrastive_loss_streaming_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
