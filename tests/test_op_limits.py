"""The q limits of the expand kernels, one convention everywhere.

spec.MAX_Q_FOR_DTYPE gives, per output dtype, the largest q (inclusive) whose noised
values m/(4q) the dtype holds correctly rounded; spec.check_value_dtype refuses any q
above it. csrc/op_checks.h repeats the float16/bfloat16 numbers in the same inclusive
convention (kMaxQForFloat16, kMaxQForBFloat16). These tests tie the three: the C++ op
(torch.ops.dssn.expand_) and the Triton launcher accept q exactly when the Python checks
do (the dtype limit and q + L <= spec.MAX_LEVELS_PLUS_VARIANTS), at the limit and one
past it, and the accepted calls write the bits of spec.value_table. Changing a C++ limit
by one in either direction makes a case here fail.
"""
import os

import pytest
import torch

import dssn_kernels  # noqa: F401  (loads dssn_kernels._C: registers torch.ops.dssn)
from dssn_kernels.ops.expand import noise_numerator
from dssn_kernels.spec import (MAX_LEVELS_PLUS_VARIANTS, MAX_Q_FOR_DTYPE, check_value_dtype,
                               value_table)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
L = 1  # the smallest L: the q + L bound leaves float32 the most room


def python_accepts(q, dtype):
    """What the Python side allows: the dtype's q limit and 1 <= q, q + L <= 2^21."""
    try:
        check_value_dtype(q, dtype)
    except ValueError:
        return False
    return 1 <= q and q + L <= MAX_LEVELS_PLUS_VARIANTS


def q_cases(dtype):
    """q around the dtype's limit, and around the q + L bound (float32's binding limit)."""
    limit = MAX_Q_FOR_DTYPE[dtype]
    qs = {limit - 1, limit, limit + 1,
          MAX_LEVELS_PLUS_VARIANTS - L - 1, MAX_LEVELS_PLUS_VARIANTS - L,
          MAX_LEVELS_PLUS_VARIANTS - L + 1}
    return sorted(qs)


def problem(q, dtype):
    """A one-image, one-variant expand whose pixels run through levels 0..q."""
    k = torch.tensor(sorted({0, 1, q // 3, q // 2, q - 1, q}), dtype=torch.int32)
    out = torch.full((1, 1, k.numel()), float("nan"), dtype=dtype)
    offsets = torch.zeros(k.numel(), dtype=torch.int32)
    return out, k[None], offsets


def expected_bits(levels, q, dtype):
    m = noise_numerator(levels.long(), torch.zeros_like(levels, dtype=torch.long), L, q)
    return value_table(q, dtype)[m].view(torch.int16 if dtype != torch.float32 else torch.int32)


def got_bits(out):
    return out[:, 0].view(torch.int16 if out.dtype != torch.float32 else torch.int32)


def run_cpp(out, levels, offsets, q):
    torch.ops.dssn.expand_(out, levels, offsets, L, q, 0)


def run_triton(out, levels, offsets, q):
    from dssn_kernels.triton import expand_triton
    expand_triton(out, levels, offsets, L, q, 0)


def triton_expected():
    """The Triton launcher is checked wherever its interpreter is switched on (the test
    configuration does so on machines without an sm_80+ GPU): expected, not probed."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


RUNNERS = {"cpp": (run_cpp, RuntimeError), "triton": (run_triton, ValueError)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(RUNNERS))
def test_op_accepts_exactly_what_python_accepts(backend, dtype):
    if backend == "triton" and not triton_expected():
        pytest.skip("TRITON_INTERPRET is off and these are CPU tensors")
    run, error = RUNNERS[backend]
    for q in q_cases(dtype):
        out, levels, offsets = problem(q, dtype)
        if python_accepts(q, dtype):
            run(out, levels, offsets, q)
            assert torch.equal(got_bits(out), expected_bits(levels, q, dtype)), (backend, q)
        else:
            with pytest.raises(error):
                run(out, levels, offsets, q)
            assert torch.isnan(out.float()).all(), (backend, q)   # nothing written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpp_half_limit_is_inclusive(dtype):
    """At q = MAX_Q_FOR_DTYPE[dtype] the op runs; one more is refused, naming that limit."""
    limit = MAX_Q_FOR_DTYPE[dtype]
    out, levels, offsets = problem(limit, dtype)
    run_cpp(out, levels, offsets, limit)
    assert torch.equal(got_bits(out), expected_bits(levels, limit, dtype))
    out, levels, offsets = problem(limit + 1, dtype)
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    with pytest.raises(RuntimeError, match=rf"{name} output needs q <= {limit} "
                                           rf"\(got q = {limit + 1}\)"):
        run_cpp(out, levels, offsets, limit + 1)


def test_float32_is_bounded_by_q_plus_L_only():
    """float32's dtype limit is not below the q + L bound: there, only q + L binds, in
    Python and in the op alike (q = 2^21 - L runs, one more is refused)."""
    assert MAX_Q_FOR_DTYPE[torch.float32] >= MAX_LEVELS_PLUS_VARIANTS - L
    q = MAX_LEVELS_PLUS_VARIANTS - L
    out, levels, offsets = problem(q, torch.float32)
    run_cpp(out, levels, offsets, q)
    out, levels, offsets = problem(q + 1, torch.float32)
    with pytest.raises(RuntimeError, match=r"q \+ L <= 2\^21"):
        run_cpp(out, levels, offsets, q + 1)
