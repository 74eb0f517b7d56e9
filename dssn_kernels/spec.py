"""Smoothing parameters: sigma/lambda -> number of variants L, the split offsets, and
the float value table. These conventions match the paper's released code, so a model
trained there with seed s certifies here with seed s."""
from __future__ import annotations

import numpy as np
import torch

# q + L must stay below this for the kernels' division-free floor (csrc/dssn_noise.h).
MAX_LEVELS_PLUS_VARIANTS = 1 << 21


def _check_q(q) -> int:
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)):
        raise TypeError(f"q must be an int (number of quantization steps), got {type(q).__name__}")
    if q < 1:
        raise ValueError(f"q must be >= 1 (pixels are k/q, k = 0..q), got q={q}")
    return int(q)


def _check_levels_plus_variants(q: int, L: int) -> None:
    if q + L > MAX_LEVELS_PLUS_VARIANTS:
        raise ValueError(f"q + L = {q + L} exceeds the supported {MAX_LEVELS_PLUS_VARIANTS}")


def num_variants(sigma=None, *, lam=None, q=255) -> int:
    """L = int(2 * lam * q) with lam = sigma / 3**-0.5 (the released code's mapping).

    Give exactly one of ``sigma`` (the noise standard deviation) and ``lam`` (the
    splitting half-period lambda). Raises ValueError if L < 1.
    """
    q = _check_q(q)
    if (sigma is None) == (lam is None):
        raise ValueError("give exactly one of sigma and lam "
                         f"(got sigma={sigma!r}, lam={lam!r})")
    name, value = ("sigma", sigma) if sigma is not None else ("lam", lam)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    lam_ = value / 3 ** -0.5 if sigma is not None else value
    L = int(2 * lam_ * q)
    if L < 1:
        raise ValueError(
            f"{name}={value} gives L = int(2*lambda*q) = {L} variants at q={q}: "
            f"need lambda >= 1/(2q) = {1 / (2 * q):.6g} (sigma >= {3 ** -0.5 / (2 * q):.6g})")
    _check_levels_plus_variants(q, L)
    return L


def resolve_num_variants(sigma=None, lam=None, q=255, num_variants_=None) -> int:
    """L from sigma, lam, or an explicit L (exactly one of the three)."""
    given = [v is not None for v in (sigma, lam, num_variants_)]
    if sum(given) != 1:
        raise ValueError("give exactly one of sigma, lam and L "
                         f"(got sigma={sigma!r}, lam={lam!r}, L={num_variants_!r})")
    if num_variants_ is None:
        return num_variants(sigma, lam=lam, q=q)
    q = _check_q(q)
    L = num_variants_
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"L must be an int, got {type(L).__name__}")
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    _check_levels_plus_variants(q, L)
    return int(L)


def check_seed(seed) -> int:
    """The split seed as an int in 0..2**32-1 (TypeError/ValueError otherwise).

    seed=None would make numpy seed from the OS: offsets (and certificates) that change
    from call to call. The seed is part of the smoothed classifier, so it is required."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in 0..2**32-1, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in 0..2**32-1, got {seed}")
    return int(seed)


def split_offsets(dim, num_variants, seed=0) -> torch.Tensor:
    """Per-pixel offsets v = numpy.random.RandomState(seed).randint(L, size=dim), int64."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be a positive int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(num_variants, bool) or not isinstance(num_variants, (int, np.integer)):
        raise TypeError(f"num_variants must be a positive int, got {type(num_variants).__name__}")
    if num_variants < 1:
        raise ValueError(f"num_variants must be a positive int, got {num_variants!r}")
    rs = np.random.RandomState(check_seed(seed))
    return torch.from_numpy(rs.randint(int(num_variants), size=int(dim)).astype(np.int64))


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
