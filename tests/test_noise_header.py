"""The shared math header csrc/dssn_noise.h, host path, checked exhaustively in C++.

noise_numerator replaces floor((k - j - 1) / L) by a division-free float product
(SplitDivisor). The CPU kernels and the CUDA kernels (with the same operations as
correctly rounded intrinsics) both rely on it, so it is checked here against the plain
integer formula with a true floor division:

* q = 255 (8-bit images), every L in 1..3100 (sigma up to ~3.5), every k in 0..q and
  j in 0..L-1 (1.2e9 pairs, spread over threads);
* q + L at and near the 2^21 bound the header documents (kMaxLevelsPlusVariants): every
  pair where (q+1) * L is small, otherwise every k against the j where the division is
  tight (k - j - 1 + L within 3 of a multiple of L), the ends of 0..L-1 and a few
  pseudo-random j;
* noise_value(m, 4q) is the correctly rounded float32 of m / (4q) for every m in 0..4q.

A last test backs the binding's fp16/bf16 limits: for q < 1024 (fp16) and q < 8192
(bf16), converting that float32 with round-to-nearest-even gives the correctly rounded
half of m / (4q) (no double rounding).
"""
import os
import time

import numpy as np
import pytest

from testkit import build_and_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

CHECK_CPP = r"""
#include "dssn_noise.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

static std::atomic<long long> g_checked{0};
static std::atomic<int> g_failures{0};

static int64_t floor_div(int64_t a, int64_t b) {  // b > 0: the true floor of a / b
  const int64_t t = a / b;
  return (a % b != 0 && a < 0) ? t - 1 : t;
}

static int64_t plain_formula(int64_t k, int64_t j, int64_t q, int64_t L) {
  const int64_t n = floor_div(k - j - 1, L) + 1;
  const int64_t top = 2 * L * n + 2 * j + 1;
  const int64_t U = top < 2 * q ? top : 2 * q;
  const int64_t Lo = top - 2 * L > 0 ? top - 2 * L : 0;
  return U + Lo;
}

struct Checker {
  int q, L;
  dssn::SplitDivisor div;
  long long n = 0;
  Checker(int q_, int L_) : q(q_), L(L_), div(dssn::make_divisor(L_)) {}
  void operator()(int k, int j) {
    ++n;
    const int got = dssn::noise_numerator(k, j, q, div);
    const int64_t want = plain_formula(k, j, q, L);
    if (got != want || want < 0 || want > 4 * int64_t(q)) {
      if (g_failures.fetch_add(1) < 20)
        std::printf("MISMATCH q=%d L=%d k=%d j=%d: header %d, floor formula %lld\n", q, L, k,
                    j, got, (long long)want);
    }
  }
  ~Checker() { g_checked += n; }
};

static void all_pairs(int q, int L) {
  Checker c(q, L);
  for (int k = 0; k <= q; ++k)
    for (int j = 0; j < L; ++j) c(k, j);
}

// Every k against the j where floor((k - j - 1) / L) is tight, the ends and a few others.
static void tight_pairs(int q, int L, int k0, int k1) {
  Checker c(q, L);
  uint32_t rng = 12345u + uint32_t(q) * 7u + uint32_t(L);
  for (int k = k0; k <= k1; ++k) {
    for (int e = -3; e <= 3; ++e) {
      // k - j - 1 + L = m*L + e'  <=>  j = (k - 1 - e') mod L
      const int64_t j = (((int64_t(k) - 1 - e) % L) + L) % L;
      c(k, int(j));
    }
    for (int e = 0; e < 3 && e < L; ++e) {
      c(k, e);
      c(k, L - 1 - e);
    }
    for (int r = 0; r < 4; ++r) {
      rng = rng * 1664525u + 1013904223u;
      c(k, int(rng % uint32_t(L)));
    }
  }
}

static void noise_values(int q) {
  const float four_q = float(4 * q);
  long long n = 0;
  for (int m = 0; m <= 4 * q; ++m, ++n) {
    const float got = dssn::noise_value(m, four_q);
    // double is within 2^-53 of m/(4q), which is either a float midpoint exactly or at
    // least 2^-25/(4q) (relative) away from one, so this is the correctly rounded float.
    const float want = float(double(m) / double(4 * q));
    if (got != want) {
      if (g_failures.fetch_add(1) < 20)
        std::printf("VALUE MISMATCH q=%d m=%d: %.9g vs %.9g\n", q, m, got, want);
    }
  }
  g_checked += n;
}

template <typename F>
static void parallel(int tasks, F f) {
  unsigned nt = std::thread::hardware_concurrency();
  if (nt == 0) nt = 2;
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < nt; ++t)
    pool.emplace_back([&] {
      for (int i; (i = next.fetch_add(1)) < tasks;) f(i);
    });
  for (auto& t : pool) t.join();
}

int main() {
  const int bound = int(dssn::kMaxLevelsPlusVariants);  // 2^21
  if (bound != (1 << 21)) {
    std::printf("unexpected kMaxLevelsPlusVariants %d\n", bound);
    return 2;
  }
  // 1. q = 255, L = 1..3100, all pairs; largest L first for load balance.
  parallel(3100, [](int i) { all_pairs(255, 3100 - i); });
  std::printf("q=255, L=1..3100 exhaustive: %lld pairs\n", g_checked.load());

  // 2. q + L at and near the bound.
  struct Case { int q, L; };
  const std::vector<Case> cases = {
      {255, bound - 255}, {255, bound - 256}, {255, bound - 1000}, {256, bound - 256},
      {1, bound - 1}, {2, bound - 2}, {bound - 1, 1}, {bound - 2, 2}, {bound - 3, 3},
      {bound - 7, 7}, {bound - 100, 100}, {bound - 4097, 4097}, {1 << 20, 1 << 20},
      {(1 << 20) + 1, (1 << 20) - 1}, {(1 << 20) - 1, (1 << 20) + 1}, {1000003, 1048573},
      {65535, bound - 65535}, {65535, 65536}, {4095, bound - 4095}, {1023, 1023},
      {bound / 3, bound - bound / 3}, {12345, 2 * 12345}, {777, 1}, {1, 1}};
  const long long before = g_checked.load();
  // split each case's k range into slices so the threads stay busy
  const int slices = 16;
  parallel(int(cases.size()) * slices, [&](int i) {
    const Case c = cases[size_t(i / slices)];
    const int s = i % slices;
    const int k0 = int(int64_t(c.q + 1) * s / slices);
    const int k1 = int(int64_t(c.q + 1) * (s + 1) / slices) - 1;
    if (int64_t(c.q + 1) * c.L <= 20000000) {
      Checker ch(c.q, c.L);
      for (int k = k0; k <= k1; ++k)
        for (int j = 0; j < c.L; ++j) ch(k, j);
    } else {
      tight_pairs(c.q, c.L, k0, k1);
    }
  });
  // every j for a few k at the largest 8-bit L
  parallel(4, [&](int i) {
    const int ks[4] = {0, 1, 254, 255};
    Checker ch(255, bound - 255);
    for (int j = 0; j < bound - 255; ++j) ch(ks[i], j);
  });
  std::printf("q + L near 2^21: %lld pairs\n", g_checked.load() - before);

  // 3. noise_value is the correctly rounded m / (4q).
  const int qs[] = {1, 2, 3, 4, 7, 16, 255, 256, 1023, 4095, 65535, bound - 1};
  parallel(int(sizeof(qs) / sizeof(qs[0])), [&](int i) { noise_values(qs[i]); });

  std::printf("checked %lld, failures %d\n", g_checked.load(), g_failures.load());
  return g_failures.load() == 0 ? 0 : 1;
}
"""


