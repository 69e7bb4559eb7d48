"""Empirical lower bounds against problems whose constants are known exactly (float64).

A lower bound must never exceed the true constant and should come close to it where the maximiser is
easy to find.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvbound import zoo
from curvbound.apps.empirical import (
    Margin,
    curvature_lower_bound,
    hessian_lower_bound,
    lipschitz_lower_bound,
)

TANH_CURV = 4 / (3 * math.sqrt(3))  # sup |tanh''|
SLACK = 1 + 1e-9  # float64 rounding of an attained ratio

# exact Jacobians / full Hessians, and power iteration with jvp/vjp or Hessian-vector products
PATHS = [pytest.param(32, id="exact"), pytest.param(0, id="power")]


def _norm(a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double(), ord=2))


def _linear(rows: int, cols: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=gen))
        layer.bias.copy_(torch.randn(rows, generator=gen))
    return layer, layer.weight.detach().double()


class _TanhRidge(nn.Module):
    """x ↦ tanh(w·x + b): L = ‖w‖, M = ‖w‖²·4/(3√3)."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w + self.b).unsqueeze(1)


def _ridge(n: int, seed: int) -> tuple[_TanhRidge, torch.Tensor]:
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return _TanhRidge(w), w


def _dtanh(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


def _anchored_ridge_curvature(w: torch.Tensor, x0: torch.Tensor, reach: float) -> float:
    """M(x0) of tanh(w·x) on ‖x − x0‖ ≤ reach: ‖w‖² sup_{|t|≤‖w‖reach} |tanh'(a+t) − tanh'(a)|/|t|.

    The supremum is along w, so it is one-dimensional; a fine grid gives it to ~1e-9.
    """
    a = torch.dot(w, x0)
    wn = float(w.norm())
    t = torch.linspace(-wn * reach, wn * reach, 400_001, dtype=torch.float64)
    t = t[t != 0]
    return wn**2 * float(((_dtanh(a + t) - _dtanh(a)).abs() / t.abs()).max())


# --- linear maps: L = ‖A‖ exactly, M = 0 ----------------------------------------------------------


@pytest.mark.parametrize("exact_dim", PATHS)
@pytest.mark.parametrize(("rows", "cols"), [(7, 12), (40, 3)])  # reverse-, forward-mode Jacobians
def test_linear_map_lipschitz_is_the_spectral_norm(rows, cols, exact_dim):
    layer, a = _linear(rows, cols, seed=1)
    est = lipschitz_lower_bound(layer, (cols,), exact_dim=exact_dim, samples=8, steps=15)
    assert 0.99 * _norm(a) <= est <= _norm(a) * SLACK


def test_linear_map_pairs_alone_reach_the_norm():
    # Anchored at a point with unconstrained y only pairs and the Jacobian at x0 count; both are
    # exact for a linear map, so the anchored constant equals the global one.
    layer, a = _linear(5, 9, seed=2)
    est = lipschitz_lower_bound(layer, (9,), anchor=torch.ones(9), samples=8, steps=20)
    assert 0.99 * _norm(a) <= est <= _norm(a) * SLACK


@pytest.mark.parametrize("exact_dim", PATHS)
def test_linear_map_has_zero_curvature(exact_dim):
    layer, _ = _linear(6, 10, seed=3)
    assert curvature_lower_bound(layer, (10,), exact_dim=exact_dim, samples=4, steps=3) <= 1e-12
    quadratic_free = Margin(layer, 0, 1)
    assert hessian_lower_bound(quadratic_free, (10,), exact_dim=exact_dim, samples=4,
                               steps=3) <= 1e-12


# --- tanh ridge: M = ‖w‖² · 4/(3√3) ---------------------------------------------------------------


@pytest.mark.parametrize("exact_dim", PATHS)
@pytest.mark.parametrize("n", [3, 40])
def test_tanh_ridge_curvature_is_tight(n, exact_dim):
    model, w = _ridge(n, seed=n)
    truth = float(w @ w) * TANH_CURV
    est = curvature_lower_bound(model, (n,), exact_dim=exact_dim, samples=8, steps=25)
    assert 0.97 * truth <= est <= truth * SLACK
    hess = hessian_lower_bound(model, (n,), exact_dim=exact_dim, samples=8, steps=25)
    assert 0.97 * truth <= hess <= truth * SLACK
    lip = lipschitz_lower_bound(model, (n,), exact_dim=exact_dim, samples=8, steps=15)
    assert 0.99 * float(w.norm()) <= lip <= float(w.norm()) * SLACK


def test_tanh_ridge_anchored_curvature():
    model, w = _ridge(6, seed=7)
    x0 = 0.1 * w / w.norm()  # tanh'' is small at w·x0 = 0.1‖w‖, so M(x0) < M
    truth_anchored = _anchored_ridge_curvature(w, x0, 50.0)
    truth_global = float(w @ w) * TANH_CURV
    assert truth_anchored < truth_global
    est = curvature_lower_bound(model, (6,), anchor=x0, samples=8, steps=25)
    assert 0.97 * truth_anchored <= est <= truth_anchored * (1 + 1e-6)
    # Within a small ball around x0 the anchored constant is smaller still.
    reach = 0.05
    truth_ball = _anchored_ridge_curvature(w, x0, reach)
    est_ball = curvature_lower_bound(model, (6,), anchor=x0, radius=reach, samples=8, steps=25)
    assert 0.95 * truth_ball <= est_ball <= truth_ball * (1 + 1e-6)
    assert truth_ball < truth_anchored


def test_anchored_is_below_global():
    model, w = _ridge(5, seed=11)
    truth = float(w @ w) * TANH_CURV
    glob = curvature_lower_bound(model, (5,), samples=8, steps=20)
    anchors = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for x0 in anchors:
        anchored = curvature_lower_bound(model, (5,), anchor=x0, samples=8, steps=20)
        assert anchored <= truth * SLACK
        assert anchored <= glob * (1 + 1e-6)
        lip = lipschitz_lower_bound(model, (5,), anchor=x0, samples=8, steps=20)
        assert lip <= float(w.norm()) * SLACK


# --- two-layer tanh network: against the naive and the tighter block upper bounds -----------------


def test_two_layer_tanh_is_below_the_upper_bounds():
    model = zoo.mlp([6, 10, 3], seed=5).double()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    naive = _norm(w2) * TANH_CURV * _norm(w1) ** 2
    rows = w1.norm(dim=1)
    block = _norm(w2) * TANH_CURV * _norm(rows[:, None] * w1)  # theory §3 flavour (d)
    assert block <= naive * SLACK
    for exact_dim in (32, 0):
        est = curvature_lower_bound(model, (6,), exact_dim=exact_dim, samples=8, steps=20)
        assert 0 < est <= block * SLACK
        # Gradient ascent should reach a fair share of even the tighter bound on so small a net.
        assert est >= 0.3 * block
    lip = lipschitz_lower_bound(model, (6,), samples=8, steps=20)
    assert 0 < lip <= _norm(w2) * _norm(w1) * SLACK
    assert lip >= 0.5 * _norm(w2 @ w1)  # near the origin Df ≈ W2·diag(tanh'(b1))·W1


def _naive_bounds(model: nn.Sequential, curv: float) -> tuple[float, float]:
    """Product-of-norms L and composition-rule M (theory §2) of a Linear/σ chain."""
    lip, big_m = 1.0, 0.0
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for k, layer in enumerate(layers):
        norm = _norm(layer.weight.detach())
        layer_m = curv * norm**2 if k < len(layers) - 1 else 0.0
        big_m = layer_m * lip**2 + norm * big_m
        lip *= norm
    return lip, big_m


@settings(max_examples=15, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(1, 7), min_size=2, max_size=4),
       act=st.sampled_from(["tanh", "softplus"]), seed=st.integers(0, 10_000))
