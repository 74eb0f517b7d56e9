// CUDA kernel of dssn::vote_: fused argmax-and-vote, same semantics as
// csrc/cpu/vote.cpp. Each logits row is reduced to its argmax (first index wins ties, as
// torch.argmax; half/bf16 compared as float, double as double) and one vote is added into
// int64 counts; a row holding a NaN does not vote and is counted into nan_rows instead.
//
// One warp per row. Each lane scans the columns lane, lane + 32, ... keeping the
// lexicographic maximum of (value, -index); the lanes are then combined by the same rule
// with shuffles. That maximum is unique (IEEE == on non-NaN values is an equivalence, so
// -0.0 and +0.0 tie and the lower index wins, exactly as the CPU's sequential ">" scan),
// hence the winner does not depend on the reduction order. Votes are integer atomics.
//
// vote_margin_ (same semantics as the CPU kernel): the margin rule of csrc/dssn_noise.h
// (dssn::margin_below) on the top value, its first index and the runner-up value, all
// read exactly as double. The lane-local scans and the shuffle merge also carry the
// runner-up (the maximum once the winning entry is removed: the larger of both
// runners-up and the losing maximum); like the top value it is one well-defined number,
// whatever the reduction order. An ambiguous row then takes a second pass over its
// columns, each lane adding its ambiguous classes with int64 atomics.
//
// No torch headers here: the binding (binding.cpp) calls the launchers in launchers.h.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "../dssn_noise.h"
#include "launchers.h"

