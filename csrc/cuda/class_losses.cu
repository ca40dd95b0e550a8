// Losses with learnable class parameters on CUDA, chunked over classes as on
// CPU (cpu/class_losses.cpp): a cuBLAS tile per chunk (at::mm on the current
// stream; float16/bfloat16 inputs give float32 tiles through mm's out_dtype),
// then an epilogue kernel calling the policies of common/class_losses.h.
// Statistics and gradients accumulate in float32 for float16/bfloat16.
// Labels are never used as an index: a row whose label is outside [0, C)
// never meets its target column and gets a NaN loss (no out-of-bounds read).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

#include "common/class_losses.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

// Tile budget: B × chunk float32 entries in 256 MiB.
constexpr int64_t kCudaClassTileBytes = int64_t{256} << 20;
// proxy_anchor_loss_and_grad keeps the forward's (C, B) tile for the gradient
// up to this many entries (64 MiB in float32), else recomputes it by chunks.
constexpr int64_t kCudaSavedTileEntries = int64_t{1} << 24;

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// out (acc dtype) = a · b, with float32 output for float16/bfloat16 inputs.
void tile_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

template <typename acc_t>
__device__ inline OnlineLse<acc_t> warp_merge(OnlineLse<acc_t> s) {
  for (int offset = 16; offset > 0; offset /= 2) {
    OnlineLse<acc_t> other{__shfl_down_sync(0xffffffff, s.max, offset), __shfl_down_sync(0xffffffff, s.sum, offset)};
    s.merge(other);
  }
  return s;
}

// One warp per row of the (B, n) tile: the chunk's log-sum-exp merged into
// the row's running statistics; the target's cosine recorded where seen.
template <typename acc_t>
__global__ void margin_softmax_forward_kernel(const acc_t* __restrict__ tile, int64_t B, int64_t n, int64_t c0,
                                              const acc_t* __restrict__ inv_norm, const int64_t* __restrict__ labels,
                                              MarginSoftmaxPolicy<acc_t> policy, acc_t* __restrict__ run_max,
                                              acc_t* __restrict__ run_sum, acc_t* __restrict__ target_cos) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  for (int64_t i = blockIdx.x * warps + threadIdx.x / 32; i < B; i += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t t = labels[i] - c0;
    OnlineLse<acc_t> s = OnlineLse<acc_t>::empty();
    for (int64_t j = lane; j < n; j += 32) {
      const acc_t cos = tile[i * n + j] * inv_norm[c0 + j];
      if (j == t) target_cos[i] = cos;
      s.add(policy.logit(cos, j == t));
    }
    s = warp_merge(s);
    if (lane == 0) {
      OnlineLse<acc_t> row{run_max[i], run_sum[i]};
      row.merge(s);
      run_max[i] = row.max;
      run_sum[i] = row.sum;
    }
  }
}

template <typename acc_t>
__global__ void margin_softmax_finish_kernel(int64_t B, const acc_t* __restrict__ run_max,
                                             const acc_t* __restrict__ run_sum, const acc_t* __restrict__ target_cos,
                                             MarginSoftmaxPolicy<acc_t> policy, acc_t* __restrict__ loss,
                                             acc_t* __restrict__ lse) {
  METRICOPS_CUDA_KERNEL_LOOP(i, B) {
    const acc_t value = OnlineLse<acc_t>{run_max[i], run_sum[i]}.value();
    lse[i] = value;
    loss[i] = value - policy.logit(target_cos[i], true);
  }
}

// Cosine in, d(loss)/d(S)/‖w_c‖ out, in place over the (B, n) tile.
template <typename acc_t>
__global__ void margin_softmax_grad_kernel(acc_t* __restrict__ tile, int64_t B, int64_t n, int64_t c0,
                                           const acc_t* __restrict__ inv_norm, const int64_t* __restrict__ labels,
                                           const acc_t* __restrict__ grad, const acc_t* __restrict__ lse,
                                           MarginSoftmaxPolicy<acc_t> policy) {
  METRICOPS_CUDA_KERNEL_LOOP(k, B * n) {
    const int64_t i = k / n, j = k % n;
    const acc_t inv = inv_norm[c0 + j];
    tile[k] = policy.grad(tile[k] * inv, labels[i] - c0 == j, grad[i], lse[i]) * inv;
  }
}

