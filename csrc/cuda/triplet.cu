// CUDA kernels for triplet mining and losses on a labelled batch.
//
// The distance matrix comes from cuBLAS + the shared epilogue in the
// accumulation dtype; per-anchor selections use the same common/triplet.h
// functions as the CPU. Each anchor's negatives (and, for batch-all, its
// shifted positives) are sorted once with two stable segmented sorts, and
// every (anchor, positive) pair binary-searches them: O(B² log B) work.
// Reductions go through ATen sums (deterministic, no atomics); the only
// atomics are index_add_'s in the batch-hard backward (deterministic under
// torch.use_deterministic_algorithms). The loss forwards never sync the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"

namespace metricops {
namespace cuda {
namespace {

at::Tensor labels_int64(const at::Tensor& labels) { return labels.to(at::kLong).contiguous(); }

// Sorts each row's entries where `member` is true first (by value, NaN last,
// ties to the lower index), the rest after. Returns (values, indices, count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_members_first(const at::Tensor& values, const at::Tensor& member) {
  auto [by_value, order] = at::sort(values, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor outsider = member.logical_not().gather(1, order).to(at::kByte);
  auto [unused, regroup] = at::sort(outsider, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {by_value.gather(1, regroup).contiguous(), order.gather(1, regroup).contiguous(), member.sum(1).contiguous()};
}

// --------------------------------------------------------------- batch-hard

// The better of two (distance, index) candidates for a farthest (max) or
// nearest (min) search: NaN wins, ties go to the lower index, -1 is "none".
template <typename T, bool kMax>
__device__ inline void combine(T& d, int64_t& i, T d2, int64_t i2) {
  if (i2 < 0) return;
  if (i < 0) {
    d = d2, i = i2;
    return;
  }
  const bool better = kMax ? farther(d2, d) : nearer(d2, d);
  const bool worse = kMax ? farther(d, d2) : nearer(d, d2);
  if (better || (!worse && i2 < i)) d = d2, i = i2;
}

// Anchors [row_begin, row_begin + rows): `keys` holds their distance-key rows
// (distance_key: squared distances for "euclidean"), so the selection
// compares keys as the CPU does and only the winners take the sqrt.
template <typename scalar_t, typename acc_t>
__global__ void batch_hard_kernel(const acc_t* __restrict__ keys, Metric metric, int64_t row_begin, int64_t rows,
                                  const int64_t* __restrict__ labels, int64_t B, acc_t margin, bool soft,
                                  scalar_t* __restrict__ losses, int64_t* __restrict__ positive,
                                  int64_t* __restrict__ negative, scalar_t* __restrict__ dist_ap,
                                  scalar_t* __restrict__ dist_an) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t a = row_begin + r;
    const acc_t* row = keys + r * B;
    const int64_t la = labels[a];
    acc_t dp = 0, dn = 0;
    int64_t ip = -1, in = -1;
    for (int64_t j = lane; j < B; j += 32) {
      if (labels[j] == la) {
        if (j != a) combine<acc_t, true>(dp, ip, row[j], j);
      } else {
        combine<acc_t, false>(dn, in, row[j], j);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t dp2 = __shfl_down_sync(0xffffffff, dp, offset);
      const int64_t ip2 = __shfl_down_sync(0xffffffff, ip, offset);
      const acc_t dn2 = __shfl_down_sync(0xffffffff, dn, offset);
      const int64_t in2 = __shfl_down_sync(0xffffffff, in, offset);
      combine<acc_t, true>(dp, ip, dp2, ip2);
      combine<acc_t, false>(dn, in, dn2, in2);
    }
    if (lane == 0) {
      const bool valid = ip >= 0 && in >= 0;
      acc_t d_ap = 0, d_an = 0, loss = 0;
      if (valid) batch_hard_from_keys<acc_t>(metric, dp, dn, margin, soft, d_ap, d_an, loss);
      positive[a] = valid ? ip : -1;
      negative[a] = valid ? in : -1;
      dist_ap[a] = static_cast<scalar_t>(d_ap);
      dist_an[a] = static_cast<scalar_t>(d_an);
      losses[a] = static_cast<scalar_t>(loss);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  // Composed on CUDA (the CPU kernel fuses it): mine on F.normalize(x).
  if (normalize) {
    return batch_hard_triplet_cuda(std::get<0>(l2_normalize_op(embeddings)), labels_in, margin, metric_name, soft,
                                   block_rows, false);
  }
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  at::Tensor losses = at::zeros({B}, embeddings.options());
  at::Tensor positive = at::full({B}, -1, labels.options());
  at::Tensor negative = at::full({B}, -1, labels.options());
  at::Tensor dist_ap = at::zeros({B}, embeddings.options());
  at::Tensor dist_an = at::zeros({B}, embeddings.options());
  if (B == 0) return {losses, positive, negative, dist_ap, dist_an};
  // Stream the distance-key matrix through a (block_rows, B) buffer: cuBLAS
  // for each row block, then one warp per anchor. block_rows <= 0: all rows
  // at once. The keys of "euclidean" are the "sqeuclidean" distances (same
  // row aux, same exactness guard).
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  const int64_t rows_per_block = block_rows > 0 && block_rows < B ? block_rows : B;
  at::Tensor buffer = at::empty({rows_per_block, B}, aux.options());
  for (int64_t r0 = 0; r0 < B; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, B - r0);
    at::Tensor block = buffer.narrow(0, 0, rows);
    self_distance_rows_acc_cuda(x, aux, r0, key_metric(metric), block);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metricops_batch_hard_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      batch_hard_kernel<scalar_t, acc_t><<<grid_for(rows, kThreads / 32), kThreads, 0, current_stream()>>>(
          block.const_data_ptr<acc_t>(), metric, r0, rows, labels.const_data_ptr<int64_t>(), B, static_cast<acc_t>(margin),
          soft, losses.mutable_data_ptr<scalar_t>(), positive.mutable_data_ptr<int64_t>(),
          negative.mutable_data_ptr<int64_t>(), dist_ap.mutable_data_ptr<scalar_t>(),
          dist_an.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {losses, positive, negative, dist_ap, dist_an};
}

template <typename T>
__global__ void batch_hard_coefficients_kernel(Metric metric, int64_t B, const T* g, const T* g_ap, const T* g_an,
                                               const int64_t* pos, const int64_t* neg, const T* dap, const T* dan,
                                               const T* aux, T margin, bool soft, T* anchor_self, T* w_p, T* w_n,
                                               T* p_self, T* n_self) {
  METRICOPS_CUDA_KERNEL_LOOP(a, B) {
    batch_hard_anchor_coefficients<T>(metric, B, a, pos[a], neg[a], g[a], g_ap[a], g_an[a], dap[a], dan[a], aux, margin,
                                      soft, anchor_self[a], w_p[a], w_n[a], p_self[a], n_self[a]);
  }
}

// Whether a host check (one sync) may run: not while the current stream is
// capturing a CUDA graph (a sync there fails the capture).
bool may_sync_now() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

struct CudaPairKernels {
  static bool may_sync() { return may_sync_now(); }

  // normalize=True is composed around the kernels (l2_normalize and its
  // backward) by batch_hard_triplet_backward_cuda, so they never see it.
  static at::Tensor row_norms(const at::Tensor&) {
    TORCH_INTERNAL_ASSERT(false, "batch_hard_triplet_backward_cuda composes normalize itself");
  }

  static at::Tensor row_aux(const at::Tensor& x, Metric metric, const at::Tensor& norm) {
    TORCH_INTERNAL_ASSERT(!norm.defined());
    return row_aux_acc_cuda(x, metric);
  }

  static at::Tensor batch_hard_assemble(const at::Tensor& x, const at::Tensor& positive, const at::Tensor& negative,
                                        const BatchHardGradCoefficients& c, const at::Tensor& norm) {
    TORCH_INTERNAL_ASSERT(!norm.defined());
    return batch_hard_assemble_aten(x, positive, negative, c);
  }

  static void batch_hard_coefficients(const BatchHardGradInputs& in, BatchHardGradCoefficients& out) {
    const int64_t B = in.positive.size(0);
    AT_DISPATCH_FLOATING_TYPES(in.dist_ap.scalar_type(), "metricops_batch_hard_backward_cuda", [&] {
      batch_hard_coefficients_kernel<scalar_t><<<grid_for(B), kThreads, 0, current_stream()>>>(
          in.metric, B, in.grad_losses.const_data_ptr<scalar_t>(), in.grad_dist_ap.const_data_ptr<scalar_t>(),
          in.grad_dist_an.const_data_ptr<scalar_t>(), in.positive.const_data_ptr<int64_t>(),
          in.negative.const_data_ptr<int64_t>(), in.dist_ap.const_data_ptr<scalar_t>(),
          in.dist_an.const_data_ptr<scalar_t>(), in.aux.const_data_ptr<scalar_t>(), static_cast<scalar_t>(in.margin),
          in.soft, out.anchor_self.mutable_data_ptr<scalar_t>(), out.cross_positive.mutable_data_ptr<scalar_t>(),
          out.cross_negative.mutable_data_ptr<scalar_t>(), out.positive_self.mutable_data_ptr<scalar_t>(),
          out.negative_self.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

at::Tensor batch_hard_triplet_backward_cuda(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                            const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                            const at::Tensor& positive, const at::Tensor& negative,
                                            const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                            c10::string_view metric, bool soft, bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  if (normalize) {
    // Composed on CUDA: the backward in y = F.normalize(x) (recomputed: one
    // pass over x), then F.normalize's backward.
    auto [y, norm] = l2_normalize_op(embeddings);
    const at::Tensor grad_y = batch_hard_triplet_backward_impl<CudaPairKernels>(
        grad_losses, grad_dist_ap, grad_dist_an, y, positive, negative, dist_ap, dist_an, margin, metric, soft, false);
    return l2_normalize_backward_op(grad_y, embeddings, norm);
  }
  return batch_hard_triplet_backward_impl<CudaPairKernels>(grad_losses, grad_dist_ap, grad_dist_an, embeddings,
                                                           positive, negative, dist_ap, dist_an, margin, metric, soft,
                                                           false);
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
constexpr int64_t kSortingScratchBytesPerEntry = 112;

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
  const char* env = std::getenv("METRICOPS_CUDA_TRIPLET_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "sort") == 0) return TripletPath::Sort;
  if (std::strcmp(env, "scan") == 0) return TripletPath::Scan;
  TORCH_CHECK_VALUE(false, "METRICOPS_CUDA_TRIPLET_PATH must be 'sort' or 'scan', got '", env, "'");
}

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kScanWarps = kThreads / 32;

// Anchor a's row: numbers of negatives and positives, and whether a
// negative's or a positive's distance is NaN. Every lane gets the result.
struct RowFacts {
  int64_t negatives, positives;
  bool nan_negative, nan_positive;
};

template <typename acc_t>
__device__ RowFacts row_facts(const acc_t* row, const int64_t* labels, int64_t a, int64_t la, int64_t B, int lane) {
  int64_t n = 0, P = 0;
  bool nan_n = false, nan_p = false;
  for (int64_t j = lane; j < B; j += 32) {
    const acc_t d = row[j];
    if (labels[j] != la) {
      ++n;
      nan_n |= d != d;
    } else if (j != a) {
      ++P;
      nan_p |= d != d;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    n += __shfl_xor_sync(kFullMask, n, offset);
    P += __shfl_xor_sync(kFullMask, P, offset);
  }
  return {n, P, __any_sync(kFullMask, nan_n) != 0, __any_sync(kFullMask, nan_p) != 0};
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
  RowFacts facts;
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

#define METRICOPS_SCAN_ROW_LOOP(r, rows)                                                                    \
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kScanWarps + threadIdx.x / 32; r < (rows);            \
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

// batch_all_kernel's results by scan: per row its term sum (NaN when a
// distance is NaN), valid and active triplets; multiplicity (zeros in) as
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
      const RowFacts& f = sr.facts;
      const bool nan = sr.has_triplets() && (f.nan_negative || f.nan_positive);
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

// Calls fn(row_begin, rows) over blocks of block_rows rows (<= 0: one block).
template <typename Fn>
void for_each_row_block(int64_t B, int64_t block_rows, const Fn& fn) {
  const int64_t step = block_rows > 0 && block_rows < B ? block_rows : B;
  for (int64_t r0 = 0; r0 < B; r0 += step) fn(r0, std::min(step, B - r0));
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

struct SemihardRows {
  at::Tensor losses;    // (rows, B) acc dtype, 0 off valid pairs
  at::Tensor negative;  // (rows, B) int64, -1 off valid pairs
  at::Tensor dist;      // (rows, B) acc dtype
};

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_cuda(const at::Tensor& embeddings,
                                                                     const at::Tensor& labels_in, double margin,
                                                                     c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  if (B == 0) {
    return {at::zeros({0, 0}, embeddings.options()), at::full({0, 0}, -1, labels.options()),
            at::empty({0, 0}, embeddings.options())};
  }
  const at::Tensor x = embeddings.contiguous();
  const SemihardRows r = semihard_rows(x, row_aux_acc_cuda(x, metric), labels, 0, B, metric, margin);
  const auto dtype = embeddings.scalar_type();
  return {r.losses.to(dtype), r.negative, r.dist.to(dtype)};
}

// Rows [0, rows) of the coefficient matrix; grad_losses, losses, negative
// and coef are (rows, B) and negative indexes columns. grad_losses and
// losses are in the input dtype, coef in the accumulation dtype (a negative
// collects the gradient of many positives). One thread per row keeps the
// scatter to each row's negatives ordered (deterministic); the matrix path
// has B rows, so this is B-way parallel.
template <typename T, typename acc_t>
__global__ void semihard_coefficients_kernel(int64_t rows, int64_t B, const T* grad_losses, const T* losses,
                                             const int64_t* negative, acc_t* coef) {
  METRICOPS_CUDA_KERNEL_LOOP(a, rows) { semihard_coefficients_row<T, acc_t>(a, B, grad_losses, losses, negative, coef); }
}

// The streaming backward's blocks have few rows but one gradient per row
// (that of the row's sum), so the coefficients are integer counts times it:
// one thread per (row, positive), integer atomics (order-independent, so
// deterministic) for the negatives that several positives share.
template <typename acc_t>
__global__ void semihard_term_counts_kernel(int64_t rows, int64_t B, const acc_t* __restrict__ losses,
                                            const int64_t* __restrict__ negative, int32_t* __restrict__ count) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, rows * B) {
    const int64_t n = negative[idx];
    if (!semihard_term_has_gradient(n, losses[idx])) continue;
    const int64_t a = idx / B;
    count[idx] += 1;  // (a, p) is a positive pair: no other thread writes it
    atomicAdd(count + a * B + n, -1);
  }
}

at::Tensor semihard_triplet_backward_cuda(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_dist,
                                          const at::Tensor& embeddings, const at::Tensor& losses_in,
                                          const at::Tensor& negative_in, const at::Tensor& dist,
                                          c10::string_view metric) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  check_semihard_backward_inputs(grad_losses, grad_dist, embeddings, losses_in, negative_in, dist, may_sync_now());
  const int64_t B = embeddings.size(0);
  const auto dtype = embeddings.scalar_type();
  const auto acc_options = embeddings.options().dtype(at::toOpMathType(dtype));
  at::Tensor coef = grad_dist.has_value() ? grad_dist->to(acc_options).contiguous().clone()
                                          : at::zeros({B, B}, acc_options);
  if (B > 0) {
    const at::Tensor g = grad_losses.to(dtype).contiguous();
    const at::Tensor losses = losses_in.contiguous(), negative = negative_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "metricops_semihard_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      semihard_coefficients_kernel<scalar_t, acc_t><<<grid_for(B), kThreads, 0, current_stream()>>>(
          B, B, g.const_data_ptr<scalar_t>(), losses.const_data_ptr<scalar_t>(),
          negative.const_data_ptr<int64_t>(), coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return self_distance_backward(coef.to(dtype), embeddings, dist, metric);  // rounded once
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_streaming_cuda(const at::Tensor& embeddings,
                                                                               const at::Tensor& labels_in,
                                                                               double margin,
                                                                               c10::string_view metric_name,
                                                                               int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  // float32 for float16/bfloat16: a row's sum may exceed their range.
  at::Tensor row_sum = at::zeros({B}, embeddings.options().dtype(at::toOpMathType(embeddings.scalar_type())));
  at::Tensor row_valid = at::zeros({B}, labels.options());
  at::Tensor row_active = at::zeros({B}, labels.options());
  if (B == 0) return {row_sum, row_valid, row_active};
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    const SemihardRows r = semihard_rows(x, aux, labels, r0, rows, metric, margin);
    row_sum.narrow(0, r0, rows).copy_(r.losses.sum(1));
    row_valid.narrow(0, r0, rows).copy_(r.negative.ge(0).sum(1));
    row_active.narrow(0, r0, rows).copy_(r.losses.gt(0).sum(1));
  });
  return {row_sum, row_valid, row_active};
}

at::Tensor semihard_triplet_streaming_backward_cuda(const at::Tensor& grad_row_sum, const at::Tensor& embeddings,
                                                    const at::Tensor& labels_in, double margin,
                                                    c10::string_view metric_name, int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  const int64_t B = embeddings.size(0);
  check_streaming_backward_inputs("semihard_triplet_streaming_backward", grad_row_sum, {B}, embeddings, labels_in,
                                  margin);
  const at::Tensor labels = labels_int64(labels_in);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  // Every block's gradient is computed and accumulated in float32 for
  // float16/bfloat16 (x_acc), and rounded to the input dtype once.
  at::Tensor grad = at::zeros(x.sizes(), aux.options());
  if (B == 0) return grad.to(x.scalar_type());
  const at::Tensor x_acc = x.to(aux.scalar_type());
  const at::Tensor g = grad_row_sum.to(aux.scalar_type());
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    const SemihardRows r = semihard_rows(x, aux, labels, r0, rows, metric, margin);
    at::Tensor count = at::zeros({rows, B}, labels.options().dtype(at::kInt));
    AT_DISPATCH_FLOATING_TYPES(aux.scalar_type(), "metricops_semihard_streaming_backward_cuda", [&] {
      semihard_term_counts_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
          rows, B, r.losses.const_data_ptr<scalar_t>(), r.negative.const_data_ptr<int64_t>(),
          count.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor coef = count.to(aux.scalar_type()).mul_(g.narrow(0, r0, rows).unsqueeze(1));
    accumulate_distance_rows_backward(coef, x_acc, r.dist, r0, metric_name, grad);
  });
  return grad.to(x.scalar_type());
}

// ---------------------------------------------------------------- batch-all

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
      const bool nan_row = d != d || negs[n - 1] != negs[n - 1];
      multiplicity[idx] = static_cast<acc_t>(cnt);
      active[idx] = cnt;
      term_sum[idx] = nan_row ? std::numeric_limits<double>::quiet_NaN()
                              : static_cast<double>(cnt) * static_cast<double>(margin + d) - neg_prefix[a * (B + 1) + cnt];
    } else if (negative[idx]) {
      const acc_t* shifted = shifted_sorted + a * B;
      const int64_t first = partition_point(shifted, P, [d](acc_t s) { return s - d > acc_t(0) || s != s; });
      const int64_t first_nan = partition_point(shifted, P, [](acc_t s) { return s != s; });
      multiplicity[idx] = -static_cast<acc_t>(first_nan - (first < first_nan ? first : first_nan));
    }
  }
}

struct BatchAllRows {
  at::Tensor term_sum;      // () float64: the rows' summed terms
  at::Tensor num_valid;     // () int64
  at::Tensor num_active;    // () int64
  at::Tensor multiplicity;  // (rows, B) acc dtype: d(term sum)/d(dist)
  at::Tensor dist;          // (rows, B) acc dtype
};

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
          static_cast<scalar_t>(margin), multiplicity.mutable_data_ptr<scalar_t>(),
          row_term.mutable_data_ptr<double>(), row_valid.mutable_data_ptr<int64_t>(),
          row_active.mutable_data_ptr<int64_t>());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  if (B == 0) {
    at::Tensor zero_count = at::zeros({}, labels.options());
    return {at::zeros({}, embeddings.options().dtype(at::toOpMathType(embeddings.scalar_type()))), zero_count, zero_count.clone(), at::empty({0, 0}, embeddings.options()),
            at::empty({0, 0}, embeddings.options())};
  }
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  const BatchAllRows r = batch_all_rows(x, aux, labels, 0, B, metric, margin);
  const auto dtype = embeddings.scalar_type();
  // The sum stays in the accumulation dtype: B³ terms overflow float16.
  return {r.term_sum.to(aux.scalar_type()), r.num_valid, r.num_active, r.dist.to(dtype), r.multiplicity.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_streaming_cuda(const at::Tensor& embeddings,
                                                                                const at::Tensor& labels_in,
                                                                                double margin,
                                                                                c10::string_view metric_name,
                                                                                int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  at::Tensor total = at::zeros({}, embeddings.options().dtype(at::kDouble));
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B > 0) {
    const at::Tensor x = embeddings.contiguous();
    const at::Tensor aux = row_aux_acc_cuda(x, metric);
    for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
      const BatchAllRows r = batch_all_rows(x, aux, labels, r0, rows, metric, margin);
      total.add_(r.term_sum);
      num_valid.add_(r.num_valid);
      num_active.add_(r.num_active);
    });
  }
  return {total.to(at::toOpMathType(embeddings.scalar_type())), num_valid, num_active};
}

at::Tensor batch_all_triplet_streaming_backward_cuda(const at::Tensor& grad_sum, const at::Tensor& embeddings,
                                                     const at::Tensor& labels_in, double margin,
                                                     c10::string_view metric_name, int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_streaming_backward_inputs("batch_all_triplet_streaming_backward", grad_sum, {}, embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  at::Tensor grad = at::zeros(x.sizes(), aux.options());  // accumulated in float32 for float16/bfloat16
  const at::Tensor g = grad_sum.to(aux.scalar_type());
  const at::Tensor x_acc = x.to(aux.scalar_type());  // blocks' gradients in float32 for float16/bfloat16
  for_each_row_block(x.size(0), block_rows, [&](int64_t r0, int64_t rows) {
    const BatchAllRows r = batch_all_rows(x, aux, labels, r0, rows, metric, margin);
    accumulate_distance_rows_backward(r.multiplicity.mul(g), x_acc, r.dist, r0, metric_name, grad);
  });
  return grad.to(x.scalar_type());
}

// ---------------------------------------------------------------- statistics

// Rows [0, rows) of a row block: one thread per (anchor, positive) entry.
template <typename acc_t>
__global__ void statistics_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                                  const acc_t* __restrict__ neg_sorted, const int64_t* __restrict__ neg_count,
                                  int64_t rows, int64_t B, acc_t margin, int64_t* __restrict__ counts /* (rows*B, 4) */) {
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

at::Tensor triplet_statistics_cuda(const at::Tensor& embeddings, const at::Tensor& labels_in, double margin,
                                   c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  at::Tensor total = at::zeros({4}, labels.options());
  if (B == 0) return total;
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  // Row blocks keep the scratch (sort keys and indices, per-entry counts)
  // under 256 MiB, so large batches fit.
  const int64_t block_rows = std::max<int64_t>(1, (int64_t{256} << 20) / (kSortingScratchBytesPerEntry * B));
  const bool scan = triplet_path() == TripletPath::Scan;
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    if (scan) {
      const at::Tensor dist = distance_rows(x, aux, r0, rows, metric);
      at::Tensor counts = at::empty({rows, 4}, labels.options());
      AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_triplet_statistics_scan_cuda", [&] {
        statistics_scan_kernel<scalar_t><<<grid_for(rows, kScanWarps), kThreads, 0, current_stream()>>>(
            dist.const_data_ptr<scalar_t>(), r0, rows, labels.const_data_ptr<int64_t>(), B,
            static_cast<scalar_t>(margin), counts.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      total.add_(counts.sum(0));
      return;
    }
    const LabelledRows ld = labelled_rows(x, aux, labels, r0, rows, metric);
    at::Tensor counts = at::empty({rows * B, 4}, labels.options());
    AT_DISPATCH_FLOATING_TYPES(ld.dist.scalar_type(), "metricops_triplet_statistics_cuda", [&] {
      statistics_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
          ld.dist.const_data_ptr<scalar_t>(), ld.positive.const_data_ptr<bool>(),
          ld.neg_sorted.const_data_ptr<scalar_t>(), ld.neg_count.const_data_ptr<int64_t>(), rows, B,
          static_cast<scalar_t>(margin), counts.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    total.add_(counts.sum(0));
  });
  return total;
}

// ---------------------------------------------------------------- miner

// One thread per (anchor, positive) pair: count (offsets == nullptr) or
// write its selected negatives in index order.
template <typename acc_t>
__global__ void mine_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                            const bool* __restrict__ negative, int64_t B, MiningStrategy strategy, acc_t margin,
                            int64_t* __restrict__ counts, const int64_t* __restrict__ offsets, int64_t* __restrict__ out_a,
                            int64_t* __restrict__ out_p, int64_t* __restrict__ out_n) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, B * B) {
    const int64_t a = idx / B, p = idx - a * B;
    int64_t k = offsets == nullptr ? 0 : offsets[idx];
    if (positive[idx]) {
      const acc_t d_ap = dist[idx];
      for (int64_t n = 0; n < B; ++n) {
        if (!negative[a * B + n] || !strategy_selects<acc_t>(strategy, dist[a * B + n] - d_ap, margin)) continue;
        if (offsets != nullptr) out_a[k] = a, out_p[k] = p, out_n[k] = n;
        ++k;
      }
    }
    if (offsets == nullptr) counts[idx] = k;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels_in,
                                                                  c10::string_view strategy_name, double margin,
                                                                  c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  const MiningStrategy strategy = parse_strategy(strategy_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = embeddings.size(0);
  if (strategy == MiningStrategy::BatchHard) {
    auto [losses, positive, negative, d_ap, d_an] =
        batch_hard_triplet_cuda(embeddings, labels_in, margin, metric_name, false, 0, false);
    const at::Tensor anchors = at::nonzero(positive.ge(0)).flatten();  // the miner may sync: its size is data-dependent
    return {anchors, positive.index_select(0, anchors), negative.index_select(0, anchors)};
  }
  if (B == 0) {
    at::Tensor e = at::empty({0}, labels.options());
    return {e, e.clone(), e.clone()};
  }
  const at::Tensor dist = self_distance_acc_cuda(embeddings.contiguous(), metric);
  const at::Tensor same = labels.unsqueeze(1).eq(labels.unsqueeze(0));
  const at::Tensor negative = same.logical_not().contiguous();
  const at::Tensor positive = same.fill_diagonal_(false).contiguous();
  at::Tensor counts = at::empty({B * B}, labels.options());
  at::Tensor a_out, p_out, n_out;
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_mine_triplets_cuda", [&] {
    const auto m = static_cast<scalar_t>(margin);
    mine_kernel<scalar_t><<<grid_for(B * B), kThreads, 0, current_stream()>>>(
        dist.const_data_ptr<scalar_t>(), positive.const_data_ptr<bool>(), negative.const_data_ptr<bool>(), B, strategy,
        m, counts.mutable_data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor ends = at::cumsum(counts, 0);
    const int64_t total = ends[-1].item<int64_t>();
    const at::Tensor offsets = ends.sub(counts);
    a_out = at::empty({total}, labels.options());
    p_out = at::empty({total}, labels.options());
    n_out = at::empty({total}, labels.options());
    if (total > 0) {
      mine_kernel<scalar_t><<<grid_for(B * B), kThreads, 0, current_stream()>>>(
          dist.const_data_ptr<scalar_t>(), positive.const_data_ptr<bool>(), negative.const_data_ptr<bool>(), B,
          strategy, m, nullptr, offsets.const_data_ptr<int64_t>(), a_out.mutable_data_ptr<int64_t>(),
          p_out.mutable_data_ptr<int64_t>(), n_out.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {a_out, p_out, n_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("batch_hard_triplet", &batch_hard_triplet_cuda);
  m.impl("batch_hard_triplet_backward", &batch_hard_triplet_backward_cuda);
  m.impl("semihard_triplet", &semihard_triplet_cuda);
  m.impl("semihard_triplet_backward", &semihard_triplet_backward_cuda);
  m.impl("batch_all_triplet", &batch_all_triplet_cuda);
  m.impl("semihard_triplet_streaming", &semihard_triplet_streaming_cuda);
  m.impl("semihard_triplet_streaming_backward", &semihard_triplet_streaming_backward_cuda);
  m.impl("batch_all_triplet_streaming", &batch_all_triplet_streaming_cuda);
  m.impl("batch_all_triplet_streaming_backward", &batch_all_triplet_streaming_backward_cuda);
  m.impl("triplet_statistics", &triplet_statistics_cuda);
  m.impl("mine_triplets", &mine_triplets_cuda);
}

}  // namespace cuda
}  // namespace metricops
