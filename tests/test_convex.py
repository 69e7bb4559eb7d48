"""The convex (dual) certificate, ``certify(..., solver="convex")`` (issue 17).

Checked on 2-D classifiers against the true distance to the decision boundary found by a dense
ray search (independent of the certificate), by PGD inside the certified radii, by forward passes
at every returned adversarial example, and against the closed forms it must never lose to."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps.attacks import pgd_l2
from curvbound.runtime.convex import convex_radii, dual_bound


def two_d(act, seed, width=16, scale=1.5):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, width), act(), nn.Linear(width, width), act(),
                        nn.Linear(width, 3))  # fmt: skip
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net.double().eval()


@torch.no_grad()
def ray_distance(net, x0, directions=360, r_max=3.0, step=1e-2):
    """Distance from each x0 to the nearest point with another prediction, by marching along
    ``directions`` rays in steps of ``step`` and bisecting the first change: every reported
    distance is attained by a misclassified point (so ≥ the true distance), and exceeds it by
    O(d·(2π/directions)²) plus the bisection tolerance."""
    theta = torch.arange(directions, dtype=torch.float64) * (2 * math.pi / directions)
    u = torch.stack([theta.cos(), theta.sin()], 1)
    t = torch.arange(1, int(r_max / step) + 1, dtype=torch.float64) * step
    out = []
    for x in x0:
        p = net(x[None]).argmax(1)
        pts = x + t[None, :, None] * u[:, None, :]  # (D, T, 2)
        pred = net(pts.reshape(-1, 2)).argmax(1).reshape(directions, -1)
        flips = pred != p
        has = flips.any(1)
        zero = torch.zeros(directions, dtype=torch.long)
        first = torch.where(has, flips.double().argmax(1), zero)
        lo, hi = (first.double()) * step, (first.double() + 1) * step  # change within (lo, hi]
        for _ in range(40):
            mid = (lo + hi) / 2
            bad = net(x + mid[:, None] * u).argmax(1) != p
            hi, lo = torch.where(bad, mid, hi), torch.where(bad, lo, mid)
        d = torch.where(has, hi, torch.full_like(hi, math.inf))
        out.append(float(d.min()))
    return torch.tensor(out, dtype=torch.float64)


CASES = {"softplus": (nn.Softplus, 4), "tanh": (nn.Tanh, 2)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    act, seed = CASES[request.param]
    net = two_d(act, seed)
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(24, 2, generator=gen, dtype=torch.float64) - 1
    bf = curvbound.compile(net, x[:1], norms="certified", anchored=True)
    cert = curvbound.certify(net, x, bound_fn=bf)  # the default: convex
    closed = curvbound.certify(net, x, bound_fn=bf, solver="closed")
    one = curvbound.certify(net, x, bound_fn=bf, solver="one-sided")
    return request.param, net, x, cert, closed, one, ray_distance(net, x)


def test_convex_radii_never_exceed_the_true_distance(case):
    name, net, x, cert, closed, one, dist = case
    assert cert.certified and cert.solver == "convex" and closed.solver == "closed"
    assert torch.isfinite(dist).all()
    assert (cert.radius <= dist * (1 + 1e-6)).all(), (name, cert.radius, dist)
    # and they are not vacuous: the exact distance (within 2%) for some points here, where the
    # dual search reaches the boundary before η hits 2/K, and about half of it typically
    ratio = cert.radius / dist
    assert (ratio >= 0.98).double().mean() >= 0.1 and ratio.median() >= 0.4, (name, ratio)


def test_convex_is_never_below_the_closed_forms(case):
    name, net, x, cert, closed, one, dist = case
    assert (one.radius >= closed.radius).all()
    assert (cert.radius >= one.radius).all()
    assert (cert.radius > closed.radius * 1.01).double().mean() >= 0.5  # it does gain
    if name == "softplus":  # the one-sided constants are smaller here
        assert (one.curvature_constants < closed.curvature_constants).any()


def test_every_adversarial_example_is_misclassified_and_not_nearer_than_the_boundary(case):
    name, net, x, cert, closed, one, dist = case
    adv = cert.adversarial_examples(domain=None)
    assert len(adv) >= 2
    assert (adv.predictions(net) != cert.predicted[adv.index]).all()
    assert (adv.predictions(net, torch.float32) != cert.predicted[adv.index]).all()
    d = (adv.points - x[adv.index]).norm(dim=1)
    assert torch.allclose(d, adv.t, rtol=1e-9)
    assert (adv.t >= dist[adv.index] * (1 - 1e-5)).all()  # no misclassified point is nearer
    # the primal points of the convex solver are close to the nearest adversarial point
    assert (cert.attack_radius[adv.index] <= 1.02 * dist[adv.index]).double().mean() >= 0.5
    assert (cert.radius <= cert.attack_radius).all()


def test_pgd_never_succeeds_inside_the_convex_radius(case):
    name, net, x, cert, *_ = case
    ok = cert.radius > 0
    _, success = pgd_l2(net, x[ok], cert.radius[ok] * (1 - 1e-6), steps=60, restarts=3)
    assert not success.any()
    att = torch.isfinite(cert.attack_radius)
    assert att.sum() >= 2
    _, hit = pgd_l2(net, x[att], cert.attack_radius[att] * 1.01, steps=60, restarts=3)
    assert hit.double().mean() >= 0.5  # and the attack is not vacuous at the attack radius


def test_radius_cap_solves_fewer_margins_and_keeps_every_certified_accuracy_below_it(
        case, monkeypatch):
    name, net, x, cert, closed, one, dist = case
    from curvbound.apps import certificates as C

    solved = []
    real = C.convex_radii

    def counting(fn, x0, *args, **kwargs):
        solved.append(len(x0))
        return real(fn, x0, *args, **kwargs)

    monkeypatch.setattr(C, "convex_radii", counting)
    cap = float(cert.radius[cert.radius > 0].median())
    bf = curvbound.compile(net, x[:1], norms="certified", anchored=True)
    capped = curvbound.certify(net, x, bound_fn=bf, radius_cap=cap)
    everything = curvbound.certify(net, x, bound_fn=bf)
    assert len(solved) == 2 and 0 < solved[0] < solved[1]  # the cap skips margins
    assert torch.equal(everything.radius, cert.radius)
    # (a solved margin's radius can differ in the last bits with the batch it was solved in)
    assert (capped.radius <= cert.radius * (1 + 1e-9)).all()
    assert (capped.radius >= one.radius * (1 - 1e-9)).all()
    for eps in torch.linspace(0, cap, 9).tolist():
        assert capped.certified_accuracy(eps) == cert.certified_accuracy(eps)
    with pytest.raises(curvbound.InputError, match="radius_cap must be a positive radius"):
        curvbound.certify(net, x, bound_fn=bf, radius_cap=0.0)


def test_dual_bound_of_a_quadratic_margin_is_exact():
    """φ(x) = 1 − x₁ − (k/2)x₁² (∇²φ ⪰ −k·I): strong duality holds (one quadratic constraint, the
    KKT multiplier 2t/(1 + kt) < 2/k), so the bound reaches the distance t, the positive root of
    1 − t − (k/2)t², from below; the primal point is at t too."""
    k = 0.5

    def fn(z):
        phi = 1 - z[:, 0] - 0.5 * k * z[:, 0] ** 2
        return torch.stack([phi, torch.zeros_like(phi)], 1)

    x0 = torch.zeros(1, 2, dtype=torch.float64)
    r = convex_radii(fn, x0, torch.tensor([0]), torch.tensor([1]), torch.tensor([k]),
                     torch.tensor([0.0]), outer=30, inner=30)  # fmt: skip
    exact = (-1 + math.sqrt(1 + 2 * k)) / k  # root of 1 − t − (k/2)t² along x₁
    assert float(r.radius[0]) <= exact and float(r.radius[0]) == pytest.approx(exact, rel=1e-6)
    assert float(r.primal_distance[0]) == pytest.approx(exact, rel=1e-3)
    one = torch.ones(1, dtype=torch.float64)
    # η ≥ 2/K: no bound
    assert float(dual_bound(4 * one, one, one, one, one, k * one)) == -math.inf
