"""Smoothing parameters: sigma/lambda -> number of variants L, the split offsets, and
the float value table. These conventions match the paper's released code, so a model
trained there with seed s certifies here with seed s."""
from __future__ import annotations

import numpy as np
import torch

from .checks import _int_at_least, check_q, check_seed

# q + L must stay below this for the kernels' division-free floor (csrc/dssn_noise.h).
MAX_LEVELS_PLUS_VARIANTS = 1 << 21


def _check_levels_plus_variants(q: int, L: int) -> None:
    if q + L > MAX_LEVELS_PLUS_VARIANTS:
        raise ValueError(f"q + L = {q + L} exceeds the supported {MAX_LEVELS_PLUS_VARIANTS}")


def lam_from_sigma(sigma):
    """lambda for the noise standard deviation sigma: ``sigma / 3**-0.5``, the released
    code's expression, evaluated in float64 exactly so (it rounds differently from
    ``sigma * 3**0.5`` for some sigma, and L = int(2*lambda*q) can then differ by one).
    The standard deviation of U(-lambda, lambda) is lambda/sqrt(3)."""
    return sigma / 3 ** -0.5


def sigma_from_lam(lam):
    """The noise standard deviation for the splitting half-period lambda:
    ``lam * 3**-0.5`` (the value the workflow reports for a spec given as lambda)."""
    return lam * 3 ** -0.5


def num_variants(sigma=None, *, lam=None, q=255) -> int:
    """L = int(2 * lam * q) with lam = lam_from_sigma(sigma) = sigma / 3**-0.5 (the
    released code's mapping).

    Give exactly one of ``sigma`` (the noise standard deviation) and ``lam`` (the
    splitting half-period lambda). Raises ValueError if L < 1.
    """
    return _num_variants(sigma, lam, check_q(q))


def _num_variants(sigma, lam, q: int) -> int:
    """num_variants for a checked q."""
    if (sigma is None) == (lam is None):
        raise ValueError("give exactly one of sigma and lam "
                         f"(got sigma={sigma!r}, lam={lam!r})")
    name, value = ("sigma", sigma) if sigma is not None else ("lam", lam)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    lam_ = lam_from_sigma(value) if sigma is not None else value
    if not np.isfinite(2 * lam_ * q):    # int() of it would raise OverflowError
        raise ValueError(f"{name}={value} gives L = int(2*lambda*q) = inf variants at q={q}: "
                         f"q + L exceeds the supported {MAX_LEVELS_PLUS_VARIANTS}")
    L = int(2 * lam_ * q)
    if L < 1:
        raise ValueError(
            f"{name}={value} gives L = int(2*lambda*q) = {L} variants at q={q}: "
            f"need lambda >= 1/(2q) = {1 / (2 * q):.6g} "
            f"(sigma >= {sigma_from_lam(1 / (2 * q)):.6g})")
    _check_levels_plus_variants(q, L)
    return L


def resolve_num_variants(sigma=None, lam=None, q=255, num_variants_=None) -> int:
    """L from sigma, lam, or an explicit L (exactly one of the three); ``q`` already
    checked (checks.check_q): the entry points check it first."""
    given = [v is not None for v in (sigma, lam, num_variants_)]
    if sum(given) != 1:
        raise ValueError("give exactly one of sigma, lam and L "
                         f"(got sigma={sigma!r}, lam={lam!r}, L={num_variants_!r})")
    if num_variants_ is None:
        return _num_variants(sigma, lam, q)
    L = num_variants_
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"L must be an int, got {type(L).__name__}")
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    _check_levels_plus_variants(q, L)
    return int(L)


def split_offsets(dim, num_variants, seed=0) -> torch.Tensor:
    """Per-pixel offsets v = numpy.random.RandomState(seed).randint(L, size=dim), int64."""
    return offsets(_int_at_least("dim", dim, 1, "a positive int"),
                   _int_at_least("num_variants", num_variants, 1, "a positive int"),
                   check_seed(seed))


def offsets(dim: int, L: int, seed: int) -> torch.Tensor:
    """split_offsets for checked arguments (the entry points checked the seed)."""
    rs = np.random.RandomState(seed)
    return torch.from_numpy(rs.randint(L, size=dim).astype(np.int64))


# Largest q for which rounding m/(4q) to float32 and then to the dtype (what every kernel
# does) equals rounding it directly: m/(4q) differs from a rounding boundary of a p-bit
# format by at least 2^-(p+1)/(4q) relative, which must exceed float32's 2^-24.
MAX_Q_FOR_DTYPE = {torch.float32: 1 << 21, torch.float16: 1023, torch.bfloat16: 8191}


def check_value_dtype(q: int, dtype: torch.dtype) -> None:
    limit = MAX_Q_FOR_DTYPE.get(dtype)
    if limit is None:
        raise TypeError(f"variants are float32, float16 or bfloat16, got {dtype}")
    if q > limit:
        raise ValueError(f"{dtype} cannot hold the noised values m/(4q) exactly rounded for "
                         f"q={q} (at most q={limit}); use float32")


def value_table(q: int, dtype=torch.float32) -> torch.Tensor:
    """The 4q+1 noised values m/(4q), each the nearest value of ``dtype``: built in
    float64 (correctly rounded division), rounded once to float32 (no double-rounding
    error: m/(4q) is never within 2^-35 relative of a float32 rounding boundary), then,
    for float16/bfloat16, rounded to nearest-even (exact for q <= MAX_Q_FOR_DTYPE)."""
    check_value_dtype(q, dtype)
    m = torch.arange(4 * q + 1, dtype=torch.float64)
    return (m / (4 * q)).to(torch.float32).to(dtype)
