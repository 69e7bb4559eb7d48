"""Every registered rule has a row in the spec table, and every row is sound.

Soundness: the compiled bounds (certified norms, both methods) are ≥ empirical lower bounds found by
sampling and gradient ascent in float64 (curvbound.apps.empirical); non-smooth rows report an
infinite curvature and name the culprit nodes. Rows with torch's switching softplus
(``Bounds.error`` > 0) are checked as the library states them: L and M against lower bounds of the
smooth twin, and torch's own function on pairs straddling each switch,
‖f(x) − f(y)‖ ≤ L‖x − y‖ + 2·error and ‖f − twin‖ ≤ error (the jump fails the first without the
error term).
"""

from __future__ import annotations

import math

import pytest
import torch
from rule_specs import SPECS

import curvbound
from curvbound.apps.empirical import (
    curvature_lower_bound,
    lipschitz_lower_bound,
    straddling_pairs,
    switch_sites,
)
from curvbound.compiler.registry import DEFAULT_REGISTRY, lookup_key, target_name

RTOL = 1e-9  # float64 rounding of the bound itself; empirical values are attained ratios


def test_every_registered_rule_has_a_spec_row():
    covered = {k for spec in SPECS for k in spec.keys}
    missing = [target_name(k) for k in DEFAULT_REGISTRY.keys() if k not in covered]
    assert not missing, f"registered rules without a spec row: {missing}"
    unknown = [target_name(k) for k in covered if not DEFAULT_REGISTRY.has(k)]
    assert not unknown, f"spec rows for unregistered keys: {unknown}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_row_exercises_its_keys(spec):
    model = spec.build().double().eval()
    bf = curvbound.compile(model, torch.zeros(2, *spec.input_shape, dtype=torch.float64))
    seen = {lookup_key(n, bf.gm) for n in bf.gm.graph.nodes if n.op.startswith("call")}
    absent = [target_name(k) for k in spec.keys if k not in seen]
    assert not absent, f"{spec.name}: the model never calls {absent}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_row_is_sound(spec):
    model = spec.build().double().eval()
    x = torch.zeros(2, *spec.input_shape, dtype=torch.float64)
    results, errors, twin = {}, {}, model
    for method in ("naive", "compositional"):
        bf = curvbound.compile(model, x, method=method, norms="certified")
        out = bf()
        assert out.certified
        results[method] = (float(out.lipschitz), float(out.curvature))
        errors[method] = float(out.error)
        assert (errors[method] > 0) == bool(switch_sites(model))
        if errors[method] > 0:
            twin = bf.smooth_twin(torch.float64)
        est = curvbound.compile(model, x, method=method)()
        assert float(est.lipschitz) <= float(out.lipschitz) * (1 + 1e-6)
        if spec.smooth:
            assert float(est.curvature) <= float(out.curvature) * (1 + 1e-6)
        else:
            assert math.isinf(float(out.curvature)) and bf.nonsmooth_nodes
    if twin is not model:
        _check_straddling_pairs(model, twin, spec.input_shape, results, errors)
    lip_lb = lipschitz_lower_bound(twin, spec.input_shape, samples=16, steps=30, seed=1)
    for method, (L, _) in results.items():
        assert L >= lip_lb * (1 - RTOL), f"{method}: L = {L} < empirical {lip_lb}"
    if spec.smooth:
        curv_lb = curvature_lower_bound(twin, spec.input_shape, samples=16, steps=30, seed=1)
        assert curv_lb > 0
        for method, (_, M) in results.items():
            assert M >= curv_lb * (1 - RTOL), f"{method}: M = {M} < empirical {curv_lb}"
        assert results["compositional"][1] <= results["naive"][1] * (1 + 1e-12)


def _check_straddling_pairs(model, twin, shape, results, errors):
    x, y = straddling_pairs(model, shape, samples=24, scale=2.0, seed=2)
    assert len(x) >= 8, "the spec row's switches should be reachable"
    with torch.no_grad():
        fx_, fy = model(x).flatten(1), model(y).flatten(1)
        dev = (fy - twin(y).flatten(1)).norm(dim=1)
    jump, dist = (fx_ - fy).norm(dim=1), (x - y).flatten(1).norm(dim=1)
    for method, (L, _) in results.items():
        assert bool((jump <= (L * dist + 2 * errors[method]) * (1 + RTOL) + 1e-15).all()), method
        assert bool((dev <= errors[method] * (1 + RTOL) + 1e-15).all()), method
    assert bool((jump > results["compositional"][0] * dist * 2).any())  # the pairs see the jump
