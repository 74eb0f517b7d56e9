"""Bad inputs fail loudly, before any work, with a message naming the problem.

Every entry point that takes images (dk.certify, dk.variants, dk.training_noise,
dk.DSSN.certify/predict) validates the smoothing spec, the images, the backend and the
batch size before the model is called: the models here record their calls, and a bad
argument must leave that record empty. Wrong Python types raise TypeError, bad values
ValueError, a backend that exists but cannot run here dk.BackendUnavailableError.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_kernels as dk
from conftest import CPU_BACKENDS
from dssn_kernels.inputs import to_levels

K = 3
SHAPE = (2, 3)          # per-image shape used by most tests (d = 6)


class Recorder:
    """A deterministic base classifier [N, *SHAPE] -> [N, K] that records its calls;
    ``post`` rewrites its logits (to build broken models)."""

    def __init__(self, num_classes=K, post=None):
        self.calls = []
        self.num_classes = num_classes
        self.post = post

    def __call__(self, z):
        self.calls.append(tuple(z.shape))
        flat = z.reshape(z.shape[0], -1).double()
        w = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64)
        score = (flat * w).sum(1, keepdim=True)                     # [N, 1]
        logits = torch.cos(score * torch.arange(1, self.num_classes + 1, dtype=torch.float64))
        logits = logits.float()
        return self.post(logits) if self.post is not None else logits


def good_x(B=2, q=255):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, q + 1, (B, *SHAPE), generator=g).double() / q


SPEC = dict(L=5)


# --- one runner per entry point: run(model, x, **kw) ---------------------------------

def run_certify(model, x, **kw):
    kw = {**SPEC, **kw}
    return dk.certify(model, x, **kw)


def run_variants(model, x, **kw):
    kw = {**SPEC, **kw}
    kw.pop("batch_size", None)
    return dk.variants(x, **kw)


def run_training_noise(model, x, **kw):
    kw = {**SPEC, **kw}
    kw.pop("batch_size", None)
    kw.pop("backend", None)
    return dk.training_noise(x, **kw)


def run_dssn_certify(model, x, **kw):
    kw = {**SPEC, **kw}
    sigma = kw.pop("sigma", None)
    return dk.DSSN(model, K, sigma, **kw).certify(x)


def run_dssn_predict(model, x, **kw):
    kw = {**SPEC, **kw}
    sigma = kw.pop("sigma", None)
    return dk.DSSN(model, K, sigma, **kw).predict(x)


ALL = [run_certify, run_variants, run_training_noise, run_dssn_certify, run_dssn_predict]
WITH_MODEL = [run_certify, run_dssn_certify, run_dssn_predict]
WITH_BACKEND = [run_certify, run_variants, run_dssn_certify]
ids = lambda f: f.__name__[4:]  # noqa: E731


def check_raises(runner, exc, match, x=None, **kw):
    model = Recorder()
    with pytest.raises(exc, match=match):
        runner(model, good_x() if x is None else x, **kw)
    assert model.calls == [], "the model ran before the bad input was rejected"


# --- the images -----------------------------------------------------------------------

BAD_X = {
    "off-grid half step": (torch.full((2, *SHAPE), 127.5 / 255), {}, ValueError, r"off the k/q grid"),
    "off-grid by 0.01 step": (torch.full((1, *SHAPE), 3.01 / 255, dtype=torch.float64), {},
                              ValueError, r"off the k/q grid"),
    "grid of another q": (torch.full((1, *SHAPE), 1 / 255), dict(q=16), ValueError, r"off the k/q grid"),
    "above 1": (torch.full((1, *SHAPE), 256 / 255, dtype=torch.float64), {}, ValueError, r"\[0, 1\]"),
    "below 0": (torch.full((1, *SHAPE), -1 / 255), {}, ValueError, r"\[0, 1\]"),
    "NaN": (torch.tensor([[0.0, math.nan, 1.0]]), {}, ValueError, r"NaN"),
    "+inf": (torch.tensor([[0.0, math.inf, 1.0]]), {}, ValueError, r"infinite"),
    "-inf": (torch.tensor([[0.0, -math.inf]], dtype=torch.float64), {}, ValueError, r"infinite"),
    "uint8 above q": (torch.tensor([[0, 16, 17]], dtype=torch.uint8), dict(q=16), ValueError,
                      r"0\.\.q=16.*outside"),
    "int64 negative": (torch.tensor([[0, -1, 3]]), {}, ValueError, r"outside"),
    "uint8 with q > 255": (torch.tensor([[0, 1, 2]], dtype=torch.uint8), dict(q=256), ValueError,
                           r"q must be <= 255"),
    "1-D x": (torch.zeros(6), {}, ValueError, r"shape \[B, \.\.\.\]"),
    "0-D x": (torch.tensor(0.0), {}, ValueError, r"shape \[B, \.\.\.\]"),
    "empty batch": (torch.zeros(0, 6), {}, ValueError, r"at least one image"),
    "no pixels": (torch.zeros(2, 0), {}, ValueError, r"at least one pixel"),
    "list": ([[0.0, 1.0]], {}, TypeError, r"torch\.Tensor"),
    "numpy array": (np.zeros((2, 6), dtype=np.float32), {}, TypeError, r"torch\.Tensor"),
    "bool": (torch.zeros(2, 6, dtype=torch.bool), {}, TypeError, r"dtype"),
    "complex": (torch.zeros(2, 6, dtype=torch.complex64), {}, TypeError, r"dtype"),
}


@pytest.mark.parametrize("runner", ALL, ids=ids)
@pytest.mark.parametrize("case", list(BAD_X))
def test_bad_images(runner, case):
    x, kw, exc, match = BAD_X[case]
    check_raises(runner, exc, match, x=x, **kw)


def test_error_counts_the_bad_pixels():
    x = torch.full((2, *SHAPE), 3 / 255)
    x[0, 0, 1] = 3.5 / 255
    x[1, 1, 2] = 0.2 / 255
    with pytest.raises(ValueError, match=r"^2 float pixel\(s\) are off the k/q grid for q=255"):
        dk.variants(x, L=3)
    x = torch.zeros(1, 4)
    x[0, 1] = math.nan
    x[0, 2] = math.inf
    x[0, 3] = -math.inf
    with pytest.raises(ValueError, match=r"1 NaN and 2 infinite"):
        dk.variants(x, L=3)


# --- the smoothing spec ---------------------------------------------------------------

BAD_SPEC = {
    "sigma gives L < 1": (dict(L=None, sigma=1e-4, q=255), ValueError, r"L = int\(2\*lambda\*q\) = 0"),
    "lam gives L < 1": (dict(L=None, lam=0.001, q=255), ValueError, r"L = int\(2\*lambda\*q\) = 0"),
    "sigma and lam": (dict(L=None, sigma=0.5, lam=0.5), ValueError, r"exactly one of sigma"),
    "sigma and L": (dict(sigma=0.5), ValueError, r"exactly one of sigma"),
    "none of them": (dict(L=None), ValueError, r"exactly one of sigma"),
    "L = 0": (dict(L=0), ValueError, r"L must be >= 1"),
    "L < 0": (dict(L=-3), ValueError, r"L must be >= 1"),
    "L float": (dict(L=5.0), TypeError, r"L must be an int"),
    "sigma negative": (dict(L=None, sigma=-0.5), ValueError, r"sigma must be a positive finite"),
    "sigma NaN": (dict(L=None, sigma=math.nan), ValueError, r"sigma must be a positive finite"),
    "sigma inf": (dict(L=None, sigma=math.inf), ValueError, r"sigma must be a positive finite"),
    "lam zero": (dict(L=None, lam=0.0), ValueError, r"lam must be a positive finite"),
    "sigma overflows L": (dict(L=None, sigma=1e308), ValueError, r"= inf variants.*exceeds"),
    "lam overflows L": (dict(L=None, lam=1e307), ValueError, r"= inf variants.*exceeds"),
    "sigma str": (dict(L=None, sigma="0.5"), TypeError, r"sigma must be a number"),
    "q = 0": (dict(q=0), ValueError, r"q must be >= 1"),
    "q float": (dict(q=255.0), TypeError, r"q must be an int"),
    "q bool": (dict(q=True), TypeError, r"q must be an int"),
    "seed negative": (dict(seed=-1), ValueError, r"seed"),
    "seed None": (dict(seed=None), TypeError, r"seed"),
    "seed float": (dict(seed=1.5), TypeError, r"seed"),
}


@pytest.mark.parametrize("runner", ALL, ids=ids)
@pytest.mark.parametrize("case", list(BAD_SPEC))
def test_bad_spec(runner, case):
    kw, exc, match = BAD_SPEC[case]
    check_raises(runner, exc, match, **kw)


@pytest.mark.parametrize("case", [c for c in BAD_SPEC if not c.startswith("seed")])
def test_dssn_rejects_bad_spec_at_construction(case):
    kw, exc, match = BAD_SPEC[case]
    kw = {**SPEC, **kw}
    sigma = kw.pop("sigma", None)
    with pytest.raises(exc, match=match):
        dk.DSSN(Recorder(), K, sigma, **kw)


def test_num_variants_bad_spec():
    with pytest.raises(ValueError, match=r"= 0 variants at q=255"):
        dk.num_variants(sigma=1e-4, q=255)
    with pytest.raises(ValueError, match=r"exactly one of sigma and lam"):
        dk.num_variants(0.5, lam=0.5)
    with pytest.raises(ValueError, match=r"exactly one of sigma and lam"):
        dk.num_variants()


def test_split_offsets_bad_arguments():
    with pytest.raises(ValueError, match=r"dim must be a positive int"):
        dk.split_offsets(0, 5)
    with pytest.raises(ValueError, match=r"num_variants must be a positive int"):
        dk.split_offsets(4, 0)
    with pytest.raises(TypeError, match=r"dim must be a positive int"):
        dk.split_offsets(4.0, 5)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        dk.split_offsets(4, 5, seed=None)    # numpy would seed from the OS: not reproducible
    with pytest.raises(ValueError, match=r"seed must be an int in 0\.\.2\*\*32-1"):
        dk.split_offsets(4, 5, seed=2 ** 32)
    assert torch.equal(dk.split_offsets(4, 5, seed=np.uint32(7)), dk.split_offsets(4, 5, seed=7))


# --- start / stop ---------------------------------------------------------------------

@pytest.mark.parametrize("start,stop", [(-1, 3), (0, 6), (4, 3), (5, 6), (6, 6), (0, -1)])
def test_variants_bad_range(start, stop):
    with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= L = 5, got start="):
        dk.variants(good_x(), L=5, start=start, stop=stop)


@pytest.mark.parametrize("start,stop", [(1.0, 3), (0, 3.0), (True, 3), ("0", 3)])
def test_variants_bad_range_type(start, stop):
    with pytest.raises(TypeError, match=r"(start|stop) must be an int"):
        dk.variants(good_x(), L=5, start=start, stop=stop)


def test_variants_edge_ranges_are_fine():
    x = good_x()
    assert dk.variants(x, L=5, start=2, stop=2).shape == (2, 0, *SHAPE)
    assert dk.variants(x, L=5, start=5).shape == (2, 0, *SHAPE)
    assert dk.variants(x, L=5, start=0, stop=5).shape == (2, 5, *SHAPE)


# --- backend and batch size -----------------------------------------------------------

@pytest.mark.parametrize("runner", WITH_BACKEND, ids=ids)
@pytest.mark.parametrize("backend", ["nope", "CPP", "", None, 3])
def test_unknown_backend(runner, backend):
    check_raises(runner, ValueError, r"unknown backend", backend=backend)


@pytest.mark.parametrize("runner", WITH_BACKEND, ids=ids)
def test_cuda_backend_unavailable_on_cpu(runner):
    check_raises(runner, dk.BackendUnavailableError, r"backend 'cuda' runs on CUDA tensors",
                 backend="cuda")


@pytest.mark.parametrize("runner", WITH_BACKEND, ids=ids)
def test_triton_backend_unavailable(runner, monkeypatch):
    """Without the interpreter (or a sm_80+ GPU) naming triton is a clear error."""
    import dssn_kernels.backends as backends
    monkeypatch.setattr(backends, "_triton_status",
                        lambda device: (False, "no CUDA device is available"))
    check_raises(runner, dk.BackendUnavailableError,
                 r"backend 'triton' is not available on cpu: no CUDA device", backend="triton")


BAD_BATCH_SIZES = [  # (value, exception, message)
    (0, ValueError, r"batch_size must be a positive int, got 0$"),
    (-1, ValueError, r"batch_size must be a positive int, got -1$"),
    (np.int64(0), ValueError, r"batch_size must be a positive int, got .*0\)?$"),
    (2.0, TypeError, r"batch_size must be a positive int, got float$"),
    (2.5, TypeError, r"batch_size must be a positive int, got float$"),
    (True, TypeError, r"batch_size must be a positive int, got bool$"),
    ("8", TypeError, r"batch_size must be a positive int, got str$"),
    (torch.tensor(8), TypeError, r"batch_size must be a positive int, got Tensor$"),
]
bad_batch = pytest.mark.parametrize("batch_size,exc,match", BAD_BATCH_SIZES,
                                    ids=[repr(v) for v, _, _ in BAD_BATCH_SIZES])


@pytest.mark.parametrize("runner", WITH_MODEL, ids=ids)
@bad_batch
def test_bad_batch_size(runner, batch_size, exc, match):
    """A wrong type is a TypeError naming it (bool too, as for q, seed, start and stop),
    a value below 1 a ValueError."""
    check_raises(runner, exc, match, batch_size=batch_size)


@pytest.mark.parametrize("entry", ["certify_at", "predict", "logit_drift", "certify_uniform"])
@bad_batch
def test_bad_batch_size_other_entries(entry, batch_size, exc, match):
    """The same refusal from the early-exit entries, logit_drift (in either setting) and
    the Monte Carlo baselines (one check, checks.check_batch_size)."""
    from dssn_kernels.workflow.baselines import certify_uniform
    run = {"certify_at": lambda m, bs: dk.certify_at(m, good_x(), 0.0, L=5, batch_size=bs),
           "predict": lambda m, bs: dk.predict(m, good_x(), L=5, batch_size=bs),
           "logit_drift": lambda m, bs: dk.logit_drift(m, good_x(), L=5,
                                                       other=dict(batch_size=bs)),
           "certify_uniform": lambda m, bs: certify_uniform(m, good_x(), sigma=0.5, n0=4,
                                                            n=8, batch_size=bs)}[entry]
    model = Recorder()
    with pytest.raises(exc, match=match):
        run(model, batch_size)
    assert model.calls == []
    if entry == "logit_drift":      # the reference setting too
        with pytest.raises(exc, match=match):
            dk.logit_drift(model, good_x(), L=5, reference=dict(batch_size=batch_size),
                           other={})
        assert model.calls == []


@pytest.mark.parametrize("batch_size", [1, 4, np.int64(4), np.int32(7)])
def test_integer_batch_sizes_are_accepted(batch_size):
    """numpy integers are batch sizes (as they are q and seeds), read as int: the counts
    are those of the same int."""
    a = dk.certify(Recorder(), good_x(), L=5, batch_size=batch_size)
    b = dk.certify(Recorder(), good_x(), L=5, batch_size=int(batch_size))
    assert torch.equal(a.counts, b.counts)
    smooth = dk.DSSN(Recorder(), K, L=5, batch_size=batch_size)
    assert type(smooth.batch_size) is int and smooth.batch_size == int(batch_size)


# --- what the model returns -----------------------------------------------------------

BAD_OUTPUT = {
    "1-D": (lambda l: l[:, 0], r"shape \[N, K\] = \[\d+, K\].*got shape \(\d+,\)"),
    "one row short": (lambda l: l[:-1], r"shape \[N, K\] = \[\d+, K\]"),
    "one row too many": (lambda l: torch.cat([l, l[:1]]), r"shape \[N, K\] = \[\d+, K\]"),
    "3-D": (lambda l: l[:, None, :], r"shape \[N, K\]"),
    "K = 1": (lambda l: l[:, :1], r"at least 2 class logits, got K=1"),
    "K = 0": (lambda l: l[:, :0], r"at least 2 class logits, got K=0"),
    "integer logits": (lambda l: (l * 100).long(), r"floating-point logits"),
    "bool logits": (lambda l: l > 0, r"floating-point logits"),
    "list": (lambda l: l.tolist(), r"logits tensor \[N, K\], got list"),
    "numpy": (lambda l: l.numpy(), r"logits tensor \[N, K\], got ndarray"),
    "tuple": (lambda l: (l, l), r"logits tensor \[N, K\], got tuple"),
    "all NaN": (lambda l: torch.full_like(l, math.nan), r"NaN logits"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("runner", WITH_MODEL, ids=ids)
@pytest.mark.parametrize("case", list(BAD_OUTPUT))
def test_bad_model_output(runner, case, backend):
    post, match = BAD_OUTPUT[case]
    model = Recorder(post=post)
    with pytest.raises(ValueError, match=match):
        runner(model, good_x(), batch_size=4, backend=backend)
    assert len(model.calls) == 1, "the bad output must be caught at the first forward"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_nan_logits_in_one_row(where, backend):
    """One NaN logit in one row of one forward batch (not the first) is an error."""
    B, L, bs = 3, 7, 4        # 21 rows in 6 forward batches
    target = {"first": 0, "middle": 10, "last": B * L - 1}[where]
    seen = [0]

    def post(logits):
        n = logits.shape[0]
        lo = seen[0]
        seen[0] += n
        if lo <= target < lo + n:
            logits = logits.clone()
            logits[target - lo, 1] = math.nan
        return logits

    with pytest.raises(ValueError, match=r"NaN logits for 1 (input|variant)"):
        dk.certify(Recorder(post=post), good_x(B), L=L, batch_size=bs, backend=backend)


def test_infinite_logits_are_votes_not_errors():
    def post(logits):
        logits = logits.clone()
        logits[:, 2] = math.inf
        return logits

    cert = dk.certify(Recorder(post=post), good_x(), L=5)
    assert cert.prediction.tolist() == [2, 2] and cert.counts[:, 2].tolist() == [5, 5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dssn_num_classes_disagrees_with_model(backend):
    for wrong in (2, 4, 10):
        smooth = dk.DSSN(Recorder(), wrong, L=5, batch_size=4, backend=backend)
        with pytest.raises(ValueError, match=rf"returned K={K} logits per input, expected {wrong}"):
            smooth.certify(good_x())
        with pytest.raises(ValueError, match=rf"expected {wrong}"):
            smooth.predict(good_x())
    with pytest.raises(ValueError, match=r"expected 4"):
        dk.certify(Recorder(), good_x(), L=5, num_classes=4)
    cert = dk.DSSN(Recorder(), K, L=5, backend=backend).certify(good_x())
    assert cert.counts.shape == (2, K)


def test_training_noise_bad_spec_and_images_need_no_generator():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"off the k/q grid"):
        dk.training_noise(torch.full((2, 3), 0.3), L=4, generator=g)
    with pytest.raises(ValueError, match=r"exactly one of sigma"):
        dk.training_noise(good_x(), generator=g)


# --- accepted inputs ------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uint8_float32_float64_levels_give_identical_variants(backend):
    k = torch.arange(256)
    levels = torch.stack([k, k.flip(0)]).view(2, 16, 16)
    xs = {
        "uint8": levels.to(torch.uint8),
        "int64": levels,
        "float32 k/255": (torch.arange(256) / 255)[levels],        # float32 division
        "float64 k/255": (torch.arange(256, dtype=torch.float64) / 255)[levels],
        "float16 k/255": (torch.arange(256) / 255).half()[levels],
        "float32 noncontiguous": (torch.arange(256) / 255)[levels].transpose(1, 2).contiguous()
                                  .transpose(1, 2),
    }
    expected = dk.variants(xs["uint8"], sigma=0.25, backend=backend)
    assert expected.shape == (2, 220, 16, 16)
    for name, x in xs.items():
        got = dk.variants(x, sigma=0.25, backend=backend)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), name


def test_float16_input_at_q16_is_accepted():
    x = (torch.arange(17, dtype=torch.float16) / 16).view(1, 17)
    assert x.dtype == torch.float16
    levels = torch.arange(17, dtype=torch.uint8).view(1, 17)
    for backend in CPU_BACKENDS:
        got = dk.variants(x, lam=0.5, q=16, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (1, 16, 17)
        assert torch.equal(got, dk.variants(levels, lam=0.5, q=16, backend=backend))
    model = Recorder()
    cert = dk.certify(lambda z: model(z.view(-1, 17)[:, :6].reshape(-1, *SHAPE)), x, L=16, q=16)
    assert cert.counts.sum().item() == 16


def test_int32_levels_with_q_above_255():
    x = torch.tensor([[0, 300, 1000]], dtype=torch.int32)
    as_float = x.double() / 1000
    assert torch.equal(dk.variants(x, L=9, q=1000), dk.variants(as_float, L=9, q=1000))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int8,
                                   torch.int16, torch.int64])
def test_every_integer_dtype_reads_its_levels_or_names_the_range(dtype):
    """Integer levels of any width (16-bit images included; torch's reductions lack the
    wide unsigned types) are read as their levels; levels above q are refused in one line,
    a uint64 level beyond int64 too."""
    q = 100 if dtype == torch.int8 else 1000
    x = torch.tensor([[0, q // 3, q]]).to(dtype)
    assert torch.equal(dk.variants(x, L=9, q=q), dk.variants(x.double() / q, L=9, q=q))
    with pytest.raises(ValueError, match=rf"levels k in 0..q={q - 1}, but 1 pixel\(s\) are "
                                         rf"outside \(min 0, max {q}\)"):
        dk.variants(x, L=9, q=q - 1)
    if dtype == torch.uint64:
        huge = torch.tensor([[1, -5]]).view(torch.uint64)   # [1, 2**64 - 5]
        with pytest.raises(ValueError, match=r"1 pixel\(s\) are outside \(max >= 2\*\*63\)"):
            dk.variants(huge, L=9, q=q)


@given(q=st.integers(1, 4000), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_on_grid_floats_read_as_their_level(q, data, dtype):
    k = torch.tensor(data.draw(st.lists(st.integers(0, q), min_size=1, max_size=8)))
    x = (k.to(dtype) / q).view(1, -1)
    assert torch.equal(to_levels(x, q).long(), k.view(1, -1))


@given(q=st.integers(1, 4000), data=st.data(), frac=st.floats(0.01, 0.99),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_off_grid_floats_are_rejected(q, data, frac, dtype):
    k = data.draw(st.integers(0, q - 1))
    x = torch.full((1, 3), (k + frac) / q, dtype=dtype)
    with pytest.raises(ValueError, match=r"off the k/q grid"):
        to_levels(x, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_every_level_in_each_float_dtype_reads_back(dtype):
    """k/255 in float16/32/64, computed three usual ways, reads as level k."""
    k = torch.arange(256)
    for x in ((k.double() / 255).to(dtype), k.to(dtype) / 255, k.to(dtype) * (1 / 255)):
        assert torch.equal(to_levels(x.view(1, -1), 255).long(), k.view(1, -1))


@pytest.mark.parametrize("dtype, q", [(torch.bfloat16, 511), (torch.bfloat16, 1023),
                                      (torch.float16, 4095), (torch.float8_e4m3fn, 255)])
def test_levels_a_coarse_dtype_cannot_hold_are_refused_not_misread(dtype, q):
    """Where the dtype spaces its values more than a step 1/q apart, two levels round to
    the same pixel value: such a pixel, even one within the grid tolerance of some level,
    is refused rather than read (once silently) as a neighbouring level. Every pixel of
    k/q rounded to the dtype is either refused or read as k, and some are refused."""
    k = torch.arange(q + 1)
    refused = 0
    for level, x in zip(k.tolist(), (k.double() / q).to(dtype)):
        try:
            got = to_levels(x.view(1, 1), q).item()
        except ValueError as exc:
            assert "cannot hold their level" in str(exc) or "off the k/q grid" in str(exc)
            refused += "cannot hold their level" in str(exc)
            continue
        assert got == level
    assert refused > 0
    # below 1/2 the values are finer: 0 (exact) and the smallest levels still read
    low = torch.tensor([0, 1, 2, 3])
    if dtype != torch.float8_e4m3fn:
        assert torch.equal(to_levels((low.double() / q).to(dtype).view(1, -1), q).long(),
                           low.view(1, -1))
    assert to_levels(torch.zeros(1, 1, dtype=dtype), q).item() == 0
    with pytest.raises(ValueError, match=r"cannot hold their level.*integer levels"):
        dk.variants((k.double() / q).to(dtype).view(1, -1)[:, -4:], L=3, q=q)


@pytest.mark.parametrize("dtype, q", [(torch.float16, 2047), (torch.bfloat16, 255)])
def test_coarse_dtype_where_it_holds_every_level_is_still_read(dtype, q):
    """Up to one step between the dtype's values (1 included, whose levels lie below it)
    every correctly rounded k/q is read as k or refused only as off the grid."""
    k = torch.arange(q + 1)
    for level, x in zip(k.tolist(), (k.double() / q).to(dtype)):
        try:
            assert to_levels(x.view(1, 1), q).item() == level
        except ValueError as exc:
            assert "off the k/q grid" in str(exc)
    assert to_levels(torch.ones(1, 1, dtype=dtype), q).item() == q


@pytest.mark.parametrize("level", [1.2, 3.3, 10.2, 40.25, 60.7])
def test_float16_off_grid_is_rejected_where_float16_can_tell(level):
    """The tolerance follows the dtype's spacing at the pixel's value, not at 1: a float16
    pixel 0.2 steps off the grid at a small value (where float16 is fine enough to tell)
    is rejected, with a hint."""
    x = torch.tensor([[level / 255]], dtype=torch.float64).to(torch.float16)
    with pytest.raises(ValueError, match=r"off the k/q grid.*float16 cannot hold"):
        to_levels(x, 255)


# --- num_classes ----------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,exc", [(1, ValueError), (0, ValueError),
                                             (-2, ValueError), (3.0, TypeError),
                                             (True, TypeError), ("3", TypeError)])
def test_bad_num_classes(num_classes, exc):
    """Refused before the model runs (by certify too, which once compared it with the
    model's K only after a forward), and by DSSN at construction: a wrong type is a
    TypeError, an int below 2 a ValueError."""
    check_raises(run_certify, exc, r"num_classes must be None or an int >= 2",
                 num_classes=num_classes)
    for entry in (dk.predict, lambda m, x, **kw: dk.certify_at(m, x, 0.0, **kw)):
        model = Recorder()
        with pytest.raises(exc, match=r"num_classes must be None or an int >= 2"):
            entry(model, good_x(), L=5, num_classes=num_classes)
        assert model.calls == []
    with pytest.raises(exc, match=r"num_classes must be an int >= 2"):
        dk.DSSN(Recorder(), num_classes, L=5)


def test_dssn_needs_num_classes():
    with pytest.raises(TypeError, match=r"num_classes must be an int >= 2, got None"):
        dk.DSSN(Recorder(), None, L=5)


# --- each argument checked once -------------------------------------------------------

def check_calls(run):
    """{check name: calls} of the public check_* functions of dssn_kernels.checks during
    run() (their private helpers serve several checks)."""
    import sys
    from collections import Counter

    from dssn_kernels import checks
    calls = Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == checks.__file__ \
                and frame.f_code.co_name.startswith("check_"):
            calls[frame.f_code.co_name] += 1
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


SPEC_CHECKS = {"check_q", "check_seed", "check_margin", "check_batch_size",
               "check_backend_name", "check_num_classes"}


@pytest.mark.parametrize("entry", ["certify", "certify_at", "predict", "variants",
                                   "training_noise"])
def test_each_argument_is_checked_once(entry):
    x = good_x()
    run = {"certify": lambda: dk.certify(Recorder(), x, L=5),
           "certify_at": lambda: dk.certify_at(Recorder(), x, 0.0, L=5),
           "predict": lambda: dk.predict(Recorder(), x, L=5),
           "variants": lambda: dk.variants(x, L=5),
           "training_noise": lambda: dk.training_noise(x, L=5)}[entry]
    calls = check_calls(run)
    assert calls and max(calls.values()) == 1, calls


def test_dssn_checks_its_spec_once_at_construction():
    calls = check_calls(lambda: dk.DSSN(Recorder(), K, L=5, batch_size=4))
    assert SPEC_CHECKS <= set(calls) and max(calls.values()) == 1, calls
    smooth = dk.DSSN(Recorder(), K, L=5, batch_size=4)
    assert smooth.batch_size == 4 and dk.DSSN(Recorder(), K, L=5).batch_size == 256
    for run in (lambda: smooth.certify(good_x()), lambda: smooth.predict(good_x()),
                lambda: smooth.certify_at(good_x(), 0.0, chunk_size=2)):
        calls = check_calls(run)
        assert not SPEC_CHECKS & set(calls) and max(calls.values()) == 1, calls
    with pytest.raises(AttributeError):
        smooth.margin = 1.0                 # the checked spec is read-only


# --- a model in training mode ---------------------------------------------------------

class TwoStage(torch.nn.Module):
    """A small net with batch norm and dropout (in training mode unless eval() is called)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8),
                                            torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, K))
        with torch.no_grad():
            self.features[2].running_mean.normal_()
            self.features[2].running_var.uniform_(0.5, 2.0)
        self.forwards = 0

    def forward(self, z):
        self.forwards += 1
        return self.head(self.features(z))


