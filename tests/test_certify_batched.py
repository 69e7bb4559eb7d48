"""Batched certification (issue 12): the optimised evaluations against straightforward ones.

- batched Lanczos + the Cholesky test (runtime/lanczos.py) against ``eigvalsh`` and, for small
  matrices, a 50-digit reference: never below λ_max, at most ~rel above it, on random and
  adversarially clustered spectra, tiny and huge scales, zero rows;
- the anchored norms of a compiled model against the straightforward per-sample eigenproblem;
- the Gram cache follows in-place weight updates;
- the margin gradients against one backward pass per class, class by class;
- the vectorised choice of the convex solver's adversarial points against the loop it replaced.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps import certificates as C
from curvbound.apps.anchored import Capture
from curvbound.runtime.anchored import AnchoredScaledNorm
from curvbound.runtime.certified import certify
from curvbound.runtime.convex import ConvexRadii
from curvbound.runtime.lanczos import cholesky_upper, lambda_max_upper

_U = 2.0**-53


def _scaled(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return d[:, :, None] * g * d[:, None, :]


def _spectrum(n: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * values) @ q.T


def _check(lam: torch.Tensor, d: torch.Tensor, g: torch.Tensor, rel: float = 1e-9) -> None:
    exact = torch.linalg.eigvalsh(_scaled(d, g))[:, -1].clamp_min(0)
    n = g.shape[0]
    # eigvalsh is within ~n·u·‖S‖ of the true λ_max (the 50-digit test checks against the
    # true value itself)
    assert (lam >= exact * (1 - 4 * n * _U)).all()
    assert (lam <= exact * (1 + 2 * rel) + 1e-260).all()


@pytest.mark.parametrize("n", [1, 2, 7, 40, 100])
def test_random_spectra(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
    g = a @ a.T
    d = torch.rand(37, n, generator=gen, dtype=torch.float64)
    d[0] = 0  # a zero scaling: S = 0
    d[1, : n // 2] = 0
    lam, _ = lambda_max_upper(d, g)  # default steps: eigvalsh where Lanczos has not converged
    _check(lam, d, g)
    lam, fallback = lambda_max_upper(d, g, steps=40)
    _check(lam, d, g)
    assert fallback.float().mean() < 0.5  # converged: the Cholesky test certifies most of them


@pytest.mark.parametrize("gap", [0.0, 1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-3])
def test_clustered_top_eigenvalues(gap):
    n = 60
    values = torch.linspace(0.0, 0.5, n, dtype=torch.float64)
    values[-1], values[-2], values[-3] = 1.0, 1.0 - gap, 1.0 - 2 * gap
    g = _spectrum(n, values, seed=3)
    g = (g + g.T) / 2
    gen = torch.Generator().manual_seed(5)
    d = torch.ones(8, n, dtype=torch.float64)
    d[4:] = 1 - 0.01 * torch.rand(4, n, generator=gen, dtype=torch.float64)
    for steps in (2, 5, 24):  # too few steps: the test fails and eigvalsh takes over
        lam, _ = lambda_max_upper(d, g, steps=steps)
        _check(lam, d, g)


def test_too_few_steps_fall_back_and_stay_sound():
    n = 50
    values = torch.logspace(-3, 0, n, dtype=torch.float64)
    values[-2] = 1 - 1e-7  # Lanczos with 3 steps cannot resolve this gap
    g = _spectrum(n, values, seed=7)
    g = (g + g.T) / 2
    d = torch.ones(4, n, dtype=torch.float64)
    lam, fallback = lambda_max_upper(d, g, steps=3)
    assert fallback.any()
    _check(lam, d, g)


@pytest.mark.parametrize("scale", [1e-150, 1e-20, 1.0, 1e20, 1e150])
def test_tiny_and_huge_scales(scale):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    g = a @ a.T
    d = torch.rand(6, 30, generator=gen, dtype=torch.float64) * math.sqrt(scale)
    lam, _ = lambda_max_upper(d, g)
    _check(lam, d, g)


def test_against_a_50_digit_reference():
    """Small clustered matrices where float64 eigvalsh itself is in doubt: λ_max in mpmath."""
    mpmath.mp.dps = 50
    for seed in range(4):
        n = 6
        values = torch.tensor([0.1, 0.2, 0.3, 1 - 1e-13, 1 - 1e-15, 1.0], dtype=torch.float64)
        g = _spectrum(n, values, seed)
        g = (g + g.T) / 2
        gen = torch.Generator().manual_seed(seed)
        d = 1 - 1e-3 * torch.rand(3, n, generator=gen, dtype=torch.float64)
        lam, _ = lambda_max_upper(d, g)
        s = _scaled(d, g)  # the float64 matrices whose λ_max is bounded
        for b in range(len(d)):
            m = mpmath.matrix(s[b].tolist())
            top = max(mpmath.eigsy(m, eigvals_only=True))
            assert mpmath.mpf(float(lam[b])) >= top
            assert float(lam[b]) <= float(top) * (1 + 2e-9)


def test_cholesky_test_rejects_shifts_below_the_top():
    g = _spectrum(40, torch.linspace(0.1, 1.0, 40, dtype=torch.float64), seed=2)
    g = (g + g.T) / 2
    s = g.expand(3, 40, 40).clone()
    tau = torch.tensor([1 - 1e-6, 1 + 1e-12, 1 + 1e-6], dtype=torch.float64)
    bound, ok = cholesky_upper(s, tau)
    assert not ok[0]
    assert (bound[ok] >= 1.0).all() and ok[2]


# -- the anchored norms of a compiled model ------------------------------------------------------
def _tanh_mlp(width: int = 24) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                        nn.Linear(width, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.5)  # saturated: the anchored values differ from the global ones
    return net.double()


def _straightforward(q: AnchoredScaledNorm, rho: torch.Tensor) -> torch.Tensor:
    """The per-sample eigenproblem as computed before batching (eigvalsh + its backward error)."""
    g, err = q.gram()
    s = rho[:, :, None] * g * rho[:, None, :]
    lam = torch.linalg.eigvalsh(s)[:, -1].clamp_min(0)
    lam = lam + err + 3 * _U * torch.linalg.matrix_norm(s)
    out = certify(lam).sqrt() * (1 + 2 * _U)
    return torch.minimum(out / (1 - 2 * _U), q.base().detach().double())


def test_anchored_norms_match_the_straightforward_evaluation():
    model = _tanh_mlp()
    bf = curvbound.compile(model, torch.zeros(1, 8, dtype=torch.float64), norms="certified",
                           anchored=True)
    state = bf._anchor
    x0 = torch.randn(33, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, values = Capture(bf.gm, state.nodes)(x0)
    exact = [q for q in bf.quantities.values()
             if isinstance(q, AnchoredScaledNorm) and q.gram is not None]
    assert len(exact) >= 3
    with state.anchored(values):
        for q in exact:
            fast = q()
            beta = state.beta(q.node, q.table)
            kappa = beta.amax(dim=1, keepdim=True)
            rho = torch.where(kappa > 0, beta / kappa, torch.zeros_like(beta))
            ref = _straightforward(q, rho)
            g, _ = q.gram()
            true = torch.linalg.eigvalsh(rho[:, :, None] * g * rho[:, None, :])[:, -1].sqrt()
            assert (fast >= true).all()
            assert (fast <= ref * (1 + 1e-10)).all() and (fast >= ref * (1 - 1e-9)).all()


def test_gram_cache_follows_in_place_weight_updates():
    model = _tanh_mlp()
    x0 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bf = curvbound.compile(model, x0[:1], norms="certified", anchored=True)
    first = curvbound.anchored_bounds(bf, x0).curvature
    with torch.no_grad():
        model[2].weight.mul_(1.3)  # as an optimizer step would (in place)
    again = curvbound.anchored_bounds(bf, x0).curvature
    fresh = curvbound.compile(model, x0[:1], norms="certified", anchored=True)
    ref = curvbound.anchored_bounds(fresh, x0).curvature
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, ref, rtol=1e-12, atol=0)


# -- margin gradients and the convex solver's adversarial points --------------------------------
def test_margin_gradients_match_one_pass_per_class():
    model = _tanh_mlp()
    x = torch.randn(17, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x.requires_grad_(True)
    logits = model(x)
    pred = logits.argmax(dim=1)
    fast = C._margin_gradients(logits, x, pred)
    logits = model(x)
    k = logits.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        cot = eye[i][None] - eye[pred]
        (ref,) = torch.autograd.grad(logits, x, cot, retain_graph=True)
        torch.testing.assert_close(fast[i], ref, rtol=1e-13, atol=1e-15)
    assert (fast[pred, torch.arange(len(x))] == 0).all()


def test_vectorised_adversarial_choice_matches_the_loop(monkeypatch):
    model = _tanh_mlp()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cert = C.Certifier(model, x, local=False, solver="convex")
    logits = model(x).detach()
    pred = logits.argmax(dim=1)
    k = logits.shape[1]
    # problems as _convex lays them out; crafted distances with ties, points that flip the label
    rows = torch.arange(6).repeat_interleave(k)
    cls = torch.arange(k).repeat(6)
    keep = cls != pred[rows]
    rows, cls = rows[keep], cls[keep]
    p = len(rows)
    dist = torch.tensor([0.5, 0.3, 0.3, math.inf, 0.2, 0.2, 0.9, 0.1, math.inf] * 3,
                        dtype=torch.float64)[:p]
    far = 40.0 * torch.randn(p, 8, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)
    pts = torch.where(torch.isfinite(dist)[:, None], far, torch.full_like(far, math.nan))
    fake = ConvexRadii(torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64),
                       pts, dist, 1)
    monkeypatch.setattr(C, "convex_radii", lambda *a, **kw: fake)
    _, d_fast, pt_fast, cls_fast = cert._convex(x, pred, None)
    # the loop it replaced
    d_ref = torch.full((6,), math.inf, dtype=torch.float64)
    pt_ref, cls_ref = x.clone(), torch.full((6,), -1, dtype=torch.long)
    found = torch.isfinite(dist).nonzero()[:, 0]
    at = model(pts[found]).argmax(dim=1)
    ok = at != pred[rows[found]]
    for j, a in zip(found[ok].tolist(), at[ok].tolist()):
        r = int(rows[j])
        if dist[j] < d_ref[r]:
            d_ref[r], pt_ref[r], cls_ref[r] = dist[j], pts[j], a
    assert torch.equal(d_fast, d_ref) and torch.equal(cls_fast, cls_ref)
    assert torch.equal(pt_fast, pt_ref)


def test_lanczos_module_example():
    import doctest

    from curvbound.runtime import lanczos

    result = doctest.testmod(lanczos, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
