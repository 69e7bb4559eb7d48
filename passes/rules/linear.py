"""Affine and linear rules: L_v = ‖A‖·L_u, M_v = ‖A‖·M_u for v = A u + b (theory §2).

Adjacent affine nodes are merged into one chain by :meth:`RuleContext.linear` (method
"compositional"), which folds eval-mode batch norm into its convolution or dense neighbour.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...compiler.assemble import Decline
from ...compiler.codegen import round_up
from ...compiler.context import RuleContext, Transfer
from ...compiler.exprs import smin
from ...runtime import certified
from ...runtime.operators import Conv, Dense, Diagonal, FunctionOperator, Scalar, precise
from ..residual import general_block
from .base import broadcast_factor, number, register, scaled

__all__: list[str] = []


def _getter(ctx: RuleContext, n: object):
    """A live getter for a constant argument (a parameter read through get_attr)."""
    if isinstance(n, fx.Node) and n.op == "get_attr":
        root, path = ctx.root, n.target
        return lambda: root.get_parameter(path) if _is_param(root, path) else _attr(root, path)
    if isinstance(n, torch.Tensor):
        return lambda: n
    if isinstance(n, fx.Node) and ctx.is_constant(n):
        # computed from parameters in forward (weight norm g·v/‖v‖, W.t()): recomputed live
        try:
            get = ctx.live(n)
            value = get()
        except ValueError as exc:
            raise Decline(str(exc)) from exc
        if isinstance(value, torch.Tensor):
            return get
        raise Decline(f"argument '{n.name}' is a {type(value).__name__}, not a tensor")
    raise Decline(
        f"argument {n!r} depends on the network input; it must be a parameter, a constant "
        "tensor or a value computed from parameters only"
    )


def _is_param(root: nn.Module, path: str) -> bool:
    try:
        root.get_parameter(path)
        return True
    except AttributeError:
        return False


def _attr(root: nn.Module, path: str):
    obj = root
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


# -- dense and convolution ---------------------------------------------------------------------
@register(nn.Linear)
def linear(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Linear: ‖W‖ (spectral norm of the weight)."""
    m, u = ctx.module, ctx.input()
    return ctx.linear(Dense(lambda: m.weight, ctx.shape(u), ctx.shape(), node.target))


@register(F.linear)
def linear_fn(node: fx.Node, ctx: RuleContext) -> Transfer:
    """F.linear(x, W, b): ‖W‖; W must not depend on the input."""
    u = ctx.input()
    if ctx.arg(0, "input") is not u:
        raise Decline("the weight depends on the input")
    w = _getter(ctx, ctx.arg(1, "weight"))
    return ctx.linear(Dense(w, ctx.shape(u), ctx.shape(), str(node.name)))


def _conv(ctx: RuleContext, weight, stride, padding, dilation, groups, mode="zeros") -> Transfer:
    u = ctx.input()
    op = Conv(
        weight,
        ctx.shape(u),
        ctx.shape(),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        label=ctx.node.name,
    )
    return ctx.linear(op)


