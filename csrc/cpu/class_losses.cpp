// Losses with learnable class parameters on CPU, chunked over classes: each
// chunk is one GEMM tile (at::mm, B × chunk) and an epilogue calling the
// policies of common/class_losses.h. Nothing B×C is held: extra memory is
// O(B·chunk + B + C) beyond the outputs. The backward recomputes each tile
// (ProxyAnchor: or reads the forward's saved one, when the caller asked for
// it), turns it into d(loss)/d(S), and applies it with two GEMMs
// (dX += G·Wc, dWc = Gᵀ·X), then projects dWc through the rows' normalization.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/class_losses.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// One B × chunk tile (or chunk × B): 8 MiB stays in L2/L3-sized pieces per
// row and keeps the at::mm calls large enough for BLAS.
constexpr int64_t kCpuClassTileBytes = int64_t{8} << 20;

void check_labels_in_range(const at::Tensor& labels, int64_t C) {
  const int64_t B = labels.size(0);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = lab[i];
    TORCH_CHECK_VALUE(y >= 0 && y < C, "labels must be class indices in [0, C) with C=", C, " (the rows of ",
                      "the class parameters), got ", y, " at position ", i);
  }
}

// The row loops below vectorise only if GCC may turn their selects into
// blends: floating-point compares may not trap here (as in lse_stats.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// Max and sum of exponentials relative to it, of row[0..n), in kSimdLanes
// lanes (a single running max or sum is a serial chain the compiler does not
// vectorise). NaN needs no flag: max() skips it, but its exp lands in the sum.
template <typename scalar_t>
METRICOPS_LSE_INLINE OnlineLse<scalar_t> row_lse(const scalar_t* row, int64_t n) {
  constexpr int64_t L = kSimdLanes;
  scalar_t lanes[L];
  for (int64_t l = 0; l < L; ++l) lanes[l] = static_cast<scalar_t>(-INFINITY);
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] = row[j + l] > lanes[l] ? row[j + l] : lanes[l];
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] = row[j] > lanes[l] ? row[j] : lanes[l];
  scalar_t m = static_cast<scalar_t>(-INFINITY);
  for (int64_t l = 0; l < L; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (int64_t l = 0; l < L; ++l) lanes[l] = 0;
  for (j = 0; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] += lse::lse_exp(row[j + l] - m);
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] += lse::lse_exp(row[j] - m);
  scalar_t sum = 0;
  for (int64_t l = 0; l < L; ++l) sum += lanes[l];
  return {m, sum};
}

// Row i of a margin-softmax forward tile (columns c0.., `inv` and the target
// index t relative to c0): cosines in, logits out in place; returns the
// chunk's log-sum-exp statistics and records the target's cosine when t is
// in the chunk. Cloned per ISA (cpu/simd.h).
template <typename scalar_t>
METRICOPS_SIMD_CLONES OnlineLse<scalar_t> margin_row_forward(const MarginSoftmaxPolicy<scalar_t>& policy, scalar_t* row,
                                                             const scalar_t* inv, int64_t n, int64_t t,
                                                             scalar_t& target_cos) {
  const bool has_target = t >= 0 && t < n;
  if (has_target) target_cos = row[t] * inv[t];
  for (int64_t j = 0; j < n; ++j) row[j] = policy.logit(row[j] * inv[j], false);
  if (has_target) row[t] = policy.logit(target_cos, true);
  return row_lse(row, n);
}

// Row i of a margin-softmax backward tile: cosine·‖w_c‖ in, d(loss)/d(S)/‖w_c‖
// out (the GEMMs then take the raw rows of w).
template <typename scalar_t>
METRICOPS_SIMD_CLONES void margin_row_backward(const MarginSoftmaxPolicy<scalar_t>& policy, scalar_t* row,
                                               const scalar_t* inv, int64_t n, int64_t t, scalar_t g, scalar_t lse) {
  const bool has_target = t >= 0 && t < n;
  const scalar_t target_cos = has_target ? row[t] * inv[t] : scalar_t(0);
  for (int64_t j = 0; j < n; ++j) row[j] = policy.grad(row[j] * inv[j], false, g, lse) * inv[j];
  if (has_target) row[t] = policy.grad(target_cos, true, g, lse) * inv[t];
}

