"""The vote-with-margin kernels (dssn::vote_margin_) against the reference rule.

Every backend that runs here (torch, cpp, and triton: in Triton's interpreter on CPU
tensors where there is no GPU, conftest sets TRITON_INTERPRET=1) must give bit-identical
counts, ambiguous counts and NaN-row counts, equal to ``dssn_reference.margin_vote`` (exact
rational arithmetic) row by row. The logits plant ties and near ties exactly at the
threshold: gap == tau, gap one ulp (of the logits' format) on either side, tau one float64
ulp on either side of the gap, float64 gaps that round to tau (the TwoSum error term
decides), infinities, signed zeros and NaN rows. The CUDA kernel is compile-checked only
(tests/test_cuda_compile.py); on a CUDA machine it runs here too.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_reference as ref
from conftest import CPU_BACKENDS
from dssn_kernels.ops import vote_into, vote_margin_into
from triton_ptx import ATOMICS, run_ptx_probe

BACKENDS = CPU_BACKENDS     # torch, cpp, triton (interpreter): expected (conftest)

# significand bits (with the implicit one) of each logits format
BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TAU = 0.25


def expected(counts, ambiguous, nan_rows, logits, row0, rows_per_image, tau):
    """What vote_margin_ must add, from the reference rule, one row at a time."""
    counts, ambiguous, nan_rows = counts.clone(), ambiguous.clone(), nan_rows.clone()
    for r, row in enumerate(logits.double().tolist()):       # exact for every format
        image = (row0 + r) // rows_per_image
        vote = ref.margin_vote(row, tau)
        if vote is None:
            nan_rows += 1
        elif isinstance(vote, int):
            counts[image, vote] += 1
        else:
            for c in vote:
                ambiguous[image, c] += 1
    return counts, ambiguous, nan_rows


def run(backend, counts, ambiguous, nan_rows, logits, row0, rows_per_image, tau):
    c, a, n = counts.clone(), ambiguous.clone(), nan_rows.clone()
    vote_margin_into(c, a, n, logits, row0, rows_per_image, tau, backend)
    return c, a, n


def threshold_logits(R, K, dtype, seed):
    """Random logits with near ties planted at gap = TAU: top 2.0 against 1.75 (gap ==
    tau exactly, not ambiguous), 1.75 -/+ one ulp of the format (gap tau + ulp: not
    ambiguous; tau - ulp: ambiguous), exact ties, infinities, signed zeros, NaN rows."""
    g = torch.Generator().manual_seed(seed)
    ulp = 2.0 ** (1 - BITS[dtype])                 # spacing of the format on [1, 2)
    x = torch.randint(-8, 9, (R, K), generator=g).double() / 8    # ties everywhere
    planted = [1.75, 1.75 - ulp, 1.75 + ulp, 2.0, 1.75 + 2 * ulp, 1.0]
    for r in range(0, R - 8):
        if r % 3 == 0:                             # keep some purely random rows
            continue
        cols = torch.randperm(K, generator=g)[:3]
        x[r, cols[0]] = 2.0
        x[r, cols[1]] = planted[r % len(planted)]
        if K > 2:
            x[r, cols[2]] = planted[(r // 2) % len(planted)]
    x[R - 8] = 0.0
    x[R - 8, 0] = -0.0                             # -0.0 == +0.0: a tie, gap 0
    x[R - 7] = float("-inf")                       # all -inf: every class ties
    x[R - 6, K - 1] = float("inf")                 # +inf against finite: a clear vote
    x[R - 5, [0, K - 1]] = float("inf")            # +inf tie
    x[R - 4, K // 2] = float("nan")
    x[R - 3, 0] = float("nan")
    x[R - 3, K - 1] = float("inf")
    x[R - 2] = -1.0
    x[R - 2, K - 1] = 1.75
    x[R - 2, 0] = 2.0                              # gap exactly tau, first column wins
    x[R - 1] = float("-inf")
    x[R - 1, K - 1] = 2.0
    x[R - 1, 0] = 1.75 + ulp                       # ambiguous across the whole row
    out = x.to(dtype)
    assert torch.equal(out.double()[~torch.isnan(x)], x[~torch.isnan(x)])   # exact
    return out


MAPPINGS = [(0, 10 ** 6), (13, 70), (3, 1), (5, 7)]   # (row0, rows_per_image)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,R", [(2, 60), (10, 60), (1000, 24)])
def test_backends_match_reference_at_the_threshold(K, R, dtype):
    logits = threshold_logits(R, K, dtype, seed=K)
    for row0, rpi in MAPPINGS:
        B = (row0 + R - 1) // rpi + 1
        g = torch.Generator().manual_seed(row0)
        counts = torch.randint(0, 50, (B, K), generator=g)       # votes accumulate
        ambiguous = torch.randint(0, 5, (B, K), generator=g)
        nan_rows = torch.tensor([3])
        for tau in (TAU, 0.0):
            want = expected(counts, ambiguous, nan_rows, logits, row0, rpi, tau)
            for backend in BACKENDS:
                if backend == "triton" and (row0, rpi) not in MAPPINGS[:2]:
                    continue                       # the interpreter is slow
                got = run(backend, counts, ambiguous, nan_rows, logits, row0, rpi, tau)
                for name, a, b in zip(("counts", "ambiguous", "nan_rows"), got, want):
                    assert torch.equal(a, b), (backend, name, tau, row0, rpi)
    # the planted rows really exercise the rule
    delta = expected(torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K, dtype=torch.long),
                     torch.zeros(1, dtype=torch.long), logits, 0, R, TAU)
    assert int(delta[1].sum()) >= 10 and int(delta[0].sum()) >= 5 and int(delta[2]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_zero_is_vote(backend):
    """tau = 0: exactly vote_ (no row is ambiguous, not even an exact tie)."""
    for dtype in DTYPES:
        logits = threshold_logits(40, 10, dtype, seed=1)
        logits = logits[~torch.isnan(logits.double()).any(1)]
        counts = torch.randint(0, 9, (3, 10))
        c1, n1 = counts.clone(), torch.zeros(1, dtype=torch.long)
        vote_into(c1, n1, logits, 4, 15, backend)
        c2, a2, n2 = run(backend, counts, torch.zeros_like(counts), torch.zeros(1, dtype=torch.long),
                         logits, 4, 15, 0.0)
        assert torch.equal(c1, c2) and torch.equal(n1, n2)
        assert not a2.any()


def float64_rounding_cases():
    """Rows [top, z] whose float64 difference rounds onto tau = 1: only the exact
    comparison (TwoSum error term) sees which side of tau the true gap is on."""
    tiny = 2.0 ** -60
    rows = [[1.0, tiny],            # gap 1 - 2^-60 < 1: ambiguous, though fl(gap) == 1
            [1.0, -tiny],           # gap 1 + 2^-60 > 1: votes
            [tiny, 1.0 + 2 ** -52], # column 1 by 1 + 2^-52 - 2^-60: votes
            [1.0 + 2 ** -52, 2 ** -52 + tiny],  # gap 1 - 2^-60: ambiguous
            [2.0 ** 52, 2.0 ** 52 - 1.0],       # gap exactly 1: votes
            [2.0 ** 60, 2.0 ** 60],             # tie: ambiguous
            [-tiny, -1.0],                      # gap 1 - 2^-60: ambiguous
            [-1.0 - 2 ** -52, -tiny]]           # column 1 by 1 + 2^-52 - 2^-60: votes
    return torch.tensor(rows, dtype=torch.float64)


def test_exact_comparison_beyond_float64_rounding():
    logits = float64_rounding_cases()
    want = expected(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), logits, 0, 100, 1.0)
    # rows 0, 3, 5, 6 are ambiguous (in both classes); rows 1, 2, 4 vote; row 7 is
    # -1 - 2^-52 against -2^-60: gap 1 + 2^-52 - 2^-60 > 1, a vote for column 1
    assert want[1].tolist() == [[4, 4]]
    assert want[0].tolist() == [[2, 2]]
    for backend in BACKENDS:
        got = run(backend, *(t.zero_() for t in (torch.empty(1, 2, dtype=torch.long),
                                                  torch.empty(1, 2, dtype=torch.long),
                                                  torch.empty(1, dtype=torch.long))),
                  logits, 0, 100, 1.0)
        for a, b in zip(got, want):
            assert torch.equal(a, b), backend
        # tau one float64 ulp either side of an exact gap of 1 (row 4)
        for tau, amb in ((1.0 + 2 ** -52, 1), (1.0 - 2 ** -53, 0)):
            c, a, n = run(backend, torch.zeros(1, 2, dtype=torch.long),
                          torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                          logits[4:5], 0, 1, tau)
            assert int(a.sum()) == 2 * amb and int(c.sum()) == 1 - amb, (backend, tau)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
def test_triton_runner_up_across_column_blocks():
    """K over one Triton column block: the runner-up merges across blocks."""
    K = 2500
    x = torch.zeros(6, K)
    x[0, [1500, 2400]] = 1.0              # tie across blocks: ambiguous
    x[1, 5] = 1.0
    x[1, 2499] = 0.8                      # runner-up in the last, partial block: ambiguous
    x[2, 1023] = 1.0
    x[2, 1024] = 0.5                      # runner-up just past a block edge: votes (gap .5)
    x[3, 2000] = 3.0
    x[3, 10] = 2.9                        # top in a later block, runner-up earlier
    x[4, 1024] = 1.0                      # one clear winner
    x[5, 7] = float("nan")
    want = expected(torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), x, 0, 10, 0.5)
    got = run("triton", torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K, dtype=torch.long),
              torch.zeros(1, dtype=torch.long), x, 0, 10, 0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert int(want[0].sum()) == 2 and int(want[2]) == 1


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])  # torch: unchecked
def test_kernels_reject_bad_arguments(backend):
    counts, amb, nan = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), \
        torch.zeros(1, dtype=torch.long)
    logits = torch.zeros(4, 3)
    with pytest.raises((ValueError, RuntimeError)):
        vote_margin_into(counts, torch.zeros(2, 4, dtype=torch.long), nan, logits, 0, 2, 1.0, backend)
    with pytest.raises((ValueError, RuntimeError)):
        vote_margin_into(counts, amb, nan, logits, 0, 1, 1.0, backend)   # past the last image
    with pytest.raises((ValueError, RuntimeError)):
        vote_margin_into(counts, amb, nan, logits, 0, 2, -1.0, backend)


VALUES = [-2.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0 + 2 ** -7, 1.0 + 2 ** -10,
          float("inf"), float("-inf")]
TIE_TAUS = [0.0, 2 ** -10, 2 ** -7, 0.25, 0.5, 0.75, 1.0, 2.5]


def draw_ties(data, K, R, dtype):
    """An R x K block of logits drawn from VALUES (a NaN in one row, maybe), where it
    starts (row0), the rows per image and zeroed (counts, ambiguous, nan_rows) to fit."""
    cells = data.draw(st.lists(st.sampled_from(VALUES), min_size=R * K,
                               max_size=R * K))
    logits = torch.tensor(cells, dtype=torch.float64).view(R, K).to(dtype)
    nan_row = data.draw(st.integers(-1, R - 1))
    if nan_row >= 0:
        logits[nan_row, data.draw(st.integers(0, K - 1))] = float("nan")
    rpi = data.draw(st.integers(1, R + 2))
    row0 = data.draw(st.integers(0, 5))
    B = (row0 + R - 1) // rpi + 1
    zeros = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long), \
        torch.zeros(1, dtype=torch.long)
    return logits, row0, rpi, zeros


@given(data=st.data(), K=st.integers(2, 7), R=st.integers(1, 12),
       dtype=st.sampled_from(DTYPES), tau=st.sampled_from(TIE_TAUS))
def test_random_ties_match_reference(data, K, R, dtype, tau):
    """Logits drawn from a few values whose gaps hit tau exactly and by one ulp."""
    logits, row0, rpi, zeros = draw_ties(data, K, R, dtype)
    want = expected(*zeros, logits, row0, rpi, tau)
    for backend in BACKENDS:
        got = run(backend, *zeros, logits, row0, rpi, tau)
        for a, b in zip(got, want):
            assert torch.equal(a, b), backend


# Compiles the margin kernel for sm_80 and sm_90 (no GPU needed: triton ships ptxas) in a
# process without TRITON_INTERPRET, fp-fusion on: every logits dtype; votes are integer
# atomics and the exact float64 gap test has no fused multiply-add.
@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_margin_kernel_compiles_to_ptx_with_integer_atomics_and_no_fma(capability):
    report = run_ptx_probe("vote_margin", "_vote_margin_kernel",
                           {"counts_ptr": "*i64", "amb_ptr": "*i64", "nan_ptr": "*i64",
                            "logits_ptr": None, "tau_ptr": "*fp64"},
                           {"atomics": ATOMICS, "fma": r"\bfma\.[\w.]+"},
                           force_fp_fusion=True, capability=capability)
    assert len(report) == 4
    for dtype, found in report.items():
        assert found["atomics"] and all(op.endswith("add.u64") for op in found["atomics"]), \
            (dtype, found)
        assert not [op for op in found["fma"] if op.endswith("f64")], (dtype, found)
