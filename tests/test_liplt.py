"""LipLT along chain segments (theory §4): the product quantities, their batched power iteration,
the LipLT recursion against a direct implementation, and the slope ranges it relies on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound
from curvbound.runtime import products
from curvbound.runtime import smoothness as S
from curvbound.runtime.norms import Norm
from curvbound.runtime.operators import Dense
from curvbound.runtime.products import ProductChain, ProductNorm, Segment


def _chain(seed=0, widths=(6, 9, 7, 8, 5)):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(b, a, generator=g, dtype=torch.float64) / math.sqrt(a)
            for a, b in zip(widths, widths[1:])]
    ops = [Dense(lambda w=w: w, (w.shape[1],), (w.shape[0],)) for w in mats]
    return mats, ops


def _exact(mats, i, j) -> float:
    p = mats[i]
    for k in range(i - 1, j - 1, -1):
        p = p @ mats[k]
    return float(torch.linalg.svdvals(p)[0])


def _segment(ops, mode):
    seg = Segment(ops)
    n = len(ops)
    for i in range(n):
        for j in range(i + 1):
            seg.add(ProductNorm(seg, i, j, ProductChain(ops[j : i + 1]), mode, seed=10 * i + j,
                                dtype=torch.float64))
    return seg


def test_batched_products_converge_to_exact_norms():
    mats, ops = _chain()
    seg = _segment(ops, "estimate")
    for m in seg.own:
        m.step(200)
    for (i, j), m in seg.norms.items():
        assert float(m()) == pytest.approx(_exact(mats, i, j), rel=1e-9)
        assert float(m()) <= _exact(mats, i, j) * (1 + 1e-12)  # from below


def test_one_batched_sweep_serves_every_product(monkeypatch):
    mats, ops = _chain(seed=1)
    seg = _segment(ops, "estimate")
    calls = []
    original = Segment._gram
    monkeypatch.setattr(Segment, "_gram", lambda self, live, xs: calls.append(len(live))
                        or original(self, live, xs))
    for m in seg.own:  # as BoundFunction.refresh(7) does: every quantity asked for 7 steps
        m.step(7)
    assert len(calls) == 7 and calls[0] == len(seg.own) == 10


def test_estimates_never_decrease():
    mats, ops = _chain(seed=2, widths=(30, 40, 30))
    seg = _segment(ops, "estimate")
    m = seg.norms[(1, 0)]
    values = []
    for _ in range(6):
        values.append(float(m()))
        m.step(3)
    assert all(b >= a * (1 - 1e-12) for a, b in zip(values, values[1:]))


def test_certified_products_and_split_fallback(monkeypatch):
    mats, ops = _chain(seed=3)
    seg = _segment(ops, "certified")
    for (i, j), m in seg.norms.items():
        exact = _exact(mats, i, j)
        assert exact <= float(m()) <= exact * (1 + 1e-8)
    # too costly to multiply out or materialise one by one: the products ending at one layer are
    # materialised together in one backward sweep (exact again) ...
    monkeypatch.setattr(products, "PRODUCT_DENSE_LIMIT", 0)
    monkeypatch.setattr(products, "PRODUCT_COST_LIMIT", 0)
    seg = _segment(ops, "certified")
    for (i, j), m in seg.norms.items():
        exact = _exact(mats, i, j)
        assert exact <= float(m()) <= exact * (1 + 1e-8)
        if i != j:
            assert "backward sweep" in m.note
    # ... and when that is over its budget too: the best split into certified factors
    monkeypatch.setattr(products, "SWEEP_COST_LIMIT", 0)
    seg = _segment(ops, "certified")
    top = seg.norms[(3, 0)]
    value = float(top())
    assert "certified factors" in top.note
    assert value >= _exact(mats, 3, 0)
    single = math.prod(_exact(mats, k, k) for k in range(4))
    assert value <= single * (1 + 1e-8)


# -- the LipLT recursion in the compiled bound ---------------------------------------------------
def liplt_reference(mats, c, d) -> float:
    """m_i = Σ_j c^j d ‖W_i⋯W_{i−j}‖ m_{i−j−1} + c^i ‖W_i⋯W_0‖, one activation (c, d)."""
    m = [_exact(mats, 0, 0)]
    for i in range(1, len(mats)):
        m.append(sum(c**j * d * _exact(mats, i, i - j) * m[i - j - 1] for j in range(i))
                 + c**i * _exact(mats, i, 0))
    return m[-1]


@pytest.mark.parametrize("act, cd", [(nn.Tanh, (0.5, 0.5)), (nn.Sigmoid, (0.125, 0.125)),
                                     (nn.SiLU, None)])
def test_compositional_lipschitz_is_liplt(act, cd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), act(), nn.Linear(9, 7), act(), nn.Linear(7, 8), act(),
                          nn.Linear(8, 5)).double().eval()
    mats = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    if cd is None:  # SiLU: the slope range recorded by smoothness.py
        lo, hi = (float(v) for v in S.silu().slope_range)
        cd = ((lo + hi) / 2, (hi - lo) / 2)
    ref = liplt_reference(mats, *cd)
    x = torch.zeros(1, 6, dtype=torch.float64)
    out = curvbound.compile(model, x, norms="certified")()
    product = curvbound.compile(model, x, method="naive", norms="certified")()
    assert float(out.lipschitz) == pytest.approx(min(ref, float(product.lipschitz)), rel=1e-6)
    assert float(out.lipschitz) < 0.9 * float(product.lipschitz)  # LipLT is much tighter here
    assert float(out.lipschitz) >= lipschitz_lower_bound(model, (6,), seed=0)


class TwoHeads(nn.Module):
    """One activation feeding two linear layers: the second forks the chain segment."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 8)
        self.h1, self.h2 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.h1(h) + 0.5 * self.h2(h)


