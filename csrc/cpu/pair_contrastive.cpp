// CPU kernels for pair_contrastive_loss (common/pair_contrastive_impl.h): one
// fused pass per pair, parallel over pairs, vectorised through
// METRICOPS_SIMD_CLONES, with the math of common/hinge.h and common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common/dispatch.h"
#include "common/pair_contrastive_impl.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// Sums over one pair of rows x0, x1: Σ(x0 - x1)² (s_diff) for the euclidean
// metrics; <x0, x1> (s_dot) and both squared norms (s_n0, s_n1) for cosine.
// The others are 0.
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES void pair_row_sums(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t& s_diff,
                                         scalar_t& s_dot, scalar_t& s_n0, scalar_t& s_n1) {
  scalar_t a = 0, b = 0, c = 0, e = 0;
  for (int64_t k = 0; k < dim; ++k) {
    if (kMetric == Metric::Cosine) {
      b += x0[k] * x1[k];
      c += x0[k] * x0[k];
      e += x1[k] * x1[k];
    } else {
      const scalar_t diff = x0[k] - x1[k];
      a += diff * diff;
    }
  }
  s_diff = a;
  s_dot = b;
  s_n0 = c;
  s_n1 = e;
}

// Explicit differences for the euclidean metrics (exact 0 for equal rows);
// row_aux/distance_from_dot for cosine, as pairwise_distance computes it.
template <typename scalar_t, Metric kMetric>
scalar_t pair_distance(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t& aux0, scalar_t& aux1) {
  scalar_t s_diff, s_dot, s_n0, s_n1;
  pair_row_sums<scalar_t, kMetric>(x0, x1, dim, s_diff, s_dot, s_n0, s_n1);
  if (kMetric == Metric::Cosine) {
    aux0 = checked_row_aux<scalar_t>(kMetric, s_n0, x0, dim);
    aux1 = checked_row_aux<scalar_t>(kMetric, s_n1, x1, dim);
    return guarded_distance_key<scalar_t, scalar_t>(kMetric, aux0, aux1, s_dot, x0, scalar_t(1), x1, scalar_t(1), dim,
                                                    gram_tolerance<scalar_t>(dim));
  }
  aux0 = aux1 = scalar_t(0);
  return kMetric == Metric::Euclidean ? std::sqrt(s_diff) : s_diff;
}

template <typename scalar_t>
METRICOPS_SIMD_CLONES void pair_grad_row(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t c0, scalar_t c1,
                                         scalar_t w, scalar_t* g0, scalar_t* g1) {
  // grad_x0 = c0 * x0 - w * x1, grad_x1 = c1 * x1 - w * x0 (coefficient form).
  for (int64_t k = 0; k < dim; ++k) {
    g0[k] = c0 * x0[k] - w * x1[k];
    g1[k] = c1 * x1[k] - w * x0[k];
  }
}

struct PairContrastiveKernels {
  static void pair_forward(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y, const PairArgs& args,
                           at::Tensor& loss, at::Tensor& dist) {
    const int64_t N = x0.size(0), D = x0.size(1);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "metricops_pair_contrastive_forward_cpu", [&] {
      const scalar_t* p0 = x0.const_data_ptr<scalar_t>();
      const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
      const bool* yp = y.const_data_ptr<bool>();
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* dp = dist.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            scalar_t aux0, aux1, t, s;
            const scalar_t d = pair_distance<scalar_t, kMetric>(p0 + i * D, p1 + i * D, D, aux0, aux1);
            pair_contrastive_term<scalar_t>(d, yp[i], margin, args.squared, t, s);
            lp[i] = t;
            dp[i] = d;
          }
        });
      });
    });
  }

  static void pair_backward(const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y,
                            const at::Tensor& dist, const PairArgs& args, at::Tensor& g0, at::Tensor& g1) {
    const int64_t N = x0.size(0), D = x0.size(1);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "metricops_pair_contrastive_backward_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* p0 = x0.const_data_ptr<scalar_t>();
      const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
      const bool* yp = y.const_data_ptr<bool>();
      const scalar_t* dp = dist.const_data_ptr<scalar_t>();
      scalar_t* o0 = g0.mutable_data_ptr<scalar_t>();
      scalar_t* o1 = g1.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            scalar_t aux0 = 0, aux1 = 0;
            if (kMetric == Metric::Cosine) {
              aux0 = checked_row_aux<scalar_t>(kMetric, squared_norm(p0 + i * D, D), p0 + i * D, D);
              aux1 = checked_row_aux<scalar_t>(kMetric, squared_norm(p1 + i * D, D), p1 + i * D, D);
            }
            scalar_t t, s, w, pn;
            pair_contrastive_term<scalar_t>(dp[i], yp[i], margin, args.squared, t, s);
            distance_grad_weights<scalar_t>(kMetric, gp[i] * s, dp[i], aux0, aux1, w, pn);
            pair_grad_row<scalar_t>(p0 + i * D, p1 + i * D, D, pn * norm_term_scale<scalar_t>(kMetric, aux0),
                                    pn * norm_term_scale<scalar_t>(kMetric, aux1), w, o0 + i * D, o1 + i * D);
          }
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("pair_contrastive_loss", &pair_contrastive_loss_impl<PairContrastiveKernels>);
  m.impl("pair_contrastive_loss_backward", &pair_contrastive_loss_backward_impl<PairContrastiveKernels>);
}

}  // namespace cpu
}  // namespace metricops
