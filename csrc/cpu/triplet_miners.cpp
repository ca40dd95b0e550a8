// CPU kernels of the sorting triplet miners on a labelled batch: semi-hard
// (matrix form and its backward), batch-all, triplet_statistics and
// mine_triplets. Every op streams the self-distance matrix row by row
// (cpu/distance_rows.h: one BLAS GEMM per row block, a vectorised distance
// epilogue) and mines each anchor's row while it is hot in cache
// (cpu/triplet_rows.h). Per-row partial results are reduced serially, so
// every op is deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <numeric>
#include <optional>
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

// ---------------------------------------------------------------- semi-hard

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_cpu(const at::Tensor& embeddings,
                                                                    const at::Tensor& labels_in, double margin,
                                                                    c10::string_view metric_name) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor losses = at::zeros({B, B}, x.options());
  at::Tensor negative = at::full({B, B}, -1, labels.options());
  at::Tensor dist = at::empty({B, B}, x.options());
  if (B == 0) return {losses, negative, dist};
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* lp = losses.mutable_data_ptr<scalar_t>();
    int64_t* np = negative.mutable_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      // One sort buffer per thread, reused across its rows.
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t i, const scalar_t* row) {
        semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()],
                               [&](int64_t p, int64_t n, scalar_t term) {
                                 np[i * B + p] = n;
                                 lp[i * B + p] = term;
                               });
      });
    });
  });
  return {losses, negative, dist};
}

at::Tensor semihard_triplet_backward_cpu(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_dist,
                                         const at::Tensor& embeddings, const at::Tensor& losses_in,
                                         const at::Tensor& negative_in, const at::Tensor& dist,
                                         c10::string_view metric) {
  check_semihard_backward_inputs(grad_losses, grad_dist, embeddings, losses_in, negative_in, dist, /*may_sync=*/true);
  const int64_t B = embeddings.size(0);
  at::Tensor coef = grad_dist.has_value() ? grad_dist->to(embeddings.scalar_type()).contiguous().clone()
                                          : at::zeros({B, B}, embeddings.options());
  const at::Tensor g = grad_losses.to(embeddings.scalar_type()).contiguous();
  const at::Tensor losses = losses_in.contiguous();
  const at::Tensor negative = negative_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "metricops_semihard_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* lp = losses.const_data_ptr<scalar_t>();
    const int64_t* np = negative.const_data_ptr<int64_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) semihard_coefficients_row<scalar_t>(a, B, gp, lp, np, cp);
    });
  });
  return self_distance_backward(coef, embeddings, dist, metric);
}

// ---------------------------------------------------------------- batch-all

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor dist = at::empty({B, B}, x.options());
  at::Tensor multiplicity = at::zeros({B, B}, x.options());
  at::Tensor loss_sum = at::zeros({}, x.options());
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B == 0) return {loss_sum, num_valid, num_active, dist, multiplicity};
  const at::Tensor aux = row_aux_cpu(x, metric);
  BatchAllRowResults rows(B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* mp = multiplicity.mutable_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t i, const scalar_t* row) {
        batch_all_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], mp + i * B, rows.sum[i],
                                rows.valid[i], rows.active[i]);
      });
    });
  });
  rows.fill_totals(loss_sum, num_valid, num_active);
  return {loss_sum, num_valid, num_active, dist, multiplicity};
}

// ---------------------------------------------------------------- statistics

at::Tensor triplet_statistics_cpu(const at::Tensor& embeddings, const at::Tensor& labels_in, double margin,
                                  c10::string_view metric_name) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor counts = at::zeros({4}, labels.options());  // total, easy, semihard, hard
  if (B == 0) return counts;
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<int64_t> row_counts(4 * B, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_triplet_statistics_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 1024, nullptr, [&](int64_t i, const scalar_t* row) {
        SortedNegatives<scalar_t>& negs = buffers[at::get_thread_num()];
        int64_t* c = row_counts.data() + 4 * i;
        int64_t P = 0, n = 0;
        for (int64_t j = 0; j < B; ++j) {
          if (lab[j] != lab[i]) {
            ++n;
          } else {
            P += j != i;
          }
        }
        if (n == 0 || P == 0) return;
        if (few_positives(P, n)) {  // one pass over the negatives per positive, no sort
          negs.dist.clear();
          for (int64_t j = 0; j < B; ++j) {
            if (lab[j] != lab[i]) negs.dist.push_back(row[j]);
          }
          for (int64_t p = 0; p < B; ++p) {
            if (p == i || lab[p] != lab[i]) continue;
            int64_t easy = 0, semihard = 0, hard = 0;
            for (int64_t k = 0; k < n; ++k) classify_negative(negs.dist[k], row[p], m, easy, semihard, hard);
            c[0] += n, c[1] += easy, c[2] += semihard, c[3] += hard;
          }
          return;
        }
        negs.build(row, lab, B, i);
        for (int64_t p = 0; p < B; ++p) {
          if (p == i || lab[p] != lab[i]) continue;
          int64_t easy, semihard, hard;
          classify_negatives(negs.dist.data(), n, row[p], m, easy, semihard, hard);
          c[0] += n, c[1] += easy, c[2] += semihard, c[3] += hard;
        }
      });
    });
  });
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    for (int k = 0; k < 4; ++k) cp[k] += row_counts[4 * i + k];
  }
  return counts;
}

