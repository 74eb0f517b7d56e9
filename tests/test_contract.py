"""The public API contract that other tools call exactly (the founders' design card):

    dk.num_variants(sigma=None, *, lam=None, q=255) -> int
    dk.split_offsets(dim, num_variants, seed=0) -> LongTensor[dim]
    dk.variants(x, *, sigma=None, lam=None, q=255, seed=0, start=0, stop=None,
                backend="auto") -> float32 [B, stop-start, *x.shape[1:]]
    dk.certify(model, x, *, sigma=None, lam=None, q=255, seed=0, batch_size=None,
               backend="auto") -> Certificate(prediction, radius, steps, counts)
    dk.certificate_from_counts(counts, q) -> (prediction, radius)
    dk.DSSN(base_classifier, num_classes, sigma, q=255, seed=0)   # .predict(x), .certify(x)
    dk.training_noise(x, *, sigma=None, lam=None, q=255, seed=0, generator=None)

and dssn_reference's num_variants, split_offsets, variants, certify with the same
signatures. Names, order, keyword-only markers and defaults are pinned by inspection
(extra parameters are allowed only where no contract caller can notice them: optional,
after the contract's positional ones), and the return types, dtypes, shapes and field
names by calling each on a tiny input.
"""
import inspect

import pytest
import torch

import dssn_kernels as dk
import dssn_reference as ref
from testkit import IntegerLinear

REQUIRED = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY

# name -> [(parameter, kind, default)], in the contract's order
CONTRACT = {
    "num_variants": [("sigma", POS, None), ("lam", KW, None), ("q", KW, 255)],
    "split_offsets": [("dim", POS, REQUIRED), ("num_variants", POS, REQUIRED),
                      ("seed", POS, 0)],
    "variants": [("x", POS, REQUIRED), ("sigma", KW, None), ("lam", KW, None), ("q", KW, 255),
                 ("seed", KW, 0), ("start", KW, 0), ("stop", KW, None),
                 ("backend", KW, "auto")],
    "certify": [("model", POS, REQUIRED), ("x", POS, REQUIRED), ("sigma", KW, None),
                ("lam", KW, None), ("q", KW, 255), ("seed", KW, 0), ("batch_size", KW, None),
                ("backend", KW, "auto")],
    "certificate_from_counts": [("counts", POS, REQUIRED), ("q", POS, REQUIRED)],
    "training_noise": [("x", POS, REQUIRED), ("sigma", KW, None), ("lam", KW, None),
                       ("q", KW, 255), ("seed", KW, 0), ("generator", KW, None)],
}
DSSN_INIT = [("base_classifier", POS, REQUIRED), ("num_classes", POS, REQUIRED),
             ("sigma", POS, REQUIRED), ("q", POS, 255), ("seed", POS, 0)]
DSSN_METHODS = {"predict": [("x", POS, REQUIRED)], "certify": [("x", POS, REQUIRED)]}
REFERENCE = ("num_variants", "split_offsets", "variants", "certify")
# Where the package accepts more than the contract asks: DSSN's sigma may be left out
# for lam= or L= (keyword-only); passing it, positionally or by name, is the contract.
LOOSER_DEFAULTS = {("DSSN", "sigma"): None}


def check_signature(owner, func, contract, skip_self=False):
    params = list(inspect.signature(func).parameters.values())
    if skip_self:
        assert params and params[0].name == "self"
        params = params[1:]
    by_name = {p.name: p for p in params}
    problems = []
    for name, kind, default in contract:
        p = by_name.get(name)
        if p is None:
            problems.append(f"{name}: missing")
            continue
        if p.kind is not kind:
            problems.append(f"{name}: {p.kind.description}, the contract says {kind.description}")
        allowed = [default] + ([LOOSER_DEFAULTS[owner, name]]
                               if (owner, name) in LOOSER_DEFAULTS else [])
        if not any(p.default is d or (type(p.default) is type(d) and p.default == d)
                   for d in allowed):
            problems.append(f"{name}: default {p.default!r}, the contract says {default!r}")
    # the contract's positional parameters come first, in its order
    positional = [n for n, k, _ in contract if k is POS]
    got = [p.name for p in params if p.kind is POS][:len(positional)]
    if got != positional:
        problems.append(f"positional order {got}, the contract says {positional}")
    # anything more must be invisible to a contract call: optional, never a new required
    # argument, never a positional slot before the contract's
    names = {n for n, _, _ in contract}
    for p in params:
        if p.name in names or p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.default is REQUIRED or p.kind is inspect.Parameter.VAR_POSITIONAL:
            problems.append(f"{p.name}: an extra parameter the contract's callers do not pass")
    assert not problems, f"{owner}{inspect.signature(func)}: " + "; ".join(problems)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_package_signatures(name):
    assert name in dk.__all__
    check_signature(name, getattr(dk, name), CONTRACT[name])


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_signatures(name):
    check_signature(name, getattr(ref, name), CONTRACT[name])


