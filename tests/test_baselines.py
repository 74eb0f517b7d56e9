"""Monte Carlo baselines (Yang et al. uniform noise, randomized SSN) on models whose
decision does not depend on the noise, where p and the radius are known analytically."""
import pytest
import torch
from scipy.stats import beta

from dssn_kernels.workflow.baselines import certify_ssn, certify_uniform, clopper_pearson_lower
from testkit import Constant

BASELINES = [certify_uniform, certify_ssn]


class Threshold(torch.nn.Module):
    """Class 1 iff pixel 0 >= t (> t when strict)."""
    def __init__(self, t, strict=False):
        super().__init__()
        self.t, self.strict = t, strict

    def forward(self, x):
        v = x.reshape(x.shape[0], -1)[:, 0]
        one = v > self.t if self.strict else v >= self.t
        return torch.stack([(~one).float(), one.float()], dim=1)


def all_votes_bound(n, alpha):
    """Lower end of the two-sided Clopper-Pearson interval at level 1 - alpha (Yang et al.'s
    convention) when all n votes agree: the alpha/2-quantile of Beta(n, 1), (alpha/2)**(1/n)."""
    return (alpha / 2) ** (1 / n)


@pytest.mark.parametrize("certify", BASELINES)
@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_constant_classifier(certify, sigma):
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cert = certify(Constant(2), x, sigma=sigma, n0=16, n=500, alpha=0.001, batch_size=64)
    lam = sigma / 3 ** -0.5
    p = all_votes_bound(500, 0.001)
    assert cert.prediction.tolist() == [2, 2, 2]
    assert cert.counts[:, 2].tolist() == [500] * 3 and int(cert.counts.sum()) == 1500
    assert cert.selection_counts[:, 2].tolist() == [16] * 3
    assert cert.p_lower.tolist() == pytest.approx([p] * 3, rel=1e-12)
    assert cert.radius.tolist() == pytest.approx([2 * lam * (p - 0.5)] * 3, rel=1e-12)


def test_threshold_far_from_pixel_uniform():
    """Pixel 0 at 0.9, threshold 0.5, lam = 0.2*sqrt(3) = 0.346 < 0.4: never crosses."""
    x = torch.zeros(2, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.9, 0.05])
    cert = certify_uniform(Threshold(0.5), x, sigma=0.2, n0=8, n=300, batch_size=50,
                           generator=torch.Generator().manual_seed(1))
    assert cert.prediction.tolist() == [1, 0]
    assert cert.counts.tolist() == [[0, 300], [300, 0]]
    lam = 0.2 / 3 ** -0.5
    assert cert.radius.tolist() == pytest.approx([2 * lam * (all_votes_bound(300, 0.001) - 0.5)] * 2,
                                                 rel=1e-12)


def test_threshold_ssn_extreme_pixels():
    """SSN maps x = 1 to the middle of the top split interval (>= 1/2) and x = 0 to the
    middle of the bottom one (<= 1/2), whatever the splits: the decision is noise-free
    (1/2 exactly when [0, 1] is not split, so the two sides use >= and >)."""
    x = torch.zeros(2, 1, 3, 3)
    x[0, 0, 0, 0] = 1.0
    for sigma in (0.1, 0.5, 2.0):
        for strict, image, cls in ((False, 0, 1), (True, 1, 0)):
            cert = certify_ssn(Threshold(0.5, strict), x[image:image + 1], sigma=sigma, n0=8,
                               n=200, batch_size=64, generator=torch.Generator().manual_seed(2))
            assert cert.counts[0, cls].item() == 200
            assert cert.prediction.tolist() == [cls]


def test_abstains_when_bound_below_half():
    """An exact 50/50 split (a model alternating by row) is not certified."""
    class Alternate(torch.nn.Module):
        def forward(self, x):
            idx = torch.arange(x.shape[0]) % 2
            return torch.nn.functional.one_hot(idx, 2).float()
    cert = certify_uniform(Alternate(), torch.rand(1, 4), sigma=0.5, n0=4, n=100, batch_size=10)
    assert cert.prediction.tolist() == [-1]
    assert cert.radius.tolist() == [0.0]
    assert cert.p_lower.item() < 0.5


@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.001), (50, 100, 0.01), (99990, 100000, 0.001),
                                       (100000, 100000, 0.001), (5, 64, 0.05), (0, 10, 0.001)])
def test_clopper_pearson_matches_scipy_beta(k, n, alpha):
    # Yang et al.'s bound, statsmodels' proportion_confint(k, n, alpha=alpha, method="beta")[0],
    # is the alpha/2-quantile of Beta(k, n-k+1); two scipy routes to it differ in the last
    # bits, so this compares to 1e-9 relative
    expected = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expected, rel=1e-9, abs=0)


