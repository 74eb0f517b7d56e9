"""The dssn ops (csrc/ops.cpp) as torch custom ops: torch.library.opcheck and
torch.compile.

opcheck runs all its default checks (test_schema: the ops mutate exactly the arguments
their schemas mark with (a!); test_autograd_registration; test_faketensor: the ops run on
fake tensors; test_aot_dispatch_dynamic: AOT dispatch with dynamic shapes gives the eager
results) on every registered dssn:: op, with realistic CPU arguments in every dtype the
op takes: float32/float16/bfloat16 workspaces from uint8/int32 levels for expand_,
float32/float64/float16/bfloat16 logits with ties and NaN rows for the votes. The ops
return nothing and mutate only their (a!) arguments, so torch derives their fake kernels
(no register_fake is needed).

Then the package's entry points (dssn_kernels.ops: expand_into, vote_into,
vote_margin_into, backend "cpp") are compiled with torch.compile(fullgraph=True) (no
graph break around the ops) and must give the eager call's bits and counts in the
caller's tensors, with the backends "aot_eager" (functionalization of the mutating ops, no
code generation) and "inductor" (the default backend, with generated code).
"""
import pytest
import torch
from torch.library import opcheck

import dssn_kernels  # noqa: F401  (loads dssn_kernels._C: registers torch.ops.dssn)
from dssn_kernels.ops import expand_into, vote_into, vote_margin_into

# opcheck's own internals (torch.jit.script_method) warn on this torch; not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def registered_ops():
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("dssn::"))


def logits_with_ties_and_nans(R, K, dtype, seed):
    """Small integers (exact in every dtype, many ties), a NaN in two rows, an inf in one,
    and rows whose top two logits are 0.25 apart (ambiguous under a margin of 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (R, K), generator=g).double()
    x[1, K - 1] = float("nan")
    x[R - 2, 0] = float("nan")
    x[2, 1] = float("inf")
    x[3, :] = torch.arange(K) * 0.25
    x[4, :] = torch.arange(K) * 4.0
    return x.to(dtype)


def expand_cases():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for level_dtype, q in ((torch.uint8, 255), (torch.int32, 1000)):
            g = torch.Generator().manual_seed(q)
            B, d, L, count, start = 2, 7, 13, 5, 4
            levels = torch.randint(0, q + 1, (B, d), generator=g).to(level_dtype)
            offsets = torch.randint(0, L, (d,), generator=g, dtype=torch.int32)
            out = torch.empty(B, count, d, dtype=dtype)
            cases.append(pytest.param("expand_", (out, levels, offsets, L, q, start),
                                      id=f"expand_-{dtype}-{level_dtype}"))
    return cases


def vote_cases():
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        R, K, rows_per_image, row0 = 12, 5, 4, 2   # rows 0..11 -> images 0..3
        B = (row0 + R - 1) // rows_per_image + 1
        x = logits_with_ties_and_nans(R, K, dtype, seed=R)
        cases.append(pytest.param(
            "vote_", (torch.zeros(B, K, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      x, row0, rows_per_image), id=f"vote_-{dtype}"))
        for margin in (0.0, 0.5):
            cases.append(pytest.param(
                "vote_margin_", (torch.zeros(B, K, dtype=torch.long),
                                 torch.zeros(B, K, dtype=torch.long),
                                 torch.zeros(1, dtype=torch.long), x, row0, rows_per_image,
                                 margin), id=f"vote_margin_-{dtype}-{margin}"))
    # the logits of a model called without torch.no_grad(): they require grad
    x = logits_with_ties_and_nans(8, 3, torch.float32, seed=3).requires_grad_()
    cases.append(pytest.param(
        "vote_", (torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long), x, 0, 4),
        id="vote_-requires_grad"))
    cases.append(pytest.param(
        "vote_margin_", (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                         torch.zeros(1, dtype=torch.long), x, 0, 4, 0.5),
        id="vote_margin_-requires_grad"))
    return cases


CASES = expand_cases() + vote_cases()


def test_every_registered_op_is_checked():
    """A dssn op added to csrc/ops.cpp without an opcheck case here fails this test."""
    assert registered_ops() == sorted({f"dssn::{case.values[0]}" for case in CASES})


@pytest.mark.parametrize("name,args", CASES)
def test_opcheck(name, args):
    op = getattr(torch.ops.dssn, name).default
    result = opcheck(op, args, test_utils=OPCHECK_TESTS)
    assert result == {test: "SUCCESS" for test in OPCHECK_TESTS}


# --- torch.compile -------------------------------------------------------------------------

L, Q, START, MARGIN = 11, 255, 3, 0.5


def pipeline(out, levels, offsets, logits, counts, nan_rows, counts_m, ambiguous, nan_rows_m):
    """One expand window and both votes, through the package's entry points."""
    expand_into(out, levels, offsets, L, Q, START, "cpp")
    rows_per_image = logits.shape[0] // counts.shape[0]
    vote_into(counts, nan_rows, logits, 0, rows_per_image, "cpp")
    vote_margin_into(counts_m, ambiguous, nan_rows_m, logits, 0, rows_per_image, MARGIN, "cpp")


def pipeline_arguments(B, seed):
    g = torch.Generator().manual_seed(seed)
    count, d, K, rows_per_image = 6, 9, 5, 4
    levels = torch.randint(0, Q + 1, (B, d), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, L, (d,), generator=g, dtype=torch.int32)
    logits = logits_with_ties_and_nans(B * rows_per_image, K, torch.float32, seed)
    return (torch.full((B, count, d), float("nan")), levels, offsets, logits,
            torch.zeros(B, K, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long),
            torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_entry_points_match_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True, backend=backend)
    for B, seed in ((3, 0), (5, 1)):   # a second shape: recompiled or dynamic
        eager = pipeline_arguments(B, seed)
        pipeline(*eager)
        got = pipeline_arguments(B, seed)
        compiled(*got)
        out, counts, nan_rows, counts_m, ambiguous = got[0], got[4], got[5], got[6], got[7]
        assert torch.equal(out.view(torch.int32), eager[0].view(torch.int32)), (backend, B)
        for name, i in (("counts", 4), ("nan_rows", 5), ("counts_m", 6), ("ambiguous", 7),
                        ("nan_rows_m", 8)):
            assert torch.equal(got[i], eager[i]), (backend, B, name)
        # the calls did something: every row voted, was NaN or ambiguous
        rows = B * 4
        assert not torch.isnan(out).any()
        assert int(counts.sum()) + int(nan_rows) == rows and int(nan_rows) >= 1
        assert int(ambiguous.sum()) >= 1 and int(counts_m.sum()) < int(counts.sum())
