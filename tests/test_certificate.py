"""dk.certificate_from_counts: hand-made vote counts, and a brute-force proof of the
radius on small vote vectors.

Model of the adversary (Corollary 1): one quantization step of L1 change alters at most
one of the L variants, and an altered variant may vote for any class. So r steps can
turn the counts N into any N' with the same total and sum_c max(N'_c - N_c, 0) <= r
(r votes moved). The certified radius in steps must be exactly the largest r such that
every such N' keeps the argmax (lowest index on ties) at A; with r + 1 some N' flips it.
"""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_kernels as dk


def cert(rows, q=255):
    counts = torch.tensor(rows, dtype=torch.int64)
    prediction, radius = dk.certificate_from_counts(counts, q)
    assert prediction.dtype == torch.int64 and radius.dtype == torch.float64
    assert prediction.shape == radius.shape == (counts.shape[0],)
    return prediction.tolist(), radius.tolist()


# (counts, prediction, radius in steps); radius = steps / q, compared with ==
HAND_MADE = {
    "clear winner":                     ([10, 3, 2], 0, 3),           # (10-3)/2 -> 3
    "clear winner, odd margin":         ([2, 11, 3], 1, 4),           # B=2 > A: (11-3)/2
    "clear winner, runner-up lower":    ([3, 11, 2], 1, 3),           # B=0 < A: (11-3-1)/2
    "even margin, runner-up lower":     ([3, 9, 0], 1, 2),            # (9-3-1)/2 = 2.5 -> 2
    "even margin, runner-up higher":    ([9, 3, 0], 0, 3),            # (9-3)/2
    "tie for the top, A lower":         ([5, 5, 2], 0, 0),            # A=0, B=1: 0/2
    "tie for the top, middle classes":  ([1, 6, 6, 1], 1, 0),         # A=1 (lowest), B=2
    "tie for the top, last classes":    ([0, 0, 4, 4], 2, 0),
    "three-way tie for the top":        ([3, 3, 3], 0, 0),
    "all-zero counts":                  ([0, 0, 0], 0, 0),
    "all votes for class 0":            ([7, 0, 0], 0, 3),            # B=1 > A: 7/2
    "all votes for the last class":     ([0, 0, 7], 2, 3),            # B=0 < A: (7-1)/2
    "all votes, last class, even":      ([0, 8], 1, 3),               # (8-0-1)/2 = 3.5
    "all votes for class 0, even":      ([8, 0], 0, 4),
    "single vote":                      ([0, 1], 1, 0),               # (1-0-1)/2
    "single vote, class 0":             ([1, 0], 0, 0),               # 1/2 -> 0
    "margin 1, runner-up higher":       ([4, 3], 0, 0),
    "margin 2, runner-up higher":       ([5, 3], 0, 1),
    "margin 2, runner-up lower":        ([3, 5], 1, 0),               # (2-1)/2
    "margin 3, runner-up lower":        ([3, 6], 1, 1),
    "runner-up tie, both higher":       ([9, 2, 2, 0], 0, 3),         # B=1
    "runner-up tie, one lower":         ([2, 9, 2, 0], 1, 3),         # B=0 < A: (9-2-1)/2
    "runner-up tie, both lower":        ([2, 2, 0, 9], 3, 3),         # B=0
    "runner-up tie, all others":        ([1, 1, 10, 1, 1], 2, 4),     # B=0 < A: (10-1-1)/2
    "runner-up tie at zero":            ([0, 0, 5, 0], 2, 2),         # (5-0-1)/2
    "large counts":                     ([3091, 0, 0], 0, 1545),
    "large counts, runner-up lower":    ([1000, 2091], 1, 545),       # (1091-1)/2
}


@pytest.mark.parametrize("case", list(HAND_MADE))
@pytest.mark.parametrize("q", [1, 16, 255])
def test_hand_made(case, q):
    counts, prediction, steps = HAND_MADE[case]
    (p,), (r,) = cert([counts], q)
    assert p == prediction
    assert r == steps / q          # exact float64 steps / q


def test_all_hand_made_in_one_batch():
    """Rows are independent: one batch gives the answers of one row at a time. Rows are
    padded with zero-vote classes at the end, which change nothing: they cannot win, and
    a tie for the runner-up at 0 goes to a lower, existing class."""
    K = max(len(c) for c, _, _ in HAND_MADE.values())
    rows = [c + [0] * (K - len(c)) for c, _, _ in HAND_MADE.values()]
    p, r = cert(rows, 255)
    assert p == [pred for _, pred, _ in HAND_MADE.values()]
    assert r == [steps / 255 for _, _, steps in HAND_MADE.values()]


