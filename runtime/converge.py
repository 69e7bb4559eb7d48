"""Converging the power-iteration estimates at compile time (``bf.refresh()`` without ``steps``).

Every estimated :class:`~curvbound.runtime.norms.Norm` is advanced by cycles of Lanczos on AᵀA
started from its warm vector u (full reorthogonalisation, float64 bookkeeping), restarted from the
top Ritz vector after one more power step (free from the Lanczos relation); ‖A u‖ never
decreases (u lies in the Krylov space) and stays an estimate **from below**. Work is batched
in *stacks*: the norms of dense layers of one shape are two ``bmm`` per step for all of them;
the products of all segments of dense layers with the same layer shapes and the same products
(i, j) (the 125 segments of a 1000-layer MLP) share one sweep up and down the depth per step,
``bmm`` over the segments with the adjoint applied by hand; everything else (convolutions,
reshapes) goes the general route, all products of one segment in one sweep of its layers and
one backward (:meth:`~curvbound.runtime.products.Segment._gram`). The Lanczos bookkeeping of
each stack's vectors of one size is a handful of batched float64 operations, and the estimates
the bound reads after each cycle are computed the same way (``values``).

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

from .norms import Norm, shared_evaluation
from .operators import Dense, _RowScaledDense
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
    """Norms whose AᵀA is applied together: the products of one segment, or one plain norm
    (the general route, through the operators and autograd)."""

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


# ------------------------------------------------------------------------------------ stacks
# A stack applies AᵀA to many rows at once. Its rows come in blocks by vector size n (the
# Lanczos bookkeeping of a block is batched): ``blocks`` maps n to the block's members in row
# order and ``gram`` maps {n: (k, n) float64} to {n: (k, n) float64}.


#: Dense weights with more entries than this are not copied into a stack with others (each is
#: a stack of its own, a view): the batching pays for small layers, copying large ones does not.
STACK_ENTRIES = 1 << 16


def _stack(ws: list[Tensor]) -> Tensor:
    return ws[0][None] if len(ws) == 1 else torch.stack(ws)


def _dense(op) -> tuple[Tensor, bool] | None:
    """(W, scaled) with AᵀA = Wᵀ·diag(r²)^scaled·W (r the row norms of W) for a dense layer on
    vectors, else None (the operator goes the general route)."""
    if not (len(op.in_shape) == 1 and len(op.out_shape) == 1):
        return None
    if type(op) is _RowScaledDense:
        return op.base().detach(), True
    if type(op) is Dense:
        return op.weight().detach(), False
    return None


class _DenseNorms:
    """Plain norms of dense layers of one shape and dtype: AᵀA for all of them is two bmm's."""

    def __init__(self, members: list[Norm], mats: list[tuple[Tensor, bool]]):
        self.blocks = {mats[0][0].shape[1]: members}
        self.w = _stack([w for w, _ in mats])  # (k, m, n)
        self.r2 = None
        if any(s for _, s in mats):
            self.r2 = torch.stack([w.square().sum(dim=1) if s else torch.ones_like(w[:, 0])
                                   for w, s in mats])[:, :, None]  # (k, m, 1)

    def gram(self, xs: dict[int, Tensor]) -> dict[int, Tensor]:
        (n, x), = xs.items()
        y = torch.bmm(self.w, x.to(self.w.dtype)[:, :, None])
        if self.r2 is not None:
            y = y * self.r2
        return {n: torch.bmm(y.transpose(1, 2), self.w)[:, 0].double()}  # (Wᵀy)ᵀ = yᵀW

    def values(self) -> dict[int, Tensor]:
        """‖A u‖ of every member (what :meth:`Norm.forward` computes), batched."""
        (ms,) = self.blocks.values()
        u = torch.stack([m.u.detach().reshape(-1) for m in ms]).to(self.w.dtype)
        y = torch.bmm(self.w, u[:, :, None])
        if self.r2 is not None:
            y = y * self.r2.sqrt()
        return dict(zip((id(m) for m in ms), y[:, :, 0].norm(dim=1).unbind()))