// Class c's row of a ProxyAnchor forward tile (its dot products with every
// embedding, read only: the tile may be the saved output): log(1 + Σ e^z)
// over its positives and over its negatives. Each side's max starts at the
// "1 +" term's exponent 0; NaN reaches the sums through exp. The exponents are
// recomputed in the second pass (an FMA) rather than stored.
// inv_x: the embeddings' inverse norms (normalize=True), or nullptr.
template <typename scalar_t>
METRICOPS_SIMD_CLONES void proxy_row_forward(const ProxyAnchorPolicy<scalar_t>& policy, const scalar_t* row,
                                             scalar_t inv, const scalar_t* inv_x, const int64_t* labels, int64_t c,
                                             int64_t B, scalar_t& pos, scalar_t& neg) {
  constexpr int64_t L = kSimdLanes;
  scalar_t lane_p[L], lane_n[L];
  for (int64_t l = 0; l < L; ++l) lane_p[l] = lane_n[l] = scalar_t(0);
  auto cosine = [&](int64_t i) { return inv_x ? row[i] * inv * inv_x[i] : row[i] * inv; };
  auto max_step = [&](int64_t i, int64_t l) {
    const bool is_pos = labels[i] == c;
    const scalar_t z = policy.exponent(cosine(i), is_pos);
    lane_p[l] = is_pos && z > lane_p[l] ? z : lane_p[l];
    lane_n[l] = !is_pos && z > lane_n[l] ? z : lane_n[l];
  };
  int64_t i = 0;
  for (; i + L <= B; i += L)
    for (int64_t l = 0; l < L; ++l) max_step(i + l, l);
  for (int64_t l = 0; i < B; ++i, ++l) max_step(i, l);
  scalar_t max_p = 0, max_n = 0;
  for (int64_t l = 0; l < L; ++l) {
    max_p = lane_p[l] > max_p ? lane_p[l] : max_p;
    max_n = lane_n[l] > max_n ? lane_n[l] : max_n;
    lane_p[l] = lane_n[l] = scalar_t(0);
  }
  auto sum_step = [&](int64_t i, int64_t l) {
    const bool is_pos = labels[i] == c;
    const scalar_t z = policy.exponent(cosine(i), is_pos);
    const scalar_t e = lse::lse_exp(z - (is_pos ? max_p : max_n));
    lane_p[l] += is_pos ? e : scalar_t(0);
    lane_n[l] += is_pos ? scalar_t(0) : e;
  };
  for (i = 0; i + L <= B; i += L)
    for (int64_t l = 0; l < L; ++l) sum_step(i + l, l);
  for (int64_t l = 0; i < B; ++i, ++l) sum_step(i, l);
  scalar_t sum_p = std::exp(-max_p), sum_n = std::exp(-max_n);  // the "1 +" terms
  for (int64_t l = 0; l < L; ++l) sum_p += lane_p[l], sum_n += lane_n[l];
  pos = OnlineLse<scalar_t>{max_p, sum_p}.value();
  neg = OnlineLse<scalar_t>{max_n, sum_n}.value();
}