// One warp per class row of the (n, B) tile: its positive and negative terms.
template <typename acc_t>
// inv_x: the embeddings' inverse norms (normalize=True), or nullptr.
__global__ void proxy_anchor_forward_kernel(const acc_t* __restrict__ tile, int64_t n, int64_t B, int64_t c0,
                                            const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ inv_x,
                                            const int64_t* __restrict__ labels, ProxyAnchorPolicy<acc_t> policy,
                                            acc_t* __restrict__ pos, acc_t* __restrict__ neg) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / 32; r < n; r += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t c = c0 + r;
    OnlineLse<acc_t> p = OnlineLse<acc_t>::empty(), q = OnlineLse<acc_t>::empty();
    for (int64_t i = lane; i < B; i += 32) {
      const acc_t cos = tile[r * B + i] * inv_norm[c] * (inv_x ? inv_x[i] : acc_t(1));
      if (labels[i] == c) {
        p.add(policy.pos_exponent(cos));
      } else {
        q.add(policy.neg_exponent(cos));
      }
    }
    p = warp_merge(p);
    q = warp_merge(q);
    if (lane == 0) {
      const OnlineLse<acc_t> one{acc_t(0), acc_t(1)};  // the "1 +": e^0, once per class
      p.merge(one);
      q.merge(one);
      pos[c] = p.value();
      neg[c] = q.value();
    }
  }
}

