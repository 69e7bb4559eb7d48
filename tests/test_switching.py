"""Activations whose torch implementation switches formulas (issue 10, item 1).

torch's softplus returns x itself once βx > threshold: the map jumps by log(1 + e^{−threshold})/β
there. A compiled bound is for the smooth twin F (softplus without the threshold) and reports
``Bounds.error`` ε ≥ sup‖f − F‖ for torch's f; certificates lower every logit gap by √2·ε. These
tests check that against torch's function itself, with pairs straddling the switch
(``apps.empirical.straddling_pairs``), which gradient ascent and random pairs never hit.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvbound
from curvbound.apps.empirical import straddling_pairs, switch_sites
from curvbound.runtime import smoothness as S
from curvbound.runtime.smoothness import smooth_softplus

torch.set_num_threads(1)


def _line(w: float = 1.0, b: float = 0.0, act: nn.Module | None = None) -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 1), act)
    with torch.no_grad():
        net[0].weight.fill_(w)
        net[0].bias.fill_(b)
    return net.double().eval()


def _softplus_ref(z: float, beta: float) -> float:
    return float(mpmath.log1p(mpmath.exp(beta * mpmath.mpf(z))) / beta)


def _check_pairs(model, bound, x, y, rtol=1e-12):
    """‖f(x) − f(y)‖ ≤ L‖x − y‖ + 2ε for torch's f at every pair; returns the worst excess of
    the old claim ‖f(x) − f(y)‖ ≤ L‖x − y‖ (positive when the pairs see a jump)."""
    with torch.no_grad():
        df = (model(x) - model(y)).flatten(1).norm(dim=1)
    dx = (x - y).flatten(1).norm(dim=1)
    L, eps = float(bound.lipschitz), float(bound.error)
    allowed = L * dx + 2 * eps
    assert bool((df <= allowed * (1 + rtol) + 1e-15).all()), (df - allowed).max()
    return float((df - L * dx).max())


# -- the two cases of the issue ------------------------------------------------------------------
def test_threshold_one_is_refused_with_the_node_and_the_fix():
    net = nn.Sequential(nn.Linear(1, 1), nn.Softplus(beta=1, threshold=1))
    with pytest.raises(curvbound.DiscontinuityError) as info:
        curvbound.compile(net, torch.zeros(1, 1))
    msg = str(info.value)
    assert "node '_1' (1 (Softplus))" in msg and "threshold=1" in msg
    assert "0.313" in msg  # log(1 + e^{-1}), the jump
    assert "Raise the threshold" in msg and "CenteredSoftplus" in msg


def test_functional_softplus_threshold_is_read_positionally_and_by_keyword():
    class Pos(nn.Module):
        def forward(self, x):
            return F.softplus(x, 1.0, 2.0)

    class Kw(nn.Module):
        def forward(self, x):
            return F.softplus(x, beta=2.0, threshold=6.0)

    with pytest.raises(curvbound.DiscontinuityError, match="threshold=2"):
        curvbound.compile(Pos(), torch.zeros(1, 3))
    b = curvbound.compile(Kw(), torch.zeros(1, 3), norms="certified")()
    expected = math.log1p(math.exp(-6.0)) / 2.0 * math.sqrt(3)
    assert expected <= float(b.error) <= expected * (1 + 1e-12)


def test_threshold_five_beta_two_bound_holds_for_torchs_function():
    # the issue: certified L = 1 against a measured 2.36 on a 1e-3 grid
    net = _line(act=nn.Softplus(beta=2, threshold=5))
    b = curvbound.compile(net, torch.zeros(1, 1, dtype=torch.float64), norms="certified")()
    assert b.certified and 1.0 <= float(b.lipschitz) <= 1.0 + 1e-6
    jump = math.log1p(math.exp(-5.0)) / 2.0  # independent: sup |torch − smooth| per unit
    assert jump <= float(b.error) <= jump * (1 + 1e-12)
    x = torch.arange(2.0, 3.0, 1e-3, dtype=torch.float64).reshape(-1, 1)
    with torch.no_grad():
        f = net(x).flatten()
    df, dx = (f[1:] - f[:-1]).abs(), (x[1:] - x[:-1]).flatten().abs()
    assert float((df / dx).max()) > 2.3  # the grid sees the jump: L alone is not a bound
    assert bool((df <= float(b.lipschitz) * dx + 2 * float(b.error)).all())
    # ε is tight: just above the switch torch is ~jump below the smooth function
    above = torch.tensor([[2.5 + 1e-9]], dtype=torch.float64)
    gap = _softplus_ref(float(above), 2.0) - float(net(above))
    assert 0.999 * float(b.error) <= gap <= float(b.error)


def test_the_old_claim_fails_on_straddling_pairs_and_the_new_one_holds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Softplus(beta=2.0, threshold=6.0), nn.Linear(8, 5),
                        nn.Softplus(), nn.Linear(5, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(4.0)
    bf = curvbound.compile(net, torch.zeros(1, 3, dtype=torch.float64), norms="certified")
    b = bf()
    assert b.certified and float(b.error) > 0
    x, y = straddling_pairs(net, (3,), samples=24, scale=3.0, seed=1)
    assert len(x) >= 12
    excess = _check_pairs(net, b, x, y)
    assert excess > 0  # without the error term, these pairs violate the bound
    # and the smooth twin is within ε of torch's function at the straddling points
    twin = bf.smooth_twin(torch.float64)
    with torch.no_grad():
        dev = (net(y) - twin(y)).norm(dim=1)
    assert float(dev.max()) <= float(b.error)
    assert float(dev.max()) > 1e-5  # far above rounding: the twin differs where torch switches


def test_straddling_pairs_sit_either_side_of_the_switch():
    net = _line(w=-3.0, b=1.0, act=nn.Softplus(beta=0.5, threshold=7.0))
    assert switch_sites(net) == [("_1", 14.0)]
    x, y = straddling_pairs(net, (1,), samples=8, scale=2.0)
    z = lambda v: net[0](v)  # noqa: E731
    assert len(x) == 8
    assert bool((z(x) <= 14.0).all() and (z(y) > 14.0).all())
    assert float((x - y).abs().max()) < 1e-13
    assert straddling_pairs(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), (2,))[0].shape == (0, 2)


def test_default_threshold_error_is_reported_everywhere():
    net = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3)).double().eval()
    bf = curvbound.compile(net, torch.zeros(1, 4, dtype=torch.float64), norms="certified")
    b = bf()
    w2 = torch.linalg.matrix_norm(net[2].weight.detach(), 2).item()
    expected = math.log1p(math.exp(-20.0)) * math.sqrt(8) * w2  # e^-20·√8·‖W₂‖
    assert expected * (1 - 1e-9) <= float(b.error) <= expected * (1 + 1e-6)
    assert "error=" in repr(b) and "error = " in bf.table()
    # no switching activation: no error, nothing generated, repr unchanged
    smooth = nn.Sequential(nn.Linear(4, 8), curvbound.CenteredSoftplus(), nn.Linear(8, 3))
    bs = curvbound.compile(smooth, torch.zeros(1, 4))
    assert float(bs().error) == 0.0 and "error" not in repr(bs()) and bs._error_fn is None


def test_centered_softplus_never_switches():
    act = curvbound.CenteredSoftplus(beta=2.0)
    z = torch.tensor([9.999999, 10.0, 10.000001, 30.0, -30.0, 0.0], dtype=torch.float64)
    ref = [_softplus_ref(float(v), 2.0) - math.log(2.0) / 2.0 for v in z]
    assert torch.allclose(act(z), torch.tensor(ref, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    net = _line(act=act)
    assert switch_sites(net) == []
    assert float(curvbound.compile(net, torch.zeros(1, 1, dtype=torch.float64))().error) == 0.0
    x = torch.tensor([-1.0, 0.0, 25.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    assert torch.allclose(g, torch.sigmoid(2.0 * x.detach()), rtol=1e-15)  # σ'(0) = 1/2


def test_error_through_residual_and_concatenation():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(12, 2)
            self.act = nn.Softplus(beta=1.0, threshold=5.0)

        def forward(self, x):
            h = self.act(3.0 * self.a(x))
            r = h + 0.5 * self.b(h)
            return self.c(torch.cat([r, torch.tanh(h)], dim=1))

    net = Res().double().eval()
    bf = curvbound.compile(net, torch.zeros(1, 2, dtype=torch.float64), norms="certified")
    b = bf()
    assert b.certified and math.isfinite(float(b.error)) and float(b.error) > 0
    x, y = straddling_pairs(net, (2,), samples=16, scale=2.0, seed=3)
    assert len(x) >= 8
    _check_pairs(net, b, x, y)
    with torch.no_grad():
        dev = (net(y) - bf.smooth_twin(torch.float64)(y)).norm(dim=1)
    assert float(dev.max()) <= float(b.error)


def test_unknown_gains_downstream_make_the_error_infinite():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2.0

    def odd_rule(node, ctx):  # a custom rule that does not say how its input moves it
        return curvbound.Transfer(2 * ctx.L(ctx.input()), 2 * ctx.M(ctx.input()))

    net = nn.Sequential(nn.Linear(2, 2), nn.Softplus(threshold=8.0), Odd())
    b = curvbound.compile(net, torch.zeros(1, 2), rules={Odd: odd_rule})()
    assert math.isinf(float(b.error))
    plain = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), Odd())
    assert float(curvbound.compile(plain, torch.zeros(1, 2), rules={Odd: odd_rule})().error) == 0


# -- certificates ------------------------------------------------------------------------------
def _classifier(c: float) -> nn.Module:
    """logits (softplus(x), c) through one switching softplus (threshold 5)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.Softplus(beta=1.0, threshold=5.0), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, c]))
    return net.double().eval()


