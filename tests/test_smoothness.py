"""Activation constants (runtime/smoothness.py): every record is sound and tight on a dense
grid, its torch σ, σ', σ'' agree with torch and autograd, the exact constants come out of sympy
again from independent definitions, and the verified ones come out of the interval method again."""

from __future__ import annotations

import doctest
import math
from functools import lru_cache

import mpmath
import pytest
import sympy
import torch
from mpmath import iv
from torch import nn

from curvbound.nn import CenteredSoftplus
from curvbound.runtime import smoothness as S

# -- the spec table: one row per record we check (every catalogue entry has at least one) ---------
# (catalogue name, parameters, the torch module it models, points where σ' jumps or kinks)
ROWS = [
    ("tanh", {}, nn.Tanh(), ()),
    ("sigmoid", {}, nn.Sigmoid(), ()),
    ("softplus", {"threshold": 20.0}, nn.Softplus(), ()),
    ("softplus", {"beta": 2.5, "threshold": 20.0}, nn.Softplus(beta=2.5), ()),
    ("centered_softplus", {"beta": 0.5}, CenteredSoftplus(beta=0.5), ()),
    ("centered_softplus", {"beta": 3.0}, CenteredSoftplus(beta=3.0), ()),
    ("silu", {}, nn.SiLU(), ()),
    ("gelu", {}, nn.GELU(), ()),
    ("gelu", {"approximate": "tanh"}, nn.GELU(approximate="tanh"), ()),
    ("elu", {}, nn.ELU(), (0.0,)),
    ("elu", {"alpha": 0.5}, nn.ELU(alpha=0.5), (0.0,)),
    ("elu", {"alpha": 2.0}, nn.ELU(alpha=2.0), (0.0,)),
    ("celu", {}, nn.CELU(), (0.0,)),
    ("celu", {"alpha": 0.5}, nn.CELU(alpha=0.5), (0.0,)),
    ("celu", {"alpha": 3.0}, nn.CELU(alpha=3.0), (0.0,)),
    ("mish", {}, nn.Mish(), ()),
    ("logsigmoid", {}, nn.LogSigmoid(), ()),
    ("relu", {}, nn.ReLU(), (0.0,)),
    ("leaky_relu", {}, nn.LeakyReLU(), (0.0,)),
    ("leaky_relu", {"negative_slope": 0.2}, nn.LeakyReLU(0.2), (0.0,)),
    ("leaky_relu", {"negative_slope": -0.5}, nn.LeakyReLU(-0.5), (0.0,)),
    ("leaky_relu", {"negative_slope": 3.0}, nn.LeakyReLU(3.0), (0.0,)),
    ("hardtanh", {}, nn.Hardtanh(), (-1.0, 1.0)),
    ("hardtanh", {"min_val": 0.0, "max_val": 6.0}, nn.ReLU6(), (0.0, 6.0)),
]
IDS = [f"{name}{params or ''}" for name, params, _, _ in ROWS]
NON_SMOOTH = {"relu", "leaky_relu", "hardtanh"}


def test_every_catalogue_entry_has_a_row():
    assert {row[0] for row in ROWS} == set(S.CATALOGUE)
    assert set(S.CATALOGUE) <= set(S.__all__)


@lru_cache
def _grid() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    dense = torch.linspace(-30, 30, 600_001, dtype=torch.float64)  # step 1e-4, contains 0
    rand = torch.cat([5 * torch.randn(20_000, generator=gen, dtype=torch.float64),
                      60 * torch.rand(5_000, generator=gen, dtype=torch.float64) - 30])  # fmt: skip
    return torch.cat([dense, rand])


def _away_from(z: torch.Tensor, kinks: tuple[float, ...], eps: float = 1e-6) -> torch.Tensor:
    keep = torch.ones_like(z, dtype=torch.bool)
    for k in kinks:
        keep &= (z - k).abs() > eps
    return z[keep]


# float64 evaluation of σ', σ'' is off by a few ulps at most
ROUNDING = 1e-12


@pytest.mark.parametrize(("name", "params", "module", "kinks"), ROWS, ids=IDS)
def test_sound_and_tight_on_a_dense_grid(name, params, module, kinks):
    rec = S.lookup(name, **params)
    z = _grid()
    d1 = rec.d1(z)
    lo, hi = (float(v) for v in rec.slope_range)
    assert d1.abs().max().item() <= rec.slope_float * (1 + ROUNDING)
    assert lo - ROUNDING <= d1.min().item() and d1.max().item() <= hi + ROUNDING
    # tight: the grid comes within 1e-3 (relative) of every constant
    assert d1.abs().max().item() >= rec.slope_float * (1 - 1e-3)
    assert d1.min().item() <= lo + 1e-3 * max(1.0, abs(lo))
    assert d1.max().item() >= hi - 1e-3 * max(1.0, abs(hi))
    if rec.d2 is not None:
        d2 = rec.d2(z).abs().max().item()
        assert d2 <= rec.curvature_float * (1 + ROUNDING)
        assert d2 >= rec.curvature_float * (1 - 1e-3)


