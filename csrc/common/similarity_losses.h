// The similarity losses' side of the log-sum-exp engine, shared by the CPU
// and CUDA ops (cpu/similarity.cpp, cuda/similarity.cu): argument checks and
// the policy named by the ops' `policy` string.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <string>

#include "common/checks.h"
#include "common/lse_heads.h"
#include "common/lse_stats.h"

namespace metricops {
namespace lse {

enum class PolicyKind {
  Scaled,
  ScaledLearnable,
  MultiSimilarity,
  MultiSimilarityMined,
  SimilarityRange,
  Circle,
  Lifted,
  NTXentPairs,
  LiftedPairs
};

struct PolicySpec {
  PolicyKind kind;
  int64_t num_args;    // entries of `args`
  int64_t num_params;  // columns of row_params (0: none)
  bool uses_scale;
};

inline PolicySpec parse_policy(c10::string_view name) {
  if (name == "scaled") return {PolicyKind::Scaled, 0, 0, true};
  if (name == "scaled_learnable") return {PolicyKind::ScaledLearnable, 0, 0, true};
  if (name == "multi_similarity") return {PolicyKind::MultiSimilarity, 3, 0, false};
  if (name == "multi_similarity_mined") return {PolicyKind::MultiSimilarityMined, 4, 2, false};
  if (name == "similarity_range") return {PolicyKind::SimilarityRange, 0, 0, false};
  if (name == "circle") return {PolicyKind::Circle, 2, 0, false};
  if (name == "lifted") return {PolicyKind::Lifted, 2, 0, false};
  if (name == "ntxent_pairs") return {PolicyKind::NTXentPairs, 0, 1, true};
  if (name == "lifted_pairs") return {PolicyKind::LiftedPairs, 2, 2, false};
  TORCH_CHECK_VALUE(
      false,
      "policy must be one of 'scaled', 'scaled_learnable', 'multi_similarity', 'multi_similarity_mined', 'circle', "
      "'lifted', 'ntxent_pairs', 'lifted_pairs', got '",
      std::string(name), "'");
}

// The policies on d, which read e = s + o_i + o_j = -d²/2 (common/lse_stats.h LiftedPolicy): the rows'
// distance offsets o are common/normalize.h engine_norm_row's with normalize=True, and
// unit_row_distance_offsets (rows taken as unit vectors) without.
inline bool uses_distance(const PolicySpec& spec) {
  return spec.kind == PolicyKind::Lifted || spec.kind == PolicyKind::LiftedPairs;
}

inline at::Tensor unit_row_distance_offsets(const at::Tensor& rows, at::ScalarType acc) {
  return at::full({rows.size(0)}, -0.5, rows.options().dtype(acc));
}

// Checks the engine ops' arguments; returns the policy.
inline PolicySpec check_lse_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& y, const at::Tensor& row_keys,
                                   const c10::optional<at::Tensor>& col_keys,
                                   const c10::optional<at::Tensor>& row_params, const at::Tensor& scale,
                                   c10::string_view policy, c10::ArrayRef<double> args, bool col_stats) {
  const PolicySpec spec = parse_policy(policy);
  check_embeddings(x, "x");
  const auto key_check = [](const at::Tensor& keys, const at::Tensor& emb, const char* name, const char* emb_name) {
    TORCH_CHECK_VALUE(keys.dim() == 1 && keys.size(0) == emb.size(0), name, " must be a 1-D tensor of length ",
                      emb.size(0), " (one per row of ", emb_name, "), got shape ", keys.sizes());
    TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong || keys.scalar_type() == at::kInt, name,
                     " must be int32 or int64, got ", keys.scalar_type());
    TORCH_CHECK_VALUE(keys.device() == emb.device(), name, " must be on ", emb_name, "'s device (", emb.device(),
                      "), got ", keys.device());
  };
  key_check(row_keys, x, "row_keys", "x");
  if (y.has_value()) {
    check_embeddings(*y, "y");
    check_same_device_dtype(x, "x", *y, "y");
    TORCH_CHECK_VALUE(y->size(1) == x.size(1), "y must have the same number of columns as x (D=", x.size(1),
                      "), got shape ", y->sizes());
    TORCH_CHECK_VALUE(col_keys.has_value(), "col_keys is required when y is given");
    key_check(*col_keys, *y, "col_keys", "y");
  } else {
    TORCH_CHECK_VALUE(!col_keys.has_value(), "col_keys must be None when y is None (the columns are x's rows)");
    TORCH_CHECK_VALUE(!col_stats, "col_stats needs y (without y, column statistics are the row statistics)");
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(args.size()) == spec.num_args, "policy '", std::string(policy), "' takes ",
                    spec.num_args, " args, got ", args.size());
  if (spec.num_params > 0) {
    TORCH_CHECK_VALUE(row_params.has_value(), "policy '", std::string(policy), "' needs row_params");
    const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(
        row_params->dim() == 2 && row_params->size(0) == x.size(0) && row_params->size(1) == spec.num_params,
        "row_params must have shape (", x.size(0), ", ", spec.num_params, "), got ", row_params->sizes());
    TORCH_CHECK_TYPE(row_params->scalar_type() == acc, "row_params must be ", acc, ", got ", row_params->scalar_type());
    TORCH_CHECK_VALUE(row_params->device() == x.device(), "row_params must be on x's device");
    TORCH_CHECK_VALUE(!col_stats, "col_stats is not supported with a policy that takes row_params");
  } else {
    TORCH_CHECK_VALUE(!row_params.has_value(), "policy '", std::string(policy), "' takes no row_params");
  }
  TORCH_CHECK_VALUE(spec.kind != PolicyKind::LiftedPairs || !y.has_value(),
                    "policy 'lifted_pairs' pairs rows with rows: y must be None");
  TORCH_CHECK_VALUE(scale.dim() == 0, "scale must be a 0-dim tensor, got shape ", scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "scale must be floating, got ", scale.scalar_type());
  return spec;
}

