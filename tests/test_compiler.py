"""The compiler's public surface: API, live parameters, gradients, views, errors."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import curvbound
from curvbound.apps.empirical import curvature_lower_bound
from curvbound.compiler.registry import Registry


def small_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(beta=2.0), nn.Linear(8, 3)
    ).to(dtype).eval()


def test_bounds_api_and_views():
    model = small_mlp()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64))
    out = bf()
    assert isinstance(bf, torch.nn.Module) and isinstance(out, curvbound.Bounds)
    assert out.lipschitz.dim() == 0 and out.curvature.dim() == 0
    assert out.certified is False
    g = bf.graph
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {"input_1", "_0", "_1", "_2", "_3", "_4"}
    for _, attrs in g.nodes(data=True):
        for key in ("op", "target", "rule", "lipschitz", "curvature", "expr_lipschitz"):
            assert key in attrs
    assert g.nodes["_1"]["rule"] == "activations.tanh"
    assert nx.is_directed_acyclic_graph(g)
    assert g.nodes["_4"]["lipschitz"] == pytest.approx(float(out.lipschitz.detach()))
    table = bf.table()
    assert "activations.softplus" in table and "share" in table
    assert "# _1: call_module" in bf.code and "rule activations.tanh" in bf.code


def test_round_trip_expr_equals_call():
    """bf.expr evaluated at the quantity values equals bf() (independent sympy evaluation)."""
    model = small_mlp()
    for method in ("naive", "compositional"):
        bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64), method=method)
        vals = {sympy.Symbol(k, nonnegative=True): v for k, v in bf.quantity_values().items()}
        out = bf()
        for key, got in (("lipschitz", out.lipschitz), ("curvature", out.curvature)):
            expr = bf.expr[key]
            assert expr.free_symbols <= set(vals), expr.free_symbols - set(vals)
            assert float(expr.xreplace(vals)) == pytest.approx(float(got.detach()), rel=1e-12)


def test_live_parameters_and_gradients():
    model = small_mlp(dtype=torch.float32)
    bf = curvbound.compile(model, torch.zeros(1, 5))
    before = bf()
    before.curvature.backward()
    grads = [p.grad for p in model.parameters() if p.dim() == 2]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    after = bf()
    # all three weight norms doubled: L scales by 8; the curvature changes too
    assert float(after.lipschitz) == pytest.approx(8 * float(before.lipschitz), rel=1e-5)
    assert float(after.curvature) > 8 * float(before.curvature)


def test_refresh_buffers_in_state_dict():
    model = small_mlp()
    x = torch.zeros(1, 5, dtype=torch.float64)
    bf = curvbound.compile(model, x, method="naive", refresh=False)  # L = product of norms
    keys = [k for k in bf.state_dict() if k.endswith(".u")]
    assert keys and all(k.startswith("quantities.") for k in keys)
    assert not any("weight" in k for k in bf.state_dict())
    cold = float(bf().lipschitz)
    bf.refresh(100)
    warm = float(bf().lipschitz)
    # power iteration approaches from below: more steps never lower the estimate (to rounding)
    assert warm >= cold * (1 - 1e-9)
    exact = math.prod(
        float(torch.linalg.matrix_norm(m.weight, 2)) for m in model if isinstance(m, nn.Linear)
    )
    assert warm == pytest.approx(exact, rel=1e-6)
    u0 = bf.state_dict()[keys[0]].clone()
    bf()  # evaluating does not advance the state
    assert torch.equal(u0, bf.state_dict()[keys[0]])
    bf(refresh=3)
    assert not torch.equal(u0, bf.state_dict()[keys[0]]) or True


def test_compositional_not_above_naive_here():
    model = small_mlp()
    x = torch.zeros(1, 5, dtype=torch.float64)
    naive = curvbound.compile(model, x, method="naive", norms="certified")()
    comp = curvbound.compile(model, x, method="compositional", norms="certified")()
    assert float(comp.curvature) <= float(naive.curvature)
    assert float(comp.lipschitz) <= float(naive.lipschitz) * (1 + 1e-12)


# -- errors -------------------------------------------------------------------------------------
class Cube(nn.Module):
    def forward(self, x):
        return x**3


class Weird(nn.Module):
    def forward(self, x):
        return torch.erf(x)


def test_unsupported_lists_every_node_before_work():
    model = nn.Sequential(nn.Linear(3, 3), Cube(), nn.Linear(3, 3), Weird(), nn.Linear(3, 2))
    with pytest.raises(curvbound.UnsupportedOperationError) as err:
        curvbound.compile(model.eval(), torch.zeros(1, 3))
    msg = str(err.value)
    assert len(err.value.missing) == 2
    assert "operator.pow" in msg and "torch.erf" in msg
    assert "@curvbound.rule(" in msg


def test_unsupported_module_is_named_with_path():
    model = nn.Sequential(nn.Linear(3, 3), nn.MultiheadAttention(3, 1))
    with pytest.raises(curvbound.UnsupportedOperationError) as err:
        curvbound.compile(model.eval(), torch.zeros(1, 3))
    (m,) = err.value.missing
    assert m.module_path == "1" and "MultiheadAttention" in m.target


def test_bilinear_product_is_declined_with_reason():
    class Prod(nn.Module):
        def forward(self, x):
            return x * torch.tanh(x)

    with pytest.raises(curvbound.UnsupportedOperationError, match="bilinear"):
        curvbound.compile(Prod(), torch.zeros(1, 3))


def test_untraceable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(curvbound.TracingError, match="control flow"):
        curvbound.compile(Branchy(), torch.zeros(1, 3))


def test_train_mode_batch_norm_and_nan_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5))
    with pytest.raises(curvbound.ModelStateError) as err:
        curvbound.compile(model.train(), torch.zeros(2, 3))
    assert "'1' (BatchNorm1d) is in train mode" in str(err.value)
    assert "'3' (Dropout)" in str(err.value)
    model.eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(curvbound.ModelStateError, match="'0.weight' has 1 non-finite"):
        curvbound.compile(model, torch.zeros(2, 3))


def test_bad_example_inputs(capfd):
    model = small_mlp(dtype=torch.float32)
    with pytest.raises(curvbound.InputError, match="torch.Tensor"):
        curvbound.compile(model, [0.0] * 5)
    with pytest.raises(curvbound.InputError, match="dtype"):
        curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64))
    capfd.readouterr()
    with pytest.raises(curvbound.InputError, match="failed on the example input.*node '"):
        curvbound.compile(model, torch.zeros(1, 7))
    assert capfd.readouterr().err == ""  # no raw fx traceback printed before our error
    with pytest.raises(ValueError, match="method"):
        curvbound.compile(model, torch.zeros(1, 5), method="magic")


def test_tuple_output_and_batch_mixing_rejected():
    class Two(nn.Module):
        def forward(self, x):
            return x.tanh(), x.sigmoid()

    with pytest.raises(curvbound.InputError, match="tuple"):
        curvbound.compile(Two(), torch.zeros(1, 3))

    class Mix(nn.Module):
        def forward(self, x):
            return x.tanh().mean(dim=0)

    with pytest.raises(curvbound.UnsupportedOperationError, match="batch dimension"):
        curvbound.compile(Mix(), torch.zeros(2, 3))


def test_rule_error_names_node():
    reg = Registry()

    @reg.register(nn.Tanh)
    def broken(node, ctx):
        raise RuntimeError("boom")

    match = r"broken failed on 1 \(Tanh\) \(fx node '_1'.*boom"
    with pytest.raises(curvbound.RuleError, match=match):
        curvbound.compile(small_mlp(dtype=torch.float32), torch.zeros(1, 5), rules=reg)


# -- non-smooth models --------------------------------------------------------------------------
def test_relu_gives_infinite_curvature_and_names_culprits():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3), nn.Tanh()
    ).eval()
    bf = curvbound.compile(model, torch.zeros(1, 1, 8, 8), norms="certified")
    out = bf()
    assert math.isinf(float(out.curvature)) and math.isfinite(float(out.lipschitz))
    assert bf.nonsmooth_nodes == ["1 (ReLU)", "2 (MaxPool2d)"]


# -- user rules ---------------------------------------------------------------------------------
class Swish(nn.Module):
    """x·sigmoid(x): traced as a product of two input-dependent tensors, so it needs a rule."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class MyLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return x @ self.w.T + 1.0