@pytest.mark.parametrize(("name", "params", "module", "kinks"), ROWS, ids=IDS)
def test_torch_functions_agree_with_torch_and_autograd(name, params, module, kinks):
    rec = S.lookup(name, **params)
    z = _away_from(_grid()[::7], kinks)
    assert torch.equal(rec.fn(z), module(z))
    assert torch.equal(rec.fn(z.float()), module(z.float()))
    x = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rec.fn(x).sum(), x, create_graph=True)
    # softplus is the identity past βz > 20 in torch: its derivatives move by at most β·s(−20)
    torch.testing.assert_close(rec.d1(z), g.detach(), rtol=1e-9, atol=1e-8)
    if rec.d2 is not None:
        (h,) = torch.autograd.grad(g.sum(), x)
        torch.testing.assert_close(rec.d2(z), h, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize(("name", "params", "module", "kinks"), ROWS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_for_large_inputs(name, params, module, kinks, dtype):
    rec = S.lookup(name, **params)
    big = torch.tensor([1e4, 3e3, 1e3, 300.0, 100.0, 88.0, 50.0, 30.0, 21.0, 19.0], dtype=dtype)
    z = torch.cat([-big, torch.zeros(1, dtype=dtype), big])
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(rec.fn(z)).all()
    d1 = rec.d1(z)
    assert torch.isfinite(d1).all() and d1.abs().max() <= rec.slope_float * (1 + slack)
    if rec.d2 is not None:
        d2 = rec.d2(z)
        assert torch.isfinite(d2).all() and d2.abs().max() <= rec.curvature_float * (1 + slack)


@pytest.mark.parametrize(("name", "params", "module", "kinks"), ROWS, ids=IDS)
def test_record_shape(name, params, module, kinks):
    rec = S.lookup(name, **params)
    if name in NON_SMOOTH or (name == "elu" and params.get("alpha", 1.0) != 1.0):
        assert rec.curvature == sympy.oo and not rec.smooth and rec.d2 is None
        assert rec.curvature_float == math.inf and rec.exact
    else:
        assert rec.curvature.is_finite and rec.smooth and rec.d2 is not None
    assert rec.slope.is_finite and rec.slope_range[0] <= rec.slope_range[1]
    assert rec.method and "\n" not in rec.method
    for value, as_float in ((rec.slope, rec.slope_float), (rec.curvature, rec.curvature_float)):
        if value.is_finite:  # rounded up, and by the least amount
            assert sympy.Rational(as_float) >= value
            assert sympy.Rational(math.nextafter(as_float, -math.inf)) < value
    assert S.lookup(name, **params) is rec  # cached


def test_constructors_are_cached_across_spellings_and_reject_bad_parameters():
    assert S.softplus(1) is S.softplus(beta=1.0) is S.lookup("softplus")
    assert S.elu(alpha=1) is S.elu()
    assert S.gelu("tanh") is S.lookup("gelu", approximate="tanh")
    with pytest.raises(KeyError, match="known"):
        S.lookup("swish")
    for bad in (lambda: S.softplus(0.0), lambda: S.celu(-1.0), lambda: S.gelu("erf"),
                lambda: S.hardtanh(1.0, -1.0)):  # fmt: skip
        with pytest.raises(ValueError):
            bad()


def test_docstrings_state_the_bound_in_one_line():
    for ctor in S.CATALOGUE.values():
        first = ctor.__doc__.splitlines()[0]
        assert "sup|σ'|" in first and "sup|σ''|" in first, ctor.__name__


def test_docstring_examples_run():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- exact constants: sympy derives them again from definitions written here ----------------------
z = sympy.Symbol("z", real=True)
beta = sympy.Symbol("beta", positive=True)
alpha = sympy.Symbol("alpha", positive=True)
_sig = lambda x: 1 / (1 + sympy.exp(-x))
DEFINITIONS = {
    "tanh": sympy.tanh(z),
    "sigmoid": _sig(z),
    "softplus": sympy.log(1 + sympy.exp(beta * z)) / beta,
    "centered_softplus": sympy.log(1 + sympy.exp(beta * z)) / beta - sympy.log(2) / beta,
    "logsigmoid": sympy.log(_sig(z)),
    "gelu": z * (1 + sympy.erf(z / sympy.sqrt(2))) / 2,
    "elu": [(alpha * (sympy.exp(z) - 1), -sympy.oo, 0), (z, 0, sympy.oo)],
    "celu": [(alpha * (sympy.exp(z / alpha) - 1), -sympy.oo, 0), (z, 0, sympy.oo)],
}
EXACT_ROWS = [
    ("tanh", {}, {}),
    ("sigmoid", {}, {}),
    ("softplus", {"beta": 1.0}, {beta: 1}),
    ("softplus", {"beta": 2.5}, {beta: sympy.Rational(5, 2)}),
    ("centered_softplus", {"beta": 0.5}, {beta: sympy.Rational(1, 2)}),
    ("logsigmoid", {}, {}),
    ("gelu", {}, {}),
    ("elu", {"alpha": 1.0}, {alpha: 1}),
    ("elu", {"alpha": 2.0}, {alpha: 2}),
    ("celu", {"alpha": 1.0}, {alpha: 1}),
    ("celu", {"alpha": 0.5}, {alpha: sympy.Rational(1, 2)}),
]


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a == sympy.oo or b == sympy.oo:
        return a == b
    return abs(sympy.N(a - b, 50)) < 1e-40


@lru_cache
def _derived(name: str) -> S.Derived:
    return S.derive(DEFINITIONS[name], z)


@pytest.mark.parametrize(
    ("name", "params", "subs"), EXACT_ROWS, ids=[r[0] + str(r[1]) for r in EXACT_ROWS]
)
def test_exact_constants_rederived_with_sympy(name, params, subs):
    rec = S.lookup(name, **params)
    pieces = DEFINITIONS[name]
    if isinstance(pieces, list):  # α is a number here: the continuity check at 0 needs it
        got = S.derive([(f.subs(subs), lo, hi) for f, lo, hi in pieces], z)
    else:
        got = _derived(name)
    assert rec.exact and got.smooth == rec.smooth
    assert _same(got.slope.subs(subs), rec.slope)
    assert _same(got.curvature.subs(subs), rec.curvature)
    for a, b in zip(got.slope_range, rec.slope_range):
        assert _same(a.subs(subs), b)


def test_parameterised_constants_are_symbolic():
    assert _derived("softplus").curvature == beta / 4
    got = S.derive(DEFINITIONS["celu"], z)
    assert got.curvature == 1 / alpha and got.slope == 1 and got.smooth


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_definitions_here_are_the_torch_functions(name):
    params = {"softplus": {"beta": 2.5}, "centered_softplus": {"beta": 2.5},
              "elu": {"alpha": 0.5}, "celu": {"alpha": 0.5}}.get(name, {})  # fmt: skip
    rec = S.lookup(name, **params)
    subs = {beta: sympy.Rational(5, 2), alpha: sympy.Rational(1, 2)}
    pieces = DEFINITIONS[name]
    pieces = pieces if isinstance(pieces, list) else [(pieces, -sympy.oo, sympy.oo)]
    for x in (-7.5, -2.0, -0.3, 0.4, 1.7, 6.0):
        (f,) = [f for f, lo, hi in pieces if lo < x < hi]
        want = float(f.subs(subs).subs(z, sympy.Rational(x)).evalf(30))
        got = rec.fn(torch.tensor(x, dtype=torch.float64)).item()
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_no_closed_form_is_reported_not_guessed():
    with pytest.raises(ValueError, match="enclose"):
        S.derive(z * _sig(z), z)


def test_silu_curvature_by_hand():
    """σ'' = s(z)s(−z)(2 + z(1 − 2s(z))) with 1 − 2s(z) = −tanh(z/2), so σ'' ≤ 2s(z)s(−z) ≤ 1/2."""
    s = _sig(z)
    assert sympy.simplify((1 - 2 * s + sympy.tanh(z / 2)).rewrite(sympy.exp)) == 0
    d2 = sympy.diff(z * s, z, 2)
    assert sympy.simplify(d2 - s * (1 - s) * (2 + z * (1 - 2 * s))) == 0
    assert _derived("sigmoid").slope_range[1] == sympy.Rational(1, 4)  # max s(z)s(−z) = max s'(z)
    enc = _enclosure("silu")
    assert enc.sup_d2[0] <= S.silu().curvature and -enc.inf_d2[0] < S.silu().curvature


# -- verified constants: the interval method runs again -------------------------------------------
@lru_cache
def _enclosure(name: str) -> S.Enclosure:
    return S.enclose(name)


@pytest.mark.parametrize("name", sorted(S.VERIFIED))
def test_verified_table_is_the_rounded_enclosure(name):
    assert S.VERIFIED[name] == _enclosure(name).rounded()


@pytest.mark.parametrize(("name", "params"), [("silu", {}), ("gelu", {"approximate": "tanh"}),
                                              ("mish", {})])  # fmt: skip
def test_verified_constants_bound_the_enclosures(name, params):
    rec = S.lookup(name, **params)
    enc = _enclosure("gelu_tanh" if name == "gelu" else name)
    # each bracket is tight
    for lo, hi in (enc.sup_d1, enc.inf_d1, enc.sup_d2, enc.inf_d2):
        assert lo <= hi and hi - lo <= 1e-8
    assert rec.slope >= enc.slope and rec.slope <= enc.slope * (1 + 1e-3)
    assert rec.slope_range[0] <= enc.slope_range[0] and rec.slope_range[1] >= enc.slope_range[1]
    assert abs(rec.slope_range[0] - enc.slope_range[0]) <= 1e-3 * abs(enc.slope_range[0])
    assert rec.slope_range[1] <= enc.slope_range[1] * (1 + 1e-3)
    if name == "silu":  # exact 1/2 by hand (test_silu_curvature_by_hand)
        assert rec.curvature == sympy.Rational(1, 2)
    else:
        assert enc.curvature <= rec.curvature <= enc.curvature * (1 + 1e-3)


def test_exact_gelu_lies_in_its_enclosure():
    rec, enc = S.gelu(), _enclosure("gelu")
    inside = lambda v, b: sympy.N(b[0] - v, 30) <= 0 <= sympy.N(b[1] - v, 30)
    assert inside(rec.slope_range[1], enc.sup_d1) and inside(rec.slope_range[0], enc.inf_d1)
    assert inside(rec.curvature, enc.sup_d2)
    assert inside(-2 * sympy.exp(-2) / sympy.sqrt(2 * sympy.pi), enc.inf_d2)


@pytest.mark.parametrize(("name", "record"), [("silu", S.silu), ("gelu", S.gelu),
                                              ("gelu_tanh", lambda: S.gelu("tanh")),
                                              ("mish", S.mish)])  # fmt: skip
def test_interval_jets_are_the_torch_functions(name, record):
    """The functions the interval method encloses are the ones torch computes."""
    jet, tail = S._ENCLOSABLE[name]
    rec = record()
    for x in (-9.0, -2.25, -0.5, 0.0, 0.125, 1.5, 3.0, 11.0):
        c = jet(S._Jet([iv.mpf(x), iv.mpf(1), iv.mpf(0), iv.mpf(0)])).c
        t = torch.tensor(x, dtype=torch.float64)
        for enclosure, value in ((c[1], rec.d1(t)), (2 * c[2], rec.d2(t))):
            assert float(enclosure.a) - 1e-13 <= value.item() <= float(enclosure.b) + 1e-13
    # the tail bounds hold where they claim to (a numerical sanity check of their proofs)
    left1, left2, right1, right2 = tail(20.0)
    far = torch.linspace(20, 80, 6001, dtype=torch.float64)
    for zs, t1, t2 in ((far, right1, right2), (-far, left1, left2)):
        for vals, bound in ((rec.d1(zs), t1), (rec.d2(zs), t2)):
            assert float(bound.a) - 1e-15 <= vals.min().item()
            assert vals.max().item() <= float(bound.b) + 1e-15


def test_normal_cdf_enclosure():
    for x in (-9.0, -6.5, -6.0, -2.0, -0.25, 0.0, 0.5, 2.0, 5.999, 6.0, 7.0, 9.0):
        e = S._normal_cdf_point(mpmath.mpf(x))
        lo, hi = S._lo(e), S._hi(e)
        with mpmath.workdps(40):
            exact = mpmath.ncdf(mpmath.mpf(x))
        assert lo <= exact <= hi
        assert hi - lo <= 1e-15 or abs(x) > 6


def test_outward_decimal_rounding():
    q = sympy.Rational(1, 3)
    assert S._decimal(q, 6, up=True) == "0.333334" and S._decimal(q, 6, up=False) == "0.333333"
    assert S._decimal(-q, 6, up=True) == "-0.333333" and S._decimal(-q, 6, up=False) == "-0.333334"
    assert S._decimal(sympy.Rational(9999999, 10**7), 6, up=True) == "1.00000"
    assert S._decimal(sympy.Rational(1, 2), 6, up=True) == "0.500000"
    assert S._decimal(sympy.Rational(1234567, 10), 3, up=False) == "123000"