// lse_stats_backward's statistics and their gradients: (B, kNumStats) per row, and (M, kNumStats) per column when
// the forward kept column statistics (col_stats non-empty). The kernels read kNumStats values per row of each.
inline void check_lse_backward_stats(const c10::optional<at::Tensor>& grad_row_stats,
                                     const c10::optional<at::Tensor>& grad_col_stats, const at::Tensor& row_stats,
                                     const at::Tensor& col_stats, int64_t B, int64_t M) {
  const auto check = [](const at::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n && t.size(1) == kNumStats, name, " must have shape (", n, ", ",
                      int(kNumStats), "), got ", t.sizes());
  };
  check(row_stats, "row_stats", B);
  TORCH_CHECK_VALUE(col_stats.dim() == 2, "col_stats must have shape (", M, ", ", int(kNumStats), ") or (0, ",
                    int(kNumStats), "), got ", col_stats.sizes());
  const bool has_col = col_stats.size(0) > 0;
  if (has_col) check(col_stats, "col_stats", M);
  if (grad_row_stats.has_value()) check(*grad_row_stats, "grad_row_stats", B);
  if (grad_col_stats.has_value()) {
    if (has_col)
      check(*grad_col_stats, "grad_col_stats", M);
    else
      TORCH_CHECK_VALUE(grad_col_stats->numel() == 0,
                        "grad_col_stats must be None or empty without column statistics, got shape ",
                        grad_col_stats->sizes());
  }
}

// The ops' `head` (common/lse_heads.h), checked against the policy it reads: each head is one loss's formula on
// that loss's statistics.
inline HeadKind parse_head(c10::string_view head, const PolicySpec& spec, c10::string_view policy) {
  struct Entry {
    const char* name;
    HeadKind kind;
    PolicyKind policy;
  };
  static constexpr Entry kHeads[] = {
      {"supcon", HeadKind::SupCon, PolicyKind::Scaled},
      {"multi_similarity", HeadKind::MultiSimilarity, PolicyKind::MultiSimilarity},
      {"multi_similarity_mined", HeadKind::MultiSimilarityMined, PolicyKind::MultiSimilarityMined},
      {"circle", HeadKind::Circle, PolicyKind::Circle},
      {"generalized_lifted", HeadKind::GeneralizedLifted, PolicyKind::Lifted},
      {"info_nce", HeadKind::InfoNCE, PolicyKind::Scaled},
  };
  if (head == "none") return HeadKind::None;
  for (const Entry& e : kHeads) {
    if (head != e.name) continue;
    TORCH_CHECK_VALUE(spec.kind == e.policy, "head '", std::string(head),
                      "' reads another policy's statistics, got policy '", std::string(policy), "'");
    return e.kind;
  }
  TORCH_CHECK_VALUE(false,
                    "head must be one of 'none', 'supcon', 'multi_similarity', 'multi_similarity_mined', 'circle', "
                    "'generalized_lifted', 'info_nce', got '",
                    std::string(head), "'");
}

