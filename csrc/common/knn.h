// k-nearest-neighbour helpers shared by the CPU and CUDA kernels: the sorted
// top-k insertion (in common/distance.h's dist_index_less order), the input
// preparation and argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "common/distance.h"

namespace metricops {

// Index of an empty top-k slot. With distance NaN it sorts after every real
// candidate (common/distance.h's dist_index_less), so a row starts "full of
// sentinels" and needs no separate count.
constexpr int64_t kKnnEmptyIndex = INT64_MAX;

// Inserts (d, idx) into a sorted top-k row (td, ti) if it beats the k-th,
// dropping the old k-th. O(k) shifts; meant for few insertions per row.
template <typename acc_t>
C10_HOST_DEVICE inline void knn_insert(acc_t* td, int64_t* ti, int64_t k, acc_t d, int64_t idx) {
  if (!dist_index_less(d, idx, td[k - 1], ti[k - 1])) return;
  int64_t p = k - 1;
  while (p > 0 && dist_index_less(d, idx, td[p - 1], ti[p - 1])) {
    td[p] = td[p - 1];
    ti[p] = ti[p - 1];
    --p;
  }
  td[p] = d;
  ti[p] = idx;
}

// Checks knn's arguments; returns how many database rows a query may return
// (N, or N - 1 when the queries are searched against themselves).
inline int64_t check_knn_inputs(const at::Tensor& queries, const std::optional<at::Tensor>& database, int64_t k,
                                int64_t chunk_size) {
  check_embeddings(queries, "queries");
  if (database.has_value()) {
    check_embeddings(*database, "database");
    check_same_device_dtype(queries, "queries", *database, "database");
    TORCH_CHECK_VALUE(queries.size(1) == database->size(1), "database must have the same embedding size D as queries (",
                      queries.size(1), "), got shape ", database->sizes());
  }
  // (an empty self-search can return 0 rows, not -1)
  const int64_t available = database.has_value() ? database->size(0) : std::max<int64_t>(queries.size(0) - 1, 0);
  TORCH_CHECK_VALUE(k >= 1 && k <= available,
                    "k must be between 1 and the number of database rows a query can return (", available,
                    database.has_value() ? "" : ", self excluded", "), got k=", k);
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 0 (0 picks it automatically), got ", chunk_size);
  return available;
}

// knn's inputs, checked, as contiguous tensors (db is q when the queries are
// searched against themselves).
struct KnnInputs {
  Metric metric;
  bool self;
  at::Tensor q, db;
  int64_t Q, N;
};

inline KnnInputs prepare_knn_inputs(const at::Tensor& queries, const std::optional<at::Tensor>& database, int64_t k,
                                    c10::string_view metric_name, int64_t chunk_size) {
  const Metric metric = parse_metric(metric_name);
  check_knn_inputs(queries, database, k, chunk_size);
  const bool self = !database.has_value();
  const at::Tensor q = queries.contiguous();
  const at::Tensor db = self ? q : database->contiguous();
  return {metric, self, q, db, q.size(0), db.size(0)};
}

}  // namespace metricops
