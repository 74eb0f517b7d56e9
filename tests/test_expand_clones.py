"""The CPU expand row loop (csrc/cpu/expand_rows.h) is compiled into the extension for
AVX-512, AVX2 and baseline x86-64, and the machine picks one clone when the library
loads; the extension tests exercise only the clone this machine picks. Here the loop is
compiled alone for each instruction set this CPU can run (and once with the clones and
their resolver) and every output bit is checked against the integer formula of
docs/DESIGN.md, "The integer form of the noise" (written independently below), with the
value m/(4q) rounded once to float32."""
import os
import platform

import pytest

from testkit import build_and_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_DIR = os.path.join(ROOT, "csrc", "cpu")

HARNESS = r"""
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "expand_rows.h"

static long long floor_div(long long a, long long b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

static int failures = 0;
static long long checked = 0;

static void check(int q, int L, int start, int count, unsigned seed) {
  // every level 0..q, three times over, in a shuffled order; random offsets
  std::mt19937 gen(seed);
  std::vector<int> k;
  for (int rep = 0; rep < 3; ++rep)
    for (int v = 0; v <= q; ++v) k.push_back(v);
  std::shuffle(k.begin(), k.end(), gen);
  const int d = int(k.size());
  std::vector<unsigned char> levels(k.begin(), k.end());
  std::vector<int32_t> offsets(d);
  for (int i = 0; i < d; ++i) offsets[i] = int32_t(gen() % unsigned(L));
  const int B = 2;  // the second image: the levels reversed
  std::vector<unsigned char> both(levels);
  both.insert(both.end(), levels.rbegin(), levels.rend());
  std::vector<float> out(size_t(B) * count * d);
  dssn::expand_rows(out.data(), both.data(), offsets.data(), count, d, L, q, start, 0,
                    int64_t(B) * count);
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < count; ++c)
      for (int i = 0; i < d; ++i) {
        const long long kk = both[size_t(b) * d + i];
        const long long j = (offsets[i] + start + c) % L;
        const long long n = floor_div(kk - j - 1, L) + 1;
        const long long top = 2 * L * n + 2 * j + 1;
        const long long m = (top < 2 * q ? top : 2 * q) + (top - 2 * L > 0 ? top - 2 * L : 0);
        const float want = float(double(m) / double(4 * q));
        const float got = out[(size_t(b) * count + c) * d + i];
        ++checked;
        if (std::memcmp(&want, &got, sizeof(float)) != 0 && failures++ < 10)
          std::printf("MISMATCH q=%d L=%d b=%d t=%d k=%lld: %.9g vs %.9g\n", q, L, b,
                      start + c, kk, got, want);
      }
}

int main() {
  const int cases[][2] = {{1, 1}, {1, 2}, {2, 1}, {4, 3}, {4, 4}, {4, 9}, {7, 13},
                          {16, 5}, {16, 16}, {16, 27}, {16, 55}, {255, 1}, {255, 132},
                          {255, 254}, {255, 255}, {255, 256}, {255, 441}, {255, 3091}};
  unsigned seed = 1;
  for (const auto& c : cases) {
    const int q = c[0], L = c[1];
    check(q, L, 0, L, seed++);                       // every variant
    if (L > 2) check(q, L, L / 3, L - L / 3 - 1, seed++);  // a window
  }
  std::printf("checked %lld values, %d mismatches\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
"""


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


ISAS = {  # name: (compiler flags, cpu flag needed)
    "clones": ([], None),
    "avx512f": (["-DDSSN_NO_CLONES", "-mavx512f"], "avx512f"),
    "avx2": (["-DDSSN_NO_CLONES", "-mavx2"], "avx2"),
    "baseline": (["-DDSSN_NO_CLONES"], None),
}


@pytest.mark.parametrize("isa", list(ISAS))
def test_expand_rows_bits_for_every_instruction_set(tmp_path, isa):
    if platform.machine() not in ("x86_64", "AMD64") and isa in ("avx512f", "avx2", "clones"):
        pytest.skip(f"{isa}: x86-64 only (this machine is {platform.machine()})")
    flags, needs = ISAS[isa]
    if needs is not None and needs not in cpu_flags():
        pytest.skip(f"this CPU cannot run {isa} code (no '{needs}' in /proc/cpuinfo)")
    # the extension's flags (setup.py): -O3 -fopenmp, no contraction, no fast math
    out = build_and_run(tmp_path, HARNESS, ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off",
                                            "-fno-fast-math", "-Wall", "-Wextra", "-Werror",
                                            *flags, "-I", CPU_DIR], timeout=300)
    assert "0 mismatches" in out
