// CUDA kernels for contrastive_loss, pair_contrastive_loss and
// triplet_margin_loss, on the current stream, with the per-element math of
// common/hinge.h and common/distance.h (the same arithmetic the CPU tests
// exercise). Reductions are deterministic: block/warp trees, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/contrastive_impl.h"
#include "common/dispatch.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

constexpr int kWarp = 32;

// Sum over a warp; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result
// is valid in thread 0. `shared` holds 32 entries and may be reused at once.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  v = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Rows handled one warp each: blocks of kThreads / 32 warps.
inline unsigned int warp_rows_grid(int64_t rows) {
  const int64_t warps_per_block = kThreads / kWarp;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, warps_per_block), 65535)));
}

inline unsigned int block_rows_grid(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535)));
}

#define METRICOPS_WARP_ROW_LOOP(row, rows)                                                                 \
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; row < (rows); \
       row += static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp))

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

// ------------------------------------------------------------------ contrastive_loss

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

constexpr int kTile = 32;
constexpr int kTileRows = 8;

// W_ij = w_ij + w_ji over 32x32 tiles; the mirrored tile is staged through
// shared memory so that the transposed reads stay coalesced.
template <typename scalar_t, typename acc_t, Metric kMetric, bool kSquared>
__global__ void contrastive_none_weights_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                                const acc_t* __restrict__ aux, const int64_t* __restrict__ labels,
                                                int64_t N, acc_t pos_margin, acc_t neg_margin,
                                                scalar_t* __restrict__ W) {
  __shared__ acc_t g_t[kTile][kTile + 1];
  __shared__ acc_t d_t[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t row = j0 + r, col = i0 + threadIdx.x;
    if (row < N && col < N) {
      g_t[threadIdx.x][r] = static_cast<acc_t>(grad[row * N + col]);
      d_t[threadIdx.x][r] = static_cast<acc_t>(dist[row * N + col]);
    }
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t i = i0 + r, j = j0 + threadIdx.x;
    if (i < N && j < N) {
      const int64_t idx = i * N + j;
      if (i == j) {
        W[idx] = scalar_t(0);
        continue;
      }
      const bool same = labels[i] == labels[j];
      acc_t w_ij, p_ij, w_ji, p_ji;
      pair_weights<acc_t, kMetric, kSquared>(static_cast<acc_t>(grad[idx]), static_cast<acc_t>(dist[idx]), same,
                                             aux[i], aux[j], pos_margin, neg_margin, w_ij, p_ij);
      pair_weights<acc_t, kMetric, kSquared>(g_t[r][threadIdx.x], d_t[r][threadIdx.x], same, aux[j], aux[i],
                                             pos_margin, neg_margin, w_ji, p_ji);
      W[idx] = static_cast<scalar_t>(w_ij + w_ji);
    }
  }
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
// consecutive columns of a row, so the loads stay coalesced).
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

// ------------------------------------------------------------------ pair_contrastive_loss

template <typename scalar_t, typename acc_t, Metric kMetric>
__device__ __forceinline__ acc_t warp_pair_distance(const scalar_t* x0, const scalar_t* x1, int64_t dim, int lane,
                                                    acc_t& aux0, acc_t& aux1) {
  acc_t a = 0, b = 0, c = 0;
  for (int64_t k = lane; k < dim; k += kWarp) {
    const acc_t u = static_cast<acc_t>(x0[k]), v = static_cast<acc_t>(x1[k]);
    if (kMetric == Metric::Cosine) {
      a += u * v;
      b += u * u;
      c += v * v;
    } else {
      a += (u - v) * (u - v);
    }
  }
  a = warp_sum(a);
  if (kMetric == Metric::Cosine) {
    b = warp_sum(b);
    c = warp_sum(c);
    aux0 = checked_row_aux<acc_t>(kMetric, b, x0, dim);
    aux1 = checked_row_aux<acc_t>(kMetric, c, x1, dim);
    return guarded_distance_key<acc_t, scalar_t>(kMetric, aux0, aux1, a, x0, acc_t(1), x1, acc_t(1), dim,
                                                 gram_tolerance<acc_t>(dim));
  }
  aux0 = aux1 = acc_t(0);
  return kMetric == Metric::Euclidean ? ::sqrt(a) : a;
}

template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void pair_forward_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1,
                                    const bool* __restrict__ y, int64_t N, int64_t D, acc_t margin, bool squared,
                                    scalar_t* __restrict__ loss, acc_t* __restrict__ dist) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    acc_t aux0, aux1, t, s;
    const acc_t d = warp_pair_distance<scalar_t, acc_t, kMetric>(x0 + i * D, x1 + i * D, D, lane, aux0, aux1);
    if (lane == 0) {
      pair_contrastive_term<acc_t>(d, y[i], margin, squared, t, s);
      loss[i] = static_cast<scalar_t>(t);
      dist[i] = d;
    }
  }
}

