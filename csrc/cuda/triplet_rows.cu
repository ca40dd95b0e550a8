// Row blocks of the sorting triplet ops on CUDA (declared in
// cuda/triplet_rows.h): for anchors [row_begin, row_begin + rows), the
// distance rows (cuBLAS + the shared epilogue, in the accumulation dtype) and
// their semi-hard, batch-all or statistics results, by one of two paths
// (METRICOPS_CUDA_TRIPLET_PATH):
//  * sort (default): each anchor's negatives (and, for batch-all, its
//    shifted positives) are sorted once with two stable segmented sorts, and
//    every (anchor, positive) pair binary-searches them: O(B² log B) work;
//  * scan: one warp per anchor streams its row once per 32 positives.
// Both use the per-element functions of common/triplet.h the CPU runs.
// Reductions go through ATen sums (deterministic); no host sync.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/triplet.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"
#include "cuda/triplet_rows.h"

namespace metricops {
namespace cuda {
namespace {

// Sorts each row's entries where `member` is true first (by value, NaN last,
// ties to the lower index), the rest after. Returns (values, indices, count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_members_first(const at::Tensor& values, const at::Tensor& member) {
  auto [by_value, order] = at::sort(values, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor outsider = member.logical_not().gather(1, order).to(at::kByte);
  auto [unused, regroup] = at::sort(outsider, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {by_value.gather(1, regroup).contiguous(), order.gather(1, regroup).contiguous(), member.sum(1).contiguous()};
}

// ---------------------------------------------------------------- sorted rows
//
// Every sorting op works on a block of anchor rows [row_begin, row_begin +
// rows): the matrix ops take all B rows at once, the streaming ops bounded
// blocks (then nothing of size B×B is ever allocated).

struct LabelledRows {
  at::Tensor dist;      // (rows, B) acc dtype
  at::Tensor positive;  // (rows, B) bool: a != p, same label
  at::Tensor negative;  // (rows, B) bool: different label
  at::Tensor neg_sorted, neg_index, neg_count;
};

LabelledRows labelled_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                           int64_t rows, Metric metric) {
  const int64_t B = x.size(0);
  LabelledRows r;
  r.dist = at::empty({rows, B}, aux.options());
  self_distance_rows_acc_cuda(x, aux, row_begin, metric, r.dist);
  at::Tensor same = labels.narrow(0, row_begin, rows).unsqueeze(1).eq(labels.unsqueeze(0));
  r.negative = same.logical_not();
  same.diagonal(row_begin).fill_(false);  // entries (r, row_begin + r): the anchors themselves
  r.positive = same;
  std::tie(r.neg_sorted, r.neg_index, r.neg_count) = sort_members_first(r.dist, r.negative);
  return r;
}

// Live scratch bytes per entry of a sorting row block at its peak (batch-all:
// distances, masks, two stable segmented sorts with their indices and
// temporaries, float64 prefix and term sums, counts). metricops/triplet.py's
// _SORTING_BYTES_PER_ENTRY is the same number; tests/test_cuda_review.py
// measures it on a GPU.
// ---------------------------------------------------------------- scan path
//
// The sort-free path for semi-hard, batch-all and statistics row blocks: one
// warp per anchor, its positives in registers (32 a pass, one per lane, in
// column order), streaming the anchor's distance row once per pass with the
// shared per-element logic of common/triplet.h (the CPU's few-positives path
// runs the same functions). O(P·B/32) work an anchor and no scratch beyond
// the outputs, against the sort path's 2-4 segmented sorts a block; slower
// than sorting only for anchors with many positives. METRICOPS_CUDA_TRIPLET_PATH
// selects: "sort" (default until a GPU run has compared both: `make
// gpu-check` does) or "scan".

enum class TripletPath { Sort, Scan };

TripletPath triplet_path() {
  return env_selects_new_path("METRICOPS_CUDA_TRIPLET_PATH", "sort", "scan") ? TripletPath::Scan : TripletPath::Sort;
}

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kScanWarps = kThreads / 32;

// Anchor a's row: numbers of negatives and positives, and whether a
// negative's or a positive's distance is NaN. Every lane gets the result.
template <typename acc_t>
struct RowFacts {
  int64_t negatives, positives;
  bool nan_negative, nan_positive, inf_negative;
  acc_t max_positive;  // the largest non-NaN positive distance (-inf: none)
};

template <typename acc_t>
__device__ RowFacts<acc_t> row_facts(const acc_t* row, const int64_t* labels, int64_t a, int64_t la, int64_t B,
                                     int lane) {
  int64_t n = 0, P = 0;
  bool nan_n = false, nan_p = false, inf_n = false;
  acc_t max_p = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = lane; j < B; j += 32) {
    const acc_t d = row[j];
    if (labels[j] != la) {
      ++n;
      nan_n |= d != d;
      inf_n |= d == std::numeric_limits<acc_t>::infinity();
    } else if (j != a) {
      ++P;
      nan_p |= d != d;
      max_p = d > max_p ? d : max_p;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    n += __shfl_xor_sync(kFullMask, n, offset);
    P += __shfl_xor_sync(kFullMask, P, offset);
    const acc_t other = __shfl_xor_sync(kFullMask, max_p, offset);
    max_p = other > max_p ? other : max_p;
  }
  return {
      n,    P, __any_sync(kFullMask, nan_n) != 0, __any_sync(kFullMask, nan_p) != 0, __any_sync(kFullMask, inf_n) != 0,
      max_p};
}

// The next (up to) 32 positives of anchor a at columns >= cursor, in column
// order: lane L gets the L-th in my_p (-1 past the last). Advances cursor
// past them and returns how many (0: none left). `slots`: the warp's 32
// shared entries.
__device__ int next_positives(const int64_t* labels, int64_t a, int64_t la, int64_t B, int lane, int64_t& cursor,
                              int64_t* slots, int64_t& my_p) {
  int count = 0;
  while (count < 32 && cursor < B) {
    const int64_t j = cursor + lane;
    const bool is_positive = j < B && j != a && labels[j] == la;
    const unsigned found = __ballot_sync(kFullMask, is_positive);
    const int rank = __popc(found & ((1u << lane) - 1u));
    const int available = __popc(found), take = min(available, 32 - count);
    if (is_positive && rank < take) slots[count + rank] = j;
    if (take < available) {  // resume at the first positive not taken
      cursor += __ffs(__ballot_sync(kFullMask, is_positive && rank == take)) - 1;
    } else {
      cursor += 32;
    }
    count += take;
  }
  __syncwarp();
  my_p = lane < count ? slots[lane] : -1;
  __syncwarp();  // the next call rewrites the slots
  return count;
}

// Streams anchor a's row in chunks of 32 columns; for each negative column j,
// in increasing order, every lane calls on_negative(d, j, t) with the
// column's distance d (t = j's lane in the chunk; the branch is warp-uniform,
// so on_negative may use warp collectives); after each chunk every lane
// calls on_chunk(j0, negatives) with the chunk's negative mask.
template <typename acc_t, typename OnNegative, typename OnChunk>
__device__ void scan_negatives(const acc_t* row, const int64_t* labels, int64_t la, int64_t B, int lane,
                               const OnNegative& on_negative, const OnChunk& on_chunk) {
  for (int64_t j0 = 0; j0 < B; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool inside = j < B;
    const acc_t v = inside ? row[j] : acc_t(0);
    const unsigned negatives = __ballot_sync(kFullMask, inside && labels[j] != la);
    for (int t = 0; t < 32; ++t) {
      const acc_t d = __shfl_sync(kFullMask, v, t);
      if ((negatives >> t) & 1u) on_negative(d, j0 + t, t);
    }
    on_chunk(j0, negatives);
  }
}

// Row r of a scan kernel's block: its anchor, the anchor's label, its
// distance row and the row's facts.
template <typename acc_t>
struct ScanRow {
  int64_t a, label;
  const acc_t* dist;
  RowFacts<acc_t> facts;
  C10_HOST_DEVICE bool has_triplets() const { return facts.negatives > 0 && facts.positives > 0; }
};

template <typename acc_t>
__device__ ScanRow<acc_t> scan_row(const acc_t* dist, int64_t row_begin, int64_t r, const int64_t* labels, int64_t B,
                                   int lane) {
  const int64_t a = row_begin + r, label = labels[a];
  const acc_t* row = dist + r * B;
  return {a, label, row, row_facts(row, labels, a, label, B, lane)};
}

// Calls pass(p) once per group of (up to) 32 positives of the row's anchor,
// p: this lane's positive (-1 when the group has fewer).
template <typename acc_t, typename Pass>
__device__ void for_each_positive_pass(const ScanRow<acc_t>& row, const int64_t* labels, int64_t B, int lane,
                                       int64_t* slots, const Pass& pass) {
  int64_t cursor = 0, p = -1;
  while (next_positives(labels, row.a, row.label, B, lane, cursor, slots, p) > 0) pass(p);
}

#define METRICOPS_SCAN_ROW_LOOP(r, rows)                                                         \
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kScanWarps + threadIdx.x / 32; r < (rows); \
       r += static_cast<int64_t>(gridDim.x) * kScanWarps)

// semihard_kernel's outputs by scan; losses must hold zeros, negative -1.
template <typename acc_t>
__global__ void semihard_scan_kernel(const acc_t* __restrict__ dist, int64_t row_begin, int64_t rows,
                                     const int64_t* __restrict__ labels, int64_t B, acc_t margin,
                                     acc_t* __restrict__ losses, int64_t* __restrict__ negative) {
  __shared__ int64_t slots[kScanWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  METRICOPS_SCAN_ROW_LOOP(r, rows) {
    const ScanRow<acc_t> sr = scan_row(dist, row_begin, r, labels, B, lane);
    if (!sr.has_triplets()) continue;
    const acc_t* row = sr.dist;
    const acc_t poison = sr.facts.nan_negative ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
    for_each_positive_pass(sr, labels, B, lane, slots[warp], [&](int64_t p) {
      const acc_t d_ap = p >= 0 ? row[p] : acc_t(0);
      acc_t near_d = 0, far_d = 0;
      int64_t near_k = -1, far_k = -1, nan_k = -1;
      scan_negatives(
          row, labels, sr.label, B, lane,
          [&](acc_t d, int64_t j, int) {
            semihard_scan_step<acc_t, int64_t>(d, j, d_ap, near_d, near_k, far_d, far_k, nan_k);
          },
          [](int64_t, unsigned) {});
      if (p >= 0) {
        const int64_t k = semihard_scan_pick<int64_t>(near_k, nan_k, far_k);
        negative[r * B + p] = k;
        losses[r * B + p] = triplet_term<acc_t>(d_ap, row[k], margin, false) + poison;
      }
    });
  }
}

// batch_all_kernel's results by scan: per row its term sum (NaN when a term
// is: batch_all_sum_is_nan), valid and active triplets; multiplicity (zeros in) as
// batch_all_kernel writes it. Per negative column, a ballot over the lanes'
// positives counts the triplets it is active in.
template <typename acc_t>
__global__ void batch_all_scan_kernel(const acc_t* __restrict__ dist, int64_t row_begin, int64_t rows,
                                      const int64_t* __restrict__ labels, int64_t B, acc_t margin,
                                      acc_t* __restrict__ multiplicity, double* __restrict__ row_term,
                                      int64_t* __restrict__ row_valid, int64_t* __restrict__ row_active) {
  __shared__ int64_t slots[kScanWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  METRICOPS_SCAN_ROW_LOOP(r, rows) {
    const ScanRow<acc_t> sr = scan_row(dist, row_begin, r, labels, B, lane);
    const acc_t* row = sr.dist;
    acc_t* mult = multiplicity + r * B;
    double sum = 0;
    int64_t active = 0;
    if (sr.has_triplets()) {
      for_each_positive_pass(sr, labels, B, lane, slots[warp], [&](int64_t p) {
        const bool valid = p >= 0;
        const acc_t shifted = valid ? margin + row[p] : acc_t(0);
        int64_t count = 0;
        int column_count = 0;  // for column j0 + lane of the current chunk
        scan_negatives(
            row, labels, sr.label, B, lane,
            [&](acc_t d, int64_t, int t) {
              acc_t term = 0;
              const bool on = valid && batch_all_term(shifted, d, term);
              if (on) {
                sum += static_cast<double>(term);
                ++count;
              }
              const int n_on = __popc(__ballot_sync(kFullMask, on));
              if (lane == t) column_count = n_on;
            },
            [&](int64_t j0, unsigned negatives) {
              if (((negatives >> lane) & 1u) && column_count > 0) mult[j0 + lane] -= static_cast<acc_t>(column_count);
              column_count = 0;
            });
        if (valid) mult[p] = static_cast<acc_t>(count);
        active += count;
      });
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(kFullMask, sum, offset);
      active += __shfl_xor_sync(kFullMask, active, offset);
    }
    if (lane == 0) {
      const RowFacts<acc_t>& f = sr.facts;
      const bool nan = sr.has_triplets() &&
                       batch_all_sum_is_nan(f.nan_negative || f.nan_positive, margin + f.max_positive, f.inf_negative);
      row_term[r] = nan ? std::numeric_limits<double>::quiet_NaN() : sum;
      row_valid[r] = f.negatives * f.positives;
      row_active[r] = active;
    }
  }
}

// statistics_kernel's counts by scan, one (total, easy, semihard, hard) row
// per anchor.
template <typename acc_t>
__global__ void statistics_scan_kernel(const acc_t* __restrict__ dist, int64_t row_begin, int64_t rows,
                                       const int64_t* __restrict__ labels, int64_t B, acc_t margin,
                                       int64_t* __restrict__ counts /* (rows, 4) */) {
  __shared__ int64_t slots[kScanWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  METRICOPS_SCAN_ROW_LOOP(r, rows) {
    const ScanRow<acc_t> sr = scan_row(dist, row_begin, r, labels, B, lane);
    const acc_t* row = sr.dist;
    int64_t easy = 0, semihard = 0, hard = 0;
    if (sr.has_triplets()) {
      for_each_positive_pass(sr, labels, B, lane, slots[warp], [&](int64_t p) {
        const bool valid = p >= 0;
        const acc_t d_ap = valid ? row[p] : acc_t(0);
        scan_negatives(
            row, labels, sr.label, B, lane,
            [&](acc_t d, int64_t, int) {
              if (valid) classify_negative(d, d_ap, margin, easy, semihard, hard);
            },
            [](int64_t, unsigned) {});
      });
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      easy += __shfl_xor_sync(kFullMask, easy, offset);
      semihard += __shfl_xor_sync(kFullMask, semihard, offset);
      hard += __shfl_xor_sync(kFullMask, hard, offset);
    }
    if (lane == 0) {
      counts[4 * r] = sr.facts.negatives * sr.facts.positives;
      counts[4 * r + 1] = easy, counts[4 * r + 2] = semihard, counts[4 * r + 3] = hard;
    }
  }
}

// The distance rows [row_begin, row_begin + rows) alone (the scan path needs
// no masks or sorted copies).
at::Tensor distance_rows(const at::Tensor& x, const at::Tensor& aux, int64_t row_begin, int64_t rows, Metric metric) {
  at::Tensor dist = at::empty({rows, x.size(0)}, aux.options());
  self_distance_rows_acc_cuda(x, aux, row_begin, metric, dist);
  return dist;
}

template <typename acc_t>
__global__ void semihard_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                                const acc_t* __restrict__ neg_sorted, const int64_t* __restrict__ neg_index,
                                const int64_t* __restrict__ neg_count, int64_t rows, int64_t B, acc_t margin,
                                acc_t* __restrict__ losses, int64_t* __restrict__ negative) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, rows * B) {
    const int64_t a = idx / B;  // row within the block
    const int64_t n = neg_count[a];
    if (!positive[idx] || n == 0) continue;
    const acc_t* sorted = neg_sorted + a * B;
    const int64_t k = semihard_position(sorted, n, dist[idx]);
    const acc_t poison = sorted[n - 1] != sorted[n - 1] ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
    negative[idx] = neg_index[a * B + k];
    losses[idx] = triplet_term<acc_t>(dist[idx], sorted[k], margin, false) + poison;
  }
}

}  // namespace

SemihardRows semihard_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                           int64_t rows, Metric metric, double margin) {
  const int64_t B = x.size(0);
  if (triplet_path() == TripletPath::Scan) {
    const at::Tensor dist = distance_rows(x, aux, row_begin, rows, metric);
    SemihardRows r{at::zeros({rows, B}, dist.options()), at::full({rows, B}, -1, labels.options()), dist};
    AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_semihard_scan_cuda", [&] {
      semihard_scan_kernel<scalar_t><<<grid_for(rows, kScanWarps), kThreads, 0, current_stream()>>>(
          dist.const_data_ptr<scalar_t>(), row_begin, rows, labels.const_data_ptr<int64_t>(), B,
          static_cast<scalar_t>(margin), r.losses.mutable_data_ptr<scalar_t>(), r.negative.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return r;
  }
  const LabelledRows ld = labelled_rows(x, aux, labels, row_begin, rows, metric);
  SemihardRows r{at::zeros({rows, B}, ld.dist.options()), at::full({rows, B}, -1, labels.options()), ld.dist};
  AT_DISPATCH_FLOATING_TYPES(ld.dist.scalar_type(), "metricops_semihard_cuda", [&] {
    semihard_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
        ld.dist.const_data_ptr<scalar_t>(), ld.positive.const_data_ptr<bool>(),
        ld.neg_sorted.const_data_ptr<scalar_t>(), ld.neg_index.const_data_ptr<int64_t>(),
        ld.neg_count.const_data_ptr<int64_t>(), rows, B, static_cast<scalar_t>(margin),
        r.losses.mutable_data_ptr<scalar_t>(), r.negative.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

// ---------------------------------------------------------------- batch-all

namespace {

template <typename acc_t>
__global__ void batch_all_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                                 const bool* __restrict__ negative, const acc_t* __restrict__ neg_sorted,
                                 const double* __restrict__ neg_prefix, const int64_t* __restrict__ neg_count,
                                 const acc_t* __restrict__ shifted_sorted, const int64_t* __restrict__ pos_count,
                                 int64_t rows, int64_t B, acc_t margin, acc_t* __restrict__ multiplicity,
                                 double* __restrict__ term_sum, int64_t* __restrict__ active) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, rows * B) {
    const int64_t a = idx / B;  // row within the block
    const int64_t n = neg_count[a], P = pos_count[a];
    term_sum[idx] = 0;
    active[idx] = 0;
    multiplicity[idx] = 0;
    if (n == 0 || P == 0) continue;
    const acc_t d = dist[idx];
    const acc_t* negs = neg_sorted + a * B;
    if (positive[idx]) {
      const int64_t cnt = count_active_negatives(negs, n, d, margin);
      const acc_t farthest = negs[n - 1];  // NaN sorts last
      const bool nan_row = batch_all_sum_is_nan(d != d || farthest != farthest, margin + d,
                                                farthest == std::numeric_limits<acc_t>::infinity());
      multiplicity[idx] = static_cast<acc_t>(cnt);
      active[idx] = cnt;
      term_sum[idx] = nan_row
                          ? std::numeric_limits<double>::quiet_NaN()
                          : static_cast<double>(cnt) * static_cast<double>(margin + d) - neg_prefix[a * (B + 1) + cnt];
    } else if (negative[idx]) {
      const acc_t* shifted = shifted_sorted + a * B;
      const int64_t first = partition_point(shifted, P, [d](acc_t s) { return s - d > acc_t(0) || s != s; });
      const int64_t first_nan = partition_point(shifted, P, [](acc_t s) { return s != s; });
      multiplicity[idx] = -static_cast<acc_t>(first_nan - (first < first_nan ? first : first_nan));
    }
  }
}

}  // namespace

BatchAllRows batch_all_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                            int64_t rows, Metric metric, double margin) {
  const int64_t B = x.size(0);
  if (triplet_path() == TripletPath::Scan) {
    const at::Tensor dist = distance_rows(x, aux, row_begin, rows, metric);
    at::Tensor multiplicity = at::zeros({rows, B}, dist.options());
    at::Tensor row_term = at::empty({rows}, dist.options().dtype(at::kDouble));
    at::Tensor row_valid = at::empty({rows}, labels.options());
    at::Tensor row_active = at::empty({rows}, labels.options());
    AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_batch_all_scan_cuda", [&] {
      batch_all_scan_kernel<scalar_t><<<grid_for(rows, kScanWarps), kThreads, 0, current_stream()>>>(
          dist.const_data_ptr<scalar_t>(), row_begin, rows, labels.const_data_ptr<int64_t>(), B,
          static_cast<scalar_t>(margin), multiplicity.mutable_data_ptr<scalar_t>(), row_term.mutable_data_ptr<double>(),
          row_valid.mutable_data_ptr<int64_t>(), row_active.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {row_term.sum(), row_valid.sum(), row_active.sum(), multiplicity, dist};
  }
  const LabelledRows ld = labelled_rows(x, aux, labels, row_begin, rows, metric);
  const at::Tensor shifted_values = ld.dist.add(margin);
  auto [shifted_sorted, unused_index, pos_count] = sort_members_first(shifted_values, ld.positive);
  // Prefix sums in float64: prefix[a, k] = sum of the k nearest negatives.
  at::Tensor neg_prefix = at::zeros({rows, B + 1}, ld.dist.options().dtype(at::kDouble));
  neg_prefix.narrow(1, 1, B).copy_(at::cumsum(ld.neg_sorted.to(at::kDouble), 1));
  at::Tensor multiplicity = at::empty({rows, B}, ld.dist.options());
  at::Tensor term_sum = at::empty({rows, B}, ld.dist.options().dtype(at::kDouble));
  at::Tensor active = at::empty({rows, B}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(ld.dist.scalar_type(), "metricops_batch_all_cuda", [&] {
    batch_all_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
        ld.dist.const_data_ptr<scalar_t>(), ld.positive.const_data_ptr<bool>(), ld.negative.const_data_ptr<bool>(),
        ld.neg_sorted.const_data_ptr<scalar_t>(), neg_prefix.const_data_ptr<double>(),
        ld.neg_count.const_data_ptr<int64_t>(), shifted_sorted.const_data_ptr<scalar_t>(),
        pos_count.const_data_ptr<int64_t>(), rows, B, static_cast<scalar_t>(margin),
        multiplicity.mutable_data_ptr<scalar_t>(), term_sum.mutable_data_ptr<double>(),
        active.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {term_sum.sum(), pos_count.mul(ld.neg_count).sum(), active.sum(), multiplicity, ld.dist};
}

namespace {

// ---------------------------------------------------------------- statistics

// Rows [0, rows) of a row block: one thread per (anchor, positive) entry.
template <typename acc_t>
__global__ void statistics_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                                  const acc_t* __restrict__ neg_sorted, const int64_t* __restrict__ neg_count,
                                  int64_t rows, int64_t B, acc_t margin,
                                  int64_t* __restrict__ counts /* (rows*B, 4) */) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, rows * B) {
    const int64_t a = idx / B, n = neg_count[a];
    int64_t easy = 0, semihard = 0, hard = 0, total = 0;
    if (positive[idx] && n > 0) {
      classify_negatives(neg_sorted + a * B, n, dist[idx], margin, easy, semihard, hard);
      total = n;
    }
    counts[4 * idx] = total, counts[4 * idx + 1] = easy, counts[4 * idx + 2] = semihard, counts[4 * idx + 3] = hard;
  }
}

}  // namespace

// triplet_statistics' (total, easy, semihard, hard) counts, int64 (4,), of
// the anchors [row_begin, row_begin + rows).
at::Tensor statistics_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                           int64_t rows, Metric metric, double margin) {
  const int64_t B = x.size(0);
  if (triplet_path() == TripletPath::Scan) {
    const at::Tensor dist = distance_rows(x, aux, row_begin, rows, metric);
    at::Tensor counts = at::empty({rows, 4}, labels.options());
    AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_triplet_statistics_scan_cuda", [&] {
      statistics_scan_kernel<scalar_t><<<grid_for(rows, kScanWarps), kThreads, 0, current_stream()>>>(
          dist.const_data_ptr<scalar_t>(), row_begin, rows, labels.const_data_ptr<int64_t>(), B,
          static_cast<scalar_t>(margin), counts.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return counts.sum(0);
  }
  const LabelledRows ld = labelled_rows(x, aux, labels, row_begin, rows, metric);
  at::Tensor counts = at::empty({rows * B, 4}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(ld.dist.scalar_type(), "metricops_triplet_statistics_cuda", [&] {
    statistics_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
        ld.dist.const_data_ptr<scalar_t>(), ld.positive.const_data_ptr<bool>(),
        ld.neg_sorted.const_data_ptr<scalar_t>(), ld.neg_count.const_data_ptr<int64_t>(), rows, B,
        static_cast<scalar_t>(margin), counts.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts.sum(0);
}

}  // namespace cuda
}  // namespace metricops
