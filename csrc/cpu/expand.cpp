// CPU kernel of dssn::expand_: writes a window of split-noise variants of a batch of
// images straight into a caller-owned workspace.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../op_checks.h"
#include "expand_rows.h"

namespace {

using dssn::expand_rows;

void expand_cpu(at::Tensor out, const at::Tensor& levels, const at::Tensor& offsets,
                int64_t num_variants, int64_t q, int64_t start) {
  dssn::checks::expand_args(out, levels, offsets, num_variants, q, start);
  const int64_t B = levels.size(0), d = levels.size(1), count = out.size(1);
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
    } else {  // int32 (checked)
      const int32_t* k = levels.data_ptr<int32_t>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        expand_rows(o, k, v, count, d, L, qi, start, r0, r1);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CPU, m) { m.impl("expand_", &expand_cpu); }
