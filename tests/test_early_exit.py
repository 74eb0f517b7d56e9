"""Early exit, same answers: the decision rules of dssn_kernels.decisions by brute force
over every completion of the remaining variants, required_steps edge cases, and
certify_at / predict against the full certificate for random models, inputs, radii,
batch sizes, chunk sizes, variant orders, margins and backends."""
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
from dssn_kernels import decisions, early_exit
from dssn_kernels.decisions import certified_steps
from dssn_kernels.early_exit import variant_order
from dssn_kernels.ops import vote_margin_into
from testkit import Constant, IntegerLinear


# --- brute force over completions ---------------------------------------------------------

def outcomes(K, margin):
    """Every possible outcome of one variant, as (vote delta [K], ambiguous delta [K]):
    a vote for one class, or (margin mode) an ambiguous variant in a set of >= 2 classes."""
    out = []
    for c in range(K):
        v = np.zeros(K, np.int64)
        v[c] = 1
        out.append((v, np.zeros(K, np.int64)))
    if margin:
        for size in range(2, K + 1):
            for S in itertools.combinations(range(K), size):
                a = np.zeros(K, np.int64)
                a[list(S)] = 1
                out.append((np.zeros(K, np.int64), a))
    return out


def completions(K, m, margin):
    """(dN [C, K], dA [C, K]): every multiset of m outcomes."""
    outs = outcomes(K, margin)
    dN, dA = [], []
    for combo in itertools.combinations_with_replacement(range(len(outs)), m):
        dN.append(sum((outs[i][0] for i in combo), np.zeros(K, np.int64)))
        dA.append(sum((outs[i][1] for i in combo), np.zeros(K, np.int64)))
    return np.array(dN).reshape(-1, K), np.array(dA).reshape(-1, K)


def final_decision(N, A, s):
    """Full decision, written out independently: (argmax, certified at s) of [..., K]."""
    K = N.shape[-1]
    lead = N.argmax(axis=-1)
    NA = np.take_along_axis(N, lead[..., None], -1)
    idx = np.arange(K)
    slack = NA - N - A - (idx < lead[..., None])
    slack = np.where(idx == lead[..., None], np.iinfo(np.int64).max, slack)
    return lead, slack.min(axis=-1) >= 2 * s


def states(K, max_n, max_a, margin):
    Ns = np.array(list(itertools.product(range(max_n + 1), repeat=K)), np.int64)
    if not margin:
        return Ns, np.zeros_like(Ns)
    As = np.array(list(itertools.product(range(max_a + 1), repeat=K)), np.int64)
    N = np.repeat(Ns, len(As), axis=0)
    A = np.tile(As, (len(Ns), 1))
    return N, A


@pytest.mark.parametrize("K,margin,max_n,max_a,max_m", [
    (2, False, 5, 0, 5), (3, False, 4, 0, 4), (4, False, 2, 0, 3),
    (2, True, 4, 2, 4), (3, True, 3, 1, 3)])
def test_rules_by_brute_force(K, margin, max_n, max_a, max_m):
    N, A = states(K, max_n, max_a, margin)
    tN, tA = torch.from_numpy(N), torch.from_numpy(A) if margin else None
    lead_now = N.argmax(axis=1)
    for m in range(max_m + 1):
        dN, dA = completions(K, m, margin)
        FN, FA = N[:, None, :] + dN[None], A[:, None, :] + dA[None]   # [S, C, K]
        lead_final = FN.argmax(axis=-1)
        same_lead = (lead_final == lead_now[:, None]).all(axis=1)
        assert np.array_equal(decisions.prediction_settled(tN, m).numpy(), same_lead)
        for s in range(0, 4):
            lead, cert = final_decision(FN, FA, s)
            yes = (cert & (lead == lead_now[:, None])).all(axis=1)
            no = (~cert).all(axis=1)
            assert np.array_equal(decisions.certified_settled(tN, m, s, tA).numpy(), yes)
            assert np.array_equal(decisions.uncertifiable(tN, m, s, tA).numpy(), no)
            if s >= 1:  # "every outcome certifies some class" is the same as `yes`
                assert np.array_equal(cert.all(axis=1), yes)
            if m == 0:  # no variant left: the full certificate, the one rule
                p, r = certified_steps(tN, tA)
                assert np.array_equal(p.numpy(), lead[:, 0])
                assert np.array_equal((r >= s).numpy(), cert[:, 0])


