// CPU kernels for triplet_margin_loss (common/triplet_margin_impl.h): one
// fused pass per triplet, parallel over triplets, vectorised through
// METRICOPS_SIMD_CLONES, with the norm and hinge math of common/hinge.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "common/dispatch.h"
#include "common/triplet_margin_impl.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

template <typename scalar_t, NormKind kKind, bool kSwap>
METRICOPS_SIMD_CLONES void triplet_row_sums(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t dim,
                                            scalar_t eps, scalar_t norm_p, scalar_t& s_ap, scalar_t& s_an,
                                            scalar_t& s_pn) {
  scalar_t x = 0, y = 0, z = 0;
  for (int64_t k = 0; k < dim; ++k) {
    x += norm_accumulate<kKind, scalar_t>(a[k] - p[k] + eps, norm_p);
    y += norm_accumulate<kKind, scalar_t>(a[k] - n[k] + eps, norm_p);
    if (kSwap) z += norm_accumulate<kKind, scalar_t>(p[k] - n[k] + eps, norm_p);
  }
  s_ap = x;
  s_an = y;
  s_pn = z;
}

// grad_a = u_ap - c_an u_an, grad_p = -u_ap - c_pn u_pn, grad_n = c_an u_an + c_pn u_pn,
// with u_xy = r_xy f(e_xy) (see norm_grad_scale / norm_grad_elem) and the
// upstream gradient folded into r and c.
template <typename scalar_t, NormKind kKind, bool kSwap>
METRICOPS_SIMD_CLONES void triplet_grad_row(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t dim,
                                            scalar_t eps, scalar_t norm_p, scalar_t r_ap, scalar_t r_an, scalar_t r_pn,
                                            scalar_t* ga, scalar_t* gp, scalar_t* gn) {
  for (int64_t k = 0; k < dim; ++k) {
    const scalar_t u_ap = r_ap * norm_grad_elem<kKind, scalar_t>(a[k] - p[k] + eps, norm_p);
    const scalar_t u_an = r_an * norm_grad_elem<kKind, scalar_t>(a[k] - n[k] + eps, norm_p);
    scalar_t u_pn = 0;
    if (kSwap) u_pn = r_pn * norm_grad_elem<kKind, scalar_t>(p[k] - n[k] + eps, norm_p);
    ga[k] = u_ap - u_an;
    gp[k] = -u_ap - u_pn;
    gn[k] = u_an + u_pn;
  }
}

struct TripletMarginKernels {
  static void triplet_forward(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const TripletArgs& args,
                              at::Tensor& loss, at::Tensor& dists) {
    const int64_t N = a.size(0), D = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "metricops_triplet_forward_cpu", [&] {
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* np = n.const_data_ptr<scalar_t>();
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* dp = dists.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      const scalar_t norm_p = static_cast<scalar_t>(args.p);
      // squared=True measures ‖a − p‖² without eps.
      const scalar_t eps = args.kind == NormKind::SquaredL2 ? scalar_t(0) : static_cast<scalar_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              scalar_t s_ap, s_an, s_pn;
              triplet_row_sums<scalar_t, kKind, kSwap>(ap + i * D, pp + i * D, np + i * D, D, eps, norm_p, s_ap, s_an,
                                                       s_pn);
              const scalar_t d_ap = norm_finish<kKind, scalar_t>(s_ap, norm_p);
              const scalar_t d_an = norm_finish<kKind, scalar_t>(s_an, norm_p);
              const scalar_t d_pn = kSwap ? norm_finish<kKind, scalar_t>(s_pn, norm_p) : scalar_t(0);
              const scalar_t d_neg = kSwap ? nan_min<scalar_t>(d_an, d_pn) : d_an;
              scalar_t v, slope;
              clamp_min_hinge<scalar_t>(margin + d_ap - d_neg, v, slope);
              lp[i] = v;
              dp[3 * i] = d_ap;
              dp[3 * i + 1] = d_an;
              dp[3 * i + 2] = d_pn;
            }
          });
        });
      });
    });
  }

  static void triplet_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n,
                               const at::Tensor& dists, const TripletArgs& args, at::Tensor& ga, at::Tensor& gp,
                               at::Tensor& gn) {
    const int64_t N = a.size(0), D = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "metricops_triplet_backward_cpu", [&] {
      const scalar_t* gr = grad.const_data_ptr<scalar_t>();
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* np = n.const_data_ptr<scalar_t>();
      const scalar_t* dp = dists.const_data_ptr<scalar_t>();
      scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
      scalar_t* gpp = gp.mutable_data_ptr<scalar_t>();
      scalar_t* gnp = gn.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      const scalar_t norm_p = static_cast<scalar_t>(args.p);
      const scalar_t eps = args.kind == NormKind::SquaredL2 ? scalar_t(0) : static_cast<scalar_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const scalar_t d_ap = dp[3 * i], d_an = dp[3 * i + 1], d_pn = dp[3 * i + 2];
              scalar_t c_an = 1, c_pn = 0;
              if (kSwap) min_shares<scalar_t>(d_an, d_pn, c_an, c_pn);
              const scalar_t d_neg = kSwap ? nan_min<scalar_t>(d_an, d_pn) : d_an;
              scalar_t v, slope;
              clamp_min_hinge<scalar_t>(margin + d_ap - d_neg, v, slope);
              const scalar_t g = gr[i] * slope;
              const scalar_t r_ap = g * norm_grad_scale<kKind, scalar_t>(d_ap, norm_p);
              const scalar_t r_an = g * c_an * norm_grad_scale<kKind, scalar_t>(d_an, norm_p);
              const scalar_t r_pn = kSwap ? g * c_pn * norm_grad_scale<kKind, scalar_t>(d_pn, norm_p) : scalar_t(0);
              triplet_grad_row<scalar_t, kKind, kSwap>(ap + i * D, pp + i * D, np + i * D, D, eps, norm_p, r_ap, r_an,
                                                       r_pn, gap + i * D, gpp + i * D, gnp + i * D);
            }
          });
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("triplet_margin_loss", &triplet_margin_loss_impl<TripletMarginKernels>);
  m.impl("triplet_margin_loss_backward", &triplet_margin_loss_backward_impl<TripletMarginKernels>);
}

}  // namespace cpu
}  // namespace metricops
