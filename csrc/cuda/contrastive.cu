// CUDA kernels for contrastive_loss (common/contrastive_impl.h), on the
// current stream, with the per-element math of common/hinge.h and
// common/distance.h (the same arithmetic the CPU tests exercise). Reductions
// are deterministic: block/warp trees, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/contrastive_impl.h"
#include "common/dispatch.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"
#include "cuda/reductions.cuh"

namespace metricops {
namespace cuda {
namespace {

// One block per row: W_ij for a unit upstream gradient (2 w_ij: the pair
// relation is symmetric; in acc_t: it passes float16's range for near pairs
// and small rows), and the row's sums of terms, nonzero terms and norm terms.
// `dot` may alias `W` (each entry is read, then written, by one thread).
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_reduce_forward_kernel(const acc_t* dot, const acc_t* __restrict__ aux,
                                                  const scalar_t* __restrict__ x, int64_t dim, acc_t tol,
                                                  const int64_t* __restrict__ labels, int64_t B, acc_t pos_margin,
                                                  acc_t neg_margin, acc_t* W, acc_t* __restrict__ row_loss,
                                                  acc_t* __restrict__ row_nnz, acc_t* __restrict__ row_coef) {
  __shared__ acc_t shared[kWarp];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const acc_t aux_i = aux[i];
    const int64_t label_i = labels[i];
    acc_t ls = 0, nz = 0, ps = 0;
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
      const int64_t idx = i * B + j;
      if (j == i) {  // not a pair
        W[idx] = acc_t(0);
        continue;
      }
      const acc_t d = key_to_distance<acc_t>(
          kMetric, guarded_distance_key<acc_t, scalar_t>(kMetric, aux_i, aux[j], dot[idx], x + i * dim, acc_t(1),
                                                         x + j * dim, acc_t(1), dim, tol));
      acc_t t, s, cw, p;
      contrastive_term<acc_t>(d, labels[j] == label_i, pos_margin, neg_margin, kSquared, t, s);
      distance_grad_weights<acc_t>(kMetric, s, d, aux_i, aux[j], cw, p);
      W[idx] = acc_t(2) * cw;
      ls += t;
      nz += t > acc_t(0) ? acc_t(1) : acc_t(0);
      ps += p;
    }
    ls = block_sum(ls, shared);
    nz = block_sum(nz, shared);
    ps = block_sum(ps, shared);
    if (threadIdx.x == 0) {
      row_loss[i] = ls;
      row_nnz[i] = nz;
      row_coef[i] = acc_t(2) * ps * norm_term_scale<acc_t>(kMetric, aux_i);
    }
  }
}

template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_none_forward_kernel(const acc_t* dot, const acc_t* __restrict__ aux,
                                                const scalar_t* __restrict__ x, int64_t dim, acc_t tol,
                                                const int64_t* __restrict__ labels, int64_t B, acc_t pos_margin,
                                                acc_t neg_margin, scalar_t* __restrict__ loss,
                                                scalar_t* dist) {  // dist may alias dot
  METRICOPS_CUDA_KERNEL_LOOP(idx, B * B) {
    const int64_t i = idx / B, j = idx - i * B;
    acc_t d = key_to_distance<acc_t>(
        kMetric, guarded_distance_key<acc_t, scalar_t>(kMetric, aux[i], aux[j], dot[idx], x + i * dim, acc_t(1),
                                                       x + j * dim, acc_t(1), dim, tol));
    acc_t t, s;
    contrastive_term<acc_t>(d, labels[j] == labels[i], pos_margin, neg_margin, kSquared, t, s);
    if (i == j) t = d = acc_t(0);
    loss[idx] = static_cast<scalar_t>(t);
    dist[idx] = static_cast<scalar_t>(d);
  }
}

// Gradient weight and norm term of the ordered pair (a, b) for upstream g.
template <typename acc_t, Metric kMetric, bool kSquared>
__device__ __forceinline__ void pair_weights(acc_t g, acc_t d, bool same, acc_t aux_a, acc_t aux_b, acc_t pos_margin,
                                             acc_t neg_margin, acc_t& w, acc_t& p) {
  acc_t t, s;
  contrastive_term<acc_t>(d, same, pos_margin, neg_margin, kSquared, t, s);
  distance_grad_weights<acc_t>(kMetric, g * s, d, aux_a, aux_b, w, p);
}

// W_ij = w_ij + w_ji over 32x32 tiles; the mirrored tile is staged through
// shared memory so that the transposed reads stay coalesced.
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_none_weights_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                                const acc_t* __restrict__ aux, const int64_t* __restrict__ labels,
                                                int64_t N, acc_t pos_margin, acc_t neg_margin,
                                                scalar_t* __restrict__ W) {
  for_each_tile_entry_with_mirror<acc_t>(grad, dist, N, [&](int64_t i, int64_t j, int64_t idx, acc_t g_ji, acc_t d_ji) {
    if (i == j) {
      W[idx] = scalar_t(0);
      return;
    }
    const bool same = labels[i] == labels[j];
    acc_t w_ij, p_ij, w_ji, p_ji;
    pair_weights<acc_t, kMetric, kSquared>(static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]), same, aux[i],
                                           aux[j], pos_margin, neg_margin, w_ij, p_ij);
    pair_weights<acc_t, kMetric, kSquared>(g_ji, d_ji, same, aux[j], aux[i], pos_margin, neg_margin, w_ji, p_ji);
    W[idx] = static_cast<scalar_t>(w_ij + w_ji);
  });
}

