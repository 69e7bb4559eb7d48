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

from ..runtime.margins import _U, MarginFold, _Context, pair_index
from .codegen import print_expr
from .rounding import rounding_exponent, rounding_factor

__all__ = ["Margins", "margins", "evaluate_expression", "reset_pair_vectors"]


@dataclass
class Margins:
    """Bounds on every logit difference f_i − f_j of a K-class model (ℓ2 norms).

    ``lipschitz[i, j]`` and ``curvature[i, j]`` bound the Lipschitz constant of f_i − f_j and of
    its gradient (K×K float64 tensors, symmetric, zero diagonal). ``certified`` is True exactly
    when every number that entered them is a guaranteed bound. ``pairwise`` is False when the
    fallback √2·(global bound) was used (``note`` says why); ``method`` is the compile method.
    """

    lipschitz: Tensor
    curvature: Tensor
    certified: bool
    pairwise: bool
    method: str
    note: str = ""

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
    try:
        for sym, pq in fold.fold.items():
            values[sym.name] = pq.pairs(ctx)
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
    if certified:  # the float64 arithmetic of the two expressions, bounded as in compiler/rounding
        for expr, name in ((lip_expr, "lip"), (curv_expr, "curv")):
            e = rounding_exponent(expr, {})
            if e is None:
                certified = False
                continue
            f = rounding_factor(e)
            if name == "lip":
                lip = lip * f
            else:
                curv = curv * f
    note = fold.note or f"c = e_i − e_j folded into '{bf.output}'"
    return Margins(_square(lip, k), _square(curv, k), certified, True, bf.method, note)


def _classes(bf) -> int:
    for node in bf.gm.graph.nodes:
        if node.name == bf.output:
            meta = node.meta.get("tensor_meta")
            return math.prod(meta.shape[1:])
    raise ValueError(f"output node '{bf.output}' not found")
