"""Convex (dual) certificates for margins with a one-sided curvature bound (issue 17).

For an input x₀ predicted as p and a class i, let φ = f_p − f_i (φ(x₀) > 0) and K ≥ 0 a
certified bound with ∇²φ ⪰ −K·I everywhere (``Margins.neg_curvature[p, i]``). The distance
d = min ‖x − x₀‖ s.t. φ(x) ≤ 0 is what a certificate must bound from below.

**Weak duality.** For every η ≥ 0 and every x with φ(x) ≤ 0,
‖x − x₀‖² ≥ ‖x − x₀‖² + η·φ(x) =: F_η(x), so d² ≥ min_x F_η(x).

**Convexity.** ∇²F_η = 2I + η∇²φ ⪰ (2 − ηK)·I, so for 0 ≤ η < 2/K the function F_η is
μ-strongly convex with μ = 2 − ηK (and φ + (K/2)‖x − x₀‖² is convex).

**A rigorous bound on the inner minimum.** For a μ-strongly convex F and any point y,
F(x) ≥ F(y) + ∇F(y)ᵀ(x − y) + (μ/2)‖x − y‖² ≥ F(y) − ‖∇F(y)‖²/(2μ) for every x (minimise the
quadratic in x − y). Hence, for every η ∈ [0, 2/K) and every point y whatsoever,

    d² ≥ B(η, y) := ‖y − x₀‖² + η·φ(y) − ‖2(y − x₀) + η∇φ(y)‖² / (2(2 − ηK)).

No property of y is assumed: the solver below only has to find points where B is large, and
every evaluated pair (η, y) gives a valid bound; the largest is kept. B is concave in η for a
fixed y (affine minus a quadratic-over-linear), so for each evaluated y the best η is found by a
ternary search on the scalars ‖y − x₀‖², φ(y), ∇φ(y)ᵀ(y − x₀), ‖∇φ(y)‖² (no network evaluation).

**The search.** Bisection on η over [0, η_max), η_max = (1 − 10⁻³)·2/K (or a multiple of the
linearised multiplier 2φ(x₀)/‖∇φ(x₀)‖² when K = 0): at each η, accelerated gradient steps
(Nesterov, step 1/(2 + ηK₊), K₊ an upper Hessian bound, momentum from the condition number) on
F_η, warm-started, evaluating the network itself; φ(ŷ) > 0 at the approximate minimiser means
that η is too small (the dual function's derivative at η is φ(x*(η))). Every problem (sample,
class) runs in one batch.

**Rounding.** The network is evaluated in float64. φ(y) is lowered by 10⁻⁹·(|f_p| + |f_i|) (as
the closed-form certificates do), ‖y − x₀‖² lowered by 10⁻¹⁰ relative where it enters F;
‖∇F‖² is formed from three float64 sums, whose rounding (γ_{n+8}·(2‖y − x₀‖ + η‖∇φ‖)²) is added
before the square root because the sum cancels near a minimiser, and ‖∇F‖ is then raised by
10⁻¹⁰ relative plus η·10⁻⁹·‖∇φ‖ (the rounding of ∇φ itself); μ is computed from K rounded up;
the bound is taken as ≥ 0 and its square root rounded down.

**Primal points.** Every evaluated y with φ(y) < −10⁻⁴·(|f_p| + |f_i|) (a margin that survives
float32 evaluation) is a candidate adversarial example at distance ‖y − x₀‖; the nearest per
problem is returned, and the caller checks it by a forward pass before reporting it.

>>> import torch
>>> f = lambda x: torch.stack([1 - x[:, 0], torch.zeros(len(x), dtype=x.dtype)], 1)
>>> r = convex_radii(f, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]),
...                  torch.tensor([1]), torch.tensor([0.0]), torch.tensor([0.0]))
>>> round(float(r.radius[0]), 6), round(float(r.primal_distance[0]), 3)  # the boundary is x₀ = 1
(1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ConvexRadii", "convex_radii", "dual_bound"]

_REL = 1e-9  # rounding allowance on logits and gradients (as in certificates.py)
_NORM = 1e-10  # relative allowance on float64 norms of differences (n·2⁻⁵³ for n ≤ 10⁵)
#: primal points must have φ < −10⁻⁴·(|f_p| + |f_i|): adversarial in float32 evaluation as well
_ATTACK = 1e5


@dataclass
class ConvexRadii:
    """Per problem (P,): ``radius`` ≤ the distance from x₀ to {φ ≤ 0} (certified when K is);
    ``eta`` the multiplier of the best bound; ``primal_points`` (P, *shape) the nearest evaluated
    point with φ < 0 (NaN where none), ``primal_distance`` its distance (∞ where none)."""

    radius: Tensor
    eta: Tensor
    primal_points: Tensor
    primal_distance: Tensor
    evaluations: int


def dual_bound(eta: Tensor, dist2: Tensor, phi: Tensor, cross: Tensor, gnorm2: Tensor,
               k: Tensor) -> Tensor:
    """B(η, y) of the module docstring from the scalars ‖y − x₀‖², φ(y), ∇φ(y)ᵀ(y − x₀) and
    ‖∇φ(y)‖² (already made safe by the caller); −∞ where 2 − ηK ≤ 0.

    >>> t = lambda v: torch.tensor([float(v)], dtype=torch.float64)
    >>> float(dual_bound(t(2), t(1), t(0), t(-1), t(1), t(0)))  # F = 1, ∇F = 2(y−x₀)+2∇φ = 0
    1.0
    """
    mu = 2 - eta * k
    grad2 = 4 * dist2 + 4 * eta * cross + eta * eta * gnorm2  # ‖2(y − x₀) + η∇φ‖²
    val = dist2 + eta * phi - grad2.clamp_min(0) / (2 * mu.clamp_min(1e-300))
    return torch.where(mu > 0, val, torch.full_like(val, -math.inf))


def _best_eta(dist2, phi, cross, gnorm2, k, eta_max, grad_slack, gamma, iters: int = 40):
    """max over η ∈ [0, η_max] of the safe bound (ternary search; B is concave in η).

    ‖2(y − x₀) + η∇φ‖² = 4‖y − x₀‖² + 4η·∇φᵀ(y − x₀) + η²‖∇φ‖² cancels near a minimiser, so the
    rounding of the three sums (each within γ_n of the sum of absolute terms, ≤ γ_n·(2‖y − x₀‖ +
    η‖∇φ‖)² together, ``gamma`` ≥ γ_{n+8}) is added before the square root, and the rounding of
    ∇φ itself (``grad_slack``·η) after it. ``dist2`` is the computed ‖y − x₀‖²; it is lowered by
    10⁻¹⁰ relative where it enters F."""
    dn, gn1 = dist2.clamp_min(0).sqrt(), gnorm2.clamp_min(0).sqrt()
    # the η-independent parts, computed once (the same float64 operations as written out in
    # the docstring's order, so the values are bitwise those of evaluating B directly)
    dn2, dist4, dist_lo = 2 * dn, 4 * dist2, dist2 * (1 - _NORM)
    ninf = torch.tensor(-math.inf, dtype=dist2.dtype, device=dist2.device)

    def safe(eta):
        mu = 2 - eta * k
        err = (dn2 + eta * gn1) ** 2
        err *= gamma
        grad2 = dist4 + 4 * eta * cross
        grad2 += eta * eta * gnorm2
        grad2 += err
        gn = grad2.clamp_min_(0).sqrt_()
        gn *= 1 + _NORM
        gn += eta * grad_slack
        val = dist_lo + eta * phi
        val -= gn * gn / (2 * mu.clamp_min(1e-300))
        return torch.where(mu > 0, val, ninf)

    # both probes of every ternary step in one evaluation of safe: (2, P) stacked
    lo, hi = torch.zeros_like(eta_max), eta_max.clone()
    for _ in range(iters):
        third = (hi - lo) / 3
        probes = torch.stack([lo + third, hi - third])
        vals = safe(probes)
        left = vals[0] < vals[1]
        lo = torch.where(left, probes[0], lo)
        hi = torch.where(left, hi, probes[1])
    eta = (lo + hi) / 2
    return safe(eta), eta


def convex_radii(
    fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    pred: Tensor,
    target: Tensor,
    k_neg: Tensor,
    k_pos: Tensor,
    *,
    outer: int = 14,
    inner: int = 12,
    chunk: int = 2048,
    accept_tol: float | None = None,
    offset: float = 0.0,
) -> ConvexRadii:
    """Lower bounds on min ‖x − x₀‖ s.t. f_p(x) ≤ f_i(x), one problem per row (module docstring).

    Args:
        fn: the classifier on float64 batches (P, *shape) → logits (P, K).
        x0: the anchors (P, *shape); ``pred``/``target``: p and i per problem (P,);
        k_neg: K with ∇²(f_p − f_i) ⪰ −K·I (certified for a certified radius), (P,);
        k_pos: K₊ with ∇²(f_p − f_i) ⪯ K₊·I (only the step size depends on it), (P,).
        outer: bisection steps on η; ``inner``: gradient steps per η (warm-started).
        chunk: problems per batch of network evaluations.
        offset: bound the distance to {f_p − f_i ≤ offset} instead (≥ 0; e.g. the √2·ε by which
            torch's switching activations may move a margin from the smooth twin's).
        accept_tol: **not a certificate; for comparison with CRT only.** Instead of the rigorous
            bound B(η, y), take F_η(y) itself at the current η wherever ‖∇F_η(y)‖ < accept_tol
            (the acceptance rule of Singla & Feizi's implementation, which trusts the inner
            minimisation once its gradient is small).
    """
    x0 = x0.detach().to(torch.float64)
    parts = []
    evals = 0
    for s in range(0, len(x0), chunk):
        sl = slice(s, s + chunk)
        out = _solve(fn, x0[sl], pred[sl], target[sl], k_neg[sl].double(), k_pos[sl].double(),
                     outer, inner, accept_tol, float(offset))
        parts.append(out)
        evals += out.evaluations
    if not parts:
        e = torch.zeros(0, dtype=torch.float64)
        return ConvexRadii(e, e, x0.clone(), e, 0)
    return ConvexRadii(
        torch.cat([p.radius for p in parts]), torch.cat([p.eta for p in parts]),
        torch.cat([p.primal_points for p in parts]),
        torch.cat([p.primal_distance for p in parts]), evals,
    )


def _evaluate(fn, y: Tensor, pred: Tensor, target: Tensor, offset: float = 0.0):
    """φ(y) = f_p − f_i lowered by the rounding slack, φ̂, ∇φ̂ (flattened) and the slack."""
    with torch.enable_grad():
        yv = y.detach().requires_grad_(True)
        logits = fn(yv)
        rows = torch.arange(len(y))
        fp, fi = logits[rows, pred], logits[rows, target]
        phi = fp - fi - offset
        (grad,) = torch.autograd.grad(phi.sum(), yv)
    slack = _REL * (fp.abs() + fi.abs()).detach() + 1e-300
    return phi.detach(), grad.flatten(1).detach(), slack


def _solve(fn, x0, pred, target, k_neg, k_pos, outer, inner, accept_tol=None,
           offset=0.0) -> ConvexRadii:
    p = len(x0)
    shape = x0.shape
    flat0 = x0.flatten(1)
    n = flat0.shape[1]
    gamma = 1.01 * (n + 8) * 2.0**-53 / (1 - (n + 8) * 2.0**-53)
    k = k_neg.clamp_min(0) * (1 + 4 * 2.0**-53)
    kp = k_pos.clamp_min(0)
    phi0, g0, _ = _evaluate(fn, x0, pred, target, offset)
    evals = 1
    eta_lin = 2 * phi0.clamp_min(0) / (g0.norm(dim=1) ** 2).clamp_min(1e-300)
    cap = torch.where(k > 0, 2 * (1 - 1e-3) / k.clamp_min(1e-300), torch.full_like(k, math.inf))
    eta_max = torch.minimum(cap, 64 * eta_lin.clamp_min(1e-12))
    best = torch.zeros(p, dtype=torch.float64)  # bound on d² (d² ≥ 0 always)
    best_eta = torch.zeros(p, dtype=torch.float64)
    primal = torch.full_like(flat0, math.nan)
    primal_d = torch.full((p,), math.inf, dtype=torch.float64)
    lo, hi = torch.zeros_like(eta_max), eta_max.clone()
    eta = torch.minimum(eta_lin, 0.5 * eta_max)
    x = flat0.clone()
    x_hi = torch.full_like(flat0, math.nan)  # the latest inner solution with φ ≤ 0

    def candidates(y, phi, slack, diff=None):
        dist = (y - flat0 if diff is None else diff).norm(dim=1)
        adv = (phi + _ATTACK * slack < 0) & (dist < primal_d)
        if adv.any():  # in place: the same values as torch.where(adv, new, old)
            primal_d[adv] = dist[adv]
            primal[adv] = y[adv]

    # the iterates live in preallocated buffers, updated in place with the same float64
    # operations (commuted where IEEE arithmetic commutes), so the results are bitwise those
    # of the expressions in the comments
    diff, step = torch.empty_like(flat0), torch.empty_like(flat0)
    for _ in range(outer):
        lsmooth = 2 + eta * kp
        mu = (2 - eta * k).clamp_min(1e-12)
        q = (lsmooth / mu).sqrt()
        beta = ((q - 1) / (q + 1))[:, None]
        y, x_prev, x_new = x.clone(), x.clone(), torch.empty_like(x)
        for _ in range(inner):
            phi, grad, slack = _evaluate(fn, y.reshape(shape), pred, target, offset)
            evals += 1
            torch.sub(y, flat0, out=diff)
            dist2 = (diff * diff).sum(dim=1)
            # bounds at this point: with the current η and with the best η for this y
            safe_phi = phi - slack
            cross = (grad * diff).sum(dim=1)
            gnorm2 = (grad * grad).sum(dim=1)
            if accept_tol is None:
                val, eta_y = _best_eta(dist2, safe_phi, cross, gnorm2, k, eta_max,
                                       _REL * gnorm2.sqrt() + 1e-300, gamma)
            else:  # CRT's acceptance rule (not a bound): F_η(y) where ‖∇F_η(y)‖ is small
                gf = (2 * diff + eta[:, None] * grad).norm(dim=1)
                val = torch.where(gf < accept_tol, dist2 + eta * phi, torch.full_like(dist2, -1.0))
                eta_y = eta
            better = val > best
            best = torch.where(better, val, best)
            best_eta = torch.where(better, eta_y, best_eta)
            candidates(y, phi, slack, diff)  # primal candidates: φ < 0 even after the slack
            # a Nesterov step on F_η = ‖y − x₀‖² + η·φ(y):
            # step = (2·diff + η∇φ)/L, x_new = y − step, y = x_new + β(x_new − x_prev)
            torch.mul(grad, eta[:, None], out=step)
            step.add_(diff, alpha=2).div_(lsmooth[:, None])
            torch.sub(y, step, out=x_new)
            torch.sub(x_new, x_prev, out=y).mul_(beta).add_(x_new)
            x_prev, x_new = x_new, x_prev
        x = x_prev
        # bisection: φ(x*(η)) > 0 → the multiplier must grow
        phi_x, _, slack_x = _evaluate(fn, x.reshape(shape), pred, target, offset)
        evals += 1
        candidates(x, phi_x, slack_x)
        grow = phi_x > 0
        keep = ~grow
        x_hi[keep] = x[keep]  # torch.where(grow, x_hi, x), in place
        lo = torch.where(grow, eta, lo)
        hi = torch.where(grow, hi, eta)
        eta = (lo + hi) / 2
    # primal points just beyond the boundary: x₀ + s·(x_hi − x₀) for a few s > 1
    found = torch.isfinite(x_hi).all(dim=1)
    if found.any():
        for scale in (1.0 + 1e-4, 1.0 + 1e-3, 1.01, 1.1):
            y = torch.where(found[:, None], flat0 + scale * (x_hi - flat0), flat0)
            phi_y, _, slack_y = _evaluate(fn, y.reshape(shape), pred, target, offset)
            evals += 1
            candidates(y, torch.where(found, phi_y, torch.full_like(phi_y, math.inf)), slack_y)
    radius = best.clamp_min(0).sqrt() * (1 - 1e-12)
    return ConvexRadii(radius, best_eta, primal.reshape(shape), primal_d, evals)