class _DenseSegments:
    """The products of several segments of dense layers with the same layer shapes and the same
    set of products (i, j): one sweep of the depth per step for all of them, as bmm's over the
    segments, and the adjoint sweep by hand (Wᵀ) instead of autograd.

    Columns are the products, sorted by their first layer j, so that layer t acts on a prefix of
    the columns (those with j ≤ t), the products starting at t are appended there, and a column
    is masked once its product has ended (t > i)."""

    def __init__(self, segments: list[list[ProductNorm]], weights: list[list[Tensor]]):
        pairs = [(m.j, m.i) for m in segments[0]]
        self.segments = segments
        self.depth = len(weights[0])
        self.w = [_stack([ws[t] for ws in weights]) for t in range(self.depth)]  # (S, m, n)
        self.n_seg = len(segments)
        dtype = self.w[0].dtype
        self.start = [[p for p, (j, _) in enumerate(pairs) if j == t] for t in range(self.depth)]
        self.width = [sum(len(s) for s in self.start[: t + 1]) for t in range(self.depth)]
        self.cont = [torch.tensor([float(i > t) for _, i in pairs[: self.width[t]]],
                                  dtype=dtype) for t in range(self.depth)]
        self.end = [torch.tensor([float(i == t) for _, i in pairs[: self.width[t]]],
                                 dtype=dtype) for t in range(self.depth)]
        # rows of the block of size n: layer t (with n_t = n), segment, product starting at t
        self.blocks: dict[int, list[Norm]] = {}
        self.layers: dict[int, list[int]] = {}
        for t in range(self.depth):
            if self.start[t]:
                n = self.w[t].shape[2]
                self.layers.setdefault(n, []).append(t)
                self.blocks.setdefault(n, []).extend(
                    seg[p] for seg in segments for p in self.start[t])

    def _inputs(self, xs: dict[int, Tensor]) -> list[Tensor | None]:
        s_, dtype = self.n_seg, self.w[0].dtype
        inputs: list[Tensor | None] = [None] * self.depth
        for n, ls in self.layers.items():
            at = 0
            for t in ls:
                c = len(self.start[t])
                inputs[t] = xs[n][at: at + s_ * c].reshape(s_, c, n).transpose(1, 2).to(dtype)
                at += s_ * c
        return inputs

    def _forward(self, inputs: list[Tensor | None]) -> list[Tensor]:
        """The sweep up the depth: layer t's outputs for the columns j ≤ t."""
        ys: list[Tensor] = []
        h = None
        for t in range(self.depth):
            if h is None:  # (no product starts below t when the first ones have settled)
                h = inputs[t]
                if h is None:
                    h = self.w[t].new_zeros(self.n_seg, self.w[t].shape[2], 0)
            elif inputs[t] is not None:
                h = torch.cat([h, inputs[t]], dim=2)
            y = torch.bmm(self.w[t], h)  # (S, m_t, width_t)
            ys.append(y)
            h = y * self.cont[t]  # the products that go on past layer t
        return ys

    def values(self) -> dict[int, Tensor]:
        """‖A_i⋯A_j u‖ of every member, from one sweep up the depth."""
        xs = {n: torch.stack([m.u.detach().reshape(-1) for m in ms]) for n, ms in
              self.blocks.items()}
        ys = self._forward(self._inputs(xs))
        total = torch.zeros(self.n_seg, self.width[-1], dtype=ys[0].dtype)
        for t, y in enumerate(ys):
            total[:, : self.width[t]] += y.norm(dim=1) * self.end[t]
        order = [(s, p) for t in range(self.depth) for s in range(self.n_seg)
                 for p in self.start[t]]
        flat = total.unbind(0)
        return {id(self.segments[s][p]): flat[s][p] for s, p in order}

    def gram(self, xs: dict[int, Tensor]) -> dict[int, Tensor]:
        ys = self._forward(self._inputs(xs))
        outs: list[Tensor | None] = [None] * self.depth
        back = None
        for t in reversed(range(self.depth)):
            b = ys[t] * self.end[t]  # AᵀA's backward sweep starts where each product ends
            if back is not None:
                b = b + back[:, :, : self.width[t]]
            # Wᵀb as (bᵀW)ᵀ: W is read as stored (a transposed batch would be copied)
            g = torch.bmm(b.transpose(1, 2), self.w[t]).transpose(1, 2)  # (S, n_t, width_t)
            if self.start[t]:
                lo = self.width[t] - len(self.start[t])
                outs[t] = g[:, :, lo:]
            back = g
        return {n: torch.cat([outs[t].transpose(1, 2).reshape(-1, n) for t in ls]).double()
                for n, ls in self.layers.items()}


