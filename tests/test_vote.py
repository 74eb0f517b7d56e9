"""dssn::vote_ on every backend (torch, cpp, triton in the interpreter) against a literal
loop: first index wins ties, NaN rows are counted apart and vote for nobody, rows map to
images by (row0 + r) // rows_per_image, counts accumulate."""
import pytest
import torch

from conftest import CPU_BACKENDS
from dssn_kernels.ops import vote_into
from testkit import literal_votes

BACKENDS = CPU_BACKENDS  # expected here (conftest), not asked of the package


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K,row0,rows_per_image", [(2, 0, 1), (10, 3, 7), (10, 0, 50),
                                                    (1000, 5, 4)])
def test_vote_matches_literal_loop(backend, dtype, K, row0, rows_per_image):
    g = torch.Generator().manual_seed(K + row0)
    R = 40
    logits = torch.randint(-3, 4, (R, K), generator=g).to(dtype)   # many exact ties
    logits[4] = float("nan")
    logits[9, K - 1] = float("nan")
    logits[11] = float("-inf")                                      # all -inf votes 0
    logits[13, K // 2] = float("inf")
    B = (row0 + R - 1) // rows_per_image + 1
    counts = torch.randint(0, 5, (B, K), generator=g)               # accumulates onto these
    nan_rows = torch.tensor([2])
    want_counts, want_nan = literal_votes(counts, nan_rows, logits, row0, rows_per_image)
    vote_into(counts, nan_rows, logits, row0, rows_per_image, backend)
    assert torch.equal(counts, want_counts)
    assert torch.equal(nan_rows, want_nan) and int(nan_rows) == 2 + 2
