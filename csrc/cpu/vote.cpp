// CPU kernels of dssn::vote_ and dssn::vote_margin_: fused argmax-and-vote. Each logits
// row is reduced to its argmax (first index wins ties, as torch.argmax) and added into
// int64 counts; logits are never copied or kept. vote_margin_ also finds the runner-up
// and applies the margin rule of csrc/dssn_noise.h (dssn::margin_below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../dssn_noise.h"
#include "../op_checks.h"

namespace {

using dssn::Cmp;  // the type a logit is compared in (csrc/dssn_noise.h)

// Index of the first maximum of row[0..K) (compared in Cmp's type), or -1 if the row
// holds a NaN.
template <typename scalar_t>
int64_t row_argmax(const scalar_t* row, int64_t K) {
  using acc_t = typename Cmp<scalar_t>::type;
  acc_t best = acc_t(row[0]);
  if (std::isnan(best)) return -1;
  int64_t arg = 0;
  for (int64_t c = 1; c < K; ++c) {
    const acc_t v = acc_t(row[c]);
    if (std::isnan(v)) return -1;
    if (v > best) {
      best = v;
      arg = c;
    }
  }
  return arg;
}

void vote_cpu(at::Tensor counts, at::Tensor nan_rows, const at::Tensor& logits,
              int64_t row0, int64_t rows_per_image) {
  dssn::checks::vote_args(counts, nan_rows, logits, row0, rows_per_image);
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  const at::Tensor x = logits.contiguous();
  std::vector<int64_t> winner(R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dssn::vote_", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) winner[r] = row_argmax(data + r * K, K);
    });
  });
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t nans = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (winner[r] < 0) {
      ++nans;
    } else {
      c[((row0 + r) / rows_per_image) * K + winner[r]] += 1;
    }
  }
  nan_rows.add_(nans);
}

// Logits read exactly as double (half and bfloat16 through float, exactly).
template <typename scalar_t>
inline double as_double(scalar_t v) {
  return double(typename Cmp<scalar_t>::type(v));
}

// Top value, its first index and the runner-up value (the maximum of the other columns,
// equal to top on a tie) of row[0..K), K >= 2; arg = -1 if the row holds a NaN.
struct TopTwo {
  int64_t arg;
  double top;
  double runner;
};

template <typename scalar_t>
TopTwo row_top_two(const scalar_t* row, int64_t K) {
  TopTwo t{0, as_double(row[0]), -std::numeric_limits<double>::infinity()};
  if (std::isnan(t.top)) return {-1, 0.0, 0.0};
  for (int64_t c = 1; c < K; ++c) {
    const double v = as_double(row[c]);
    if (std::isnan(v)) return {-1, 0.0, 0.0};
    if (v > t.top) {
      t.runner = t.top;
      t.top = v;
      t.arg = c;
    } else if (v > t.runner) {
      t.runner = v;
    }
  }
  return t;
}

void vote_margin_cpu(at::Tensor counts, at::Tensor ambiguous, at::Tensor nan_rows,
                     const at::Tensor& logits, int64_t row0, int64_t rows_per_image,
                     double margin) {
  dssn::checks::vote_margin_args(counts, ambiguous, nan_rows, logits, row0, rows_per_image,
                                 margin);
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  const at::Tensor x = logits.contiguous();
  // winner[r]: the class row r votes for, -1 for a NaN row, -2 for an ambiguous row
  std::vector<int64_t> winner(R);
  std::vector<double> top(R);
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* a = ambiguous.data_ptr<int64_t>();
  int64_t nans = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "dssn::vote_margin_", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const TopTwo t = row_top_two(data + r * K, K);
        top[r] = t.top;
        winner[r] = (t.arg >= 0 && dssn::margin_below(t.top, t.runner, margin)) ? -2 : t.arg;
      }
    });
    for (int64_t r = 0; r < R; ++r) {
      const int64_t image = (row0 + r) / rows_per_image;
      if (winner[r] == -1) {
        ++nans;
      } else if (winner[r] == -2) {
        const scalar_t* row = data + r * K;
        for (int64_t k = 0; k < K; ++k) {
          if (dssn::margin_below(top[r], as_double(row[k]), margin)) a[image * K + k] += 1;
        }
      } else {
        c[image * K + winner[r]] += 1;
      }
    }
  });
  nan_rows.add_(nans);
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CPU, m) {
  m.impl("vote_", &vote_cpu);
  m.impl("vote_margin_", &vote_margin_cpu);
}
