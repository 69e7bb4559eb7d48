"""Elementwise activations. Each rule states sup|σ'| and sup|σ''| (theory §8); the constants
come from :mod:`curvbound.runtime.smoothness`, which derives or verifies them."""

from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...compiler.context import RuleContext, Transfer
from ...compiler.errors import DiscontinuityError
from ...compiler.naming import node_label
from ...runtime import smoothness as S
from .base import elementwise_transfer, register

__all__: list[str] = []


def _apply(ctx: RuleContext, rec: S.Smoothness) -> Transfer:
    return elementwise_transfer(
        ctx, rec.slope, rec.curvature, rec.name, rec.slope_range, record=rec
    )


def _param(ctx: RuleContext, attr: str, position: int, default):
    m = ctx.module
    return getattr(m, attr) if m is not None else ctx.arg(position, attr, default)


@register(nn.Tanh, torch.tanh, "tanh")  # F.tanh traces as the method
def tanh(node: fx.Node, ctx: RuleContext) -> Transfer:
    """tanh: sup|σ'| = 1, sup|σ''| = 4/(3√3)."""
    return _apply(ctx, S.tanh())


@register(nn.Sigmoid, torch.sigmoid, "sigmoid")  # F.sigmoid traces as the method
def sigmoid(node: fx.Node, ctx: RuleContext) -> Transfer:
    """sigmoid: sup|σ'| = 1/4, sup|σ''| = 1/(6√3)."""
    return _apply(ctx, S.sigmoid())


@register(nn.Softplus, F.softplus)
def softplus(node: fx.Node, ctx: RuleContext) -> Transfer:
    """softplus_β: sup|σ'| = 1, sup|σ''| = β/4, for the smooth softplus.

    torch returns x itself once βx > threshold; the rule records that switch as the node's
    ``error`` (log(1 + e^{−threshold})/β per unit, see
    :func:`curvbound.runtime.smoothness.softplus`), which the compiler carries to the output
    (``Bounds.error``). A threshold whose slope jump 1/(1 + e^t) exceeds
    :data:`curvbound.runtime.smoothness.MAX_SLOPE_JUMP` (t < ln 99 ≈ 4.6), or one beyond the
    dtype's exp overflow, raises :class:`~curvbound.compiler.errors.DiscontinuityError`.
    """
    beta = float(_param(ctx, "beta", 1, 1.0))
    threshold = float(_param(ctx, "threshold", 2, 20.0))
    rec = S.softplus(beta, threshold)
    where = _where(node, ctx)
    if rec.slope_jump > S.MAX_SLOPE_JUMP:
        raise DiscontinuityError(
            f"{where} is torch's softplus with beta={beta:g}, threshold={threshold:g}: it returns "
            f"x itself once beta*x > {threshold:g}, where it jumps by {rec.jump_float:.3g} and its "
            f"slope by {float(rec.slope_jump):.3g}, so it is not a smooth function with a small "
            "error and no meaningful Lipschitz or curvature bound exists. Raise the threshold "
            "(>= 5; the default 20 leaves a jump of 2.1e-9/beta, which curvbound carries as "
            "Bounds.error) or use curvbound.CenteredSoftplus, which never switches."
        )
    meta = node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", torch.float32)
    limit = math.log(torch.finfo(dtype).max) if dtype.is_floating_point else math.inf
    if threshold > limit:
        raise DiscontinuityError(
            f"{where} is torch's softplus with beta={beta:g}, threshold={threshold:g}: in "
            f"{dtype} exp(beta*x) overflows for beta*x > {limit:.4g}, so it returns inf for beta*x "
            f"between {limit:.4g} and the threshold. Use a threshold <= {math.floor(limit)} "
            "(the default 20 is fine) or curvbound.CenteredSoftplus."
        )
    return _apply(ctx, rec)


def _where(node: fx.Node, ctx: RuleContext) -> str:
    return f"node '{node.name}' ({node_label(node, ctx.root)})"


@register(nn.SiLU, F.silu)
def silu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """SiLU x·s(x): sup|σ'| ≈ 1.0998, sup|σ''| = 1/2 (at 0); verified enclosures."""
    return _apply(ctx, S.silu())


