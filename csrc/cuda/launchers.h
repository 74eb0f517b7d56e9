// Host launchers of the dssn CUDA kernels (csrc/cuda/expand.cu, csrc/cuda/vote.cu:
// expand_, vote_, vote_margin_).
//
// Plain C signatures over raw device pointers and a stream, with no torch headers, so
// the kernels compile with bare nvcc and the thin torch binding (binding.cpp) is the
// only file that knows about tensors. Every launcher checks nothing about its inputs
// (the binding does: shapes, dtypes, devices, q + L <= 2^21, fp16/bf16 q limits), returns
// immediately for empty work, and otherwise returns cudaGetLastError() after the launch.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dssn::expand_: writes variants start .. start + count - 1 of every image.
//   out:     [B, count, d] contiguous; element (b, c, i) is the float32 nearest to
//            m / (4q) (m = dssn::noise_numerator of level k = levels[b, i] and split index
//            j = (offsets[i] + start + c) mod L), converted with round-to-nearest-even to
//            __half / __nv_bfloat16 for the half outputs (equal to the correctly rounded
//            half of m / (4q) for q < 1024 (fp16) and q < 8192 (bf16)).
//   levels:  [B, d] contiguous, values in 0..q.
//   offsets: [d] contiguous, values in 0..L-1.
//   Requires L >= 1, q >= 1, q + L <= 2^21, 0 <= start, start + count <= L.
#define DSSN_DECLARE_EXPAND(NAME, OUT_T, LEVEL_T)                                        \
  cudaError_t NAME(OUT_T* out, const LEVEL_T* levels, const int32_t* offsets, int64_t B, \
                   int64_t count, int64_t d, int L, int q, int64_t start,              \
                   cudaStream_t stream)

DSSN_DECLARE_EXPAND(dssn_expand_f32_u8, float, uint8_t);
DSSN_DECLARE_EXPAND(dssn_expand_f32_i32, float, int32_t);
DSSN_DECLARE_EXPAND(dssn_expand_f16_u8, __half, uint8_t);
DSSN_DECLARE_EXPAND(dssn_expand_f16_i32, __half, int32_t);
DSSN_DECLARE_EXPAND(dssn_expand_bf16_u8, __nv_bfloat16, uint8_t);
DSSN_DECLARE_EXPAND(dssn_expand_bf16_i32, __nv_bfloat16, int32_t);

#undef DSSN_DECLARE_EXPAND

// dssn::vote_: for every row r of logits [R, K] (contiguous), adds 1 to
// counts[(row0 + r) / rows_per_image, argmax_r] (counts: int64 [B, K] contiguous; argmax
// with the first index winning ties, comparisons in float for half/bf16 as the CPU kernel
// does), or, if the row holds a NaN, adds 1 to nan_rows[0] instead. The caller guarantees
// (row0 + R - 1) / rows_per_image < B, rows_per_image >= 1, row0 >= 0, K >= 1.
// Counts are accumulated with atomics, so the result does not depend on scheduling.
#define DSSN_DECLARE_VOTE(NAME, LOGIT_T)                                                 \
  cudaError_t NAME(int64_t* counts, int64_t* nan_rows, const LOGIT_T* logits, int64_t R, \
                   int64_t K, int64_t row0, int64_t rows_per_image, cudaStream_t stream)

DSSN_DECLARE_VOTE(dssn_vote_f32, float);
DSSN_DECLARE_VOTE(dssn_vote_f64, double);
DSSN_DECLARE_VOTE(dssn_vote_f16, __half);
DSSN_DECLARE_VOTE(dssn_vote_bf16, __nv_bfloat16);

#undef DSSN_DECLARE_VOTE

// dssn::vote_margin_: vote_ with a margin tau = margin (finite, >= 0; the rule of
// dssn::margin_below in csrc/dssn_noise.h, logits read exactly as double): a NaN-free row
// whose top value T beats the runner-up by less than tau adds 1 to
// ambiguous[(row0 + r) / rows_per_image, c] for every class c with gap(T, logit_c) < tau
// and does not vote; every other row votes as in vote_. ambiguous: int64 [B, K]
// contiguous like counts. Same caller guarantees as vote_, and K >= 2. Atomics only.
#define DSSN_DECLARE_VOTE_MARGIN(NAME, LOGIT_T)                                           \
  cudaError_t NAME(int64_t* counts, int64_t* ambiguous, int64_t* nan_rows,               \
                   const LOGIT_T* logits, int64_t R, int64_t K, int64_t row0,            \
                   int64_t rows_per_image, double margin, cudaStream_t stream)

DSSN_DECLARE_VOTE_MARGIN(dssn_vote_margin_f32, float);
DSSN_DECLARE_VOTE_MARGIN(dssn_vote_margin_f64, double);
DSSN_DECLARE_VOTE_MARGIN(dssn_vote_margin_f16, __half);
DSSN_DECLARE_VOTE_MARGIN(dssn_vote_margin_bf16, __nv_bfloat16);

#undef DSSN_DECLARE_VOTE_MARGIN

#ifdef __cplusplus
}  // extern "C"
#endif
