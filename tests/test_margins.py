"""``bf.margins()``: K×K bounds on every logit difference f_i − f_j (theory §5).

Checked against an independent computation of the folded block bound, against √2 × the global
bound (always at least as good) and against empirical lower bounds of each margin (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound import zoo
from curvbound.apps.empirical import (
    Margin,
    hessian_lower_bound,
    lipschitz_lower_bound,
    neg_curvature_lower_bound,
)
from curvbound.compiler.margins import Margins

TANH_CURV = 4 / (3 * math.sqrt(3))


def one_hidden(seed=0, d=5, h=9, k=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).double().eval()


def spectral(a):
    return float(torch.linalg.svdvals(a)[0])


def test_pairwise_fold_matches_a_direct_computation():
    """f = G tanh(Wx + b) + b': every entry equals the block rule evaluated with G → cᵀG."""
    model = one_hidden()
    W, G = model[0].weight.detach(), model[2].weight.detach()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64), norms="certified")
    m = bf.margins()
    assert isinstance(m, Margins) and m.pairwise and m.certified and m.method == "compositional"
    nw, rn = spectral(W), spectral(W.norm(dim=1, keepdim=True) * W)
    for i in range(4):
        for j in range(4):
            if i == j:
                assert float(m.lipschitz[i, j]) == 0 == float(m.curvature[i, j])
                continue
            c = G[i] - G[j]  # c̃ = Gᵀ(e_i − e_j)
            gc = float(c.norm())
            lip = min(0.5 * gc * nw + 0.5 * float((c @ W).norm()), gc * nw)  # LipLT vs product
            curv = TANH_CURV * min(
                gc * nw**2,  # generic: sup|σ''|·L_u²
                gc * rn,  # rule (d)
                spectral(c[:, None] * W) * nw,  # block (c) with the scalar G
                spectral(c.abs().sqrt()[:, None] * W) ** 2,  # Singla & Feizi
            )
            assert float(m.lipschitz[i, j]) == pytest.approx(lip, rel=1e-7)
            assert float(m.curvature[i, j]) == pytest.approx(curv, rel=1e-7)
    # here the two-layer bound is the best candidate for most pairs: the fold really uses it
    c = G[0] - G[1]
    assert spectral(c.abs().sqrt()[:, None] * W) ** 2 < float(c.norm()) * rn


MODELS = {
    "mlp": (lambda: zoo.mlp([6, 10, 10, 5], seed=1).double(), (6,)),
    "residual": (lambda: zoo.residual_mlp(d_in=6, width=8, d_out=4, blocks=1).double(), (6,)),
    "concat": (lambda: zoo.concat_model(d_in=5, d_out=4).double(), (5,)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_margins_are_sound_and_below_sqrt2_global(name):
    build, shape = MODELS[name]
    model = build()
    x = torch.zeros(1, *shape, dtype=torch.float64)
    methods = ["naive", "compositional"] + (["paper", "crt"] if name == "mlp" else [])
    got = {}
    for method in methods:
        bf = curvbound.compile(model, x, method=method, norms="certified")
        out, m = bf(), bf.margins()
        assert m.pairwise and m.certified
        K = m.classes
        off = ~torch.eye(K, dtype=torch.bool)
        assert torch.equal(m.lipschitz, m.lipschitz.T) and torch.equal(m.curvature, m.curvature.T)
        assert (m.lipschitz.diagonal() == 0).all() and (m.curvature.diagonal() == 0).all()
        root2 = math.sqrt(2) * (1 + 1e-12)
        assert (m.lipschitz[off] <= root2 * float(out.lipschitz)).all()
        assert (m.curvature[off] <= root2 * float(out.curvature)).all()
        got[method] = m
    for i, j in [(0, 1), (3, 2)]:
        g = Margin(model, i, j)
        lip = lipschitz_lower_bound(g, shape, seed=4, samples=8, steps=20)
        hess = hessian_lower_bound(g, shape, seed=4, samples=8, steps=20)
        assert lip > 0 and hess > 0
        for method, m in got.items():
            assert float(m.lipschitz[i, j]) >= lip, (method, i, j)
            assert float(m.curvature[i, j]) >= hess, (method, i, j)


def test_estimated_margins_and_fallback():
    model = MODELS["mlp"][0]()
    bf = curvbound.compile(model, torch.zeros(1, 6, dtype=torch.float64))
    m = bf.margins()
    assert m.pairwise and not m.certified
    cert = curvbound.compile(model, torch.zeros(1, 6, dtype=torch.float64), norms="certified")
    assert torch.allclose(m.curvature, cert.margins().curvature, rtol=1e-5)
    # an output that is not a linear layer: √2 times the global bound, said so
    tail = nn.Sequential(model, nn.Tanh()).eval()
    bf = curvbound.compile(tail, torch.zeros(1, 6, dtype=torch.float64), norms="certified")
    out, m = bf(), bf.margins()
    assert not m.pairwise and "√2·global" in m.note and m.certified
    assert float(m.curvature[0, 1]) == pytest.approx(math.sqrt(2) * float(out.curvature))
    assert float(m.curvature[2, 2]) == 0
    with pytest.raises(ValueError, match="at least two outputs"):
        scalar = nn.Sequential(nn.Linear(3, 1)).double().eval()
        curvbound.compile(scalar, torch.zeros(1, 3, dtype=torch.float64)).margins()


def test_cheap_pair_bound_beyond_the_eigenvalue_budget(monkeypatch):
    from curvbound.runtime import margins as margins_module

    model = one_hidden()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64), norms="certified")
    out, exact = bf(), bf.margins()
    monkeypatch.setattr(margins_module, "PAIR_EIG_BUDGET", 0)
    cheap = bf.margins()
    assert cheap.certified and cheap.pairwise
    off = ~torch.eye(4, dtype=torch.bool)
    assert (cheap.curvature[off] >= exact.curvature[off] * (1 - 1e-12)).all()
    assert (cheap.curvature[off] <= math.sqrt(2) * float(out.curvature) * (1 + 1e-12)).all()
    assert float(cheap.curvature[0, 1]) > float(exact.curvature[0, 1])  # the SF term is gone


