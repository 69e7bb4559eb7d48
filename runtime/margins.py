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

from .operators import LinearOperator, exact_arithmetic
from .products import CRTSensitivity, LipLTFactor, liplt_step, matrix_of

__all__ = [
    "Margins",
    "MarginFold",
    "PairVectorNorm",
    "PairScaledRows",
    "PairCRT",
    "PairLipLT",
    "margins",
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
    """Per-call cache: the rows of a map ending in G (opᵀe_k for every class k), by operator."""

    def __init__(self, k: int, certified: bool):
        self.k, self.certified = k, certified
        self.i, self.j = pair_index(k)
        self._rows: dict[int, Tensor] = {}

    def rows(self, op: LinearOperator) -> Tensor:
        """(K, n_in) matrix whose row k is Aᵀe_k (one batched vector–Jacobian product)."""
        key = id(op)
        if key not in self._rows:
            # float64 from the float64 values of the parameters (exact_arithmetic)
            x = torch.zeros(self.k, *op.in_shape, dtype=torch.float64, requires_grad=True)
            with exact_arithmetic(), torch.enable_grad():
                y = op.apply(x).reshape(self.k, -1)
                eye = torch.eye(self.k, dtype=y.dtype)
                (g,) = torch.autograd.grad(y, x, eye)
            self._rows[key] = g.reshape(self.k, -1).detach().double()
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
        out = torch.empty(len(ctx.i), dtype=torch.float64)
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
    ``signs`` = (w₊, w₋) replaces |c̃| by the one-sided weights w₊·c̃⁺ + w₋·c̃⁻ (c̃⁺ = max(c̃, 0),
    c̃⁻ = max(−c̃, 0)), for the one-sided bounds of :class:`Margins` (``neg_curvature``).
    """

    def __init__(self, G: LinearOperator, W: LinearOperator, power: float, *,
                 whole: Any = None, w_norm: Any = None,
                 signs: tuple[float, float] | None = None):
        self.G, self.W, self.power = G, W, float(power)
        self.whole, self.w_norm = whole, w_norm  # quantities ‖Â‖ and ‖W‖ for the cheap bound
        self.signs = None if signs is None else (float(signs[0]), float(signs[1]))

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

    def pairs(self, ctx: _Context) -> Tensor:
        r = ctx.rows(self.G)  # (K, m): row k = Gᵀe_k (exact: G has one factor)
        m = r.shape[1]
        with exact_arithmetic():
            w = matrix_of(self.W).detach().double()
        n_in = w.shape[1]
        if n_in < m and float(n_in) ** 3 * len(ctx.i) <= 5 * PAIR_EIG_BUDGET:
            return self._narrow(ctx, r, w)
        t = w @ w.T
        if ctx.certified:
            e_t = _gamma(w.shape[1] + 8) * (w.abs() @ w.abs().T)  # entrywise bound on |T − T̂|
        if float(m) ** 3 * len(ctx.i) > PAIR_EIG_BUDGET:
            return self._cheap(ctx, r, t.abs() + e_t if ctx.certified else t.abs())
        if ctx.certified:
            e_t = torch.linalg.matrix_norm(e_t)
        out = torch.empty(len(ctx.i), dtype=torch.float64)
        for sl in ctx.chunks(m * m):
            c = self._weights(ctx, r, sl)
            d = c**self.power
            if ctx.certified:
                d = d * (1 + 4 * _U)
            s = d[:, :, None] * t * d[:, None, :]
            lam = torch.linalg.eigvalsh(s)[:, -1].clamp_min(0)
            if ctx.certified:
                # λ_max(DTD) ≤ λ_max(DT̂D) + max(d)²‖T − T̂‖, ‖T − T̂‖ ≤ γ‖|W||W|ᵀ‖_F; forming
                # DT̂D rounds each entry twice; eigvalsh's backward error is covered by certify()
                from .certified import certify

                dmax = d.max(dim=1).values
                lam = lam + dmax**2 * e_t + 3 * _U * torch.linalg.matrix_norm(s)
                lam = certify(lam)
            out[sl] = lam ** (0.5 / self.power)
        return out * (1 + 4 * _U) if ctx.certified else out

    def _narrow(self, ctx: _Context, r: Tensor, w: Tensor) -> Tensor:
        """The same λ_max through the smaller side: λ_max(D·WWᵀ·D) = λ_max(Wᵀ·D²·W) (n_in × n_in,
        for W wider than it is tall, e.g. the 784 → 1024 layer of an MNIST MLP)."""
        from .certified import certify

        m, n_in = w.shape
        frob2 = (w * w).sum() * (1 + _gamma(m * n_in + 2))  # ≥ ‖W‖_F² = ‖|W|‖_F²
        out = torch.empty(len(ctx.i), dtype=torch.float64)
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
        out = torch.empty(n, dtype=torch.float64)
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
        from ..compiler.rounding import rounding_factor

        with torch.no_grad():
            mus = [v.detach().double() for v in self.mu.values()[:-1]]
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
            top = matrix_of(self.q.ops[-1]).detach().double()  # W_L: K × m
        out = torch.empty(len(ctx.i), dtype=torch.float64)
        with exact_arithmetic(), torch.no_grad():
            for sl in ctx.chunks(top.shape[1] * 4):
                s = (top[ctx.i[sl]] - top[ctx.j[sl]]).abs()
                out[sl] = self.q.vectors(s).max(dim=1).values
        if ctx.certified:
            from .certified import certify

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
    ∇²(cᵀf) ⪰ −K·I (``lower``) or ∇²(cᵀf) ⪯ K·I (``upper``) (see :class:`Margins`).
    """

    op: LinearOperator
    fold: Mapping[sympy.Symbol, Any]
    extra: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)
    note: str = ""
    lower: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)
    upper: Mapping[sympy.Expr, tuple[sympy.Expr, ...]] = field(default_factory=dict)


