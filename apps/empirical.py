"""Empirical lower bounds on the Lipschitz constant, the curvature constant and Hessian norms.

These are the yardsticks every certified bound is tested against (theory §11): a certified upper
bound below one of these numbers is a bug. Every number returned is a value actually attained by
concrete points, so it never exceeds the true constant (up to float64 rounding):

* a ratio ‖f(x) − f(y)‖/‖x − y‖ or ‖(Df(x) − Df(y)) v‖/‖x − y‖ with ‖v‖ = 1 for a concrete pair,
* or ‖Df(x) v‖ (≤ ‖Df(x)‖ ≤ L), ‖∇²g(x) v‖ (≤ ‖∇²g(x)‖ ≤ M_g) at a concrete point.

The points are found by normalised gradient ascent from random starts, many pairs at once in one
batch. The unit vector v is the top right singular vector of the Jacobian (difference), computed
exactly from the full Jacobian when min(inputs, outputs) ≤ ``exact_dim`` and by warm-started power
iteration with ``torch.func.jvp`` and vector–Jacobian products otherwise. Power iteration approaches
a norm from below, so every value it reports is still attained.

Conventions
-----------
``f`` maps a batch ``(B, *input_shape)`` to ``(B, ...)`` with rows independent of each other;
outputs are flattened per sample. An ``nn.Module`` is deep-copied, converted to ``dtype`` and put in
eval mode (the caller's model is untouched); a plain callable must accept tensors of ``dtype``.

Knobs (shared by the three functions)
--------------------------------------
``samples``     points or pairs optimised in parallel (the batch); default 16.
``steps``       gradient-ascent steps, step sizes decaying from ``lr`` on a cosine; default 30.
``budget``      FLOPs of model evaluation allowed when ``samples``/``steps`` are left as None: the
                defaults are shrunk (down to 2 samples, 3 steps) for expensive models. The cost is
                counted with ``FlopCounterMode`` on one forward pass, not timed, so results stay
                deterministic. The default 6e10 is a few seconds of float64 work on two CPU cores
                (split between the pair and the point ascents of the Lipschitz bound).
``scale``       starting points lie within ``scale`` of ``center`` (default: the origin) or of
                ``anchor``; x moves by about ``lr·scale`` per step, the offset y − x by about
                ``lr·‖y − x‖``. For image models try ``center`` = mid-grey and a larger ``scale``.
``radius``      if given, every point is kept in the closed ball of that radius around ``center``
                (or ``anchor``), and ``scale`` is capped by it.
``anchor``      fix one endpoint at x₀: the anchored constants of theory §7.
``exact_dim``   use full Jacobians/Hessians when the smaller side is at most this, else power
                iteration (``power_steps`` per ascent step, warm-started, ``polish_steps`` more at
                the end).
``time_limit``  stop the ascent after this many seconds (the result then depends on the machine).
``seed``        all randomness comes from one generator seeded with it.

Typical times with the defaults on one CPU thread: under 0.5 s for the small models of
:mod:`curvbound.zoo` and the MNIST MLPs, 1-5 s for the CIFAR-10 models, whose bounds are then only
rough (raise ``budget`` for better ones).

>>> A = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
>>> f = lambda x: x @ A.T.to(x.dtype)
>>> round(lipschitz_lower_bound(f, (2,)), 6)
3.0
>>> curvature_lower_bound(f, (2,))
0.0
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..compiler.registry import DEFAULT_REGISTRY, Registry
from ..compiler.trace import trace

__all__ = [
    "Margin",
    "SWITCHES",
    "switch_sites",
    "straddling_pairs",
    "curvature_lower_bound",
    "hessian_lower_bound",
    "lipschitz_lower_bound",
    "neg_curvature_lower_bound",
]

Tensor = torch.Tensor
Shape = int | Sequence[int] | torch.Size

_TINY = 1e-30
# Default batch and number of ascent steps, and the default work budget in FLOPs of model evaluation
# (about 2-4 s of float64 work on two CPU cores); expensive models get fewer samples and steps.
_SAMPLES = 16
_STEPS = 30
_BUDGET = 6e10
# Half of the pairs start "close" (y = x + δ with ‖δ‖ = _CLOSE·scale): their ratio approximates a
# directional second derivative; the others start at distances log-uniform in [0.01, 1]·scale.
_CLOSE = 1e-3


class Margin(nn.Module):
    """The logit difference x ↦ f_i(x) − f_j(x) of a classifier as a module (a scalar per sample).

    Being a module, it is converted to float64 together with the wrapped model.

    >>> g = Margin(nn.Linear(3, 2), 1, 0)
    >>> g(torch.zeros(4, 3)).shape
    torch.Size([4])
    """

    def __init__(self, model: nn.Module, i: int, j: int) -> None:
        super().__init__()
        self.model = model
        self.i = int(i)
        self.j = int(j)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x).flatten(1)
        return out[:, self.i] - out[:, self.j]


@dataclass(frozen=True)
class _Problem:
    """A function on flat float tensors (B, n) → (B, m) and its sizes."""

    fn: Callable[[Tensor], Tensor]
    n: int
    m: int
    dtype: torch.dtype
    center: Tensor  # (n,)


def _prepare(f: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, dtype: torch.dtype,
             center: Tensor | None) -> _Problem:
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if isinstance(f, nn.Module):
        model = copy.deepcopy(f).to(dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        base: Callable[[Tensor], Tensor] = model
    else:
        base = f

    def fn(z: Tensor) -> Tensor:
        return base(z.reshape(z.shape[0], *shape)).reshape(z.shape[0], -1)

    n = math.prod(shape)
    if center is None:
        c = torch.zeros(n, dtype=dtype)
    else:
        c = torch.as_tensor(center).detach().to(dtype=dtype).reshape(-1)
        if c.numel() != n:
            raise ValueError(f"center/anchor has {c.numel()} entries, input_shape {shape} has {n}")
    with torch.no_grad():
        m = fn(c.unsqueeze(0)).shape[1]
    return _Problem(fn, n, m, dtype, c)


# --------------------------------------------------------------------------------------------------
# Derivatives on flat batches. z: (P, n). Rows are independent, so a summed objective's gradient is
# the per-row gradient.


def _jvp(fn: Callable[[Tensor], Tensor], z: Tensor, v: Tensor) -> Tensor:
    """Df(z) v per row, (P, m); differentiable in z (reverse over forward)."""
    return torch.func.jvp(fn, (z,), (v,))[1]


def _vjp(fn: Callable[[Tensor], Tensor], z: Tensor, u: Tensor) -> Tensor:
    """Df(z)ᵀ u per row, (P, n); not differentiable."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        return torch.autograd.grad(fn(zz), zz, u)[0]