// The batch totals (Σ count_pos, Σ count_neg) of finished statistics (B, kNumStats) that a head reads, on their
// device; undefined for a head that reads none.
inline at::Tensor head_totals(const at::Tensor& stats, HeadKind kind) {
  if (!head_reads_totals(kind)) return at::Tensor();
  return stats.narrow(1, kCountPos, 2).sum(0).contiguous();
}

// The head's constants: MS's 1/α and 1/β are the policy's first two args.
template <typename acc_t>
inline HeadSpec<acc_t> make_head_spec(HeadKind kind, c10::ArrayRef<double> args, const at::Tensor& totals) {
  HeadSpec<acc_t> h;
  h.kind = kind;
  if (kind == HeadKind::MultiSimilarity || kind == HeadKind::MultiSimilarityMined) {
    h.inv_alpha = 1.0 / args[0];
    h.inv_beta = 1.0 / args[1];
  }
  h.totals = totals.defined() ? totals.const_data_ptr<acc_t>() : nullptr;
  return h;
}

// The distance policies' d² below which d is taken as 0: the Gram form's rounding, (2·dim + 8)·ε; (8ε)² where the
// driver recomputes the entries near 0 from the rows (`exact_near_zero`: the CPU engine with normalize=True).
template <typename acc_t>
inline acc_t distance_tolerance(int64_t dim, bool exact_near_zero) {
  const acc_t eps = std::numeric_limits<acc_t>::epsilon();
  return exact_near_zero ? acc_t(64) * eps * eps : static_cast<acc_t>(2 * dim + 8) * eps;
}

// Runs f(policy) with the policy object for `spec` (acc_t statistics).
// `dim`, `exact_near_zero`: the distance policies' tolerance (distance_tolerance).
template <typename acc_t, typename F>
inline void with_policy(const PolicySpec& spec, c10::ArrayRef<double> a, double scale, int64_t dim,
                        bool exact_near_zero, const F& f) {
  switch (spec.kind) {
    case PolicyKind::Scaled:
      return f(ScaledPolicy<acc_t, false>{static_cast<acc_t>(scale)});
    case PolicyKind::ScaledLearnable:
      return f(ScaledPolicy<acc_t, true>{static_cast<acc_t>(scale)});
    case PolicyKind::MultiSimilarity:
      return f(MultiSimilarityPolicy<acc_t, false>{static_cast<acc_t>(a[0]), static_cast<acc_t>(a[1]),
                                                   static_cast<acc_t>(a[2]), acc_t(0)});
    case PolicyKind::MultiSimilarityMined:
      return f(MultiSimilarityPolicy<acc_t, true>{static_cast<acc_t>(a[0]), static_cast<acc_t>(a[1]),
                                                  static_cast<acc_t>(a[2]), static_cast<acc_t>(a[3])});
    case PolicyKind::SimilarityRange:
      return f(SimilarityRangePolicy<acc_t>{});
    case PolicyKind::Circle:
      return f(CirclePolicy<acc_t>{static_cast<acc_t>(a[0]), static_cast<acc_t>(a[1])});
    case PolicyKind::Lifted:
      return f(LiftedPolicy<acc_t>{static_cast<acc_t>(a[0]), static_cast<acc_t>(a[1]),
                                   distance_tolerance<acc_t>(dim, exact_near_zero)});
    case PolicyKind::NTXentPairs:
      return f(NTXentPairsPolicy<acc_t>{static_cast<acc_t>(scale)});
    case PolicyKind::LiftedPairs:
      return f(LiftedPairsPolicy<acc_t>{static_cast<acc_t>(a[0]), distance_tolerance<acc_t>(dim, exact_near_zero),
                                        a[1] != 0});
  }
  TORCH_CHECK(false, "metricops: unknown lse policy");
}

}  // namespace lse
}  // namespace metricops