@pytest.mark.parametrize("K,margin,max_n,max_a,max_m", [
    (2, False, 4, 0, 5), (3, False, 3, 0, 4), (2, True, 3, 1, 4), (3, True, 2, 1, 3)])
def test_more_needed_is_a_lower_bound(K, margin, max_n, max_a, max_m):
    """No k < more_needed further outcomes settle the decision; for predict the bound is
    reached (all further variants voting for one class)."""
    N, A = states(K, max_n, max_a, margin)
    tN, tA = torch.from_numpy(N), torch.from_numpy(A) if margin else None
    for m in range(max_m + 1):
        first = {}
        for k in range(m + 1):  # fewest k with some k-outcome settling, per rule
            dN, dA = completions(K, k, margin)
            FN = torch.from_numpy((N[:, None, :] + dN[None]).reshape(-1, K))
            FA = torch.from_numpy((A[:, None, :] + dA[None]).reshape(-1, K)) if margin else None
            S, C = len(N), len(dN)
            pred = decisions.prediction_settled(FN, m - k).view(S, C).any(1).numpy()
            first.setdefault("p", np.full(S, m + 1))
            first["p"] = np.where((first["p"] > m) & pred, k, first["p"])
            for s in range(3):
                for sp in (False, True):
                    yes = decisions.certified_settled(FN, m - k, s, FA)
                    no = decisions.uncertifiable(FN, m - k, s, FA)
                    if sp:
                        no = no & decisions.prediction_settled(FN, m - k)
                    ok = (yes | no).view(S, C).any(1).numpy()
                    key = (s, sp)
                    first.setdefault(key, np.full(S, m + 1))
                    first[key] = np.where((first[key] > m) & ok, k, first[key])
        assert np.array_equal(decisions.more_needed_predict(tN, m).numpy(), first["p"])
        for s in range(3):
            for sp in (False, True):
                need = decisions.more_needed_certify(tN, m, s, tA, sp).numpy()
                assert (need <= first[(s, sp)]).all(), (s, sp)
                assert np.array_equal(need == 0, first[(s, sp)] == 0)


def test_rules_per_row_remaining_and_dtypes():
    counts = torch.tensor([[5, 0, 0], [3, 2, 0]], dtype=torch.int32)
    assert decisions.prediction_settled(counts, torch.tensor([4, 0])).tolist() == [True, True]
    assert decisions.prediction_settled(counts, torch.tensor([6, 2])).tolist() == [False, False]
    # lead_X = N_X - best rival of X (N_c + [c < X] over c != X): best rivals [0, 6, 6], [2, 4, 4]
    assert (counts - decisions.class_leads(counts)).tolist() == [[0, 6, 6], [2, 4, 4]]


# --- required_steps ------------------------------------------------------------------------

def test_required_steps_exact_values():
    rs = decisions.required_steps
    assert rs(0, 255) == 0 and rs(0.0, 255) == 0 and rs(-0.0, 255) == 0
    assert rs(1, 4) == 4 and rs(3, 1) == 3
    assert rs(np.int64(2), 3) == 6
    assert rs(Fraction(1, 3), 3) == 1 and rs(Fraction(1, 2), 3) == 2
    assert rs(Fraction(2, 10), 5) == 1
    assert rs(0.2, 5) == 1            # float 0.2 is slightly above 1/5, yet 1/5 == 0.2 in float64
    assert Fraction(0.2) * 5 > 1
    assert rs(np.nextafter(0.2, 1), 5) == 2
    assert rs(np.float32(0.5), 4) == 2
    assert rs(1e-300, 255) == 1
    assert rs(1e307, 255) > 2 ** 60 and rs(10 ** 400, 3) == 3 * 10 ** 400