// d(loss)/d(dot) of class c's row: from `dots` (the recomputed chunk, then
// out == dots, or the forward's saved tile) into `out`.
// With inv_x (normalize=True) each entry's scale is inv · inv_x[i], both ways.
template <typename scalar_t>
METRICOPS_SIMD_CLONES void proxy_row_backward(const ProxyAnchorPolicy<scalar_t>& policy, const scalar_t* dots,
                                              scalar_t* out, scalar_t inv, const scalar_t* inv_x, const int64_t* labels,
                                              int64_t c, int64_t B, scalar_t g_pos, scalar_t g_neg, scalar_t pos,
                                              scalar_t neg) {
  if (inv_x) {
    for (int64_t i = 0; i < B; ++i) {
      const scalar_t scale = inv * inv_x[i];
      out[i] = policy.grad(dots[i] * scale, labels[i] == c, g_pos, g_neg, pos, neg) * scale;
    }
  } else {
    for (int64_t i = 0; i < B; ++i) out[i] = policy.grad(dots[i] * inv, labels[i] == c, g_pos, g_neg, pos, neg) * inv;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

std::tuple<at::Tensor, at::Tensor> margin_softmax_loss_cpu(const at::Tensor& embeddings, const at::Tensor& labels_in,
                                                           const at::Tensor& weight, c10::string_view kind_name,
                                                           double margin, double scale, int64_t class_chunk) {
  const MarginKind kind = parse_margin_kind(kind_name);
  check_class_loss_inputs(embeddings, labels_in, weight, "weight");
  check_margin_softmax_args(margin, scale);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = weight.size(0);
  check_labels_in_range(labels, C);
  at::Tensor loss = at::empty({B}, x.options());
  at::Tensor lse = at::empty({B}, x.options());
  if (B == 0) return {loss, lse};
  const int64_t chunk = class_chunk_size(class_chunk, B, C, x.element_size(), kCpuClassTileBytes);
  const at::Tensor inv_norm = folded_norm_factors(weight, x.scalar_type()).first;
  at::Tensor buffer = at::empty({B * chunk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_margin_softmax_loss_cpu", [&] {
    using Lse = OnlineLse<scalar_t>;
    const auto policy = MarginSoftmaxPolicy<scalar_t>::make(kind, margin, scale);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* inv = inv_norm.const_data_ptr<scalar_t>();
    std::vector<Lse> stats(B, Lse::empty());
    std::vector<scalar_t> target_cos(B, scalar_t(0));
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      at::Tensor tile = tile_view(buffer, B, n);
      at::mm_out(tile, x, weight.narrow(0, c0, n).t());
      scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          stats[i].merge(margin_row_forward(policy, tp + i * n, inv + c0, n, lab[i] - c0, target_cos[i]));
        }
      });
    }
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    scalar_t* sp = lse.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      sp[i] = stats[i].value();
      lp[i] = sp[i] - policy.logit(target_cos[i], true);
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels_in, const at::Tensor& weight,
    const at::Tensor& lse_in, c10::string_view kind_name, double margin, double scale, int64_t class_chunk) {
  const MarginKind kind = parse_margin_kind(kind_name);
  check_class_loss_inputs(embeddings, labels_in, weight, "weight");
  check_margin_softmax_args(margin, scale);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = weight.size(0);
  check_margin_softmax_backward_inputs(grad_loss, lse_in, B);
  const at::Tensor g = grad_loss.to(x.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::zeros_like(x);
  at::Tensor grad_w = at::empty({C, x.size(1)}, x.options());
  if (B == 0) return {grad_x, grad_w.zero_()};
  check_labels_in_range(labels, C);
  const int64_t chunk = class_chunk_size(class_chunk, B, C, x.element_size(), kCpuClassTileBytes);
  const auto factors = folded_norm_factors(weight, x.scalar_type());
  at::Tensor buffer = at::empty({B * chunk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_margin_softmax_loss_backward_cpu", [&] {
    const auto policy = MarginSoftmaxPolicy<scalar_t>::make(kind, margin, scale);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* inv = factors.first.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* lp = lse.const_data_ptr<scalar_t>();
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor w_chunk = weight.narrow(0, c0, n);
      at::Tensor tile = tile_view(buffer, B, n);
      at::mm_out(tile, x, w_chunk.t());
      scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          margin_row_backward(policy, tp + i * n, inv + c0, n, lab[i] - c0, gp[i], lp[i]);
        }
      });
      grad_x.addmm_(tile, w_chunk);
      at::Tensor grad_chunk = grad_w.narrow(0, c0, n);
      at::mm_out(grad_chunk, tile.t(), x);
      project_folded_norm_grad(grad_chunk, w_chunk, factors.second.narrow(0, c0, n));
    }
  });
  return {grad_x, grad_w};
}

