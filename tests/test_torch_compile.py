"""``bf.compiled()``: the estimate-mode bound under torch.compile equals the eager bound (values,
gradients, power-iteration state), is one graph without breaks, does not recompile across
refresh calls, and certified mode is refused. Most tests use the "eager"/"aot_eager" backends
(capture without code generation: fast); one runs inductor."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import curvbound
from curvbound import InputError
from curvbound.apps import zoo
from curvbound.runtime import compiled_steps
from curvbound.runtime.compiled_steps import norm_steps, segment_steps
from curvbound.runtime.products import HadamardNorm, ProductNorm


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3))


# small models: dynamo's tracing time grows with the number of ops (the steps are unrolled)
MODELS = {
    "mlp": lambda: (zoo.mlp([5, 8, 8, 3], nn.Tanh), torch.zeros(1, 5)),
    "cnn": lambda: (_cnn(), torch.zeros(1, 2, 4, 4)),
    "residual": lambda: (zoo.residual_mlp(4, 6, 3, blocks=1), torch.zeros(1, 4)),
    "flatten_mlp": lambda: (nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(),
                                          nn.Linear(6, 3)), torch.zeros(1, 3, 4)),
}


def _pair(name: str, refresh: bool = False):
    """An eager bound and an independent copy (same weights and state) to compile."""
    model, x = MODELS[name]()
    bf = curvbound.compile(model, x, refresh=refresh)
    return bf, copy.deepcopy(bf)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,backend", [pytest.param("mlp", "aot_eager", marks=pytest.mark.slow),
                                          ("mlp", "eager"), ("cnn", "eager"),
                                          ("residual", "eager"), ("flatten_mlp", "eager")])
def test_compiled_equals_eager_values_gradients_and_state(name, backend):
    bf, twin = _pair(name)
    cb = twin.compiled(backend=backend)
    for k in (2, 2):  # one compiled entry (a Lanczos cycle of 2 steps), called again
        a, b = cb(refresh=k), bf(refresh=k)
        for x, y in ((a.lipschitz, b.lipschitz), (a.curvature, b.curvature)):
            assert float(x) == pytest.approx(float(y), rel=1e-5, abs=1e-7)
        assert a.certified is b.certified is False
        assert set(a.nodes) == set(b.nodes)
    # gradients in the model's parameters
    bf.model.zero_grad()
    twin.model.zero_grad()
    lipschitz_and_curvature = lambda o: o.lipschitz + o.curvature  # noqa: E731
    lipschitz_and_curvature(cb(refresh=2)).backward()
    lipschitz_and_curvature(bf(refresh=2)).backward()
    for ga, gb in zip(_grads(twin.model), _grads(bf.model), strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    # the power-iteration state advanced alike (up to the sign of a Ritz vector)
    for (k, ua), (_, ub) in zip(twin.state_dict().items(), bf.state_dict().items(), strict=True):
        ua, ub = ua.double().reshape(-1), ub.double().reshape(-1)
        assert min((ua - ub).norm(), (ua + ub).norm()) <= 1e-4 * max(1.0, ub.norm()), k


def test_one_graph_no_breaks_no_recompiles_over_refresh_calls():
    bf, _ = _pair("residual")
    cb = bf.compiled(backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            cb(refresh=2).curvature.backward()
            with torch.no_grad():  # an optimiser step: parameters change in place
                for p in bf.model.parameters():
                    if p.grad is not None:
                        p.sub_(1e-3 * p.grad)
                        p.grad = None
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert sum(counters["recompiles"].values()) == 0


def test_tensor_only_steps_match_the_eager_steps():
    """The compiled steps are the eager Norm.step / Segment.sweep arithmetic (no compiler)."""
    bf, twin = _pair("mlp")
    eager = {k: q for k, q in bf.quantities.items()}
    seen = set()
    for q in twin.quantities.values():
        if isinstance(q, ProductNorm):
            if id(q.segment) not in seen:
                seen.add(id(q.segment))
                live = [m for m in q.segment.own if not m.certified]
                segment_steps(q.segment, live, 25)  # a full cycle of 20, then 5
        elif type(q).__name__ == "Norm":
            norm_steps(q, 25)
    bf.refresh(25)
    for k, q in twin.quantities.items():
        if isinstance(q, ProductNorm) or type(q).__name__ == "Norm":
            assert float(q()) == pytest.approx(float(eager[k]()), rel=1e-6), k


def test_hadamard_block_norm_is_warm_started_and_settles_to_the_eigenvalue():
    model, x = MODELS["mlp"]()
    bf = curvbound.compile(model, x, method="paper")
    blocks = [q for q in bf.quantities.values() if isinstance(q, HadamardNorm)]
    assert blocks
    for q in blocks:
        exact = torch.linalg.eigvalsh(q.gram().detach().double())[-1].sqrt()
        assert float(q()) == pytest.approx(float(exact), rel=1e-5)
        q.v.copy_(torch.ones_like(q.v) / q.v.numel() ** 0.5)  # a poor vector: from below
        assert float(q()) <= float(exact) * (1 + 1e-6)
        q.step(200)
        assert float(q()) == pytest.approx(float(exact), rel=1e-3)
    bf.refresh()
    for q in blocks:
        exact = torch.linalg.eigvalsh(q.gram().detach().double())[-1].sqrt()
        assert float(q()) == pytest.approx(float(exact), rel=1e-5)


def test_certified_mode_is_refused_with_the_reason():
    model, x = MODELS["mlp"]()
    bf = curvbound.compile(model, x, norms="certified")
    with pytest.raises(InputError, match="estimate-mode bounds only.*float64"):
        bf.compiled()


def test_penalty_with_torch_compile_equals_eager():
    model, x = MODELS["mlp"]()
    twin = copy.deepcopy(model)
    eager = curvbound.CurvaturePenalty(model, x, weight=0.5, refresh_steps=1)
    comp = curvbound.CurvaturePenalty(twin, x, weight=0.5, refresh_steps=1,
                                      torch_compile="aot_eager")
    for _ in range(2):
        a, b = comp(), eager()
        assert float(a) == pytest.approx(float(b), rel=1e-5)
        assert comp.value == pytest.approx(eager.value, rel=1e-5)
        a.backward()
        b.backward()
    for ga, gb in zip(_grads(twin), _grads(model), strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="margins"):
        curvbound.CurvaturePenalty(model, x, margins=True, torch_compile="aot_eager")


@pytest.mark.slow  # inductor's code generation: about a minute and a half on two cores
def test_inductor_matches_eager():
    bf, twin = _pair("flatten_mlp", refresh=True)
    cb = twin.compiled(backend="inductor", fullgraph=True)
    for _ in range(2):
        a, b = cb(refresh=1), bf(refresh=1)
        assert float(a.curvature) == pytest.approx(float(b.curvature), rel=1e-5)
        assert float(a.lipschitz) == pytest.approx(float(b.lipschitz), rel=1e-5)
    assert sum(counters["graph_break"].values()) == 0


def test_docstring_examples_of_the_compiled_steps():
    result = doctest.testmod(compiled_steps, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_compiled_follows_a_recompiled_bound():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    bf = curvbound.compile(model, torch.zeros(1, 3))
    cb = bf.compiled(backend="eager")
    cb(refresh=1)
    model[0] = nn.Linear(3, 4)
    with pytest.raises(curvbound.StaleBoundError):
        cb()
    bf.recompile()
    assert float(cb(refresh=1).curvature) == pytest.approx(float(bf().curvature), rel=1e-6)