class _General:
    """The members of the general route: AᵀA per group (per segment one autograd sweep)."""

    def __init__(self, owners: list[tuple[_Group, Norm]]):
        self.owners = owners
        self.blocks: dict[int, list[Norm]] = {}
        for _, m in owners:
            self.blocks.setdefault(m.u.numel(), []).append(m)

    def values(self) -> dict[int, Tensor]:
        return {}  # evaluated by the quantities themselves

    def gram(self, xs: dict[int, Tensor]) -> dict[int, Tensor]:
        where: dict[int, Tensor] = {}
        for n, block in self.blocks.items():
            for row, m in enumerate(block):
                where[id(m)] = xs[n][row].reshape(m.u.shape)
        by_group: dict[int, tuple[_Group, list[Norm]]] = {}
        for g, m in self.owners:
            by_group.setdefault(id(g), (g, []))[1].append(m)
        out: dict[int, Tensor] = {}
        for g, live in by_group.values():
            for m, w in zip(live, g.gram(live, [where[id(m)] for m in live])):
                out[id(m)] = w
        return {n: torch.stack([out[id(m)].reshape(-1) for m in block]).double()
                for n, block in self.blocks.items()}


def _stacks(groups: list[_Group], everything: bool = False) -> list:
    """The active members of ``groups`` (``everything``: all members) arranged in stacks (dense
    layers batched across segments and norms; everything else on the general route)."""
    general: list[tuple[_Group, Norm]] = []
    plain: dict[tuple, tuple[list[Norm], list]] = {}
    segs: dict[tuple, tuple[list[list[ProductNorm]], list[list[Tensor]]]] = {}
    for g in groups:
        active = g.members if everything else g.active
        if not active:
            continue
        if g.segment is None:
            (m,) = active
            d = _dense(m.op)
            if d is None:
                general.append((g, m))
                continue
            key = (tuple(d[0].shape), d[0].dtype, d[0].device,
                   id(m) if d[0].numel() > STACK_ENTRIES else None)
            plain.setdefault(key, ([], []))
            plain[key][0].append(m)
            plain[key][1].append(d)
            continue
        ws = [_dense(op) for op in g.segment.ops]
        if any(d is None or d[1] for d in ws):  # (a row-scaled layer is never a segment op)
            general += [(g, m) for m in active]
            continue
        weights = [d[0] for d in ws]
        live = sorted(active, key=lambda m: (m.j, m.i))
        key = (tuple(tuple(w.shape) for w in weights), weights[0].dtype, weights[0].device,
               tuple((m.j, m.i) for m in live),
               id(g) if max(w.numel() for w in weights) > STACK_ENTRIES else None)
        if len({w.dtype for w in weights}) != 1:
            general += [(g, m) for m in active]
            continue
        segs.setdefault(key, ([], []))
        segs[key][0].append(live)
        segs[key][1].append(weights)
    out: list = [_DenseNorms(ms, ds) for ms, ds in plain.values()]
    out += [_DenseSegments(ss, ws) for ss, ws in segs.values()]
    if general:
        out.append(_General(general))
    return out


