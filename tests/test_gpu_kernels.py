"""Kernel tests that follow the device: every check of bits or counts also runs
on CUDA tensors, once per expected CUDA backend (``cuda``, ``triton``, ``torch``;
tests/conftest.py), against a reference computed on the CPU (results come back with
``.cpu()`` before any comparison). Those cases carry the ``gpu`` marker (``pytest -m
gpu``) and are skipped, with the reason, where there is no CUDA device.

* expand: bit-identical to ``dssn_reference`` for every dtype, q/L regime and window,
  with strided inputs;
* vote / vote_margin: equal to the literal loop (testkit.literal_votes) and to the margin
  rule (dssn_reference.margin_vote), float64 logits beyond float64 rounding included;
* certify: the reference's counts for every batch size and batch composition;
* certify_at / predict: the same decisions, counts and variants evaluated as on the CPU,
  and the full certificate's answers;
* margin: the planted near ties and the brute-force soundness cases give the CPU
  reference's certificate;
* concurrent streams: a certify on a side stream, and two at once in two threads.

Plus the cases a GPU can break and a CPU cannot (warp, block and grid edges), which run on
the CPU backends too (cpp, torch, triton through the interpreter; kept small): K = 2, 10,
31, 32, 33, 1000, 1024, 1025 classes; row counts and batch sizes that are not multiples of
a block; strided and channels_last images and non-contiguous logits; more than 65,535
variants per image, and more rows than the CUDA expand grid covers in one pass;
float16/bfloat16 logits with NaN and infinities.
"""
import concurrent.futures
import itertools
import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_kernels as dk
import dssn_reference as ref
from conftest import CUDA_BACKENDS, device_backends, gpu_param
from dssn_kernels.ops import expand_into, vote_into, vote_margin_into
from test_early_exit import check_decision, draw_radius, draw_run_options, random_case
from test_expand import cases as expand_cases
from test_margin import (PLANTED_EXPECTED, SOUNDNESS_CASES, Coarse, ModInteger, Planted)
from test_vote_margin import (DTYPES, TAU, TIE_TAUS, draw_ties, float64_rounding_cases,
                              threshold_logits)
from test_vote_margin import expected as margin_expected
from testkit import IntegerLinear, bits, images, literal_votes

ON_DEVICE = device_backends()              # cpu backends, then the cuda ones (marked gpu)
GPU_ONLY = device_backends(cpu=False)      # the cuda ones only (each marked gpu)


def name(value):
    return str(value).replace("torch.", "")


def cases_on_device(combos, cpu_keep=lambda *combo: True):
    """(device, backend, *combo) parameters: every combo on every CUDA backend (marked
    gpu), and those ``cpu_keep`` selects on every CPU backend (the interpreter is slow)."""
    out = []
    for p in ON_DEVICE:
        device, backend = p.values
        out += [pytest.param(device, backend, *combo, marks=p.marks,
                             id="-".join([p.id, *map(name, combo)]))
                for combo in combos if device == "cuda" or cpu_keep(*combo)]
    return out


# --- moving things to the device ------------------------------------------------------------

def on(device, model):
    """A copy of ``model`` on ``device`` (the CPU original stays for the reference)."""
    return copy.deepcopy(model).to(device) if isinstance(model, torch.nn.Module) else model


def like_on(x, device):
    """x on ``device`` with the same sizes and strides: a strided view stays strided (a
    plain .to() would make it contiguous), channels_last stays channels_last."""
    out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
    out.copy_(x)
    assert out.stride() == x.stride()
    return out


def cpu(result):
    """A dataclass result (Certificate, Decision, Prediction) with its tensors on the CPU."""
    return dataclasses.replace(result, **{
        f.name: getattr(result, f.name).cpu() for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), torch.Tensor)})


