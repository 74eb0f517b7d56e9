"""Stability training's loss (Li et al. 2019, as in Yang et al.'s code) against a case
computed by hand."""
import math

import pytest
import torch

import dssn_kernels as dk


def test_stability_loss_by_hand():
    # one image, two classes; logits1 = (0, ln 3): p1 = (1/4, 3/4); logits2 = (0, 0): p2 = (1/2, 1/2)
    l1 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    ce = -math.log(3 / 4)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    loss = dk.stability_loss(l1, l2, y, weight=6.0)
    assert loss.item() == pytest.approx(ce + 6 * kl, rel=1e-12)
    loss.backward()
    # d/dl2 of KL(p1 || softmax l2) = softmax(l2) - p1, times the weight
    assert torch.allclose(l2.grad, 6 * torch.tensor([[0.25, -0.25]], dtype=torch.float64))
    assert l1.grad is not None and bool((l1.grad != 0).all())   # gradients through both


def test_stability_loss_batch_mean_and_default_weight():
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    p1, p2 = l1.softmax(1), l2.softmax(1)
    want = torch.nn.functional.cross_entropy(l1, y) + 6.0 * (p1 * (p1.log() - p2.log())).sum(1).mean()
    assert torch.allclose(dk.stability_loss(l1, l2, y), want, atol=1e-6)
    # equal draws: the KL term vanishes
    assert torch.allclose(dk.stability_loss(l1, l1, y, weight=3.0),
                          torch.nn.functional.cross_entropy(l1, y), atol=1e-6)