@torch.no_grad()
def _cycle(groups: list[_Group], length: int, rtol: float) -> None:
    """One Lanczos cycle of ``length`` steps for the active members of every group, restarted
    from the top Ritz vector; members whose Ritz value did not rise by more than ``rtol`` drop
    out. AᵀA is applied per stack (:func:`_stacks`); the bookkeeping is batched over each
    stack's block of vectors of one size."""
    stacks = _stacks(groups)
    blocks = [(st, n, ms) for st in stacks for n, ms in st.blocks.items()]
    basis, alphas, betas, ok, tails = [], [], [], [], []
    for _, n, ms in blocks:
        v = torch.stack([m.u.detach().reshape(-1).double() for m in ms])
        b = v.new_zeros(len(ms), length, n)  # the Krylov basis, preallocated
        b[:, 0] = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        basis.append(b)
        alphas.append([])
        betas.append([])
        ok.append(torch.ones(len(ms), dtype=torch.bool))
        tails.append(None)
    settled: set[int] = set()
    for step in range(length):
        ws: list[Tensor] = []
        for st in stacks:
            xs = {n: basis[k][:, step] for k, (s2, n, _) in enumerate(blocks) if s2 is st}
            out = st.gram(xs)
            ws += [out[n] for s2, n, _ in blocks if s2 is st]
        for k, w in enumerate(ws):
            finite = torch.isfinite(w).all(dim=1)
            ok[k] &= finite
            w = torch.where(finite[:, None], w, torch.zeros_like(w))
            a = (basis[k][:, step] * w).sum(dim=1)
            alphas[k].append(a)
            filled = basis[k][:, : step + 1]  # (k, s, n)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                coef = torch.bmm(filled, w[:, :, None]).transpose(1, 2)  # (k, 1, s)
                w = torch.baddbmm(w[:, None, :], coef, filled, alpha=-1)[:, 0]
            if step == length - 1:
                tails[k] = w  # β_s·v_{s+1}: the restart gets one power step for free
                continue
            b = w.norm(dim=1)
            # an invariant subspace (b ≈ 0): the next vectors are zero and decouple in T
            alive = b > 1e-12 * a.abs().clamp_min(1e-300)
            b = torch.where(alive, b, torch.zeros_like(b))
            betas[k].append(b)
            basis[k][:, step + 1] = torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None],
                                                0.0)
    for k, (_, _, ms) in enumerate(blocks):
        s = len(alphas[k])
        t = torch.diag_embed(torch.stack(alphas[k], dim=1))
        if s > 1:
            off = torch.stack(betas[k], dim=1)
            t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        vals, vecs = torch.linalg.eigh(t)
        theta, y = vals[:, -1], vecs[:, :, -1]
        u = torch.bmm(y[:, None, :], basis[k][:, :s])[:, 0]
        # B·(Vy) = θ·Vy + β_s·y_s·v_{s+1} (the Lanczos relation): restart from one power step
        # on the Ritz vector, whose Rayleigh quotient is not lower (B is PSD)
        u = theta[:, None] * u + y[:, -1:] * tails[k]
        norm = u.norm(dim=1)
        good = (ok[k] & torch.isfinite(norm) & (norm > 0)).tolist()
        rose = (theta - alphas[k][0] > rtol * theta.abs()).tolist()
        u = u / norm.clamp_min(1e-300)[:, None]
        for row, m in enumerate(ms):
            if good[row]:
                m.u.copy_(u[row].reshape(m.u.shape).to(m.u.dtype))
            if not (good[row] and rose[row]):
                settled.add(id(m))  # left out of the later cycles
    for g in groups:
        g.active = [m for m in g.active if id(m) not in settled]


def converge(
    norms: Sequence[Norm],
    bound: Callable[[], Sequence[float]],
    *,
    tol: float = 1e-6,
    max_steps: int = 2000,
    progress: bool | None = None,
    known: dict[int, object] | None = None,
) -> ConvergenceReport:
    """Advance every estimated norm of ``norms`` until ``bound()`` (the numbers that matter, e.g.
    the output's L and M) changes by at most ``tol`` (relative) over one Lanczos cycle, or
    ``max_steps`` steps have run (then a warning says how far from converged it stopped).

    ``progress``: True/False forces a tqdm bar on/off; None shows one when convergence takes
    longer than :data:`PROGRESS_AFTER_S` seconds (and tqdm is installed).

    ``bound()`` runs inside a :func:`~curvbound.runtime.norms.shared_evaluation` block that
    presets ``known`` (values by quantity id, e.g. the quantities without iteration state) and
    the estimates of the batched stacks, ‖A u‖ computed for all of them at once (the same
    numbers their :meth:`Norm.forward` gives, up to rounding).
    """
    live = [q for q in norms if isinstance(q, Norm) and not q.certified]
    groups = _groups(live)
    cost = sum(g.cost() for g in groups)
    start = time.perf_counter()

    def evaluate() -> list[float]:
        values = dict(known or {})
        for st in _stacks(groups, everything=True):
            values.update(st.values())
        with shared_evaluation(values):
            return list(bound())

    before = evaluate()
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
            after = evaluate()
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