def test_two_sided_at_alpha_not_cohen():
    """The bound is the two-sided interval at alpha (Yang et al.), which is Cohen et al.'s
    one-sided bound at alpha/2: below Cohen's one-sided bound at alpha."""
    assert clopper_pearson_lower(99_000, 100_000, 0.001) == pytest.approx(
        beta.ppf(0.0005, 99_000, 1001), rel=1e-9)
    assert clopper_pearson_lower(99_000, 100_000, 0.001) < beta.ppf(0.001, 99_000, 1001)


def test_uniform_threshold_partial_crossing():
    """Pixel 0 at 0.5, threshold 0.5 + lam/2: x + U(-lam, lam) >= t with p = 1/4, so class 0
    wins with p_A = 3/4; p_lower is the bound of the top class's count, radius 2 lam (p - 1/2)."""
    sigma, n = 0.1, 4000
    lam = sigma / 3 ** -0.5
    x = torch.full((1, 1, 2, 2), 0.5)
    cert = certify_uniform(Threshold(0.5 + lam / 2), x, sigma=sigma, n0=64, n=n,
                           batch_size=512, generator=torch.Generator().manual_seed(3))
    k = int(cert.counts[0, 0])
    assert int(cert.counts.sum()) == n and abs(k / n - 0.75) < 0.04
    p = clopper_pearson_lower(k, n, 0.001)
    assert cert.prediction.tolist() == [0]
    assert cert.p_lower.item() == p and cert.radius.item() == pytest.approx(2 * lam * (p - 0.5))


@pytest.mark.parametrize("certify", BASELINES)
@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma must be a positive"),
    (dict(sigma=-1.0), "sigma must be a positive"),
    (dict(sigma=0.5, n0=0), "n0 must be a positive int"),
    (dict(sigma=0.5, n=2.5), "n must be a positive int"),
    (dict(sigma=0.5, alpha=0.7), "alpha must be a float in"),
    (dict(sigma=0.5, batch_size=0), "batch_size must be a positive int"),
])
def test_bad_arguments(certify, kwargs, match):
    with pytest.raises(ValueError, match=match):
        certify(Constant(0), torch.rand(1, 4), **kwargs)


@pytest.mark.parametrize("certify", BASELINES)
def test_bad_images(certify):
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        certify(Constant(0), torch.full((1, 4), 1.5), sigma=0.5)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        certify(Constant(0), torch.full((1, 4), float("nan")), sigma=0.5)
    with pytest.raises(TypeError, match="float pixels"):
        certify(Constant(0), torch.zeros((1, 4), dtype=torch.uint8), sigma=0.5)


@pytest.mark.parametrize("certify", BASELINES)
def test_model_in_training_mode_is_refused(certify):
    """As for DSSN: a batch-norm or dropout layer in training mode would make the votes
    depend on the batch and update the running statistics; refused before any forward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        model[2].running_mean.normal_()
    before = model[2].running_mean.clone()
    with pytest.raises(ValueError, match=r"module '2' \(BatchNorm1d\).*call model\.eval\(\)"):
        certify(model, torch.rand(2, 4), sigma=0.5, n0=4, n=8)
    assert torch.equal(model[2].running_mean.view(torch.int32), before.view(torch.int32))
    assert int(model[2].num_batches_tracked) == 0 and model.training
    cert = certify(model.eval(), torch.rand(2, 4), sigma=0.5, n0=4, n=8)
    assert int(cert.counts.sum()) == 16
    assert torch.equal(model[2].running_mean.view(torch.int32), before.view(torch.int32))


def test_sigma_lambda_conversions_are_the_released_expressions():
    """spec.lam_from_sigma is the released code's float64 ``sigma / 3**-0.5`` bit for bit
    (not sigma * 3**0.5, which differs for some sigma), sigma_from_lam ``lam * 3**-0.5``;
    every sigma <-> lambda conversion of the package goes through them."""
    import numpy as np

    import dssn_kernels as dk
    rng = np.random.default_rng(0)
    sigmas = [0.12, 0.25, 0.5, 1.0, 3.5, 1 / 3, *(0.01 + rng.random(2000)).tolist()]
    differs = 0
    for s in sigmas:
        assert dk.lam_from_sigma(s) == s / 3 ** -0.5
        assert dk.sigma_from_lam(s) == s * 3 ** -0.5
        differs += dk.lam_from_sigma(s) != s * 3 ** 0.5
        assert dk.num_variants(s, q=255) == int(2 * (s / 3 ** -0.5) * 255)
    assert differs > 0          # the expression matters
    assert dk.lam_from_sigma(1) == 1 / 3 ** -0.5     # an int sigma (the baselines accept one)