@dataclass
class Margins:
    """Bounds on every logit difference f_i − f_j of a K-class model (ℓ2 norms).

    ``lipschitz[i, j]`` and ``curvature[i, j]`` bound the Lipschitz constant of f_i − f_j and of
    its gradient (K×K float64 tensors, symmetric, zero diagonal). ``neg_curvature[i, j]`` is a
    one-sided bound: K with ∇²(f_i − f_j) ⪰ −K·I, i.e. (∇φ(x) − ∇φ(x'))ᵀ(x − x') ≥ −K‖x − x'‖²
    for φ = f_i − f_j (not symmetric; ``pos_curvature = neg_curvature.T`` bounds the Hessian from
    above); always ≤ ``curvature`` (a two-sided bound is a one-sided one). ``certified`` is True
    exactly when every number that entered them is a guaranteed bound. ``pairwise`` is False
    when the fallback √2·(global bound) was used (``note`` says why); ``method`` is the compile
    method.

    **One-sided bounds** (the final block of a scalar margin; theory §5). Let the output be
    f = G·σ(u) + g₀ with u = W z + b, z = z(x) the rest of the network, σ a C² activation with
    proven a ≤ σ'' ≤ b, h = max(−a, b), and c = e_i − e_j, c̃ = Gᵀc, φ = cᵀf. By the chain rule

        ∇²φ = Dzᵀ Wᵀ diag(c̃ ⊙ σ''(u)) W Dz  +  Σ_k v_k ∇²z_k,   v = Wᵀ diag(σ'(u)) c̃.   (T₁ + T₂)

    T₁: entrywise c̃ⱼσ''(uⱼ) ≥ −(c̃ⱼ⁺(−a) + c̃ⱼ⁻b) =: −dⱼ (c̃ⱼ ≥ 0 meets σ'' ≥ a, c̃ⱼ < 0 meets
    σ'' ≤ b), so T₁ ⪰ −Dzᵀ Wᵀ diag(d) W Dz ⪰ −‖diag(√d) W‖²·L_z²·I, as ‖W Dz v‖... precisely
    vᵀDzᵀWᵀdiag(d)WDz v = ‖diag(√d) W Dz v‖² ≤ ‖diag(√d)W‖²‖Dz‖²‖v‖² and ‖Dz‖ ≤ L_z. Likewise
    T₁ ⪯ ‖diag(√d′)W‖²L_z²·I with d′ⱼ = c̃ⱼ⁺b + c̃ⱼ⁻(−a). For softplus (a = 0) only the entries
    of c̃ of one sign enter. T₂ has no sign structure: σ' > 0 multiplies the curvature of the
    inner network z, whose Hessians ∇²z_k are indefinite in general, so T₂ is bounded
    two-sidedly, ‖T₂‖ ≤ ‖v‖·M_z = sup_{‖w‖=1} |vᵀ D²z[w, w]| with ‖v‖ ≤ the block's Lipschitz
    bound (the chain-rule and loop-transformation terms of the two-sided bound, unchanged).
    Hence ∇²φ ⪰ −(h·‖diag(√(d/h))W‖²·L_z² + ‖T₂‖-bound)·I: the two-sided expression with the
    Singla–Feizi argument ‖diag(√|c̃|)W‖² of its ``Min`` joined by ‖diag(√(d/h))W‖²
    (:class:`PairScaledRows` with ``signs``), each a valid bound, so the minimum is one. For a
    2-layer network (z = x: L_z = 1, M_z = 0) this is exactly −h·λ_max(Wᵀdiag(c̃⁻)W) for
    softplus. Where the output rule recorded no one-sided terms (σ'' of both signs, e.g. tanh,
    other methods, other output nodes) ``neg_curvature`` equals ``curvature``.
    """

    lipschitz: Tensor
    curvature: Tensor
    certified: bool
    pairwise: bool
    method: str
    note: str = ""
    neg_curvature: Tensor | None = None

    def __post_init__(self) -> None:
        if self.neg_curvature is None:
            self.neg_curvature = self.curvature.clone()

    @property
    def pos_curvature(self) -> Tensor:
        """K with ∇²(f_i − f_j) ⪯ K·I at [i, j] (= ``neg_curvature[j, i]``)."""
        return self.neg_curvature.T

    @property
    def classes(self) -> int:
        return int(self.lipschitz.shape[0])

    def __repr__(self) -> str:
        kind = "certified" if self.certified else "estimated"
        how = "pairwise" if self.pairwise else "sqrt2-global"
        off = ~torch.eye(self.classes, dtype=torch.bool)
        lmax = float(self.lipschitz[off].max()) if self.classes > 1 else 0.0
        mmax = float(self.curvature[off].max()) if self.classes > 1 else 0.0
        return (
            f"Margins(K={self.classes}, max lipschitz={lmax:.6g}, max curvature={mmax:.6g}, "
            f"{how}, {kind})"
        )


