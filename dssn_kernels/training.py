"""Noise for training base classifiers: one uniformly random DSSN variant per sample,
with the same offsets and values as certification, or the Monte Carlo methods' noises
(noises.py: independent SSN, uniform); and the stability training loss."""
from __future__ import annotations

import torch

from .checks import check_generator, check_noise, check_q, check_seed
from .inputs import to_levels
from .noises import ssn_noise, uniform_noise
from .ops.expand import cached_value_table, noise_numerator
from .spec import lam_from_sigma, offsets, resolve_num_variants


def training_noise(x, *, sigma=None, lam=None, L=None, q=255, seed=0, generator=None,
                   noise="dssn"):
    """x [B, ...] (float on the k/q grid or integer levels) -> float32 [B, ...].

    ``noise="dssn"``: each sample replaced by its variant t_b, t_b uniform in 0..L-1
    (drawn with ``generator``). ``"ssn"`` / ``"uniform"``: noises.ssn_noise /
    uniform_noise of the pixels k/q at the continuous lambda (sigma or lam; ``L`` and
    ``seed`` are not used), the very functions the Monte Carlo certifiers sample."""
    q = check_q(q)
    if check_noise(noise) != "dssn":
        if (sigma is None) == (lam is None):
            raise ValueError(f"the {noise} noise needs exactly one of sigma, lam")
        lam_ = float(lam_from_sigma(sigma) if sigma is not None else lam)
        if not lam_ > 0:
            raise ValueError(f"sigma / lam must be positive, got {sigma if lam is None else lam!r}")
        generator = check_generator(generator)
        pixels = to_levels(x, q).float() / q
        if generator is not None and generator.device != pixels.device:
            pixels = pixels.to(generator.device)
        draw = ssn_noise if noise == "ssn" else uniform_noise
        return draw(pixels, lam_, generator=generator).to(x.device).view(x.shape)
    L = resolve_num_variants(sigma, lam, q, L)
    seed, generator = check_seed(seed), check_generator(generator)
    levels = to_levels(x, q)
    B, d = levels.shape
    split = offsets(d, L, seed).to(levels.device)
    t = torch.randint(L, (B, 1), generator=generator,
                      device=generator.device if generator is not None else "cpu")
    j = (split[None, :] + t.to(levels.device)) % L
    m = noise_numerator(levels.long(), j, L, q)
    return cached_value_table(q, levels.device)[m].view(x.shape)


def stability_loss(logits1, logits2, y, weight=6.0):
    """Stability training (Li et al. 2019, as in Yang et al.'s code): cross-entropy of the
    first draw plus ``weight`` times KL(softmax(logits1) || softmax(logits2)), both
    averaged over the batch; gradients flow through both logits."""
    logp1 = torch.log_softmax(logits1, dim=1)
    logp2 = torch.log_softmax(logits2, dim=1)
    ce = torch.nn.functional.nll_loss(logp1, y)
    kl = (logp1.exp() * (logp1 - logp2)).sum(dim=1).mean()
    return ce + weight * kl