// ---------------------------------------------------------------- mine_triplets

std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cpu(const at::Tensor& embeddings,
                                                                 const at::Tensor& labels_in,
                                                                 c10::string_view strategy_name, double margin,
                                                                 c10::string_view metric_name) {
  parse_metric(metric_name);  // the errors come in argument order: metric, strategy, inputs
  const MiningStrategy strategy = parse_strategy(strategy_name);
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  auto empty_index = [&](int64_t n) { return at::empty({n}, labels.options()); };
  if (strategy == MiningStrategy::BatchHard) {
    auto [losses, positive, negative, d_ap, d_an] =
        batch_hard_triplet_cpu(embeddings, labels_in, margin, metric_name, false, 0, false);
    const int64_t* pp = positive.const_data_ptr<int64_t>();
    std::vector<int64_t> anchors;
    for (int64_t a = 0; a < B; ++a) {
      if (pp[a] >= 0) anchors.push_back(a);
    }
    const int64_t n = static_cast<int64_t>(anchors.size());
    at::Tensor a_out = empty_index(n), p_out = empty_index(n), n_out = empty_index(n);
    const int64_t* np = negative.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < n; ++k) {
      a_out.mutable_data_ptr<int64_t>()[k] = anchors[k];
      p_out.mutable_data_ptr<int64_t>()[k] = pp[anchors[k]];
      n_out.mutable_data_ptr<int64_t>()[k] = np[anchors[k]];
    }
    return {a_out, p_out, n_out};
  }
  if (B == 0) return {empty_index(0), empty_index(0), empty_index(0)};
  at::Tensor dist = at::empty({B, B}, x.options());
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<int64_t> per_anchor(B + 1, 0);
  at::Tensor a_out, p_out, n_out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_mine_triplets_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    // Visits the selected (p, n) of anchor a in lexicographic order.
    auto visit = [&](int64_t a, const scalar_t* row, auto&& emit) {
      for (int64_t p = 0; p < B; ++p) {
        if (p == a || lab[p] != lab[a]) continue;
        for (int64_t n = 0; n < B; ++n) {
          if (lab[n] != lab[a] && strategy_selects<scalar_t>(strategy, row[n] - row[p], m)) emit(p, n);
        }
      }
    };
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t a, const scalar_t* row) {
        int64_t count = 0;
        visit(a, row, [&](int64_t, int64_t) { ++count; });
        per_anchor[a + 1] = count;
      });
    });
    std::partial_sum(per_anchor.begin(), per_anchor.end(), per_anchor.begin());
    const int64_t total = per_anchor[B];
    a_out = empty_index(total), p_out = empty_index(total), n_out = empty_index(total);
    int64_t* ap = a_out.mutable_data_ptr<int64_t>();
    int64_t* pp = p_out.mutable_data_ptr<int64_t>();
    int64_t* np = n_out.mutable_data_ptr<int64_t>();
    const scalar_t* dp = dist.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        int64_t k = per_anchor[a];
        visit(a, dp + a * B, [&](int64_t p, int64_t n) { ap[k] = a, pp[k] = p, np[k] = n, ++k; });
      }
    });
  });
  return {a_out, p_out, n_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("semihard_triplet", &semihard_triplet_cpu);
  m.impl("semihard_triplet_backward", &semihard_triplet_backward_cpu);
  m.impl("batch_all_triplet", &batch_all_triplet_cpu);
  m.impl("triplet_statistics", &triplet_statistics_cpu);
  m.impl("mine_triplets", &mine_triplets_cpu);
}

}  // namespace cpu
}  // namespace metricops
