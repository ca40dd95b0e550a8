// CUDA kernels for batch_hard_triplet and its backward.
//
// The distance-key matrix streams through a (block_rows, B) buffer: cuBLAS +
// the shared epilogue per row block, then one warp per anchor selects with
// common/triplet.h's merge_candidate (the CPU's selection order). The
// backward's per-anchor coefficients come from common/triplet.h; its
// gather/scatter goes through ATen's index_add_ (CUDA atomics; deterministic
// under torch.use_deterministic_algorithms). normalize=True is composed here
// around the kernels: l2_normalize before, l2_normalize_backward after (the
// CPU kernel fuses it). The forward never syncs the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/normalize.h"
#include "common/op_calls.h"
#include "common/precision.h"
#include "common/row_blocks.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"
#include "cuda/triplet_rows.h"

namespace metricops {
namespace cuda {
namespace {

// l2_normalize and its backward with the losses' eps (kernels registered
// from cuda/normalize.cu).
std::tuple<at::Tensor, at::Tensor> l2_normalize_op(const at::Tensor& x) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double)>("metricops::l2_normalize");
  return op.call(x, kNormalizeEps);
}

at::Tensor l2_normalize_backward_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
      "metricops::l2_normalize_backward");
  return op.call(grad, x, norm, kNormalizeEps);
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
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(r, rows) {
    const int64_t a = row_begin + r;
    const acc_t* row = keys + r * B;
    const int64_t la = labels[a];
    acc_t dp = 0, dn = 0;
    int64_t ip = -1, in = -1;
    for (int64_t j = lane; j < B; j += 32) {
      if (labels[j] == la) {
        if (j != a) merge_candidate<acc_t, int64_t, true>(row[j], j, dp, ip);
      } else {
        merge_candidate<acc_t, int64_t, false>(row[j], j, dn, in);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t dp2 = __shfl_down_sync(0xffffffff, dp, offset);
      const int64_t ip2 = __shfl_down_sync(0xffffffff, ip, offset);
      const acc_t dn2 = __shfl_down_sync(0xffffffff, dn, offset);
      const int64_t in2 = __shfl_down_sync(0xffffffff, in, offset);
      merge_candidate<acc_t, int64_t, true>(dp2, ip2, dp, ip);
      merge_candidate<acc_t, int64_t, false>(dn2, in2, dn, in);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  // Composed on CUDA (the CPU kernel fuses it): mine on F.normalize(x).
  if (normalize) {
    return batch_hard_triplet_cuda(std::get<0>(l2_normalize_op(embeddings)), labels_in, margin, metric_name, soft,
                                   block_rows, false);
  }
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
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
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  at::Tensor buffer = at::empty({rows_per_block(block_rows, B), B}, aux.options());
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    at::Tensor block = buffer.narrow(0, 0, rows);
    self_distance_rows_acc_cuda(x, aux, r0, key_metric(metric), block);
    METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_batch_hard_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      batch_hard_kernel<scalar_t, acc_t><<<grid_for(rows, kThreads / 32), kThreads, 0, current_stream()>>>(
          block.const_data_ptr<acc_t>(), metric, r0, rows, labels.const_data_ptr<int64_t>(), B,
          static_cast<acc_t>(margin), soft, losses.mutable_data_ptr<scalar_t>(), positive.mutable_data_ptr<int64_t>(),
          negative.mutable_data_ptr<int64_t>(), dist_ap.mutable_data_ptr<scalar_t>(),
          dist_an.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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

namespace {

void batch_hard_coefficients_cuda(const BatchHardGradInputs& in, BatchHardGradCoefficients& out) {
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

// The gather/scatter through ATen (index_add_: atomics on CUDA, with a
// deterministic path under torch.use_deterministic_algorithms).
at::Tensor batch_hard_assemble_aten(const at::Tensor& x, const at::Tensor& positive, const at::Tensor& negative,
                                    const BatchHardGradCoefficients& c) {
  // Anchors without a triplet point at themselves with zero coefficients, so
  // no index is ever out of range (a foreign index that a capture let
  // through counts as "no triplet", as in batch_hard_anchor_coefficients).
  const int64_t B = x.size(0);
  const at::Tensor self_index = at::arange(B, positive.options());
  const at::Tensor pos = at::where(positive.ge(0).logical_and_(positive.lt(B)), positive, self_index);
  const at::Tensor neg = at::where(negative.ge(0).logical_and_(negative.lt(B)), negative, self_index);
  const at::Tensor x_pos = x.index_select(0, pos);
  const at::Tensor x_neg = x.index_select(0, neg);
  const at::Tensor w_p = c.cross_positive.unsqueeze(1), w_n = c.cross_negative.unsqueeze(1);
  at::Tensor grad = x.mul(c.anchor_self.unsqueeze(1)).sub_(x_pos.mul(w_p)).sub_(x_neg.mul(w_n));
  grad.index_add_(0, pos, x_pos.mul(c.positive_self.unsqueeze(1)).sub_(x.mul(w_p)));
  grad.index_add_(0, neg, x_neg.mul(c.negative_self.unsqueeze(1)).sub_(x.mul(w_n)));
  return grad;
}

at::Tensor batch_hard_triplet_backward_cuda(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                            const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                            const at::Tensor& positive, const at::Tensor& negative,
                                            const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                            c10::string_view metric_name, bool soft, bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  if (normalize) {
    // Composed on CUDA: the backward in y = F.normalize(x) (recomputed: one
    // pass over x), then F.normalize's backward.
    auto [y, norm] = l2_normalize_op(embeddings);
    const at::Tensor grad_y =
        batch_hard_triplet_backward_cuda(grad_losses, grad_dist_ap, grad_dist_an, y, positive, negative, dist_ap,
                                         dist_an, margin, metric_name, soft, false);
    return l2_normalize_backward_op(grad_y, embeddings, norm);
  }
  const Metric metric = check_batch_hard_backward_inputs(grad_losses, grad_dist_ap, grad_dist_an, embeddings, positive,
                                                         negative, dist_ap, dist_an, metric_name, may_sync_now());
  if (embeddings.size(0) == 0) return at::zeros_like(embeddings);
  const at::Tensor x = embeddings.to(acc_dtype(embeddings)).contiguous();
  const BatchHardGradInputs in =
      batch_hard_grad_inputs(grad_losses, grad_dist_ap, grad_dist_an, positive, negative, dist_ap, dist_an,
                             row_aux_acc_cuda(x, metric), margin, metric, soft);
  BatchHardGradCoefficients c = empty_batch_hard_coefficients(x);
  batch_hard_coefficients_cuda(in, c);
  return batch_hard_assemble_aten(x, in.positive, in.negative, c).to(embeddings.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("batch_hard_triplet", &batch_hard_triplet_cuda);
  m.impl("batch_hard_triplet_backward", &batch_hard_triplet_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
