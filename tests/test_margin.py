"""certify(..., margin=tau): votes that survive floating-point differences.

A variant whose top logit beats the runner-up by less than tau is ambiguous: it votes for
no class and counts, adversarially, for every class it could go to (README, "What
'exact' means under floating point"). Checked here:

* margin = 0 gives exactly today's certificate on every backend (and zero ambiguous
  counts); margin > 0 is identical across backends, batch sizes and the reference;
* a model with hand-planted near ties loses exactly the radius the rule says;
* the steps agree with the early-exit decision rules (decisions.py) and the reference;
* soundness by brute force: for every quantized x' within the certified radius and
  every evaluation whose logits move by less than tau/2 (the adversary's best choice,
  built explicitly and evaluated in exact arithmetic), the smoothed prediction is the
  certified one;
* bad margins raise.
"""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_kernels as dk
import dssn_reference as ref
from conftest import CPU_BACKENDS
from dssn_kernels import decisions
from testkit import IntegerLinear

BACKENDS = CPU_BACKENDS      # torch, cpp, triton (interpreter): expected (conftest)


def fields(cert):
    return {name: getattr(cert, name) for name in
            ("prediction", "radius", "steps", "counts", "ambiguous", "num_ambiguous")}


def assert_same(a, b, *context):
    for name, value in fields(a).items():
        assert torch.equal(value.cpu(), getattr(b, name).cpu()), (name, *context)


class ModInteger(torch.nn.Module):
    """IntegerLinear's exact integer scores folded mod 7 and scaled by ``step``: a
    random-ish, deterministic model with many exact ties and near ties."""

    def __init__(self, dim, num_classes, q, seed=0, step=0.5, dtype=torch.float32):
        super().__init__()
        self.inner = IntegerLinear(dim, num_classes, q, seed=seed, bias_scale=1)
        self.step, self.dtype = step, dtype

    def forward(self, x):
        return (torch.remainder(self.inner(x), 7) * self.step).to(self.dtype)


# --- margin = 0 is today's certificate ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_zero_changes_nothing(backend):
    q, L = 16, 13
    x = torch.randint(0, q + 1, (5, 2, 3), generator=torch.Generator().manual_seed(0))
    model = ModInteger(6, 4, q, seed=3)
    plain = dk.certify(model, x.to(torch.uint8), L=L, q=q, backend=backend, batch_size=7)
    zero = dk.certify(model, x.to(torch.uint8), L=L, q=q, backend=backend, batch_size=7,
                      margin=0.0)
    expected = ref.certify(model, x.to(torch.uint8), L=L, q=q)
    assert_same(plain, zero, backend)
    assert_same(plain, expected, backend)
    assert zero.margin == 0.0 and not zero.ambiguous.any() and not zero.num_ambiguous.any()
    assert torch.equal(zero.counts.sum(1), torch.full((5,), L))
    assert bool((zero.steps >= 0).all())
    # the derivation from counts is the design's formula
    p, r = dk.certificate_from_counts(zero.counts, q)
    assert torch.equal(p, zero.prediction) and torch.equal(r, zero.radius)
    p, r = dk.certificate_from_counts(zero.counts, q, ambiguous=zero.ambiguous)
    assert torch.equal(p, zero.prediction) and torch.equal(r, zero.radius)


def test_certificate_constructor_without_margin_fields():
    counts = torch.tensor([[5, 2]])
    cert = dk.Certificate(prediction=torch.tensor([0]), radius=torch.tensor([0.25]),
                          steps=torch.tensor([1]), counts=counts, num_variants=7, q=4)
    assert cert.margin == 0.0 and cert.backend is None
    assert torch.equal(cert.ambiguous, torch.zeros_like(counts))
    assert torch.equal(cert.num_ambiguous, torch.zeros(1, dtype=torch.long))


# --- margin > 0: identical everywhere -----------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 1.0, 1.25])
def test_margin_identical_across_backends_and_batch_sizes(tau):
    q, L = 6, 9
    x = torch.randint(0, q + 1, (4, 3), generator=torch.Generator().manual_seed(1))
    model = ModInteger(3, 5, q, seed=2)
    expected = ref.certify(model, x, L=L, q=q, margin=tau)
    assert int(expected.num_ambiguous.sum()) > 0           # the margin matters here
    for backend in BACKENDS:
        for batch_size in (1, 7, L, 4 * L):
            got = dk.certify(model, x, L=L, q=q, backend=backend, batch_size=batch_size,
                             margin=tau)
            assert_same(got, expected, backend, batch_size)
            assert got.margin == tau
            assert torch.equal(got.counts.sum(1) + got.num_ambiguous, torch.full((4,), L))
            assert bool((got.ambiguous.sum(1) >= 2 * got.num_ambiguous).all())


