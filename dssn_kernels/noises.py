"""The randomized smoothing noises of the paper's comparison, written once: training
(``training.training_noise``) and the Monte Carlo certifiers (workflow/baselines.py)
both draw from these functions, so a model is certified under exactly the distribution
it was trained on.

* ``uniform_noise``: Yang et al. (2020), x + U(-lam, lam)^d (not clipped).
* ``ssn_noise``: randomized SSN with independent splits (Levine & Feizi, Theorem 2, the
  general case, eqs. 26-28): per pixel s_i ~ U(0, 2 lam) independently, and

      c_i = ceil((x_i - s_i) / (2 lam))
      x~_i = (min(2 lam c_i + s_i, 1) + max(2 lam (c_i - 1) + s_i, 0)) / 2,

  the centre of the sub-interval of the split grid {s_i + 2 lam k} (clipped to [0, 1])
  that holds x_i. For lam >= 1/2 this is (1[x_i > s_i] + min(s_i, 1)) / 2 (eq. 7).

``NOISES`` names the training noises: "dssn" (one DSSN variant per image,
``training.training_noise``), "ssn" and "uniform"; it and ``check_noise`` live in
checks.py with the other argument checks and are imported here for the callers that
name them from this module.
"""
from __future__ import annotations

import torch

from .checks import NOISES, check_noise


def _out_for(x: torch.Tensor, out):
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return out


def uniform_noise(x: torch.Tensor, lam: float, *, generator=None, out=None) -> torch.Tensor:
    """x + U(-lam, lam) per pixel, independently (float32; ``x`` broadcasts to ``out``)."""
    out = _out_for(x, out)
    torch.rand(out.shape, generator=generator, out=out, device=out.device)
    return out.mul_(2 * lam).sub_(lam).add_(x)


def ssn_noise(x: torch.Tensor, lam: float, *, generator=None, out=None) -> torch.Tensor:
    """Independent SSN (eqs. 26-28): float32, ``x`` (pixels in [0, 1]) broadcasts to ``out``."""
    out = _out_for(x, out)
    two_lam = 2 * lam
    torch.rand(out.shape, generator=generator, out=out, device=out.device)
    s = out.mul_(two_lam)
    c = torch.ceil((x - s) / two_lam)
    upper = torch.clamp(two_lam * c + s, max=1.0)
    lower = torch.clamp(two_lam * (c - 1) + s, min=0.0)
    return torch.mul(upper + lower, 0.5, out=out)


__all__ = ["NOISES", "check_noise", "ssn_noise", "uniform_noise"]
