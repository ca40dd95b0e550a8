// CPU vectorisation helper. The extension is built for the baseline x86-64
// ISA (it must run anywhere), so hot loops are cloned for x86-64-v3 (AVX2 and
// FMA) and x86-64-v4 (AVX-512) and the best clone is picked at load time (GCC
// target_clones / ifunc). The levels, not "avx2"/"avx512f": GCC's avx2 and
// avx512f targets leave FMA out, so the exp polynomials of the log-sum-exp
// epilogues ran as separate multiplies and adds; on a 2-core AVX2 AMD EPYC
// (B = 2048, D = 128) SupCon's forward op took 10.2 -> 9.6 ms. (Contraction
// rounds differently: the clones may differ from each other in the last bits.)
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define METRICOPS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define METRICOPS_SIMD_CLONES
#endif

#include <cstdint>

namespace metricops {
namespace cpu {

// Reductions over a row with kSimdLanes independent partial sums: a single
// running sum is a serial chain (IEEE order) that the compiler may not
// vectorise, and costs ~4 cycles per element; lanes make it SIMD.
constexpr int64_t kSimdLanes = 16;

// Sum of f(j) over j in [0, n) in kSimdLanes partial sums (fixed order, so
// deterministic). Meant for the body of a METRICOPS_SIMD_CLONES function,
// where the inlined f vectorises with it; f may also write per-j outputs.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, const F& f) {
  acc_t lanes[kSimdLanes] = {};
  int64_t j = 0;
  for (; j + kSimdLanes <= n; j += kSimdLanes) {
    for (int64_t l = 0; l < kSimdLanes; ++l) lanes[l] += f(j + l);
  }
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] += f(j);
  acc_t s = 0;
  for (int64_t l = 0; l < kSimdLanes; ++l) s += lanes[l];
  return s;
}

template <typename scalar_t>
METRICOPS_SIMD_CLONES scalar_t dot_product(const scalar_t* a, const scalar_t* b, int64_t n) {
  return lane_sum<scalar_t>(n, [&](int64_t k) { return a[k] * b[k]; });
}

template <typename scalar_t>
inline scalar_t squared_norm(const scalar_t* x, int64_t n) {
  return dot_product(x, x, n);
}

// out = s * x
template <typename scalar_t>
METRICOPS_SIMD_CLONES void scale_row(const scalar_t* __restrict__ x, scalar_t s, int64_t n,
                                     scalar_t* __restrict__ out) {
  for (int64_t k = 0; k < n; ++k) out[k] = s * x[k];
}

// g = a * g - b * x
template <typename scalar_t>
METRICOPS_SIMD_CLONES void axpby_row_inplace(scalar_t a, scalar_t b, const scalar_t* __restrict__ x, int64_t n,
                                             scalar_t* __restrict__ g) {
  for (int64_t k = 0; k < n; ++k) g[k] = a * g[k] - b * x[k];
}

// out -= s * x
template <typename scalar_t>
METRICOPS_SIMD_CLONES void subtract_scaled_row(const scalar_t* __restrict__ x, scalar_t s, int64_t n,
                                               scalar_t* __restrict__ out) {
  for (int64_t k = 0; k < n; ++k) out[k] -= s * x[k];
}

}  // namespace cpu
}  // namespace metricops