// Row sums of the norm terms P_ij (one block per row, coalesced).
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_none_row_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                                 const acc_t* __restrict__ aux, const int64_t* __restrict__ labels,
                                                 int64_t N, acc_t pos_margin, acc_t neg_margin,
                                                 acc_t* __restrict__ out) {
  __shared__ acc_t shared[kWarp];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    acc_t ps = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      if (j == i) continue;
      const int64_t idx = i * N + j;
      acc_t w, p;
      pair_weights<acc_t, kMetric, kSquared>(static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]),
                                             labels[i] == labels[j], aux[i], aux[j], pos_margin, neg_margin, w, p);
      ps += p;
    }
    ps = block_sum(ps, shared);
    if (threadIdx.x == 0) out[i] = ps;
  }
}

// Column sums of P (one thread per column: consecutive threads read
// consecutive columns of a row, so the loads stay coalesced). The "serial"
// path of METRICOPS_CUDA_COLUMN_SUMS; "chunked" runs cuda/reductions.cuh.
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_none_col_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                                 const acc_t* __restrict__ aux, const int64_t* __restrict__ labels,
                                                 int64_t N, acc_t pos_margin, acc_t neg_margin,
                                                 acc_t* __restrict__ out) {
  METRICOPS_CUDA_KERNEL_LOOP(j, N) {
    acc_t ps = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (i == j) continue;
      const int64_t idx = i * N + j;
      acc_t w, p;
      pair_weights<acc_t, kMetric, kSquared>(static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]),
                                             labels[i] == labels[j], aux[i], aux[j], pos_margin, neg_margin, w, p);
      ps += p;
    }
    out[j] = ps;
  }
}

// P_ij of the "none" backward (0 on the diagonal), for the chunked row and
// column sums of cuda/reductions.cuh.
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
struct ContrastiveNormTerm {
  const scalar_t* grad;
  const scalar_t* dist;
  const acc_t* aux;
  const int64_t* labels;
  int64_t N;
  acc_t pos_margin, neg_margin;
  __device__ acc_t operator()(int64_t i, int64_t j) const {
    if (i == j) return acc_t(0);
    const int64_t idx = i * N + j;
    acc_t w, p;
    pair_weights<acc_t, kMetric, kSquared>(static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]),
                                           labels[i] == labels[j], aux[i], aux[j], pos_margin, neg_margin, w, p);
    return p;
  }
};

