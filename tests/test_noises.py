"""The training noises (dssn_kernels/noises.py) against the paper's formulas: the split
structure draw by draw, and the marginal distribution of a noised pixel by statistical
tests with fixed seeds that a wrong formula fails; training and the Monte Carlo
certifiers draw from the same functions."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, kstest

import dssn_kernels as dk
from dssn_kernels.noises import ssn_noise, uniform_noise
from dssn_kernels.workflow import baselines


def ssn_oracle(x: float, s: float, lam: float) -> float:
    """The paper's independent SSN written from its description: the split grid
    {s + 2 lam k} clipped to [0, 1] cuts [0, 1] into sub-intervals; the noised pixel is
    the centre of the one holding x (a point s + 2 lam k equal to x closes the interval
    on its right: x in (a, b])."""
    if lam >= 0.5:   # eq. 7: at most two sub-intervals
        return ((1.0 if x > s else 0.0) + min(s, 1.0)) / 2
    cuts = [s + 2 * lam * k for k in range(-2, int(1 / (2 * lam)) + 3)]
    cuts = [c for c in cuts if 0 < c < 1]
    edges = [0.0] + cuts + [1.0]
    for a, b in zip(edges[:-1], edges[1:]):
        if (a < x <= b) or (x == 0 and a == 0):
            return (a + b) / 2
    raise AssertionError("x outside [0, 1]")


@pytest.mark.parametrize("lam", [0.07, 0.23, 0.5, 0.8, 1.7])
def test_ssn_split_structure_draw_by_draw(lam):
    """Each output is the centre of the sub-interval that holds x, for the very split
    s = 2 lam u the function drew (u: the generator's uniforms)."""
    x = torch.linspace(0, 1, 41).repeat(50)
    out = ssn_noise(x, lam, generator=torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    s = (u * (2 * lam)).double()
    want = torch.tensor([ssn_oracle(float(a), float(b), lam) for a, b in zip(x, s)],
                        dtype=torch.float64)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), want, atol=2e-6)
    # the structure: within lam of x (a sub-interval of length <= 2 lam holds x), in [0, 1]
    assert bool(((out - x).abs() <= lam + 1e-6).all())
    assert out.min() >= 0 and out.max() <= 1


def _wrong_ssn(x, lam, generator):
    """A plausible mistake: the lower end not clipped at 0 (centres below x's interval)."""
    s = torch.rand(x.shape, generator=generator) * 2 * lam
    c = torch.ceil((x - s) / (2 * lam))
    return (torch.clamp(2 * lam * c + s, max=1.0) + (2 * lam * (c - 1) + s)) / 2


@pytest.mark.parametrize("lam,x0", [(0.12, 0.15), (0.12, 0.95), (0.3, 0.5), (0.8, 0.3), (1.7, 0.6)])
def test_ssn_marginal_matches_the_paper(lam, x0):
    """The noised pixel's distribution equals the oracle's with independently drawn
    splits s ~ U(0, 2 lam) (two-sample KS, fixed seeds); a wrong formula is rejected."""
    n = 20_000
    got = ssn_noise(torch.full((n,), x0), lam, generator=torch.Generator().manual_seed(11))
    rng = np.random.default_rng(5)
    ref = np.array([ssn_oracle(x0, s, lam) for s in rng.uniform(0, 2 * lam, n)])
    assert ks_2samp(got.numpy(), ref).pvalue > 1e-3
    if lam < 0.5 and x0 < 2 * lam:   # the wrong lower end shows near 0
        bad = _wrong_ssn(torch.full((n,), x0), lam, torch.Generator().manual_seed(11))
        assert ks_2samp(bad.numpy(), ref).pvalue < 1e-6
    # a split range of half the width (s ~ U(0, lam)) is rejected as well
    half = ssn_noise(torch.full((n,), x0), lam / 2, generator=torch.Generator().manual_seed(11))
    assert ks_2samp(half.numpy(), ref).pvalue < 1e-6


def test_ssn_large_lambda_atoms():
    """lam >= 1/2: x~ = min(s, 1)/2 when x <= s, (1 + s)/2 when x > s: the atom at 1/2 has
    probability 1 - 1/(2 lam) and the values above 1/2 probability x/(2 lam)."""
    n, lam, x0 = 40_000, 0.8, 0.3
    got = ssn_noise(torch.full((n,), x0), lam, generator=torch.Generator().manual_seed(2))
    atom = float((got == 0.5).float().mean())
    above = float((got > 0.5).float().mean())
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(atom - (1 - 1 / (2 * lam))) < tol
    assert abs(above - x0 / (2 * lam)) < tol


@pytest.mark.parametrize("lam", [0.1, 0.9])
def test_uniform_marginal(lam):
    n, x0 = 20_000, 0.05
    got = uniform_noise(torch.full((n,), x0), lam, generator=torch.Generator().manual_seed(1))
    assert got.min() < 0   # not clipped
    assert kstest(got.numpy(), "uniform", args=(x0 - lam, 2 * lam)).pvalue > 1e-3
    narrow = uniform_noise(torch.full((n,), x0), lam / 2, generator=torch.Generator().manual_seed(1))
    assert kstest(narrow.numpy(), "uniform", args=(x0 - lam, 2 * lam)).pvalue < 1e-6


@pytest.mark.parametrize("noise,fn", [("ssn", ssn_noise), ("uniform", uniform_noise)])
def test_training_noise_is_the_certifiers_sampler(noise, fn):
    """training_noise(noise=...) of levels k/q, and the Monte Carlo certifier's fill, are
    the same function of the generator's draws."""
    q, sigma = 16, 0.4
    lam = dk.lam_from_sigma(sigma)
    levels = torch.randint(0, q + 1, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    t = dk.training_noise(levels, sigma=sigma, q=q, noise=noise,
                          generator=torch.Generator().manual_seed(7))
    assert t.shape == levels.shape and t.dtype == torch.float32
    want = fn(levels.float() / q, lam, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t, want)
    t2 = dk.training_noise(levels.float() / q, lam=lam, q=q, noise=noise,
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(t2, want)
    flat = (levels.float() / q).reshape(3, 1, -1)
    out = torch.empty(3, 1, 16)
    fill = baselines._ssn_noise if noise == "ssn" else baselines._uniform_noise
    fill(out, flat, lam, torch.Generator().manual_seed(7))
    assert torch.equal(out, want.reshape(3, 1, -1))


def test_training_noise_refusals():
    from dssn_kernels import checks, noises
    # the check lives in checks.py with the others; noises.py still names it
    assert noises.check_noise is checks.check_noise and noises.NOISES is checks.NOISES
    assert dk.NOISES == ("dssn", "ssn", "uniform")
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="noise must be one of"):
        dk.training_noise(x, sigma=0.5, q=16, noise="gauss")
    with pytest.raises(ValueError, match="exactly one of sigma, lam"):
        dk.training_noise(x, L=8, q=16, noise="ssn")
    # the default is today's DSSN noise
    g = torch.Generator().manual_seed(0)
    a = dk.training_noise(x, sigma=0.5, q=16, generator=g)
    b = dk.training_noise(x, sigma=0.5, q=16, noise="dssn", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
