"""Noise for training base classifiers: one uniformly random DSSN variant per sample,
with the same offsets and values as certification."""
from __future__ import annotations

import torch

from .checks import check_generator, check_q, check_seed
from .inputs import to_levels
from .ops.expand import cached_value_table, noise_numerator
from .spec import offsets, resolve_num_variants


def training_noise(x, *, sigma=None, lam=None, L=None, q=255, seed=0, generator=None):
    """x [B, ...] (float on the k/q grid or integer levels) -> float32 [B, ...], each
    sample replaced by its variant t_b, t_b uniform in 0..L-1 (drawn with ``generator``)."""
    q = check_q(q)
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
