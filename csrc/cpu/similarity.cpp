// CPU kernels of the log-sum-exp engine's ops (metricops::lse_stats and its
// backward): the similarity losses of metricops/similarity.py are built on
// their per-row statistics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/normalize.h"
#include "common/similarity_losses.h"
#include "cpu/lse_engine.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

using namespace ::metricops::lse;

struct Prepared {
  at::Tensor x, rk, ck, params_t;  // params_t: row_params transposed, (P, B) contiguous
  c10::optional<at::Tensor> y;
  // normalize=True only: (1/max(||row||, eps), projection factor) per row (common/normalize.h)
  std::pair<at::Tensor, at::Tensor> x_norms, y_norms;
  at::Tensor x_offsets, y_offsets;  // a distance policy: Problem::row_offset/col_offset
};

template <typename acc_t>
lse_engine::Problem<acc_t> make_problem(const Prepared& in, bool col_stats, int64_t block_rows, int64_t block_cols) {
  const at::Tensor &x = in.x, &rk = in.rk, &ck = in.ck, &params_t = in.params_t;
  const c10::optional<at::Tensor>& y = in.y;
  lse_engine::Problem<acc_t> pr;
  pr.x = x;
  pr.self = !y.has_value();
  pr.y = pr.self ? x : *y;
  pr.row_keys = rk.const_data_ptr<int64_t>();
  pr.col_keys = ck.const_data_ptr<int64_t>();
  pr.params_t = params_t.defined() ? params_t.const_data_ptr<acc_t>() : nullptr;
  pr.num_params = params_t.defined() ? params_t.size(0) : 0;
  TORCH_INTERNAL_ASSERT(pr.num_params <= lse_engine::kMaxParams);
  pr.col_stats = col_stats;
  pr.block_rows = block_rows;
  pr.block_cols = block_cols;
  if (in.x_norms.first.defined()) {
    pr.row_inv_norm = in.x_norms.first.const_data_ptr<acc_t>();
    pr.col_inv_norm = pr.self ? pr.row_inv_norm : in.y_norms.first.const_data_ptr<acc_t>();
  }
  if (in.x_offsets.defined()) {
    pr.row_offset = in.x_offsets.const_data_ptr<acc_t>();
    pr.col_offset = pr.self ? pr.row_offset : in.y_offsets.const_data_ptr<acc_t>();
    // a distance policy: with normalize=True the entries near zero distance are recomputed from the rows
    if (pr.row_inv_norm) {
      pr.refine_below = lse_engine::refine_threshold<acc_t>(x.size(1));
      pr.gram_tolerance = distance_tolerance<acc_t>(x.size(1), /*exact_near_zero=*/false);
    }
  }
  return pr;
}

// common/normalize.h engine_norm_row for each row (the CUDA op runs the same function on ATen's norms), in one
// parallel pass: as ~10 small ATen ops this cost tens of µs per call, as much as the GEMM at B = 128.
template <typename acc_t>
void engine_norm_factors(const at::Tensor& rows, std::pair<at::Tensor, at::Tensor>& norms, at::Tensor* offsets) {
  const int64_t n = rows.size(0), dim = rows.size(1);
  norms.first = at::empty({n}, rows.options());
  norms.second = at::empty({n}, rows.options());
  if (offsets) *offsets = at::empty({n}, rows.options());
  const acc_t* x = rows.const_data_ptr<acc_t>();
  acc_t* inv = norms.first.mutable_data_ptr<acc_t>();
  acc_t* proj = norms.second.mutable_data_ptr<acc_t>();
  acc_t* off = offsets ? offsets->mutable_data_ptr<acc_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(kNormalizeEps);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const EngineNormRow<acc_t> f = engine_norm_row(std::sqrt(squared_norm(x + i * dim, dim)), eps);
      inv[i] = f.inv_norm;
      proj[i] = f.projection;
      if (off) off[i] = f.offset;
    }
  });
}

