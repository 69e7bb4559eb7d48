"""Anchored curvature of scalar activations: β'(z₀) = sup_z |σ'(z) − σ'(z₀)| / |z − z₀| (theory §7).

β'(z₀) is the Lipschitz constant of σ' *from the anchor* z₀: |σ'(z) − σ'(z₀)| ≤ β'(z₀)·|z − z₀| for
every z. It never exceeds sup|σ''| and decays like 1/|z₀| for saturating activations, which is
what makes anchored (per-input) curvature bounds tighter than global ones.

Two ways to get it:

- :func:`beta_prime` computes it at given points by the tangency condition (the sup is attained
  where the line from (z₀, σ'(z₀)) touches the graph of σ', σ''(z)·(z − z₀) = σ'(z) − σ'(z₀),
  or as z → z₀): a dense scan brackets the maximiser, a golden-section search refines it. The
  values are attained, so they are (up to rounding) lower bounds of the true β' — the reference
  the tests check the tables against.
- :class:`AnchoredTable` is what certificates use: a table over a uniform grid whose cell k stores
  an upper bound on β' over the *whole* cell (not its value at a grid point: rounding z₀ to a
  grid point, as the paper's tables do, can under-estimate, because β' of tanh is not monotone in
  |z₀| on [0, 0.66]). Lookup is one vectorised gather.

Why a table cell is an upper bound. Write A(z₀, z) = (σ'(z) − σ'(z₀))/(z − z₀) = ∫₀¹ σ''(z₀ +
s(z − z₀)) ds. Differentiating under the integral, A is (S₃/2)-Lipschitz in z₀ and in z, where
S₃ ≥ sup|σ'''| (proven per activation in :data:`SPECS`). Hence (1) the sup over z of |A(z₀, ·)|
is at most its maximum over a grid of spacing h plus S₃h/4, plus a tail term for z beyond the grid
(|A(z₀, z)| ≤ |A(z₀, Z)| + ω(Z)/(Z − z₀) for z > Z, ω(Z) = oscillation of σ' on [Z, ∞)), and
(2) β' itself is (S₃/2)-Lipschitz in z₀, so on a cell [a, b] it is at most
(β'(a) + β'(b))/2 + S₃(b − a)/4. Each cell then takes the maximum with its two neighbours, so
that a float rounding of the index computation cannot pick the wrong cell, and every value is
capped by sup|σ''|. Beyond the table, |z₀| > Z, splitting z at a distance d < |z₀| from z₀ gives
β'(z₀) ≤ max(sup_{|t| ≥ |z₀| − d}|σ''(t)|, range(σ')/d); the best of a few d is used.

Example:
    >>> import torch
    >>> from curvbound.runtime import smoothness as S
    >>> table = anchored_table(S.tanh())
    >>> z0 = torch.tensor([0.0, 0.6585, 3.0, 50.0], dtype=torch.float64)
    >>> [round(v, 4) for v in beta_prime(S.tanh(), z0).tolist()]
    [0.5826, 0.7698, 0.3399, 0.02]
    >>> [round(v, 4) for v in table(z0).tolist()]
    [0.5896, 0.7698, 0.344, 0.0217]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .smoothness import Smoothness

__all__ = ["AnchoredTable", "TableSpec", "SPECS", "anchored_table", "beta_prime", "spec_for"]

_U = 2.0**-53
_SLACK = 0.006  # grid spacing: the Lipschitz slack S₃·h/2 is at most this fraction of the cap
_RANGE = 16.0  # the table covers z₀ ∈ [−_RANGE, _RANGE]
_SCAN = 24.0  # the scan over z covers [−_SCAN, _SCAN]
_ABS = 1e-12  # covers the float64 rounding of the scan (differences of σ' over ≥ 1/256)


@dataclass(frozen=True)
class TableSpec:
    """What the table construction needs about σ besides σ' and σ'' (all proven bounds).

    ``third`` ≥ sup|σ'''|; ``range`` ≥ sup σ' − inf σ'; ``tail_d2(t)`` ≥ sup_{|z| ≥ t}|σ''(z)| and
    ``tail_osc(t)`` ≥ the oscillation of σ' on [t, ∞) and on (−∞, −t], both for t ≥ 0, as torch
    functions of a float64 tensor ``t``. ``scale`` is β for softplus-type records (β'_β(z₀) =
    β·β'_1(βz₀)) and ``mirror`` flips the argument (logsigmoid's σ'(z) = s(−z)).
    """

    kind: str
    third: float
    range: float
    tail_d2: Callable[[Tensor], Tensor]
    tail_osc: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor]
    cap: float


def _tanh_spec() -> TableSpec:
    """tanh: σ' = sech² ∈ (0, 1], σ''' = −2(1 − t²)(1 − 3t²) with t = tanh z: as a function of
    T = t² ∈ [0, 1) it lies in [−2/3, 2], so sup|σ'''| = 2. On |z| ≥ t: sech²z ≤ 4e^{−2t} (the
    oscillation of σ') and |σ''| = 2|tanh z|sech²z ≤ 8e^{−2t}."""
    return TableSpec(
        "tanh", 2.0, 1.0, lambda t: 8 * torch.exp(-2 * t), lambda t: 4 * torch.exp(-2 * t),
        lambda z: 1 - torch.tanh(z) ** 2,
        lambda z: -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2),
        4 / (3 * math.sqrt(3)),
    )  # fmt: skip


def _sigmoid_spec() -> TableSpec:
    """sigmoid: σ' = s(z)s(−z) = p ∈ (0, 1/4], σ''' = p(1 − 6p) ∈ [−1/8, 1/24] (a parabola in p),
    so sup|σ'''| = 1/8. On |z| ≥ t: σ' ≤ e^{−t} and |σ''| = σ'|1 − 2s| ≤ e^{−t}."""
    return TableSpec(
        "sigmoid", 0.125, 0.25, lambda t: torch.exp(-t), lambda t: torch.exp(-t),
        lambda z: torch.sigmoid(z) * torch.sigmoid(-z),
        lambda z: -torch.sigmoid(z) * torch.sigmoid(-z) * torch.tanh(z / 2),
        1 / (6 * math.sqrt(3)),
    )  # fmt: skip


def _softplus_spec() -> TableSpec:
    """softplus (β = 1): σ' = s(z) ∈ (0, 1), σ'' = s(z)s(−z), σ''' = sigmoid'' with sup 1/(6√3) ≤
    0.0962251. On |z| ≥ t: σ' lies within s(−t) ≤ e^{−t} of its limit, |σ''| ≤ e^{−t}."""
    return TableSpec(
        "softplus", 0.0962251, 1.0, lambda t: torch.exp(-t), lambda t: torch.exp(-t),
        torch.sigmoid, lambda z: torch.sigmoid(z) * torch.sigmoid(-z), 0.25,
    )  # fmt: skip


