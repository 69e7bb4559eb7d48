"""``method="crt"``: Singla & Feizi's bound against a direct implementation of its formula
(theory §10), soundness against empirical lower bounds, and clear errors for other graphs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps.empirical import Margin, curvature_lower_bound, hessian_lower_bound
from curvbound.compiler.errors import MethodCoverageError

G_TANH, H_TANH = 1.0, 4 / (3 * math.sqrt(3))


def mlp(widths, seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double().eval()


def crt_reference(weights: list[torch.Tensor], top: torch.Tensor, g: float, h: float) -> float:
    """h·Σ_I r_I²·max(S_I) with S_{L−1} = ``top`` (|cᵀW_L|, or W_L's column norms)."""
    L = len(weights)
    r = [None, float(torch.linalg.matrix_norm(weights[0], 2))]
    for index in range(2, L):
        r.append(g * float(torch.linalg.matrix_norm(weights[index - 1], 2)) * r[-1])
    S = {L - 1: top}
    for index in range(L - 2, 0, -1):
        S[index] = g * S[index + 1] @ weights[index].abs()
    return h * sum(r[index] ** 2 * float(S[index].max()) for index in range(1, L))


def weights_of(model):
    return [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("widths", [[5, 7, 3], [6, 10, 8, 9, 4]])
def test_crt_matches_its_formula(widths):
    model = mlp(widths)
    W = weights_of(model)
    bf = curvbound.compile(model, torch.zeros(1, widths[0], dtype=torch.float64), method="crt",
                           norms="certified")
    out = bf()
    assert out.certified
    worst = crt_reference(W, W[-1].norm(dim=0), G_TANH, H_TANH)
    assert float(out.curvature) == pytest.approx(worst, rel=1e-6)
    margins = bf.margins()
    K = widths[-1]
    for i in range(K):
        for j in range(K):
            if i == j:
                assert float(margins.curvature[i, j]) == 0
                continue
            ref = crt_reference(W, (W[-1][i] - W[-1][j]).abs(), G_TANH, H_TANH)
            assert float(margins.curvature[i, j]) == pytest.approx(ref, rel=1e-6)
            assert float(margins.curvature[i, j]) <= math.sqrt(2) * float(out.curvature)


def test_crt_is_sound():
    model = mlp([4, 9, 9, 3], seed=5)
    x = torch.zeros(1, 4, dtype=torch.float64)
    bf = curvbound.compile(model, x, method="crt", norms="certified")
    out, margins = bf(), bf.margins()
    assert float(out.curvature) >= curvature_lower_bound(model, (4,), seed=2)
    for i, j in [(0, 1), (2, 0)]:
        lower = hessian_lower_bound(Margin(model, i, j), (4,), seed=2)
        assert float(margins.curvature[i, j]) >= lower


def test_crt_softplus_and_flatten():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softplus(beta=3.0),
                          nn.Linear(8, 3)).double().eval()
    W = weights_of(model)
    out = curvbound.compile(model, torch.zeros(1, 3, 4, dtype=torch.float64), method="crt",
                            norms="certified")()
    assert float(out.curvature) == pytest.approx(crt_reference(W, W[-1].norm(dim=0), 1.0, 0.75),
                                                 rel=1e-6)


@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2)),
         r"node '_0'.*Conv2d"),
        (nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid(),
                       nn.Linear(5, 2)), r"one activation type; 4 \(Sigmoid\) \(fx node '_4'\)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.ELU(alpha=0.5), nn.Linear(5, 2)),
         r"'_2'.*not C¹"),
    ],
)
def test_crt_rejects_uncovered_graphs(model, match):
    with pytest.raises(MethodCoverageError, match=match):
        curvbound.compile(model.eval(), torch.zeros(1, 1, 6, 6), method="crt")
