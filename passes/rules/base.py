"""Rule combinators: most rules are one line built from these (cf. JAX's defjvp/deflinear)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import sympy
from torch import fx

from ...compiler.context import RuleContext, Transfer
from ...compiler.registry import DEFAULT_REGISTRY

__all__ = [
    "register",
    "elementwise",
    "elementwise_transfer",
    "identity",
    "scaled",
    "broadcast_factor",
    "number",
]

register = DEFAULT_REGISTRY.register


def number(x: Any) -> sympy.Expr:
    """A Python number as an *exact* sympy number (floats by their binary value, ∞ as oo)."""
    if isinstance(x, sympy.Basic):
        return x
    if isinstance(x, bool):
        raise TypeError("expected a number, got a bool")
    if isinstance(x, int):
        return sympy.Integer(x)
    x = float(x)
    if math.isinf(x):
        return sympy.oo if x > 0 else -sympy.oo
    if x.is_integer():
        return sympy.Integer(int(x))
    r = sympy.Rational(x)  # exact binary value
    simple = sympy.nsimplify(x, rational=True)
    return simple if simple == r else sympy.Float(x, 17)


def _num(x: Any) -> sympy.Expr:
    if x is None:
        raise TypeError("an elementwise rule needs both slope and curvature")
    return number(x)


def elementwise_transfer(
    ctx: RuleContext, slope: Any, curvature: Any, name: str = "σ"
) -> Transfer:
    """Transfer of v = σ(u) for an elementwise σ with sup|σ'| = slope, sup|σ''| = curvature.

    L_v = slope·L_u. Curvature (theory §3):
    - affine producer u = A z + b and method != "naive": the row-norm block rule (d),
      M_v = sup|σ''|·‖diag(r)A‖·L_z² + slope·M_u with r_j = ‖row_j(A)‖;
    - otherwise the generic rule M_v = sup|σ''|·L_u² + slope·M_u.
    ``curvature = inf`` marks a non-C¹ map (ReLU...): M_v = ∞.
    """
    a, c = _num(slope), _num(curvature)
    u = ctx.input()
    L = a * ctx.L(u)
    if c == sympy.oo:
        return Transfer(L, sympy.oo, nonsmooth=True, note=f"{name}' is discontinuous: curvature ∞")
    prod = ctx.transfer(u)
    op = prod.operator
    if (
        ctx.method != "naive"
        and op is not None
        and prod.source is not None
        and not op.isometric
        and getattr(op, "core", [op])
    ):
        scaled = op.row_scaled()
        if scaled is not None:
            sym, q = ctx.norm(scaled, "rnorm")
            M = c * sym * ctx.L(prod.source) ** 2 + a * ctx.M(u)
            return Transfer(
                L,
                M,
                {sym: q},
                note=f"block rule (d): {sym} = ‖diag(r)A‖, A = {op.describe()}",
            )
    return Transfer(L, c * ctx.L(u) ** 2 + a * ctx.M(u))


def elementwise(
    slope: Any = None,
    curvature: Any = None,
    *,
    smoothness: Callable[[fx.Node, RuleContext], Any] | Any = None,
) -> Callable[[fx.Node, RuleContext], Transfer]:
    """A rule for an elementwise activation from its constants sup|σ'| and sup|σ''|.

    Pass numbers (exact sympy values or proven upper bounds; ``float('inf')`` curvature for a
    non-C¹ map), or ``smoothness``: a record with ``slope``/``curvature`` attributes, or a function
    ``(node, ctx) -> record`` for parameterised activations.

    Example:
        >>> import torch, curvbound
        >>> class Swish(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> reg = curvbound.Registry()
        >>> _ = reg.register(Swish)(curvbound.rules.elementwise(slope=1.0999, curvature=0.5))
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), Swish())
        >>> curvbound.compile(net, torch.zeros(1, 3), rules=reg).graph.nodes["_1"]["rule"]
        'elementwise(slope=1.0999, curvature=0.5)'
    """

    def rule(node: fx.Node, ctx: RuleContext) -> Transfer:
        rec = smoothness(node, ctx) if callable(smoothness) else smoothness
        if rec is not None:
            return elementwise_transfer(ctx, rec.slope, rec.curvature, getattr(rec, "name", "σ"))
        return elementwise_transfer(ctx, slope, curvature)

    label = getattr(smoothness, "name", None) or (
        "custom" if callable(smoothness) else f"slope={slope}, curvature={curvature}"
    )
    rule.__qualname__ = rule.__name__ = f"elementwise({label})"
    rule.__module__ = ""
    return rule


def identity(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Identity maps (eval dropout, nn.Identity, contiguous): L_v = L_u, M_v = M_u."""
    from ...runtime.operators import Reshape

    shape = ctx.shape()
    return ctx.linear(Reshape(lambda x: x, shape, shape, "identity"), norm=1)


def broadcast_factor(ctx: RuleContext, n: fx.Node) -> sympy.Expr:
    """Norm of broadcasting input ``n`` to the node's output shape: √(numel out / numel in)."""
    out, inp = math.prod(ctx.shape()), math.prod(ctx.shape(n))
    return sympy.sqrt(sympy.Rational(out, inp)) if inp else sympy.Integer(1)


def scaled(ctx: RuleContext, node_in: fx.Node, c: float) -> Transfer:
    """v = c·u with broadcasting: L_v = |c|·√k·L_u (k copies of each entry)."""
    from ...runtime.operators import FunctionOperator, Scalar

    shape_in, shape_out = ctx.shape(node_in), ctx.shape()
    if shape_in == shape_out:
        return ctx.linear(Scalar(c, shape_in), node_in, norm=number(abs(c)))
    k = broadcast_factor(ctx, node_in)
    op = FunctionOperator(
        lambda x: c * x.expand(x.shape[0], *shape_out),
        shape_in,
        shape_out,
        label=f"broadcast·{c:g}",
    )
    return ctx.linear(op, node_in, norm=number(abs(c)) * k)
