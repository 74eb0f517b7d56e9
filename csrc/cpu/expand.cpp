// CPU kernel of dssn::expand_: writes a window of split-noise variants of a batch of
// images straight into a caller-owned workspace.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dssn_noise.h"

namespace {

template <typename out_t, typename level_t>
void expand_rows(out_t* out, const level_t* levels, const int32_t* offsets, int64_t count,
                 int64_t d, int L, int q, int64_t start, int64_t row_begin, int64_t row_end) {
  const dssn::SplitDivisor div = dssn::make_divisor(L);
  const float four_q = float(4 * q);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / count;
    const int t = int(start + r % count);  // < L
    const level_t* k = levels + b * d;
    out_t* o = out + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const int j = dssn::split_index(offsets[i], t, L);
      // float32: correctly rounded; float16/bfloat16: that value rounded to nearest even
      // (exact for the q limits checked in Python, spec.MAX_Q_FOR_DTYPE).
      o[i] = out_t(dssn::noise_value(dssn::noise_numerator(int(k[i]), j, q, div), four_q));
    }
  }
}

void expand_cpu(at::Tensor out, const at::Tensor& levels, const at::Tensor& offsets,
                int64_t num_variants, int64_t q, int64_t start) {
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf ||
               out.scalar_type() == at::kBFloat16) && out.is_contiguous() && out.dim() == 3,
              "dssn::expand_: out must be a contiguous float32/float16/bfloat16 [B, count, d] tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat ||
                  q < (out.scalar_type() == at::kHalf ? 1024 : 8192),
              "dssn::expand_: ", out.scalar_type(), " cannot hold m/(4q) exactly rounded for q=", q);
  TORCH_CHECK(levels.dim() == 2 && levels.is_contiguous(),
              "dssn::expand_: levels must be a contiguous [B, d] tensor");
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
  if (out.numel() == 0) return;
  const int L = int(num_variants), qi = int(q);
  const int64_t rows = B * count;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dssn::expand_", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* v = offsets.data_ptr<int32_t>();
    if (levels.scalar_type() == at::kByte) {
      const uint8_t* k = levels.data_ptr<uint8_t>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        expand_rows(o, k, v, count, d, L, qi, start, r0, r1);
      });
    } else {
      TORCH_CHECK(levels.scalar_type() == at::kInt, "dssn::expand_: levels must be uint8 or int32");
      const int32_t* k = levels.data_ptr<int32_t>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        expand_rows(o, k, v, count, d, L, qi, start, r0, r1);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CPU, m) { m.impl("expand_", &expand_cpu); }
