// CUDA kernel of dssn::expand_: writes a window of split-noise variants of a batch of
// images straight into a caller-owned workspace. Same math and same bits as
// csrc/cpu/expand.cpp: both evaluate csrc/dssn_noise.h, whose device path uses only
// correctly rounded intrinsics (__frcp_rn, __fadd_rn, __fmul_rn, __fdiv_rn), so the
// result does not depend on --fmad or --use_fast_math.
//
// No torch headers here: the binding (binding.cpp) calls the launchers in launchers.h.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "../dssn_noise.h"
#include "launchers.h"

namespace {

constexpr int kThreads = 256;      // threads per block (blockDim.x * blockDim.y)
constexpr int kRowsPerThread = 8;  // consecutive output rows handled by one thread
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

template <typename out_t>
__device__ __forceinline__ out_t to_out(float x);

template <>
__device__ __forceinline__ float to_out<float>(float x) {
  return x;
}

template <>
__device__ __forceinline__ __half to_out<__half>(float x) {
  return __float2half_rn(x);
}

template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Output row r = b * count + c holds variant t = start + c of image b. Thread (x, y)
// owns pixel i (grid-stride over d along x) and runs of kRowsPerThread consecutive rows
// (grid-stride along y), so it loads offsets[i] once and levels[b, i] once per image.
// Stores are coalesced: consecutive threadIdx.x write consecutive pixels of one row.
template <typename out_t, typename level_t>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(out_t* __restrict__ out, const level_t* __restrict__ levels,
                  const int32_t* __restrict__ offsets, int64_t rows, int64_t count,
                  int64_t d, int L, int q, int64_t start) {
  const dssn::SplitDivisor div = dssn::make_divisor(L);
  const float four_q = float(4 * q);
  const int64_t i_step = int64_t(gridDim.x) * blockDim.x;
  const int64_t r_step = int64_t(gridDim.y) * blockDim.y * kRowsPerThread;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < d; i += i_step) {
    const int v = offsets[i];
    for (int64_t r0 = (int64_t(blockIdx.y) * blockDim.y + threadIdx.y) * kRowsPerThread;
         r0 < rows; r0 += r_step) {
      int64_t b = r0 / count;
      int64_t c = r0 - b * count;  // 0 <= c < count
      int k = int(levels[b * d + i]);
#pragma unroll
      for (int s = 0; s < kRowsPerThread; ++s) {
        if (r0 + s < rows) {
          const int j = dssn::split_index(v, int(start + c), L);
          out[(r0 + s) * d + i] =
              to_out<out_t>(dssn::noise_value(dssn::noise_numerator(k, j, q, div), four_q));
          if (++c == count) {  // next row starts the next image
            c = 0;
            ++b;
            if (r0 + s + 1 < rows) k = int(levels[b * d + i]);
          }
        }
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

namespace dssn {

template <typename out_t, typename level_t>
cudaError_t launch_expand(out_t* out, const level_t* levels, const int32_t* offsets,
                          int64_t B, int64_t count, int64_t d, int L, int q, int64_t start,
                          cudaStream_t stream) {
  const int64_t rows = B * count;
  if (rows <= 0 || d <= 0) return cudaSuccess;
  // Narrow images (d < 256) get several rows per block so no threads idle along x.
  int bx = 32;
  while (bx < kThreads && bx < d) bx *= 2;
  const int by = kThreads / bx;
  const int64_t gx = ceil_div(d, bx);
  const int64_t gy = ceil_div(rows, int64_t(by) * kRowsPerThread);
  const dim3 block{unsigned(bx), unsigned(by), 1u};
  const dim3 grid{unsigned(gx < kMaxGridX ? gx : kMaxGridX),
                  unsigned(gy < kMaxGridY ? gy : kMaxGridY), 1u};
  expand_kernel<out_t, level_t><<<grid, block, 0, stream>>>(out, levels, offsets, rows,
                                                            count, d, L, q, start);
  return cudaGetLastError();
}

// The instantiations launchers.h promises (the binding links against these).
#define DSSN_INSTANTIATE_EXPAND(OUT_T, LEVEL_T)                                           \
  template cudaError_t launch_expand<OUT_T, LEVEL_T>(OUT_T*, const LEVEL_T*,              \
                                                     const int32_t*, int64_t, int64_t,    \
                                                     int64_t, int, int, int64_t,          \
                                                     cudaStream_t);

DSSN_INSTANTIATE_EXPAND(float, uint8_t)
DSSN_INSTANTIATE_EXPAND(float, int32_t)
DSSN_INSTANTIATE_EXPAND(__half, uint8_t)
DSSN_INSTANTIATE_EXPAND(__half, int32_t)
DSSN_INSTANTIATE_EXPAND(__nv_bfloat16, uint8_t)
DSSN_INSTANTIATE_EXPAND(__nv_bfloat16, int32_t)

#undef DSSN_INSTANTIATE_EXPAND

}  // namespace dssn