def test_forked_segments_are_sound():
    torch.manual_seed(3)
    model = TwoHeads().double().eval()
    x = torch.zeros(1, 5, dtype=torch.float64)
    bf = curvbound.compile(model, x, norms="certified")
    out = bf()
    segs = {id(q.segment) for q in bf.quantities.values() if isinstance(q, ProductNorm)}
    # h1 continues the segment (a, b); h2 forks it, and so does 0.5·h2 (merged with h2)
    assert len(segs) == 3
    naive = curvbound.compile(model, x, method="naive", norms="certified")()
    assert float(out.curvature) <= float(naive.curvature)
    assert float(out.lipschitz) >= lipschitz_lower_bound(model, (5,), seed=1)
    assert float(out.curvature) >= curvature_lower_bound(model, (5,), seed=1)
    est = curvbound.compile(model, x)
    assert float(est().curvature) == pytest.approx(float(out.curvature), rel=1e-5)
    assert any(isinstance(q, Norm) for q in est.quantities.values())


RECORDS = [S.tanh(), S.sigmoid(), S.softplus(2.0), S.centered_softplus(1.5), S.silu(), S.gelu(),
           S.gelu("tanh"), S.elu(1.0), S.celu(0.5), S.mish(), S.logsigmoid(), S.relu(),
           S.leaky_relu(0.1), S.hardtanh()]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.name)
def test_slope_ranges_enclose_the_derivative(rec):
    """LipLT writes σ = c·id + ψ from the slope range: it must contain every σ'(z)."""
    z = torch.linspace(-30, 30, 200001, dtype=torch.float64).requires_grad_(True)
    (d1,) = torch.autograd.grad(rec.fn(z).sum(), z)
    lo, hi = (float(v) for v in rec.slope_range)
    assert float(d1.min()) >= lo - 1e-12 and float(d1.max()) <= hi + 1e-12


@pytest.mark.parametrize("name", ["curvbound.runtime.products", "curvbound.runtime.margins",
                                  "curvbound.passes.paper", "curvbound.passes.crt"])
def test_docstring_examples_of_the_tightness_modules(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_deep_chains_keep_small_expressions():
    """LipLT's recursion is a numeric quantity and every block rule refers to one curvature, so
    the written-out bound (bf.expr) grows polynomially with depth and still round-trips."""
    import sympy

    from curvbound import zoo

    model = zoo.mlp([5] + [6] * 20 + [3], act=nn.Softplus, seed=1).double()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64), norms="certified")
    out = bf()
    expr = bf.expr
    assert sympy.count_ops(expr["curvature"]) < 2000
    vals = {sympy.Symbol(k, nonnegative=True): v for k, v in bf.quantity_values().items()}
    for key, got in (("lipschitz", out.lipschitz), ("curvature", out.curvature)):
        exact = float(expr[key].xreplace(vals))
        assert exact <= float(got) <= exact * (1 + 1e-10)
    # every rule stays positively homogeneous in the curvatures: the shares still sum to 1
    assert sum(bf.curvature_shares().values()) == pytest.approx(1.0, rel=1e-9)


def test_block_rule_offers_both_second_terms(monkeypatch):
    """The block rule's second term is min(sup|σ'|·‖G‖·M_u, loop·M_z): the first wins on MLPs
    (M_u has its own block rule), the second on convolutional chains; forcing the chain rule
    alone (no node small enough to take both, except the output) loosens the CNN bound."""
    from test_ordering import mini_6c2f

    from curvbound.passes import lipschitz_lt

    model, x = mini_6c2f(), torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    both = float(curvbound.compile(model, x, norms="certified")().curvature)
    monkeypatch.setattr(lipschitz_lt, "BOTH_TERMS_OPS", -1)
    chain_only = float(curvbound.compile(model, x, norms="certified")().curvature)
    assert both < 0.9 * chain_only
    lower = curvature_lower_bound(model, (2, 8, 8), seed=2)
    assert 0 < lower <= both


@pytest.mark.parametrize("depth", [10, 40])
def test_written_out_bound_stays_bounded_with_depth(depth):
    import sympy

    from curvbound import zoo

    model = zoo.mlp([5] + [6] * depth + [3], act=nn.Softplus, seed=1).double()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64))
    assert sympy.count_ops(bf.expr["curvature"]) < 2000
