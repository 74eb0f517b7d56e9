// Argument checks of the dssn ops (declared in csrc/ops.cpp), in one place: every
// implementation calls these first, so the CPU kernels (csrc/cpu/*.cpp) and the CUDA
// binding (csrc/cuda/binding.cpp) accept the same arguments and fail with the same
// messages. Shapes, dtypes, contiguity and ranges only: the CUDA binding adds its own
// device checks.
//
// A torch-side header (ATen): the CUDA kernels (csrc/cuda/*.cu, launchers.h) must not
// include it, they stay free of torch headers and trust the binding's checks.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "dssn_noise.h"

namespace dssn {
namespace checks {

// The largest q allowed (inclusive: q <= kMaxQFor*) for a half output: up to it,
// converting the correctly rounded float32 of m / (4q) to fp16 / bf16 gives the correctly
// rounded half of m / (4q) (no double rounding). The same numbers, in the same convention,
// as spec.MAX_Q_FOR_DTYPE on the Python side (tests/test_op_limits.py ties them).
constexpr int64_t kMaxQForFloat16 = 1023;
constexpr int64_t kMaxQForBFloat16 = 8191;

// dssn::expand_(out, levels, offsets, num_variants, q, start): out contiguous
// float32/float16/bfloat16 [B, count, d], levels contiguous uint8/int32 [B, d], offsets
// contiguous int32 [d]; 1 <= L, 1 <= q, q + L <= 2^21; the window start..start+count-1
// inside 0..L-1; q <= kMaxQForFloat16 / kMaxQForBFloat16 for half outputs.
inline void expand_args(const at::Tensor& out, const at::Tensor& levels,
                        const at::Tensor& offsets, int64_t num_variants, int64_t q,
                        int64_t start) {
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
  TORCH_CHECK(out_type != at::kHalf || q <= kMaxQForFloat16,
              "dssn::expand_: float16 output needs q <= ", kMaxQForFloat16, " (got q = ", q,
              "); use a float32 or bfloat16 workspace");
  TORCH_CHECK(out_type != at::kBFloat16 || q <= kMaxQForBFloat16,
              "dssn::expand_: bfloat16 output needs q <= ", kMaxQForBFloat16, " (got q = ",
              q, "); use a float32 workspace");
}

// The checks vote_ and vote_margin_ share (``op`` names the op in the messages): counts
// contiguous int64 [B, K], nan_rows int64 with one element, logits float32/float64/
// float16/bfloat16 [R, K], row0 >= 0 and rows_per_image >= 1.
inline void vote_common(const char* op, const at::Tensor& counts, const at::Tensor& nan_rows,
                        const at::Tensor& logits, int64_t row0, int64_t rows_per_image) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2,
              op, ": counts must be a contiguous int64 [B, K] tensor");
  TORCH_CHECK(nan_rows.scalar_type() == at::kLong && nan_rows.numel() == 1,
              op, ": nan_rows must be an int64 tensor with one element");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == counts.size(1),
              op, ": logits ", logits.sizes(), " do not match counts ", counts.sizes());
  TORCH_CHECK(rows_per_image >= 1 && row0 >= 0, op, ": bad row mapping");
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              op, ": logits must be float32, float64, float16 or bfloat16, got ", type);
}

// When there are rows (R > 0): at least ``min_classes`` classes, and row r votes for
// image (row0 + r) / rows_per_image < B.
inline void vote_rows(const char* op, const at::Tensor& counts, const at::Tensor& logits,
                      int64_t row0, int64_t rows_per_image, int64_t min_classes) {
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  if (min_classes <= 1) {
    TORCH_CHECK(K >= 1, op, ": logits have no classes");
  } else {
    TORCH_CHECK(K >= min_classes, op, ": logits need at least ", min_classes, " classes");
  }
  TORCH_CHECK((row0 + R - 1) / rows_per_image < counts.size(0),
              op, ": rows map past the last image of counts");
}

// dssn::vote_(counts, nan_rows, logits, row0, rows_per_image).
inline void vote_args(const at::Tensor& counts, const at::Tensor& nan_rows,
                      const at::Tensor& logits, int64_t row0, int64_t rows_per_image) {
  constexpr const char* op = "dssn::vote_";
  vote_common(op, counts, nan_rows, logits, row0, rows_per_image);
  vote_rows(op, counts, logits, row0, rows_per_image, 1);
}

// dssn::vote_margin_(counts, ambiguous, nan_rows, logits, row0, rows_per_image, margin):
// vote_'s checks with K >= 2, ambiguous a contiguous int64 tensor shaped like counts, and
// a finite margin >= 0.
inline void vote_margin_args(const at::Tensor& counts, const at::Tensor& ambiguous,
                             const at::Tensor& nan_rows, const at::Tensor& logits,
                             int64_t row0, int64_t rows_per_image, double margin) {
  constexpr const char* op = "dssn::vote_margin_";
  vote_common(op, counts, nan_rows, logits, row0, rows_per_image);
  TORCH_CHECK(ambiguous.scalar_type() == at::kLong && ambiguous.is_contiguous() &&
                  ambiguous.sizes() == counts.sizes(),
              op, ": ambiguous must be a contiguous int64 tensor shaped like counts ",
              counts.sizes(), ", got ", ambiguous.sizes());
  TORCH_CHECK(margin >= 0.0 && std::isfinite(margin),
              op, ": margin must be finite and >= 0, got ", margin);
  vote_rows(op, counts, logits, row0, rows_per_image, 2);
}

}  // namespace checks
}  // namespace dssn