def _true_distance(net: nn.Module, x0: float, reach: float = 0.02, step: float = 1e-7) -> float:
    """Distance from x0 to the nearest point where torch's model changes its prediction (scan)."""
    t = torch.arange(step, reach, step, dtype=torch.float64)
    with torch.no_grad():
        p0 = int(net(torch.tensor([[x0]], dtype=torch.float64)).argmax())
        best = math.inf
        for sign in (1.0, -1.0):
            flips = (net((x0 + sign * t).reshape(-1, 1)).argmax(dim=1) != p0).nonzero()
            if len(flips):
                best = min(best, float(t[flips[0, 0]]))
    return best


@pytest.mark.parametrize("local", [False, True])
def test_certified_radius_is_sound_for_torchs_jump(local):
    net = _classifier(5.003)
    x = torch.tensor([[4.999]], dtype=torch.float64)
    cert = curvbound.certify(net, x, local=local)
    true = _true_distance(net, 4.999)
    assert 0.0009 < true < 0.0011  # just above x = 5 torch returns x < 5.003: class 1
    assert cert.error > 0 and cert.certified
    assert float(cert.radius[0]) <= true
    # what the bound certified without the error term: a radius beyond the true distance
    m, g = float(cert.logit_gaps[0, 1]), float(cert.gradient_norms[0, 1])
    assert min(m / float(cert.lipschitz_constants[0, 1]), m / g) > true


