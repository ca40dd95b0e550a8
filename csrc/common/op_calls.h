// Calls into other metricops ops through the dispatcher, for kernels whose
// building blocks are registered from another translation unit.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace metricops {

// The typed handle of the op `name` ("metricops::..."); callers keep it in a
// function-local static, so the look-up runs once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// metricops::pairwise_distance_backward(grad, x, y, dist, metric) -> (grad_x, grad_y).
inline std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& y,
                                                                        const at::Tensor& dist,
                                                                        c10::string_view metric) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, c10::string_view)>(
      "metricops::pairwise_distance_backward");
  return op.call(grad, x, y, dist, metric);
}

}  // namespace metricops
