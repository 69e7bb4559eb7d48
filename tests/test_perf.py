"""The optimised evaluation against a straightforward evaluation of the same quantities.

- one call of the bound function shares each quantity's value (runtime/norms.shared_evaluation):
  the bounds and their gradients equal those of evaluating every quantity afresh at every use;
- compile-time convergence (runtime/converge.py) gives estimates from below that agree with the
  exact spectral norms of the materialised matrices, and says when it stops early;
- the memory check raises a library error before any work.
No timings here: speed is measured by benchmarks/run.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps import zoo
from curvbound.compiler.errors import ResourceError
from curvbound.passes.checks import check_resources
from curvbound.runtime.converge import converge
from curvbound.runtime.norms import Norm, Quantity
from curvbound.runtime.operators import Dense
from curvbound.runtime.products import HadamardNorm, ProductNorm, matrix_of


def _models():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 12), nn.Tanh(), nn.Linear(12, 3),
    ).eval()
    return [
        (zoo.mlp([7, 16, 16, 16, 16, 5], nn.Tanh), torch.zeros(1, 7)),
        (cnn, torch.zeros(1, 2, 8, 8)),
    ]


def _straightforward(bf):
    """The generated function with every quantity evaluated at each use (no sharing)."""
    return bf._fn(dict(bf.quantities.items()))


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("method", ["compositional", "paper"])
def test_shared_evaluation_equals_fresh_evaluation(index, method):
    model, x = _models()[index]
    if method == "paper" and index == 1:
        method = "naive"
    bf = curvbound.compile(model, x, method=method, refresh=False)
    bf.refresh(5)
    calls = {}

    def count(module, args, out):
        calls[id(module)] = calls.get(id(module), 0) + 1

    hooks = [q.register_forward_hook(count) for q in bf.modules() if isinstance(q, Quantity)]
    out = bf()
    shared_calls = dict(calls)
    calls.clear()
    L, M, _ = _straightforward(bf)
    fresh_calls = dict(calls)
    for h in hooks:
        h.remove()
    assert max(shared_calls.values()) == 1  # each quantity evaluated once per call
    assert sum(fresh_calls.values()) >= sum(shared_calls.values())
    assert torch.equal(out.lipschitz, torch.as_tensor(L, dtype=out.lipschitz.dtype))
    assert torch.equal(out.curvature, torch.as_tensor(M, dtype=out.curvature.dtype))
    params = [p for p in model.parameters()]
    g_shared = torch.autograd.grad(bf().curvature, params, allow_unused=True)
    g_fresh = torch.autograd.grad(torch.as_tensor(_straightforward(bf)[1]), params,
                                  allow_unused=True)
    for a, b in zip(g_shared, g_fresh):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_converged_estimates_match_exact_norms_from_below():
    model = zoo.mlp([6, 24, 24, 24, 4], nn.Tanh).double()
    bf = curvbound.compile(model, torch.zeros(1, 6, dtype=torch.float64), refresh=False)
    bf.refresh(tol=1e-10)
    report = bf.last_convergence
    assert report.converged and report.steps <= 2000
    checked = 0
    for q in bf.quantities.values():
        if isinstance(q, Norm) and not q.certified:
            exact = float(torch.linalg.matrix_norm(matrix_of(q.op).detach().double(), 2))
            est = float(q())
            assert est <= exact * (1 + 1e-9)
            assert est >= exact * (1 - 1e-6), (q.label, est, exact)
            checked += isinstance(q, ProductNorm)
    assert checked >= 6


def test_converge_matches_exact_bound_of_the_paper_method():
    """The bound after convergence equals the bound with every estimate replaced by the exact
    norm (method "paper": the output's bound is a fixed function of the norms)."""
    model = zoo.mlp([5, 12, 12, 3], nn.Tanh).double()
    bf = curvbound.compile(model, torch.zeros(1, 5, dtype=torch.float64), method="paper")
    out = bf()
    exact = {}
    for k, q in bf.quantities.items():
        if isinstance(q, Norm):
            exact[k] = torch.linalg.matrix_norm(matrix_of(q.op).detach().double(), 2)
        elif isinstance(q, HadamardNorm):
            exact[k] = q().detach()

    class Fixed:
        def __init__(self, v):
            self.v = v

        def __call__(self):
            return self.v

    # (LipLT factors read their products themselves: those are the converged estimates)
    q = {k: Fixed(exact[k]) if k in exact else v for k, v in bf.quantities.items()}
    L, M, _ = bf._fn(q)
    assert float(out.lipschitz) == pytest.approx(float(L), rel=1e-5)
    assert float(out.curvature) == pytest.approx(float(M), rel=1e-5)
    assert float(out.curvature) <= float(M) * (1 + 1e-9)


def test_converge_warns_when_max_steps_is_reached():
    torch.manual_seed(1)
    w = torch.randn(300, 300)
    n = Norm(Dense(lambda: w, (300,), (300,)), "estimate")
    with pytest.warns(UserWarning, match="max_steps"):
        report = converge([n], lambda: (float(n()),), tol=1e-14, max_steps=3)
    assert not report.converged and report.steps == 3
    exact = float(torch.linalg.matrix_norm(w.double(), 2))
    assert float(n()) <= exact * (1 + 1e-6)


def test_resource_check_names_the_layer_before_any_work():
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 4))
    with pytest.raises(ResourceError, match=r"layer '0' \(200×300 float32"):
        check_resources(model, "estimate", available=100_000)
    check_resources(model, "estimate", available=10**9)  # enough: no error
    with pytest.raises(ResourceError, match="norms='certified'"):
        check_resources(model, "certified", available=300_000)


def test_refresh_with_a_progress_bar_reaches_the_same_estimates():
    pytest.importorskip("tqdm")
    model = zoo.mlp([5, 16, 16, 3], nn.Tanh)
    a = curvbound.compile(model, torch.zeros(1, 5), refresh=False)
    b = curvbound.compile(model, torch.zeros(1, 5), refresh=False)
    assert a.refresh(progress=True) == b.refresh(progress=False) > 0
    assert torch.equal(a().curvature, b().curvature)
