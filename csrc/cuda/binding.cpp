// CUDA implementations of the dssn ops declared in csrc/ops.cpp: the thin torch layer over
// the raw-pointer launchers of expand.cu and vote.cu (see launchers.h). Same checks as the
// CPU kernels (csrc/cpu/expand.cpp, csrc/cpu/vote.cpp), plus devices and, for half
// outputs, the q limits under which the rounded float32 rounds again exactly.
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

#include <cmath>

#include "../dssn_noise.h"
#include "launchers.h"

namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

// Largest q (exclusive) for which converting the correctly rounded float32 of m / (4q)
// to fp16 / bf16 gives the correctly rounded half of m / (4q) (no double rounding).
constexpr int64_t kMaxQHalf = 1024;
constexpr int64_t kMaxQBFloat16 = 8192;

void expand_cuda(at::Tensor out, const at::Tensor& levels, const at::Tensor& offsets,
                 int64_t num_variants, int64_t q, int64_t start) {
  const auto out_type = out.scalar_type();
  TORCH_CHECK((out_type == at::kFloat || out_type == at::kHalf || out_type == at::kBFloat16) &&
                  out.is_contiguous() && out.dim() == 3,
              "dssn::expand_: out must be a contiguous float32, float16 or bfloat16 "
              "[B, count, d] tensor");
  TORCH_CHECK(levels.dim() == 2 && levels.is_contiguous(),
              "dssn::expand_: levels must be a contiguous [B, d] tensor");
  TORCH_CHECK(levels.scalar_type() == at::kByte || levels.scalar_type() == at::kInt,
              "dssn::expand_: levels must be uint8 or int32, got ", levels.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() &&
                  offsets.dim() == 1,
              "dssn::expand_: offsets must be a contiguous int32 [d] tensor");
  TORCH_CHECK(out.is_cuda() && levels.device() == out.device() &&
                  offsets.device() == out.device(),
              "dssn::expand_: out, levels and offsets must be on the same CUDA device, got ",
              out.device(), ", ", levels.device(), " and ", offsets.device());
  const int64_t B = levels.size(0), d = levels.size(1), count = out.size(1);
  TORCH_CHECK(out.size(0) == B && out.size(2) == d && offsets.size(0) == d,
              "dssn::expand_: shapes of out ", out.sizes(), ", levels ", levels.sizes(),
              " and offsets ", offsets.sizes(), " disagree");
  TORCH_CHECK(num_variants >= 1 && q >= 1 &&
                  q + num_variants <= dssn::kMaxLevelsPlusVariants,
              "dssn::expand_: need L >= 1, q >= 1 and q + L <= 2^21");
  TORCH_CHECK(start >= 0 && start + count <= num_variants,
              "dssn::expand_: variant window [", start, ", ", start + count,
              ") is outside 0..", num_variants);
  TORCH_CHECK(out_type != at::kHalf || q < kMaxQHalf,
              "dssn::expand_: float16 output needs q < ", kMaxQHalf, " (got q = ", q,
              "); use a float32 or bfloat16 workspace");
  TORCH_CHECK(out_type != at::kBFloat16 || q < kMaxQBFloat16,
              "dssn::expand_: bfloat16 output needs q < ", kMaxQBFloat16, " (got q = ", q,
              "); use a float32 workspace");
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

void vote_cuda(at::Tensor counts, at::Tensor nan_rows, const at::Tensor& logits,
               int64_t row0, int64_t rows_per_image) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2,
              "dssn::vote_: counts must be a contiguous int64 [B, K] tensor");
  TORCH_CHECK(nan_rows.scalar_type() == at::kLong && nan_rows.numel() == 1,
              "dssn::vote_: nan_rows must be an int64 tensor with one element");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == counts.size(1),
              "dssn::vote_: logits ", logits.sizes(), " do not match counts ", counts.sizes());
  TORCH_CHECK(rows_per_image >= 1 && row0 >= 0, "dssn::vote_: bad row mapping");
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              "dssn::vote_: logits must be float32, float64, float16 or bfloat16, got ",
              type);
  TORCH_CHECK(counts.is_cuda() && nan_rows.device() == counts.device() &&
                  logits.device() == counts.device(),
              "dssn::vote_: counts, nan_rows and logits must be on the same CUDA device, "
              "got ", counts.device(), ", ", nan_rows.device(), " and ", logits.device());
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(K >= 1, "dssn::vote_: logits have no classes");
  TORCH_CHECK((row0 + R - 1) / rows_per_image < counts.size(0),
              "dssn::vote_: rows map past the last image of counts");

  const c10::cuda::CUDAGuard guard(counts.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = logits.contiguous();
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* n = nan_rows.data_ptr<int64_t>();  // the single element, whatever its strides
  const void* p = x.data_ptr();
  cudaError_t err;
  if (type == at::kFloat) {
    err = dssn_vote_f32(c, n, static_cast<const float*>(p), R, K, row0, rows_per_image,
                        stream);
  } else if (type == at::kDouble) {
    err = dssn_vote_f64(c, n, static_cast<const double*>(p), R, K, row0, rows_per_image,
                        stream);
  } else if (type == at::kHalf) {
    err = dssn_vote_f16(c, n, static_cast<const __half*>(p), R, K, row0, rows_per_image,
                        stream);
  } else {
    err = dssn_vote_bf16(c, n, static_cast<const __nv_bfloat16*>(p), R, K, row0,
                         rows_per_image, stream);
  }
  check_launch(err, "dssn::vote_");
}

