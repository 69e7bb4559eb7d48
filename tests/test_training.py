"""The bound as a training regulariser: gradients reach the weights and lower the bound."""

from __future__ import annotations

import torch
from torch import nn

import curvbound
from curvbound.apps.training import CurvatureRegularizer


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return x, y


def _train(lam: float, steps=150, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    bf = curvbound.compile(net, torch.zeros(1, 2))
    reg = CurvatureRegularizer(bf, target=0.0, lam=lam, dual_lr=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + reg()
        loss.backward()
        opt.step()
    certified = curvbound.compile(net.eval(), torch.zeros(1, 2), norms="certified")()
    return float(certified.curvature)


def test_regulariser_lowers_the_certified_curvature():
    plain, regularised = _train(0.0), _train(2.0)
    assert regularised < 0.5 * plain


def test_dual_update_moves_towards_target():
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    reg = CurvatureRegularizer(curvbound.compile(net, torch.zeros(1, 2)), target=1e9, lam=0.5)
    reg()
    reg.update()
    assert reg.lam == reg.lam_min == 0.0  # far below the target: λ drops to its floor
