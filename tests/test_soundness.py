"""Soundness by brute force: every quantized x' within the certified L1 radius of x gets
the same smoothed prediction as x, on tiny models where the whole grid is enumerable."""
import itertools

import pytest
import torch

import dssn_kernels as dk
import dssn_reference as ref
from conftest import CPU_BACKENDS
from testkit import IntegerLinear

CASES = [  # (q, d, Ls) in both regimes: L < q (lambda < 0.5) and L >= q
    (2, 4, [1, 2, 3, 5]),
    (3, 3, [1, 2, 3, 4, 7]),
    (4, 3, [2, 4, 5, 9]),
    (6, 2, [1, 3, 6, 7, 12, 20]),
]


@pytest.mark.parametrize("q,d,Ls", CASES)
@pytest.mark.parametrize("model_seed", [0, 1, 2])
def test_certificate_sound_on_whole_grid(q, d, Ls, model_seed):
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    dist = (grid[:, None, :].long() - grid[None, :, :].long()).abs().sum(-1)
    model = IntegerLinear(d, 3, q, seed=model_seed, bias_scale=1)
    nontrivial = 0
    for L in Ls:
        cert = dk.certify(model, grid, L=L, q=q, seed=model_seed)
        assert torch.equal(cert.counts.sum(1), torch.full((len(grid),), L))
        assert torch.equal(cert.radius, cert.steps.double() / q)
        within = dist <= cert.steps[:, None]                         # x' within radius of x
        same = cert.prediction[:, None] == cert.prediction[None, :]
        assert bool(same[within].all()), (q, L)
        nontrivial += int((cert.steps > 0).sum())
    assert nontrivial > 0  # the test certified something


@pytest.mark.parametrize("q,d,L", [(3, 3, 2), (4, 2, 9), (6, 2, 7)])
def test_matches_reference_certify(q, d, L):
    grid = torch.tensor(list(itertools.product(range(q + 1), repeat=d)), dtype=torch.uint8)
    model = IntegerLinear(d, 4, q, seed=5, bias_scale=1)
    expected = ref.certify(model, grid, L=L, q=q, seed=2)
    for backend in CPU_BACKENDS:
        got = dk.certify(model, grid, L=L, q=q, seed=2, backend=backend, batch_size=5)
        assert torch.equal(got.counts, expected.counts)
        assert torch.equal(got.prediction, expected.prediction)
        assert torch.equal(got.steps, expected.steps)
        assert torch.equal(got.radius, expected.radius)