template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void pair_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x0,
                                     const scalar_t* __restrict__ x1, const bool* __restrict__ y,
                                     const acc_t* __restrict__ dist, int64_t N, int64_t D, acc_t margin,
                                     bool squared, scalar_t* __restrict__ g0, scalar_t* __restrict__ g1) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    const scalar_t* r0 = x0 + i * D;
    const scalar_t* r1 = x1 + i * D;
    acc_t aux0 = 0, aux1 = 0;
    if (kMetric == Metric::Cosine) {
      acc_t b = 0, c = 0;
      for (int64_t k = lane; k < D; k += kWarp) {
        const acc_t u = static_cast<acc_t>(r0[k]), v = static_cast<acc_t>(r1[k]);
        b += u * u;
        c += v * v;
      }
      aux0 = checked_row_aux<acc_t>(kMetric, warp_sum(b), r0, D);
      aux1 = checked_row_aux<acc_t>(kMetric, warp_sum(c), r1, D);
    }
    acc_t t, s, w, pn;
    pair_contrastive_term<acc_t>(dist[i], y[i], margin, squared, t, s);
    distance_grad_weights<acc_t>(kMetric, static_cast<acc_t>(grad[i]) * s, dist[i], aux0, aux1, w, pn);
    const acc_t c0 = pn * norm_term_scale<acc_t>(kMetric, aux0), c1 = pn * norm_term_scale<acc_t>(kMetric, aux1);
    for (int64_t k = lane; k < D; k += kWarp) {
      const acc_t u = static_cast<acc_t>(r0[k]), v = static_cast<acc_t>(r1[k]);
      g0[i * D + k] = static_cast<scalar_t>(c0 * u - w * v);
      g1[i * D + k] = static_cast<scalar_t>(c1 * v - w * u);
    }
  }
}

// ------------------------------------------------------------------ triplet_margin_loss

template <typename scalar_t, typename acc_t, NormKind kKind, bool kSwap>
__global__ void triplet_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                       const scalar_t* __restrict__ n, int64_t N, int64_t D, acc_t margin,
                                       acc_t norm_p, acc_t eps, scalar_t* __restrict__ loss,
                                       acc_t* __restrict__ dists) {
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
      triplet_hinge<acc_t>(margin + d_ap - d_neg, v, slope);
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
                                        acc_t norm_p, acc_t eps, scalar_t* __restrict__ ga,
                                        scalar_t* __restrict__ gp, scalar_t* __restrict__ gn) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    const acc_t d_ap = dists[3 * i], d_an = dists[3 * i + 1], d_pn = dists[3 * i + 2];
    acc_t c_an = 1, c_pn = 0;
    if (kSwap) min_shares<acc_t>(d_an, d_pn, c_an, c_pn);
    const acc_t d_neg = kSwap ? nan_min<acc_t>(d_an, d_pn) : d_an;
    acc_t v, slope;
    triplet_hinge<acc_t>(margin + d_ap - d_neg, v, slope);
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

#define METRICOPS_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