void vote_margin_cuda(at::Tensor counts, at::Tensor ambiguous, at::Tensor nan_rows,
                      const at::Tensor& logits, int64_t row0, int64_t rows_per_image,
                      double margin) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2,
              "dssn::vote_margin_: counts must be a contiguous int64 [B, K] tensor");
  TORCH_CHECK(ambiguous.scalar_type() == at::kLong && ambiguous.is_contiguous() &&
                  ambiguous.sizes() == counts.sizes(),
              "dssn::vote_margin_: ambiguous must be a contiguous int64 tensor shaped like "
              "counts ", counts.sizes(), ", got ", ambiguous.sizes());
  TORCH_CHECK(nan_rows.scalar_type() == at::kLong && nan_rows.numel() == 1,
              "dssn::vote_margin_: nan_rows must be an int64 tensor with one element");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == counts.size(1),
              "dssn::vote_margin_: logits ", logits.sizes(), " do not match counts ",
              counts.sizes());
  TORCH_CHECK(rows_per_image >= 1 && row0 >= 0, "dssn::vote_margin_: bad row mapping");
  TORCH_CHECK(margin >= 0.0 && std::isfinite(margin),
              "dssn::vote_margin_: margin must be finite and >= 0, got ", margin);
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              "dssn::vote_margin_: logits must be float32, float64, float16 or bfloat16, "
              "got ", type);
  TORCH_CHECK(counts.is_cuda() && ambiguous.device() == counts.device() &&
                  nan_rows.device() == counts.device() && logits.device() == counts.device(),
              "dssn::vote_margin_: counts, ambiguous, nan_rows and logits must be on the same "
              "CUDA device, got ", counts.device(), ", ", ambiguous.device(), ", ",
              nan_rows.device(), " and ", logits.device());
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(K >= 2, "dssn::vote_margin_: logits need at least 2 classes");
  TORCH_CHECK((row0 + R - 1) / rows_per_image < counts.size(0),
              "dssn::vote_margin_: rows map past the last image of counts");

  const c10::cuda::CUDAGuard guard(counts.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = logits.contiguous();
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* a = ambiguous.data_ptr<int64_t>();
  int64_t* n = nan_rows.data_ptr<int64_t>();
  const void* p = x.data_ptr();
  cudaError_t err;
  if (type == at::kFloat) {
    err = dssn_vote_margin_f32(c, a, n, static_cast<const float*>(p), R, K, row0,
                               rows_per_image, margin, stream);
  } else if (type == at::kDouble) {
    err = dssn_vote_margin_f64(c, a, n, static_cast<const double*>(p), R, K, row0,
                               rows_per_image, margin, stream);
  } else if (type == at::kHalf) {
    err = dssn_vote_margin_f16(c, a, n, static_cast<const __half*>(p), R, K, row0,
                               rows_per_image, margin, stream);
  } else {
    err = dssn_vote_margin_bf16(c, a, n, static_cast<const __nv_bfloat16*>(p), R, K, row0,
                                rows_per_image, margin, stream);
  }
  check_launch(err, "dssn::vote_margin_");
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CUDA, m) {
  m.impl("expand_", &expand_cuda);
  m.impl("vote_", &vote_cuda);
  m.impl("vote_margin_", &vote_margin_cuda);
}
