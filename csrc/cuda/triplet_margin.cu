// CUDA kernels for triplet_margin_loss (common/triplet_margin_impl.h): one
// warp per triplet, on the current stream, with the norm and hinge math of
// common/hinge.h (the same arithmetic the CPU tests exercise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/triplet_margin_impl.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t, NormKind kKind, bool kSwap>
__global__ void triplet_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                       const scalar_t* __restrict__ n, int64_t N, int64_t D, acc_t margin, acc_t norm_p,
                                       acc_t eps, scalar_t* __restrict__ loss, acc_t* __restrict__ dists) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    acc_t s_ap = 0, s_an = 0, s_pn = 0;
    for (int64_t k = lane; k < D; k += kWarp) {
      const acc_t av = static_cast<acc_t>(a[i * D + k]);
      const acc_t pv = static_cast<acc_t>(p[i * D + k]);
      const acc_t nv = static_cast<acc_t>(n[i * D + k]);
      s_ap += norm_accumulate<kKind, acc_t>(av - pv + eps, norm_p);
      s_an += norm_accumulate<kKind, acc_t>(av - nv + eps, norm_p);
      if (kSwap) s_pn += norm_accumulate<kKind, acc_t>(pv - nv + eps, norm_p);
    }
    s_ap = warp_sum(s_ap);
    s_an = warp_sum(s_an);
    if (kSwap) s_pn = warp_sum(s_pn);
    if (lane == 0) {
      const acc_t d_ap = norm_finish<kKind, acc_t>(s_ap, norm_p);
      const acc_t d_an = norm_finish<kKind, acc_t>(s_an, norm_p);
      const acc_t d_pn = kSwap ? norm_finish<kKind, acc_t>(s_pn, norm_p) : acc_t(0);
      const acc_t d_neg = kSwap ? nan_min<acc_t>(d_an, d_pn) : d_an;
      acc_t v, slope;
      clamp_min_hinge<acc_t>(margin + d_ap - d_neg, v, slope);
      loss[i] = static_cast<scalar_t>(v);
      dists[3 * i] = d_ap;
      dists[3 * i + 1] = d_an;
      dists[3 * i + 2] = d_pn;
    }
  }
}

template <typename scalar_t, typename acc_t, NormKind kKind, bool kSwap>
__global__ void triplet_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ a,
                                        const scalar_t* __restrict__ p, const scalar_t* __restrict__ n,
                                        const acc_t* __restrict__ dists, int64_t N, int64_t D, acc_t margin,
                                        acc_t norm_p, acc_t eps, scalar_t* __restrict__ ga, scalar_t* __restrict__ gp,
                                        scalar_t* __restrict__ gn) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    const acc_t d_ap = dists[3 * i], d_an = dists[3 * i + 1], d_pn = dists[3 * i + 2];
    acc_t c_an = 1, c_pn = 0;
    if (kSwap) min_shares<acc_t>(d_an, d_pn, c_an, c_pn);
    const acc_t d_neg = kSwap ? nan_min<acc_t>(d_an, d_pn) : d_an;
    acc_t v, slope;
    clamp_min_hinge<acc_t>(margin + d_ap - d_neg, v, slope);
    const acc_t g = static_cast<acc_t>(grad[i]) * slope;
    const acc_t r_ap = g * norm_grad_scale<kKind, acc_t>(d_ap, norm_p);
    const acc_t r_an = g * c_an * norm_grad_scale<kKind, acc_t>(d_an, norm_p);
    const acc_t r_pn = kSwap ? g * c_pn * norm_grad_scale<kKind, acc_t>(d_pn, norm_p) : acc_t(0);
    for (int64_t k = lane; k < D; k += kWarp) {
      const int64_t idx = i * D + k;
      const acc_t av = static_cast<acc_t>(a[idx]), pv = static_cast<acc_t>(p[idx]), nv = static_cast<acc_t>(n[idx]);
      const acc_t u_ap = r_ap * norm_grad_elem<kKind, acc_t>(av - pv + eps, norm_p);
      const acc_t u_an = r_an * norm_grad_elem<kKind, acc_t>(av - nv + eps, norm_p);
      const acc_t u_pn = kSwap ? r_pn * norm_grad_elem<kKind, acc_t>(pv - nv + eps, norm_p) : acc_t(0);
      ga[idx] = static_cast<scalar_t>(u_ap - u_an);
      gp[idx] = static_cast<scalar_t>(-u_ap - u_pn);
      gn[idx] = static_cast<scalar_t>(u_an + u_pn);
    }
  }
}

struct TripletMarginKernels {
  static void triplet_forward(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const TripletArgs& args,
                              at::Tensor& loss, at::Tensor& dists) {
    const int64_t N = a.size(0), D = a.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(a.scalar_type(), "metricops_triplet_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t eps = args.kind == NormKind::SquaredL2 ? acc_t(0) : static_cast<acc_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          triplet_forward_kernel<scalar_t, acc_t, kKind, kSwap><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
              a.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), n.const_data_ptr<scalar_t>(), N, D,
              static_cast<acc_t>(args.margin), static_cast<acc_t>(args.p), eps, loss.mutable_data_ptr<scalar_t>(),
              dists.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  static void triplet_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n,
                               const at::Tensor& dists, const TripletArgs& args, at::Tensor& ga, at::Tensor& gp,
                               at::Tensor& gn) {
    const int64_t N = a.size(0), D = a.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(a.scalar_type(), "metricops_triplet_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t eps = args.kind == NormKind::SquaredL2 ? acc_t(0) : static_cast<acc_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          triplet_backward_kernel<scalar_t, acc_t, kKind, kSwap><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
              grad.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
              n.const_data_ptr<scalar_t>(), dists.const_data_ptr<acc_t>(), N, D, static_cast<acc_t>(args.margin),
              static_cast<acc_t>(args.p), eps, ga.mutable_data_ptr<scalar_t>(), gp.mutable_data_ptr<scalar_t>(),
              gn.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> triplet_margin_loss_cuda(const at::Tensor& a, const at::Tensor& p,
                                                            const at::Tensor& n, double margin, double norm_p,
                                                            double eps, bool swap, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(a.device());
  return triplet_margin_loss_impl<TripletMarginKernels>(a, p, n, margin, norm_p, eps, swap, squared);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const at::Tensor& dists,
    double margin, double norm_p, double eps, bool swap, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(a.device());
  return triplet_margin_loss_backward_impl<TripletMarginKernels>(grad, a, p, n, dists, margin, norm_p, eps, swap,
                                                                 squared);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("triplet_margin_loss", &triplet_margin_loss_cuda);
  m.impl("triplet_margin_loss_backward", &triplet_margin_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
