"""Soundness on the model zoo: compiled bounds ≥ empirical lower bounds (float64), for both
methods, estimated and certified norms; compositional ≤ naive; certified ≥ estimate."""

from __future__ import annotations

import pytest
import torch

import curvbound
from curvbound import zoo
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound

BUDGET = {  # (samples, steps) of the empirical ascent: smaller for the 3072-input CIFAR models
    "cifar_6c2f": (4, 10),
    "cifar_6f": (4, 12),
}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_bounds_are_sound(name):
    model, shape = zoo.ZOO[name]()
    model = model.double()
    x = torch.zeros(1, *shape, dtype=torch.float64)
    got = {}
    for method in ("naive", "compositional"):
        for norms in ("estimate", "certified"):
            out = curvbound.compile(model, x, method=method, norms=norms)()
            assert out.certified is (norms == "certified"), (name, method, norms)
            got[method, norms] = (float(out.lipschitz.detach()), float(out.curvature.detach()))
    samples, steps = BUDGET.get(name, (12, 25))
    lip = lipschitz_lower_bound(model, tuple(shape), samples=samples, steps=steps, seed=3)
    curv = curvature_lower_bound(model, tuple(shape), samples=samples, steps=steps, seed=3)
    assert lip > 0 and curv > 0
    for key, (L, M) in got.items():
        # estimates come from converged power iteration; certified values are guaranteed
        slack = 1e-9 if key[1] == "certified" else 1e-4
        assert L >= lip * (1 - slack), f"{name} {key}: L={L} < empirical {lip}"
        assert M >= curv * (1 - slack), f"{name} {key}: M={M} < empirical {curv}"
    for norms in ("estimate", "certified"):
        assert got["compositional", norms][1] <= got["naive", norms][1] * (1 + 1e-9)
        assert got["compositional", norms][0] <= got["naive", norms][0] * (1 + 1e-9)
    for method in ("naive", "compositional"):
        (le, me), (lc, mc) = got[method, "estimate"], got[method, "certified"]
        assert le <= lc * (1 + 1e-6) and me <= mc * (1 + 1e-6)