_SPEC_FACTORIES: dict[str, Callable[[], TableSpec]] = {
    "tanh": _tanh_spec,
    "sigmoid": _sigmoid_spec,
    "softplus": _softplus_spec,
}

#: The activations with anchored tables (others keep their global sup|σ''| in anchored bounds).
SPECS = ("tanh", "sigmoid", "softplus", "centered_softplus", "logsigmoid")


def spec_for(record) -> tuple[str, float, bool] | None:
    """(table kind, scale β, mirrored) for a :class:`~curvbound.runtime.smoothness.Smoothness`
    record, or None when no anchored table exists for it.

    β is read back exactly from the record's curvature β/4 (its name rounds β for display).
    """
    if not isinstance(record, Smoothness) or not record.smooth:
        return None
    kind = record.name.split("(")[0]
    if kind in ("tanh", "sigmoid"):
        return kind, 1.0, False
    if kind in ("softplus", "centered_softplus"):
        return "softplus", float(4 * record.curvature), False
    if kind == "logsigmoid":
        return "softplus", 1.0, True
    return None


def beta_prime(record, z0: Tensor, *, radius: float = 40.0, points: int = 4001) -> Tensor:
    """β'(z₀) at each entry of ``z0`` (float64) by the tangency condition, for a Smoothness record.

    For each z₀, |A(z₀, z)| is scanned on ``points`` values of z in [z₀ − radius, z₀ + radius]
    (plus z → z₀, where A → σ''(z₀)); the best bracket is refined by golden-section search. The
    result is attained (a lower bound of the exact β' up to ~1e-12), and agrees with the exact
    value to about 1e-9 when the maximiser is isolated. Meant for tests and small inputs (it costs
    ``points`` evaluations of σ' per entry).

    >>> from curvbound.runtime import smoothness as S
    >>> round(float(beta_prime(S.tanh(), torch.tensor([0.0]))[0]), 6)
    0.582583
    """
    z0 = torch.as_tensor(z0, dtype=torch.float64).reshape(-1)
    d1, d2 = record.d1, record.d2
    out = torch.empty_like(z0)
    half = points // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64) * (radius / half)  # exact 0
    points = len(offsets)
    for start in range(0, len(z0), 64):
        a = z0[start : start + 64, None]
        z = torch.cat([a + offsets, offsets.expand(len(a), -1)], dim=1)  # near z₀ and near 0
        slope = _chord(d1, d2, a, z)
        k = slope.argmax(dim=1, keepdim=True)
        lo = torch.gather(z, 1, (k - 1).clamp_min(0))
        hi = torch.gather(z, 1, (k + 1).clamp_max(2 * points - 1))
        best = torch.maximum(slope.gather(1, k), d2(a).abs())
        g = (math.sqrt(5) - 1) / 2
        for _ in range(60):  # golden section on |A| in [lo, hi]
            p, q = hi - g * (hi - lo), lo + g * (hi - lo)
            fp, fq = _chord(d1, d2, a, p), _chord(d1, d2, a, q)
            best = torch.maximum(best, torch.maximum(fp, fq))
            left = fp > fq
            hi = torch.where(left, q, hi)
            lo = torch.where(left, lo, p)
        out[start : start + 64] = best[:, 0]
    return out


