"""Soundness fuzzer: random architectures and random single ops, certified bounds against
independent lower bounds (float64), estimates against certified bounds.

- Random architectures (``fuzz_models.random_case``: depth 1-8, widths 1-64, every smooth
  activation, residual adds, concatenations, 1-D/2-D convolutions with random stride, padding,
  dilation, groups and padding mode, batch norm with random running statistics, average and
  adaptive pooling, linear chains, scalings), both methods: certified L and M ≥ gradient-ascent
  lower bounds, estimate ≤ certified, ``Bounds.certified`` True.
- Single ops (``fuzz_models.random_op_case``): a linear op's certified L ≥ the exact spectral norm
  of its float64 Jacobian (and equal to it, up to the margins, where the bound is exact); an
  "affine → activation" block's certified M ≥ max|σ''|·max_i ‖row_i‖², a value the curvature
  attains (put row i's pre-activation where |σ''| peaks and move along row i).

The longer run (thousands of cases, with ratio statistics) is ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from fuzz_models import (
    ACTIVATIONS,
    OP_KINDS,
    attained_sup,
    check_case,
    exact_linear_norm,
    random_case,
    random_op_case,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import curvbound

FUZZ = settings(
    max_examples=160,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_OP = settings(FUZZ, max_examples=20)  # x 14 op kinds

# Single ops whose certified norm is exact (up to the float64 safety margins).
EXACT_KINDS = {"linear", "linear_chain", "bn", "scale", "reduce", "slice", "reshape"}


@FUZZ
@given(st.randoms(use_true_random=False))
def test_random_architectures_are_sound(rng: random.Random):
    case = random_case(rng)
    method = rng.choice(["naive", "compositional"])  # both methods every case: benchmarks/fuzz.py
    result = check_case(case.model, case.input_shape, methods=(method,), samples=4, steps=6,
                        seed=rng.getrandbits(16), refresh_steps=8)
    assert not result.violations, "\n".join([case.describe(), *result.violations])
    assert all(math.isfinite(v) for pair in result.bounds.values() for v in pair)


@settings(FUZZ, max_examples=16)
@given(st.randoms(use_true_random=False))
def test_random_architectures_with_sll_layers_are_sound(rng: random.Random):
    case = random_case(rng, max_depth=5, max_width=24, sll=0.5)
    method = rng.choice(["naive", "compositional"])
    result = check_case(case.model, case.input_shape, methods=(method,), samples=4, steps=6,
                        seed=rng.getrandbits(16), refresh_steps=8)
    assert not result.violations, "\n".join([case.describe(), *result.violations])
    assert all(math.isfinite(v) for pair in result.bounds.values() for v in pair)


def _bounds(model, shape, method, norms):
    x = torch.zeros(1, *shape, dtype=torch.float64)
    out = curvbound.compile(model, x, method=method, norms=norms)()
    return float(out.lipschitz), float(out.curvature), out.certified


@pytest.mark.parametrize("kind", OP_KINDS)
@PER_OP
@given(rng=st.randoms(use_true_random=False))
def test_single_ops_are_sound(kind: str, rng: random.Random):
    case = random_op_case(rng, kind)
    for method in ("naive", "compositional"):
        lc, mc, cert = _bounds(case.model, case.input_shape, method, "certified")
        le, me, _ = _bounds(case.model, case.input_shape, method, "estimate")
        assert cert, case.text
        assert le <= lc * (1 + 1e-9) and me <= mc * (1 + 1e-9), (case.text, le, lc, me, mc)
        if case.linear:
            exact, _ = exact_linear_norm(case.model, case.input_shape)
            assert mc == 0.0, case.text
            assert lc >= exact, (case.text, lc, exact)
            if kind in EXACT_KINDS and method == "compositional":  # naive: product of norms
                assert lc <= exact * (1 + 1e-7) + 1e-300, (case.text, lc, exact)
            if method == "compositional" and kind not in ("add", "cat"):
                # one merged chain, one norm: its estimate is from below
                assert le <= exact * (1 + 1e-9), (case.text, le, exact)
        else:
            _, J = exact_linear_norm(case.affine, case.input_shape)
            rows = J.norm(dim=1)
            curv = attained_sup(case.act, 2) * float(rows.max()) ** 2
            slope = attained_sup(case.act, 1) * float(rows.max())
            assert mc >= curv * (1 - 1e-9), (case.text, method, mc, curv)
            assert lc >= slope * (1 - 1e-9), (case.text, method, lc, slope)


@pytest.mark.parametrize("name,make", [a[:2] for a in ACTIVATIONS], ids=[a[0] for a in ACTIVATIONS])
def test_activation_constants_dominate_attained_values(name, make):
    """On a scalar input, L = sup|σ'| and M = sup|σ''| as used by the rule: each must be ≥ the
    largest |σ'|, |σ''| attained on a fine grid (float64 autograd)."""
    for seed in range(3):  # parameterised activations draw β/α from the rng
        act = make(random.Random(seed))
        L, M, cert = _bounds(nn.Sequential(act).double(), (1,), "compositional", "certified")
        assert cert
        assert L >= attained_sup(act, 1), (act, L)
        assert M >= attained_sup(act, 2), (act, M)