@pytest.mark.parametrize("q", [1, 3, 5, 7, 10, 16, 255, 1000])
def test_required_steps_matches_float_comparison(q):
    rng = np.random.default_rng(q)
    for s in range(0, 60):
        for r in (s / q, np.nextafter(s / q, 0), np.nextafter(s / q, 1), (s + rng.random()) / q):
            r = float(r)
            if r < 0:
                continue
            want = next(t for t in range(0, s + 3) if float(t) / q >= r)
            assert decisions.required_steps(r, q) == want, (r, q)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (-1e-12, ValueError), (Fraction(-1, 7), ValueError),
                                     (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError), ("0.1", TypeError), (None, TypeError),
                                     (torch.tensor(0.1), TypeError), (1 + 0j, TypeError)])
def test_required_steps_rejects(bad, exc):
    with pytest.raises(exc):
        decisions.required_steps(bad, 255)


# --- certify_at / predict against the full certificate ------------------------------------

def per_variant(model, x, L, q, margin, order):
    """Votes [B, L, K] and ambiguous [B, L, K] of every variant, in evaluation ``order``."""
    V = dk.variants(x, L=L, q=q, backend="torch")
    B = x.shape[0]
    logits = model(V.reshape(B * L, *x.shape[1:]))
    K = logits.shape[1]
    votes = torch.zeros(B * L, K, dtype=torch.int64)
    amb = torch.zeros(B * L, K, dtype=torch.int64)
    vote_margin_into(votes, amb, torch.zeros(1, dtype=torch.int64), logits, 0, 1, margin, "torch")
    perm = torch.from_numpy(variant_order(order, L))
    return votes.view(B, L, K)[:, perm], amb.view(B, L, K)[:, perm]


def full_certificate(model, x, L, q, margin, backend="torch"):
    if margin > 0:
        return dk.certify(model, x, L=L, q=q, backend=backend, margin=margin)
    return dk.certify(model, x, L=L, q=q, backend=backend)


def random_case(data, *, max_L=40):
    q = data.draw(st.integers(2, 12), label="q")
    L = data.draw(st.integers(1, max_L), label="L")
    d = data.draw(st.integers(1, 6), label="d")
    K = data.draw(st.integers(2, 5), label="K")
    B = data.draw(st.integers(1, 5), label="B")
    seed = data.draw(st.integers(0, 1000), label="seed")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, q + 1, (B, 1, d), generator=g).to(torch.uint8)
    # bias_scale 0: mixed votes; 2: often one confident class
    model = IntegerLinear(d, K, q, seed=seed, bias_scale=data.draw(st.sampled_from([0, 0, 2])))
    return q, L, x, model


def draw_order(data, L):
    kind = data.draw(st.sampled_from(["sequential", "reversed", "strided", "perm"]), label="order")
    if kind != "perm":
        return kind
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    return torch.randperm(L, generator=g)


def draw_run_options(data, L):
    return dict(batch_size=data.draw(st.sampled_from([1, 2, 7, L, 64]), label="batch_size"),
                chunk_size=data.draw(st.one_of(st.none(), st.integers(1, L + 2)), label="chunk"),
                order=draw_order(data, L))


