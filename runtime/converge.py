"""Converging the power-iteration estimates at compile time (``bf.refresh()`` without ``steps``).

Every estimated :class:`~curvbound.runtime.norms.Norm` is advanced by cycles of Lanczos on AᵀA
started from its warm vector u (full reorthogonalisation, float64 bookkeeping), restarted from the
top Ritz vector after one more power step (free from the Lanczos relation); ‖A u‖ never
decreases (u lies in the Krylov space) and stays an estimate **from below**. Work is batched:
all products of one segment share one sweep of the segment's layers per step
(:meth:`~curvbound.runtime.products.Segment._gram`), and the bookkeeping of all vectors of one
size is a handful of batched tensor operations rather than per-vector loops.

Convergence is judged on the **bound**, not on a step budget: after each cycle the caller's
``bound()`` is evaluated and iteration stops when its values change by at most ``tol``
(relative) over one cycle. A quantity whose own estimate no longer rises is left out of later
cycles. Reaching ``max_steps`` first gives a :class:`UserWarning` with the last change.
This module does not touch the per-call refresh (``bf(refresh=k)``, :meth:`Norm.step`,
:meth:`Segment.sweep`).

>>> from curvbound.runtime.operators import Dense
>>> W = torch.diag(torch.tensor([3.0, 2.9, 1.0]))
>>> n = Norm(Dense(lambda: W, (3,), (3,)), "estimate")
>>> report = converge([n], lambda: (float(n()),), tol=1e-9)
>>> round(float(n()), 6), report.converged
(3.0, True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .norms import Norm
from .products import LANCZOS_CYCLE, ProductNorm, Segment, apply_cost

__all__ = ["ConvergenceReport", "converge", "PROGRESS_AFTER_S"]

#: A progress bar (tqdm, when installed) appears once convergence has taken this long.
PROGRESS_AFTER_S = 1.5


@dataclass
class ConvergenceReport:
    """What :func:`converge` did: ``steps`` (AᵀA applications per quantity, at most), ``cycles``,
    ``change`` (the last relative change of the bound over a cycle), ``converged``
    (``change ≤ tol`` before ``max_steps``) and ``cost`` (estimated multiply-adds per step)."""

    steps: int
    cycles: int
    change: float
    converged: bool
    cost: float


def _relative_change(before: Sequence[float], after: Sequence[float]) -> float:
    worst = 0.0
    for a, b in zip(before, after):
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        worst = max(worst, abs(b - a) / max(abs(b), 1e-300))
    return worst


class _Group:
    """Norms whose AᵀA is applied together: the products of one segment, or one plain norm."""

    def __init__(self, members: list[Norm], segment: Segment | None):
        self.members, self.segment = members, segment
        self.active = list(members)
        # the operators' dtype once (reading it may materialise a derived weight)
        self.dtypes = {id(m): m._dtype() for m in members} if segment is None else {}

    def gram(self, live: list[Norm], xs: list[Tensor]) -> list[Tensor]:
        if self.segment is not None:
            return self.segment._gram(live, xs)  # one sweep of the layers, one backward
        with torch.no_grad():
            return [m.op.gram(x.to(self.dtypes[id(m)])) for m, x in zip(live, xs)]

    def cost(self) -> float:
        return sum(2.0 * apply_cost(m.op) for m in self.members)


def _groups(norms: Sequence[Norm]) -> list[_Group]:
    by_segment: dict[int, tuple[Segment, list[Norm]]] = {}
    groups: list[_Group] = []
    for q in norms:
        if isinstance(q, ProductNorm):
            by_segment.setdefault(id(q.segment), (q.segment, []))[1].append(q)
        else:
            groups.append(_Group([q], None))
    groups += [_Group(members, seg) for seg, members in by_segment.values()]
    return groups


@torch.no_grad()
def _cycle(groups: list[_Group], length: int, rtol: float) -> None:
    """One Lanczos cycle of ``length`` steps for the active members of every group, restarted
    from the top Ritz vector; members whose Ritz value did not rise by more than ``rtol`` drop
    out. AᵀA is applied per group; the bookkeeping is batched over all vectors of one size."""
    owners = [(g, m) for g in groups for m in g.active]
    live = [m for _, m in owners]
    spans, at = [], 0
    for g in groups:
        spans.append((g, at, at + len(g.active)))
        at += len(g.active)
    flat = [m.u.detach().reshape(-1).double() for m in live]
    # rows of the same length are stacked: (k, n) per size n, the basis (k, s, n)
    index: dict[int, list[int]] = {}
    for k, v in enumerate(flat):
        index.setdefault(v.numel(), []).append(k)
    # the Krylov basis of every size n in one preallocated (k, length, n) float64 buffer
    basis: dict[int, Tensor] = {}
    for n, ks in index.items():
        v = torch.stack([flat[k] for k in ks])
        basis[n] = v.new_zeros(len(ks), length, n)
        basis[n][:, 0] = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    alphas: dict[int, list[Tensor]] = {n: [] for n in index}
    betas: dict[int, list[Tensor]] = {n: [] for n in index}
    ok = {n: torch.ones(len(ks), dtype=torch.bool) for n, ks in index.items()}
    tails: dict[int, Tensor] = {}
    settled: set[int] = set()
    for step in range(length):
        xs: list[Tensor] = [torch.empty(0)] * len(live)
        for n, ks in index.items():
            for row, k in enumerate(ks):
                xs[k] = basis[n][row, step].reshape(live[k].u.shape)
        ws: list[Tensor] = []
        for g, lo, hi in spans:
            if hi > lo:
                ws += g.gram(live[lo:hi], xs[lo:hi])
        for n, ks in index.items():
            w = torch.stack([ws[k].reshape(-1).double() for k in ks])
            finite = torch.isfinite(w).all(dim=1)
            ok[n] &= finite
            w = torch.where(finite[:, None], w, torch.zeros_like(w))
            a = (basis[n][:, step] * w).sum(dim=1)
            alphas[n].append(a)
            filled = basis[n][:, : step + 1]  # (k, s, n)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                coef = torch.bmm(filled, w[:, :, None]).transpose(1, 2)  # (k, 1, s)
                w = torch.baddbmm(w[:, None, :], coef, filled, alpha=-1)[:, 0]
            if step == length - 1:
                tails[n] = w  # β_s·v_{s+1}: the restart gets one power step for free
                continue
            b = w.norm(dim=1)
            # an invariant subspace (b ≈ 0): the next vectors are zero and decouple in T
            alive = b > 1e-12 * a.abs().clamp_min(1e-300)
            b = torch.where(alive, b, torch.zeros_like(b))
            betas[n].append(b)
            basis[n][:, step + 1] = torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None],
                                                0.0)
    for n, ks in index.items():
        s = len(alphas[n])
        t = torch.diag_embed(torch.stack(alphas[n], dim=1))
        if s > 1:
            off = torch.stack(betas[n], dim=1)
            t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        vals, vecs = torch.linalg.eigh(t)
        theta, y = vals[:, -1], vecs[:, :, -1]
        u = torch.bmm(y[:, None, :], basis[n][:, :s])[:, 0]
        # B·(Vy) = θ·Vy + β_s·y_s·v_{s+1} (the Lanczos relation): restart from one power step
        # on the Ritz vector, whose Rayleigh quotient is not lower (B is PSD)
        u = theta[:, None] * u + y[:, -1:] * tails[n]
        norm = u.norm(dim=1)
        good = (ok[n] & torch.isfinite(norm) & (norm > 0)).tolist()
        rose = (theta - alphas[n][0] > rtol * theta.abs()).tolist()
        u = u / norm.clamp_min(1e-300)[:, None]
        for row, k in enumerate(ks):
            m = live[k]
            if good[row]:
                m.u.copy_(u[row].reshape(m.u.shape).to(m.u.dtype))
            if not (good[row] and rose[row]):
                settled.add(k)  # left out of the later cycles
    for g, lo, hi in spans:
        g.active = [live[k] for k in range(lo, hi) if k not in settled]


def converge(
    norms: Sequence[Norm],
    bound: Callable[[], Sequence[float]],
    *,
    tol: float = 1e-6,
    max_steps: int = 2000,
    progress: bool | None = None,
) -> ConvergenceReport:
    """Advance every estimated norm of ``norms`` until ``bound()`` (the numbers that matter, e.g.
    the output's L and M) changes by at most ``tol`` (relative) over one Lanczos cycle, or
    ``max_steps`` steps have run (then a warning says how far from converged it stopped).

    ``progress``: True/False forces a tqdm bar on/off; None shows one when convergence takes
    longer than :data:`PROGRESS_AFTER_S` seconds (and tqdm is installed).
    """
    live = [q for q in norms if isinstance(q, Norm) and not q.certified]
    groups = _groups(live)
    cost = sum(g.cost() for g in groups)
    start = time.perf_counter()
    before = list(bound())
    change, steps, cycles, bar = math.inf, 0, 0, None
    # the quantities' own test is much stricter than the bound's: a quantity stops only when a
    # whole cycle leaves its estimate unchanged to near rounding
    rtol = min(tol * 1e-3, 1e-10)
    try:
        while steps < max_steps and any(g.active for g in groups):
            length = min(LANCZOS_CYCLE, max_steps - steps)
            _cycle(groups, length, rtol)
            steps += length
            cycles += 1
            after = list(bound())
            change, before = _relative_change(before, after), after
            if bar is None and progress is not False and (
                progress or time.perf_counter() - start > PROGRESS_AFTER_S
            ):
                bar = _progress_bar(max_steps, steps - length)
            if bar is not None:
                bar.update(length)
                bar.set_postfix(change=f"{change:.2g}", tol=f"{tol:.0e}")
            if change <= tol:
                break
    finally:
        if bar is not None:
            bar.close()
    converged = change <= tol or not any(g.active for g in groups)
    if not converged:
        warnings.warn(
            f"power iteration stopped after {steps} steps (max_steps) with the bound still "
            f"changing by {change:.2g} (relative) per cycle, above tol={tol:g}: the estimates "
            "are further below the true norms; call bf.refresh(max_steps=...) again",
            stacklevel=3,
        )
    return ConvergenceReport(steps, cycles, change, converged, cost)


def _progress_bar(total: int, done: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: no bar without tqdm
        return None
    return tqdm(total=total, initial=done, desc="curvbound: converging estimates", unit="step",
                leave=False)
