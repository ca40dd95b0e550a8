// CUDA kernel for knn: per (query block, database chunk) a cuBLAS GEMM
// (float32 accumulation for float16/bfloat16), then one warp per query row
// turns its Gram row into distances (common/distance.h) and merges them into
// the row's running top-k (common/knn.h order). Deliberately simple: the
// top-k is updated by lane 0, one surviving candidate at a time, so it is fast
// for small k and correct (but slow) for large k.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "common/dispatch.h"
#include "common/knn.h"
#include "common/pairwise_distance_impl.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"

namespace metricops {
namespace cuda {
namespace {

// A 2048 x 8192 float32 Gram block: 64 MiB, large enough to keep cuBLAS busy.
constexpr int64_t kQueryBlock = 2048;
constexpr int64_t kDatabaseChunk = 8192;

// Warp-cooperative knn_insert (every lane calls it with the same candidate):
// the same sorted list as lane 0 running common/knn.h's knn_insert, in
// O(k/32) steps instead of O(k) serial shifts. The slot is the number of
// entries ordered before the candidate (dist_index_less is a strict total
// order on distinct indices: the serial scan stops at the same slot), counted
// by ballots; the entries from there move up one slot, the top chunk first,
// every lane reading its entry before any lane of the chunk writes.
template <typename acc_t>
__device__ __forceinline__ void knn_insert_warp(acc_t* td, int64_t* ti, int64_t k, acc_t d, int64_t idx, int lane) {
  if (!dist_index_less(d, idx, td[k - 1], ti[k - 1])) return;  // the same entry for every lane: uniform
  int64_t pos = 0;
  for (int64_t c0 = 0; c0 < k; c0 += kWarp) {
    const int64_t p = c0 + lane;
    pos += __popc(__ballot_sync(0xffffffffu, p < k && dist_index_less(td[p], ti[p], d, idx)));
  }
  for (int64_t c0 = k >= 2 ? ((k - 2) / kWarp) * kWarp : -1; c0 >= 0 && c0 + kWarp > pos; c0 -= kWarp) {
    const int64_t p = c0 + lane;
    const bool moves = p >= pos && p < k - 1;
    acc_t v = acc_t(0);
    int64_t vi = 0;
    if (moves) {
      v = td[p];
      vi = ti[p];
    }
    __syncwarp();
    if (moves) {
      td[p + 1] = v;
      ti[p + 1] = vi;
    }
    __syncwarp();
  }
  if (lane == 0) {
    td[pos] = d;
    ti[pos] = idx;
  }
  __syncwarp();
}

// METRICOPS_CUDA_KNN_INSERT: "lane" (lane 0 inserts, O(k) a candidate; the
// default until a GPU run has compared both: `make gpu-check` does) or
// "warp" (knn_insert_warp).
bool knn_insert_by_warp() { return env_selects_new_path("METRICOPS_CUDA_KNN_INSERT", "lane", "warp"); }

// dot: (rows, cols) contiguous Gram block of queries q0.. against database
// rows n0..; top_d/top_i: (Q, k) running top-k, sorted by dist_index_less.
// Every warp-level branch below depends only on the row or on a ballot, so
// the whole warp takes it together and the *_sync masks are full.
// q, db: the contiguous inputs (dim columns), for the exactness guard of
// common/distance.h.
template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void knn_chunk_kernel(const acc_t* __restrict__ dot, int64_t rows, int64_t cols,
                                 const acc_t* __restrict__ q_aux, const acc_t* __restrict__ db_aux,
                                 const scalar_t* __restrict__ q, const scalar_t* __restrict__ db, int64_t dim,
                                 acc_t tol, int64_t q0, int64_t n0, bool self, int64_t k, bool warp_insert,
                                 acc_t* top_d, int64_t* top_i) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / 32; r < rows;
       r += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t qi = q0 + r;
    acc_t* td = top_d + qi * k;
    int64_t* ti = top_i + qi * k;
    const acc_t xa = q_aux[qi];
    const acc_t* dot_row = dot + r * cols;
    acc_t kth_d = td[k - 1];
    int64_t kth_i = ti[k - 1];
    for (int64_t j0 = 0; j0 < cols; j0 += 32) {
      const int64_t j = j0 + lane;
      const int64_t col = n0 + j;
      acc_t d = acc_t(0);
      bool pass = false;
      if (j < cols) {
        d = key_to_distance<acc_t>(
            kMetric, guarded_distance_key<acc_t, scalar_t>(kMetric, xa, db_aux[col], dot_row[j], q + qi * dim, acc_t(1),
                                                           db + col * dim, acc_t(1), dim, tol));
        pass = !(self && col == qi) && dist_index_less<acc_t>(d, col, kth_d, kth_i);
      }
      unsigned int mask = __ballot_sync(0xffffffffu, pass);
      while (mask != 0u) {  // survivors in increasing column order
        const int src = __ffs(mask) - 1;
        mask &= mask - 1u;
        const acc_t cd = __shfl_sync(0xffffffffu, d, src);
        if (warp_insert) {  // uniform: a kernel argument
          knn_insert_warp<acc_t>(td, ti, k, cd, n0 + j0 + src, lane);
        } else if (lane == 0) {
          knn_insert<acc_t>(td, ti, k, cd, n0 + j0 + src);  // re-checks against the new k-th
        }
        __syncwarp();  // the inserting lanes' writes are visible to the warp
        kth_d = td[k - 1];
        kth_i = ti[k - 1];
        __syncwarp();  // every lane has read before lane 0 writes again
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const std::optional<at::Tensor>& database,
                                            int64_t k, c10::string_view metric_name, int64_t chunk_size) {
  METRICOPS_CUDA_DEVICE_GUARD(queries.device());
  const KnnInputs in = prepare_knn_inputs(queries, database, k, metric_name, chunk_size);
  const Metric metric = in.metric;
  const bool self = in.self;
  const at::Tensor &q = in.q, &db = in.db;
  const int64_t Q = in.Q, N = in.N;
  const auto acc = acc_dtype(q);
  // Empty slots: (NaN, kKnnEmptyIndex) sorts after any candidate.
  at::Tensor top_d = at::full({Q, k}, std::numeric_limits<double>::quiet_NaN(), q.options().dtype(acc));
  at::Tensor top_i = at::full({Q, k}, kKnnEmptyIndex, q.options().dtype(at::kLong));
  if (Q == 0) return {top_d.to(q.scalar_type()), top_i};
  const int64_t qb_size = chunk_size > 0 ? chunk_size : kQueryBlock;
  const int64_t nb_size = chunk_size > 0 ? chunk_size : kDatabaseChunk;
  const bool warp_insert = knn_insert_by_warp();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "metricops_knn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int warps_per_block = kThreads / 32;
    const at::Tensor q_aux = row_aux_acc_cuda(q, metric);
    const at::Tensor db_aux = self ? q_aux : row_aux_acc_cuda(db, metric);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      for (int64_t q0 = 0; q0 < Q; q0 += qb_size) {
        const int64_t qb = std::min(qb_size, Q - q0);
        for (int64_t n0 = 0; n0 < N; n0 += nb_size) {
          const int64_t nb = std::min(nb_size, N - n0);
          // (qb, nb) contiguous, in acc_t; freed back to the caching allocator each chunk.
          const at::Tensor dot = gram_acc(q.narrow(0, q0, qb), db.narrow(0, n0, nb)).contiguous();
          knn_chunk_kernel<scalar_t, acc_t, kMetric><<<grid_for(qb, warps_per_block), kThreads, 0, current_stream()>>>(
              dot.const_data_ptr<acc_t>(), qb, nb, q_aux.const_data_ptr<acc_t>(), db_aux.const_data_ptr<acc_t>(),
              q.const_data_ptr<scalar_t>(), db.const_data_ptr<scalar_t>(), q.size(1), gram_tolerance<acc_t>(q.size(1)),
              q0, n0, self, k, warp_insert, top_d.mutable_data_ptr<acc_t>(), top_i.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  return {top_d.to(q.scalar_type()), top_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) { m.impl("knn", &knn_cuda); }

}  // namespace cuda
}  // namespace metricops