def _chord(d1, d2, a: Tensor, z: Tensor) -> Tensor:
    # |A(a, z)|; for |z − a| < 1e-5 the difference quotient cancels, and σ'' at the midpoint
    # equals A(a, z) up to sup|σ''''|·|z − a|²/24
    close = (z - a).abs() < 1e-5
    v = ((d1(z) - d1(a)) / torch.where(close, torch.ones_like(z), z - a)).abs()
    return torch.where(close, d2((a + z) / 2).abs(), v)


@dataclass(frozen=True)
class AnchoredTable:
    """A sound table of β': ``table(z0) ≥ β'(z0)`` entrywise (module docstring for the proof).

    ``values[k]`` bounds β' on the cells k−1, k, k+1 of the grid −``extent`` + k·``step``;
    ``scale``/``mirror`` map the record's argument onto the base table (softplus_β, logsigmoid).
    Entries that are not finite get the global ``cap`` ≥ sup|σ''|.
    """

    kind: str
    values: Tensor
    step: float
    extent: float
    scale: float
    mirror: bool
    cap: float
    spec: TableSpec

    def __call__(self, z0: Tensor) -> Tensor:
        z = z0.detach().to(torch.float64)
        if self.mirror:
            z = -z
        if self.scale != 1.0:
            z = z * self.scale
        n = self.values.numel()
        k = torch.floor((z + self.extent) / self.step).clamp(0, n - 1)
        k = torch.nan_to_num(k, nan=0.0).long()
        inside = self.values[k]
        out = torch.where(z.abs() >= self.extent, self._tail(z.abs()), inside)
        if self.scale != 1.0:
            out = out * (self.scale * (1 + 4 * _U))
        out = torch.minimum(out, torch.tensor(self.cap, dtype=torch.float64))
        return torch.where(torch.isfinite(z), out, torch.tensor(self.cap, dtype=torch.float64))

    def _tail(self, a: Tensor) -> Tensor:
        """β'(z₀) for |z₀| = a ≥ extent: for any split distance 0 < d < a, the points z within d of
        z₀ give |A| ≤ sup_{|t| ≥ a − d}|σ''| and the others |A| ≤ range/d; the best of a few d."""
        best = torch.full_like(a, math.inf)
        for c in (0.5, 4.0, 8.0, 12.0):
            near = a * c if c < 1 else torch.full_like(a, c)  # the closest |t| to 0 that is used
            d = a - near
            bound = torch.maximum(self.spec.tail_d2(near), self.spec.range / d)
            best = torch.minimum(best, bound)
        return best * (1 + 8 * _U) + _ABS