def _jacobian(fn: Callable[[Tensor], Tensor], z: Tensor, m: int) -> Tensor:
    """Full Jacobians (P, m, n), by replicating each row and one batched reverse or forward pass."""
    p, n = z.shape
    z = z.detach()
    if m <= n:
        eye = torch.eye(m, dtype=z.dtype).repeat(p, 1)
        with torch.enable_grad():
            zr = z.repeat_interleave(m, dim=0).requires_grad_(True)
            rows = torch.autograd.grad(fn(zr), zr, eye)[0]
        return rows.reshape(p, m, n)
    eye = torch.eye(n, dtype=z.dtype).repeat(p, 1)
    cols = _jvp(fn, z.repeat_interleave(n, dim=0), eye)
    return cols.reshape(p, n, m).transpose(1, 2)


def _gradient(g: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """∇g per row with a graph (create_graph), for Hessian-vector products."""
    return torch.autograd.grad(g(z).sum(), z, create_graph=True)[0]


def _hvp(g: Callable[[Tensor], Tensor], z: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    """∇²g(z) v per row (P, n) by double backward."""
    with torch.enable_grad():
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        grad = _gradient(g, z)
        if not grad.requires_grad:  # g is affine: its gradient does not depend on z
            return torch.zeros_like(z)
        hv = torch.autograd.grad(grad, z, v, create_graph=create_graph, allow_unused=True)[0]
        return torch.zeros_like(z) if hv is None else hv


def _hessian(g: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Full Hessians (P, n, n)."""
    p, n = z.shape
    eye = torch.eye(n, dtype=z.dtype).repeat(p, 1)
    return _hvp(g, z.detach().repeat_interleave(n, dim=0), eye, False).reshape(p, n, n)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(_TINY)


def _top_right_singular(mat: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_max, top right singular vector) of each matrix in a batch (P, a, b)."""
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return s[:, 0], vh[:, 0, :]


# --------------------------------------------------------------------------------------------------
# Objectives. ``d`` is the offset of the second point (y = x + d); point objectives ignore it.


class _Objective(Protocol):
    power_iterated: bool  # whether ``refresh`` approaches v by power iteration (worth polishing)

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor | None:
        """Recompute the unit vector v at the (detached) points; return attained values or None."""

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        """Attained values (B,) for the current v, differentiable in x and d."""


class _PairLipschitz:
    """‖f(x + d) − f(x)‖ / ‖d‖."""

    power_iterated = False

    def __init__(self, prob: _Problem) -> None:
        self.prob = prob

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor | None:
        return None

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        fn = self.prob.fn
        return (fn(x + d) - fn(x)).norm(dim=1) / d.norm(dim=1).clamp_min(_TINY)


class _PointJacobian:
    """‖Df(x) v‖ with v the top right singular vector of Df(x) (so ≤ ‖Df(x)‖ ≤ L)."""

    def __init__(self, prob: _Problem, v0: Tensor, exact: bool, power_steps: int) -> None:
        self.prob, self.v, self.exact, self.power_steps = prob, v0, exact, power_steps
        self.power_iterated = not exact

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor:
        fn = self.prob.fn
        x = x.detach()
        if self.exact:
            sigma, self.v = _top_right_singular(_jacobian(fn, x, self.prob.m))
            return sigma
        for _ in range(steps or self.power_steps):
            self.v = _unit(_vjp(fn, x, _jvp(fn, x, self.v)))
        return self.value(x, d).detach()

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        return _jvp(self.prob.fn, x, self.v).norm(dim=1)


class _PairJacobianDifference:
    """‖(Df(x) − Df(x + d)) v‖ / ‖d‖ with v the top right singular vector of the difference."""

    def __init__(self, prob: _Problem, v0: Tensor, exact: bool, power_steps: int) -> None:
        self.prob, self.v, self.exact, self.power_steps = prob, v0, exact, power_steps
        self.power_iterated = not exact

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor:
        fn, m = self.prob.fn, self.prob.m
        x, d = x.detach(), d.detach()
        if self.exact:
            both = _jacobian(fn, torch.cat([x, x + d]), m)
            sigma, self.v = _top_right_singular(both[: len(x)] - both[len(x):])
            return sigma / d.norm(dim=1).clamp_min(_TINY)
        y = x + d
        for _ in range(steps or self.power_steps):
            w = _jvp(fn, x, self.v) - _jvp(fn, y, self.v)
            self.v = _unit(_vjp(fn, x, w) - _vjp(fn, y, w))
        return self.value(x, d).detach()

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        fn = self.prob.fn
        diff = _jvp(fn, x, self.v) - _jvp(fn, x + d, self.v)
        return diff.norm(dim=1) / d.norm(dim=1).clamp_min(_TINY)


class _PointHessian:
    """‖∇²g(x) v‖ with v the eigenvector of ∇²g(x) of largest |λ| (so ≤ ‖∇²g(x)‖)."""

    def __init__(self, prob: _Problem, v0: Tensor, exact: bool, power_steps: int) -> None:
        self.prob, self.v, self.exact, self.power_steps = prob, v0, exact, power_steps
        self.power_iterated = not exact

    def _g(self, z: Tensor) -> Tensor:
        return self.prob.fn(z)[:, 0]

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor:
        x = x.detach()
        if self.exact:
            hess = _hessian(self._g, x)
            sigma, self.v = _top_right_singular(0.5 * (hess + hess.transpose(1, 2)))
            return sigma
        for _ in range(steps or self.power_steps):
            self.v = _unit(_hvp(self._g, x, self.v, False))
        return self.value(x, d).detach()

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        return _hvp(self._g, x, self.v, True).norm(dim=1)


class _PointNegEigen:
    """−vᵀ∇²g(x)v with v (unit) the eigenvector of ∇²g(x) of smallest λ: a Rayleigh quotient, so
    −vᵀ∇²g(x)v ≤ −λ_min(∇²g(x)) whatever v is (exactly when n ≤ ``exact_dim``, else v by power
    iteration on s·I − ∇²g(x), s the largest ‖∇²g(x)w‖ seen so far times 2)."""

    def __init__(self, prob: _Problem, v0: Tensor, exact: bool, power_steps: int) -> None:
        self.prob, self.v, self.exact, self.power_steps = prob, v0, exact, power_steps
        self.power_iterated = not exact
        self.shift = torch.zeros(len(v0), 1, dtype=v0.dtype)

    def _g(self, z: Tensor) -> Tensor:
        return self.prob.fn(z)[:, 0]

    def refresh(self, x: Tensor, d: Tensor, steps: int | None = None) -> Tensor:
        x = x.detach()
        if self.exact:
            hess = _hessian(self._g, x)
            lam, vec = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)))
            self.v = vec[:, :, 0]
            return self.value(x, d).detach()
        for _ in range(steps or self.power_steps):
            hv = _hvp(self._g, x, self.v, False)
            self.shift = torch.maximum(self.shift, 2 * hv.norm(dim=1, keepdim=True))
            self.v = _unit(self.shift * self.v - hv)
        return self.value(x, d).detach()

    def value(self, x: Tensor, d: Tensor) -> Tensor:
        return -(_hvp(self._g, x, self.v, True) * self.v).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Starting points, projection and the ascent loop.


