// CUDA kernels for pairwise_distance. The Gram term goes through cuBLAS
// (float32 accumulation for float16/bfloat16); these kernels are the fused
// epilogues, on the current stream, with the math of common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/pairwise_distance_impl.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"
#include "cuda/reductions.cuh"

namespace metricops {
namespace cuda {
namespace {

// One warp per row: squared norm accumulated in opmath, then row_aux.
template <typename scalar_t, typename acc_t>
__global__ void row_aux_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim, Metric metric,
                               acc_t* __restrict__ aux) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(row, rows) {
    const scalar_t* xr = x + row * dim;
    acc_t s = 0;
    for (int64_t k = lane; k < dim; k += kWarp) {
      const acc_t v = static_cast<acc_t>(xr[k]);
      s += v * v;
    }
    s = warp_sum(s);
    if (lane == 0) aux[row] = checked_row_aux<acc_t>(metric, s, xr, dim);
  }
}

// Row i of the block is row i + diag_offset of the full matrix; with `self`,
// its entry at column i + diag_offset is a point's distance to itself. x, y:
// the contiguous inputs, for the exactness guard (common/distance.h). With
// `upper_only`, entries below the diagonal are skipped (mirrored after).
template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void distance_epilogue_kernel(const acc_t* dot, const acc_t* __restrict__ x_aux,
                                         const acc_t* __restrict__ y_aux, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y, int64_t dim, acc_t tol, int64_t M, int64_t N,
                                         bool self, bool upper_only, int64_t diag_offset,
                                         scalar_t* out) {  // out may alias dot
  METRICOPS_CUDA_KERNEL_LOOP(idx, M * N) {
    const int64_t i = idx / N, j = idx - i * N;
    if (upper_only && j < i) continue;
    const acc_t key = guarded_distance_key<acc_t, scalar_t>(kMetric, x_aux[i], y_aux[j], dot[idx], x + i * dim,
                                                            acc_t(1), y + j * dim, acc_t(1), dim, tol);
    acc_t d = key_to_distance<acc_t>(kMetric, key);
    if (self && j == i + diag_offset && kMetric != Metric::Cosine && d == d) d = acc_t(0);
    out[idx] = static_cast<scalar_t>(d);
  }
}

// out[i][j] = out[j][i] below the diagonal: pairwise_distance(x) is exactly symmetric.
template <typename scalar_t>
__global__ void mirror_upper_kernel(int64_t N, scalar_t* out) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, N * N) {
    const int64_t i = idx / N, j = idx - i * N;
    if (j < i) out[idx] = out[j * N + i];
  }
}

template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void grad_weights_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                    const acc_t* __restrict__ x_aux, const acc_t* __restrict__ y_aux, int64_t M,
                                    int64_t N, scalar_t* __restrict__ cross, acc_t* __restrict__ norm_term) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, M * N) {
    const int64_t i = idx / N, j = idx - i * N;
    acc_t w, p;
    distance_grad_weights<acc_t>(kMetric, static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]), x_aux[i],
                                 y_aux[j], w, p);
    cross[idx] = static_cast<scalar_t>(w);
    if (norm_term) norm_term[idx] = p;
  }
}

// y is x: cross_ij = w_ij + w_ji. 32x32 tiles staged through shared memory so
// that the transposed reads stay coalesced (for_each_tile_entry_with_mirror).
template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void grad_weights_self_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                         const acc_t* __restrict__ aux, int64_t N, scalar_t* __restrict__ cross,
                                         acc_t* __restrict__ norm_term) {
  for_each_tile_entry_with_mirror<acc_t>(grad, dist, N, [&](int64_t i, int64_t j, int64_t idx, acc_t g_ji, acc_t d_ji) {
    acc_t w_ij, p_ij, w_ji, p_ji;
    distance_grad_weights<acc_t>(kMetric, static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]), aux[i], aux[j],
                                 w_ij, p_ij);
    distance_grad_weights<acc_t>(kMetric, g_ji, d_ji, aux[j], aux[i], w_ji, p_ji);
    cross[idx] = static_cast<scalar_t>(w_ij + w_ji);
    if (norm_term) norm_term[idx] = p_ij;
  });
}

// The norm term p_ij of distance_grad_weights, for the chunked row and column
// sums of cuda/reductions.cuh (METRICOPS_CUDA_COLUMN_SUMS=chunked: no M×N
// buffer of them).
template <typename scalar_t, typename acc_t, Metric kMetric>
struct PairwiseNormTerm {
  const scalar_t* grad;
  const scalar_t* dist;
  const acc_t* x_aux;
  const acc_t* y_aux;
  int64_t N;
  __device__ acc_t operator()(int64_t i, int64_t j) const {
    const int64_t idx = i * N + j;
    acc_t w, p;
    distance_grad_weights<acc_t>(kMetric, static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]), x_aux[i],
                                 y_aux[j], w, p);
    return p;
  }
};

