// Streaming contrastive loss on CUDA: the distance matrix streams through a
// bounded (block_rows, B) buffer (cuBLAS per row block, then one warp per
// row); the backward recomputes each block and applies it with one GEMM.
// No host sync: the reduction's denominator stays on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/checks.h"
#include "common/contrastive_streaming.h"
#include "common/hinge.h"
#include "common/row_blocks.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"

namespace metricops {
namespace cuda {
namespace {

template <typename acc_t>
__global__ void contrastive_rows_kernel(const acc_t* __restrict__ block, int64_t r0, int64_t rows,
                                        const int64_t* __restrict__ labels, int64_t B, acc_t pm, acc_t nm, bool squared,
                                        double* __restrict__ row_sum, int64_t* __restrict__ row_nonzero) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(r, rows) {
    const int64_t i = r0 + r;
    const acc_t* row = block + r * B;
    double s = 0;
    int64_t nz = 0;
    for (int64_t j = lane; j < B; j += kWarp) {
      if (j == i) continue;
      acc_t value, slope;
      contrastive_term<acc_t>(row[j], labels[j] == labels[i], pm, nm, squared, value, slope);
      s += static_cast<double>(value);
      nz += value > acc_t(0);
    }
    s = warp_sum(s);
    nz = warp_sum(nz);
    if (lane == 0) row_sum[i] = s, row_nonzero[i] = nz;
  }
}

// Distances in, cross weights out (in place); row_coef[r] gets the row's
// scaled norm term. Unit upstream gradient, doubled for the column side.
template <typename acc_t>
__global__ void contrastive_weights_kernel(acc_t* __restrict__ block, int64_t r0, int64_t rows,
                                           const int64_t* __restrict__ labels, const acc_t* __restrict__ aux, int64_t B,
                                           Metric metric, acc_t pm, acc_t nm, bool squared,
                                           acc_t* __restrict__ row_coef) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(r, rows) {
    const int64_t i = r0 + r;
    acc_t* row = block + r * B;
    acc_t norm_sum = 0;
    for (int64_t j = lane; j < B; j += kWarp) {
      acc_t w = 0, p = 0;
      if (j != i) {
        acc_t value, slope;
        contrastive_term<acc_t>(row[j], labels[j] == labels[i], pm, nm, squared, value, slope);
        distance_grad_weights<acc_t>(metric, acc_t(2) * slope, row[j], aux[i], aux[j], w, p);
      }
      row[j] = w;
      norm_sum += p;
    }
    norm_sum = warp_sum(norm_sum);
    if (lane == 0) row_coef[r] = norm_sum * norm_term_scale<acc_t>(metric, aux[i]);
  }
}

// Rows per block for block_rows <= 0 (a direct torch.ops call: Python always
// passes its own choice): rows of the accumulation dtype that fill 256 MiB,
// the CUDA budget of metricops/_memory.py. Never all B rows: the op promises
// never to hold the B×B matrix.
int64_t streaming_rows(int64_t block_rows, int64_t B, const at::Tensor& aux) {
  constexpr int64_t kBudgetBytes = int64_t{256} << 20;
  return rows_per_block(block_rows, B, std::max<int64_t>(1, kBudgetBytes / (aux.element_size() * B)));
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_streaming_cuda(const at::Tensor& embeddings,
                                                                   const at::Tensor& labels_in, double pos_margin,
                                                                   double neg_margin, c10::string_view metric_name,
                                                                   bool squared, c10::string_view reduction,
                                                                   int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  const Reduction red = check_contrastive_streaming_inputs(embeddings, labels_in, reduction);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor row_sum = at::zeros({B}, x.options().dtype(at::kDouble));
  at::Tensor row_nonzero = at::zeros({B}, labels.options());
  if (B > 0) {
    const at::Tensor aux = row_aux_acc_cuda(x, metric);
    const int64_t R = streaming_rows(block_rows, B, aux);
    at::Tensor buffer = at::empty({R, B}, aux.options());
    for (int64_t r0 = 0; r0 < B; r0 += R) {
      const int64_t rows = std::min(R, B - r0);
      at::Tensor block = buffer.narrow(0, 0, rows);
      self_distance_rows_acc_cuda(x, aux, r0, metric, block);
      AT_DISPATCH_FLOATING_TYPES(aux.scalar_type(), "metricops_contrastive_streaming_cuda", [&] {
        contrastive_rows_kernel<scalar_t><<<warp_rows_grid(rows), kThreads, 0, current_stream()>>>(
            block.const_data_ptr<scalar_t>(), r0, rows, labels.const_data_ptr<int64_t>(), B,
            static_cast<scalar_t>(pos_margin), static_cast<scalar_t>(neg_margin), squared,
            row_sum.mutable_data_ptr<double>(), row_nonzero.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  const at::Tensor total = row_sum.sum();
  at::Tensor denom = red == Reduction::MeanNonzero ? row_nonzero.sum().to(at::kDouble)
                                                   : at::full({}, streaming_denominator(red, B, 0), row_sum.options());
  at::Tensor loss = at::where(denom.gt(0), total.div(denom), total.mul(0)).to(x.scalar_type());
  return {loss, denom};
}

at::Tensor contrastive_loss_streaming_backward_cuda(const at::Tensor& grad, const at::Tensor& embeddings,
                                                    const at::Tensor& labels_in, const at::Tensor& denom,
                                                    double pos_margin, double neg_margin, c10::string_view metric_name,
                                                    bool squared, int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const Metric metric = parse_metric(metric_name);
  const auto [x, labels] = prepare_contrastive_streaming_backward(grad, embeddings, labels_in, denom);
  const int64_t B = x.size(0);
  if (B == 0) return at::zeros_like(x);
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  const at::Tensor x_acc = x.to(aux.scalar_type());
  at::Tensor out = at::empty(x.sizes(), aux.options());
  const int64_t R = streaming_rows(block_rows, B, aux);
  at::Tensor buffer = at::empty({R, B}, aux.options());
  at::Tensor row_coef = at::empty({R}, aux.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    at::Tensor block = buffer.narrow(0, 0, rows);
    at::Tensor coef = row_coef.narrow(0, 0, rows);
    self_distance_rows_acc_cuda(x, aux, r0, metric, block);
    AT_DISPATCH_FLOATING_TYPES(aux.scalar_type(), "metricops_contrastive_streaming_backward_cuda", [&] {
      contrastive_weights_kernel<scalar_t><<<warp_rows_grid(rows), kThreads, 0, current_stream()>>>(
          block.mutable_data_ptr<scalar_t>(), r0, rows, labels.const_data_ptr<int64_t>(),
          aux.const_data_ptr<scalar_t>(), B, metric, static_cast<scalar_t>(pos_margin),
          static_cast<scalar_t>(neg_margin), squared, coef.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor x_rows = x_acc.narrow(0, r0, rows);
    out.narrow(0, r0, rows).copy_(at::addmm(x_rows.mul(coef.unsqueeze(1)), block, x_acc, 1, -1));
  }
  return out.mul_(streaming_grad_scale(grad, denom)).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("contrastive_loss_streaming", &contrastive_loss_streaming_cuda);
  m.impl("contrastive_loss_streaming_backward", &contrastive_loss_streaming_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