struct ContrastiveKernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) { return row_aux_acc_cuda(x, metric); }

  static void contrastive_reduce_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                         const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& W,
                                         at::Tensor& row_loss, at::Tensor& row_nnz, at::Tensor& row_coef) {
    const int64_t B = dot.size(0), dim = x.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_contrastive_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          contrastive_reduce_forward_kernel<scalar_t, acc_t, kMetric, kSquared>
              <<<block_rows_grid(B), kThreads, 0, current_stream()>>>(
                  dot.const_data_ptr<acc_t>(), aux.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), dim,
                  gram_tolerance<acc_t>(dim), labels.const_data_ptr<int64_t>(), B, static_cast<acc_t>(args.pos_margin),
                  static_cast<acc_t>(args.neg_margin), W.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>(),
                  row_nnz.mutable_data_ptr<acc_t>(), row_coef.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  static void contrastive_none_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                       const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& loss,
                                       at::Tensor& dist) {
    const int64_t B = dot.size(0), dim = x.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(loss.scalar_type(), "metricops_contrastive_none_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          contrastive_none_forward_kernel<scalar_t, acc_t, kMetric, kSquared>
              <<<grid_for(B * B), kThreads, 0, current_stream()>>>(
                  dot.const_data_ptr<acc_t>(), aux.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), dim,
                  gram_tolerance<acc_t>(dim), labels.const_data_ptr<int64_t>(), B, static_cast<acc_t>(args.pos_margin),
                  static_cast<acc_t>(args.neg_margin), loss.mutable_data_ptr<scalar_t>(),
                  dist.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  static void contrastive_none_backward(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& aux,
                                        const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& W,
                                        at::Tensor& row_coef) {
    const int64_t N = grad.size(0);
    at::Tensor row_sums = at::empty({N}, row_coef.options());
    at::Tensor col_sums = at::empty({N}, row_coef.options());
    METRICOPS_DISPATCH_CUDA_FLOATS(grad.scalar_type(), "metricops_contrastive_none_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t pm = static_cast<acc_t>(args.pos_margin), nm = static_cast<acc_t>(args.neg_margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          const dim3 block(kTile, kTileRows);
          const dim3 grid(static_cast<unsigned int>(ceil_div(N, kTile)), static_cast<unsigned int>(ceil_div(N, kTile)));
          contrastive_none_weights_kernel<scalar_t, acc_t, kMetric, kSquared><<<grid, block, 0, current_stream()>>>(
              grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), aux.const_data_ptr<acc_t>(),
              labels.const_data_ptr<int64_t>(), N, pm, nm, W.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (chunked_column_sums()) {
            const ContrastiveNormTerm<scalar_t, acc_t, kMetric, kSquared> term{grad.const_data_ptr<scalar_t>(),
                                                                               dist.const_data_ptr<scalar_t>(),
                                                                               aux.const_data_ptr<acc_t>(),
                                                                               labels.const_data_ptr<int64_t>(),
                                                                               N,
                                                                               pm,
                                                                               nm};
            row_sums = ::metricops::cuda::row_sums<acc_t>(N, N, term, row_coef.options());
            col_sums = ::metricops::cuda::column_sums<acc_t>(N, N, term, row_coef.options());
            return;
          }
          contrastive_none_row_sums_kernel<scalar_t, acc_t, kMetric, kSquared>
              <<<block_rows_grid(N), kThreads, 0, current_stream()>>>(
                  grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), aux.const_data_ptr<acc_t>(),
                  labels.const_data_ptr<int64_t>(), N, pm, nm, row_sums.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          contrastive_none_col_sums_kernel<scalar_t, acc_t, kMetric, kSquared>
              <<<grid_for(N), kThreads, 0, current_stream()>>>(
                  grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), aux.const_data_ptr<acc_t>(),
                  labels.const_data_ptr<int64_t>(), N, pm, nm, col_sums.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    // row_coef_i = scale_i * sum_j (p_ij + p_ji).
    row_coef.copy_(row_sums.add_(col_sums));
    if (args.metric == Metric::Cosine) row_coef.mul_(aux.square());
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_cuda(const at::Tensor& x,
                                                                                 const at::Tensor& labels,
                                                                                 double pos_margin, double neg_margin,
                                                                                 c10::string_view metric, bool squared,
                                                                                 c10::string_view reduction) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return contrastive_loss_impl<ContrastiveKernels>(x, labels, pos_margin, neg_margin, metric, squared, reduction);
}

at::Tensor contrastive_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& labels,
                                          const at::Tensor& mat, const at::Tensor& row_coef, const at::Tensor& denom,
                                          double pos_margin, double neg_margin, c10::string_view metric, bool squared,
                                          c10::string_view reduction) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return contrastive_loss_backward_impl<ContrastiveKernels>(grad, x, labels, mat, row_coef, denom, pos_margin,
                                                            neg_margin, metric, squared, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
