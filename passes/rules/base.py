"""Rule combinators: most rules are one line built from these (cf. JAX's defjvp/deflinear)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch import fx

from ...compiler.context import Elementwise, RuleContext, Transfer
from ...compiler.errors import RegistrationError
from ...compiler.exprs import smin
from ...compiler.naming import node_label
from ...compiler.registry import DEFAULT_REGISTRY
from ...runtime.operators import FunctionOperator, Reshape, Scalar, per_channel_rows

__all__ = [
    "register",
    "elementwise",
    "elementwise_transfer",
    "identity",
    "scaled",
    "broadcast_factor",
    "number",
    "check_constants",
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


def check_constants(slope: Any, curvature: Any, slope_range: Any = None, where: str = "") -> None:
    """Raise :class:`~curvbound.RegistrationError` unless the constants can be bounds:
    sup|σ'| finite and ≥ 0, sup|σ''| ≥ 0 (∞ for a non-C¹ map), lo ≤ hi finite.

    >>> check_constants(1.0, 0.5)
    >>> check_constants(-1.0, 0.5)
    Traceback (most recent call last):
    ...
    curvbound.compiler.errors.RegistrationError: slope = -1.0 is negative: ...
    """
    at = f" ({where})" if where else ""

    def value(name: str, x: Any, allow_inf: bool) -> sympy.Expr:
        if x is None:
            raise RegistrationError(f"an elementwise rule needs both slope and curvature{at}")
        try:
            v = number(x)
        except (TypeError, ValueError) as exc:
            raise RegistrationError(f"{name} = {x!r} is not a number{at}: {exc}") from exc
        if v is sympy.nan or (isinstance(x, float) and math.isnan(x)):
            raise RegistrationError(f"{name} = {x!r} is NaN{at}: a bound must be a number.")
        if v.is_number and not v.is_extended_real:
            raise RegistrationError(f"{name} = {x!r} is not a real number{at}")
        if v.is_number and v.is_extended_negative:
            raise RegistrationError(
                f"{name} = {x!r} is negative: it must be an upper bound of sup|σ{_PRIMES[name]}| "
                f"≥ 0{at}. Pass the absolute bound, e.g. {name}={_abs(x)}."
            )
        if v.is_infinite and not allow_inf:
            raise RegistrationError(
                f"{name} = {x!r} is infinite{at}: a map with unbounded slope has no Lipschitz "
                "bound; only curvature may be inf (a non-C¹ map such as ReLU)."
            )
        return v

    value("slope", slope, False)
    value("curvature", curvature, True)
    if slope_range is not None:
        for v in slope_range:  # lo may be negative (a non-monotone σ): finite and real
            value("slope_range bound", _abs(v), False)
        if number(slope_range[0]) > number(slope_range[1]):
            raise RegistrationError(f"slope_range {tuple(slope_range)} has lo > hi{at}")


_PRIMES = {"slope": "'", "curvature": "''", "slope_range bound": "'"}


def _abs(x: Any) -> Any:
    try:
        return abs(x)
    except TypeError:
        return x


def elementwise_transfer(
    ctx: RuleContext,
    slope: Any,
    curvature: Any,
    name: str = "σ",
    slope_range: tuple[Any, Any] | None = None,
    record: Any = None,
) -> Transfer:
    """Transfer of v = σ(u) for an elementwise σ with sup|σ'| = slope, sup|σ''| = curvature.

    L_v = slope·L_u. Curvature (theory §3):
    - affine producer u = A z + b and method != "naive": the row-norm block rule (d),
      M_v = sup|σ''|·‖diag(r)A‖·L_z² + slope·M_u with r_j = ‖row_j(A)‖;
      With method "compositional" the generic term is kept when smaller (a LipLT-improved L_u):
      M_v = sup|σ''|·min(L_u², ‖diag(r)A‖·L_z²) + slope·M_u (both are valid);
    - otherwise the generic rule M_v = sup|σ''|·L_u² + slope·M_u.
    ``curvature = inf`` marks a non-C¹ map (ReLU...): M_v = ∞. ``slope_range`` = proven bounds
    (lo, hi) on σ' (default (−slope, slope)); consumers use it for LipLT (theory §4).
    Anchored compiles (``ctx.anchor``, theory §7): for a Smoothness ``record`` with an anchored
    table, sup|σ''| becomes the per-sample κ(x₀) = max_j β'(u_j(x₀)) and ‖diag(r)A‖ the per-sample
    ‖diag(ρ⊙r)A‖ (:mod:`curvbound.runtime.anchored`); the expressions keep their form.
    """
    check_constants(slope, curvature, slope_range, f"{name} at {node_label(ctx.node)}")
    a, c = _num(slope), _num(curvature)
    u = ctx.input()
    lo, hi = (number(v) for v in slope_range) if slope_range is not None else (-a, a)
    kappa: dict = {}
    second = getattr(record, "curvature_range", None)
    if second is not None:
        second = (number(second[0]), number(second[1]))
    if ctx.anchor is not None and c != sympy.oo:
        found = ctx.anchor.curvature(ctx, u, record)
        if found is not None:
            c, kappa = found[0], dict([found])
    info = Elementwise(u, a, c, lo, hi, name, second)
    L = a * ctx.L(u)
    switch = _own_error(ctx, record)
    if c == sympy.oo:
        note = f"{name}' is discontinuous: curvature ∞"
        return Transfer(
            L, sympy.oo, nonsmooth=True, note=note, elementwise=info, gains={u: a}, **switch
        )
    prod = ctx.transfer(u)
    op = prod.operator
    if (
        ctx.method != "naive"
        and op is not None
        and prod.source is not None
        and not op.isometric
        and getattr(op, "core", [op])
    ):
        if ctx.method == "paper":  # Algorithm 1 as published: per-channel conv row norms
            with per_channel_rows():
                scaled = op.row_scaled()
        else:
            scaled = op.row_scaled()
        if scaled is not None:
            sym, q = ctx.norm(scaled, "rnorm")
            quantities = {sym: q}
            if kappa:
                quantities = ctx.anchor.row_norm(ctx, u, record, sym, q, op)
            own = sym * ctx.L(prod.source) ** 2
            if ctx.method == "compositional":
                own = smin(ctx.L(u) ** 2, own)  # both are valid (not compared: costly)
            M = c * own + a * ctx.M(u)
            return Transfer(
                L,
                M,
                {**quantities, **kappa},
                note=f"block rule (d): {sym} = ‖diag(r)A‖, A = {op.describe()}",
                elementwise=info,
                gains={u: a},
                **switch,
            )
    return Transfer(
        L, c * ctx.L(u) ** 2 + a * ctx.M(u), kappa, elementwise=info, gains={u: a}, **switch
    )


def _own_error(ctx: RuleContext, record: Any) -> dict:
    """The node's own implementation error δ·√n (n = units per sample) for a record whose torch
    function switches formulas (``record.jump`` = δ > 0), with the smooth twin; else nothing."""
    jump = number(getattr(record, "jump", 0) or 0)
    if jump == 0:
        return {}
    n = math.prod(ctx.shape())
    return {"error": jump * sympy.sqrt(sympy.Integer(n)), "twin": record.twin}


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

    if smoothness is None:
        check_constants(slope, curvature)  # at registration: bad constants fail here
    elif not callable(smoothness):
        check_constants(
            smoothness.slope, smoothness.curvature, getattr(smoothness, "slope_range", None)
        )
    label = getattr(smoothness, "name", None) or (
        "custom" if callable(smoothness) else f"slope={slope}, curvature={curvature}"
    )
    return _ElementwiseRule(slope, curvature, smoothness, f"elementwise({label})")


class _ElementwiseRule:
    """The rule :func:`elementwise` returns: a picklable callable (a compiled bound function
    that uses it can be saved)."""

    def __init__(self, slope: Any, curvature: Any, smoothness: Any, name: str):
        self.slope, self.curvature, self.smoothness = slope, curvature, smoothness
        self.__qualname__ = self.__name__ = name
        self.__module__ = ""

    def __call__(self, node: fx.Node, ctx: RuleContext) -> Transfer:
        smoothness = self.smoothness
        rec = smoothness(node, ctx) if callable(smoothness) else smoothness
        if rec is not None:
            return elementwise_transfer(
                ctx,
                rec.slope,
                rec.curvature,
                getattr(rec, "name", "σ"),
                getattr(rec, "slope_range", None),
                record=rec,
            )
        return elementwise_transfer(ctx, self.slope, self.curvature)

    def __repr__(self) -> str:
        return f"<rule {self.__name__}>"


def identity(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Identity maps (eval dropout, nn.Identity, contiguous): L_v = L_u, M_v = M_u."""
    shape = ctx.shape()
    return ctx.linear(Reshape(lambda x: x, shape, shape, "identity"), norm=1)