def test_certificates_keep_working_with_a_small_error():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 16), nn.Softplus(beta=2.0, threshold=6.0),
                        nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    x = torch.randn(64, 3, dtype=torch.float64) * 2
    cert = curvbound.certify(net, x)
    smooth = nn.Sequential(net[0], curvbound.CenteredSoftplus(beta=2.0), net[2])  # no error
    assert cert.error > 0 and any("√2·error" in n for n in cert.notes)
    with torch.no_grad():
        assert torch.equal(cert.predicted, net(x).argmax(dim=1))  # torch's prediction
    assert float((cert.radius > 0).double().mean()) > 0.5
    assert curvbound.certify(smooth, x).error == 0.0
    adv = cert.adversarial_examples(domain=None)
    if len(adv):  # attack certificates flip torch's model, not only the twin
        assert bool((adv.predictions(net) != cert.predicted[adv.index]).all())


# -- every other activation computes one formula ---------------------------------------------------
_MP = {
    "tanh": (torch.tanh, mpmath.tanh),
    "sigmoid": (torch.sigmoid, lambda x: 1 / (1 + mpmath.exp(-x))),
    "silu": (F.silu, lambda x: x / (1 + mpmath.exp(-x))),
    "gelu": (F.gelu, lambda x: x * mpmath.ncdf(x)),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"),
                  lambda x: x / 2 * (1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi)
                                                     * (x + mpmath.mpf("0.044715") * x**3)))),
    "mish": (F.mish, lambda x: x * mpmath.tanh(mpmath.log1p(mpmath.exp(x)))),
    "elu": (F.elu, lambda x: x if x > 0 else mpmath.expm1(x)),
    "celu": (lambda z: F.celu(z, 2.0), lambda x: x if x > 0 else 2 * mpmath.expm1(x / 2)),
    "logsigmoid": (F.logsigmoid, lambda x: -mpmath.log1p(mpmath.exp(-x))),
    "centered_softplus": (curvbound.CenteredSoftplus(1.5),
                          lambda x: mpmath.log1p(mpmath.exp(1.5 * x)) / 1.5 - mpmath.log(2) / 1.5),
    "softplus_smooth": (lambda z: smooth_softplus(z, 3.0),
                        lambda x: mpmath.log1p(mpmath.exp(3 * x)) / 3),
    "softplus": (F.softplus, lambda x: mpmath.log1p(mpmath.exp(x))),  # switches at 20
}
#: where an implementation might change formulas: 0 (piecewise definitions), softplus's default
#: threshold 20 (Mish, internally), the exp overflow points of float32 and float64
_POINTS = (0.0, 1e-3, 1.0, 2.5, 8.0, 15.0, 20.0, 30.0, 88.7, 709.78)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_other_activations_do_not_switch_formulas(dtype):
    """torch's implementations of every smooth activation with a rule agree with a 40-digit
    reference to a few ulps around each point where one could switch formulas; torch's softplus
    (threshold 20) is the one that does not, which shows the check sees a switch."""
    mpmath.mp.dps = 40
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert {"tanh", "sigmoid", "silu", "gelu", "mish", "elu", "celu", "logsigmoid",
            "centered_softplus", "softplus"} <= set(S.CATALOGUE) | {"softplus"}
    offsets = torch.linspace(-0.05, 0.05, 21, dtype=torch.float64)
    worst = {}
    for name, (fn, ref) in _MP.items():
        w = 0.0
        for p in _POINTS:
            if p > 88 and dtype == torch.float32 and p > 100:
                continue
            for sign in (1.0, -1.0):
                z = (sign * p + offsets).to(dtype)
                y = fn(z).double()
                for zi, yi in zip(z.double().tolist(), y.tolist()):
                    r = float(ref(mpmath.mpf(zi)))
                    if math.isfinite(yi):
                        w = max(w, abs(yi - r) / max(1.0, abs(r)))
                    elif math.isfinite(r) and abs(r) < 1e300:
                        w = math.inf
        worst[name] = w
    bad = {k: v for k, v in worst.items() if v > tol and k != "softplus"}
    assert not bad, bad
    if dtype == torch.float64:
        assert worst["softplus"] > 1e-11  # the threshold switch at 20, seen by the same scan