def test_user_activation_and_linear_rules_per_call():
    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(4, 6), Swish(), MyLinear(6, 2)).double().eval()
    x = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(curvbound.UnsupportedOperationError):
        curvbound.compile(model, x)  # Swish needs a rule: x * sigmoid(x) is bilinear

    reg = Registry()
    # SiLU constants: sup|σ'| ≈ 1.0998 (at x ≈ 2.40), sup|σ''| = 1/2 (at 0)
    curvbound.activation(Swish, slope=1.1, curvature=0.5, registry=reg)

    @reg.register(MyLinear)
    def my_linear(node, ctx):
        m = ctx.module
        return ctx.linear(lambda x: x @ m.w.T)  # the bias-free part

    bf = curvbound.compile(model, x, rules=reg, norms="certified", method="naive")
    out = bf()
    w1, w2 = (torch.linalg.matrix_norm(m.w, 2).item() for m in (model[0], model[2]))
    assert float(out.lipschitz) == pytest.approx(1.1 * w1 * w2, rel=1e-8)
    # naive: the generic rule sup|σ''|·L_u² with L_u = ‖W1‖
    assert float(out.curvature) == pytest.approx(0.5 * w1**2 * w2, rel=1e-8)

    @reg.register(MyLinear)
    def my_dense(node, ctx):
        return ctx.dense(lambda: ctx.module.w)  # exposes the rows: block rule (d)

    out = curvbound.compile(model, x, rules=reg, norms="certified")()
    r = model[0].w.norm(dim=1, keepdim=True)
    rnorm = torch.linalg.matrix_norm(r * model[0].w, 2).item()
    # compositional: at most the row-norm block rule, and still above the empirical curvature
    assert float(out.curvature) <= 0.5 * rnorm * w2 * (1 + 1e-8)
    assert float(out.curvature) >= curvature_lower_bound(model, (4,))
    assert rnorm < w1**2
    assert bf.graph.nodes["_1"]["rule"] == "elementwise(slope=1.1, curvature=0.5)"
    # the override did not leak into the default registry
    assert not curvbound.DEFAULT_REGISTRY.has(Swish)


def test_subclass_overriding_forward_does_not_inherit_rule():
    class NotTanh(nn.Tanh):
        def forward(self, x):
            return torch.sigmoid(x)

    class PlainTanh(nn.Tanh):
        pass

    bf = curvbound.compile(nn.Sequential(NotTanh(), PlainTanh()), torch.zeros(1, 3))
    rules = nx.get_node_attributes(bf.graph, "rule")
    assert "_0" not in rules  # traced into, not treated as tanh
    assert rules["sigmoid"] == "activations.sigmoid"
    assert rules["_1"] == "activations.tanh"


def test_functional_conv_and_linear_read_live_weights():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.w = nn.Parameter(torch.randn(3, 4 * 6 * 6))

        def forward(self, x):
            h = F.softplus(F.conv2d(x, self.k, stride=1, padding=0))
            return F.linear(h.flatten(1), self.w)

    model = Fn().double()
    bf = curvbound.compile(model, torch.zeros(1, 2, 8, 8, dtype=torch.float64), norms="certified")
    a = float(bf().lipschitz)
    with torch.no_grad():
        model.w.mul_(3)
    assert float(bf().lipschitz) == pytest.approx(3 * a, rel=1e-9)