# -- one-sided margin curvature (issue 17) ---------------------------------------------------------
ONE_SIDED = {
    "softplus2": (lambda: zoo.mlp([5, 12, 4], act=nn.Softplus, seed=2).double(), (5,)),
    "softplus3": (lambda: zoo.mlp([5, 10, 10, 4], act=nn.Softplus, seed=3).double(), (5,)),
    "tanh3": (lambda: zoo.mlp([5, 10, 10, 4], seed=3).double(), (5,)),
    "residual": (lambda: zoo.residual_mlp(d_in=6, width=8, d_out=4, blocks=1).double(), (6,)),
}


def test_one_sided_softplus_two_layer_matches_the_exact_eigenvalue():
    """f = G softplus(Wx + b): ∇²(f_i − f_j) = Wᵀdiag(c̃ ⊙ σ'')W with 0 < σ'' ≤ ¼, so the smallest
    valid K is at most ¼·λ_max(Wᵀdiag(c̃⁻)W) -- and the bound equals it (computed here directly)."""
    model = ONE_SIDED["softplus2"][0]().eval()
    W, G = model[0].weight.detach(), model[2].weight.detach()
    x = torch.zeros(1, 5, dtype=torch.float64)
    m = curvbound.compile(model, x, norms="certified").margins()
    assert m.certified and torch.equal(m.pos_curvature, m.neg_curvature.T)
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            neg = (G[j] - G[i]).clamp_min(0)  # c̃⁻ for c̃ = G[i] − G[j]
            exact = 0.25 * float(torch.linalg.eigvalsh(W.T @ (neg[:, None] * W))[-1])
            got = float(m.neg_curvature[i, j])  # certified: rounded up, by a little
            assert exact <= got <= exact * (1 + 1e-7) + 1e-15
    off = ~torch.eye(4, dtype=torch.bool)
    assert (m.neg_curvature[off] < m.curvature[off]).all()  # strictly better for every pair


@pytest.mark.parametrize("name", sorted(ONE_SIDED))
def test_one_sided_bounds_are_sound_and_below_two_sided(name):
    build, shape = ONE_SIDED[name]
    model = build().eval()
    bf = curvbound.compile(model, torch.zeros(1, *shape, dtype=torch.float64), norms="certified")
    m = bf.margins()
    assert m.certified and m.pairwise
    off = ~torch.eye(m.classes, dtype=torch.bool)
    assert (m.neg_curvature[off] <= m.curvature[off]).all()
    assert (m.neg_curvature >= 0).all()
    if name.startswith("softplus"):  # the sign structure helps for every pair here
        assert (m.neg_curvature[off] < m.curvature[off]).all()
    if name == "tanh3":  # σ'' has both signs: nothing to exploit
        assert torch.equal(m.neg_curvature, m.curvature)
    for i, j in [(0, 1), (1, 0), (3, 2)]:
        emp = neg_curvature_lower_bound(Margin(model, i, j), shape, seed=5, samples=8, steps=20,
                                        scale=2.0)
        assert emp > 0
        assert float(m.neg_curvature[i, j]) >= emp, (name, i, j)
