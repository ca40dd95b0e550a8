// CPU vectorisation helper. The extension is built for the baseline x86-64
// ISA (it must run anywhere), so hot loops are cloned for AVX2 and AVX-512
// and the best clone is picked at load time (GCC target_clones / ifunc).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define METRICOPS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define METRICOPS_SIMD_CLONES
#endif
