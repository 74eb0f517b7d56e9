"""Monte Carlo certification baselines, on the same chunked pipeline and vote kernels as
DSSN so that timings compare like with like.

* ``certify_uniform``: Yang et al. (2020), additive uniform noise U(-lam, lam)^d.
* ``certify_ssn``: randomized SSN with independent splits (Levine & Feizi, eqs. 27-28).

Both draw their noise from dssn_kernels/noises.py, the functions training uses.

Both follow Yang et al.'s certification (Cohen et al.'s CERTIFY with their bound): the
top class is the argmax of n0 votes, and p_A is bounded below by the lower end of the
two-sided Clopper-Pearson (exact, "beta") interval at level 1 - alpha from n fresh votes,
exactly as their code does with statsmodels' ``proportion_confint(nA, n, alpha=alpha,
method="beta")[0]`` (``certify_prob_lb`` in Yang et al.'s rs4a), computed here with scipy:
the alpha/2-quantile of Beta(nA, n - nA + 1). (Cohen et al.'s code passes 2*alpha instead,
a one-sided bound at confidence 1 - alpha; Yang et al.'s is slightly more conservative.)
The L1 radius is 2*lam*(p_lower - 1/2) with lam = spec.lam_from_sigma(sigma) =
sigma / 3**-0.5; the image is not certified (prediction -1, radius 0) when p_lower <= 1/2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import binomtest

from ..backends import resolve_backend
from ..checks import check_batch_size, check_eval_mode, check_generator
from ..noises import ssn_noise, uniform_noise
from ..pipeline import ModelCall, run_votes
from ..spec import lam_from_sigma

ABSTAIN = -1


@dataclass
class MonteCarloCertificate:
    """prediction LongTensor[B] (-1: not certified), radius float64 [B] (L1, [0, 1]
    scale), p_lower float64 [B], counts LongTensor[B, K] (the n estimation votes)."""
    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    selection_counts: torch.Tensor


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """Lower end of the two-sided exact (Clopper-Pearson) interval at level 1 - alpha on a
    binomial proportion: statsmodels' ``proportion_confint(successes, trials, alpha=alpha,
    method="beta")[0]`` as in Yang et al.'s code, = Beta(k, n-k+1).ppf(alpha / 2)."""
    if successes == 0:
        return 0.0
    return float(binomtest(successes, trials).proportion_ci(
        confidence_level=1 - alpha, method="exact").low)


def _check_args(x, sigma, n0, n, alpha):
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a tensor [B, ...] holding at least one image")
    if not x.is_floating_point():
        raise TypeError(f"x must hold float pixels in [0, 1], got {x.dtype}")
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise ValueError("x must hold finite pixels in [0, 1]")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    for name, v in (("n0", n0), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(alpha, float) or not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be a float in (0, 0.5), got {alpha!r}")


def _certify_mc(model, x, noise, *, sigma, n0, n, alpha, batch_size, generator, progress, desc,
                compile=False, autocast=None):
    _check_args(x, sigma, n0, n, alpha)
    batch_size = check_batch_size(batch_size)
    generator = check_generator(generator)
    call = ModelCall.checked(autocast=autocast, compile=compile)
    check_eval_mode(model)
    backend = resolve_backend("auto", x.device)
    lam = lam_from_sigma(sigma)
    flat = x.reshape(x.shape[0], -1).float()
    shape = tuple(x.shape[1:])

    def fill(out, b, t):
        noise(out, flat[b:b + out.shape[0], None, :], lam, generator)

    def votes(per_image, num_classes=None):
        return run_votes(model, fill, num_images=x.shape[0], per_image=per_image, shape=shape,
                         batch_size=batch_size, backend=backend, device=x.device,
                         num_classes=num_classes, progress=progress, desc=desc, call=call)

    selection = votes(n0)
    counts = votes(n, selection.shape[1])
    top = selection.argmax(dim=1)
    n_top = counts.gather(1, top[:, None])[:, 0].tolist()
    p_lower = torch.tensor([clopper_pearson_lower(k, n, alpha) for k in n_top],
                           dtype=torch.float64)
    certified = p_lower > 0.5
    prediction = torch.where(certified, top.cpu(), torch.full_like(top.cpu(), ABSTAIN))
    radius = torch.where(certified, 2 * lam * (p_lower - 0.5), torch.zeros_like(p_lower))
    return MonteCarloCertificate(prediction, radius, p_lower, counts.cpu(), selection.cpu())


def _uniform_noise(out, x, lam, generator):
    uniform_noise(x, lam, generator=generator, out=out)


def _ssn_noise(out, x, lam, generator):
    ssn_noise(x, lam, generator=generator, out=out)


def certify_uniform(model, x, *, sigma, n0=64, n=100_000, alpha=0.001, batch_size=None,
                    generator=None, progress=False, compile=False,
                    autocast=None) -> MonteCarloCertificate:
    """Yang et al. (2020) uniform-noise L1 certificate by Monte Carlo (n0 + n forwards).
    ``compile``, ``autocast``: how the model runs, as in dk.certify (compiled once for the
    workspace's shape, shared by the selection and estimation passes)."""
    return _certify_mc(model, x, _uniform_noise, sigma=sigma, n0=n0, n=n, alpha=alpha,
                       batch_size=batch_size, generator=generator, progress=progress,
                       desc="uniform", compile=compile, autocast=autocast)


def certify_ssn(model, x, *, sigma, n0=64, n=100_000, alpha=0.001, batch_size=None,
                generator=None, progress=False, compile=False,
                autocast=None) -> MonteCarloCertificate:
    """Randomized SSN (independent splits) L1 certificate by Monte Carlo (``compile``,
    ``autocast`` as in certify_uniform)."""
    return _certify_mc(model, x, _ssn_noise, sigma=sigma, n0=n0, n=n, alpha=alpha,
                       batch_size=batch_size, generator=generator, progress=progress,
                       desc="ssn", compile=compile, autocast=autocast)
