"""The released code's conventions, which make a model trained there certify here:
sigma -> lambda -> L, the split offsets from numpy's RandomState, and training noise that
is exactly one of the L certification variants."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dssn_kernels as dk
import dssn_reference as ref
from testkit import bits, images

# L = int(2 * (sigma / 3**-0.5) * 255): the sigmas of the paper's tables.
PAPER_L = {0.15: 132, 0.25: 220, 0.5: 441, 1.0: 883, 1.75: 1545, 3.5: 3091}


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
@pytest.mark.parametrize("sigma", list(PAPER_L))
def test_num_variants_paper_sigmas(impl, sigma):
    assert impl.num_variants(sigma=sigma, q=255) == PAPER_L[sigma]
    assert impl.num_variants(sigma, q=255) == PAPER_L[sigma]       # sigma is positional
    assert impl.num_variants(sigma=sigma) == PAPER_L[sigma]        # q = 255 by default


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
@pytest.mark.parametrize("lam,q,L", [(0.5, 255, 255), (1.0, 255, 510), (1 / 510, 255, 1),
                                     (2.0, 4, 16), (0.25, 16, 8), (0.3, 10, 6),
                                     (0.1, 7, 1), (1.5, 1, 3), (0.866, 255, 441)])
def test_num_variants_lam(impl, lam, q, L):
    assert impl.num_variants(lam=lam, q=q) == L == int(2 * lam * q)


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
@pytest.mark.parametrize("q", [4, 16, 255])
@pytest.mark.parametrize("L", [1, 2, 3, 100])
def test_sigma_maps_by_the_exact_expression(impl, q, L):
    """lam = sigma / 3**-0.5, not sigma * 3**0.5: at sigma = L/(2q) * 3**-0.5 the two
    floor to different L (checked: every case here tells them apart), and the released
    code's expression gives L."""
    sigma = L / (2 * q) * 3 ** -0.5
    assert int(2 * (sigma * 3 ** 0.5) * q) == L - 1     # the other expression floors lower
    assert impl.num_variants(sigma=sigma, q=q) == L


@given(value=st.floats(1e-4, 20.0), q=st.integers(1, 1000), kind=st.sampled_from(["sigma", "lam"]))
def test_num_variants_formula(value, q, kind):
    lam = value / 3 ** -0.5 if kind == "sigma" else value
    expected = int(2 * lam * q)
    if expected < 1:
        with pytest.raises(ValueError):
            dk.num_variants(q=q, **{kind: value})
        with pytest.raises(ValueError):
            ref.num_variants(q=q, **{kind: value})
    else:
        assert dk.num_variants(q=q, **{kind: value}) == expected
        assert ref.num_variants(q=q, **{kind: value}) == expected


OFFSET_CASES = [(1, 1, 0), (5, 3, 0), (10, 1, 5), (784, 441, 0), (3072, 220, 1),
                (3072, 3091, 7), (64, 2, 12345), (100, 883, 2 ** 32 - 1), (150528, 132, 0)]


@pytest.mark.parametrize("impl", [dk, ref], ids=["dssn_kernels", "dssn_reference"])
@pytest.mark.parametrize("d,L,seed", OFFSET_CASES)
def test_split_offsets_are_numpy_randomstate(impl, d, L, seed):
    expected = np.random.RandomState(seed).randint(L, size=d).astype(np.int64)
    got = impl.split_offsets(d, L, seed)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == (d,)
    assert np.array_equal(got.numpy(), expected)


def test_split_offsets_default_seed_is_0():
    assert torch.equal(dk.split_offsets(50, 13), dk.split_offsets(50, 13, 0))
    assert torch.equal(dk.split_offsets(50, 13), ref.split_offsets(50, 13))
    assert not torch.equal(dk.split_offsets(50, 13, 0), dk.split_offsets(50, 13, 1))