// common/normalize.h project_folded_norm_grad, row by row: grad_r -= <grad_r, x_r>·k_r·x_r.
template <typename acc_t>
void project_engine_norm_grad(at::Tensor& grad, const at::Tensor& rows, const at::Tensor& projection) {
  const int64_t n = rows.size(0), dim = rows.size(1);
  acc_t* g = grad.mutable_data_ptr<acc_t>();
  const acc_t* x = rows.const_data_ptr<acc_t>();
  const acc_t* k = projection.const_data_ptr<acc_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t c = dot_product(g + i * dim, x + i * dim, dim) * k[i];
      subtract_scaled_row(x + i * dim, c, dim, g + i * dim);
    }
  });
}

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& y, const at::Tensor& row_keys,
                 const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params, bool normalize,
                 const PolicySpec& spec) {
  Prepared p;
  p.x = x.contiguous();
  if (y.has_value()) p.y = y->contiguous();
  p.rk = row_keys.to(at::kLong).contiguous();
  p.ck = col_keys.has_value() ? col_keys->to(at::kLong).contiguous() : p.rk;
  if (row_params.has_value()) p.params_t = row_params->t().contiguous();
  const bool offsets = uses_distance(spec);
  if (normalize) {
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "metricops_lse_norms", [&] {
      engine_norm_factors<scalar_t>(p.x, p.x_norms, offsets ? &p.x_offsets : nullptr);
      if (p.y.has_value()) engine_norm_factors<scalar_t>(*p.y, p.y_norms, offsets ? &p.y_offsets : nullptr);
    });
  } else if (offsets) {
    p.x_offsets = unit_row_distance_offsets(p.x, p.x.scalar_type());
    if (p.y.has_value()) p.y_offsets = unit_row_distance_offsets(*p.y, p.y->scalar_type());
  }
  return p;
}

// The head's term of each finished row (column kTerm).
template <typename acc_t>
void apply_head(at::Tensor& stats, HeadKind kind, at::ArrayRef<double> args) {
  const at::Tensor totals = head_totals(stats, kind);
  const HeadSpec<acc_t> h = make_head_spec<acc_t>(kind, args, totals);
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < stats.size(0); ++i) head_finalize(st + i * kNumStats, h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_stats_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, const at::Tensor& row_keys,
    const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params, const at::Tensor& scale,
    c10::string_view policy, at::ArrayRef<double> args, bool normalize, bool col_stats, int64_t block_rows,
    int64_t block_cols, bool save_tiles, c10::string_view head) {
  const PolicySpec spec = check_lse_inputs(x_in, y_in, row_keys, col_keys, row_params, scale, policy, args, col_stats);
  const HeadKind head_kind = parse_head(head, spec, policy);
  TORCH_CHECK_VALUE(
      !save_tiles || block_rows > 0,
      "save_tiles=True needs block_rows > 0 (the saved tiles' size depends on it), got block_rows=", block_rows);
  const Prepared in = prepare(x_in, y_in, row_keys, col_keys, row_params, normalize, spec);
  const int64_t B = in.x.size(0), M = in.y.has_value() ? in.y->size(0) : B;
  at::Tensor row_out = at::empty({B, kNumStats}, in.x.options());
  at::Tensor col_out = at::empty({col_stats ? M : 0, kNumStats}, in.x.options());
  at::Tensor tiles =
      at::empty({save_tiles ? lse_engine::saved_tiles_size(B, M, !in.y.has_value(), block_rows) : 0}, in.x.options());
  const double scale_value = scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "metricops_lse_stats_cpu", [&] {
    using acc_t = scalar_t;
    const auto pr = make_problem<acc_t>(in, col_stats, block_rows, block_cols);
    std::vector<acc_t> racc(B * kNumAcc), cacc(col_stats ? M * kNumAcc : 0);
    for (int64_t i = 0; i < B; ++i) acc_init(racc.data() + i * kNumAcc);
    for (int64_t j = 0; j < static_cast<int64_t>(cacc.size()) / kNumAcc; ++j) acc_init(cacc.data() + j * kNumAcc);
    with_policy<acc_t>(spec, args, scale_value, in.x.size(1), normalize, [&](const auto& pol) {
      lse_engine::forward(pol, pr, racc.data(), col_stats ? cacc.data() : nullptr, save_tiles ? &tiles : nullptr);
    });
    lse_engine::finalize(racc.data(), B, row_out.mutable_data_ptr<acc_t>());
    if (col_stats) lse_engine::finalize(cacc.data(), M, col_out.mutable_data_ptr<acc_t>());
    if (head_kind != HeadKind::None) {
      apply_head<acc_t>(row_out, head_kind, args);
      if (col_stats) apply_head<acc_t>(col_out, head_kind, args);
    }
  });
  return {row_out, col_out, tiles};
}