// ProxyAnchor's forward over class chunks, shared by both ops: one (n × B)
// GEMM tile per chunk (classes × embeddings: a class's row holds all of its
// terms), each row reduced to its two terms. With `grad` (the upstream
// gradients {g_pos, g_neg} of every class's terms), each row's derivatives
// are then written over it while it is in cache, and on_tile(tile, c0, n)
// applies them.
template <typename scalar_t, typename OnTile>
void proxy_anchor_chunks(const ProxyAnchorPolicy<scalar_t>& policy, const at::Tensor& x, const at::Tensor& proxies,
                         const int64_t* lab, const scalar_t* inv, const scalar_t* inv_x, at::Tensor& buffer,
                         int64_t chunk, scalar_t* pp, scalar_t* np, const scalar_t* grad, const OnTile& on_tile) {
  const int64_t B = x.size(0), C = proxies.size(0);
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t n = std::min(chunk, C - c0);
    at::Tensor tile = tile_view(buffer, n, B);
    at::mm_out(tile, proxies.narrow(0, c0, n), x.t());
    scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(B, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = c0 + r;
        proxy_row_forward(policy, tp + r * B, inv[c], inv_x, lab, c, B, pp[c], np[c]);
        if (grad)
          proxy_row_backward(policy, tp + r * B, tp + r * B, inv[c], inv_x, lab, c, B, grad[0], grad[1], pp[c], np[c]);
      }
    });
    on_tile(tile, c0, n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_anchor_loss_cpu(const at::Tensor& embeddings,
                                                                     const at::Tensor& labels_in,
                                                                     const at::Tensor& proxies, double margin,
                                                                     double alpha, int64_t class_chunk, bool save_tile,
                                                                     bool normalize) {
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  check_proxy_anchor_args(margin, alpha);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = proxies.size(0);
  check_labels_in_range(labels, C);
  at::Tensor pos = at::empty({C}, x.options());
  at::Tensor neg = at::empty({C}, x.options());
  // save_tile: one chunk of all C classes, written straight into the returned tile
  const int64_t chunk = save_tile ? C : class_chunk_size(class_chunk, B, C, x.element_size(), kCpuClassTileBytes);
  const at::Tensor inv_norm = folded_norm_factors(proxies, x.scalar_type()).first;
  const at::Tensor x_inv_norm = normalize ? folded_norm_factors(x, x.scalar_type()).first : at::Tensor();
  at::Tensor saved = at::empty({save_tile ? C : 0, B}, x.options());
  at::Tensor buffer = save_tile ? saved.view({-1}) : at::empty({std::max<int64_t>(B, 1) * chunk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_proxy_anchor_loss_cpu", [&] {
    const auto policy = ProxyAnchorPolicy<scalar_t>::make(margin, alpha);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* inv = inv_norm.const_data_ptr<scalar_t>();
    const scalar_t* inv_x = normalize ? x_inv_norm.const_data_ptr<scalar_t>() : nullptr;
    proxy_anchor_chunks<scalar_t>(policy, x, proxies, lab, inv, inv_x, buffer, chunk, pos.mutable_data_ptr<scalar_t>(),
                                  neg.mutable_data_ptr<scalar_t>(), nullptr,
                                  [](const at::Tensor&, int64_t, int64_t) {});
  });
  return {pos, neg, saved};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_loss_backward_cpu(
    const at::Tensor& grad_pos_in, const at::Tensor& grad_neg_in, const at::Tensor& embeddings,
    const at::Tensor& labels_in, const at::Tensor& proxies, const at::Tensor& pos_in, const at::Tensor& neg_in,
    const at::Tensor& saved_tile, double margin, double alpha, int64_t class_chunk, bool normalize) {
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  check_proxy_anchor_args(margin, alpha);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = proxies.size(0);
  check_proxy_anchor_backward_inputs({&grad_pos_in, &grad_neg_in, &pos_in, &neg_in}, C);
  const auto acc = x.scalar_type();
  const bool use_saved = check_proxy_anchor_saved_tile(saved_tile, x, C, acc);
  const at::Tensor g_pos = grad_pos_in.to(acc).contiguous(), g_neg = grad_neg_in.to(acc).contiguous();
  const at::Tensor pos = pos_in.to(acc).contiguous(), neg = neg_in.to(acc).contiguous();
  at::Tensor grad_x = at::zeros_like(x);
  at::Tensor grad_p = at::empty({C, x.size(1)}, x.options());
  if (B == 0) return {grad_x, grad_p.zero_()};
  check_labels_in_range(labels, C);
  const int64_t chunk = class_chunk_size(class_chunk, B, C, x.element_size(), kCpuClassTileBytes);
  const auto factors = folded_norm_factors(proxies, acc);
  const auto x_factors = normalize ? folded_norm_factors(x, acc) : std::pair<at::Tensor, at::Tensor>();
  const at::Tensor saved = use_saved ? saved_tile.contiguous() : saved_tile;
  at::Tensor buffer = at::empty({B * chunk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "metricops_proxy_anchor_loss_backward_cpu", [&] {
    const auto policy = ProxyAnchorPolicy<scalar_t>::make(margin, alpha);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* inv = factors.first.const_data_ptr<scalar_t>();
    const scalar_t* inv_x = normalize ? x_factors.first.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *gpp = g_pos.const_data_ptr<scalar_t>(), *gnp = g_neg.const_data_ptr<scalar_t>();
    const scalar_t *pp = pos.const_data_ptr<scalar_t>(), *np = neg.const_data_ptr<scalar_t>();
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor p_chunk = proxies.narrow(0, c0, n);
      at::Tensor tile = tile_view(buffer, n, B);
      if (!use_saved) at::mm_out(tile, p_chunk, x.t());
      scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
      const scalar_t* dots = use_saved ? saved.const_data_ptr<scalar_t>() + c0 * B : tp;
      at::parallel_for(0, n, std::max<int64_t>(1, 4096 / B), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t c = c0 + r;
          proxy_row_backward(policy, dots + r * B, tp + r * B, inv[c], inv_x, lab, c, B, gpp[c], gnp[c], pp[c], np[c]);
        }
      });
      at::Tensor grad_chunk = grad_p.narrow(0, c0, n);
      at::mm_out(grad_chunk, tile, x);
      project_folded_norm_grad(grad_chunk, p_chunk, factors.second.narrow(0, c0, n));
      grad_x.addmm_(tile.t(), p_chunk);
    }
  });
  if (normalize) project_folded_norm_grad(grad_x, x, x_factors.second);
  return {grad_x, grad_p};
}