TRAIN_MODE_ENTRIES = {
    "certify": lambda m, x: dk.certify(m, x, L=5),
    "certify_at": lambda m, x: dk.certify_at(m, x, 0.0, L=5),
    "predict": lambda m, x: dk.predict(m, x, L=5),
    "dssn_certify": lambda m, x: dk.DSSN(m, K, L=5).certify(x),
    "dssn_certify_at": lambda m, x: dk.DSSN(m, K, L=5).certify_at(x, 0.0),
    "dssn_predict": lambda m, x: dk.DSSN(m, K, L=5).predict(x),
}


def state_bits(model):
    """Every buffer and parameter, as bytes, and each module's training flag."""
    tensors = {k: v.detach().reshape(-1).clone().view(torch.uint8).numpy().tobytes()
               for k, v in model.state_dict().items()}
    return tensors, [m.training for m in model.modules()]


@pytest.mark.parametrize("entry", list(TRAIN_MODE_ENTRIES))
def test_model_in_training_mode_is_refused_before_any_forward(entry):
    run = TRAIN_MODE_ENTRIES[entry]
    model = TwoStage()
    before = state_bits(model)
    with pytest.raises(ValueError, match=r"training mode: module 'features\.2' \(BatchNorm1d\)"
                                         r".*call model\.eval\(\)"):
        run(model, good_x())
    model.features.eval()      # the dropout layer alone is refused as well
    with pytest.raises(ValueError, match=r"module 'head\.0' \(Dropout\).*call model\.eval\(\)"):
        run(model, good_x())
    model.features.train()
    assert model.forwards == 0
    after = state_bits(model)
    assert after[1] == before[1]                       # still in training mode: not changed
    assert after[0] == before[0]                       # running_mean etc.: the same bits
    assert int(model.features[2].num_batches_tracked) == 0
    model.eval()
    run(model, good_x())                               # in eval mode it runs
    assert model.forwards > 0
    assert state_bits(model)[0] == before[0]


