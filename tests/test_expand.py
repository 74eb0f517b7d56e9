"""dssn::expand / dk.variants: bit-identical to the reference on every backend."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import dssn_kernels as dk
import dssn_reference as ref
from conftest import CPU_BACKENDS
from testkit import bits

BACKENDS = CPU_BACKENDS  # torch, cpp, triton (interpreter): expected (conftest), not asked


@st.composite
def cases(draw):
    q = draw(st.integers(1, 255))
    regime = draw(st.sampled_from(["one", "below", "equal", "above"]))
    L = {"one": 1,
         "below": draw(st.integers(1, max(1, q - 1))),
         "equal": q,
         "above": draw(st.integers(q + 1, min(q + 300, 2 * q + 40)))}[regime]
    B = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    start = draw(st.integers(0, L))
    stop = draw(st.integers(start, min(L, start + 40)))
    seed = draw(st.integers(0, 2**31 - 1))
    as_float = draw(st.booleans())
    non_contiguous = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    levels = torch.randint(0, q + 1, (B, *shape), generator=g, dtype=torch.int64)
    x = (levels.double() / q).float() if as_float else levels.to(torch.uint8)
    if non_contiguous:
        # the same values through a strided view: every other element of a wider tensor
        # (made after the dtype conversion, which would otherwise return a contiguous copy)
        wide = torch.zeros((B, *shape[:-1], 2 * shape[-1]), dtype=x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous() or x.numel() == B
    return x, q, L, seed, start, stop


@given(cases())
def test_variants_bit_identical_to_reference(case):
    x, q, L, seed, start, stop = case
    expected = ref.variants(x, L=L, q=q, seed=seed, start=start, stop=stop)
    assert expected.shape == (x.shape[0], stop - start, *x.shape[1:])
    for backend in BACKENDS:
        got = dk.variants(x, L=L, q=q, seed=seed, start=start, stop=stop, backend=backend)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(bits(got), bits(expected)), backend


@given(cases(), st.sampled_from(["table", "formula"]))
def test_torch_backend_table_and_formula_paths(case, path):
    """expand_torch gathers from a [q+1, L] value table when it is small enough and
    evaluates the formula per element otherwise: both paths give the reference's bits."""
    from unittest import mock

    from dssn_kernels.ops import expand as expand_op

    x, q, L, seed, start, stop = case
    expected = ref.variants(x, L=L, q=q, seed=seed, start=start, stop=stop)
    limit = expand_op.MAX_TABLE_ENTRIES if path == "table" else 0
    with mock.patch.object(expand_op, "MAX_TABLE_ENTRIES", limit):
        got = dk.variants(x, L=L, q=q, seed=seed, start=start, stop=stop, backend="torch")
    assert torch.equal(bits(got), bits(expected))


def test_torch_backend_beyond_the_table_limit():
    from dssn_kernels.ops import expand as expand_op

    q, L = 2000, 2200                      # (q + 1) * L > MAX_TABLE_ENTRIES
    assert (q + 1) * L > expand_op.MAX_TABLE_ENTRIES
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, q + 1, (1, 40), generator=g).double() / q
    expected = ref.variants(x, L=L, q=q, seed=5, start=L - 30, stop=L)
    got = dk.variants(x, L=L, q=q, seed=5, start=L - 30, stop=L, backend="torch")
    assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_released_sigmas_cifar_shape(sigma, backend):
    """Real settings (q=255, CIFAR shape), a window of the variants."""
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    L = dk.num_variants(sigma)
    got = dk.variants(x, sigma=sigma, start=L - 3, backend=backend)
    assert torch.equal(bits(got), bits(ref.variants(x, sigma=sigma, start=L - 3)))


@pytest.mark.parametrize("q,L", [(1, 1), (3, 2), (5, 11), (16, 55), (255, 132), (255, 3091)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_are_nearest_float32_of_integer_ratio(q, L, backend):
    """Every value is the float32 nearest to m/(4q) for an integer m in 0..4q."""
    x = torch.arange(q + 1, dtype=torch.int32).view(1, q + 1)
    out = dk.variants(x, L=L, q=q, backend=backend).double()
    m = torch.round(out * 4 * q)
    assert bool(((m >= 0) & (m <= 4 * q)).all())
    nearest = np.array([np.float32(int(mi) / (4 * q)) for mi in m.view(-1).tolist()],
                       dtype=np.float32)       # int / int: the correctly rounded float64
    assert np.array_equal(out.float().numpy().reshape(-1).view(np.int32), nearest.view(np.int32))


@pytest.mark.parametrize("q,L", [(1, 3), (4, 2), (4, 4), (7, 5), (7, 30), (16, 16), (255, 132)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_pixel_sees_every_split_once(q, L, backend):
    """Over the L variants, each pixel's split index runs through a permutation of 0..L-1:
    the multiset of its noised values equals {x~(k, j): j = 0..L-1} from the paper's
    formula (eq. 47-48 with s = (j + 1/2)/q)."""
    x = torch.arange(q + 1, dtype=torch.int32).repeat(3).view(1, -1)
    out = dk.variants(x, L=L, q=q, seed=3, backend=backend)[0]     # [L, d]
    two_lam = Fraction(L, q)
    for i, k in enumerate(x[0].tolist()):
        expected = sorted(float(np.float32(float(ref.noised_pixel(Fraction(k, q), Fraction(2 * j + 1, 2 * q), two_lam))))
                          for j in range(L))
        assert sorted(out[:, i].tolist()) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_int_and_float_inputs_agree(backend):
    q = 255
    k = torch.arange(256).view(1, 4, 64)
    outs = [dk.variants(x, L=37, q=q, backend=backend)
            for x in (k.to(torch.uint8), k.int(), k.float() / 255, k.double() / 255)]
    for o in outs[1:]:
        assert torch.equal(bits(o), bits(outs[0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q,L", [(1, 1), (7, 3), (16, 55), (255, 132), (1000, 700)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_outputs_are_nearest_value_of_the_type(dtype, q, L, backend):
    """float16/bfloat16 variants: the nearest value of the type to m/(4q) (ties to even),
    bit for bit as the reference computes it exactly."""
    x = torch.arange(q + 1, dtype=torch.int32).view(1, -1)[:, :300]
    start = max(0, L - 40)
    got = dk.variants(x, L=L, q=q, seed=1, start=start, backend=backend, dtype=dtype)
    expected = ref.variants(x, L=L, q=q, seed=1, start=start, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