def _evaluate(expr: sympy.Expr, values: Mapping[str, Any]) -> Tensor:
    from ..compiler.codegen import print_expr

    src = print_expr(expr)
    scope = {"torch": torch, "math": math, **values}
    out = eval(compile(src, "<curvbound-margin>", "eval"), scope)  # noqa: S307 - our own printer
    return torch.as_tensor(out, dtype=torch.float64)


def _square(values: Tensor, k: int) -> Tensor:
    out = torch.zeros(k, k, dtype=torch.float64)
    i, j = pair_index(k)
    out[i, j] = values
    out[j, i] = values
    return out


def _fallback(bf, reason: str, k: int) -> Margins:
    b = bf._latest() if hasattr(bf, "_latest") else bf()
    off = 1 - torch.eye(k, dtype=torch.float64)
    root2 = math.sqrt(2) * (1 + 4 * _U)
    lip = root2 * float(b.lipschitz) * off
    curv = root2 * float(b.curvature) * off
    note = f"√2·global bound: {reason}"
    return Margins(lip, curv, bool(b.certified), False, bf.method, note)


@torch.no_grad()
def margins(bf) -> Margins:
    """Pairwise Lipschitz and curvature bounds of every margin f_i − f_j of ``bf``'s model.

    Evaluates ``bf()`` once (the current power-iteration state; refresh first for converged
    estimates) and folds each pair c = e_i − e_j into the output node (module docstring). Falls
    back to √2 times the global bound, saying so in ``.note``, when the output node is not a
    linear layer whose rule recorded how to fold c.
    """
    from ..compiler.rounding import rounding_exponent, rounding_factor

    out_info = next(nb for nb in bf._node_info if nb.name == bf.output)
    fold: MarginFold | None = getattr(bf, "_margin_fold", None)
    k = _classes(bf)
    if k < 2:
        raise ValueError(f"margins need at least two outputs; the model has {k}")
    if fold is None:
        return _fallback(bf, f"the output node '{bf.output}' is not a linear layer", k)
    bounds = bf()
    certified = bool(bounds.certified)
    values: dict[str, Any] = {}
    for name, q in bf.quantities.items():
        values[name] = q().detach().double()
    for name, (L, M) in bounds.nodes.items():
        values[f"L_{name}"] = L.detach().double()
        values[f"M_{name}"] = M.detach().double()
    ctx = _Context(k, certified)
    try:
        values.update(pair_values(bf, fold, ctx))
    except NotImplementedError as exc:
        if not certified:
            raise
        return _fallback(bf, f"no certified pair quantity ({exc})", k)
    lip_expr = out_info.lipschitz
    curv_expr = out_info.curvature.xreplace(
        {m: sympy.Min(*m.args, *extra, evaluate=False) for m, extra in fold.extra.items()}
    )
    lip = _evaluate(lip_expr, values).expand(len(ctx.i))
    curv = _evaluate(curv_expr, values).expand(len(ctx.i))
    sides = {}
    for key, more in (("lower", fold.lower), ("upper", fold.upper)):
        if more:
            sides[key] = out_info.curvature.xreplace({
                m: sympy.Min(*m.args, *fold.extra.get(m, ()), *more.get(m, ()), evaluate=False)
                for m in {*fold.extra, *more}
            })
    side_vals = {key: _evaluate(e, values).expand(len(ctx.i)) for key, e in sides.items()}
    if certified:  # the float64 arithmetic of the expressions, bounded as in compiler/rounding
        todo = [(lip_expr, "lip"), (curv_expr, "curv"), *[(e, k) for k, e in sides.items()]]
        for expr, name in todo:
            e = rounding_exponent(expr, {})
            if e is None:
                certified = False
                continue
            f = rounding_factor(e)
            if name == "lip":
                lip = lip * f
            elif name == "curv":
                curv = curv * f
            else:
                side_vals[name] = side_vals[name] * f
    note = fold.note or f"c = e_i − e_j folded into '{bf.output}'"
    square = _square(curv, k)
    neg = square.clone()
    i, j = ctx.i, ctx.j
    if "lower" in side_vals:  # ∇²(f_i − f_j) ⪰ −K·I for i < j
        neg[i, j] = torch.minimum(neg[i, j], side_vals["lower"])
    if "upper" in side_vals:  # ∇²(f_i − f_j) ⪯ K·I, i.e. ∇²(f_j − f_i) ⪰ −K·I
        neg[j, i] = torch.minimum(neg[j, i], side_vals["upper"])
    return Margins(_square(lip, k), square, certified, True, bf.method, note, neg)


def _weights_key(bf, certified: bool) -> tuple:
    return (certified, *((id(p), p._version) for p in bf.model.parameters()))


def pair_values(bf, fold: MarginFold, ctx: _Context, names=None) -> dict[str, Tensor]:
    """The per-pair quantities of ``fold`` (only ``names`` when given), cached on ``bf`` until a
    parameter of the model changes (the eigenvalue problems of wide output blocks take seconds)."""
    key = _weights_key(bf, ctx.certified)
    cache = getattr(bf, "_pair_cache", None)
    if cache is None or cache[0] != key:
        cache = (key, {})
        bf._pair_cache = cache
    out = {}
    for sym, pq in fold.fold.items():
        if names is not None and sym.name not in names:
            continue
        if sym.name not in cache[1]:
            cache[1][sym.name] = pq.pairs(ctx)
        out[sym.name] = cache[1][sym.name]
    return out


def _classes(bf) -> int:
    for node in bf.gm.graph.nodes:
        if node.name == bf.output:
            meta = node.meta.get("tensor_meta")
            return math.prod(meta.shape[1:])
    raise ValueError(f"output node '{bf.output}' not found")
