"""The key lemma (Corollary 1), exhaustively on tiny inputs: for quantized x, x', at
most q * ||x - x'||_1 of the L variants differ."""
import itertools

import pytest
import torch

import dssn_kernels as dk


@pytest.mark.parametrize("q,d,Ls", [
    (1, 3, [1, 2, 3]),
    (2, 3, [1, 2, 3, 4, 5]),
    (3, 2, [1, 2, 3, 4, 7]),
    (4, 2, [1, 3, 4, 5, 9]),
    (6, 2, [2, 5, 6, 7, 13]),
])
def test_at_most_q_l1_variants_differ(q, d, Ls):
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    dist = (grid[:, None, :].long() - grid[None, :, :].long()).abs().sum(-1)   # steps
    for L in Ls:
        for seed in (0, 1):
            v = dk.variants(grid, L=L, q=q, seed=seed)                        # [N, L, d]
            differ = (v[:, None] != v[None, :]).any(-1).sum(-1)                  # [N, N]
            assert bool((differ <= dist).all()), (q, L, seed)
            # the bound is attained for some pair: it is the tight Lipschitz constant
            if L >= q:
                assert bool((differ == dist)[dist == 1].any())