# -- documentation ---------------------------------------------------------------------------------
def test_docstring_examples_run():
    import doctest
    import sys

    from curvbound.compiler.bound_function import BoundFunction, Bounds

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    objs = [straddling_pairs, switch_sites, smooth_softplus, S.softplus, Bounds,
            BoundFunction.smooth_twin]
    attempted = 0
    for obj in objs:
        globs = dict(vars(sys.modules[obj.__module__]))  # as the module's doctests see them
        for test in finder.find(obj, globs=globs):
            result = runner.run(test)
            assert result.failed == 0, obj
            attempted += result.attempted
    assert attempted >= 10


def test_certified_norms_doc_example_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "certified_norms.md").read_text()
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Softplus(beta=2, threshold=5))
    err = curvbound.compile(net, torch.zeros(1, 1), norms="certified")().error
    line = ">>> bf().error    # log(1 + e^-5)/2: torch is up to 0.0034 below the smooth softplus"
    assert f"{line}\n{err!r}\n" in doc


def test_thresholds_beyond_exp_overflow_are_refused_for_their_dtype():
    # float32: exp(βx) overflows for βx > 88.7, so torch returns inf between there and 100
    net = nn.Sequential(nn.Linear(2, 2), nn.Softplus(threshold=100.0))
    with torch.no_grad():
        assert math.isinf(float(net[1](torch.tensor([95.0]))))
    with pytest.raises(curvbound.DiscontinuityError, match="overflows"):
        curvbound.compile(net, torch.zeros(1, 2))
    # float64 overflows only past 709.8: the same threshold is fine there, with a tiny error
    b = curvbound.compile(net.double(), torch.zeros(1, 2, dtype=torch.float64))()
    assert 0 < float(b.error) < 1e-40