@dataclass(frozen=True)
class _Domain:
    center: Tensor  # (n,)
    scale: float
    radius: float | None
    anchored: bool


def _domain(prob: _Problem, anchor: Tensor | None, scale: float, radius: float | None) -> _Domain:
    if radius is not None and radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    s = min(scale, radius) if radius is not None else scale
    return _Domain(prob.center, float(s), radius, anchor is not None)


def _start(dom: _Domain, gen: torch.Generator, samples: int, pairs: bool,
           dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n = dom.center.numel()

    def directions(k: int) -> Tensor:
        return _unit(torch.randn(k, n, generator=gen, dtype=dtype))

    if dom.anchored:
        x = dom.center.expand(samples, n).clone()
    else:
        rho = torch.rand(samples, 1, generator=gen, dtype=dtype)
        x = dom.center + dom.scale * rho * directions(samples)
    if not pairs:
        return x, torch.zeros_like(x)
    close = samples // 2
    log_len = torch.empty(samples - close, 1, dtype=dtype).uniform_(
        math.log(0.01), 0.0, generator=gen)
    lengths = torch.cat([torch.full((close, 1), _CLOSE, dtype=dtype), log_len.exp()]) * dom.scale
    d = lengths * directions(samples)
    return _project(dom, x, d)


def _clip(v: Tensor, r: float) -> Tensor:
    norm = v.norm(dim=1, keepdim=True)
    return v * torch.clamp(r / norm.clamp_min(_TINY), max=1.0)


def _project(dom: _Domain, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Keep x and y = x + d in the ball of ``dom.radius`` (anchored: only y; x is the anchor)."""
    if dom.radius is None:
        return x, d
    if not dom.anchored:
        x = dom.center + _clip(x - dom.center, dom.radius)
    y = dom.center + _clip(x + d - dom.center, dom.radius)
    return x, y - x


def _clean(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else torch.nan_to_num(grad, 0.0, 0.0, 0.0)


def _finite_max(values: Tensor | None) -> float:
    if values is None:
        return -math.inf
    values = values.detach()
    values = values[torch.isfinite(values)]
    return float(values.max()) if values.numel() else -math.inf


def _ascend(objective: _Objective, dom: _Domain, x: Tensor, d: Tensor, *, steps: int, lr: float,
            move_x: bool, move_d: bool, polish_steps: int, deadline: float | None) -> float:
    """Normalised gradient ascent on ``objective.value``; the best attained value seen anywhere."""
    best = -math.inf
    for t in range(steps + 1):
        best = max(best, _finite_max(objective.refresh(x, d)))
        xv = x.detach().requires_grad_(move_x)
        dv = d.detach().requires_grad_(move_d)
        last = t == steps or (deadline is not None and time.monotonic() > deadline)
        with torch.enable_grad():
            values = objective.value(xv, dv)
            best = max(best, _finite_max(values))
            if last or not (move_x or move_d) or not values.requires_grad:
                break  # (a value that does not depend on the points leaves nothing to ascend)
            wrt = [v for v, moves in ((xv, move_x), (dv, move_d)) if moves]
            grads = list(torch.autograd.grad(values[torch.isfinite(values)].sum(), wrt,
                                             allow_unused=True))
        eta = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
        with torch.no_grad():
            if move_x:
                x = x + eta * dom.scale * _unit(_clean(grads.pop(0), x))
            if move_d:
                d = d + eta * d.norm(dim=1, keepdim=True) * _unit(_clean(grads.pop(0), d))
            x, d = _project(dom, x, d)
    if polish_steps and objective.power_iterated:
        best = max(best, _finite_max(objective.refresh(x, d, polish_steps)))
    return best


def _setup(f: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, anchor: Tensor | None,
           center: Tensor | None, scale: float, radius: float | None, dtype: torch.dtype,
           seed: int, time_limit: float | None
           ) -> tuple[_Problem, _Domain, torch.Generator, float | None]:
    if anchor is not None and center is not None:
        raise ValueError("give either anchor or center, not both")
    prob = _prepare(f, input_shape, dtype, anchor if anchor is not None else center)
    gen = torch.Generator().manual_seed(seed)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    return prob, _domain(prob, anchor, scale, radius), gen, deadline


def _random_unit(gen: torch.Generator, rows: int, n: int, dtype: torch.dtype) -> Tensor:
    return _unit(torch.randn(rows, n, generator=gen, dtype=dtype))


def _forward_flops(prob: _Problem) -> float:
    """Floating-point operations of one forward pass on one sample, counted (not timed)."""
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            prob.fn(prob.center.unsqueeze(0))
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001  (an estimate only: an op it cannot follow counts as free)
        return 0.0


def _plan(samples: int | None, steps: int | None, evals_per_sample_step: float, prob: _Problem,
          budget: float) -> tuple[int, int]:
    """Fill in ``samples``/``steps`` left as None: the defaults, shrunk to fit ``budget`` FLOPs.

    The cost model is ``evals_per_sample_step`` forward-pass equivalents (a Jacobian of r rows
    counts about 3r) per point or pair and ascent step. It is deterministic: nothing is timed.
    """
    if samples is not None and steps is not None:
        return samples, steps
    per = max(evals_per_sample_step * _forward_flops(prob), 1.0)
    if samples is None and steps is None:
        fraction = budget / (per * _SAMPLES * (_STEPS + 1))
        samples = min(_SAMPLES, max(2, round(_SAMPLES * math.sqrt(fraction))))
    elif samples is None:
        assert steps is not None
        return min(_SAMPLES, max(2, math.floor(budget / (per * (steps + 1))))), steps
    return samples, min(_STEPS, max(3, math.floor(budget / (per * samples)) - 1))


def _jacobian_evals(prob: _Problem, exact: bool, power_steps: int) -> float:
    """Forward-pass equivalents of one Jacobian objective evaluation with its refresh."""
    return 3.0 * min(prob.n, prob.m) + 6.0 if exact else 5.0 * power_steps + 6.0


def lipschitz_lower_bound(f: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, *,
                          samples: int | None = None, steps: int | None = None, lr: float = 0.2,
                          scale: float = 1.0, radius: float | None = None,
                          anchor: Tensor | None = None, center: Tensor | None = None,
                          exact_dim: int = 32, power_steps: int = 2, polish_steps: int = 30,
                          budget: float = _BUDGET, time_limit: float | None = None,
                          dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """An attained lower bound on the Lipschitz constant L_f (or on L_f(x₀) with ``anchor=x₀``).

    The maximum of two ascents: on ‖f(x) − f(y)‖/‖x − y‖ over pairs, and on ‖Df(x) v‖ (the spectral
    norm of the Jacobian, exact or by power iteration) over points; anchored, the Jacobian is taken
    at x₀ only and y ranges over the ball of ``radius`` (all of Rⁿ if None). See the module
    docstring for the knobs; ``budget`` is shared by, ``time_limit`` applies to each of, the two
    ascents.

    >>> round(lipschitz_lower_bound(nn.Tanh(), (3,)), 6)
    1.0
    """
    prob, dom, gen, deadline = _setup(f, input_shape, anchor, center, scale, radius, dtype, seed,
                                      time_limit)
    exact = min(prob.n, prob.m) <= exact_dim
    common = {"lr": lr, "polish_steps": polish_steps, "deadline": deadline}
    n_pairs, n_steps = _plan(samples, steps, 6.0, prob, budget / 2)
    x, d = _start(dom, gen, n_pairs, True, dtype)
    best = _ascend(_PairLipschitz(prob), dom, x, d, steps=n_steps, move_x=not dom.anchored,
                   move_d=True, **common)
    n_points, n_steps = _plan(samples, steps, _jacobian_evals(prob, exact, power_steps), prob,
                              budget / 2)
    x, d = _start(dom, gen, 1 if dom.anchored else n_points, False, dtype)
    point = _PointJacobian(prob, _random_unit(gen, len(x), prob.n, dtype), exact, power_steps)
    best = max(best, _ascend(point, dom, x, d, steps=n_steps, move_x=not dom.anchored,
                             move_d=False, **common))
    return max(best, 0.0)


def curvature_lower_bound(f: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, *,
                          samples: int | None = None, steps: int | None = None, lr: float = 0.2,
                          scale: float = 1.0, radius: float | None = None,
                          anchor: Tensor | None = None, center: Tensor | None = None,
                          exact_dim: int = 32, power_steps: int = 2, polish_steps: int = 30,
                          budget: float = _BUDGET, time_limit: float | None = None,
                          dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """An attained lower bound on the curvature constant M_f = Lip(Df) (or M_f(x₀) with ``anchor``).

    Gradient ascent on ‖Df(x) − Df(y)‖₂/‖x − y‖ over pairs, half of them starting close
    (‖y − x‖ = 10⁻³·scale, approximating the second derivative along y − x) and half far. The
    spectral norm of the Jacobian difference is exact from full Jacobians when min(n, m) ≤
    ``exact_dim``, else by power iteration with jvp/vjp (``power_steps`` per ascent step,
    warm-started, plus ``polish_steps`` at the end); either way the reported ratio is attained.
    Anchored, x = x₀ is fixed and y ranges over the ball of ``radius`` around x₀ (all of Rⁿ if
    None).

    >>> w = torch.tensor([[3.0, 4.0]])
    >>> f = lambda x: torch.tanh(x @ w.T.to(x.dtype))
    >>> m = curvature_lower_bound(f, (2,))
    >>> bool(0.97 * 25 * 4 / (3 * 3 ** 0.5) < m <= 25 * 4 / (3 * 3 ** 0.5))
    True
    """
    prob, dom, gen, deadline = _setup(f, input_shape, anchor, center, scale, radius, dtype, seed,
                                      time_limit)
    exact = min(prob.n, prob.m) <= exact_dim
    n_pairs, n_steps = _plan(samples, steps, 2.0 * _jacobian_evals(prob, exact, power_steps), prob,
                             budget)
    x, d = _start(dom, gen, n_pairs, True, dtype)
    objective = _PairJacobianDifference(prob, _random_unit(gen, n_pairs, prob.n, dtype), exact,
                                        power_steps)
    best = _ascend(objective, dom, x, d, steps=n_steps, lr=lr, move_x=not dom.anchored,
                   move_d=True, polish_steps=polish_steps, deadline=deadline)
    return max(best, 0.0)


def _hessian_ascent(name, objective_cls, g, input_shape, samples, steps, lr, scale, radius,
                    center, exact_dim, power_steps, polish_steps, budget, time_limit, dtype,
                    seed) -> float:
    """Gradient ascent over points of a scalar g on a per-point Hessian objective
    (:class:`_PointHessian` or :class:`_PointNegEigen`): the shared body of
    :func:`hessian_lower_bound` and :func:`neg_curvature_lower_bound`."""
    prob, dom, gen, deadline = _setup(g, input_shape, None, center, scale, radius, dtype, seed,
                                      time_limit)
    if prob.m != 1:
        raise ValueError(f"{name} needs a scalar function, got {prob.m} outputs; "
                         "wrap a classifier in Margin(model, i, j)")
    exact = prob.n <= exact_dim
    # third-order autograd through a double backward: about three times a Jacobian's cost
    evals = 15.0 * prob.n + 30.0 if exact else 15.0 * power_steps + 30.0
    n_points, n_steps = _plan(samples, steps, evals, prob, budget)
    x, d = _start(dom, gen, n_points, False, dtype)
    objective = objective_cls(prob, _random_unit(gen, n_points, prob.n, dtype), exact,
                              power_steps)
    return _ascend(objective, dom, x, d, steps=n_steps, lr=lr, move_x=True, move_d=False,
                   polish_steps=polish_steps, deadline=deadline)


def hessian_lower_bound(g: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, *,
                        samples: int | None = None, steps: int | None = None, lr: float = 0.2,
                        scale: float = 1.0, radius: float | None = None,
                        center: Tensor | None = None, exact_dim: int = 32, power_steps: int = 2,
                        polish_steps: int = 30, budget: float = _BUDGET,
                        time_limit: float | None = None, dtype: torch.dtype = torch.float64,
                        seed: int = 0) -> float:
    """An attained lower bound on sup_x ‖∇²g(x)‖₂ for a scalar-valued g (e.g. a :class:`Margin`).

    Gradient ascent over points on ‖∇²g(x) v‖, with v the top eigenvector (by |λ|) of the Hessian:
    exact when n ≤ ``exact_dim``, else by power iteration with Hessian-vector products. For g with
    a Lipschitz gradient this is a lower bound on the curvature constant M_g. With ``radius`` the
    points stay in the ball around ``center``.

    >>> round(hessian_lower_bound(lambda x: 0.5 * (x ** 2).sum(1), (4,)), 6)
    1.0
    """
    best = _hessian_ascent("hessian_lower_bound", _PointHessian, g, input_shape, samples, steps,
                           lr, scale, radius, center, exact_dim, power_steps, polish_steps,
                           budget, time_limit, dtype, seed)
    return max(best, 0.0)


# --------------------------------------------------------------------------------------------------
# Pairs straddling formula switches. torch's softplus returns x itself once βx > threshold: the
# model jumps there, which neither gradient ascent nor random pairs see (they would need to land on
# a set of measure zero). These pairs sit just either side of every such switch on purpose.


def _softplus_levels(node: torch.fx.Node, root: nn.Module) -> list[float]:
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        beta, threshold = float(m.beta), float(m.threshold)
    else:
        args = list(node.args) + [None] * 3
        beta = float(node.kwargs.get("beta", args[1] if args[1] is not None else 1.0))
        threshold = float(node.kwargs.get("threshold", args[2] if args[2] is not None else 20.0))
    return [threshold / beta] if math.isfinite(threshold) and beta > 0 else []


#: torch implementations that switch formulas at fixed values of their (elementwise) input:
#: target → function (node, root module) → the input values where the formula changes. Every other
#: activation curvbound has a rule for computes one formula on the whole line (tests/test_switching
#: checks them against high-precision references around their special points).
SWITCHES: dict[object, Callable[[torch.fx.Node, nn.Module], list[float]]] = {
    nn.Softplus: _softplus_levels,
    torch.nn.functional.softplus: _softplus_levels,
}


def switch_sites(model: nn.Module, registry: Registry | None = None) -> list[tuple[str, float]]:
    """(node name, switch value) for every formula switch of ``model``'s elementwise activations
    (:data:`SWITCHES`), from curvbound's trace (modules with a rule in ``registry``, default the
    default registry, stay leaves: their rules answer for what is inside).

    >>> switch_sites(nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=2.0, threshold=5.0)))
    [('_1', 2.5)]
    """
    gm = trace(model, registry if registry is not None else DEFAULT_REGISTRY)
    out = []
    for node in gm.graph.nodes:
        key = type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target
        levels = SWITCHES.get(key) if node.op in ("call_module", "call_function") else None
        if levels is not None:
            out += [(node.name, v) for v in levels(node, gm)]
    return out


def straddling_pairs(model: nn.Module, input_shape: Shape, *, samples: int = 16,
                     scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float64,
                     reach: float = 1e4,
                     registry: Registry | None = None) -> tuple[Tensor, Tensor]:
    """Pairs (x, y) with one unit's pre-activation just below (x) and just above (y) a formula
    switch of one of the model's activations (:func:`switch_sites`), e.g. βz ≤ threshold < βz'
    for ``nn.Softplus``: the pairs across which torch's function jumps.

    Each pair starts from a random point within ``scale`` of the origin, a random direction and a
    random (switch site, unit); it brackets a crossing of the switch value along that line
    (looking up to ``reach``·scale away) and bisects to adjacent floats, so ‖x − y‖ is a few ulps
    of the points. Lines that never cross are dropped: fewer than ``samples`` pairs may come back
    (none for a model without switches). Returns two (P, *input_shape) tensors.

    >>> net = nn.Sequential(nn.Linear(1, 1), nn.Softplus(beta=2.0, threshold=5.0)).double()
    >>> x, y = straddling_pairs(net, (1,), samples=4)
    >>> z = lambda v: 2.0 * net[0](v)  # beta times the pre-activation
    >>> bool((z(x) <= 5.0).all() and (z(y) > 5.0).all()), float((x - y).abs().max()) < 1e-12
    (True, True)
    """
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    n = math.prod(shape)
    registry = registry if registry is not None else DEFAULT_REGISTRY
    sites = switch_sites(model, registry)
    empty = torch.zeros(0, *shape, dtype=dtype)
    if not sites:
        return empty, empty.clone()
    gm = trace(copy.deepcopy(model).to(dtype).eval(), registry)
    nodes = {nd.name: nd for nd in gm.graph.nodes}
    names = list(dict.fromkeys(name for name, _ in sites))
    out = next(nd for nd in gm.graph.nodes if nd.op == "output")
    out.args = (tuple(nodes[name].all_input_nodes[0] for name in names),)
    gm.recompile()
    gen = torch.Generator().manual_seed(seed)

    def pre(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return [v.reshape(len(x), -1) for v in gm(x.reshape(len(x), *shape))]

    width = [v.shape[1] for v in pre(torch.zeros(1, n, dtype=dtype))]
    pick = torch.randint(len(sites), (samples,), generator=gen).tolist()
    site = [names.index(sites[i][0]) for i in pick]
    level = torch.tensor([sites[i][1] for i in pick], dtype=dtype)
    unit = [int(torch.randint(width[k], (1,), generator=gen)) for k in site]
    x0 = torch.randn(samples, n, generator=gen, dtype=dtype)
    x0 = x0 * (scale * torch.rand(samples, 1, generator=gen, dtype=dtype) / x0.norm(dim=1,
                                                                                      keepdim=True))
    d = torch.randn(samples, n, generator=gen, dtype=dtype)
    d = d / d.norm(dim=1, keepdim=True)

    def g(t: Tensor) -> Tensor:  # the chosen pre-activation minus its switch value, along lines
        vals = pre(x0 + t[:, None] * d)
        return torch.stack([vals[k][b, j] for b, (k, j) in enumerate(zip(site, unit))]) - level

    lo = torch.full((samples,), math.nan, dtype=dtype)
    hi = torch.full((samples,), math.nan, dtype=dtype)
    grid = torch.linspace(-1.0, 1.0, 129, dtype=dtype)
    span = scale
    while span <= reach * scale and bool(torch.isnan(lo).any()):
        for a, b in zip(grid[:-1], grid[1:]):
            ta, tb = torch.full((samples,), float(a) * span, dtype=dtype), torch.full(
                (samples,), float(b) * span, dtype=dtype)
            ga, gb = g(ta), g(tb)
            up = torch.isnan(lo) & (ga <= 0) & (gb > 0)
            down = torch.isnan(lo) & (ga > 0) & (gb <= 0)
            lo = torch.where(up, ta, torch.where(down, tb, lo))
            hi = torch.where(up, tb, torch.where(down, ta, hi))
        span *= 8
    keep = ~torch.isnan(lo)
    lo, hi = lo.where(keep, 0.0), hi.where(keep, 0.0)
    for _ in range(200):  # bisection: g(lo) ≤ 0 < g(hi) throughout
        mid = (lo + hi) / 2
        done = (mid == lo) | (mid == hi)
        if bool(done.all()):
            break
        below = g(mid) <= 0
        lo = torch.where(done, lo, torch.where(below, mid, lo))
        hi = torch.where(done, hi, torch.where(below, hi, mid))
    x, y = x0 + lo[:, None] * d, x0 + hi[:, None] * d
    with torch.no_grad():
        ok = keep & (g(lo) <= 0) & (g(hi) > 0)
    return x[ok].reshape(-1, *shape), y[ok].reshape(-1, *shape)


def neg_curvature_lower_bound(g: Callable[[Tensor], Tensor] | nn.Module, input_shape: Shape, *,
                              samples: int | None = None, steps: int | None = None,
                              lr: float = 0.2, scale: float = 1.0, radius: float | None = None,
                              center: Tensor | None = None, exact_dim: int = 32,
                              power_steps: int = 4, polish_steps: int = 30,
                              budget: float = _BUDGET, time_limit: float | None = None,
                              dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """An attained lower bound on sup_x −λ_min(∇²g(x)) for a scalar g: the smallest K with
    ∇²g ⪰ −K·I everywhere is at least this (an estimate from below, never certified).

    Gradient ascent over points on −vᵀ∇²g(x)v, v the eigenvector of the smallest eigenvalue
    (exact when n ≤ ``exact_dim``, else power iteration on a shifted Hessian); every value is a
    Rayleigh quotient at a concrete point, so it is ≤ −λ_min there. Knobs as for
    :func:`hessian_lower_bound`. The result may be negative (g strongly convex).

    >>> round(neg_curvature_lower_bound(lambda x: x[:, 0] ** 2 - 3 * x[:, 1] ** 2, (2,)), 6)
    6.0
    """
    return _hessian_ascent("neg_curvature_lower_bound", _PointNegEigen, g, input_shape, samples,
                           steps, lr, scale, radius, center, exact_dim, power_steps, polish_steps,
                           budget, time_limit, dtype, seed)
