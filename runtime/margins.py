"""Pairwise margin bounds: Lipschitz and curvature constants of every logit difference f_i − f_j.

The certificates (theory §6) need the constants of the margin cᵀf with c = e_i − e_j. The global
route multiplies the vector map's constants by √2 (‖c‖ = √2). The pairwise route (theory §5) folds
c into the last linear layer, G → cᵀG: the output node's bound expression is evaluated once more
with every quantity that depends on G replaced by its value for cᵀG, for all K(K−1)/2 pairs in
one batched computation. Everything upstream of the output node (the values of all other nodes and
quantities) is shared with ``bf()``. Which quantities depend on G, and how to compute them per
pair, is recorded by the rule that built the output node (a :class:`MarginFold`):

- :class:`PairVectorNorm` — ‖(A)ᵀc‖ for a map A ending in G (‖cᵀG‖, the LipLT products ‖cᵀG⋯A_j‖),
- :class:`PairScaledRows` — ‖diag(|c̃|^p)·W‖^(1/p) with c̃ = Gᵀc: p = 1 is the block norm ‖Â‖ of
  the scalar block, p = ½ Singla & Feizi's two-layer bound ‖diag(√|c̃|)W‖² (margin only),
- :class:`PairLipLT` — the LipLT factor of the output node with its products folded,
- :class:`PairCRT` — CRT's sensitivity with S_{L−1} = |cᵀW_L|.

Cost (measured by ``benchmarks/tightness.py``, see docs/benchmarks.md): one call evaluates ``bf()``
once and then only the pair quantities of the output block.

>>> import curvbound, torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> m = curvbound.compile(net.double(), torch.zeros(1, 4, dtype=torch.float64)).margins()
>>> m.lipschitz.shape, bool(m.pairwise), float(m.curvature[1, 1])
(torch.Size([3, 3]), True, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import Tensor

from .certified import certify, rounding_factor
from .operators import LinearOperator, exact_arithmetic
from .products import CRTSensitivity, LipLTFactor, liplt_step, matrix_of

__all__ = [
    "MarginFold",
    "PairVectorNorm",
    "PairScaledRows",
    "PairCRT",
    "PairLipLT",
    "pair_index",
    "PAIR_EIG_BUDGET",
]

_U = 2.0**-53
_CHUNK = 1 << 22  # float64 entries per chunk of pair computations (32 MiB)
#: Per-pair eigenvalue problems (m×m each, m the hidden width of the output block) are solved
#: while m³ × pairs stays below this; beyond, :class:`PairScaledRows` uses a cheaper bound.
PAIR_EIG_BUDGET = 1e10  # a few seconds; covers K = 10 with m = 512 and K = 100 with m = 100


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def pair_index(k: int) -> tuple[Tensor, Tensor]:
    """Indices (i, j), i < j, of the K(K−1)/2 pairs in row-major order."""
    i, j = torch.triu_indices(k, k, offset=1)
    return i, j


class _Context:
    """Per-call cache: the rows of a map ending in G (opᵀe_k for every class k), by operator.

    ``grad``: keep the computation differentiable in the weights (estimate mode, for training);
    ``device``: where the pair tensors live (the model's device); ``pair_steps``: None for exact
    per-pair eigenvalues, else warm-started power iteration with that many steps per call (see
    :class:`PairScaledRows`)."""

    def __init__(self, k: int, certified: bool, *, grad: bool = False,
                 device: torch.device | None = None, pair_steps: int | None = None):
        self.k, self.certified, self.grad, self.device = k, certified, grad, device
        self.pair_steps = None if certified else pair_steps
        self.i, self.j = (t.to(device) for t in pair_index(k))
        self._rows: dict[int, Tensor] = {}

    def keep(self, t: Tensor) -> Tensor:
        """``t`` in float64, detached unless the call is differentiable."""
        return t.double() if self.grad else t.detach().double()

    def empty(self, n: int) -> Tensor:
        return torch.empty(n, dtype=torch.float64, device=self.device)

    def rows(self, op: LinearOperator) -> Tensor:
        """(K, n_in) matrix whose row k is Aᵀe_k (one batched vector–Jacobian product)."""
        key = id(op)
        if key not in self._rows:
            # float64 from the float64 values of the parameters (exact_arithmetic)
            x = torch.zeros(self.k, *op.in_shape, dtype=torch.float64, requires_grad=True,
                            device=self.device)
            with exact_arithmetic(), torch.enable_grad():
                y = op.apply(x).reshape(self.k, -1)
                eye = torch.eye(self.k, dtype=y.dtype, device=y.device)
                (g,) = torch.autograd.grad(y, x, eye, create_graph=self.grad)
            self._rows[key] = self.keep(g.reshape(self.k, -1))
        return self._rows[key]

    def chunks(self, width: int):
        """Slices of the pair list with about :data:`_CHUNK` entries of ``width`` each."""
        n = len(self.i)
        step = max(1, _CHUNK // max(width, 1))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))


class PairVectorNorm:
    """‖Aᵀc‖ for every pair c = e_i − e_j, A a linear map whose output is the K logits."""

    def __init__(self, op: LinearOperator):
        self.op = op

    def pairs(self, ctx: _Context) -> Tensor:
        r = ctx.rows(self.op)
        out = ctx.empty(len(ctx.i))
        for sl in ctx.chunks(r.shape[1]):
            out[sl] = (r[ctx.i[sl]] - r[ctx.j[sl]]).norm(dim=1)
        if ctx.certified:
            # rows: |r̂_k − r_k| ≤ γ_p·|A|ᵀe_k, so ‖error of a pair‖ ≤ 2γ_p·‖|A|‖; then one
            # subtraction per entry and the norm's own rounding (relative)
            abs_bound = self.op.abs_norm_bound()
            if abs_bound is None:
                raise NotImplementedError(f"{self.op.describe()} has no bound on ‖|A|‖")
            err = 2 * _gamma(self.op.rounding_terms() + 2) * float(abs_bound)
            out = out * (1 + _gamma(r.shape[1] + 4)) + err
        return out


class PairScaledRows:
    """‖diag(|c̃|^p)·W‖^(1/p) with c̃ = Gᵀc for every pair, by λ_max of diag(d)·WWᵀ·diag(d).

    p = 1: the scalar block's vectorised-Jacobian norm ‖Â_c‖ = ‖diag(c̃)W‖ (theory §3 (c) with
    G → cᵀG); p = ½: Singla & Feizi's ‖diag(√|c̃|)W‖² (theory §5), valid for scalar outputs only.

    λ_max(S_c), S_c = D_c·WWᵀ·D_c, is computed by ``eigvalsh`` per pair, or, for training
    (estimate mode, ``pair_steps`` set), as the Rayleigh quotient v_cᵀS_c v_c of a persistent,
    warm-started unit vector per pair advanced by ``pair_steps`` power steps per call (batched
    matrix products instead of an eigen-decomposition per pair). S_c is PSD, so that is an
    estimate from below, like every power-iteration norm, and its gradient with v_c held fixed
    is v_cᵀ(dS_c)v_c, the eigenvalue's derivative at convergence. Vectors start (and
    :meth:`reset` restarts them) from the exact top eigenvectors.

    ``signs`` = (w₊, w₋) replaces |c̃| by the one-sided weights w₊·c̃⁺ + w₋·c̃⁻ (c̃⁺ = max(c̃, 0),
    c̃⁻ = max(−c̃, 0)), for the one-sided bounds of :class:`~curvbound.compiler.margins.Margins`
    (``neg_curvature``).
    """

    def __init__(self, G: LinearOperator, W: LinearOperator, power: float, *,
                 whole: Any = None, w_norm: Any = None,
                 signs: tuple[float, float] | None = None):
        self.G, self.W, self.power = G, W, float(power)
        self.whole, self.w_norm = whole, w_norm  # quantities ‖Â‖ and ‖W‖ for the cheap bound
        self.signs = None if signs is None else (float(signs[0]), float(signs[1]))
        self._vectors: dict[tuple[int, int], Tensor] = {}

    def _weights(self, ctx: _Context, r: Tensor, sl: slice) -> Tensor:
        """|c̃| (or the one-sided weights) of the pairs ``sl``, rounded up in certified mode. The
        rows are exact, so the computed c̃ has the sign of the exact one (IEEE subtraction)."""
        diff = r[ctx.i[sl]] - r[ctx.j[sl]]
        if self.signs is None:
            c = diff.abs()
        else:
            wp, wn = self.signs
            c = diff.clamp_min(0) * wp + (-diff).clamp_min(0) * wn
        if ctx.certified:
            c = c * (1 + 16 * _U)  # the subtraction, the weights and the entries' own rounding
        return c

    def reset(self) -> None:
        """Forget the tracked per-pair vectors (the next tracked call starts exactly)."""
        self._vectors.clear()

    def _tracked(self, ctx: _Context, sl: slice, d: Tensor, t: Tensor) -> Tensor:
        key = (sl.start, sl.stop)
        v = self._vectors.get(key)
        if v is None or v.shape != d.shape or v.device != d.device:
            with torch.no_grad():
                s = d[:, :, None] * t * d[:, None, :]
                v = torch.linalg.eigh(s.detach())[1][:, :, -1]
        else:
            with torch.no_grad():
                dd, tt = d.detach(), t.detach()
                for _ in range(ctx.pair_steps):
                    w = dd * ((dd * v) @ tt)  # S_c v_c for every pair (T symmetric)
                    n = w.norm(dim=1, keepdim=True)
                    v = torch.where(n > 0, w / n.clamp_min(1e-300), v)
        self._vectors[key] = v.detach()
        return (v * d * ((d * v) @ t)).sum(dim=1)

    def pairs(self, ctx: _Context) -> Tensor:
        r = ctx.rows(self.G)  # (K, m): row k = Gᵀe_k (exact: G has one factor)
        m = r.shape[1]
        with exact_arithmetic():
            w = ctx.keep(matrix_of(self.W))
        n_in = w.shape[1]
        if (ctx.pair_steps is None and not ctx.grad and n_in < m
                and float(n_in) ** 3 * len(ctx.i) <= 5 * PAIR_EIG_BUDGET):
            return self._narrow(ctx, r, w)
        t = w @ w.T
        if ctx.certified:
            e_t = _gamma(w.shape[1] + 8) * (w.abs() @ w.abs().T)  # entrywise bound on |T − T̂|
        if float(m) ** 3 * len(ctx.i) > PAIR_EIG_BUDGET:
            return self._cheap(ctx, r, t.abs() + e_t if ctx.certified else t.abs())
        if ctx.certified:
            e_t = torch.linalg.matrix_norm(e_t)
        out = ctx.empty(len(ctx.i))
        for sl in ctx.chunks(m * m):
            c = self._weights(ctx, r, sl)
            d = c**self.power
            if ctx.certified:
                d = d * (1 + 4 * _U)
            if ctx.pair_steps is not None:
                out[sl] = self._tracked(ctx, sl, d, t).clamp_min(0) ** (0.5 / self.power)
                continue
            s = d[:, :, None] * t * d[:, None, :]
            lam = torch.linalg.eigvalsh(s)[:, -1].clamp_min(0)
            if ctx.certified:
                # λ_max(DTD) ≤ λ_max(DT̂D) + max(d)²‖T − T̂‖, ‖T − T̂‖ ≤ γ‖|W||W|ᵀ‖_F; forming
                # DT̂D rounds each entry twice; eigvalsh's backward error is covered by certify()
                dmax = d.max(dim=1).values
                lam = lam + dmax**2 * e_t + 3 * _U * torch.linalg.matrix_norm(s)
                lam = certify(lam)
            out[sl] = lam ** (0.5 / self.power)
        return out * (1 + 4 * _U) if ctx.certified else out

    def _narrow(self, ctx: _Context, r: Tensor, w: Tensor) -> Tensor:
        """The same λ_max through the smaller side: λ_max(D·WWᵀ·D) = λ_max(Wᵀ·D²·W) (n_in × n_in,
        for W wider than it is tall, e.g. the 784 → 1024 layer of an MNIST MLP)."""
        m, n_in = w.shape
        frob2 = (w * w).sum() * (1 + _gamma(m * n_in + 2))  # ≥ ‖W‖_F² = ‖|W|‖_F²
        out = ctx.empty(len(ctx.i))
        for sl in ctx.chunks(2 * m * n_in):
            c = self._weights(ctx, r, sl)
            d2 = c ** (2 * self.power)
            if ctx.certified:
                d2 = d2 * (1 + 8 * _U)  # the powers' rounding (d² from |c̃|, rounded up)
            s = (w.T[None] * d2[:, None, :]) @ w
            lam = torch.linalg.eigvalsh(s)[:, -1].clamp_min(0)
            if ctx.certified:
                # entrywise |S − Ŝ| ≤ γ_{m+4}·(|W|ᵀD²|W|) (a length-m dot product of products),
                # whose ‖·‖₂ ≤ max(d²)·‖|W|‖₂² ≤ max(d²)·‖W‖_F²; eigvalsh's backward error is
                # covered by certify()
                e_s = _gamma(m + 4) * d2.max(dim=1).values * frob2
                lam = lam + e_s + 3 * _U * torch.linalg.matrix_norm(s)
                lam = certify(lam)
            out[sl] = lam ** (0.5 / self.power)
        return out * (1 + 4 * _U) if ctx.certified else out

    def _cheap(self, ctx: _Context, r: Tensor, t_abs: Tensor) -> Tensor:
        """Too many pairs for one eigenvalue problem each: the Schur test
        λ_max(DTD) ≤ max_i d_i·Σ_j |T_ij|·d_j (one matrix product for all pairs), and for p = 1
        also √2·‖Â‖ (‖Â_c‖ ≤ ‖c‖·‖Â‖ since GᵀccᵀG ⪯ ‖c‖²GᵀG) and max|c̃|·‖W‖."""
        n = len(ctx.i)
        out = ctx.empty(n)
        for sl in ctx.chunks(r.shape[1]):
            c = self._weights(ctx, r, sl)
            d = c**self.power
            if ctx.certified:
                d = d * (1 + 4 * _U)
            rows = d * (d @ t_abs)  # d_i·Σ_j |T_ij| d_j (|T| symmetric)
            if ctx.certified:
                rows = rows * (1 + _gamma(t_abs.shape[0] + 2))
            bound = rows.max(dim=1).values ** (0.5 / self.power)
            if self.power == 1 and self.whole is not None and self.w_norm is not None:
                bound = torch.minimum(bound, c.max(dim=1).values * float(self.w_norm().detach()))
                bound = bound.clamp_max(math.sqrt(2) * float(self.whole().detach()))
            out[sl] = bound
        return out * (1 + 4 * _U) if ctx.certified else out


class PairLipLT:
    """The LipLT factor μ_n of the output node for every pair: the recursion of
    :class:`~curvbound.runtime.products.LipLTFactor` with each product ‖A_n⋯A_j‖ that ends in G
    replaced by ‖(A_n⋯A_j)ᵀc‖; the factors μ_k of the earlier nodes are shared by all pairs."""

    def __init__(self, mu: LipLTFactor, ops: Mapping[tuple[int, int], LinearOperator]):
        self.mu, self.ops = mu, dict(ops)

    def pairs(self, ctx: _Context) -> Tensor:
        with torch.set_grad_enabled(ctx.grad):
            mus = [ctx.keep(v) for v in self.mu.values()[:-1]]
        n = self.mu.n
        pv = {key: PairVectorNorm(op).pairs(ctx) for key, op in self.ops.items()}
        total = liplt_step(n, self.mu.acts, mus, pv.__getitem__)
        if self.mu.keep_product and n > 0:
            total = torch.minimum(total, pv[(n, n)] * self.mu.acts[n - 1][2] * mus[n - 1])
        return total * rounding_factor(8.0 * (n + 1) ** 2) if ctx.certified else total


class PairCRT:
    """CRT's max_j (S_I)_j with S_{L−1} = |cᵀW_L| for every pair (theory §10)."""

    def __init__(self, quantity: CRTSensitivity):
        self.q = quantity

    def pairs(self, ctx: _Context) -> Tensor:
        with exact_arithmetic():
            top = ctx.keep(matrix_of(self.q.ops[-1]))  # W_L: K × m
        out = ctx.empty(len(ctx.i))
        with exact_arithmetic(), torch.set_grad_enabled(ctx.grad):
            for sl in ctx.chunks(top.shape[1] * 4):
                s = (top[ctx.i[sl]] - top[ctx.j[sl]]).abs()
                out[sl] = self.q.vectors(s).max(dim=1).values
        if ctx.certified:
            terms = sum(math.prod(op.in_shape) + 2 for op in self.q.ops)
            out = certify(out * (1 + 2 * _gamma(terms) + 2 * _U))
        return out


@dataclass(frozen=True)
class MarginFold:
    """How to fold a margin vector c into an affine output node v = G·a + b.

    ``fold`` maps each quantity symbol of the node's expressions that depends on G to its per-pair
    computation; ``extra`` maps a ``sympy.Min`` of the curvature expression to further arguments
    valid for scalar outputs only (Singla & Feizi's block bound). ``lower`` and ``upper`` map a
    ``sympy.Min`` to further arguments valid only for the one-sided bounds K with
    ∇²(cᵀf) ⪰ −K·I (``lower``) or ∇²(cᵀf) ⪯ K·I (``upper``) (see ``Margins.neg_curvature``).
    """

    op: LinearOperator
    fold: Mapping[sympy.Symbol, Any]
    extra: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)
    note: str = ""
    lower: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)
    upper: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)