def test_margin_with_half_logits():
    """float16/bfloat16 logits are read exactly: the same certificate as their float64."""
    q, L = 6, 9
    x = torch.randint(0, q + 1, (3, 3), generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        model = ModInteger(3, 3, q, seed=5, step=0.375, dtype=dtype)
        wide = ModInteger(3, 3, q, seed=5, step=0.375, dtype=torch.float64)
        expected = ref.certify(wide, x, L=L, q=q, margin=0.75)
        for backend in BACKENDS:
            assert_same(dk.certify(model, x, L=L, q=q, backend=backend, margin=0.75),
                        expected, backend, dtype)


# --- hand-planted near ties ---------------------------------------------------------------

# q = 16, L = 8, one pixel at level 8: the variants are m/(4q) for these m (seed 0)
PLANTED_M = [34, 38, 42, 46, 18, 22, 26, 30]
ABOVE_1_5 = float(torch.nextafter(torch.tensor(1.5), torch.tensor(2.0)))   # 1.5 + 2^-23
PLANTED = {            # m -> logits of classes 0, 1, 2
    34: [2.0, 0.0, 0.0],         # gap 2
    38: [2.0, 1.0, 0.0],         # gap 1
    42: [2.0, 1.5, 0.0],         # gap 0.5
    46: [1.0, 1.0, -1.0],        # tie 0/1 (argmax 0), gap 2 to class 2
    18: [1.0, 0.75, 0.7],        # gaps 0.25 and 0.3
    22: [0.0, 3.0, 0.0],         # gap 3 for class 1
    26: [2.0, 0.0, ABOVE_1_5],   # gaps 2 and 0.5 - 2^-23
    30: [1.0, 0.0, 0.0],         # gap 1
}


class Planted(torch.nn.Module):
    def forward(self, x):
        m = torch.round(x.reshape(x.shape[0], -1)[:, 0].double() * 64).long()
        return torch.tensor([PLANTED[int(v)] for v in m], dtype=torch.float32)


# tau -> (counts, ambiguous, steps), worked out by hand from the table above
PLANTED_EXPECTED = {
    # no margin: the tie at m=46 goes to class 0; N = [7, 1, 0]; (7 - 1) // 2 = 3
    0.0: ([7, 1, 0], [0, 0, 0], 3),
    # only the exact tie (46) is ambiguous, for classes 0 and 1: N = [6, 1, 0];
    # class 1: 6 - (1 + 1) = 4, class 2: 6 - 0 = 6 -> 4 // 2 = 2 (one step lost)
    1e-30: ([6, 1, 0], [1, 1, 0], 2),
    # gap 0.5 (m=42) is not below 0.5, gap 0.5 - 2^-23 (m=26) is: 46 {0,1}, 18 {0,1,2},
    # 26 {0,2} are ambiguous; N = [4, 1, 0], amb = [3, 2, 2];
    # class 1: 4 - 3 = 1, class 2: 4 - 2 = 2 -> 1 // 2 = 0: certified at radius 0 only
    0.5: ([4, 1, 0], [3, 2, 2], 0),
    # one float64 ulp above 0.5: m=42 (gap exactly 0.5) joins {0,1}: N = [3, 1, 0],
    # amb = [4, 3, 2]; class 1: 3 - 4 = -1 -> not certified
    0.5 + 2 ** -53: ([3, 1, 0], [4, 3, 2], -1),
    # 38 {0,1}, 42 {0,1}, 46 {0,1}, 18 {0,1,2}, 26 {0,2}, 30 {0,1,2}; votes 34 -> 0, 22 -> 1:
    # N = [1, 1, 0] (A = 0 by index), amb = [6, 5, 3]; class 1: 1 - 6 = -5 -> -1
    1.5: ([1, 1, 0], [6, 5, 3], -1),
}


@pytest.mark.parametrize("tau", sorted(PLANTED_EXPECTED))
def test_planted_near_ties_lose_exactly_the_rule(tau):
    q, L = 16, 8
    x = torch.tensor([[8], [8]], dtype=torch.uint8)
    v = dk.variants(x[:1], L=L, q=q)
    assert torch.round(v.flatten().double() * 64).long().tolist() == PLANTED_M
    counts, ambiguous, steps = PLANTED_EXPECTED[tau]
    num_ambiguous = L - sum(counts)
    for backend in BACKENDS:
        for batch_size in (1, 7, L):
            cert = dk.certify(Planted(), x, L=L, q=q, margin=tau, backend=backend,
                              batch_size=batch_size)
            assert cert.counts.tolist() == [counts] * 2, (backend, batch_size)
            assert cert.ambiguous.tolist() == [ambiguous] * 2
            assert cert.num_ambiguous.tolist() == [num_ambiguous] * 2
            assert cert.prediction.tolist() == [0, 0]
            assert cert.steps.tolist() == [steps] * 2
            assert cert.radius.tolist() == [steps / q] * 2
    r = ref.certify(Planted(), x, L=L, q=q, margin=tau)
    assert r.counts.tolist() == [counts] * 2 and r.ambiguous.tolist() == [ambiguous] * 2
    assert r.steps.tolist() == [steps] * 2


# --- the certificate formula ----------------------------------------------------------------

@given(st.integers(2, 5).flatmap(lambda K: st.tuples(
    st.lists(st.integers(0, 12), min_size=K, max_size=K),
    st.lists(st.integers(0, 6), min_size=K, max_size=K))))
def test_steps_match_decisions_and_reference(rows):
    counts_row, amb_row = rows
    counts, amb = torch.tensor([counts_row]), torch.tensor([amb_row])
    prediction, radius = dk.certificate_from_counts(counts, 7, ambiguous=amb)
    steps = int(round(float(radius[0]) * 7))
    A, r = ref._certified_steps(counts_row, amb_row)
    assert (int(prediction[0]), steps) == (A, r)
    assert steps >= -1
    for s in range(0, 12):
        yes = bool(decisions.certified_settled(counts, 0, s, amb)[0])
        assert yes == (steps >= s), (s, steps)


def test_certificate_from_counts_checks_ambiguous():
    with pytest.raises(ValueError):
        dk.certificate_from_counts(torch.tensor([[3, 1]]), 4, ambiguous=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError):
        dk.certificate_from_counts(torch.tensor([[3, 1]]), 4, ambiguous=torch.tensor([[-1, 1]]))
    with pytest.raises(TypeError):
        dk.certificate_from_counts(torch.tensor([[3, 1]]), 4, ambiguous=[[1, 1]])


# --- soundness by brute force ---------------------------------------------------------------

def first_argmax(values):
    return max(range(len(values)), key=lambda c: (values[c], -c))


def adversarial_vote(z, tau, target):
    """The vote of the evaluation z + delta, |delta_c| < tau/2, that pushes ``target``
    up and every other class down as far as allowed (exact arithmetic). Returns the
    class it votes for."""
    z = [Fraction(v) for v in z]
    top = max(z)
    below = [top - v for v in z if top - v < tau]           # gaps under tau (incl. 0)
    h = (tau + max(below)) / 4                              # max(below) < 2h, h < tau/2
    assert 0 < h < tau / 2
    moved = [v + h if c == target else v - h for c, v in enumerate(z)]
    return first_argmax(moved)


def smoothed_under_attack(logits, tau, P, rival):
    """Smoothed prediction of the evaluation that, variant by variant, makes ``rival``
    win where it can, and otherwise keeps the certified class P from winning where it
    can: the adversary's best play against P for this rival (variants are independent)."""
    tau = Fraction(tau)
    K = len(logits[0])
    votes = [0] * K
    for z in logits:
        zf = [Fraction(v) for v in z]
        top = max(zf)
        can_win = [c for c in range(K) if top - zf[c] < tau]  # the classes that can win
        if rival in can_win:
            target = rival
        else:
            others = [c for c in can_win if c != P]
            target = others[0] if others else can_win[0]
        vote = adversarial_vote(z, tau, target)
        assert vote == target                               # the push really works
        votes[vote] += 1
    return first_argmax(votes)


class Coarse(torch.nn.Module):
    """IntegerLinear's exact scores floored to multiples of ``div`` (in units of 0.5):
    a smoother model whose near ties sit on the class boundaries."""

    def __init__(self, dim, num_classes, q, seed=0, div=1):
        super().__init__()
        self.inner = IntegerLinear(dim, num_classes, q, seed=seed, bias_scale=2)
        self.div = div

    def forward(self, x):
        return (torch.floor(self.inner(x) / self.div) * 0.5).float()


SOUNDNESS_CASES = [  # (model, q, d, L, K, seed, parameter, tau)
    ("coarse", 3, 4, 9, 3, 1, 3, 0.75),       # gaps 0 and 0.5 ambiguous
    ("coarse", 4, 3, 7, 3, 0, 16, 0.75),
    ("coarse", 3, 3, 12, 3, 2, 6, 1.0),       # gap 1.0 == tau: not ambiguous
    ("mod", 5, 2, 9, 3, 2, 0.5, 0.75),
    ("mod", 6, 2, 7, 2, 2, 0.25, 0.5),        # gap 0.5 == tau: not ambiguous
    ("mod", 6, 2, 4, 3, 0, 0.125, 0.3),
]


@pytest.mark.parametrize("kind,q,d,L,K,seed,parameter,tau", SOUNDNESS_CASES)
def test_margin_certificate_sound_by_brute_force(kind, q, d, L, K, seed, parameter, tau):
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    dist = (grid[:, None, :].long() - grid[None, :, :].long()).abs().sum(-1)
    if kind == "coarse":
        model = Coarse(d, K, q, seed=seed, div=parameter)
    else:
        model = ModInteger(d, K, q, seed=seed, step=parameter, dtype=torch.float32)
    cert = dk.certify(model, grid, L=L, q=q, seed=seed, margin=tau)
    with torch.no_grad():
        logits = model(dk.variants(grid, L=L, q=q, seed=seed).reshape(-1, d))
    logits = logits.reshape(len(grid), L, K).double().tolist()
    attacked = {}                    # (x', P, rival) -> smoothed prediction under attack
    checked = certified_with_ambiguity = 0
    for i in range(len(grid)):
        steps, P = int(cert.steps[i]), int(cert.prediction[i])
        if steps < 0:
            continue
        certified_with_ambiguity += steps > 0 and int(cert.num_ambiguous[i]) > 0
        for j in torch.nonzero(dist[i] <= steps).flatten().tolist():
            for rival in range(K):
                key = (j, P, rival)
                if key not in attacked:
                    attacked[key] = smoothed_under_attack(logits[j], tau, P, rival)
                assert attacked[key] == P, (grid[i].tolist(), grid[j].tolist(), rival)
                checked += 1
    # the test bites: certificates of positive radius despite ambiguous variants
    assert checked > 0 and certified_with_ambiguity >= 3
    assert torch.equal(cert.counts.sum(1) + cert.num_ambiguous, torch.full((len(grid),), L))


def test_brute_force_attack_breaks_an_overclaimed_certificate():
    """The attack is strong enough to matter: certifying the planted model one step past
    its margin certificate (steps 0 -> 1 at tau = 0.5) is refuted by some x' and attack."""
    q, L, tau = 16, 8, 0.5
    x = torch.tensor([[8]], dtype=torch.uint8)
    cert = dk.certify(Planted(), x, L=L, q=q, margin=tau)
    assert int(cert.steps[0]) == 0
    # at radius 0 (x' = x) the certificate survives every attack
    z = Planted()(dk.variants(x, L=L, q=q).reshape(-1, 1)).double().tolist()
    assert all(smoothed_under_attack(z, tau, 0, rival) == 0 for rival in range(3))
    # one variant flipped to class 1 (one step of L1 change moves at most one variant),
    # the ambiguous ones pushed to class 1: N'_0 = 3 < N'_1 = 1 + 1 + 2 = 4
    flipped = [PLANTED[22] if m == 34 else PLANTED[m] for m in PLANTED_M]
    assert smoothed_under_attack(flipped, tau, 0, 1) == 1


# --- bad margins ------------------------------------------------------------------------------

@pytest.mark.parametrize("margin,error", [
    (-0.5, ValueError), (-1, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), (-float("inf"), ValueError), ("0.5", TypeError),
    (True, TypeError), (False, TypeError), (None, TypeError), (1j, TypeError),
    (torch.tensor(0.5), TypeError),
])
def test_bad_margin_raises(margin, error):
    model = IntegerLinear(2, 3, 4)
    with pytest.raises(error, match="margin"):
        dk.certify(model, torch.zeros(1, 2, dtype=torch.uint8), L=3, q=4, margin=margin)


@pytest.mark.parametrize("margin", [0, 1, 0.5, np.float32(0.25), np.int64(2), Fraction(1, 3)])
def test_real_margins_accepted(margin):
    model = IntegerLinear(2, 3, 4)
    cert = dk.certify(model, torch.zeros(1, 2, dtype=torch.uint8), L=3, q=4, margin=margin)
    assert cert.margin == float(margin) and isinstance(cert.margin, float)
    assert math.isfinite(cert.margin)