namespace {

constexpr int kThreads = 256;  // 8 warps, 8 rows in flight per block
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride beyond this

using dssn::Cmp;  // the type a logit is compared in (csrc/dssn_noise.h)

__device__ __forceinline__ float to_cmp(float x) { return x; }
__device__ __forceinline__ double to_cmp(double x) { return x; }
__device__ __forceinline__ float to_cmp(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_cmp(__nv_bfloat16 x) { return __bfloat162float(x); }

// (v, i) beats (bv, bi): larger value, or equal value and smaller index.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, long long i, acc_t bv, long long bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename acc_t>
__device__ __forceinline__ acc_t larger(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// The rows of a warp: r = first, first + step, ... (< R). r is the same for all lanes of a
// warp, so every shuffle in the loop body has the full warp.
struct WarpRows {
  int lane;
  int64_t first, step;
};

__device__ __forceinline__ WarpRows warp_rows() {
  const int64_t warps_per_block = blockDim.x / kWarp;
  return {int(threadIdx.x) & (kWarp - 1),
          int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp,
          int64_t(gridDim.x) * warps_per_block};
}

// The reduction of one row by its warp. best, arg (and runner) are the row's on lane 0;
// nan is the row's on every lane.
template <typename acc_t>
struct RowTop {
  acc_t best;     // the maximum of the non-NaN columns
  acc_t runner;   // kRunner only: the maximum once the entry (best, arg) is removed
  long long arg;  // the first column holding best; K (sentinel) when there is none
  bool nan;       // the row holds a NaN
};

// Each lane scans the columns lane, lane + 32, ... keeping the lexicographic maximum of
// (value, -index) (and, with kRunner, the runner-up); the lanes are then merged by the same
// rule with shuffles (runner-up: the larger of both runners-up and the losing maximum).
template <bool kRunner, typename scalar_t>
__device__ __forceinline__ RowTop<typename Cmp<scalar_t>::type> reduce_row(
    const scalar_t* __restrict__ row, int64_t K, int lane) {
  using acc_t = typename Cmp<scalar_t>::type;
  RowTop<acc_t> t{acc_t(0), -acc_t(HUGE_VAL), K, false};  // arg = K: loses to any column
  for (int64_t c = lane; c < K; c += kWarp) {
    const acc_t v = to_cmp(row[c]);
    if (isnan(v)) {
      t.nan = true;
    } else if (t.arg == K || v > t.best) {  // columns ascend within a lane: first max wins
      if (kRunner && t.arg != K) t.runner = t.best;
      t.best = v;
      t.arg = c;
    } else if (kRunner) {
      t.runner = larger(t.runner, v);
    }
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const acc_t other_best = __shfl_down_sync(kFullMask, t.best, off);
    acc_t other_runner = t.runner;
    if constexpr (kRunner) other_runner = __shfl_down_sync(kFullMask, t.runner, off);
    const long long other_arg = __shfl_down_sync(kFullMask, t.arg, off);
    if (other_arg == K) continue;
    if (t.arg == K) {
      t.best = other_best;
      t.runner = other_runner;
      t.arg = other_arg;
    } else if (beats(other_best, other_arg, t.best, t.arg)) {
      if (kRunner) t.runner = larger(larger(t.runner, other_runner), t.best);
      t.best = other_best;
      t.arg = other_arg;
    } else if (kRunner) {
      t.runner = larger(larger(t.runner, other_runner), other_best);
    }
  }
  t.nan = __any_sync(kFullMask, t.nan);
  return t;
}

// Lane 0's vote for a reduced row of image `image`: its argmax, or a NaN row.
template <typename acc_t>
__device__ __forceinline__ void cast_vote(unsigned long long* __restrict__ counts,
                                          unsigned long long* __restrict__ nan_rows,
                                          int64_t image, int64_t K, const RowTop<acc_t>& t) {
  if (t.nan) {
    atomicAdd(nan_rows, 1ull);
  } else {
    atomicAdd(counts + image * K + t.arg, 1ull);
  }
}

// Blocks for R rows, one warp per row, grid-stride beyond kMaxGrid.
inline unsigned grid_blocks(int64_t R) {
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks = (R + warps_per_block - 1) / warps_per_block;
  return unsigned(blocks > kMaxGrid ? kMaxGrid : blocks);
}

// int64 and unsigned long long are both 64-bit two's complement: adding 1 is the same.
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit counters");
inline unsigned long long* as_u64(int64_t* p) {
  return reinterpret_cast<unsigned long long*>(p);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vote_kernel(unsigned long long* __restrict__ counts,
                unsigned long long* __restrict__ nan_rows,
                const scalar_t* __restrict__ logits, int64_t R, int64_t K, int64_t row0,
                int64_t rows_per_image) {
  const WarpRows w = warp_rows();
  for (int64_t r = w.first; r < R; r += w.step) {
    const auto t = reduce_row<false>(logits + r * K, K, w.lane);
    if (w.lane == 0) cast_vote(counts, nan_rows, (row0 + r) / rows_per_image, K, t);
  }
}

// Logits read exactly as double (half and bfloat16 through float, exactly) for the margin
// test; the scan compares in float (double for double logits), as vote_kernel does, which
// orders the values exactly as double would.
__device__ __forceinline__ double to_double(float x) { return double(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return double(__half2float(x)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) {
  return double(__bfloat162float(x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vote_margin_kernel(unsigned long long* __restrict__ counts,
                       unsigned long long* __restrict__ ambiguous,
                       unsigned long long* __restrict__ nan_rows,
                       const scalar_t* __restrict__ logits, int64_t R, int64_t K,
                       int64_t row0, int64_t rows_per_image, double tau) {
  const WarpRows w = warp_rows();
  for (int64_t r = w.first; r < R; r += w.step) {
    const scalar_t* row = logits + r * K;
    const auto t = reduce_row<true>(row, K, w.lane);
    // lane 0 holds the row's result; every lane needs the top value and the decision
    const double top = double(__shfl_sync(kFullMask, t.best, 0));
    const int ambiguous_here = int(!t.nan && dssn::margin_below(top, double(t.runner), tau));
    const bool amb = __shfl_sync(kFullMask, ambiguous_here, 0) != 0;
    const int64_t image = (row0 + r) / rows_per_image;
    if (amb) {
      for (int64_t c = w.lane; c < K; c += kWarp) {
        if (dssn::margin_below(top, to_double(row[c]), tau)) {
          atomicAdd(ambiguous + image * K + c, 1ull);
        }
      }
    } else if (w.lane == 0) {
      cast_vote(counts, nan_rows, image, K, t);
    }
  }
}

}  // namespace

namespace dssn {

template <typename logit_t>
cudaError_t launch_vote(int64_t* counts, int64_t* nan_rows, const logit_t* logits,
                        int64_t R, int64_t K, int64_t row0, int64_t rows_per_image,
                        cudaStream_t stream) {
  if (R <= 0 || K <= 0) return cudaSuccess;
  vote_kernel<logit_t><<<grid_blocks(R), kThreads, 0, stream>>>(
      as_u64(counts), as_u64(nan_rows), logits, R, K, row0, rows_per_image);
  return cudaGetLastError();
}

template <typename logit_t>
cudaError_t launch_vote_margin(int64_t* counts, int64_t* ambiguous, int64_t* nan_rows,
                               const logit_t* logits, int64_t R, int64_t K, int64_t row0,
                               int64_t rows_per_image, double margin, cudaStream_t stream) {
  if (R <= 0 || K <= 0) return cudaSuccess;
  vote_margin_kernel<logit_t><<<grid_blocks(R), kThreads, 0, stream>>>(
      as_u64(counts), as_u64(ambiguous), as_u64(nan_rows), logits, R, K, row0,
      rows_per_image, margin);
  return cudaGetLastError();
}

// The instantiations launchers.h promises (the binding links against these).
#define DSSN_INSTANTIATE_VOTE(LOGIT_T)                                                     \
  template cudaError_t launch_vote<LOGIT_T>(int64_t*, int64_t*, const LOGIT_T*, int64_t,  \
                                            int64_t, int64_t, int64_t, cudaStream_t);      \
  template cudaError_t launch_vote_margin<LOGIT_T>(int64_t*, int64_t*, int64_t*,           \
                                                   const LOGIT_T*, int64_t, int64_t,       \
                                                   int64_t, int64_t, double, cudaStream_t);

DSSN_INSTANTIATE_VOTE(float)
DSSN_INSTANTIATE_VOTE(double)
DSSN_INSTANTIATE_VOTE(__half)
DSSN_INSTANTIATE_VOTE(__nv_bfloat16)

#undef DSSN_INSTANTIATE_VOTE

}  // namespace dssn
