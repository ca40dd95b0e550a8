// CPU kernel for knn: distances fused with a running top-k, chunked so that
// memory stays O(Q*k + block) however large Q x N is.
//
// Per (query block, database chunk): one BLAS GEMM into a reusable buffer,
// then per query row a vectorised epilogue (distances in place, with the math
// of common/distance.h) and a cheap rejection against the row's current k-th
// distance; only the few survivors are sorted and merged into the row's
// sorted top-k, which lives in the output tensors themselves.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>

#include "common/dispatch.h"
#include "common/knn.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// Defaults: a 256 x 2048 float32 GEMM block (2 MiB) stays in a core's L2
// between the GEMM writing it and the epilogue reading it back. Few queries
// get wider chunks (same block size): tiny GEMMs are dominated by per-call
// overhead. Large k gets chunks of >= 4k columns so that the O(k) merges stay
// a small share of each chunk's work.
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kDatabaseChunk = 2048;
constexpr int64_t kBlockElems = kQueryBlock * kDatabaseChunk;
// Rejection granularity: one vectorised "any below the k-th?" test per span.
constexpr int64_t kScanSpan = 64;

template <typename scalar_t>
struct Candidate {
  scalar_t d;
  int64_t i;
};

template <typename scalar_t>
inline bool candidate_less(const Candidate<scalar_t>& a, const Candidate<scalar_t>& b) {
  return dist_index_less<scalar_t>(a.d, a.i, b.d, b.i);
}

// Candidates with d < thr (thr = the row's k-th distance, a number). Every
// column here has a larger index than anything already in the top-k, so a tie
// with the k-th loses and strict < is the exact lexicographic test. NaN fails it.
template <typename scalar_t>
METRICOPS_SIMD_CLONES int64_t collect_below(const scalar_t* d, int64_t n, scalar_t thr, int64_t col0, int64_t skip,
                                            Candidate<scalar_t>* out) {
  int64_t c = 0;
  for (int64_t b = 0; b < n; b += kScanSpan) {
    const int64_t e = std::min(n, b + kScanSpan);
    int hits = 0;
    for (int64_t j = b; j < e; ++j) hits += d[j] < thr;  // vectorised rejection
    if (hits == 0) continue;
    for (int64_t j = b; j < e; ++j) {
      if (d[j] < thr && col0 + j != skip) out[c++] = {d[j], col0 + j};
    }
  }
  return c;
}

// Slow path while the row still holds empty slots or its k-th is NaN.
template <typename scalar_t>
int64_t collect_general(const scalar_t* d, int64_t n, scalar_t kth_d, int64_t kth_i, int64_t col0, int64_t skip,
                        Candidate<scalar_t>* out) {
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t col = col0 + j;
    if (col != skip && dist_index_less<scalar_t>(d[j], col, kth_d, kth_i)) out[c++] = {d[j], col};
  }
  return c;
}

// Merges m sorted candidates source(0), ..., source(m - 1) into the sorted
// top-k row (td, ti), keeping the best k (through tmp, k entries).
template <typename scalar_t, typename Source>
void merge_into_top_k(scalar_t* td, int64_t* ti, int64_t k, int64_t m, const Source& source, Candidate<scalar_t>* tmp) {
  int64_t a = 0, b = 0;
  for (int64_t t = 0; t < k; ++t) {
    // a + b == t < k, so td[a] is in bounds; b < m guards source(b).
    if (b < m) {
      const Candidate<scalar_t> c = source(b);
      if (dist_index_less<scalar_t>(c.d, c.i, td[a], ti[a])) {
        tmp[t] = c;
        ++b;
        continue;
      }
    }
    tmp[t] = {td[a], ti[a]};
    ++a;
  }
  for (int64_t t = 0; t < k; ++t) {
    td[t] = tmp[t].d;
    ti[t] = tmp[t].i;
  }
}

// Merges c candidates into the sorted top-k row (td, ti).
template <typename scalar_t>
void merge_candidates(Candidate<scalar_t>* cand, int64_t c, scalar_t* td, int64_t* ti, int64_t k,
                      Candidate<scalar_t>* tmp) {
  if (c <= 4) {  // the common case once the row has settled: a few O(k) insertions
    for (int64_t j = 0; j < c; ++j) knn_insert<scalar_t>(td, ti, k, cand[j].d, cand[j].i);
    return;
  }
  // Only the best min(c, k) candidates can enter: select them in O(c), sort those.
  const int64_t m = std::min(c, k);
  if (c > m) std::nth_element(cand, cand + m, cand + c, candidate_less<scalar_t>);
  std::sort(cand, cand + m, candidate_less<scalar_t>);
  merge_into_top_k<scalar_t>(td, ti, k, m, [cand](int64_t b) { return cand[b]; }, tmp);
}

