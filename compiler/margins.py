"""``bf.margins()``: the pairwise margin bounds of a bound function, evaluated.

The output node's bound expressions are evaluated once more with every quantity that depends on
the last linear layer G replaced by its per-pair value (the pair quantities of
:mod:`curvbound.runtime.margins`, recorded by the output node's rule as a ``MarginFold``); see that
module for the method. This module owns the evaluation and the :class:`Margins` record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import Tensor

from ..runtime import margins as pair_module
from ..runtime.margins import _U, MarginFold, _Context, pair_index
from .codegen import print_expr
from .rounding import rounding_exponent, rounding_factor

__all__ = ["Margins", "margins", "evaluate_expression", "reset_pair_vectors", "pair_values"]


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


def evaluate_expression(expr: sympy.Expr, values: Mapping[str, Any], device=None) -> Tensor:
    src = print_expr(expr)
    scope = {"torch": torch, "math": math, **values}
    out = eval(compile(src, "<curvbound-margin>", "eval"), scope)  # noqa: S307 - our own printer
    return torch.as_tensor(out, dtype=torch.float64, device=device)


def _square(values: Tensor, k: int) -> Tensor:
    out = torch.zeros(k, k, dtype=torch.float64, device=values.device)
    i, j = (t.to(values.device) for t in pair_index(k))
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


def margins(bf, *, differentiable: bool = False, pair_steps: int | None = None) -> Margins:
    """Pairwise Lipschitz and curvature bounds of every margin f_i − f_j of ``bf``'s model.

    Evaluates ``bf()`` once (the current power-iteration state; refresh first for converged
    estimates) and folds each pair c = e_i − e_j into the output node (module docstring). Falls
    back to √2 times the global bound, saying so in ``.note``, when the output node is not a
    linear layer whose rule recorded how to fold c.

    ``differentiable=True`` (estimate mode only) keeps the whole computation on the autograd
    graph of the live weights, for training (:class:`curvbound.CurvaturePenalty` with
    ``margins=True``): the same quantities, with every power-iteration vector held fixed as in
    ``bf()``; the per-pair block norms are top eigenvalues λ_max(D_c·WWᵀ·D_c) from ``eigvalsh``,
    whose derivative is vᵀ(dS)v (v the top eigenvector; exact where λ_max is simple).
    ``pair_steps=k`` (estimate mode) replaces those eigenvalue problems by warm-started per-pair
    power iteration, k steps per call (cheaper; an estimate from below like every other
    power-iteration norm; see :class:`~curvbound.runtime.margins.PairScaledRows`).
    """
    if differentiable and bf.norms == "certified":
        raise ValueError(
            "margins(differentiable=True) needs an estimate-mode bound (norms='estimate'): "
            "certified norms are not differentiable"
        )
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return _margins(bf, differentiable, pair_steps)


def reset_pair_vectors(bf) -> None:
    """Restart the tracked per-pair vectors of ``margins(..., pair_steps=k)`` from exact ones."""
    fold = getattr(bf, "_margin_fold", None)
    for pq in (fold.fold.values() if fold is not None else ()):
        if hasattr(pq, "reset"):
            pq.reset()


def _margins(bf, differentiable: bool, pair_steps: int | None = None) -> Margins:
    out_info = next(nb for nb in bf._node_info if nb.name == bf.output)
    fold: MarginFold | None = getattr(bf, "_margin_fold", None)
    k = _classes(bf)
    if k < 2:
        raise ValueError(f"margins need at least two outputs; the model has {k}")
    if fold is None:
        return _fallback(bf, f"the output node '{bf.output}' is not a linear layer", k)
    bounds = bf()
    certified = bool(bounds.certified)
    ctx = _Context(k, certified, grad=differentiable, device=bounds.curvature.device,
                   pair_steps=pair_steps)
    values: dict[str, Any] = {}
    for name, q in bf.quantities.items():
        values[name] = ctx.keep(q())
    for name, (L, M) in bounds.nodes.items():
        values[f"L_{name}"] = ctx.keep(L)
        values[f"M_{name}"] = ctx.keep(M)
    one_sided = not (differentiable or pair_steps is not None)  # training: two-sided only
    only_sides = {a for more in (fold.lower, fold.upper) for args in more.values()
                  for e in args for a in e.free_symbols}
    try:
        if not one_sided:
            for sym, pq in fold.fold.items():
                if sym not in only_sides:
                    values[sym.name] = pq.pairs(ctx)
        else:
            values.update(pair_values(bf, fold, ctx))
    except NotImplementedError as exc:
        if not certified:
            raise
        return _fallback(bf, f"no certified pair quantity ({exc})", k)
    lip_expr = out_info.lipschitz
    curv_expr = out_info.curvature.xreplace(
        {m: sympy.Min(*m.args, *extra, evaluate=False) for m, extra in fold.extra.items()}
    )
    lip = evaluate_expression(lip_expr, values, ctx.device).expand(len(ctx.i))
    curv = evaluate_expression(curv_expr, values, ctx.device).expand(len(ctx.i))
    sides = {}
    for key, more in (("lower", fold.lower), ("upper", fold.upper)):
        if more and one_sided:
            sides[key] = out_info.curvature.xreplace({
                m: sympy.Min(*m.args, *fold.extra.get(m, ()), *more.get(m, ()), evaluate=False)
                for m in {*fold.extra, *more}
            })
    side_vals = {key: evaluate_expression(e, values, ctx.device).expand(len(ctx.i))
                 for key, e in sides.items()}
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
    # the eigenvalue budget is read at call time (tests patch it)
    return (certified, pair_module.PAIR_EIG_BUDGET,
            *((id(p), p._version) for p in bf.model.parameters()))


def pair_values(bf, fold: MarginFold, ctx: _Context, names=None) -> dict[str, Tensor]:
    """The per-pair quantities of ``fold`` (only ``names`` when given), cached on ``bf`` until a
    parameter of the model changes (the eigenvalue problems of wide output blocks take seconds).
    Not for differentiable or tracked (``pair_steps``) calls."""
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