// d(loss)/d(dot) of an (n, B) chunk: from `dots` (the recomputed chunk, then
// dots == tile, or the forward's saved tile) into `tile`: may alias.
template <typename acc_t>
__global__ void proxy_anchor_grad_kernel(const acc_t* dots, acc_t* tile, int64_t n, int64_t B, int64_t c0,
                                         const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ inv_x,
                                         const int64_t* __restrict__ labels, const acc_t* __restrict__ grad_pos,
                                         const acc_t* __restrict__ grad_neg, const acc_t* __restrict__ pos,
                                         const acc_t* __restrict__ neg, ProxyAnchorPolicy<acc_t> policy) {
  METRICOPS_CUDA_KERNEL_LOOP(k, n * B) {
    const int64_t c = c0 + k / B, i = k % B;
    const acc_t inv = inv_norm[c] * (inv_x ? inv_x[i] : acc_t(1));
    tile[k] = policy.grad(dots[k] * inv, labels[i] == c, grad_pos[c], grad_neg[c], pos[c], neg[c]) * inv;
  }
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_loss_cuda(const at::Tensor& embeddings, const at::Tensor& labels_in,
                                                            const at::Tensor& weight, c10::string_view kind_name,
                                                            double margin, double scale, int64_t class_chunk) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const MarginKind kind = parse_margin_kind(kind_name);
  check_class_loss_inputs(embeddings, labels_in, weight, "weight");
  check_margin_softmax_args(margin, scale);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = weight.size(0);
  const auto acc = acc_type(x);
  const auto opts = x.options().dtype(acc);
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  if (B == 0) return {loss, lse};
  const int64_t chunk = class_chunk_size(class_chunk, B, C, at::elementSize(acc), kCudaClassTileBytes);
  const at::Tensor inv_norm = folded_norm_factors(weight, acc).first;
  at::Tensor run_max = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({B}, opts);
  at::Tensor target_cos = at::full({B}, std::numeric_limits<double>::quiet_NaN(), opts);  // NaN until found
  at::Tensor buffer = at::empty({B * chunk}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "metricops_margin_softmax_loss_cuda", [&] {
    const auto policy = MarginSoftmaxPolicy<scalar_t>::make(kind, margin, scale);
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      at::Tensor tile = tile_view(buffer, B, n);
      tile_mm(tile, x, weight.narrow(0, c0, n).t());
      margin_softmax_forward_kernel<scalar_t><<<grid_for(B, kThreads / 32), kThreads, 0, current_stream()>>>(
          tile.const_data_ptr<scalar_t>(), B, n, c0, inv_norm.const_data_ptr<scalar_t>(),
          labels.const_data_ptr<int64_t>(), policy, run_max.mutable_data_ptr<scalar_t>(),
          run_sum.mutable_data_ptr<scalar_t>(), target_cos.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    margin_softmax_finish_kernel<scalar_t><<<grid_for(B), kThreads, 0, current_stream()>>>(
        B, run_max.const_data_ptr<scalar_t>(), run_sum.const_data_ptr<scalar_t>(),
        target_cos.const_data_ptr<scalar_t>(), policy, loss.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels_in, const at::Tensor& weight,
    const at::Tensor& lse_in, c10::string_view kind_name, double margin, double scale, int64_t class_chunk) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const MarginKind kind = parse_margin_kind(kind_name);
  check_class_loss_inputs(embeddings, labels_in, weight, "weight");
  check_margin_softmax_args(margin, scale);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = weight.size(0);
  check_margin_softmax_backward_inputs(grad_loss, lse_in, B);
  const auto acc = acc_type(x);
  const auto opts = x.options().dtype(acc);
  at::Tensor grad_w = at::empty({C, x.size(1)}, x.options());
  if (B == 0) return {at::zeros_like(x), grad_w.zero_()};
  const at::Tensor g = grad_loss.to(acc).contiguous(), lse = lse_in.to(acc).contiguous();
  const at::Tensor x_acc = x.to(acc);
  at::Tensor grad_x = at::zeros({B, x.size(1)}, opts);
  const int64_t chunk = class_chunk_size(class_chunk, B, C, at::elementSize(acc), kCudaClassTileBytes);
  const auto factors = folded_norm_factors(weight, acc);
  at::Tensor buffer = at::empty({B * chunk}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "metricops_margin_softmax_loss_backward_cuda", [&] {
    const auto policy = MarginSoftmaxPolicy<scalar_t>::make(kind, margin, scale);
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor w_chunk = weight.narrow(0, c0, n);
      at::Tensor tile = tile_view(buffer, B, n);
      tile_mm(tile, x, w_chunk.t());
      margin_softmax_grad_kernel<scalar_t><<<grid_for(B * n), kThreads, 0, current_stream()>>>(
          tile.mutable_data_ptr<scalar_t>(), B, n, c0, factors.first.const_data_ptr<scalar_t>(),
          labels.const_data_ptr<int64_t>(), g.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), policy);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor w_acc = w_chunk.to(acc);
      grad_x.addmm_(tile, w_acc);
      at::Tensor grad_chunk = at::mm(tile.t(), x_acc);
      project_folded_norm_grad(grad_chunk, w_acc, factors.second.narrow(0, c0, n));
      grad_w.narrow(0, c0, n).copy_(grad_chunk);
    }
  });
  return {grad_x.to(x.scalar_type()), grad_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_anchor_loss_cuda(const at::Tensor& embeddings,
                                                                      const at::Tensor& labels_in,
                                                                      const at::Tensor& proxies, double margin,
                                                                      double alpha, int64_t class_chunk, bool save_tile,
                                                                      bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  check_proxy_anchor_args(margin, alpha);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = proxies.size(0);
  const auto acc = acc_type(x);
  const auto opts = x.options().dtype(acc);
  at::Tensor pos = at::zeros({C}, opts), neg = at::zeros({C}, opts);
  // save_tile: one chunk of all C classes, written straight into the returned tile
  at::Tensor saved = at::empty({save_tile ? C : 0, B}, opts);
  if (B == 0) return {pos, neg, saved};  // log(1 + empty sum) = 0
  const int64_t chunk = save_tile ? C : class_chunk_size(class_chunk, B, C, at::elementSize(acc), kCudaClassTileBytes);
  const at::Tensor inv_norm = folded_norm_factors(proxies, acc).first;
  const at::Tensor x_inv_norm = normalize ? folded_norm_factors(x, acc).first : at::Tensor();
  at::Tensor buffer = save_tile ? saved.view({-1}) : at::empty({B * chunk}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "metricops_proxy_anchor_loss_cuda", [&] {
    const auto policy = ProxyAnchorPolicy<scalar_t>::make(margin, alpha);
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      at::Tensor tile = tile_view(buffer, n, B);
      tile_mm(tile, proxies.narrow(0, c0, n), x.t());
      proxy_anchor_forward_kernel<scalar_t><<<grid_for(n, kThreads / 32), kThreads, 0, current_stream()>>>(
          tile.const_data_ptr<scalar_t>(), n, B, c0, inv_norm.const_data_ptr<scalar_t>(),
          normalize ? x_inv_norm.const_data_ptr<scalar_t>() : nullptr, labels.const_data_ptr<int64_t>(), policy,
          pos.mutable_data_ptr<scalar_t>(), neg.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {pos, neg, saved};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_loss_backward_cuda(
    const at::Tensor& grad_pos_in, const at::Tensor& grad_neg_in, const at::Tensor& embeddings,
    const at::Tensor& labels_in, const at::Tensor& proxies, const at::Tensor& pos_in, const at::Tensor& neg_in,
    const at::Tensor& saved_tile, double margin, double alpha, int64_t class_chunk, bool normalize) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  check_proxy_anchor_args(margin, alpha);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = proxies.size(0);
  check_proxy_anchor_backward_inputs({&grad_pos_in, &grad_neg_in, &pos_in, &neg_in}, C);
  const auto acc = acc_type(x);
  const bool use_saved = check_proxy_anchor_saved_tile(saved_tile, x, C, acc);
  const auto opts = x.options().dtype(acc);
  at::Tensor grad_p = at::empty({C, x.size(1)}, x.options());
  if (B == 0) return {at::zeros_like(x), grad_p.zero_()};
  const at::Tensor g_pos = grad_pos_in.to(acc).contiguous(), g_neg = grad_neg_in.to(acc).contiguous();
  const at::Tensor pos = pos_in.to(acc).contiguous(), neg = neg_in.to(acc).contiguous();
  const at::Tensor saved = use_saved ? saved_tile.contiguous() : saved_tile;
  const at::Tensor x_acc = x.to(acc);
  at::Tensor grad_x = at::zeros({B, x.size(1)}, opts);
  const int64_t chunk = class_chunk_size(class_chunk, B, C, at::elementSize(acc), kCudaClassTileBytes);
  const auto factors = folded_norm_factors(proxies, acc);
  const auto x_factors = normalize ? folded_norm_factors(x, acc) : std::pair<at::Tensor, at::Tensor>();
  at::Tensor buffer = at::empty({B * chunk}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "metricops_proxy_anchor_loss_backward_cuda", [&] {
    const auto policy = ProxyAnchorPolicy<scalar_t>::make(margin, alpha);
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor p_chunk = proxies.narrow(0, c0, n);
      at::Tensor tile = tile_view(buffer, n, B);
      if (!use_saved) tile_mm(tile, p_chunk, x.t());
      scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
      const scalar_t* dots = use_saved ? saved.const_data_ptr<scalar_t>() + c0 * B : tp;
      proxy_anchor_grad_kernel<scalar_t><<<grid_for(n * B), kThreads, 0, current_stream()>>>(
          dots, tp, n, B, c0, factors.first.const_data_ptr<scalar_t>(),
          normalize ? x_factors.first.const_data_ptr<scalar_t>() : nullptr, labels.const_data_ptr<int64_t>(),
          g_pos.const_data_ptr<scalar_t>(), g_neg.const_data_ptr<scalar_t>(), pos.const_data_ptr<scalar_t>(),
          neg.const_data_ptr<scalar_t>(), policy);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor p_acc = p_chunk.to(acc);
      at::Tensor grad_chunk = at::mm(tile, x_acc);
      project_folded_norm_grad(grad_chunk, p_acc, factors.second.narrow(0, c0, n));
      grad_p.narrow(0, c0, n).copy_(grad_chunk);
      grad_x.addmm_(tile.t(), p_acc);
    }
  });
  if (normalize) project_folded_norm_grad(grad_x, x_acc, x_factors.second);
  return {grad_x.to(x.scalar_type()), grad_p};
}

// ProxyAnchor's reduced loss and the gradients asked for, for an upstream
// gradient of 1, as on CPU. Here the two ops above run back to back (the
// forward keeping its tile when C·B is small): on a GPU the tile's round trip
// through memory is cheap next to the GEMMs, and the kernels stay the tested
// ones. Everything stays on the device: no host sync for the class count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_anchor_loss_and_grad_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels_in, const at::Tensor& proxies, double margin, double alpha,
    int64_t class_chunk, bool normalize, bool want_grad_x, bool want_grad_p) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  const int64_t B = embeddings.size(0), C = proxies.size(0), D = embeddings.size(1);
  const bool with_grad = want_grad_x || want_grad_p;
  const bool save_tile = with_grad && class_chunk == 0 && B * C <= kCudaSavedTileEntries;
  auto [pos, neg, tile] =
      proxy_anchor_loss_cuda(embeddings, labels_in, proxies, margin, alpha, class_chunk, save_tile, normalize);
  // present classes: an out-of-range label (no positive anywhere) lands in the extra slot C
  const at::Tensor labels = labels_in.to(at::kLong);
  const at::Tensor slot = labels.masked_fill(labels.lt(0).logical_or(labels.ge(C)), C);
  const at::Tensor present = at::zeros({C + 1}, pos.options()).index_fill_(0, slot, 1).narrow(0, 0, C);
  const at::Tensor g_pos = present.sum().clamp_min(1).reciprocal();
  const at::Tensor loss = pos.sum().mul(g_pos).add(neg.sum().div(static_cast<double>(C)));
  if (!with_grad) {
    return {loss, pos, neg, embeddings.new_empty({0, D}), embeddings.new_empty({0, D})};
  }
  const at::Tensor g_neg = at::full({C}, 1.0 / static_cast<double>(C), pos.options());
  auto [grad_x, grad_p] = proxy_anchor_loss_backward_cuda(g_pos.expand({C}), g_neg, embeddings, labels_in, proxies, pos,
                                                          neg, tile, margin, alpha, class_chunk, normalize);
  // the backward op computes both; one not asked for is returned empty, as the schema says
  return {loss, pos, neg, want_grad_x ? grad_x : embeddings.new_empty({0, D}),
          want_grad_p ? grad_p : embeddings.new_empty({0, D})};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("margin_softmax_loss", &margin_softmax_loss_cuda);
  m.impl("margin_softmax_loss_backward", &margin_softmax_loss_backward_cuda);
  m.impl("proxy_anchor_loss", &proxy_anchor_loss_cuda);
  m.impl("proxy_anchor_loss_backward", &proxy_anchor_loss_backward_cuda);
  m.impl("proxy_anchor_loss_and_grad", &proxy_anchor_loss_and_grad_cuda);
}

}  // namespace cuda
}  // namespace metricops
