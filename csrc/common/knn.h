// k-nearest-neighbour helpers shared by the CPU and CUDA kernels: the
// (distance, index) order, the sorted top-k insertion, and argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace metricops {

// Index of an empty top-k slot. With distance NaN it sorts after every real
// candidate (see knn_less), so a row starts "full of sentinels" and needs no
// separate count.
constexpr int64_t kKnnEmptyIndex = INT64_MAX;

// The total order of knn results: (distance, index) lexicographic, with NaN
// larger than any number (+inf included) and NaNs equal to one another, so
// NaN distances sort last, by index, and can never displace a real one.
template <typename acc_t>
C10_HOST_DEVICE inline bool knn_less(acc_t da, int64_t ia, acc_t db, int64_t ib) {
  const bool nan_a = da != da, nan_b = db != db;
  if (nan_a || nan_b) return nan_a && nan_b ? ia < ib : nan_b;
  if (da < db) return true;
  if (db < da) return false;
  return ia < ib;
}

// Inserts (d, idx) into a sorted top-k row (td, ti) if it beats the k-th,
// dropping the old k-th. O(k) shifts; meant for few insertions per row.
template <typename acc_t>
C10_HOST_DEVICE inline void knn_insert(acc_t* td, int64_t* ti, int64_t k, acc_t d, int64_t idx) {
  if (!knn_less(d, idx, td[k - 1], ti[k - 1])) return;
  int64_t p = k - 1;
  while (p > 0 && knn_less(d, idx, td[p - 1], ti[p - 1])) {
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
    TORCH_CHECK_VALUE(queries.size(1) == database->size(1),
                      "database must have the same embedding size D as queries (", queries.size(1),
                      "), got shape ", database->sizes());
  }
  const int64_t available = database.has_value() ? database->size(0) : queries.size(0) - 1;
  TORCH_CHECK_VALUE(k >= 1 && k <= available, "k must be between 1 and the number of database rows a query can return (",
                    available, database.has_value() ? "" : ", self excluded", "), got k=", k);
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 0 (0 picks it automatically), got ", chunk_size);
  return available;
}

}  // namespace metricops