def test_radius_is_steps_over_q_bit_exact():
    rows = [[n, 0] for n in range(0, 200)]
    for q in (1, 3, 7, 16, 255, 1000):
        p, r = cert(rows, q)
        steps = [n // 2 for n in range(200)]
        assert p == [0] * 200
        assert r == [np.float64(s) / np.float64(q) for s in steps]


def test_counts_dtypes_accepted():
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        p, r = dk.certificate_from_counts(torch.tensor([[2, 9, 2]], dtype=dtype), 255)
        assert p.tolist() == [1] and r.tolist() == [3 / 255]


def test_matches_certify_steps():
    """certify's own steps field agrees with certificate_from_counts on its counts."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (5, 6), generator=g, dtype=torch.uint8)
    w = torch.randn(6, 4, generator=g)
    c = dk.certify(lambda z: z @ w, x, L=13, q=16)
    p, r = dk.certificate_from_counts(c.counts, 16)
    assert torch.equal(p, c.prediction) and torch.equal(r, c.radius)
    assert torch.equal(c.radius, c.steps.double() / 16)


# --- brute force ----------------------------------------------------------------------

def compositions(total, K):
    """All count vectors of K non-negative ints summing to total."""
    for cuts in itertools.combinations(range(total + K - 1), K - 1):
        bounds = (-1,) + cuts + (total + K - 1,)
        yield tuple(bounds[i + 1] - bounds[i] - 1 for i in range(K))


def winner(counts):
    return int(np.argmax(counts))     # first index on ties, as torch.argmax


def votes_to_flip(counts):
    """Fewest changed variants after which the winner differs (brute force over all N')."""
    A = winner(counts)
    n = np.array(counts)
    best = None
    for other in compositions(int(n.sum()), len(counts)):
        if winner(other) != A:
            moved = int(np.maximum(np.array(other) - n, 0).sum())
            best = moved if best is None else min(best, moved)
    return best


@pytest.mark.parametrize("K", [2, 3, 4])
def test_brute_force_every_small_vote_vector(K):
    """Exhaustive over every count vector with L <= 8 votes and K classes: the radius is
    exactly one less than the fewest moved votes that flip the winner."""
    rows = [c for L in range(1, 9) for c in compositions(L, K)]
    p, r = cert(rows, 1)                   # q = 1: radius == steps
    for counts, pred, steps in zip(rows, p, r):
        assert pred == winner(counts), counts
        assert steps == votes_to_flip(counts) - 1, counts


def robust_and_tight(counts, pred, steps):
    """Direct statement: every N' within `steps` moved votes keeps pred; some N' within
    steps + 1 moved votes does not."""
    n = np.array(counts)
    flips_at = []
    for other in compositions(int(n.sum()), len(counts)):
        moved = int(np.maximum(np.array(other) - n, 0).sum())
        if moved <= steps:
            assert winner(other) == pred, (counts, other)
        if moved == steps + 1 and winner(other) != pred:
            flips_at.append(other)
    assert flips_at, f"radius {steps} is not tight for {counts}"


@given(st.lists(st.integers(0, 8), min_size=2, max_size=4).filter(lambda c: 1 <= sum(c) <= 8),
       st.sampled_from([1, 4, 255]))
def test_property_robust_and_tight(counts, q):
    (pred,), (radius,) = cert([counts], q)
    steps = radius * q
    assert steps == int(steps) and steps >= 0
    assert pred == winner(counts)
    robust_and_tight(counts, pred, int(steps))


@given(st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), min_size=1, max_size=20))
def test_property_formula_and_row_independence(rows):
    """Against the formula written out in Python, a whole batch at once and row by row."""
    p, r = cert(rows, 16)
    for counts, pred, radius in zip(rows, p, r):
        A = max(range(3), key=lambda c: (counts[c], -c))
        B = max((c for c in range(3) if c != A), key=lambda c: (counts[c], -c))
        steps = (counts[A] - counts[B] - (B < A)) // 2
        assert (pred, radius) == (A, steps / 16)
        assert cert([counts], 16) == ([pred], [radius])


# --- bad counts -----------------------------------------------------------------------

BAD_COUNTS = {
    "float": (torch.tensor([[3.0, 1.0]]), ValueError, r"integer \[B, K\] tensor"),
    "bool": (torch.tensor([[True, False]]), ValueError, r"integer \[B, K\] tensor"),
    "1-D": (torch.tensor([3, 1]), ValueError, r"\[B, K\].*shape \(2,\)"),
    "3-D": (torch.zeros(1, 2, 2, dtype=torch.long), ValueError, r"\[B, K\]"),
    "K = 1": (torch.tensor([[5]]), ValueError, r"at least 2 classes, got K=1"),
    "negative": (torch.tensor([[3, -1, 2]]), ValueError, r"non-negative"),
    "list": ([[3, 1]], TypeError, r"torch\.Tensor"),
    "numpy": (np.array([[3, 1]]), TypeError, r"torch\.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_COUNTS))
def test_bad_counts(case):
    counts, exc, match = BAD_COUNTS[case]
    with pytest.raises(exc, match=match):
        dk.certificate_from_counts(counts, 255)


@pytest.mark.parametrize("q,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError),
                                   (True, TypeError), (None, TypeError), ("255", TypeError)])
def test_bad_q(q, exc):
    with pytest.raises(exc, match=r"q must be"):
        dk.certificate_from_counts(torch.tensor([[3, 1]]), q)


def test_numpy_int_q_accepted():
    p, r = dk.certificate_from_counts(torch.tensor([[7, 1]]), np.int64(16))
    assert p.tolist() == [0] and r.tolist() == [3 / 16]
