"""Power and Lanczos steps written with tensor operations only, for ``torch.compile``.

The eager steps (:meth:`~curvbound.runtime.norms.Norm.step`, :meth:`Segment.sweep
<curvbound.runtime.products.Segment.sweep>`) read Python floats from tensors, stop early and take
adjoints with ``torch.autograd.grad``: each of those is a graph break (or a host sync) for
dynamo. Here the same arithmetic runs with fixed trip counts (the step count is static
configuration), ``torch.where`` in place of branches and adjoints by ``torch.func.vjp``, so the
whole ``bf(refresh=k)`` is one captured graph (:class:`~curvbound.compiler.compiled.CompiledBound`).

The values are those of the eager steps up to float rounding: the same Krylov basis, the same
tridiagonal matrix and Ritz vector. Where an eager Lanczos cycle stops early (an invariant
subspace, a non-finite vector) the vectors after that point are zero here, which leaves the top
Ritz pair unchanged. The eager bookkeeping of converged products (which batch a product is
stepped in) does not change any value and is not reproduced: every product takes every step.

>>> from curvbound.runtime.operators import Dense
>>> from curvbound.runtime.norms import Norm
>>> W = torch.diag(torch.tensor([3.0, 1.0]))
>>> a, b = Norm(Dense(lambda: W, (2,), (2,))), Norm(Dense(lambda: W, (2,), (2,)))
>>> a.step(3); norm_steps(b, 3)
>>> bool(torch.allclose(a.u, b.u))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .norms import Norm, Quantity
from .operators import LinearOperator
from .products import LANCZOS_CYCLE, HadamardNorm, ProductNorm, Segment

__all__ = ["gram", "norm_steps", "segment_steps", "StepPlan", "step_plan"]


def gram(op: LinearOperator, u: Tensor) -> Tensor:
    """AᵀA u: the operator's own :meth:`~LinearOperator.gram` where it has one, else by
    ``torch.func.vjp`` (which dynamo traces, unlike ``torch.autograd.grad``)."""
    if type(op).gram is not LinearOperator.gram:
        return op.gram(u)
    y, vjp = torch.func.vjp(op.apply, u.detach())
    return vjp(y.detach())[0].detach()


def _safe(n: Tensor, ok: Tensor) -> Tensor:
    return torch.where(ok, n, torch.ones_like(n))


@torch.no_grad()
def norm_steps(q: Norm, steps: int) -> None:
    """``steps`` power iterations of ``q`` as :meth:`Norm.step` does them (a non-finite or zero
    step leaves the vector, as the eager loop stops there), with tensor operations only."""
    if q.certified or steps <= 0:
        return
    u = q.u
    dtype = q._dtype()
    for _ in range(steps):
        w = gram(q.op, u.to(dtype))
        n = w.norm()
        ok = torch.isfinite(n) & (n > 0)
        u = torch.where(ok, w / _safe(n, ok), u.to(w.dtype)).to(q.u.dtype)
    q.u.copy_(u)


def _segment_gram(segment: Segment, live: Sequence[ProductNorm], xs: list[Tensor]) -> list[Tensor]:
    """AᵀA x for every live product at once (one sweep and one vjp), as ``Segment._gram``."""
    xs = [x.detach().to(m._dtype()) for m, x in zip(live, xs)]

    def sweep(*xs: Tensor) -> tuple[Tensor, ...]:
        outs: list[Tensor | None] = [None] * len(live)
        carry: list[tuple[int, Tensor]] = []
        for layer, op in enumerate(segment.ops):
            carry += [(k, xs[k]) for k, m in enumerate(live) if m.j == layer]
            if not carry:
                continue
            y = op.apply(torch.cat([t for _, t in carry]))
            parts = y.split([t.shape[0] for _, t in carry])
            nxt = []
            for (k, _), part in zip(carry, parts):
                if live[k].i == layer:
                    outs[k] = part
                else:
                    nxt.append((k, part))
            carry = nxt
        return tuple(torch.zeros_like(x) if o is None else o for x, o in zip(xs, outs))

    outs, vjp = torch.func.vjp(sweep, *xs)
    return [g.detach() for g in vjp(tuple(o.detach() for o in outs))]


@torch.no_grad()
def _lanczos(segment: Segment, live: Sequence[ProductNorm], cycle: int) -> None:
    """One restarted Lanczos cycle of ``cycle`` steps for every live product: the arithmetic of
    ``Segment._lanczos`` with masks in place of its early stops."""
    shapes = [m.u.shape for m in live]
    basis: list[list[Tensor]] = []
    for m in live:
        v = m.u.detach().reshape(-1).double()
        basis.append([v / v.norm().clamp_min(1e-300)])
    alphas: list[list[Tensor]] = [[] for _ in live]
    betas: list[list[Tensor]] = [[] for _ in live]
    alive = [torch.ones((), dtype=torch.bool, device=m.u.device) for m in live]
    tails: list[Tensor] = [torch.zeros_like(b[0]) for b in basis]
    for s in range(cycle):
        ws = _segment_gram(segment, live, [b[-1].reshape(sh) for b, sh in zip(basis, shapes)])
        for k, w in enumerate(ws):
            w = w.reshape(-1).double()
            finite = torch.isfinite(w).all()
            if s > 0:  # a non-finite step: the eager cycle ends before it (drop v_s, β_{s−1})
                lost = alive[k] & ~finite
                betas[k][-1] = torch.where(lost, torch.zeros_like(betas[k][-1]), betas[k][-1])
                basis[k][-1] = torch.where(lost, torch.zeros_like(w), basis[k][-1])
            alive[k] = alive[k] & finite
            w = torch.where(alive[k], w, torch.zeros_like(w))
            v = basis[k]
            a = v[-1] @ w
            alphas[k].append(a)
            stack = torch.stack(v)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - stack.T @ (stack @ w)
            b = w.norm()
            # an invariant subspace: the eager cycle stops (the Ritz vector is exact)
            alive[k] = alive[k] & (b > 1e-12 * a.abs().clamp_min(1e-300))
            if s == cycle - 1:
                tails[k] = torch.where(alive[k], w, torch.zeros_like(w))
                continue
            betas[k].append(torch.where(alive[k], b, torch.zeros_like(b)))
            v.append(torch.where(alive[k], w / _safe(b, alive[k]), torch.zeros_like(w)))
    for k, m in enumerate(live):
        t = torch.diag(torch.stack(alphas[k]))
        if cycle > 1:
            off = torch.stack(betas[k])
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        vals, vecs = torch.linalg.eigh(torch.nan_to_num(t))
        theta, y = vals[-1], vecs[:, -1]
        ritz = torch.stack(basis[k]).T @ y
        # B·(Vy) = θ·Vy + β_s·y_s·v_{s+1}: one power step for free (a zero tail where the
        # cycle stopped early, and then the eager code keeps Vy itself)
        has_tail = tails[k].norm() > 0
        u = torch.where(has_tail, theta * ritz + y[-1] * tails[k], ritz)
        norm = u.norm()
        ok = torch.isfinite(norm) & (norm > 0)
        new = torch.where(ok, u / _safe(norm, ok), m.u.detach().reshape(-1).double())
        m.u.copy_(new.reshape(m.u.shape).to(m.u.dtype))


def segment_steps(segment: Segment, live: Sequence[ProductNorm], steps: int) -> None:
    """``steps`` batched Lanczos steps of the products ``live`` of ``segment``, in cycles of
    :data:`~curvbound.runtime.products.LANCZOS_CYCLE` as :meth:`Segment.sweep` takes them."""
    while live and steps > 0:
        cycle = min(steps, LANCZOS_CYCLE)
        _lanczos(segment, live, cycle)
        steps -= cycle


class StepPlan:
    """What ``bf(refresh=k)`` steps, grouped for :func:`run`: the plain norms, each segment's own
    products, the block norms, and the rest (quantities with a ``step`` of their own, which the
    caller runs eagerly)."""

    def __init__(self, quantities: Sequence[Quantity]):
        self.norms: list[Norm] = []
        self.segments: list[tuple[Segment, list[ProductNorm]]] = []
        self.blocks: list[HadamardNorm] = []
        self.other: list[Quantity] = []
        groups: dict[int, tuple[Segment, list[ProductNorm]]] = {}
        for q in quantities:
            if q.certified:
                continue
            if isinstance(q, ProductNorm):
                if any(o is q for o in q.segment.own):  # eager advance steps only own products
                    groups.setdefault(id(q.segment), (q.segment, []))[1].append(q)
            elif type(q) is Norm:
                self.norms.append(q)
            elif isinstance(q, HadamardNorm):
                self.blocks.append(q)
            elif isinstance(q, Norm):
                self.other.append(q)
        self.segments = list(groups.values())

    def run(self, steps: int) -> None:
        """``steps`` steps of everything but :attr:`other`, with tensor operations only."""
        for q in self.norms:
            norm_steps(q, steps)
        for seg, live in self.segments:
            segment_steps(seg, live, steps)
        for q in self.blocks:
            q.step(steps)


def step_plan(quantities: Sequence[Quantity]) -> StepPlan:
    """The :class:`StepPlan` of a bound function's quantities (``bf.quantities.values()``)."""
    return StepPlan(quantities)
