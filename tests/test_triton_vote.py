"""The Triton vote kernel against a literal vote loop (tests/testkit.py).

Runs in Triton's interpreter on CPU tensors where there is no GPU (conftest sets
TRITON_INTERPRET=1), on CUDA tensors with TRITON_INTERPRET=0 on an sm_80+ GPU.
"""
import pytest
import torch

from testkit import literal_votes
from triton_ptx import ATOMICS, run_ptx_probe

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from dssn_kernels.triton import interpreting, triton_available  # noqa: E402
from dssn_kernels.triton.vote import vote_settings, vote_triton  # noqa: E402

OK, REASON = triton_available()
DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = pytest.mark.skipif(not OK, reason=REASON)


def run_vote(counts, nan_rows, logits, row0, rows_per_image):
    c, n = counts.clone().to(DEVICE), nan_rows.clone().to(DEVICE)
    vote_triton(c, n, logits.to(DEVICE), row0, rows_per_image)
    return c.cpu(), n.cpu()


def tie_heavy_logits(R, K, dtype, seed):
    """Small integers (ties everywhere), some explicit multi-way ties, NaN rows, an
    all -inf row, a +inf row and a signed-zero tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (R, K), generator=g).double()
    x[0] = 0.0
    x[0, 0] = -0.0                                  # -0.0 == +0.0: index 0 wins
    x[1] = float("-inf")                            # all -inf: torch votes 0
    x[2, :] = 1.0
    x[2, K // 2] = float("inf")
    if K >= 3:
        x[3, :] = -5.0
        x[3, [1, K - 1]] = 7.0                      # tie: 1 wins over K-1
    x[4, K - 1] = 100.0                             # winner in the last column
    x[5, K - 1] = float("nan")                      # NaN in the last column
    x[6, 0] = float("nan")
    x[6, 1 % K] = float("inf")
    x[R - 1, K // 3] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,R", [(2, 300), (10, 300), (1000, 40)])
def test_counts_match_torch_argmax(K, R, dtype):
    logits = tie_heavy_logits(R, K, dtype, seed=K)
    B, row0, rpi = 5, 13, 70                        # rows map to images 0..4
    counts = torch.randint(0, 50, (B, K), dtype=torch.int64)   # votes accumulate
    nan_rows = torch.tensor([3], dtype=torch.int64)
    got = run_vote(counts, nan_rows, logits, row0, rpi)
    want = literal_votes(counts, nan_rows, logits, row0, rpi)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert int(got[1]) == 3 + 3                     # rows 5, 6 and R-1 hold a NaN


@pytest.mark.parametrize("K", [2, 10, 1000])
def test_explicit_ties_vote_lowest_index(K):
    R = 6
    x = torch.full((R, K), -1.0)
    picks = [[0, K - 1], [K - 1], [K // 2, K - 1], [1 % K, K // 2, K - 1], [0], [K - 2, K - 1]]
    for r, cols in enumerate(picks):
        x[r, cols] = 2.5
    counts = torch.zeros(R, K, dtype=torch.int64)
    got, nans = run_vote(counts, torch.zeros(1, dtype=torch.int64), x, 0, 1)
    assert int(nans) == 0
    for r, cols in enumerate(picks):
        assert got[r].nonzero().flatten().tolist() == [min(cols)], (r, cols)


def test_wide_rows_loop_over_column_blocks():
    """K over one column block: ties across blocks go to the earlier block."""
    K = 2500
    block_r, block_k, _ = vote_settings(8, K)
    assert block_k < K                              # several column blocks
    x = torch.zeros(8, K)
    x[0, [1500, 2400]] = 1.0                        # tie across blocks -> 1500
    x[1, [7, 2499]] = 1.0                           # -> 7
    x[2, 2499] = 1.0                                # max in the last, partial block
    x[3, 1023:1025] = 1.0                           # tie straddling a block edge -> 1023
    x[4, 1024] = 3.0
    x[4, 0] = 2.0                                   # later block strictly larger -> 1024
    x[5, 2000] = float("nan")                       # NaN only in a later block
    x[6] = torch.linspace(1, 0, K)                  # decreasing -> 0
    x[7] = torch.linspace(0, 1, K)                  # increasing -> K-1
    counts = torch.zeros(8, K, dtype=torch.int64)
    got, nans = run_vote(counts, torch.zeros(1, dtype=torch.int64), x, 0, 1)
    want = {0: 1500, 1: 7, 2: 2499, 3: 1023, 4: 1024, 6: 0, 7: K - 1}
    assert int(nans) == 1
    assert got[5].sum() == 0
    for r, c in want.items():
        assert got[r].nonzero().flatten().tolist() == [c], r


def test_noncontiguous_and_float64_logits():
    g = torch.Generator().manual_seed(4)
    base = torch.randint(-2, 3, (10, 200), generator=g).double()
    logits = base.t()                               # [200, 10], strides (1, 200)
    assert not logits.is_contiguous()
    counts = torch.zeros(4, 10, dtype=torch.int64)
    nan_rows = torch.zeros(1, dtype=torch.int64)
    got = run_vote(counts, nan_rows, logits, 0, 50)
    want = literal_votes(counts, nan_rows, logits, 0, 50)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(got[0].sum()) == 200


def test_empty_logits_are_a_no_op():
    counts = torch.ones(2, 3, dtype=torch.int64)
    got, nans = run_vote(counts, torch.zeros(1, dtype=torch.int64), torch.empty(0, 3), 0, 1)
    assert torch.equal(got, counts) and int(nans) == 0


@pytest.mark.parametrize("bad", ["counts_dtype", "counts_noncontig", "nan_shape", "K",
                                 "logits_dtype", "past_last_image", "rows_per_image"])
def test_rejects_bad_arguments(bad):
    counts = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    nan_rows = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    logits = torch.zeros(6, 4, device=DEVICE)
    row0, rpi = 0, 3
    if bad == "counts_dtype":
        counts = counts.int()
    elif bad == "counts_noncontig":
        counts = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE).t()
    elif bad == "nan_shape":
        nan_rows = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    elif bad == "K":
        logits = torch.zeros(6, 5, device=DEVICE)
    elif bad == "logits_dtype":
        logits = logits.int()
    elif bad == "past_last_image":
        row0 = 1
    elif bad == "rows_per_image":
        rpi = 0
    with pytest.raises(ValueError):
        vote_triton(counts, nan_rows, logits, row0, rpi)


# Compiles the kernel for sm_80 and sm_90 (the H100/H200; no GPU needed: triton ships
# ptxas) in a process without TRITON_INTERPRET: every logits dtype, and every int argument
# equal to 1 (Triton specializes those into constexprs, which the interpreter never does).
@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_compiles_to_ptx_with_integer_atomics(capability):
    report = run_ptx_probe("vote", "_vote_kernel",
                           {"counts_ptr": "*i64", "nan_ptr": "*i64", "logits_ptr": None},
                           ATOMICS, ones_too=True, capability=capability)
    assert len(report) == 4
    for dtype, ops in report.items():
        assert ops and all(op.endswith("add.u64") for op in ops), (dtype, ops)
