// The DSSN split-noise formula in integers (docs/DESIGN.md, "The integer form of the noise").
//
// This header is the single C++/CUDA home of the math: the CPU kernels in csrc/cpu and
// the CUDA kernels in csrc/cuda both include it. It has no torch or libc++ dependency,
// so plain nvcc compiles it.
//
// Pixel level k in 0..q (pixel x = k/q), split index j in 0..L-1 (split point
// s = (j + 1/2)/q), L = 2*lambda*q variants:
//
//     n  = floor((k - j - 1) / L) + 1
//     U  = min(2*L*n + 2*j + 1, 2*q)
//     Lo = max(2*L*n + 2*j + 1 - 2*L, 0)
//     m  = U + Lo                         (0 <= m <= 4q)
//     noised pixel = m / (4q), rounded once to the nearest float.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define DSSN_HD __host__ __device__ __forceinline__
#else
#define DSSN_HD inline
#endif

namespace dssn {

// Largest q + L for which SplitDivisor is exact (see below). Checked by the callers.
constexpr int64_t kMaxLevelsPlusVariants = int64_t(1) << 21;

// The type a logit is compared in by the vote kernels (csrc/cpu/vote.cpp,
// csrc/cuda/vote.cu): float for float32, float16 and bfloat16 (exact conversions),
// double for float64.
template <typename T>
struct Cmp {
  using type = float;
};
template <>
struct Cmp<double> {
  using type = double;
};

DSSN_HD int imin(int a, int b) { return a < b ? a : b; }
DSSN_HD int imax(int a, int b) { return a > b ? a : b; }

// floor(a / L) + 1 for a in [-L, q - 1], without an integer division (which does not
// vectorize and costs ~25 cycles). With a' = a + L >= 0 the result is floor(a' / L), and
// y = (a' + 1/2) / L is at least 1/(2L) away from every integer, while the float
// product below is within y * 2^-23 * (1 + 2^-24) of y; so truncation is exact whenever
// a' + 1/2 < 2^22, i.e. q + L <= kMaxLevelsPlusVariants. a' + 1/2 and the operands are
// exact floats, and there is a single rounding per operation (no fma is possible in
// "(a + b) * c" and device code uses the _rn intrinsics explicitly).
struct SplitDivisor {
  int L;
  float inv_L;  // 1/L rounded to float
};

DSSN_HD SplitDivisor make_divisor(int L) {
  SplitDivisor d;
  d.L = L;
#if defined(__CUDA_ARCH__)
  d.inv_L = __frcp_rn(float(L));
#else
  d.inv_L = 1.0f / float(L);
#endif
  return d;
}

// n = floor((k - j - 1) / L) + 1 for 0 <= k <= q, 0 <= j < L.
DSSN_HD int split_block(int k, int j, SplitDivisor d) {
  int a = k - j - 1 + d.L;  // in [0, q + L - 1]
#if defined(__CUDA_ARCH__)
  return int(__fmul_rn(__fadd_rn(float(a), 0.5f), d.inv_L));
#else
  return int((float(a) + 0.5f) * d.inv_L);
#endif
}

// m = 4q * (noised pixel) for level k and split index j.
DSSN_HD int noise_numerator(int k, int j, int q, SplitDivisor d) {
  const int n = split_block(k, j, d);
  const int top = 2 * d.L * n + 2 * j + 1;
  return imin(top, 2 * q) + imax(top - 2 * d.L, 0);
}

// Split index of variant t (0 <= t < L) for a pixel with offset v (0 <= v < L).
DSSN_HD int split_index(int v, int t, int L) {
  const int j = v + t;
  return j >= L ? j - L : j;
}

// The noised pixel m / (4q) as the correctly rounded float32 (IEEE division of two
// exactly representable integers; m, 4q < 2^24).
DSSN_HD float noise_value(int m, float four_q) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(float(m), four_q);
#else
  return float(m) / four_q;
#endif
}

// ---------------------------------------------------------------------------------------
// The margin rule of dssn::vote_margin_ (shared by the CPU and CUDA kernels; the torch and
// Triton backends write the same operations). gap(a, z) for a >= z (no NaN) is 0 when
// a == z (also for equal infinities) and otherwise the exact real a - z; margin_below
// says whether gap(a, z) < tau, exactly: s = fl(a - z) and the TwoSum error term e give
// a - z = s + e with no rounding, so gap < tau <=> s < tau or (s == tau and e < 0). An
// infinite s (a = +inf, z = -inf, or overflow) is never below a finite tau. Additions
// only, each rounded once: no contraction into an fma is possible. Exact for operands
// below 2^1023 in magnitude (every float32/half logit converted to double).
DSSN_HD bool margin_below(double a, double z, double tau) {
  if (a == z) return 0.0 < tau;
#if defined(__CUDA_ARCH__)
  const double s = __dsub_rn(a, z);
  const double v = __dsub_rn(s, a);
  const double e = __dadd_rn(__dsub_rn(a, __dsub_rn(s, v)), __dsub_rn(-z, v));
#else
  const double s = a - z;
  const double v = s - a;
  const double e = (a - (s - v)) + (-z - v);
#endif
  return s < tau || (s == tau && e < 0.0);
}

}  // namespace dssn