std::tuple<at::Tensor, at::Tensor> lse_stats_backward_cpu(
    const c10::optional<at::Tensor>& grad_row_stats, const c10::optional<at::Tensor>& grad_col_stats,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, const at::Tensor& row_keys,
    const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params, const at::Tensor& scale,
    c10::string_view policy, at::ArrayRef<double> args, bool normalize, const at::Tensor& row_stats,
    const at::Tensor& col_stats, int64_t block_rows, int64_t block_cols, const c10::optional<at::Tensor>& tiles_in,
    c10::string_view head) {
  const bool has_col = col_stats.size(0) > 0;
  const PolicySpec spec = check_lse_inputs(x_in, y_in, row_keys, col_keys, row_params, scale, policy, args, has_col);
  const HeadKind head_kind = parse_head(head, spec, policy);
  const Prepared in = prepare(x_in, y_in, row_keys, col_keys, row_params, normalize, spec);
  const int64_t B = in.x.size(0), M = in.y.has_value() ? in.y->size(0) : B;
  // The forward's saved tiles, if any: their size is fixed by the tiles (block_rows), so a mismatch means
  // they came from another call.
  at::Tensor tiles;
  if (tiles_in.has_value() && tiles_in->numel() > 0) {
    TORCH_CHECK_VALUE(block_rows > 0, "tiles need block_rows > 0 (the forward's), got block_rows=", block_rows);
    const int64_t expected = lse_engine::saved_tiles_size(B, M, !in.y.has_value(), block_rows);
    TORCH_CHECK_VALUE(tiles_in->dim() == 1 && tiles_in->numel() == expected,
                      "tiles must be the forward's saved tiles, shape (", expected, ",), got ", tiles_in->sizes());
    TORCH_CHECK_VALUE(tiles_in->scalar_type() == in.x.scalar_type(), "tiles must have dtype ", in.x.scalar_type(),
                      ", got ", tiles_in->scalar_type());
    tiles = tiles_in->contiguous();
  }
  check_lse_backward_stats(grad_row_stats, grad_col_stats, row_stats, col_stats, B, M);
  at::Tensor grad_x = at::zeros_like(in.x);
  at::Tensor grad_y = in.y.has_value() ? at::zeros_like(*in.y) : at::zeros({0, in.x.size(1)}, in.x.options());
  const double scale_value = scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "metricops_lse_stats_backward_cpu", [&] {
    using acc_t = scalar_t;
    const auto pr = make_problem<acc_t>(in, has_col, block_rows, block_cols);
    // Backward coefficients in structure-of-arrays layout (GradCoefficients), the head's term included.
    const auto coefficients = [&](const at::Tensor& stats, const c10::optional<at::Tensor>& grad, int64_t n) {
      const at::Tensor st = stats.contiguous();
      at::Tensor g;
      if (grad.has_value()) g = grad->to(stats.scalar_type()).contiguous();
      std::vector<acc_t> out(n * kNumGrad);
      const acc_t* sp = st.const_data_ptr<acc_t>();
      const acc_t* gp = g.defined() ? g.const_data_ptr<acc_t>() : nullptr;
      const at::Tensor totals = head_totals(st, head_kind);
      const HeadSpec<acc_t> h = make_head_spec<acc_t>(head_kind, args, totals);
      acc_t row[kNumGrad];
      for (int64_t i = 0; i < n; ++i) {
        grad_coefficients(sp + i * kNumStats, gp ? gp + i * kNumStats : nullptr, row);
        head_grad_coefficients(sp + i * kNumStats, gp ? gp + i * kNumStats : nullptr, h, row);
        for (int f = 0; f < kNumGrad; ++f) out[f * n + i] = row[f];
      }
      return out;
    };
    const std::vector<acc_t> row_g = coefficients(row_stats, grad_row_stats, B);
    const std::vector<acc_t> col_g = has_col ? coefficients(col_stats, grad_col_stats, M) : std::vector<acc_t>();
    lse_engine::GradCoefficients<acc_t> rg{row_g.data(), B}, cg;
    if (has_col) cg = {col_g.data(), M};
    with_policy<acc_t>(spec, args, scale_value, in.x.size(1), normalize, [&](const auto& pol) {
      lse_engine::backward(pol, pr, rg, cg, grad_x, in.y.has_value() ? &grad_y : nullptr,
                           tiles.defined() ? &tiles : nullptr);
    });
  });
  if (normalize) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "metricops_lse_norm_grad", [&] {
      project_engine_norm_grad<scalar_t>(grad_x, in.x, in.x_norms.second);
      if (in.y.has_value()) project_engine_norm_grad<scalar_t>(grad_y, *in.y, in.y_norms.second);
    });
  }
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("lse_stats", &lse_stats_cpu);
  m.impl("lse_stats_backward", &lse_stats_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