struct PairwiseKernels {
  static at::Tensor row_aux(const at::Tensor& x_in, Metric metric) {
    const at::Tensor x = x_in.contiguous();
    const int64_t rows = x.size(0), dim = x.size(1);
    at::Tensor aux = at::empty({rows}, x.options().dtype(acc_dtype(x)));
    if (rows == 0) return aux;
    METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_row_aux_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      row_aux_kernel<scalar_t, acc_t><<<warp_rows_grid(rows), kThreads, 0, current_stream()>>>(
          x.const_data_ptr<scalar_t>(), rows, dim, metric, aux.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return aux;
  }

  // x, y: the contiguous inputs (x_rows: the rows of x this block holds).
  // A full self matrix (self, no diag_offset, square) is computed on its
  // upper triangle and mirrored, so it is exactly symmetric.
  static void distance_epilogue(const at::Tensor& dot, const at::Tensor& x_rows, const at::Tensor& y,
                                const at::Tensor& x_aux, const at::Tensor& y_aux, Metric metric, bool self,
                                at::Tensor& out, int64_t diag_offset = 0) {
    const int64_t M = out.size(0), N = out.size(1);
    const bool symmetric = self && diag_offset == 0 && M == N;
    TORCH_INTERNAL_ASSERT(x_rows.is_contiguous() && y.is_contiguous());
    METRICOPS_DISPATCH_CUDA_FLOATS(out.scalar_type(), "metricops_distance_epilogue_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t dim = y.size(1);
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        distance_epilogue_kernel<scalar_t, acc_t, kMetric><<<grid_for(M * N), kThreads, 0, current_stream()>>>(
            dot.const_data_ptr<acc_t>(), x_aux.const_data_ptr<acc_t>(), y_aux.const_data_ptr<acc_t>(),
            x_rows.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dim, gram_tolerance<acc_t>(dim), M, N,
            self, symmetric, diag_offset, out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (symmetric) {
          mirror_upper_kernel<scalar_t>
              <<<grid_for(M * N), kThreads, 0, current_stream()>>>(N, out.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }

  static GradCoefficients grad_coefficients(const at::Tensor& grad_in, const at::Tensor& dist_in,
                                            const at::Tensor& x_aux, const at::Tensor& y_aux, Metric metric,
                                            bool self) {
    const at::Tensor grad = grad_in.contiguous();
    const at::Tensor dist = dist_in.contiguous();
    const int64_t M = grad.size(0), N = grad.size(1);
    GradCoefficients c;
    c.cross = at::empty({M, N}, grad.options());
    const auto acc_options = grad.options().dtype(acc_dtype(grad));
    // The norm terms: "serial" writes them to an M×N buffer that ATen reduces
    // (deterministic, no atomics); "chunked" sums them on the fly.
    const bool chunked = chunked_column_sums();
    at::Tensor norm_term = chunked ? at::Tensor() : at::empty({M, N}, acc_options);
    at::Tensor row_sum, col_sum;
    METRICOPS_DISPATCH_CUDA_FLOATS(grad.scalar_type(), "metricops_distance_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        if (self) {
          const dim3 block(kTile, kTileRows);
          const dim3 grid(static_cast<unsigned int>(ceil_div(N, kTile)), static_cast<unsigned int>(ceil_div(M, kTile)));
          grad_weights_self_kernel<scalar_t, acc_t, kMetric><<<grid, block, 0, current_stream()>>>(
              grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), x_aux.const_data_ptr<acc_t>(), N,
              c.cross.mutable_data_ptr<scalar_t>(), chunked ? nullptr : norm_term.mutable_data_ptr<acc_t>());
        } else {
          grad_weights_kernel<scalar_t, acc_t, kMetric><<<grid_for(M * N), kThreads, 0, current_stream()>>>(
              grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), x_aux.const_data_ptr<acc_t>(),
              y_aux.const_data_ptr<acc_t>(), M, N, c.cross.mutable_data_ptr<scalar_t>(),
              chunked ? nullptr : norm_term.mutable_data_ptr<acc_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (chunked) {
          const PairwiseNormTerm<scalar_t, acc_t, kMetric> term{
              grad.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(), x_aux.const_data_ptr<acc_t>(),
              y_aux.const_data_ptr<acc_t>(), N};
          row_sum = row_sums<acc_t>(M, N, term, acc_options);
          col_sum = column_sums<acc_t>(M, N, term, acc_options);
        }
      });
    });
    if (!chunked) {
      row_sum = norm_term.sum(1);
      col_sum = norm_term.sum(0);
    }
    c.row_coef = row_sum;
    if (self) {
      c.row_coef.add_(col_sum);
    } else {
      c.col_coef = col_sum;
    }
    if (metric == Metric::Cosine) {
      c.row_coef.mul_(x_aux.square());
      if (!self) c.col_coef.mul_(y_aux.square());
    }
    return c;
  }
};

}  // namespace

at::Tensor self_distance_acc_cuda(const at::Tensor& x, Metric metric) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor dist = gram_acc(xc, xc);
  if (dist.numel() == 0) return dist;
  const at::Tensor aux = PairwiseKernels::row_aux(xc, metric);
  PairwiseKernels::distance_epilogue(dist, xc, xc, aux, aux, metric, /*self=*/true, dist);
  return dist;
}

void self_distance_rows_acc_cuda(const at::Tensor& x, const at::Tensor& aux, int64_t row_begin, Metric metric,
                                 at::Tensor& out) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  const int64_t rows = out.size(0);
  if (rows == 0 || x.size(0) == 0) return;
  const at::Tensor block = x.narrow(0, row_begin, rows);
  if (is_low_precision(x)) {
    at::mm_out(out, block, x.t(), at::kFloat);
  } else {
    at::mm_out(out, block, x.t());
  }
  const at::Tensor xc = x.contiguous();
  PairwiseKernels::distance_epilogue(out, xc.narrow(0, row_begin, rows), xc, aux.narrow(0, row_begin, rows), aux,
                                     metric, /*self=*/true, out, row_begin);
}

at::Tensor row_aux_acc_cuda(const at::Tensor& x, Metric metric) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return PairwiseKernels::row_aux(x, metric);
}

namespace {

at::Tensor pairwise_distance_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y, c10::string_view metric) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return pairwise_distance_impl<PairwiseKernels>(x, y, metric);
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& y,
                                                                   const at::Tensor& dist, c10::string_view metric) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return pairwise_distance_backward_impl<PairwiseKernels>(grad, x, y, dist, metric);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("pairwise_distance", &pairwise_distance_cuda);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