@register(nn.GELU, F.gelu)
def gelu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """GELU x·Φ(x) (or tanh approximation): sup|σ'| ≈ 1.129, sup|σ''| = √(2/π)·... verified."""
    approx = _param(ctx, "approximate", 1, "none")
    return _apply(ctx, S.gelu(approximate=approx))


@register(nn.ELU, F.elu)
def elu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """ELU_α: α = 1: sup|σ'| = 1, sup|σ''| = 1; α ≠ 1: σ' jumps at 0, curvature ∞."""
    return _apply(ctx, S.elu(float(_param(ctx, "alpha", 1, 1.0))))


@register(nn.CELU, F.celu)
def celu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """CELU_α: sup|σ'| = 1, sup|σ''| = 1/α (C¹ for every α > 0)."""
    return _apply(ctx, S.celu(float(_param(ctx, "alpha", 1, 1.0))))


@register(nn.Mish, F.mish)
def mish(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Mish x·tanh(softplus(x)): verified enclosures of sup|σ'| and sup|σ''|."""
    return _apply(ctx, S.mish())


@register(nn.LogSigmoid, F.logsigmoid)
def logsigmoid(node: fx.Node, ctx: RuleContext) -> Transfer:
    """log s(x): sup|σ'| = 1, sup|σ''| = 1/4."""
    return _apply(ctx, S.logsigmoid())


# -- Lipschitz only: σ' is discontinuous, curvature ∞ --------------------------------------------
@register(nn.ReLU, F.relu, torch.relu, "relu")
def relu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """ReLU: sup|σ'| = 1, curvature ∞ (not C¹)."""
    return _apply(ctx, S.relu())


@register(nn.LeakyReLU, F.leaky_relu)
def leaky_relu(node: fx.Node, ctx: RuleContext) -> Transfer:
    """LeakyReLU_a: sup|σ'| = max(1, |a|), curvature ∞."""
    return _apply(ctx, S.leaky_relu(float(_param(ctx, "negative_slope", 1, 0.01))))


@register(nn.Hardtanh, F.hardtanh)
def hardtanh(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Hardtanh (and ReLU6): sup|σ'| = 1, curvature ∞."""
    lo = float(_param(ctx, "min_val", 1, -1.0))
    hi = float(_param(ctx, "max_val", 2, 1.0))
    return _apply(ctx, S.hardtanh(lo, hi))


@register(F.relu6)
def relu6(node: fx.Node, ctx: RuleContext) -> Transfer:
    """ReLU6: sup|σ'| = 1, curvature ∞."""
    return _apply(ctx, S.hardtanh(0.0, 6.0))


def _overlap(kernel, stride, dilation, dims: int) -> int:
    """Most pooling windows that contain one input entry: Π_d min(k_d, ⌈((k_d−1)d_d+1)/s_d⌉)."""
    k, s, d = (_tuple(v, dims) for v in (kernel, stride or kernel, dilation))
    return math.prod(min(ki, math.ceil(((ki - 1) * di + 1) / si)) for ki, si, di in zip(k, s, d))


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


@register(nn.MaxPool1d, nn.MaxPool2d, F.max_pool1d, F.max_pool2d)
def max_pool(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Max pooling: L ≤ √(max windows per entry) (1 without overlap), curvature ∞."""
    m, u = ctx.module, ctx.input()
    dims = len(ctx.shape(u)) - 1
    if m is not None:
        if getattr(m, "return_indices", False):
            raise ValueError("max pooling with return_indices=True is not supported")
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    else:
        kernel = ctx.arg(1, "kernel_size")
        stride = ctx.arg(2, "stride", None)
        dilation = ctx.arg(4, "dilation", 1)
    k = _overlap(kernel, stride, dilation, dims)
    lip = sympy.sqrt(sympy.Integer(k))
    return Transfer(
        lip * ctx.L(u), sympy.oo, nonsmooth=True, note=f"max pool: each entry in ≤ {k} windows",
        gains={u: lip},
    )