def test_noise_numerator_matches_floor_formula(tmp_path):
    # the CPU extension's floating-point flags (setup.py)
    t0 = time.perf_counter()
    build_and_run(tmp_path, CHECK_CPP, ["-O2", "-std=c++17", "-pthread", "-ffp-contract=off",
                                        "-fno-fast-math", "-Wall", "-Wextra", "-Werror",
                                        "-I", CSRC], timeout=600)
    print(f"({time.perf_counter() - t0:.1f} s)")


def _rne_drop(bits, drop):
    """Round unsigned integer bit patterns to nearest-even, dropping `drop` low bits."""
    return (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) >> drop


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_outputs_round_once(half):
    """float32 -> fp16/bf16 of the correctly rounded m/(4q) equals the correctly rounded
    half of m/(4q), for every m, for the q the CUDA binding allows (all q for fp16;
    a spread of q for bf16, whose full sweep takes minutes: it was run up to q = 40000)."""
    if half == "float16":
        qs = range(1, 1024)
    else:
        rng = np.random.default_rng(0)
        qs = sorted({*range(1, 300), 255, 1023, 1024, 4095, 4096, 8191,
                     *rng.integers(300, 8192, 150).tolist()})
    for q in qs:
        exact = np.arange(4 * q + 1, dtype=np.float64) / (4 * q)  # within 2^-53 of m/(4q)
        f32 = exact.astype(np.float32)  # correctly rounded (see the C++ check above)
        if half == "float16":
            once = exact.astype(np.float16)  # numpy rounds float64 -> float16 directly
            twice = f32.astype(np.float16)   # what __float2half_rn does to the float32
            assert np.array_equal(once.view(np.uint16), twice.view(np.uint16)), q
        else:
            # bf16 = the top 16 bits of a float32; __float2bfloat16_rn rounds to nearest-even
            twice = (_rne_drop(f32.view(np.uint32).astype(np.uint64), 16) << 16)
            twice = twice.astype(np.uint32).view(np.float32).astype(np.float64)
            # direct: keep 8 significant bits of the float64 (53 -> 8: drop 45 bits)
            once = (_rne_drop(exact.view(np.uint64), 45) << 45).view(np.float64)
            assert np.array_equal(once, twice), q
