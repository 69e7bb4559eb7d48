"""Anchored curvature (theory §7): sound β' tables, per-sample anchored bounds through the compiled
propagation, anchored ≤ global and anchored ≥ empirical anchored lower bounds (float64)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound import zoo
from curvbound.apps.anchored import Capture
from curvbound.apps.empirical import curvature_lower_bound
from curvbound.runtime import smoothness as S
from curvbound.runtime import tables
from curvbound.runtime.anchored import AnchoredScaledNorm, AnchorState
from curvbound.runtime.norms import Constant

RECORDS = {
    "tanh": S.tanh(),
    "sigmoid": S.sigmoid(),
    "softplus2": S.softplus(2.0),
    "centered_softplus": S.centered_softplus(0.7),
    "logsigmoid": S.logsigmoid(),
}


# -- tables ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_table_bounds_exact_beta_prime_on_a_dense_grid(name):
    rec = RECORDS[name]
    table = tables.anchored_table(rec)
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-24, 24, 1201, dtype=torch.float64)  # inside and beyond the table
    off_grid = (torch.rand(300, generator=gen, dtype=torch.float64) - 0.5) * 8
    z0 = torch.cat([grid, off_grid])
    exact = tables.beta_prime(rec, z0)
    bound = table(z0)
    assert (bound >= exact - 1e-12).all(), float((exact - bound).max())
    assert (bound <= rec.curvature_float).all()
    # and the table is useful: within the table range it is close to β'
    inside = (z0 * tables.spec_for(rec)[1]).abs() < 15
    assert float((bound - exact)[inside].max()) < 0.02 * rec.curvature_float + 0.01


def test_beta_prime_against_closed_forms():
    # tanh at 0: sup_z tanh²z/|z|, attained where sinh(2z) = 4z (tangency); bisection on sinh w = 2w
    lo, hi = 1.0, 3.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.sinh(mid) < 2 * mid else (lo, mid)
    z = lo / 2
    expected = math.tanh(z) ** 2 / z
    got = float(tables.beta_prime(S.tanh(), torch.zeros(1, dtype=torch.float64))[0])
    assert got == pytest.approx(expected, rel=1e-9)
    # at the inflection point of σ' the anchored curvature is the global one, 4/(3√3)
    z_star = 0.5 * math.log(2 + math.sqrt(3))
    got = float(tables.beta_prime(S.tanh(), torch.tensor([z_star], dtype=torch.float64))[0])
    assert got == pytest.approx(4 / (3 * math.sqrt(3)), rel=1e-9)


def test_rounding_tables_underestimate_but_ours_do_not():
    # the paper's tables index β' by |z₀| rounded to 0.01; tanh's β' increases on [0, 0.66], so a
    # point just below a grid value can have a larger β' than the value stored for the grid point
    rec = S.tanh()
    z0 = torch.linspace(0.0, 0.66, 661, dtype=torch.float64) + 0.004
    exact = tables.beta_prime(rec, z0)
    rounded = tables.beta_prime(rec, torch.round(z0 * 100) / 100)
    assert float((exact - rounded).max()) > 1e-4  # the rounding table misses this much
    assert (tables.anchored_table(rec)(z0) >= exact).all()


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_third_derivative_constants(name):
    # the cell bounds rest on sup|σ'''| ≤ spec.third: check it on a dense grid by autograd
    rec = RECORDS[name]
    kind, scale, _ = tables.spec_for(rec)
    spec = tables._base_table(kind)[1]
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64, requires_grad=True)
    (d3,) = torch.autograd.grad(spec.d2(z).sum(), z)
    assert float(d3.abs().max()) <= spec.third * (1 + 1e-12)  # the float rounding of d3
    assert float(d3.abs().max()) >= 0.99 * spec.third  # and it is not loose


def test_tables_only_for_covered_activations():
    assert tables.anchored_table(S.silu()) is None
    assert tables.anchored_table(S.relu()) is None
    t = tables.anchored_table(S.tanh())
    out = t(torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64))
    assert (out == S.tanh().curvature_float).all()


# -- anchored norms: independent references -------------------------------------------------------
def test_anchored_scaled_norm_exact_and_layer_cake_bound_the_true_norm():
    gen = torch.Generator().manual_seed(1)
    m, n, b = 40, 30, 6
    x = torch.randn(n, m, generator=gen, dtype=torch.float64)  # ‖X diag(ρ)‖, one column per unit
    x[:, :5] *= 4  # a few dominant columns
    table = tables.anchored_table(S.tanh())
    state = AnchorState()
    state.nodes = ["u"]
    z0 = torch.randn(b, m, generator=gen, dtype=torch.float64) * 3
    base = Constant(float(torch.linalg.matrix_norm(x, ord=2)) * (1 + 1e-12))
    gram = (x.T @ x, torch.tensor(1e-12, dtype=torch.float64))
    weights = (x * x).sum(0) * (1 + 1e-12)
    exact_q = AnchoredScaledNorm(state, "u", table, base, lambda: weights, lambda: gram)
    cake_q = AnchoredScaledNorm(state, "u", table, base, lambda: weights, None)
    with state.anchored({"u": z0}):
        exact, cake = exact_q(), cake_q()
    beta = table(z0)
    rho = beta / beta.amax(dim=1, keepdim=True)
    true = torch.linalg.matrix_norm(x[None] * rho[:, None, :], ord=2)
    assert (exact >= true * (1 - 1e-12)).all() and (exact <= true * (1 + 1e-7)).all()
    assert (cake >= true * (1 - 1e-12)).all() and (cake <= base()).all()
    assert float((cake / true).max()) < float(base()) / float(true.min())  # better than ‖X‖
    assert float(exact_q()) == float(base())  # no anchor: the global value


# -- anchored bounds of whole models ---------------------------------------------------------------
def _mixed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Softplus(beta=2.0), nn.Linear(12, 12), nn.Sigmoid(),
        nn.Linear(12, 10), curvbound.CenteredSoftplus(0.7), nn.Linear(10, 8), nn.LogSigmoid(),
        nn.Linear(8, 3),
    )  # fmt: skip


def _saturated_tanh() -> nn.Module:
    m = zoo.mlp([6, 16, 16, 4], seed=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.5)
    return m


MODELS = {
    "saturated_tanh": (_saturated_tanh, (6,)),
    "mixed": (_mixed, (6,)),
    "residual_mlp": (functools.partial(zoo.residual_mlp, d_in=8, width=12, blocks=2), (8,)),
    "concat": (zoo.concat_model, (10,)),
    "residual_cnn_bn": (zoo.residual_cnn_bn, (3, 8, 8)),
    "all_activations": (zoo.all_activations_model, (8,)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_anchored_bounds_are_sound_and_below_global(name):
    build, shape = MODELS[name]
    model = build().double().eval()
    bf = curvbound.compile(
        model, torch.zeros(1, *shape, dtype=torch.float64), norms="certified", anchored=True
    )
    glob = bf()
    assert glob.certified
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, *shape, generator=gen, dtype=torch.float64) * 1.5
    anch = curvbound.anchored_bounds(bf, x0)
    assert anch.curvature.shape == (3,) and anch.certified
    assert (anch.curvature <= glob.curvature).all()
    if name == "mixed":  # without an anchor the bound is the global one of a plain compile
        plain = curvbound.compile(model, x0[:1], norms="certified")
        assert float(plain().curvature) == pytest.approx(float(bf().curvature), rel=1e-12)
    samples, steps = (8, 20) if name not in ("residual_cnn_bn", "all_activations") else (4, 10)
    for b in range(len(x0) if name != "all_activations" else 1):
        emp = curvature_lower_bound(
            model, shape, anchor=x0[b], samples=samples, steps=steps, scale=2.0, seed=b
        )
        assert emp > 0
        assert float(anch.curvature[b]) >= emp * (1 - 1e-9), (name, b, emp)


def test_anchoring_tightens_saturated_networks():
    model = _saturated_tanh().double()
    bf = curvbound.compile(model, torch.zeros(1, 6, dtype=torch.float64), norms="certified",
                           anchored=True)  # fmt: skip
    x0 = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    anch = curvbound.anchored_bounds(bf, x0)
    assert float((anch.curvature / bf().curvature).min()) < 0.8
    # the views of the bound function still show the global bound after an anchored evaluation
    assert "output" in bf.table()


def test_anchored_exact_layer_norm_matches_an_independent_computation():
    model = _saturated_tanh().double()
    bf = curvbound.compile(model, torch.zeros(1, 6, dtype=torch.float64), norms="certified",
                           anchored=True)  # fmt: skip
    state = bf._anchor
    x0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, values = Capture(bf.gm, state.nodes)(x0)
    lin = model[0]
    name = state.nodes[0]
    with state.anchored(values):
        kappa = bf.quantities[f"kappa_{_act(bf, name)}"]()
        rel = bf.quantities[f"rnorm_{_act(bf, name)}"]()
    w = lin.weight.detach()
    beta = tables.anchored_table(S.tanh())(values[name])
    direct = torch.linalg.matrix_norm((beta * w.norm(dim=1))[:, :, None] * w, ord=2)
    assert (kappa * rel >= direct * (1 - 1e-12)).all()
    assert (kappa * rel <= direct * (1 + 1e-7)).all()


def _act(bf, pre: str) -> str:
    node = next(n for n in bf.gm.graph.nodes if n.name == pre)
    return next(iter(node.users)).name


def test_anchored_compile_errors():
    model = zoo.mlp([3, 4, 2])
    with pytest.raises(ValueError, match="anchored=True supports"):
        curvbound.compile(model, torch.zeros(1, 3), method="paper", anchored=True)
    bf = curvbound.compile(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="anchored=True"):
        curvbound.anchored_bounds(bf, torch.zeros(2, 3))


def test_anchored_estimate_mode_refreshes_the_base_norms():
    model = _saturated_tanh()
    bf = curvbound.compile(model, torch.zeros(1, 6), anchored=True)  # estimate, refreshed
    assert any(name.startswith("rbase_") for name in bf.quantities)
    certified = curvbound.compile(model, torch.zeros(1, 6), norms="certified")
    assert float(bf().curvature) == pytest.approx(float(certified().curvature), rel=1e-4)
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(5)) * 2
    anch = curvbound.anchored_bounds(bf, x0)
    assert not anch.certified and (anch.curvature <= bf().curvature * (1 + 1e-12)).all()