def test_variants_use_the_offsets_of_the_flattened_image():
    """Offsets index the C-order flattening x.reshape(B, -1): variant t of pixel i is the
    noise of its level with split index (v_i + t) mod L, whatever the image's shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.uint8)
    flat = dk.variants(x.reshape(2, 60), L=9, seed=4)
    shaped = dk.variants(x, L=9, seed=4)
    assert torch.equal(shaped.reshape(2, 9, 60), flat)
    # and the reference, which shares no code, reads the offsets the same way
    assert torch.equal(shaped[:, :3], ref.variants(x, L=9, seed=4, stop=3))


# --- training noise -------------------------------------------------------------------

def matching_variants(sample_bits, all_variant_bits):
    """Indices t with variant t bitwise equal to the sample ([d] vs [L, d])."""
    eq = (all_variant_bits == sample_bits[None]).all(dim=1)
    return eq.nonzero().flatten().tolist()


@pytest.mark.parametrize("spec", [dict(L=5), dict(L=1), dict(sigma=0.25), dict(lam=0.1, q=16),
                                  dict(L=40, q=7)])
@pytest.mark.parametrize("seed", [0, 3])
def test_training_noise_is_one_of_the_variants(spec, seed):
    q = spec.get("q", 255)
    x = images(16, 40, q, seed=seed)
    g = torch.Generator().manual_seed(123)
    noisy = dk.training_noise(x, seed=seed, generator=g, **spec)
    assert noisy.dtype == torch.float32 and noisy.shape == x.shape
    V = dk.variants(x, seed=seed, **spec)
    for b in range(x.shape[0]):
        assert matching_variants(bits(noisy[b]), bits(V[b])), b


def test_training_noise_float_and_uint8_inputs_agree():
    x = images(8, 3 * 4 * 4, 255).view(8, 3, 4, 4)
    a = dk.training_noise(x, L=11, generator=torch.Generator().manual_seed(5))
    b = dk.training_noise(x.float() / 255, L=11, generator=torch.Generator().manual_seed(5))
    c = dk.training_noise(x.double() / 255, L=11, generator=torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 4, 4)
    assert torch.equal(bits(a), bits(b)) and torch.equal(bits(a), bits(c))


def test_training_noise_uses_the_offsets_of_its_seed():
    x = images(32, 40, 255)
    V4 = dk.variants(x, L=7, seed=4)
    noisy3 = dk.training_noise(x, L=7, seed=3, generator=torch.Generator().manual_seed(0))
    assert any(not matching_variants(bits(noisy3[b]), bits(V4[b])) for b in range(32))


def test_training_noise_deterministic_for_a_seeded_generator():
    x = images(16, 40, 255)
    runs = [dk.training_noise(x, sigma=0.5, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(bits(runs[0]), bits(runs[1]))
    other = dk.training_noise(x, sigma=0.5, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(bits(runs[0]), bits(other))
    g = torch.Generator().manual_seed(9)
    first, second = dk.training_noise(x, sigma=0.5, generator=g), dk.training_noise(x, sigma=0.5, generator=g)
    assert torch.equal(bits(first), bits(runs[0]))
    assert not torch.equal(bits(first), bits(second))      # the generator advances


def test_training_noise_global_rng_without_generator():
    x = images(16, 40, 255)
    torch.manual_seed(1)
    a = dk.training_noise(x, L=50)
    torch.manual_seed(1)
    b = dk.training_noise(x, L=50)
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("L", [2, 5, 7])
def test_training_noise_draws_every_variant(L):
    """Each sample's variant index covers all of 0..L-1 over many draws (the L variants of
    this image are pairwise distinct, so the index of a draw is unambiguous)."""
    x = images(1, 64, 255, seed=L)
    V = bits(dk.variants(x, L=L, seed=2)[0])
    assert len({tuple(v.tolist()) for v in V}) == L
    g = torch.Generator().manual_seed(0)
    batch = x.expand(40, -1)                      # 40 independent draws per call
    seen = []
    for _ in range(3):
        noisy = bits(dk.training_noise(batch, L=L, seed=2, generator=g))
        for row in noisy:
            (t,) = matching_variants(row, V)
            seen.append(t)
    assert set(seen) == set(range(L))
    counts = np.bincount(seen, minlength=L)
    assert counts.min() >= 120 / L / 4             # loose: nothing wildly skewed


@given(q=st.integers(1, 20), L=st.integers(1, 50), seed=st.integers(0, 2 ** 32 - 1),
       gseed=st.integers(0, 2 ** 31))
def test_property_training_noise_is_a_variant(q, L, seed, gseed):
    x = images(4, 8, q, seed=q + L)
    noisy = dk.training_noise(x, L=L, q=q, seed=seed, generator=torch.Generator().manual_seed(gseed))
    V = dk.variants(x, L=L, q=q, seed=seed)
    for b in range(4):
        assert matching_variants(bits(noisy[b]), bits(V[b]))