@lru_cache
def _base_table(kind: str) -> tuple[Tensor, TableSpec]:
    """Cell bounds of the β = 1 table of ``kind`` on [−_RANGE, _RANGE] (module docstring)."""
    spec = _SPEC_FACTORIES[kind]()
    h = _step(spec)
    n_scan = int(round(_SCAN / h))
    n_tab = int(round(_RANGE / h))
    zs = torch.arange(-n_scan, n_scan + 1, dtype=torch.float64) * h  # exact multiples of h
    s1, s2 = spec.d1(zs), spec.d2(zs)
    idx = torch.arange(n_scan - n_tab, n_scan + n_tab + 1)
    point = torch.empty(len(idx), dtype=torch.float64)
    for start in range(0, len(idx), 256):
        rows = idx[start : start + 256]
        num = s1[None, :] - s1[rows, None]
        den = zs[None, :] - zs[rows, None]
        a = (num / den).abs()
        a[torch.arange(len(rows)), rows] = s2[rows].abs()  # z = z₀: the limit σ''(z₀)
        point[start : start + 256] = a.max(dim=1).values
    z0 = zs[idx]
    omega = spec.tail_osc(torch.tensor(_SCAN, dtype=torch.float64))
    beyond = torch.maximum(omega / (_SCAN - z0), omega / (_SCAN + z0))
    slack = spec.third * h / 4
    point = point * (1 + 16 * _U) + slack + beyond + _ABS  # ≥ β' at each grid point
    cells = (point[:-1] + point[1:]) / 2 + slack  # ≥ β' on each cell [z_k, z_{k+1}]
    cells = cells * (1 + 8 * _U)
    padded = torch.cat([cells[:1], cells, cells[-1:]])
    dilated = torch.maximum(torch.maximum(padded[:-2], padded[1:-1]), padded[2:])
    cap = spec.cap * (1 + 4 * _U)
    return dilated.clamp_max(cap), spec


def _step(spec: TableSpec) -> float:
    """The largest power of two h ≤ 1/16 with S₃·h/2 ≤ _SLACK·cap (1/256 for tanh)."""
    h = 1.0 / 16
    while spec.third * h / 2 > _SLACK * spec.cap:
        h /= 2
    return h


def anchored_table(record) -> AnchoredTable | None:
    """The sound β' table of a Smoothness record, or None when there is none (see :data:`SPECS`).

    Built once per activation kind and process (about a second for tanh, whose grid is the
    finest) and cached in memory.
    """
    found = spec_for(record)
    if found is None:
        return None
    kind, scale, mirror = found
    values, spec = _base_table(kind)
    cap = float(record.curvature_float)
    return AnchoredTable(kind, values, _step(spec), _RANGE, scale, mirror, cap, spec)