struct Kernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) {
    const int64_t rows = x.size(0), dim = x.size(1);
    at::Tensor aux = at::empty({rows}, x.options().dtype(acc_dtype(x)));
    if (rows == 0) return aux;
    METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_contrastive_row_aux_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      row_aux_kernel<scalar_t, acc_t><<<warp_rows_grid(rows), kThreads, 0, current_stream()>>>(
          x.const_data_ptr<scalar_t>(), rows, dim, metric, aux.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return aux;
  }

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
                  gram_tolerance<acc_t>(dim), labels.const_data_ptr<int64_t>(), B,
                  static_cast<acc_t>(args.pos_margin), static_cast<acc_t>(args.neg_margin),
                  W.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>(),
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
                  gram_tolerance<acc_t>(dim), labels.const_data_ptr<int64_t>(), B,
                  static_cast<acc_t>(args.pos_margin), static_cast<acc_t>(args.neg_margin),
                  loss.mutable_data_ptr<scalar_t>(), dist.mutable_data_ptr<scalar_t>());
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

  static void pair_forward(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y, const PairArgs& args,
                           at::Tensor& loss, at::Tensor& dist) {
    const int64_t N = x0.size(0), D = x0.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(x0.scalar_type(), "metricops_pair_contrastive_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        pair_forward_kernel<scalar_t, acc_t, kMetric><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
            x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(), y.const_data_ptr<bool>(), N, D,
            static_cast<acc_t>(args.margin), args.squared, loss.mutable_data_ptr<scalar_t>(),
            dist.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void pair_backward(const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y,
                            const at::Tensor& dist, const PairArgs& args, at::Tensor& g0, at::Tensor& g1) {
    const int64_t N = x0.size(0), D = x0.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(x0.scalar_type(), "metricops_pair_contrastive_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        pair_backward_kernel<scalar_t, acc_t, kMetric><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
            grad.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(),
            y.const_data_ptr<bool>(), dist.const_data_ptr<acc_t>(), N, D, static_cast<acc_t>(args.margin),
            args.squared, g0.mutable_data_ptr<scalar_t>(), g1.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, double pos_margin, double neg_margin, c10::string_view metric,
    bool squared, c10::string_view reduction) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return contrastive_loss_impl<Kernels>(x, labels, pos_margin, neg_margin, metric, squared, reduction);
}

at::Tensor contrastive_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& labels,
                                          const at::Tensor& mat, const at::Tensor& row_coef, const at::Tensor& denom,
                                          double pos_margin, double neg_margin, c10::string_view metric, bool squared,
                                          c10::string_view reduction) {
  METRICOPS_CUDA_DEVICE_GUARD(x.device());
  return contrastive_loss_backward_impl<Kernels>(grad, x, labels, mat, row_coef, denom, pos_margin, neg_margin,
                                                 metric, squared, reduction);
}

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_cuda(const at::Tensor& x0, const at::Tensor& x1,
                                                              const at::Tensor& y, double margin,
                                                              c10::string_view metric, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(x0.device());
  return pair_contrastive_loss_impl<Kernels>(x0, x1, y, margin, metric, squared);
}

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& x0,
                                                                       const at::Tensor& x1, const at::Tensor& y,
                                                                       const at::Tensor& dist, double margin,
                                                                       c10::string_view metric, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(x0.device());
  return pair_contrastive_loss_backward_impl<Kernels>(grad, x0, x1, y, dist, margin, metric, squared);
}

std::tuple<at::Tensor, at::Tensor> triplet_margin_loss_cuda(const at::Tensor& a, const at::Tensor& p,
                                                            const at::Tensor& n, double margin, double norm_p,
                                                            double eps, bool swap, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(a.device());
  return triplet_margin_loss_impl<Kernels>(a, p, n, margin, norm_p, eps, swap, squared);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const at::Tensor& dists,
    double margin, double norm_p, double eps, bool swap, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(a.device());
  return triplet_margin_loss_backward_impl<Kernels>(grad, a, p, n, dists, margin, norm_p, eps, swap, squared);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
  m.impl("pair_contrastive_loss", &pair_contrastive_loss_cuda);
  m.impl("pair_contrastive_loss_backward", &pair_contrastive_loss_backward_cuda);
  m.impl("triplet_margin_loss", &triplet_margin_loss_cuda);
  m.impl("triplet_margin_loss_backward", &triplet_margin_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