def draw_radius(data, q, L):
    s = data.draw(st.integers(0, L // 2 + 2), label="steps")
    form = data.draw(st.sampled_from(["int_or_fraction", "float", "float_up", "float_down"]))
    if form == "int_or_fraction":
        return Fraction(s, q)
    r = s / q
    if form == "float_up":
        r = float(np.nextafter(r, 1))
    elif form == "float_down" and s > 0:
        r = float(np.nextafter(r, 0))
    return r


def check_decision(dec, cert, radius, L, settle_prediction=True):
    cert_certified = cert.radius >= float(radius) if not isinstance(radius, Fraction) else \
        cert.steps >= decisions.required_steps(radius, cert.q)
    assert torch.equal(dec.certified, cert_certified)
    known = dec.prediction >= 0
    if settle_prediction:
        assert bool(known.all())
    assert bool(known[dec.certified].all())       # certified => prediction settled
    assert torch.equal(dec.prediction[known], cert.prediction[known])
    assert bool(((dec.evaluated >= 0) & (dec.evaluated <= L)).all())
    assert dec.num_variants == L


@given(st.data())
def test_certify_at_equals_full_certificate(data):
    q, L, x, model = random_case(data)
    radius = draw_radius(data, q, L)
    opts = draw_run_options(data, L)
    settle = data.draw(st.booleans(), label="settle_prediction")
    backend = data.draw(st.sampled_from(["torch", "cpp"]), label="backend")
    cert = full_certificate(model, x, L, q, 0.0)
    model.calls.clear()
    dec = dk.certify_at(model, x, radius, L=L, q=q, backend=backend, settle_prediction=settle,
                        **opts)
    check_decision(dec, cert, radius, L, settle)
    assert all(n <= opts["batch_size"] for n in model.calls)
    assert sum(model.calls) == int(dec.evaluated.sum())
    # the counts returned are the votes of the first `evaluated` variants in that order
    votes, _ = per_variant(model, x, L, q, 0.0, opts["order"])
    if not bool((dec.evaluated == 0).all()):
        for b in range(x.shape[0]):
            e = int(dec.evaluated[b])
            assert torch.equal(dec.counts[b], votes[b, :e].sum(0))
    else:   # decided before any variant ran (radius out of reach, settle_prediction=False)
        assert dec.counts.shape == (x.shape[0], 0) and not settle
    assert dec.ambiguous is None


@given(st.data())
def test_certify_at_with_margin_equals_full_certificate(data):
    q, L, x, model = random_case(data, max_L=30)
    margin = data.draw(st.sampled_from([0.5, 1.0, 2.5, 7.0]), label="margin")
    radius = draw_radius(data, q, L)
    opts = draw_run_options(data, L)
    settle = data.draw(st.booleans(), label="settle_prediction")
    cert = full_certificate(model, x, L, q, margin)
    dec = dk.certify_at(model, x, radius, L=L, q=q, backend="torch", margin=margin,
                        settle_prediction=settle, **opts)
    check_decision(dec, cert, radius, L, settle)
    votes, amb = per_variant(model, x, L, q, margin, opts["order"])
    for b in range(x.shape[0] if dec.counts.shape[1] else 0):
        e = int(dec.evaluated[b])
        assert torch.equal(dec.counts[b], votes[b, :e].sum(0))
        assert torch.equal(dec.ambiguous[b], amb[b, :e].sum(0))
    # margin: the full certificate's answers from the per-variant votes, independently
    steps = decisions.required_steps(radius, q)
    p, r = certified_steps(votes.sum(1), amb.sum(1))
    assert torch.equal(r >= steps, dec.certified)
    assert torch.equal(p, cert.prediction)


@given(st.data())
def test_predict_equals_full_prediction(data):
    q, L, x, model = random_case(data)
    margin = data.draw(st.sampled_from([0.0, 0.0, 1.5]), label="margin")
    opts = draw_run_options(data, L)
    backend = data.draw(st.sampled_from(["torch", "cpp"]), label="backend")
    cert = full_certificate(model, x, L, q, margin)
    pred = dk.predict(model, x, L=L, q=q, backend=backend, margin=margin, **opts)
    assert torch.equal(pred.prediction, cert.prediction)
    assert bool((pred.evaluated <= L).all()) and bool((pred.evaluated >= 1).all())
    if margin == 0:
        assert torch.equal(pred.counts.sum(1), pred.evaluated)
    else:
        assert bool((pred.counts.sum(1) <= pred.evaluated).all())


@given(st.data())
def test_chunk_one_stops_at_the_first_settled_prefix(data):
    """chunk_size=1: `evaluated` is the fewest variants (in that order) whose votes settle
    the decision. The lookahead plan never stops earlier than that, and without its
    geometric floor it stops exactly there (it never skips a stopping point)."""
    q, L, x, model = random_case(data, max_L=30)
    margin = data.draw(st.sampled_from([0.0, 0.0, 1.5]), label="margin")
    order = draw_order(data, L)
    radius = draw_radius(data, q, L)
    settle = data.draw(st.booleans(), label="settle_prediction")
    steps = decisions.required_steps(radius, q)
    votes, amb = per_variant(model, x, L, q, margin, order)
    cN, cA = votes.cumsum(1), amb.cumsum(1)     # counts after e = 1..L variants
    B = x.shape[0]
    first_cert, first_pred = [], []
    for b in range(B):
        def settled(e, pred_only):
            N = cN[b, e - 1:e] if e else torch.zeros(1, votes.shape[2], dtype=torch.int64)
            A = (cA[b, e - 1:e] if e else torch.zeros_like(N)) if margin else None
            if pred_only:
                return bool(decisions.prediction_settled(N, L - e))
            yes = decisions.certified_settled(N, L - e, steps, A)
            no = decisions.uncertifiable(N, L - e, steps, A)
            if settle:
                no = no & decisions.prediction_settled(N, L - e)
            return bool(yes | no)
        first_cert.append(next(e for e in range(L + 1) if settled(e, False)))
        first_pred.append(next(e for e in range(L + 1) if settled(e, True)))
    common = dict(L=L, q=q, backend="torch", margin=margin, order=order)
    dec1 = dk.certify_at(model, x, radius, chunk_size=1, settle_prediction=settle, **common)
    assert dec1.evaluated.tolist() == first_cert
    dec = dk.certify_at(model, x, radius, settle_prediction=settle, **common)
    assert all(e >= f for e, f in zip(dec.evaluated.tolist(), first_cert))
    assert torch.equal(dec.certified, dec1.certified)
    pred1 = dk.predict(model, x, chunk_size=1, **common)
    assert pred1.evaluated.tolist() == first_pred
    pred = dk.predict(model, x, **common)
    assert all(e >= f for e, f in zip(pred.evaluated.tolist(), first_pred))
    assert torch.equal(pred.prediction, pred1.prediction)
    floor = early_exit._FLOOR_AFTER_LOOKS
    try:
        early_exit._FLOOR_AFTER_LOOKS = 10 ** 9
        dec = dk.certify_at(model, x, radius, settle_prediction=settle, **common)
        assert dec.evaluated.tolist() == first_cert
        assert dk.predict(model, x, **common).evaluated.tolist() == first_pred
    finally:
        early_exit._FLOOR_AFTER_LOOKS = floor


@pytest.mark.parametrize("c", [0, 2])
@pytest.mark.parametrize("L", [1, 2, 27, 100])
def test_confident_image_stops_after_half_plus_radius(c, L):
    q = 16
    x = torch.randint(0, q + 1, (3, 1, 4, 4)).to(torch.uint8)
    model = Constant(c, K=4)
    for s in range(0, L // 2 + 2):
        dec = dk.certify_at(model, x, Fraction(s, q), L=L, q=q, backend="cpp")
        want_cert = L - (c > 0) >= 2 * s              # the full certificate: N_A = L, rest 0
        assert dec.certified.tolist() == [want_cert] * 3
        assert dec.prediction.tolist() == [c] * 3
        if want_cert:   # N_A = e, m = L - e, rival = [c > 0]: e - (L - e) - [c > 0] >= 2s
            assert dec.evaluated.tolist() == [math.ceil((L + (c > 0) + 2 * s) / 2)] * 3
        if L >= 27 and 4 * s <= L:   # confident, radius not near the maximum
            assert bool((dec.evaluated < L).all())
    pred = dk.predict(model, x, L=L, q=q, backend="cpp")
    assert pred.prediction.tolist() == [c] * 3
    assert pred.evaluated.tolist() == [math.ceil((L + (c > 0)) / 2)] * 3


def test_radius_out_of_reach_stops_before_any_variant():
    model = Constant(1, K=4)
    x = torch.zeros(2, 3)
    calls = []
    dec = dk.certify_at(lambda v: calls.append(v.shape[0]) or model(v), x, 5.0, L=10, q=4,
                        settle_prediction=False)
    assert calls == [] and dec.evaluated.tolist() == [0, 0]
    assert dec.certified.tolist() == [False, False] and dec.prediction.tolist() == [-1, -1]
    assert dec.steps_required == 20
    assert dec.counts.shape == (2, 0)          # the model never ran: K unknown
    dec = dk.certify_at(model, x, 5.0, L=10, q=4, settle_prediction=False, num_classes=4)
    assert dec.counts.tolist() == [[0] * 4] * 2
    huge = dk.certify_at(model, x, 1e300, L=10, q=4, settle_prediction=False)
    assert huge.certified.tolist() == [False, False] and huge.evaluated.tolist() == [0, 0]
    dec = dk.certify_at(model, x, 5.0, L=10, q=4)          # goes on to settle the prediction
    assert dec.prediction.tolist() == [1, 1] and dec.certified.tolist() == [False, False]


def test_mixed_batch_drops_settled_images():
    """A confident image and an unsure one in one batch: the confident one stops early,
    the other runs to the end, and both equal the full certificate."""
    q, L = 8, 40

    class Half(torch.nn.Module):
        # image 0 (all zeros): always class 1; image 1: vote by the first pixel's noise
        def forward(self, v):
            flat = v.reshape(v.shape[0], -1)
            out = torch.zeros(v.shape[0], 3)
            unsure = flat.sum(1) > 0
            out[~unsure, 1] = 1
            out[unsure, 0] = (flat[unsure, 0] > 0.5).float()
            out[unsure, 2] = (flat[unsure, 0] <= 0.5).float()
            return out

    x = torch.zeros(2, 6)
    x[1] = 0.5
    model = Half()
    cert = dk.certify(model, x, L=L, q=q)
    for r in (0, 1 / q, 3 / q):
        dec = dk.certify_at(model, x, r, L=L, q=q, batch_size=16)
        check_decision(dec, cert, r, L)
        assert int(dec.evaluated[0]) < L


def test_triton_backend_in_interpreter():
    from conftest import CPU_BACKENDS
    if "triton" not in CPU_BACKENDS:   # expected here unless deliberately left out (conftest)
        pytest.skip("triton is not an expected backend for CPU tensors on this machine")
    q, L = 4, 6
    x = torch.randint(0, q + 1, (2, 3)).to(torch.uint8)
    model = IntegerLinear(3, 3, q, seed=3)
    cert = dk.certify(model, x, L=L, q=q, backend="torch")
    dec = dk.certify_at(model, x, Fraction(1, q), L=L, q=q, backend="triton", batch_size=5,
                        order="strided")
    check_decision(dec, cert, Fraction(1, q), L)
    pred = dk.predict(model, x, L=L, q=q, backend="triton", margin=1.5)
    assert torch.equal(pred.prediction, full_certificate(model, x, L, q, 1.5).prediction)


class InfiniteTies(torch.nn.Module):
    """Coarse logits in ``dtype`` with many exact ties, +inf where a score is positive and
    -inf where it is very negative (rows of equal infinities included)."""

    def __init__(self, q, dtype):
        super().__init__()
        self.q, self.dtype = q, dtype
        self.w = torch.tensor([[1, -1, 0, 2], [-1, 1, 1, -2], [0, 1, -1, 1]], dtype=torch.float64)

    def forward(self, v):
        m = torch.round(v.reshape(v.shape[0], -1).double() * (4 * self.q))
        z = torch.floor((m @ self.w) / (2 * self.q))
        z = torch.where(z > 1, math.inf, torch.where(z < -1, -math.inf, z))
        return z.to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_infinite_and_tied_logits_every_entry_point_agrees(dtype):
    """Logits with exact ties and +-inf, in half precision too: certify equals the
    reference's for every expected backend and forward batch, and certify_at / predict
    give its answers (margin 0 and 1)."""
    q, L = 5, 9
    x = torch.tensor([[0, 5, 2], [3, 3, 3], [5, 0, 1], [1, 4, 5]], dtype=torch.uint8)
    model = InfiniteTies(q, dtype)
    for margin in (0.0, 1.0):
        want = ref.certify(model, x, L=L, q=q, margin=margin)
        for backend in CPU_BACKENDS:
            # the Triton interpreter is slow: one forward batch, one look
            for batch_size in (64,) if backend == "triton" else (4, 64):
                cert = dk.certify(model, x, L=L, q=q, margin=margin, backend=backend,
                                  batch_size=batch_size)
                for field in ("counts", "ambiguous", "num_ambiguous", "prediction", "steps"):
                    assert torch.equal(getattr(cert, field), getattr(want, field)), field
            if backend == "triton":
                continue
            pred = dk.predict(model, x, L=L, q=q, margin=margin, backend=backend, batch_size=5)
            assert torch.equal(pred.prediction, want.prediction)
            for steps in range(4):
                dec = dk.certify_at(model, x, Fraction(steps, q), L=L, q=q, margin=margin,
                                    backend=backend, batch_size=5, order="strided")
                check_decision(dec, cert, Fraction(steps, q), L)
    assert (want.num_ambiguous > 0).any() and (want.steps >= 0).any()   # not vacuous


def test_dssn_methods():
    q, L = 8, 24
    x = torch.randint(0, q + 1, (4, 1, 2, 3)).to(torch.uint8)
    model = IntegerLinear(6, 3, q, seed=5, bias_scale=1)
    smooth = dk.DSSN(model, 3, L=L, q=q)
    cert = smooth.certify(x)
    p = smooth.predict(x)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.int64 and p.shape == (4,)
    assert torch.equal(p, cert.prediction)
    dec = smooth.certify_at(x, Fraction(2, q))
    assert isinstance(dec, dk.Decision)
    check_decision(dec, cert, Fraction(2, q), L)
    tau = dk.DSSN(model, 3, L=L, q=q, margin=1.5)
    assert tau.margin == 1.5
    cert_tau = tau.certify(x)
    assert torch.equal(tau.predict(x), cert_tau.prediction)
    check_decision(tau.certify_at(x, 0), cert_tau, 0, L)
    with pytest.raises(ValueError):
        dk.DSSN(model, 3, L=L, q=q, margin=-1)


def test_nan_logits_raise():
    def model(v):
        return torch.full((v.shape[0], 2), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        dk.certify_at(model, torch.zeros(2, 3), 0, L=5, q=4)
    with pytest.raises(ValueError, match="NaN"):
        dk.predict(model, torch.zeros(2, 3), L=5, q=4)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(radius=-0.1), ValueError), (dict(radius=float("nan")), ValueError),
    (dict(radius="0.1"), TypeError), (dict(radius=True), TypeError),
    (dict(radius=None), TypeError),
    (dict(order="backwards"), ValueError), (dict(order=[0, 1, 2]), ValueError),
    (dict(order=[0, 0, 1, 2, 3, 4, 5, 6]), ValueError), (dict(order=[0.0] * 8), TypeError),
    (dict(order=torch.arange(8.0)), TypeError),
    (dict(chunk_size=0), ValueError), (dict(chunk_size=1.5), TypeError),
    (dict(chunk_size=True), TypeError), (dict(settle_prediction="yes"), TypeError),
    (dict(margin=-1.0), ValueError), (dict(margin=float("nan")), ValueError),
    (dict(margin="1"), TypeError), (dict(batch_size=0), ValueError),
    (dict(q=0), ValueError), (dict(L=0), ValueError), (dict(num_classes=1), ValueError),
    (dict(x=torch.full((2, 3), 2.0)), ValueError), (dict(x=[[0.0]]), TypeError),
])
def test_bad_input_raises_before_any_work(kwargs, exc):
    calls = []

    def model(v):
        calls.append(v.shape[0])
        return torch.zeros(v.shape[0], 3)
    args = dict(x=torch.zeros(2, 3), radius=0.25, L=8, q=4)
    args.update(kwargs)
    x, radius = args.pop("x"), args.pop("radius")
    with pytest.raises(exc):
        dk.certify_at(model, x, radius, **args)
    if "radius" not in kwargs and "settle_prediction" not in kwargs:
        with pytest.raises(exc):
            dk.predict(model, x, **args)
    assert calls == []


def test_variant_order_is_a_permutation():
    for L in (1, 2, 5, 9, 10, 441):
        for name in ("sequential", "reversed", "strided"):
            perm = variant_order(name, L)
            assert sorted(perm.tolist()) == list(range(L))
    assert variant_order("strided", 10).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