def test_random_mlps_never_exceed_naive_bounds(widths, act, seed):
    factory, curv = {"tanh": (nn.Tanh, TANH_CURV), "softplus": (nn.Softplus, 0.25)}[act]
    model = zoo.mlp(widths, act=factory, seed=seed)
    lip_bound, curv_bound = _naive_bounds(model.double(), curv)
    n = widths[0]
    assert lipschitz_lower_bound(model, (n,), samples=4, steps=6, seed=seed) <= lip_bound * SLACK
    assert curvature_lower_bound(model, (n,), samples=4, steps=6, seed=seed) <= curv_bound * SLACK


# --- behaviour ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["residual_cnn_bn", "concat", "all_activations", "residual_mlp"])
def test_zoo_models_give_positive_finite_bounds_and_are_untouched(name):
    model, shape = zoo.ZOO[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    knobs = {"samples": 4, "steps": 4}
    lip = lipschitz_lower_bound(model, shape, **knobs)
    curv = curvature_lower_bound(model, shape, **knobs)
    curv_power = curvature_lower_bound(model, shape, exact_dim=0, **knobs)
    hess = hessian_lower_bound(Margin(model, 0, 1), shape, **knobs)
    for value in (lip, curv, curv_power, hess):
        assert 0 < value < math.inf
    # The Hessian of a margin (c = e0 − e1, ‖c‖ = √2) is at most √2·M — checked here on estimates
    # only loosely, as both are lower bounds.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype != torch.float64 for v in after.values() if v.is_floating_point())
    assert not model.training


def test_model_mode_is_left_alone_and_eval_is_used():
    model = zoo.residual_cnn_bn().train()
    value = curvature_lower_bound(model, (3, 8, 8), samples=2, steps=2)
    assert model.training
    assert value == curvature_lower_bound(model.eval(), (3, 8, 8), samples=2, steps=2)


def test_results_are_deterministic_by_seed():
    model, shape = zoo.ZOO["concat"]()
    a = curvature_lower_bound(model, shape, samples=4, steps=5, seed=3)
    b = curvature_lower_bound(model, shape, samples=4, steps=5, seed=3)
    c = curvature_lower_bound(model, shape, samples=4, steps=5, seed=4)
    assert a == b and a != c


def test_radius_keeps_pairs_in_the_ball():
    # f(x) = tanh(w·x) with the ball far from the inflection points: ratios stay near the centre's.
    model, w = _ridge(4, seed=2)
    centre = 3.0 * w / w.norm() ** 2  # w·centre = 3, deep in saturation
    est = curvature_lower_bound(model, (4,), center=centre, radius=0.01, samples=4, steps=10)
    a = torch.tensor(3.0, dtype=torch.float64)
    reach = 0.01 * float(w.norm())
    local = float(w @ w) * float((2 * _dtanh(a - reach) * torch.tanh(a - reach)).abs())
    assert est <= local * 1.001


def test_time_limit_and_arguments():
    model, shape = zoo.ZOO["residual_cnn_bn"]()
    start = time.monotonic()
    value = curvature_lower_bound(model, shape, samples=4, steps=1000, time_limit=0.0)
    assert time.monotonic() - start < 5 and value >= 0
    with pytest.raises(ValueError, match="scalar"):
        hessian_lower_bound(model, shape)
    with pytest.raises(ValueError, match="anchor or center"):
        curvature_lower_bound(model, shape, anchor=torch.zeros(shape), center=torch.zeros(shape))
    with pytest.raises(ValueError, match="entries"):
        lipschitz_lower_bound(model, shape, anchor=torch.zeros(5))
    with pytest.raises(ValueError, match="radius"):
        lipschitz_lower_bound(model, shape, radius=0.0)


def test_plain_callables_are_accepted():
    a = torch.tensor([[2.0, 0.0], [0.0, -0.5]], dtype=torch.float64)
    assert lipschitz_lower_bound(lambda x: x @ a.T, (2,), samples=2, steps=2) == pytest.approx(2.0)
    quad = hessian_lower_bound(lambda x: (x**2).sum(1) * 1.5, 3, samples=2, steps=1)
    assert quad == pytest.approx(3.0)


def test_budget_shrinks_expensive_runs():
    # A far smaller budget must still return an attained, finite value.
    model, shape = zoo.ZOO["mnist_3f"]()
    value = curvature_lower_bound(model, shape, budget=1e6)
    assert 0 < value < math.inf