def broadcast_factor(ctx: RuleContext, n: fx.Node) -> sympy.Expr:
    """Norm of broadcasting input ``n`` to the node's output shape: √(numel out / numel in)."""
    out, inp = math.prod(ctx.shape()), math.prod(ctx.shape(n))
    return sympy.sqrt(sympy.Rational(out, inp)) if inp else sympy.Integer(1)


def scaled(ctx: RuleContext, node_in: fx.Node, c: float) -> Transfer:
    """v = c·u with broadcasting: L_v = |c|·√k·L_u (k copies of each entry)."""
    shape_in, shape_out = ctx.shape(node_in), ctx.shape()
    if shape_in == shape_out:
        return ctx.linear(Scalar(c, shape_in), node_in, norm=number(abs(c)))
    k = broadcast_factor(ctx, node_in)
    norm = number(abs(c)) * k
    op = FunctionOperator(
        lambda x: c * x.expand(x.shape[0], *shape_out),
        shape_in,
        shape_out,
        label=f"broadcast·{c:g}",
    )
    # |A| is the broadcast times |c|: the same norm (ctx.linear attaches norm_bound from `norm`)
    bound_abs = torch.tensor(float(norm) * (1 + 1e-15), dtype=torch.float64)
    op.abs_bound = lambda: bound_abs
    return ctx.linear(op, node_in, norm=norm)
