// CUDA kernels of the log-sum-exp engine's ops (metricops::lse_stats and its
// backward), on the tile driver of cuda/lse_engine.cuh. float16/bfloat16
// inputs are converted to float32 once; statistics and gradients are computed
// in float32 and the gradients returned in the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <utility>

#include "common/normalize.h"
#include "common/similarity_losses.h"
#include "cuda/cuda_helpers.h"
#include "cuda/lse_engine.cuh"

namespace metricops {
namespace cuda {
namespace {

using namespace ::metricops::lse;

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The host's policy holds no scale: the kernels read it from the device (lse_engine::with_device_scale).
constexpr double kScaleOnDevice = std::numeric_limits<double>::quiet_NaN();

struct Prepared {
  at::Tensor x, y, rk, ck, params;
  at::Tensor scale;  // 0-dim, acc dtype, on x's device: the kernels read it (DeviceProblem::scale)
  bool self;
  // normalize=True only: (1/max(||row||, eps), projection factor) per row (common/normalize.h)
  std::pair<at::Tensor, at::Tensor> x_norms, y_norms;
  at::Tensor x_offsets, y_offsets;  // a distance policy: DeviceProblem::row/col_offset
};

template <typename acc_t>
__global__ void engine_norm_factors_kernel(const acc_t* norm, int64_t n, acc_t* inv, acc_t* proj, acc_t* off) {
  METRICOPS_CUDA_KERNEL_LOOP(i, n) {
    const EngineNormRow<acc_t> f = engine_norm_row(norm[i], static_cast<acc_t>(kNormalizeEps));
    inv[i] = f.inv_norm;
    proj[i] = f.projection;
    if (off) off[i] = f.offset;
  }
}

// common/normalize.h engine_norm_row per row of `rows` (acc dtype, contiguous): the rule the CPU op runs, on ATen's
// row norms.
void engine_norm_factors(const at::Tensor& rows, std::pair<at::Tensor, at::Tensor>& norms, at::Tensor* offsets) {
  const int64_t n = rows.size(0);
  const at::Tensor norm = at::linalg_vector_norm(rows, 2, {1}, false, rows.scalar_type());
  norms.first = at::empty({n}, rows.options());
  norms.second = at::empty({n}, rows.options());
  if (offsets) *offsets = at::empty({n}, rows.options());
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "metricops_lse_norms_cuda", [&] {
    engine_norm_factors_kernel<scalar_t><<<grid_for(n), kThreads, 0, current_stream()>>>(
        norm.const_data_ptr<scalar_t>(), n, norms.first.mutable_data_ptr<scalar_t>(),
        norms.second.mutable_data_ptr<scalar_t>(), offsets ? offsets->mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& y, const at::Tensor& row_keys,
                 const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params,
                 const at::Tensor& scale, bool normalize, const PolicySpec& spec) {
  Prepared p;
  const at::ScalarType acc = acc_type(x);
  p.x = x.to(acc).contiguous();
  p.scale = scale.to(x.device(), acc).contiguous();  // no copy when metricops built it there (it always does)
  p.self = !y.has_value();
  p.y = p.self ? p.x : y->to(acc).contiguous();
  p.rk = row_keys.to(at::kLong).contiguous();
  p.ck = col_keys.has_value() ? col_keys->to(at::kLong).contiguous() : p.rk;
  if (row_params.has_value()) p.params = row_params->to(acc).contiguous();
  const bool offsets = uses_distance(spec);
  if (normalize) {
    engine_norm_factors(p.x, p.x_norms, offsets ? &p.x_offsets : nullptr);
    if (p.self)
      p.y_norms = p.x_norms;
    else
      engine_norm_factors(p.y, p.y_norms, offsets ? &p.y_offsets : nullptr);
  } else if (offsets) {
    p.x_offsets = unit_row_distance_offsets(p.x, acc);
    if (!p.self) p.y_offsets = unit_row_distance_offsets(p.y, acc);
  }
  if (p.self) p.y_offsets = p.x_offsets;
  return p;
}

template <typename acc_t>
lse_engine::DeviceProblem<acc_t> device_problem(const Prepared& in) {
  const bool normalize = in.x_norms.first.defined();
  return {in.rk.const_data_ptr<int64_t>(),
          in.ck.const_data_ptr<int64_t>(),
          in.params.defined() ? in.params.const_data_ptr<acc_t>() : nullptr,
          in.params.defined() ? in.params.size(1) : 0,
          in.self,
          normalize ? in.x_norms.first.const_data_ptr<acc_t>() : nullptr,
          normalize ? in.y_norms.first.const_data_ptr<acc_t>() : nullptr,
          in.x_offsets.defined() ? in.x_offsets.const_data_ptr<acc_t>() : nullptr,
          in.y_offsets.defined() ? in.y_offsets.const_data_ptr<acc_t>() : nullptr,
          in.scale.const_data_ptr<acc_t>()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_stats_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, const at::Tensor& row_keys,
    const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params, const at::Tensor& scale,
    c10::string_view policy, at::ArrayRef<double> args, bool normalize, bool col_stats, int64_t block_rows,
    int64_t block_cols, bool save_tiles, c10::string_view head) {
  METRICOPS_CUDA_DEVICE_GUARD(x_in.device());
  const PolicySpec spec = check_lse_inputs(x_in, y_in, row_keys, col_keys, row_params, scale, policy, args, col_stats);
  const HeadKind head_kind = parse_head(head, spec, policy);
  TORCH_CHECK(!save_tiles,
              "lse_stats: save_tiles=True is not implemented on CUDA (its backward recomputes the tiles); "
              "pass save_tiles=False");
  const Prepared in = prepare(x_in, y_in, row_keys, col_keys, row_params, scale, normalize, spec);
  const int64_t B = in.x.size(0), M = in.y.size(0);
  at::Tensor row_out = at::empty({B, kNumStats}, in.x.options());
  at::Tensor col_out = at::empty({col_stats ? M : 0, kNumStats}, in.x.options());
  at::Tensor no_tiles = at::empty({0}, in.x.options());
  if (B == 0) return {row_out, col_out, no_tiles};
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "metricops_lse_stats_cuda", [&] {
    using acc_t = scalar_t;
    at::Tensor racc = at::empty({B, kNumAcc}, in.x.options());
    at::Tensor cacc = at::empty({col_stats ? M : 0, kNumAcc}, in.x.options());
    lse_engine::acc_init_kernel<<<grid_for(B), kThreads, 0, current_stream()>>>(racc.mutable_data_ptr<acc_t>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (col_stats && M > 0) {
      lse_engine::acc_init_kernel<<<grid_for(M), kThreads, 0, current_stream()>>>(cacc.mutable_data_ptr<acc_t>(), M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto pr = device_problem<acc_t>(in);
    with_policy<acc_t>(spec, args, kScaleOnDevice, in.x.size(1), /*exact_near_zero=*/false, [&](const auto& pol) {
      lse_engine::forward(pol, pr, in.x, in.y, block_rows, block_cols, racc.mutable_data_ptr<acc_t>(),
                          col_stats ? cacc.mutable_data_ptr<acc_t>() : nullptr);
    });
    lse_engine::finalize_kernel<<<grid_for(B), kThreads, 0, current_stream()>>>(racc.const_data_ptr<acc_t>(), B,
                                                                                row_out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (col_stats && M > 0) {
      lse_engine::finalize_kernel<<<grid_for(M), kThreads, 0, current_stream()>>>(cacc.const_data_ptr<acc_t>(), M,
                                                                                  col_out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (head_kind != HeadKind::None) {
      const auto apply_head = [&](at::Tensor& stats) {
        const at::Tensor totals = head_totals(stats, head_kind);
        lse_engine::head_kernel<<<grid_for(stats.size(0)), kThreads, 0, current_stream()>>>(
            stats.mutable_data_ptr<acc_t>(), stats.size(0), make_head_spec<acc_t>(head_kind, args, totals));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      apply_head(row_out);
      if (col_stats && M > 0) apply_head(col_out);
    }
  });
  return {row_out, col_out, no_tiles};
}

std::tuple<at::Tensor, at::Tensor> lse_stats_backward_cuda(
    const c10::optional<at::Tensor>& grad_row_stats, const c10::optional<at::Tensor>& grad_col_stats,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, const at::Tensor& row_keys,
    const c10::optional<at::Tensor>& col_keys, const c10::optional<at::Tensor>& row_params, const at::Tensor& scale,
    c10::string_view policy, at::ArrayRef<double> args, bool normalize, const at::Tensor& row_stats,
    const at::Tensor& col_stats, int64_t block_rows, int64_t block_cols, const c10::optional<at::Tensor>& tiles,
    c10::string_view head) {
  METRICOPS_CUDA_DEVICE_GUARD(x_in.device());
  TORCH_CHECK(!tiles.has_value() || tiles->numel() == 0,
              "lse_stats_backward: saved tiles are not implemented on CUDA (it recomputes them); pass tiles=None");
  const bool has_col = col_stats.size(0) > 0;
  const PolicySpec spec = check_lse_inputs(x_in, y_in, row_keys, col_keys, row_params, scale, policy, args, has_col);
  const HeadKind head_kind = parse_head(head, spec, policy);
  const Prepared in = prepare(x_in, y_in, row_keys, col_keys, row_params, scale, normalize, spec);
  const int64_t B = in.x.size(0), M = in.y.size(0);
  check_lse_backward_stats(grad_row_stats, grad_col_stats, row_stats, col_stats, B, M);
  at::Tensor grad_x = at::zeros_like(in.x);
  at::Tensor grad_y = in.self ? at::zeros({0, in.x.size(1)}, in.x.options()) : at::zeros_like(in.y);
  if (B > 0 && M > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "metricops_lse_stats_backward_cuda", [&] {
      using acc_t = scalar_t;
      const auto coefficients = [&](const at::Tensor& stats, const c10::optional<at::Tensor>& grad, int64_t n) {
        const at::Tensor st = stats.to(in.x.scalar_type()).contiguous();
        at::Tensor g;
        if (grad.has_value()) g = grad->to(in.x.scalar_type()).contiguous();
        at::Tensor out = at::empty({kNumGrad * n}, in.x.options());
        const at::Tensor totals = head_totals(st, head_kind);
        lse_engine::coefficients_kernel<<<grid_for(n), kThreads, 0, current_stream()>>>(
            st.const_data_ptr<acc_t>(), g.defined() ? g.const_data_ptr<acc_t>() : nullptr, n,
            make_head_spec<acc_t>(head_kind, args, totals), out.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return out;
      };
      const at::Tensor rg = coefficients(row_stats, grad_row_stats, B);
      const at::Tensor cg = has_col ? coefficients(col_stats, grad_col_stats, M) : at::Tensor();
      const auto pr = device_problem<acc_t>(in);
      with_policy<acc_t>(spec, args, kScaleOnDevice, in.x.size(1), /*exact_near_zero=*/false, [&](const auto& pol) {
        lse_engine::backward(pol, pr, in.x, in.y, block_rows, block_cols, rg.const_data_ptr<acc_t>(),
                             has_col ? cg.const_data_ptr<acc_t>() : nullptr, grad_x, in.self ? nullptr : &grad_y);
      });
      if (normalize) {
        project_folded_norm_grad(grad_x, in.x, in.x_norms.second);
        if (!in.self) project_folded_norm_grad(grad_y, in.y, in.y_norms.second);
      }
    });
  }
  return {grad_x.to(x_in.scalar_type()), in.self ? grad_y.to(x_in.scalar_type()) : grad_y.to(y_in->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("lse_stats", &lse_stats_cuda);
  m.impl("lse_stats_backward", &lse_stats_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
