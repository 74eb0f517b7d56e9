// Host launchers of the dssn CUDA kernels (csrc/cuda/expand.cu, csrc/cuda/vote.cu:
// expand_, vote_, vote_margin_).
//
// Function templates over raw device pointers and a stream, with no torch headers, so the
// kernels compile with bare nvcc and the thin torch binding (binding.cpp) is the only file
// that knows about tensors. They are declared here and defined, with one explicit
// instantiation per supported element type (the type lists below), in the .cu files; the
// binding picks the instantiation from the tensors' dtypes in one place. Every launcher
// checks nothing about its inputs (the binding does: shapes, dtypes, devices,
// q + L <= 2^21, fp16/bf16 q limits), returns immediately for empty work, and otherwise
// returns cudaGetLastError() after the launch.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace dssn {

// The element types the launchers are instantiated for: the .cu files instantiate every
// one, the binding dispatches a tensor's dtype over these lists (and only these).
template <typename... Ts>
struct TypeList {};
using ExpandOutputTypes = TypeList<float, __half, __nv_bfloat16>;
using ExpandLevelTypes = TypeList<uint8_t, int32_t>;
using LogitTypes = TypeList<float, double, __half, __nv_bfloat16>;

// dssn::expand_: writes variants start .. start + count - 1 of every image.
//   out:     [B, count, d] contiguous; element (b, c, i) is the float32 nearest to
//            m / (4q) (m = dssn::noise_numerator of level k = levels[b, i] and split index
//            j = (offsets[i] + start + c) mod L), converted with round-to-nearest-even to
//            __half / __nv_bfloat16 for the half outputs (equal to the correctly rounded
//            half of m / (4q) for q <= 1023 (fp16) and q <= 8191 (bf16)).
//   levels:  [B, d] contiguous, values in 0..q.
//   offsets: [d] contiguous, values in 0..L-1.
//   Requires L >= 1, q >= 1, q + L <= 2^21, 0 <= start, start + count <= L.
// Instantiated for every out_t of ExpandOutputTypes and level_t of ExpandLevelTypes
// (expand.cu).
template <typename out_t, typename level_t>
cudaError_t launch_expand(out_t* out, const level_t* levels, const int32_t* offsets,
                          int64_t B, int64_t count, int64_t d, int L, int q, int64_t start,
                          cudaStream_t stream);

// dssn::vote_: for every row r of logits [R, K] (contiguous), adds 1 to
// counts[(row0 + r) / rows_per_image, argmax_r] (counts: int64 [B, K] contiguous; argmax
// with the first index winning ties, comparisons in float for half/bf16 as the CPU kernel
// does), or, if the row holds a NaN, adds 1 to nan_rows[0] instead. The caller guarantees
// (row0 + R - 1) / rows_per_image < B, rows_per_image >= 1, row0 >= 0, K >= 1.
// Counts are accumulated with atomics, so the result does not depend on scheduling.
// Instantiated for every logit_t of LogitTypes (vote.cu).
template <typename logit_t>
cudaError_t launch_vote(int64_t* counts, int64_t* nan_rows, const logit_t* logits,
                        int64_t R, int64_t K, int64_t row0, int64_t rows_per_image,
                        cudaStream_t stream);

// dssn::vote_margin_: vote_ with a margin tau = margin (finite, >= 0; the rule of
// dssn::margin_below in csrc/dssn_noise.h, logits read exactly as double): a NaN-free row
// whose top value T beats the runner-up by less than tau adds 1 to
// ambiguous[(row0 + r) / rows_per_image, c] for every class c with gap(T, logit_c) < tau
// and does not vote; every other row votes as in vote_. ambiguous: int64 [B, K]
// contiguous like counts. Same caller guarantees as vote_, and K >= 2. Atomics only.
// Instantiated for every logit_t of LogitTypes (vote.cu).
template <typename logit_t>
cudaError_t launch_vote_margin(int64_t* counts, int64_t* ambiguous, int64_t* nan_rows,
                               const logit_t* logits, int64_t R, int64_t K, int64_t row0,
                               int64_t rows_per_image, double margin, cudaStream_t stream);

}  // namespace dssn