// Number of classes holding at least one label (the positive term's divisor);
// labels already checked to be in [0, C).
int64_t count_present_classes(const int64_t* labels, int64_t B, int64_t C) {
  std::vector<char> seen(C, 0);
  int64_t count = 0;
  for (int64_t i = 0; i < B; ++i) {
    count += seen[labels[i]] == 0;
    seen[labels[i]] = 1;
  }
  return count;
}

// ProxyAnchor's reduced loss Σ pos/max(|C⁺|, 1) + Σ neg/C and the gradients
// asked for, for an upstream gradient of 1. A chunk's rows hold all B terms
// of their classes, so each row's derivatives are known as soon as its two
// terms are: they are written over the dot products while the row is still
// in cache, and the chunk's two GEMMs follow. Three GEMMs in all (the
// forward+backward pair takes four, or three and a kept (C, B) tile), and
// the backward only scales the result.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_anchor_loss_and_grad_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels_in, const at::Tensor& proxies, double margin, double alpha,
    int64_t class_chunk, bool normalize, bool want_grad_x, bool want_grad_p) {
  check_class_loss_inputs(embeddings, labels_in, proxies, "proxies");
  check_proxy_anchor_args(margin, alpha);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = proxies.size(0), D = x.size(1);
  check_labels_in_range(labels, C);
  at::Tensor pos = at::empty({C}, x.options());
  at::Tensor neg = at::empty({C}, x.options());
  at::Tensor loss = at::empty({}, x.options());
  at::Tensor grad_x = at::zeros({want_grad_x ? B : 0, D}, x.options());
  at::Tensor grad_p = at::zeros({want_grad_p ? C : 0, D}, x.options());
  const int64_t chunk = class_chunk_size(class_chunk, B, C, x.element_size(), kCpuClassTileBytes);
  const auto factors = folded_norm_factors(proxies, x.scalar_type());
  const auto x_factors = normalize ? folded_norm_factors(x, x.scalar_type()) : std::pair<at::Tensor, at::Tensor>();
  at::Tensor buffer = at::empty({std::max<int64_t>(B, 1) * chunk}, x.options());
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t num_present = count_present_classes(lab, B, C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_proxy_anchor_loss_and_grad_cpu", [&] {
    const auto policy = ProxyAnchorPolicy<scalar_t>::make(margin, alpha);
    const scalar_t* inv = factors.first.const_data_ptr<scalar_t>();
    const scalar_t* inv_x = normalize ? x_factors.first.const_data_ptr<scalar_t>() : nullptr;
    // both terms of every class weigh 1/|C⁺| and 1/C in the loss
    const scalar_t weights[2] = {scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(num_present, 1)),
                                 scalar_t(1) / static_cast<scalar_t>(C)};
    scalar_t* pp = pos.mutable_data_ptr<scalar_t>();
    scalar_t* np = neg.mutable_data_ptr<scalar_t>();
    auto apply_gradient = [&](const at::Tensor& tile, int64_t c0, int64_t n) {
      if (B == 0) return;
      const at::Tensor p_chunk = proxies.narrow(0, c0, n);
      if (want_grad_p) {
        at::Tensor grad_chunk = grad_p.narrow(0, c0, n);
        at::mm_out(grad_chunk, tile, x);
        project_folded_norm_grad(grad_chunk, p_chunk, factors.second.narrow(0, c0, n));
      }
      if (want_grad_x) grad_x.addmm_(tile.t(), p_chunk);
    };
    proxy_anchor_chunks<scalar_t>(policy, x, proxies, lab, inv, inv_x, buffer, chunk, pp, np,
                                  want_grad_x || want_grad_p ? weights : nullptr, apply_gradient);
    // the per-class terms summed in double: the result does not depend on how the classes were chunked
    double sum_pos = 0, sum_neg = 0;
    for (int64_t c = 0; c < C; ++c) sum_pos += pp[c], sum_neg += np[c];
    loss.fill_(sum_pos / static_cast<double>(std::max<int64_t>(num_present, 1)) + sum_neg / static_cast<double>(C));
  });
  if (want_grad_x && normalize) project_folded_norm_grad(grad_x, x, x_factors.second);
  return {loss, pos, neg, grad_x, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("margin_softmax_loss", &margin_softmax_loss_cpu);
  m.impl("margin_softmax_loss_backward", &margin_softmax_loss_backward_cpu);
  m.impl("proxy_anchor_loss", &proxy_anchor_loss_cpu);
  m.impl("proxy_anchor_loss_backward", &proxy_anchor_loss_backward_cpu);
  m.impl("proxy_anchor_loss_and_grad", &proxy_anchor_loss_and_grad_cpu);
}

}  // namespace cpu
}  // namespace metricops
