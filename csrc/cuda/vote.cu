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

template <typename T>
struct Cmp {
  using type = float;
};
template <>
struct Cmp<double> {
  using type = double;
};

__device__ __forceinline__ float to_cmp(float x) { return x; }
__device__ __forceinline__ double to_cmp(double x) { return x; }
__device__ __forceinline__ float to_cmp(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_cmp(__nv_bfloat16 x) { return __bfloat162float(x); }

// (v, i) beats (bv, bi): larger value, or equal value and smaller index.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, long long i, acc_t bv, long long bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vote_kernel(unsigned long long* __restrict__ counts,
                unsigned long long* __restrict__ nan_rows,
                const scalar_t* __restrict__ logits, int64_t R, int64_t K, int64_t row0,
                int64_t rows_per_image) {
  using acc_t = typename Cmp<scalar_t>::type;
  const int lane = int(threadIdx.x) & (kWarp - 1);
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp_step = int64_t(gridDim.x) * warps_per_block;
  // r is the same for all lanes of a warp, so every shuffle below has the full warp.
  for (int64_t r = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; r < R;
       r += warp_step) {
    const scalar_t* row = logits + r * K;
    acc_t best = acc_t(0);
    long long arg = K;  // sentinel: loses to any real column
    bool nan = false;
    for (int64_t c = lane; c < K; c += kWarp) {
      const acc_t v = to_cmp(row[c]);
      if (isnan(v)) {
        nan = true;
      } else if (arg == K || v > best) {  // columns ascend within a lane: first max wins
        best = v;
        arg = c;
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const acc_t other_best = __shfl_down_sync(kFullMask, best, off);
      const long long other_arg = __shfl_down_sync(kFullMask, arg, off);
      if (other_arg != K && (arg == K || beats(other_best, other_arg, best, arg))) {
        best = other_best;
        arg = other_arg;
      }
    }
    nan = __any_sync(kFullMask, nan);
    if (lane == 0) {
      if (nan) {
        atomicAdd(nan_rows, 1ull);
      } else {
        atomicAdd(counts + ((row0 + r) / rows_per_image) * K + arg, 1ull);
      }
    }
  }
}

template <typename scalar_t>
cudaError_t launch_vote(int64_t* counts, int64_t* nan_rows, const scalar_t* logits,
                        int64_t R, int64_t K, int64_t row0, int64_t rows_per_image,
                        cudaStream_t stream) {
  if (R <= 0 || K <= 0) return cudaSuccess;
  const int64_t warps_per_block = kThreads / kWarp;
  int64_t blocks = (R + warps_per_block - 1) / warps_per_block;
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  // int64 and unsigned long long are both 64-bit two's complement: adding 1 is the same.
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit counters");
  vote_kernel<scalar_t><<<unsigned(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<unsigned long long*>(counts),
      reinterpret_cast<unsigned long long*>(nan_rows), logits, R, K, row0, rows_per_image);
  return cudaGetLastError();
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

template <typename acc_t>
__device__ __forceinline__ acc_t larger(acc_t a, acc_t b) {
  return b > a ? b : a;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vote_margin_kernel(unsigned long long* __restrict__ counts,
                       unsigned long long* __restrict__ ambiguous,
                       unsigned long long* __restrict__ nan_rows,
                       const scalar_t* __restrict__ logits, int64_t R, int64_t K,
                       int64_t row0, int64_t rows_per_image, double tau) {
  using acc_t = typename Cmp<scalar_t>::type;
  const int lane = int(threadIdx.x) & (kWarp - 1);
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp_step = int64_t(gridDim.x) * warps_per_block;
  for (int64_t r = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; r < R;
       r += warp_step) {
    const scalar_t* row = logits + r * K;
    acc_t best = acc_t(0);
    acc_t runner = -acc_t(HUGE_VAL);  // the maximum of the lane's other columns
    long long arg = K;                // sentinel: loses to any real column
    bool nan = false;
    for (int64_t c = lane; c < K; c += kWarp) {
      const acc_t v = to_cmp(row[c]);
      if (isnan(v)) {
        nan = true;
      } else if (arg == K || v > best) {  // columns ascend within a lane: first max wins
        if (arg != K) runner = best;
        best = v;
        arg = c;
      } else {
        runner = larger(runner, v);
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const acc_t other_best = __shfl_down_sync(kFullMask, best, off);
      const acc_t other_runner = __shfl_down_sync(kFullMask, runner, off);
      const long long other_arg = __shfl_down_sync(kFullMask, arg, off);
      if (other_arg == K) continue;
      if (arg == K) {
        best = other_best;
        runner = other_runner;
        arg = other_arg;
      } else if (beats(other_best, other_arg, best, arg)) {
        runner = larger(larger(runner, other_runner), best);
        best = other_best;
        arg = other_arg;
      } else {
        runner = larger(larger(runner, other_runner), other_best);
      }
    }
    nan = __any_sync(kFullMask, nan);
    // lane 0 holds the row's result; every lane needs the top value and the decision
    const double top = double(__shfl_sync(kFullMask, best, 0));
    const int ambiguous_here = int(!nan && dssn::margin_below(top, double(runner), tau));
    const bool amb = __shfl_sync(kFullMask, ambiguous_here, 0) != 0;
    const int64_t image = (row0 + r) / rows_per_image;
    if (amb) {
      for (int64_t c = lane; c < K; c += kWarp) {
        if (dssn::margin_below(top, to_double(row[c]), tau)) {
          atomicAdd(ambiguous + image * K + c, 1ull);
        }
      }
    } else if (lane == 0) {
      if (nan) {
        atomicAdd(nan_rows, 1ull);
      } else {
        atomicAdd(counts + image * K + arg, 1ull);
      }
    }
  }
}

template <typename scalar_t>
cudaError_t launch_vote_margin(int64_t* counts, int64_t* ambiguous, int64_t* nan_rows,
                               const scalar_t* logits, int64_t R, int64_t K, int64_t row0,
                               int64_t rows_per_image, double margin, cudaStream_t stream) {
  if (R <= 0 || K <= 0) return cudaSuccess;
  const int64_t warps_per_block = kThreads / kWarp;
  int64_t blocks = (R + warps_per_block - 1) / warps_per_block;
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  vote_margin_kernel<scalar_t><<<unsigned(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<unsigned long long*>(counts),
      reinterpret_cast<unsigned long long*>(ambiguous),
      reinterpret_cast<unsigned long long*>(nan_rows), logits, R, K, row0, rows_per_image,
      margin);
  return cudaGetLastError();
}

}  // namespace

#define DSSN_DEFINE_VOTE(NAME, LOGIT_T)                                                     \
  extern "C" cudaError_t NAME(int64_t* counts, int64_t* nan_rows, const LOGIT_T* logits,   \
                              int64_t R, int64_t K, int64_t row0, int64_t rows_per_image,  \
                              cudaStream_t stream) {                                       \
    return launch_vote<LOGIT_T>(counts, nan_rows, logits, R, K, row0, rows_per_image,      \
                                stream);                                                   \
  }

DSSN_DEFINE_VOTE(dssn_vote_f32, float)
DSSN_DEFINE_VOTE(dssn_vote_f64, double)
DSSN_DEFINE_VOTE(dssn_vote_f16, __half)
DSSN_DEFINE_VOTE(dssn_vote_bf16, __nv_bfloat16)

#undef DSSN_DEFINE_VOTE

#define DSSN_DEFINE_VOTE_MARGIN(NAME, LOGIT_T)                                           \
  extern "C" cudaError_t NAME(int64_t* counts, int64_t* ambiguous, int64_t* nan_rows,   \
                              const LOGIT_T* logits, int64_t R, int64_t K, int64_t row0, \
                              int64_t rows_per_image, double margin,                    \
                              cudaStream_t stream) {                                    \
    return launch_vote_margin<LOGIT_T>(counts, ambiguous, nan_rows, logits, R, K, row0,  \
                                       rows_per_image, margin, stream);                 \
  }

DSSN_DEFINE_VOTE_MARGIN(dssn_vote_margin_f32, float)
DSSN_DEFINE_VOTE_MARGIN(dssn_vote_margin_f64, double)
DSSN_DEFINE_VOTE_MARGIN(dssn_vote_margin_f16, __half)
DSSN_DEFINE_VOTE_MARGIN(dssn_vote_margin_bf16, __nv_bfloat16)

#undef DSSN_DEFINE_VOTE_MARGIN
