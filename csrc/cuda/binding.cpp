// CUDA implementations of the dssn ops declared in csrc/ops.cpp: the thin torch layer over
// the raw-pointer launchers of expand.cu and vote.cu (see launchers.h). The argument
// checks are the CPU kernels' (csrc/op_checks.h: shapes, dtypes, ranges, the half q
// limits); this file adds the device checks.
//
// Built only when torch is a CUDA build and a CUDA toolkit is found (setup.py).
//
// Only the light c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS,
// cuSPARSE and cuSOLVER headers): at::cuda is c10::cuda (c10/macros/Macros.h), so
// at::cuda::getCurrentCUDAStream is declared by c10/cuda/CUDAStream.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_checks.h"
#include "launchers.h"

namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

void expand_cuda(at::Tensor out, const at::Tensor& levels, const at::Tensor& offsets,
                 int64_t num_variants, int64_t q, int64_t start) {
  dssn::checks::expand_args(out, levels, offsets, num_variants, q, start);
  TORCH_CHECK(out.is_cuda() && levels.device() == out.device() &&
                  offsets.device() == out.device(),
              "dssn::expand_: out, levels and offsets must be on the same CUDA device, got ",
              out.device(), ", ", levels.device(), " and ", offsets.device());
  const auto out_type = out.scalar_type();
  const int64_t B = levels.size(0), d = levels.size(1), count = out.size(1);
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const int L = int(num_variants), qi = int(q);
  const int32_t* v = offsets.data_ptr<int32_t>();
  const bool u8 = levels.scalar_type() == at::kByte;
  const void* k = levels.data_ptr();
  void* o = out.data_ptr();
  cudaError_t err;
#define DSSN_EXPAND_CALL(SUFFIX, OUT_T)                                                   \
  err = u8 ? dssn_expand_##SUFFIX##_u8(static_cast<OUT_T*>(o),                            \
                                       static_cast<const uint8_t*>(k), v, B, count, d, L, \
                                       qi, start, stream)                                 \
           : dssn_expand_##SUFFIX##_i32(static_cast<OUT_T*>(o),                           \
                                        static_cast<const int32_t*>(k), v, B, count, d,   \
                                        L, qi, start, stream)
  if (out_type == at::kFloat) {
    DSSN_EXPAND_CALL(f32, float);
  } else if (out_type == at::kHalf) {
    DSSN_EXPAND_CALL(f16, __half);
  } else {
    DSSN_EXPAND_CALL(bf16, __nv_bfloat16);
  }
#undef DSSN_EXPAND_CALL
  check_launch(err, "dssn::expand_");
}

// The launch of vote_ / vote_margin_ (op) on logits' rows, once the arguments are checked:
// nothing for no rows; otherwise, on out's device and its current stream, calls
// launch(p, R, K, stream) with p the data of logits made contiguous (of logits' dtype) and
// checks the cudaError_t it returns.
template <typename Launch>
void launch_vote_op(const char* op, const at::Tensor& out, const at::Tensor& logits,
                    Launch&& launch) {
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = logits.contiguous();
  check_launch(launch(static_cast<const void*>(x.data_ptr()), R, K, stream), op);
}

void vote_cuda(at::Tensor counts, at::Tensor nan_rows, const at::Tensor& logits,
               int64_t row0, int64_t rows_per_image) {
  dssn::checks::vote_args(counts, nan_rows, logits, row0, rows_per_image);
  TORCH_CHECK(counts.is_cuda() && nan_rows.device() == counts.device() &&
                  logits.device() == counts.device(),
              "dssn::vote_: counts, nan_rows and logits must be on the same CUDA device, "
              "got ", counts.device(), ", ", nan_rows.device(), " and ", logits.device());
  const auto type = logits.scalar_type();
  launch_vote_op("dssn::vote_", counts, logits,
                 [&](const void* p, int64_t R, int64_t K, cudaStream_t stream) {
    int64_t* c = counts.data_ptr<int64_t>();
    int64_t* n = nan_rows.data_ptr<int64_t>();  // the single element, whatever its strides
    if (type == at::kFloat) {
      return dssn_vote_f32(c, n, static_cast<const float*>(p), R, K, row0, rows_per_image,
                           stream);
    } else if (type == at::kDouble) {
      return dssn_vote_f64(c, n, static_cast<const double*>(p), R, K, row0, rows_per_image,
                           stream);
    } else if (type == at::kHalf) {
      return dssn_vote_f16(c, n, static_cast<const __half*>(p), R, K, row0, rows_per_image,
                           stream);
    }
    return dssn_vote_bf16(c, n, static_cast<const __nv_bfloat16*>(p), R, K, row0,
                          rows_per_image, stream);
  });
}

void vote_margin_cuda(at::Tensor counts, at::Tensor ambiguous, at::Tensor nan_rows,
                      const at::Tensor& logits, int64_t row0, int64_t rows_per_image,
                      double margin) {
  dssn::checks::vote_margin_args(counts, ambiguous, nan_rows, logits, row0, rows_per_image,
                                 margin);
  TORCH_CHECK(counts.is_cuda() && ambiguous.device() == counts.device() &&
                  nan_rows.device() == counts.device() && logits.device() == counts.device(),
              "dssn::vote_margin_: counts, ambiguous, nan_rows and logits must be on the same "
              "CUDA device, got ", counts.device(), ", ", ambiguous.device(), ", ",
              nan_rows.device(), " and ", logits.device());
  const auto type = logits.scalar_type();
  launch_vote_op("dssn::vote_margin_", counts, logits,
                 [&](const void* p, int64_t R, int64_t K, cudaStream_t stream) {
    int64_t* c = counts.data_ptr<int64_t>();
    int64_t* a = ambiguous.data_ptr<int64_t>();
    int64_t* n = nan_rows.data_ptr<int64_t>();
    if (type == at::kFloat) {
      return dssn_vote_margin_f32(c, a, n, static_cast<const float*>(p), R, K, row0,
                                  rows_per_image, margin, stream);
    } else if (type == at::kDouble) {
      return dssn_vote_margin_f64(c, a, n, static_cast<const double*>(p), R, K, row0,
                                  rows_per_image, margin, stream);
    } else if (type == at::kHalf) {
      return dssn_vote_margin_f16(c, a, n, static_cast<const __half*>(p), R, K, row0,
                                  rows_per_image, margin, stream);
    }
    return dssn_vote_margin_bf16(c, a, n, static_cast<const __nv_bfloat16*>(p), R, K, row0,
                                 rows_per_image, margin, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CUDA, m) {
  m.impl("expand_", &expand_cuda);
  m.impl("vote_", &vote_cuda);
  m.impl("vote_margin_", &vote_margin_cuda);
}