class ToInputDevice(torch.nn.Module):
    """Runs a CPU-only model (Planted builds its logits on the CPU) and returns its logits
    on the device of its input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.cpu()).to(x.device)


CERT_FIELDS = ("prediction", "steps", "radius", "counts", "ambiguous", "num_ambiguous")


def assert_cert(got, want, *context):
    got = cpu(got)
    for name in CERT_FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), (name, *context)


# --- expand: bit-identical to the reference --------------------------------------------------

@pytest.mark.parametrize("device,backend", GPU_ONLY)
@given(case=expand_cases())
def test_variants_bit_identical_to_reference(device, backend, case):
    x, q, L, seed, start, stop = case
    expected = ref.variants(x, L=L, q=q, seed=seed, start=start, stop=stop)
    got = dk.variants(like_on(x, device), L=L, q=q, seed=seed, start=start, stop=stop,
                      backend=backend)
    assert got.device.type == device and got.dtype == torch.float32
    assert torch.equal(bits(got.cpu()), bits(expected)), backend


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5])
def test_released_sigmas_cifar_shape(device, backend, sigma):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    L = dk.num_variants(sigma)
    got = dk.variants(x.to(device), sigma=sigma, start=L - 3, backend=backend)
    assert torch.equal(bits(got.cpu()), bits(ref.variants(x, sigma=sigma, start=L - 3)))


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q,L", [(1, 1), (7, 3), (16, 55), (255, 132), (1000, 700)])
def test_half_variants_are_the_references(device, backend, dtype, q, L):
    x = torch.arange(q + 1, dtype=torch.int32).view(1, -1)[:, :300]
    start = max(0, L - 40)
    got = dk.variants(x.to(device), L=L, q=q, seed=1, start=start, backend=backend, dtype=dtype)
    expected = ref.variants(x, L=L, q=q, seed=1, start=start, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got.cpu().view(torch.int16), expected.view(torch.int16))


# More than 65,535 variants per image. On a GPU, 64 images of L rows each is more rows
# than the CUDA expand grid covers in one pass (65,535 blocks of 8 x 8 rows when d <= 32),
# so the kernel's grid-stride loop runs. q is large (int32 levels): for L >= q only about
# q of a pixel's L split positions give a value other than 1/2, so a small q would leave
# a misplaced variant unseen.
BIG_L, BIG_Q = 70_001, 30_011


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_expand_beyond_the_grid_limits(device, backend):
    q, seed = BIG_Q, 11
    B, d = (64, 3) if device == "cuda" else (1, 1)     # the interpreter: ~1 ms per 4096 values
    levels = ((torch.arange(B)[:, None] * 7919 + torch.arange(d)[None, :] * 104_729 + 17)
              % (q + 1)).to(torch.int32)
    offsets = ref.split_offsets(d, BIG_L, seed).to(torch.int32)
    out = torch.full((B, BIG_L, d), float("nan"), device=device)   # unwritten rows stay NaN
    expand_into(out, levels.to(device), offsets.to(device), BIG_L, q, 0, backend)
    got = out.cpu()
    # every row against the CPU torch backend (itself checked against the reference in
    # tests/test_expand.py) ...
    want = torch.full((B, BIG_L, d), float("nan"))
    expand_into(want, levels, offsets, BIG_L, q, 0, "torch")
    assert torch.equal(bits(got), bits(want))
    assert 0.3 < float((want != 0.5).double().mean()) < 0.7            # not all 1/2
    # ... and windows around the 16-bit edges against the reference itself
    for a, b in [(0, 12), (65_520, 65_560), (BIG_L - 12, BIG_L)]:
        expected = ref.variants(levels[:4], L=BIG_L, q=q, seed=seed, start=a, stop=b)
        assert torch.equal(bits(got[:4, a:b]), bits(expected)), (a, b)


# --- vote and vote_margin at warp, block and grid edges ---------------------------------------

K_SIZES = [2, 10, 31, 32, 33, 1000, 1024, 1025]
# rows per K: more than one Triton program of rows (its block is min(next_pow2(R),
# 4096 / block_K) rows), the last one partial; none a multiple of 8 (the CUDA kernels'
# rows per block)
ROWS = {2: 2053, 10: 259, 31: 131, 32: 131, 33: 67, 1000: 19, 1024: 19, 1025: 19}
BOUNDARY_COLUMNS = (0, 1, 15, 16, 30, 31, 32, 33, 63, 64, 511, 512, 1022, 1023, 1024)


def boundary_logits(R, K, dtype, seed):
    """Small integers (ties everywhere), winners and exact ties planted on warp (32) and
    block (1024) edges, -0.0/+0.0, infinities, NaN rows with the NaN in the last column, in
    the second column block and everywhere. Every value is exact in every dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (R, K), generator=g).double()
    cols = sorted({c for c in BOUNDARY_COLUMNS if c < K} | {K // 2, K - 2, K - 1})
    for r in range(R - 10):
        kind, c = r % 4, cols[(r // 4) % len(cols)]
        other = cols[(r // 4 + 1 + r // (4 * len(cols))) % len(cols)]
        if kind == 1:
            x[r, c] = 10.0                           # one winner on an edge
        elif kind == 2:
            x[r, [c, other]] = 10.0                  # a tie across edges: the lower wins
        elif kind == 3:
            x[r] = float("-inf")
            x[r, other] = -7.0                       # the one finite logit
    x[R - 10] = 0.0
    x[R - 10, 0] = -0.0                              # -0.0 == +0.0: index 0 wins
    x[R - 9] = float("-inf")                         # all -inf: class 0
    x[R - 8, K - 1] = float("inf")
    x[R - 7, [min(32, K - 1), K - 1]] = float("inf")  # +inf tie
    x[R - 6, K - 1] = float("nan")                   # NaN in the last column
    x[R - 5, min(1024, K - 1)] = float("nan")
    x[R - 5, 0] = float("inf")
    x[R - 4] = float("nan")                          # all NaN
    x[R - 3, min(33, K - 1)] = float("nan")
    x[R - 2] = -5.0
    x[R - 2, K - 1] = 9.0
    x[R - 1] = 9.0                                   # all tied: class 0
    out = x.to(dtype)
    assert torch.equal(out.double()[~torch.isnan(x)], x[~torch.isnan(x)])   # exact
    return out


def mapping(R, K):
    """(row0, rows_per_image, B, counts, ambiguous, nan_rows): rows spread over a few
    images, votes accumulating onto nonzero counts."""
    row0, rpi = 5, max(1, R // 3)
    B = (row0 + R - 1) // rpi + 1
    g = torch.Generator().manual_seed(R + K)
    return (row0, rpi, torch.randint(0, 50, (B, K), generator=g),
            torch.randint(0, 5, (B, K), generator=g), torch.tensor([3]))


def run_vote(device, backend, counts, nan_rows, logits, row0, rpi):
    c, n = counts.to(device, copy=True), nan_rows.to(device, copy=True)
    vote_into(c, n, logits if logits.device.type == device else logits.to(device), row0, rpi,
              backend)
    return c.cpu(), n.cpu()


def run_margin(device, backend, counts, ambiguous, nan_rows, logits, row0, rpi, tau):
    c, a, n = (t.to(device, copy=True) for t in (counts, ambiguous, nan_rows))
    vote_margin_into(c, a, n, logits if logits.device.type == device else logits.to(device),
                     row0, rpi, tau, backend)
    return c.cpu(), a.cpu(), n.cpu()


@functools.lru_cache(maxsize=None)
def vote_case(K, dtype):
    R = ROWS[K]
    logits = boundary_logits(R, K, dtype, seed=K)
    row0, rpi, counts, _, nan_rows = mapping(R, K)
    return logits, row0, rpi, counts, nan_rows, literal_votes(counts, nan_rows, logits, row0, rpi)


def two_dtypes_per_K(K, dtype, *rest):
    """On the CPU, two logits dtypes per K (each dtype with four of the K sizes)."""
    i = K_SIZES.index(K)
    return DTYPES.index(dtype) in (i % 4, (i + 2) % 4)


@pytest.mark.parametrize("device,backend,K,dtype",
                         cases_on_device([(K, t) for K in K_SIZES for t in DTYPES],
                                         two_dtypes_per_K))
def test_vote_class_counts_at_edges(device, backend, K, dtype):
    logits, row0, rpi, counts, nan_rows, (want_c, want_n) = vote_case(K, dtype)
    got_c, got_n = run_vote(device, backend, counts, nan_rows, logits, row0, rpi)
    assert torch.equal(got_c, want_c)
    assert torch.equal(got_n, want_n) and int(got_n) == 3 + 4


@functools.lru_cache(maxsize=None)
def margin_case(kind, K, dtype):
    R = ROWS[K]
    if kind == "threshold":            # near ties at gap == tau and one ulp either side
        logits, tau = threshold_logits(R, K, dtype, seed=K), TAU
    else:                              # ties and integer gaps across warp and block edges
        logits, tau = boundary_logits(R, K, dtype, seed=K), 1.5
    row0, rpi, counts, ambiguous, nan_rows = mapping(R, K)
    want = margin_expected(counts, ambiguous, nan_rows, logits, row0, rpi, tau)
    return logits, tau, row0, rpi, (counts, ambiguous, nan_rows), want


def one_case_per_K(K, kind, dtype):
    """On the CPU, one threshold case per K (dtypes in turn) and boundary cases for
    every other K."""
    i = K_SIZES.index(K)
    if kind == "threshold":
        return dtype == DTYPES[i % 4]
    return dtype == (torch.float32, torch.bfloat16)[i // 2 % 2] and i % 2 == 0


@pytest.mark.parametrize("device,backend,K,kind,dtype", cases_on_device(
    [(K, "threshold", t) for K in K_SIZES for t in DTYPES]
    + [(K, "boundary", t) for K in K_SIZES for t in (torch.float32, torch.bfloat16)],
    one_case_per_K))
def test_vote_margin_at_edges(device, backend, K, kind, dtype):
    logits, tau, row0, rpi, start, want = margin_case(kind, K, dtype)
    got = run_margin(device, backend, *start, logits, row0, rpi, tau)
    for name, a, b in zip(("counts", "ambiguous", "nan_rows"), got, want):
        assert torch.equal(a, b), name
    assert int(want[1].sum() - start[1].sum()) > 0        # some row was ambiguous


def strided_logits(logits, layout, device):
    """The same values in a non-contiguous [R, K] tensor on ``device``; the elements
    between them are NaN, so a kernel reading them counts NaN rows."""
    R, K = logits.shape
    if layout == "transposed":
        return logits.t().contiguous().to(device).t()
    shape, index = {"row_stride": ((2 * R, K), (slice(None, None, 2),)),
                    "col_slice": ((R, K + 5), (slice(None), slice(3, 3 + K))),
                    "col_stride": ((R, 2 * K), (slice(None), slice(None, None, 2)))}[layout]
    wide = torch.full(shape, float("nan"), dtype=logits.dtype, device=device)
    wide[index] = logits.to(device)
    out = wide[index]
    assert not out.is_contiguous()
    return out


LAYOUTS = ["transposed", "row_stride", "col_slice", "col_stride"]


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("K,dtype", [(33, torch.float16), (1025, torch.float32)])
def test_votes_of_non_contiguous_logits(device, backend, layout, K, dtype):
    logits, row0, rpi, counts, nan_rows, want = vote_case(K, dtype)
    got = run_vote(device, backend, counts, nan_rows, strided_logits(logits, layout, device),
                   row0, rpi)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    logits, tau, row0, rpi, start, want = margin_case("threshold", K, dtype)
    got = run_margin(device, backend, *start, strided_logits(logits, layout, device), row0, rpi,
                     tau)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def two_class_votes(logits, row0, rpi, B, tau):
    """counts, ambiguous [B, 2] and NaN rows of a K = 2 logits array, vectorized (the rule
    for two classes: class 1 wins iff z1 > z0; with tau > 0 a row is ambiguous, for both
    classes, iff z0 == z1 or |z0 - z1| < tau). Exact for these logits (multiples of 1/8)."""
    z = logits.double().numpy()
    nan = np.isnan(z).any(axis=1)
    image = (row0 + np.arange(len(z))) // rpi
    win = (z[:, 1] > z[:, 0]).astype(np.int64)
    tie = z[:, 0] == z[:, 1]
    with np.errstate(invalid="ignore"):
        gap = np.where(tie, 0.0, np.abs(z[:, 0] - z[:, 1]))
    amb = ~nan & (gap < tau) if tau > 0 else np.zeros(len(z), bool)
    vote = ~nan & ~amb
    counts = np.bincount(image[vote] * 2 + win[vote], minlength=2 * B).reshape(B, 2)
    per_image = np.bincount(image[amb], minlength=B)
    return (torch.from_numpy(counts), torch.from_numpy(np.stack([per_image, per_image], 1)),
            torch.tensor([int(nan.sum())]))


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("tau", [0.0, 0.25])
def test_vote_rows_beyond_the_grid_limits(device, backend, tau):
    """Rows of more than 65,535 variants per image; on a GPU more rows (2^23 + 37) than
    the CUDA vote kernels cover in one pass (2^20 blocks of 8 rows): the grid-stride loop."""
    R = (1 << 23) + 37 if device == "cuda" else BIG_L + 37
    row0, rpi = 7, BIG_L
    B = (row0 + R - 1) // rpi + 1
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(-16, 17, (R, 2), generator=g).float() / 8
    special = torch.tensor([[float("nan"), 0.0], [0.0, float("inf")], [float("-inf")] * 2,
                            [float("inf")] * 2, [-0.0, 0.0], [1.0, 1.125], [2.0, 1.75]])
    logits[R - len(special):] = special
    logits[65_535:65_540, 1] = float("nan")
    want = two_class_votes(logits, row0, rpi, B, tau)
    # the vectorized rule is the literal loop / the margin rule (checked on the first rows
    # and the special ones)
    head = torch.cat([logits[:3000], logits[65_530:65_545], logits[R - len(special):]])
    z = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), \
        torch.zeros(1, dtype=torch.long)
    lit = literal_votes(z[0], z[2], head, 0, len(head)) if tau == 0 else \
        margin_expected(*z, head, 0, len(head), tau)
    vec = two_class_votes(head, 0, len(head), 1, tau)
    assert torch.equal(vec[0], lit[0]) and torch.equal(vec[2], lit[-1])
    if tau > 0:
        assert torch.equal(vec[1], lit[1]) and int(vec[1].sum()) > 0
    zeros = torch.zeros(B, 2, dtype=torch.long), torch.zeros(B, 2, dtype=torch.long), \
        torch.zeros(1, dtype=torch.long)
    if tau == 0:
        got = run_vote(device, backend, zeros[0], zeros[2], logits, row0, rpi)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[2])
    else:
        got = run_margin(device, backend, *zeros, logits, row0, rpi, tau)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert int(want[2]) == 6


@pytest.mark.parametrize("device,backend", GPU_ONLY)
def test_margin_exact_beyond_float64_rounding(device, backend):
    """The TwoSum comparison on the device: no fused multiply-add may change it."""
    logits = float64_rounding_cases()
    zeros = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), \
        torch.zeros(1, dtype=torch.long)
    want = margin_expected(*zeros, logits, 0, 100, 1.0)
    assert want[1].tolist() == [[4, 4]] and want[0].tolist() == [[2, 2]]
    got = run_margin(device, backend, *zeros, logits, 0, 100, 1.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for tau, amb in ((1.0 + 2 ** -52, 1), (1.0 - 2 ** -53, 0)):
        c, a, _ = run_margin(device, backend, *zeros, logits[4:5], 0, 1, tau)
        assert int(a.sum()) == 2 * amb and int(c.sum()) == 1 - amb, tau


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@given(data=st.data(), K=st.integers(2, 7), R=st.integers(1, 12),
       dtype=st.sampled_from(DTYPES), tau=st.sampled_from(TIE_TAUS))
def test_random_ties_match_reference(device, backend, data, K, R, dtype, tau):
    logits, row0, rpi, zeros = draw_ties(data, K, R, dtype)
    want = margin_expected(*zeros, logits, row0, rpi, tau)
    got = run_margin(device, backend, *zeros, logits, row0, rpi, tau)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got_c, got_n = run_vote(device, backend, zeros[0], zeros[2], logits, row0, rpi)
    want_c, want_n = literal_votes(zeros[0], zeros[2], logits, row0, rpi)
    assert torch.equal(got_c, want_c) and torch.equal(got_n, want_n)


# --- certify: the reference's counts, whatever the chunking -----------------------------------

@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("L", [1, 13, 60])
def test_counts_identical_for_every_batch_size(device, backend, L):
    x = images(4)
    model = IntegerLinear(48, 5, 255, seed=L)
    want = ref.certify(model, x, L=L, q=255, seed=7)
    gpu_model, x_dev = on(device, model), x.to(device)
    for bs in sorted({1, 7, 8, 31, 33, L, L + 1, 2 * L - 1, 4 * L, 255, 257, 1000}):
        cert = dk.certify(gpu_model, x_dev, L=L, q=255, seed=7, batch_size=bs, backend=backend)
        assert_cert(cert, want, bs)


@pytest.mark.parametrize("device,backend", GPU_ONLY)
def test_counts_independent_of_batch_composition(device, backend):
    x = images(6, seed=3)
    model = on(device, IntegerLinear(48, 4, 255, seed=1))
    want = ref.certify(IntegerLinear(48, 4, 255, seed=1), x, L=29).counts
    x = x.to(device)
    whole = dk.certify(model, x, L=29, batch_size=40, backend=backend).counts.cpu()
    one_by_one = torch.cat([dk.certify(model, x[i:i + 1], L=29, batch_size=40,
                                       backend=backend).counts.cpu() for i in range(6)])
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    permuted = dk.certify(model, x[perm.to(device)], L=29, batch_size=17,
                          backend=backend).counts.cpu()
    assert torch.equal(whole, want)
    assert torch.equal(one_by_one, want)
    assert torch.equal(permuted, want[perm])


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("q,d,L", [(3, 3, 2), (4, 2, 9), (6, 2, 7)])
def test_whole_grid_certificate_is_the_references(device, backend, q, d, L):
    """tests/test_soundness.py proves these certificates sound by brute force: the device
    must give exactly them."""
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    model = IntegerLinear(d, 4, q, seed=5, bias_scale=1)
    want = ref.certify(model, grid, L=L, q=q, seed=2)
    got = dk.certify(on(device, model), grid.to(device), L=L, q=q, seed=2, backend=backend,
                     batch_size=5)
    assert_cert(got, want)


# Images and logits in every memory layout: x strided or channels_last, the model called
# on a channels_last workspace or not, logits returned non-contiguous.
class Relayout(torch.nn.Module):
    def __init__(self, inner, layout):
        super().__init__()
        self.inner, self.layout = inner, layout

    def forward(self, x):
        z = self.inner(x)
        if self.layout == "contiguous":
            return z
        return strided_logits(z, self.layout, z.device)


LAYOUT_CASES = [("channels_last", True, "transposed"), ("strided", False, "col_stride"),
                ("channels_last", False, "row_stride"), ("strided", True, "contiguous")]


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("x_layout,channels_last,logits_layout", LAYOUT_CASES)
def test_certify_with_strided_and_channels_last_layouts(device, backend, x_layout,
                                                        channels_last, logits_layout):
    x = images(4, shape=(3, 4, 4), seed=8)
    want = ref.certify(IntegerLinear(48, 5, 255, seed=3), x, L=13, q=255, seed=4)
    if x_layout == "channels_last":
        x_dev = x.to(device).contiguous(memory_format=torch.channels_last)
        assert not x_dev.is_contiguous()
    else:
        wide = torch.zeros(4, 3, 4, 8, dtype=torch.uint8, device=device)
        wide[..., ::2] = x.to(device)
        x_dev = wide[..., ::2]
    model = Relayout(on(device, IntegerLinear(48, 5, 255, seed=3)), logits_layout)
    for bs in ((7, 52) if device == "cuda" else (23,)):       # 52 = B * L: one forward
        got = dk.certify(model, x_dev, L=13, q=255, seed=4, batch_size=bs, backend=backend,
                         channels_last=channels_last)
        assert_cert(got, want, bs)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("K", [33, 1025])
def test_certify_with_many_classes(device, backend, K):
    x = images(2, seed=4)
    model = IntegerLinear(48, K, 255, seed=K)
    want = ref.certify(model, x, L=13, q=255, seed=1)
    got = dk.certify(on(device, model), x.to(device), L=13, q=255, seed=1, batch_size=11,
                     backend=backend)
    assert_cert(got, want)


class HalfWithInfinities(torch.nn.Module):
    """IntegerLinear's exact scores / 64 rounded to float16/bfloat16 (so rounding makes
    ties), with infinities planted by a rule of the input alone: the last logit +inf, all
    -inf, a +inf tie, or (``nan``) one NaN logit."""

    def __init__(self, dim, num_classes, q, dtype, nan=False):
        super().__init__()
        self.inner = IntegerLinear(dim, num_classes, q, seed=2, bias_scale=1)
        self.dtype, self.nan = dtype, nan

    def forward(self, x):
        s = self.inner(x)
        z = (s / 64).to(self.dtype)
        rule = torch.remainder(s.sum(1), 5)[:, None]
        K = z.shape[1]
        col = torch.arange(K, device=z.device)[None, :]
        inf = torch.tensor(float("inf"), dtype=z.dtype, device=z.device)
        z = torch.where((rule == 0) & (col == K - 1), inf, z)
        z = torch.where(rule == 1, -inf, z)
        z = torch.where((rule == 2) & ((col == 1) | (col == K - 1)), inf, z)
        if self.nan:
            z = torch.where((rule == 3) & (col == 0), torch.full_like(inf, float("nan")), z)
        return z


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("margin", [0.0, 0.75])
def test_half_logits_with_infinities(device, backend, dtype, margin):
    x = images(3, seed=6)
    model = HalfWithInfinities(48, 4, 255, dtype)
    want = ref.certify(model, x, L=20, q=255, margin=margin)
    with torch.no_grad():
        z = model(dk.variants(x, L=20, q=255).reshape(-1, 3, 4, 4))
    assert z.dtype == dtype and bool(torch.isinf(z).any(1).sum() >= 10)   # the case bites
    got = dk.certify(on(device, model), x.to(device), L=20, q=255,
                     batch_size=9 if device == "cuda" else 23, backend=backend, margin=margin)
    assert_cert(got, want)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_nan_logits_raise(device, backend, dtype):
    model = on(device, HalfWithInfinities(48, 4, 255, dtype, nan=True))
    with pytest.raises(ValueError, match="NaN logits"):
        dk.certify(model, images(3, seed=6).to(device), L=20, q=255, batch_size=9,
                   backend=backend)


@functools.lru_cache(maxsize=None)
def big_case():
    q, d = BIG_Q, 2
    x = images(3, shape=d, q=q, seed=5)
    model = IntegerLinear(d, 3, q, seed=4)
    want = dk.certify(model, x, L=BIG_L, q=q, backend="torch", batch_size=21_001)  # CPU
    return q, x, model, want


@pytest.mark.parametrize("device,backend", device_backends(cuda=False, exclude=("triton",))
                         + GPU_ONLY)       # the interpreter: test_*_beyond_the_grid_limits
def test_certify_beyond_the_grid_limits(device, backend):
    """L > 65,535 through the pipeline: one workspace holding whole images (one expand of
    L variants), and chunks straddling images."""
    q, x, model, want = big_case()
    assert torch.equal(want.counts.sum(1), torch.full((3,), BIG_L))
    assert bool(((want.counts >= 1000).sum(1) >= 2).all())     # votes really split
    gpu_model, x_dev = on(device, model), x.to(device)
    for bs in (2 * BIG_L + 3, 65_537):
        got = dk.certify(gpu_model, x_dev, L=BIG_L, q=q, backend=backend, batch_size=bs)
        assert_cert(got, want, bs)


# --- early exit: the same decisions on the device ----------------------------------------------

def assert_same_decision(got, want):
    got = cpu(got)
    for f in dataclasses.fields(want):
        if f.name == "backend":
            continue
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@given(data=st.data())
def test_certify_at_equals_full_certificate(device, backend, data):
    q, L, x, model = random_case(data)
    margin = data.draw(st.sampled_from([0.0, 0.0, 1.5]), label="margin")
    radius = draw_radius(data, q, L)
    opts = draw_run_options(data, L)
    settle = data.draw(st.booleans(), label="settle_prediction")
    cert = dk.certify(model, x, L=L, q=q, backend="torch", margin=margin)   # CPU
    want = dk.certify_at(model, x, radius, L=L, q=q, backend="torch", margin=margin,
                         settle_prediction=settle, **opts)                # CPU
    got = dk.certify_at(on(device, model), x.to(device), radius, L=L, q=q, backend=backend,
                        margin=margin, settle_prediction=settle, **opts)
    check_decision(cpu(got), cert, radius, L, settle)
    assert_same_decision(got, want)


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@given(data=st.data())
def test_predict_equals_full_prediction(device, backend, data):
    q, L, x, model = random_case(data)
    margin = data.draw(st.sampled_from([0.0, 0.0, 1.5]), label="margin")
    opts = draw_run_options(data, L)
    cert = dk.certify(model, x, L=L, q=q, backend="torch", margin=margin)   # CPU
    want = dk.predict(model, x, L=L, q=q, backend="torch", margin=margin, **opts)
    got = dk.predict(on(device, model), x.to(device), L=L, q=q, backend=backend, margin=margin,
                     **opts)
    assert torch.equal(got.prediction.cpu(), cert.prediction)
    assert_same_decision(got, want)


@pytest.mark.parametrize("device,backend", GPU_ONLY)    # CPU: tests/test_early_exit.py
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 33])
def test_early_exit_with_odd_batch_and_chunk_sizes(device, backend, chunk_size):
    x = images(5, seed=9)
    model = IntegerLinear(48, 3, 255, seed=6, bias_scale=2)
    cert = ref.certify(model, x, L=60, q=255)
    for radius in (0.0, 3 / 255, 9 / 255):
        want = dk.certify_at(model, x, radius, L=60, q=255, batch_size=37, backend="torch",
                             chunk_size=chunk_size)
        got = dk.certify_at(on(device, model), x.to(device), radius, L=60, q=255, batch_size=37,
                            backend=backend, chunk_size=chunk_size)
        assert torch.equal(got.certified.cpu(), cert.radius >= radius), radius
        assert_same_decision(got, want)
    got = dk.predict(on(device, model), x.to(device), L=60, q=255, batch_size=37,
                     backend=backend, chunk_size=chunk_size)
    assert torch.equal(got.prediction.cpu(), cert.prediction)


# --- margin on the device ---------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("tau", sorted(PLANTED_EXPECTED))
def test_planted_near_ties_lose_exactly_the_rule(device, backend, tau):
    q, L = 16, 8
    x = torch.tensor([[8], [8]], dtype=torch.uint8)
    counts, ambiguous, steps = PLANTED_EXPECTED[tau]
    for batch_size in (1, 7, L):
        cert = cpu(dk.certify(ToInputDevice(Planted()), x.to(device), L=L, q=q, margin=tau,
                              backend=backend, batch_size=batch_size))
        assert cert.counts.tolist() == [counts] * 2, batch_size
        assert cert.ambiguous.tolist() == [ambiguous] * 2
        assert cert.num_ambiguous.tolist() == [L - sum(counts)] * 2
        assert cert.prediction.tolist() == [0, 0]
        assert cert.steps.tolist() == [steps] * 2


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("tau", [0.5, 1.0, 1.25])
def test_margin_identical_across_batch_sizes(device, backend, tau):
    q, L = 6, 9
    x = torch.randint(0, q + 1, (4, 3), generator=torch.Generator().manual_seed(1))
    model = ModInteger(3, 5, q, seed=2)
    want = ref.certify(model, x, L=L, q=q, margin=tau)
    assert int(want.num_ambiguous.sum()) > 0
    for batch_size in (1, 7, L, 4 * L):
        got = dk.certify(on(device, model), x.to(device), L=L, q=q, backend=backend,
                         batch_size=batch_size, margin=tau)
        assert_cert(got, want, batch_size)


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_margin_with_half_logits(device, backend, dtype):
    q, L = 6, 9
    x = torch.randint(0, q + 1, (3, 3), generator=torch.Generator().manual_seed(4))
    model = ModInteger(3, 3, q, seed=5, step=0.375, dtype=dtype)
    want = ref.certify(ModInteger(3, 3, q, seed=5, step=0.375, dtype=torch.float64), x, L=L,
                       q=q, margin=0.75)
    assert_cert(dk.certify(on(device, model), x.to(device), L=L, q=q, backend=backend,
                           margin=0.75), want)


@pytest.mark.parametrize("device,backend", GPU_ONLY)
@pytest.mark.parametrize("kind,q,d,L,K,seed,parameter,tau", SOUNDNESS_CASES)
def test_margin_soundness_cases_are_the_references(device, backend, kind, q, d, L, K, seed,
                                                   parameter, tau):
    """tests/test_margin.py proves these certificates sound by brute force (every x' and
    every logit move below tau/2): the device must give exactly them."""
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    if kind == "coarse":
        model = Coarse(d, K, q, seed=seed, div=parameter)
    else:
        model = ModInteger(d, K, q, seed=seed, step=parameter, dtype=torch.float32)
    want = ref.certify(model, grid, L=L, q=q, seed=seed, margin=tau)
    got = dk.certify(on(device, model), grid.to(device), L=L, q=q, seed=seed, margin=tau,
                     backend=backend)
    assert_cert(got, want)
    assert int(want.num_ambiguous.sum()) > 0


# --- streams ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [gpu_param(b, id=f"cuda-{b}") for b in CUDA_BACKENDS])
def test_certify_on_side_streams(backend):
    """A certify on a non-default stream, and two at once on two streams in two threads,
    give the reference's counts (every kernel runs on the caller's current stream)."""
    jobs = [(IntegerLinear(48, 5, 255, seed=1), images(5, seed=1), 0.0, 37),
            (ModInteger(48, 4, 255, seed=2), images(3, seed=2), 0.75, 53)]
    wants = [ref.certify(m, x, L=220, q=255, seed=3, margin=tau) for m, x, tau, _ in jobs]
    on_gpu = [(on("cuda", m), x.to("cuda"), tau, bs) for m, x, tau, bs in jobs]
    torch.cuda.synchronize()                 # the copies are done before other streams read

    def run(job, stream):
        model, x, tau, bs = job
        with torch.cuda.stream(stream):
            cert = dk.certify(model, x, L=220, q=255, seed=3, margin=tau, batch_size=bs,
                              backend=backend)
            dec = dk.certify_at(model, x, 2 / 255, L=220, q=255, seed=3, margin=tau,
                                batch_size=bs, backend=backend)
        stream.synchronize()
        return cert, dec

    side = torch.cuda.Stream()
    assert side != torch.cuda.current_stream()
    cert, dec = run(on_gpu[0], side)
    assert_cert(cert, wants[0])
    assert torch.equal(dec.certified.cpu(), wants[0].steps >= 2)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, job, s) for job, s in zip(on_gpu, streams)]
        results = [f.result() for f in futures]
    torch.cuda.synchronize()
    for (cert, dec), want in zip(results, wants):
        assert_cert(cert, want)
        assert torch.equal(dec.certified.cpu(), want.steps >= 2)
        assert torch.equal(dec.prediction.cpu(), want.prediction)
