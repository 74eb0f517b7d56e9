// The row loop of the CPU expand kernel (csrc/cpu/expand.cpp), free of torch headers so
// that tests/test_expand_clones.py can compile it alone for every instruction set.
#pragma once

#include <stdint.h>

#include "../dssn_noise.h"

// The loop is compiled for AVX-512, AVX2 and the baseline x86-64 ISA, picked when the
// library loads (GCC/Clang function multiversioning), so one portable build runs at the
// machine's vector width. Every clone computes the same bits: integer ops, exact int ->
// float conversions and IEEE division, with contraction off (-ffp-contract=off).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DSSN_NO_CLONES)
#define DSSN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSSN_VECTOR_CLONES
#endif

namespace dssn {

// Rows row_begin .. row_end - 1 of out [B * count, d]: row r is variant start + r % count
// of image r / count (levels [B, d], offsets [d]).
template <typename out_t, typename level_t>
DSSN_VECTOR_CLONES void expand_rows(out_t* out, const level_t* levels, const int32_t* offsets,
                                    int64_t count, int64_t d, int L, int q, int64_t start,
                                    int64_t row_begin, int64_t row_end) {
  const SplitDivisor div = make_divisor(L);
  const float four_q = float(4 * q);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / count;
    const int t = int(start + r % count);  // < L
    const level_t* k = levels + b * d;
    out_t* o = out + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const int j = split_index(offsets[i], t, L);
      // float32: correctly rounded; float16/bfloat16: that value rounded to nearest even
      // (exact for the q limits checked in Python, spec.MAX_Q_FOR_DTYPE).
      o[i] = out_t(noise_value(noise_numerator(int(k[i]), j, q, div), four_q));
    }
  }
}

}  // namespace dssn