// Merges another sorted top-k row (sd, si) into (td, ti), keeping the best k.
template <typename scalar_t>
void merge_sorted(scalar_t* td, int64_t* ti, const scalar_t* sd, const int64_t* si, int64_t k,
                  Candidate<scalar_t>* tmp) {
  merge_into_top_k<scalar_t>(td, ti, k, k, [sd, si](int64_t b) { return Candidate<scalar_t>{sd[b], si[b]}; }, tmp);
}

template <typename scalar_t>
struct Workspace {
  std::unique_ptr<Candidate<scalar_t>[]> cand, tmp;
  Workspace(int64_t chunk, int64_t k) : cand(new Candidate<scalar_t>[chunk]), tmp(new Candidate<scalar_t>[k]) {}
};

// Epilogue for rows [r0, r1) of a (rows, nb) Gram block whose first query is
// q0 and first database column n0.
template <typename scalar_t, Metric kMetric>
void process_rows(scalar_t* buf, int64_t nb, int64_t r0, int64_t r1, int64_t q0, int64_t n0, const scalar_t* q_aux,
                  const scalar_t* db_aux, const scalar_t* qp, const scalar_t* dbp, int64_t dim, bool self, int64_t k,
                  scalar_t* out_d, int64_t* out_i, Workspace<scalar_t>& ws) {
  const scalar_t tol = gram_tolerance<scalar_t>(dim);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t qi = q0 + r;
    scalar_t* row = buf + r * nb;
    const ExactRows<scalar_t> rows{qp + qi * dim, scalar_t(1), dbp, nullptr, dim, tol};
    distance_row<scalar_t, kMetric>(row, db_aux + n0, q_aux[qi], nb, row, rows, n0, self ? qi - n0 : -1);
    scalar_t* td = out_d + qi * k;
    int64_t* ti = out_i + qi * k;
    const int64_t skip = self ? qi : -1;
    const scalar_t kth = td[k - 1];
    const int64_t c = std::isnan(kth) ? collect_general<scalar_t>(row, nb, kth, ti[k - 1], n0, skip, ws.cand.get())
                                      : collect_below<scalar_t>(row, nb, kth, n0, skip, ws.cand.get());
    if (c > 0) merge_candidates<scalar_t>(ws.cand.get(), c, td, ti, k, ws.tmp.get());
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const std::optional<at::Tensor>& database,
                                           int64_t k, c10::string_view metric_name, int64_t chunk_size) {
  const KnnInputs in = prepare_knn_inputs(queries, database, k, metric_name, chunk_size);
  const Metric metric = in.metric;
  const bool self = in.self;
  const at::Tensor &q = in.q, &db = in.db;
  const int64_t Q = in.Q, N = in.N;
  // Empty slots: (NaN, kKnnEmptyIndex) sorts after any candidate.
  at::Tensor out_d = at::full({Q, k}, std::numeric_limits<double>::quiet_NaN(), q.options());
  at::Tensor out_i = at::full({Q, k}, kKnnEmptyIndex, q.options().dtype(at::kLong));
  if (Q == 0) return {out_d, out_i};
  int64_t qb_size = std::min(Q, chunk_size > 0 ? chunk_size : kQueryBlock);
  int64_t nb_size = chunk_size > 0 ? chunk_size : std::max({kDatabaseChunk, kBlockElems / qb_size, 4 * k});
  nb_size = std::min(N, nb_size);
  if (chunk_size == 0 && qb_size * nb_size > 4 * kBlockElems) {
    qb_size = std::max<int64_t>(1, 4 * kBlockElems / nb_size);  // very large k: keep the block bounded
  }
  const int64_t num_qb = (Q + qb_size - 1) / qb_size;

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "metricops_knn_cpu", [&] {
    const at::Tensor q_aux_t = row_aux_cpu(q, metric);
    const at::Tensor db_aux_t = self ? q_aux_t : row_aux_cpu(db, metric);
    const scalar_t* q_aux = q_aux_t.const_data_ptr<scalar_t>();
    const scalar_t* db_aux = db_aux_t.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* dbp = db.const_data_ptr<scalar_t>();
    const int64_t dim = q.size(1);
    scalar_t* od = out_d.mutable_data_ptr<scalar_t>();
    int64_t* oi = out_i.mutable_data_ptr<int64_t>();

    // GEMM of one block into `buf` (a contiguous (qb, nb) view of it).
    auto gemm = [&](at::Tensor& buf, int64_t q0, int64_t qb, int64_t n0, int64_t nb) {
      at::Tensor out = buf.narrow(0, 0, qb * nb).view({qb, nb});
      at::mm_out(out, q.narrow(0, q0, qb), db.narrow(0, n0, nb).t());
      return out.mutable_data_ptr<scalar_t>();
    };

    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      if (num_qb >= 2 * at::get_num_threads()) {
        // Enough query blocks: each thread owns whole blocks with its own
        // buffer (single-threaded GEMM + epilogue, no barrier per chunk, the
        // block stays in that core's cache).
        at::parallel_for(0, num_qb, 1, [&](int64_t b0, int64_t b1) {
          at::Tensor buf = at::empty({qb_size * nb_size}, q.options());
          Workspace<scalar_t> ws(nb_size, k);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t q0 = b * qb_size, qb = std::min(qb_size, Q - q0);
            for (int64_t n0 = 0; n0 < N; n0 += nb_size) {
              const int64_t nb = std::min(nb_size, N - n0);
              scalar_t* dot = gemm(buf, q0, qb, n0, nb);
              process_rows<scalar_t, kMetric>(dot, nb, 0, qb, q0, n0, q_aux, db_aux, qp, dbp, dim, self, k, od, oi, ws);
            }
          }
        });
      } else {
        // Few query blocks: split the database instead. Thread slot t owns a
        // contiguous range of chunks and its own top-k (slot 0 writes the
        // output), then the slots are merged. One parallel region, no
        // barrier per chunk: per-chunk barriers collapse when the cores are
        // shared with another process.
        const int64_t num_nb = (N + nb_size - 1) / nb_size;
        const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_nb));
        at::Tensor extra_d, extra_i;
        if (slots > 1) {
          extra_d = at::full({slots - 1, Q, k}, std::numeric_limits<double>::quiet_NaN(), q.options());
          extra_i = at::full({slots - 1, Q, k}, kKnnEmptyIndex, q.options().dtype(at::kLong));
        }
        at::parallel_for(0, slots, 1, [&](int64_t t0, int64_t t1) {
          at::Tensor buf = at::empty({qb_size * nb_size}, q.options());
          Workspace<scalar_t> ws(nb_size, k);
          for (int64_t t = t0; t < t1; ++t) {
            scalar_t* sd = t == 0 ? od : extra_d.mutable_data_ptr<scalar_t>() + (t - 1) * Q * k;
            int64_t* si = t == 0 ? oi : extra_i.mutable_data_ptr<int64_t>() + (t - 1) * Q * k;
            const int64_t c0 = t * num_nb / slots, c1 = (t + 1) * num_nb / slots;
            for (int64_t q0 = 0; q0 < Q; q0 += qb_size) {
              const int64_t qb = std::min(qb_size, Q - q0);
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t n0 = c * nb_size, nb = std::min(nb_size, N - n0);
                scalar_t* dot = gemm(buf, q0, qb, n0, nb);
                process_rows<scalar_t, kMetric>(dot, nb, 0, qb, q0, n0, q_aux, db_aux, qp, dbp, dim, self, k, sd, si,
                                                ws);
              }
            }
          }
        });
        if (slots > 1) {
          const scalar_t* ed = extra_d.const_data_ptr<scalar_t>();
          const int64_t* ei = extra_i.const_data_ptr<int64_t>();
          at::parallel_for(0, Q, std::max<int64_t>(1, 4096 / k), [&](int64_t r0, int64_t r1) {
            std::unique_ptr<Candidate<scalar_t>[]> tmp(new Candidate<scalar_t>[k]);
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t t = 1; t < slots; ++t) {
                merge_sorted<scalar_t>(od + r * k, oi + r * k, ed + ((t - 1) * Q + r) * k, ei + ((t - 1) * Q + r) * k,
                                       k, tmp.get());
              }
            }
          });
        }
      }
    });
  });
  return {out_d, out_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) { m.impl("knn", &knn_cpu); }

}  // namespace cpu
}  // namespace metricops