def test_dssn_class_signatures():
    assert "DSSN" in dk.__all__
    check_signature("DSSN", dk.DSSN.__init__, DSSN_INIT, skip_self=True)
    for method, contract in DSSN_METHODS.items():
        check_signature("DSSN", getattr(dk.DSSN, method), contract, skip_self=True)


Q, LAM, K = 4, 1.0, 3          # L = int(2 * 1.0 * 4) = 8 variants: cheap for the reference
L = 8


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, Q + 1, (2, 1, 2, 3), generator=g)
    return levels.float() / Q, levels.to(torch.uint8)


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
def test_num_variants_and_offsets_return_types(impl):
    n = impl.num_variants(lam=LAM, q=Q)
    assert type(n) is int and n == L
    assert type(impl.num_variants(0.5)) is int
    v = impl.split_offsets(6, L)
    assert isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.shape == (6,)
    assert torch.equal(impl.split_offsets(6, L, 0), v)


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
def test_variants_return_type(impl):
    x, x8 = tiny_batch()
    out = impl.variants(x, lam=LAM, q=Q, start=2, stop=5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 2, 3)
    assert torch.equal(impl.variants(x8, lam=LAM, q=Q, start=2, stop=5), out)   # uint8 input
    full = impl.variants(x, lam=LAM, q=Q, seed=0, backend="auto")                # stop=None: L
    assert full.shape == (2, L, 1, 2, 3) and torch.equal(full[:, 2:5], out)
    assert torch.equal(full, dk.variants(x, lam=LAM, q=Q))                      # the same bits


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
def test_certify_return_type(impl):
    x, x8 = tiny_batch()
    model = IntegerLinear(6, K, Q, seed=1)
    cert = impl.certify(model, x, lam=LAM, q=Q, seed=0, batch_size=5, backend="auto")
    for field, dtype, shape in [("prediction", torch.int64, (2,)), ("radius", torch.float64, (2,)),
                                ("steps", torch.int64, (2,)), ("counts", torch.int64, (2, K))]:
        value = getattr(cert, field)
        assert isinstance(value, torch.Tensor), field
        assert value.dtype == dtype and value.shape == shape, (field, value.dtype, value.shape)
    assert torch.equal(cert.radius, cert.steps.double() / Q)
    assert torch.equal(cert.counts.sum(1), torch.full((2,), L))
    again = dk.certify(model, x8, lam=LAM, q=Q)
    for field in ("prediction", "radius", "steps", "counts"):
        assert torch.equal(getattr(again, field), getattr(cert, field)), field


def test_certificate_from_counts_and_dssn_class():
    x, _ = tiny_batch()
    model = IntegerLinear(6, K, Q, seed=1)
    sigma = 0.3                                     # L = int(2 * 0.3 * 3**0.5 * 4) = 4
    cert = dk.certify(model, x, sigma=sigma, q=Q)
    out = dk.certificate_from_counts(cert.counts, Q)
    assert isinstance(out, tuple) and len(out) == 2
    prediction, radius = out
    assert prediction.dtype == torch.int64 and radius.dtype == torch.float64
    assert torch.equal(prediction, cert.prediction) and torch.equal(radius, cert.radius)

    smooth = dk.DSSN(model, K, sigma, Q, 0)          # the contract's positional order
    assert torch.equal(smooth.predict(x), cert.prediction)
    assert smooth.predict(x).dtype == torch.int64
    c2 = dk.DSSN(base_classifier=model, num_classes=K, sigma=sigma, q=Q, seed=0).certify(x)
    assert isinstance(c2, dk.Certificate)
    assert torch.equal(c2.counts, cert.counts) and torch.equal(c2.radius, cert.radius)


def test_training_noise_return_type():
    x, x8 = tiny_batch()
    g = torch.Generator().manual_seed(3)
    noisy = dk.training_noise(x, lam=LAM, q=Q, seed=0, generator=g)
    assert noisy.dtype == torch.float32 and noisy.shape == x.shape
    every = dk.variants(x, lam=LAM, q=Q)
    for b in range(x.shape[0]):                      # one of the L certification variants
        assert any(torch.equal(noisy[b], every[b, t]) for t in range(L))
    assert dk.training_noise(x8, sigma=0.5, q=Q).shape == x.shape