@register(nn.Conv1d, nn.Conv2d)
def conv(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Conv1d/Conv2d (any stride, padding, dilation, groups): ‖conv‖ as a linear operator."""
    m = ctx.module
    return _conv(
        ctx, lambda: m.weight, m.stride, m.padding, m.dilation, m.groups, m.padding_mode
    )


@register(F.conv1d, F.conv2d)
def conv_fn(node: fx.Node, ctx: RuleContext) -> Transfer:
    """F.conv1d/F.conv2d with a constant weight: ‖conv‖."""
    if ctx.arg(0, "input") is not ctx.input():
        raise Decline("the weight depends on the input")
    return _conv(
        ctx,
        _getter(ctx, ctx.arg(1, "weight")),
        ctx.arg(3, "stride", 1),
        ctx.arg(4, "padding", 0),
        ctx.arg(5, "dilation", 1),
        ctx.arg(6, "groups", 1),
    )


# -- batch norm ----------------------------------------------------------------------------------
@register(nn.BatchNorm1d, nn.BatchNorm2d)
def batch_norm(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Eval-mode BatchNorm: diagonal map, ‖A‖ = max_c |γ_c|/√(var_c + ε); folded into a
    neighbouring conv/linear when merged."""
    m = ctx.module
    if m.training or m.running_var is None:
        raise Decline("batch norm in train mode or without running statistics; call model.eval()")

    def scale() -> torch.Tensor:
        # precise(): recomputed in float64 for certified norms (a float32 rsqrt is ~6e-8 off)
        s = torch.rsqrt(precise(m.running_var) + m.eps)
        return s * precise(m.weight) if m.weight is not None else s

    return ctx.linear(Diagonal(scale, ctx.shape(), f"{node.target}"))


# -- pooling -------------------------------------------------------------------------------------
def _pool_transfer(ctx: RuleContext, fn, bound, label: str) -> Transfer:
    u = ctx.input()
    # a pooling matrix is nonnegative: ‖|A|‖ = ‖A‖ (rounding bound of merged chains)
    op = FunctionOperator(
        fn, ctx.shape(u), ctx.shape(), norm_bound=bound, abs_bound=bound, label=label
    )
    return ctx.linear(op)


@register(nn.AvgPool1d, nn.AvgPool2d)
def avg_pool(node: fx.Node, ctx: RuleContext) -> Transfer:
    """AvgPool: linear, ‖A‖ ≤ √(‖A‖₁‖A‖_∞) (Schur test) for the certified bound."""
    m, u = ctx.module, ctx.input()
    shape = ctx.shape(u)
    kw = dict(
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad,
    )
    two_d = isinstance(m, nn.AvgPool2d)
    if two_d:
        kw["divisor_override"] = m.divisor_override
    fn = (lambda x: F.avg_pool2d(x, **kw)) if two_d else (lambda x: F.avg_pool1d(x, **kw))
    return _pool_transfer(
        ctx,
        fn,
        lambda: certified.pooling_norm(input_shape=shape, **kw),
        f"AvgPool({m.kernel_size})",
    )


@register(F.avg_pool1d, F.avg_pool2d)
def avg_pool_fn(node: fx.Node, ctx: RuleContext) -> Transfer:
    """F.avg_pool1d/2d: as AvgPool."""
    u, fn = ctx.input(), node.target
    names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
    if fn is F.avg_pool2d:
        names.append("divisor_override")
    kw = {n: ctx.arg(i + 1, n) for i, n in enumerate(names)}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("stride", kw["kernel_size"])
    shape = ctx.shape(u)
    bound_kw = dict(kw)
    bound_kw.setdefault("padding", 0)
    return _pool_transfer(
        ctx,
        lambda x: fn(x, **kw),
        lambda: certified.pooling_norm(input_shape=shape, **bound_kw),
        f"avg_pool({kw['kernel_size']})",
    )


@register(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def adaptive_avg_pool(node: fx.Node, ctx: RuleContext) -> Transfer:
    """AdaptiveAvgPool: linear, Schur-test certified bound over torch's window formula."""
    u = ctx.input()
    shape = ctx.shape(u)
    m = ctx.module
    size = m.output_size if m is not None else ctx.arg(1, "output_size")
    fn = (
        F.adaptive_avg_pool2d
        if isinstance(m, nn.AdaptiveAvgPool2d) or node.target is F.adaptive_avg_pool2d
        else F.adaptive_avg_pool1d
    )
    return _pool_transfer(
        ctx,
        lambda x: fn(x, size),
        lambda: certified.adaptive_avg_pool_norm(shape, size),
        f"AdaptiveAvgPool({size})",
    )


# -- arithmetic with constants, sums, reductions ------------------------------------------------
def _coefficients(ctx: RuleContext, pairs) -> dict[fx.Node, float]:
    coef: dict[fx.Node, float] = {}
    for value, c in pairs:
        if isinstance(value, fx.Node) and not ctx.is_constant(value):
            coef[value] = coef.get(value, 0.0) + c
    return coef


def _sum_transfer(ctx: RuleContext, coef: dict[fx.Node, float]) -> Transfer:
    if len(coef) == 1:
        (u, c), = coef.items()
        return scaled(ctx, u, c)
    L = sympy.Integer(0)
    M = sympy.Integer(0)
    gains = {}
    for u, c in coef.items():
        k = number(abs(c)) * _bcast(ctx, u)
        L += k * ctx.L(u)
        M += k * ctx.M(u)
        gains[u] = k
    # v = Σ c_u·u: an affine consumer distributes over the terms (passes/distribute.py); terms
    # broadcast to a larger shape are left alone
    shape = ctx.shape()
    parts = None
    if all(ctx.shape(u) == shape for u in coef):
        parts = tuple((u, Scalar(c, shape)) for u, c in coef.items())
    # a skip connection around a branch G σ(W z + b): the general block (passes/residual.py)
    block = general_block(ctx, coef) if parts is not None else None
    if block is None:
        return Transfer(L, M, gains=gains, parts=parts)
    return Transfer(smin(L, block.lipschitz), smin(M, block.curvature), block.quantities,
                    gains=gains, parts=parts, note="general block h = αz + βGσ(Wz + b)")


def _bcast(ctx: RuleContext, u: fx.Node) -> sympy.Expr:
    return broadcast_factor(ctx, u)


@register(operator.add, torch.add, "add")  # x += y traces as operator.add
def add(node: fx.Node, ctx: RuleContext) -> Transfer:
    """u₁ + α·u₂ (residual merge): L = L₁ + |α|L₂, M = M₁ + |α|M₂; a constant term is a bias."""
    alpha = ctx.arg(None, "alpha", 1)
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    return _sum_transfer(ctx, _coefficients(ctx, [(a, 1.0), (b, float(alpha))]))


@register(operator.sub, torch.sub, "sub")
def sub(node: fx.Node, ctx: RuleContext) -> Transfer:
    """u₁ − α·u₂: L = L₁ + |α|L₂, M = M₁ + |α|M₂."""
    alpha = ctx.arg(None, "alpha", 1)
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    return _sum_transfer(ctx, _coefficients(ctx, [(a, 1.0), (b, -float(alpha))]))


@register(operator.neg, torch.neg, "neg")
def neg(node: fx.Node, ctx: RuleContext) -> Transfer:
    """−u: L_v = L_u, M_v = M_u."""
    return scaled(ctx, ctx.input(), -1.0)


def _constant_factor(ctx: RuleContext, c):
    """A Python number as a float; a tensor argument (a parameter, a buffer, a value computed
    from them) as a live getter, so that training it is seen without recompiling."""
    if not isinstance(c, fx.Node):
        return float(c) if not isinstance(c, torch.Tensor) else (lambda: c)
    try:
        get = ctx.live(c)
        value = get()
    except ValueError as exc:
        raise Decline(str(exc)) from exc
    if isinstance(value, torch.Tensor):
        return get
    return float(value)  # e.g. a number derived from the input's shape, fixed at compile


@register(operator.mul, torch.mul, "mul")
def mul(node: fx.Node, ctx: RuleContext) -> Transfer:
    """c·u for a constant c: |c|·L_u; a constant tensor scales elementwise: max|c|·L_u."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    ins = ctx.tensor_inputs()
    if len(ins) != 1 or (a is b):
        raise Decline(
            "product of two input-dependent tensors (a bilinear map) has no built-in rule; "
            "register one for this node's target"
        )
    u = ins[0]
    c = _constant_factor(ctx, b if a is u else a)
    if not callable(c):
        return scaled(ctx, u, c)
    return _tensor_scale(ctx, u, c)


def _tensor_scale(ctx: RuleContext, u: fx.Node, c) -> Transfer:
    shape_in, shape_out = ctx.shape(u), ctx.shape()
    if shape_in != shape_out:
        raise Decline(
            f"multiplying by a constant tensor broadcasts the input from {shape_in} to {shape_out}"
        )
    t = c()
    if t.dim() > len(shape_out) and t.shape[0] != 1:
        raise Decline("the constant tensor has a batch dimension larger than 1")

    def rows():
        return c().abs().expand(1, *shape_out)[0] if c().dim() > len(shape_out) else c().abs()

    def bound() -> torch.Tensor:
        return precise(c()).detach().double().abs().max()

    op = FunctionOperator(
        lambda x: x * precise(c()),
        shape_in,
        shape_out,
        norm_bound=bound,
        abs_bound=bound,
        rows=rows,
        params=lambda: [c()],
        label="elementwise scale",
    )
    return ctx.linear(op, u)


@register(operator.truediv, torch.div, "div")
def div(node: fx.Node, ctx: RuleContext) -> Transfer:
    """u / c for a constant c: L_v = L_u/|c|, M_v = M_u/|c|."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    if ctx.arg(None, "rounding_mode") is not None:
        raise Decline("division with rounding is not continuous")
    if not ctx.is_constant(b) or ctx.is_constant(a):
        raise Decline("division by an input-dependent tensor has no built-in rule")
    c = _constant_factor(ctx, b)
    if not callable(c):
        return scaled(ctx, ctx.input(), 1.0 / c)
    return _tensor_scale(ctx, ctx.input(), lambda: 1.0 / precise(c()))


def _reduce_dims(ctx: RuleContext, dim) -> tuple[int, ...]:
    ndim = len(ctx.shape(ctx.input())) + 1
    if dim is None:
        raise Decline("a reduction over all dimensions mixes the samples of the batch; pass dim")
    dims = tuple(d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
    if 0 in dims:
        raise Decline("a reduction over the batch dimension (dim 0) mixes samples")
    return dims


def _reduction(ctx: RuleContext, mean: bool) -> Transfer:
    u = ctx.input()
    dim = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    dims = _reduce_dims(ctx, dim)
    full = (1, *ctx.shape(u))
    n = math.prod(full[d] for d in dims)
    norm = sympy.sqrt(sympy.Integer(n))
    norm = 1 / norm if mean else norm
    fn = (lambda x: x.mean(dims, keepdim)) if mean else (lambda x: x.sum(dims, keepdim))
    value = torch.tensor(round_up(norm), dtype=torch.float64)  # ≥ the exact norm
    op = FunctionOperator(
        fn,
        ctx.shape(u),
        ctx.shape(),
        norm_bound=lambda: value,
        abs_bound=lambda: value,
        rows=lambda: value,
        label=f"{'mean' if mean else 'sum'}{dims}",
    )
    return ctx.linear(op, u, norm=norm)


@register(torch.mean, "mean")
def mean(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Mean over n entries (not the batch dimension): ‖A‖ = 1/√n."""
    return _reduction(ctx, mean=True)


@register(torch.sum, "sum")
def sum_(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Sum over n entries (not the batch dimension): ‖A‖ = √n."""
    return _reduction(ctx, mean=False)