def test_training_mode_of_the_model_itself_is_named():
    with pytest.raises(ValueError, match=r"the model itself \(BatchNorm1d\).*running statistics"):
        dk.certify(torch.nn.BatchNorm1d(6), torch.zeros(2, 6), L=3)


# --- the native extension not built ---------------------------------------------------

@pytest.fixture
def native_missing(monkeypatch):
    """dssn_kernels._C as if it failed to import (``set(exc)``: with that error)."""
    import dssn_kernels.backends as backends
    error = [ModuleNotFoundError("No module named 'dssn_kernels._C'", name="dssn_kernels._C")]
    monkeypatch.setattr(backends, "_load_native", lambda: error[0])
    monkeypatch.setattr(backends, "_fallback_warned", False)
    backends.native_extension_error.cache_clear()

    def set_error(exc):
        error[0] = exc
        backends.native_extension_error.cache_clear()
    yield set_error
    backends.native_extension_error.cache_clear()   # the real import, once unpatched


def test_auto_without_native_extension_warns_once_and_falls_back(native_missing):
    import warnings
    assert "cpp" not in dk.available_backends()
    expected = dk.certify(Recorder(), good_x(), L=5, backend="torch")
    with pytest.warns(dk.NativeExtensionWarning) as record:
        cert = dk.certify(Recorder(), good_x(), L=5)
    assert cert.backend == "torch" and torch.equal(cert.counts, expected.counts)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "native C++ extension dssn_kernels._C is not built" in msg
    assert "pip install --no-build-isolation -e ." in msg and "'torch' backend" in msg
    assert "circular import" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # once per process: no second warning
        dk.certify(Recorder(), good_x(), L=5)
        dk.predict(Recorder(), good_x(), L=5)
        dk.variants(good_x(), L=5)
    with pytest.raises(dk.BackendUnavailableError,
                       match=r"backend 'cpp' is not available: the native C\+\+ extension "
                             r"dssn_kernels\._C is not built.*pip install --no-build-isolation"):
        dk.certify(Recorder(), good_x(), L=5, backend="cpp")


def test_native_extension_that_does_not_load_gives_its_reason(native_missing):
    native_missing(ImportError("libc10.so: undefined symbol: _ZN3c10"))
    why = dk.native_extension_error()
    assert "built but does not load (ImportError: libc10.so: undefined symbol: _ZN3c10)" in why
    with pytest.warns(dk.NativeExtensionWarning, match=r"undefined symbol.*pip install"):
        assert dk.certify(Recorder(), good_x(), L=5).backend == "torch"


def test_native_extension_loads_here():
    """The real import (the tests run with the extension built): no error."""
    assert dk.native_extension_error() is None and "cpp" in dk.available_backends()
