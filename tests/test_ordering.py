"""Ordering of the methods on the sequential zoo models, random and briefly trained (issue 4):

    curvature: compositional ≤ paper ≤ naive;  Lipschitz: LipLT ≤ product of norms;
    pairwise margins ≤ √2·global;  every bound ≥ its empirical lower bound (float64).

Certified norms throughout, so that the comparisons are between guaranteed numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound import zoo
from curvbound.apps.data import has_dataset, load_mnist, train_classifier
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound

SLACK = 1 + 1e-9  # certified numbers carry a 1e-9 safety margin


def mini_6c2f(seed=0):
    """6C2F's layer pattern (six convolutions, two linear layers) on 2×8×8 inputs."""
    torch.manual_seed(seed)
    spec = [(2, 4, 3, 1), (4, 4, 4, 2), (4, 6, 3, 1), (6, 6, 4, 2), (6, 6, 3, 1), (6, 6, 4, 2)]
    layers: list[nn.Module] = []
    for c_in, c_out, k, s in spec:
        layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=1), nn.Tanh()]
    layers += [nn.Flatten(), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)]
    return nn.Sequential(*layers).double().eval()


def check_ordering(model, shape, budget=None):
    x = torch.zeros(1, *shape, dtype=torch.float64)
    got = {}
    for method in ("naive", "paper", "compositional"):
        bf = curvbound.compile(model, x, method=method, norms="certified")
        out = bf()
        assert out.certified
        got[method] = (float(out.lipschitz), float(out.curvature), bf)
    (l_n, m_n, _), (l_p, m_p, _), (l_c, m_c, bf) = (got[m] for m in ("naive", "paper",
                                                                       "compositional"))
    assert m_c <= m_p * SLACK and m_p <= m_n * SLACK, (m_c, m_p, m_n)
    assert l_c <= l_n * SLACK and l_p <= l_n * SLACK, (l_c, l_p, l_n)
    margins = bf.margins()
    off = ~torch.eye(margins.classes, dtype=torch.bool)
    assert (margins.curvature[off] <= math.sqrt(2) * m_c * SLACK).all()
    assert (margins.lipschitz[off] <= math.sqrt(2) * l_c * SLACK).all()
    kw = {} if budget is None else {"samples": budget[0], "steps": budget[1]}
    lip = lipschitz_lower_bound(model, shape, seed=5, **kw)
    curv = curvature_lower_bound(model, shape, seed=5, **kw)
    assert lip > 0 and curv > 0
    for method, (L, M, _) in got.items():
        assert L >= lip and M >= curv, (method, L, lip, M, curv)
    return got


SEQUENTIAL = {
    "mnist_3f": (lambda: zoo.mnist_mlp(3).double(), (1, 28, 28)),
    "mnist_6f": (lambda: zoo.mnist_mlp(6).double(), (1, 28, 28)),
    "mnist_4f_softplus": (lambda: zoo.mnist_mlp(4, act=lambda: nn.Softplus(beta=2.0)).double(),
                          (1, 28, 28)),
    "mini_6c2f": (mini_6c2f, (2, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(SEQUENTIAL))
def test_ordering_random_weights(name):
    build, shape = SEQUENTIAL[name]
    got = check_ordering(build(), shape)
    # the gains are real: LipLT and the block rules beat the naive products clearly
    assert got["compositional"][1] < 0.8 * got["naive"][1]
    assert got["compositional"][0] < got["naive"][0]


@pytest.mark.skipif(not has_dataset("mnist"), reason="MNIST data not available")
@pytest.mark.parametrize("depth", [3, 5])
def test_ordering_briefly_trained(depth):
    x, y = load_mnist("train", limit=2000)
    model = zoo.mnist_mlp(depth, seed=depth)
    train_classifier(model, x, y, epochs=1, batch_size=100, lr=2e-3, seed=depth)
    check_ordering(model.double().eval(), (1, 28, 28))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_6f", "cifar_6c2f"])
def test_ordering_cifar(name):
    model, shape = zoo.ZOO[name]()
    check_ordering(model.double(), tuple(shape), budget=(4, 10))
