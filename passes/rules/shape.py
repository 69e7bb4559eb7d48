"""Shape-only and selection rules: reshapes/permutations are isometries (L_v = L_u, M_v = M_u);
slices select coordinates (‖A‖ = 1); concatenation stacks (L = √ΣLᵢ², M = √ΣMᵢ²)."""

from __future__ import annotations

import operator

import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...compiler.assemble import Decline
from ...compiler.context import RuleContext, Transfer
from ...runtime.operators import Reshape, Select
from .base import identity, register

__all__: list[str] = []


def _keeps_batch(ctx: RuleContext) -> None:
    u = ctx.input()
    a, b = u.meta.get("tensor_meta"), ctx.node.meta.get("tensor_meta")
    if a is not None and b is not None and a.shape[0] != b.shape[0]:
        raise Decline(
            f"it changes the batch dimension ({a.shape[0]} -> {b.shape[0]}); curvbound bounds "
            "per-sample maps, so the batch dimension must stay first and whole"
        )


def _reshape(node: fx.Node, ctx: RuleContext, fn, label: str) -> Transfer:
    _keeps_batch(ctx)
    u = ctx.input()
    return ctx.linear(Reshape(fn, ctx.shape(u), ctx.shape(), label), u, norm=1)


def _dim_ok(ctx: RuleContext, *dims: int) -> None:
    ndim = len(ctx.shape(ctx.input())) + 1
    if any(d is not None and d % ndim == 0 for d in dims):
        raise Decline("it moves or merges the batch dimension (dim 0)")


@register(nn.Flatten, torch.flatten, "flatten")
def flatten(node: fx.Node, ctx: RuleContext) -> Transfer:
    """flatten (from dim ≥ 1): an isometry, L_v = L_u, M_v = M_u."""
    shape = ctx.shape()
    if ctx.module is not None:
        start = ctx.module.start_dim
    else:
        start = ctx.arg(1, "start_dim", 0)
    _dim_ok(ctx, start)
    return _reshape(node, ctx, lambda x: x.reshape(x.shape[0], *shape), "flatten")


@register("view", "reshape", torch.reshape)
def reshape(node: fx.Node, ctx: RuleContext) -> Transfer:
    """view/reshape keeping the batch dimension: an isometry."""
    shape = ctx.shape()
    return _reshape(node, ctx, lambda x: x.reshape(x.shape[0], *shape), "reshape")


@register("permute", torch.permute)
def permute(node: fx.Node, ctx: RuleContext) -> Transfer:
    """permute keeping dim 0 first: an isometry."""
    dims = ctx.arg(1, "dims")
    if isinstance(dims, int):
        dims = tuple(a for a in node.args[1:])
    ndim = len(ctx.shape(ctx.input())) + 1
    if dims[0] % ndim != 0:
        raise Decline("it moves the batch dimension")
    dims = tuple(dims)
    return _reshape(node, ctx, lambda x: x.permute(*dims), f"permute{dims}")


@register("transpose", torch.transpose)
def transpose(node: fx.Node, ctx: RuleContext) -> Transfer:
    """transpose of two non-batch dims: an isometry."""
    d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
    _dim_ok(ctx, d0, d1)
    return _reshape(node, ctx, lambda x: x.transpose(d0, d1), f"transpose({d0},{d1})")


@register("unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze)
def squeeze(node: fx.Node, ctx: RuleContext) -> Transfer:
    """(un)squeeze of non-batch dims: an isometry."""
    shape = ctx.shape()
    return _reshape(node, ctx, lambda x: x.reshape(x.shape[0], *shape), str(node.target))


@register("contiguous", "clone", torch.clone, nn.Identity)
def identity_ops(node: fx.Node, ctx: RuleContext) -> Transfer:
    """contiguous/clone/Identity: the identity map."""
    return identity(node, ctx)


@register(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
def dropout(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Dropout in eval mode: the identity (train mode is rejected before tracing)."""
    if ctx.module.training and ctx.module.p > 0:
        raise Decline("dropout in train mode is random; call model.eval()")
    return identity(node, ctx)


@register(F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)
def dropout_fn(node: fx.Node, ctx: RuleContext) -> Transfer:
    """F.dropout(training=False): the identity."""
    if ctx.arg(2, "training", True) and ctx.arg(1, "p", 0.5) > 0:
        raise Decline("functional dropout with training=True is random")
    return identity(node, ctx)


def _basic_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items)


@register(operator.getitem)
def getitem(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Basic slicing/indexing x[:, ...]: selects coordinates, ‖A‖ = 1."""
    u, idx = ctx.arg(0), ctx.arg(1)
    if ctx.is_constant(u) or u is not ctx.input():
        raise Decline("only indexing of an input-dependent tensor by constants is supported")
    if not _basic_index(idx):
        raise Decline(
            "advanced (tensor/list) indexing may repeat entries; use slicing or register a rule"
        )
    first = (idx if isinstance(idx, tuple) else (idx,))[0]
    if not (first is Ellipsis or first == slice(None, None, None)):
        raise Decline("indexing the batch dimension mixes samples; index as x[:, ...]")
    # a coordinate selection (each entry read at most once): it folds into a neighbouring dense
    # layer exactly, so slicing between layers keeps the block rules' exact matrices
    op = Select.of(lambda x: x[idx], ctx.shape(u), label=f"[{idx}]")
    return ctx.linear(op, u, norm=1 if op.multiplicity else 0)


@register(torch.cat, torch.concat, torch.stack)
def cat(node: fx.Node, ctx: RuleContext) -> Transfer:
    """Concatenation/stacking along a non-batch dim: L = √ΣLᵢ², M = √ΣMᵢ² (constants add 0)."""
    parts = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    ndim = len(ctx.shape()) + 1
    if dim % ndim == 0:
        raise Decline("concatenation along the batch dimension (dim 0) mixes samples")
    ls = [ctx.L(p) for p in parts if not ctx.is_constant(p)]
    ms = [ctx.M(p) for p in parts if not ctx.is_constant(p)]
    # ‖[e₁; e₂]‖ ≤ ‖e₁‖ + ‖e₂‖: each part moves the result by at most its own move (a part
    # listed twice counts twice)
    gains: dict = {}
    for p in parts:
        if not ctx.is_constant(p):
            gains[p] = gains.get(p, 0) + sympy.Integer(1)
    parts_ = _slots(ctx, parts, dim)
    if len(ls) == 1:
        return Transfer(ls[0], ms[0], gains=gains, parts=parts_)
    return Transfer(
        sympy.sqrt(sum(x**2 for x in ls)), sympy.sqrt(sum(x**2 for x in ms)), gains=gains,
        parts=parts_,
    )


def _slots(ctx: RuleContext, parts, dim: int) -> tuple | None:
    """Each input-dependent part p_k with the coordinate map placing it in the result (zeros
    elsewhere): v = Σ_k P_k(p_k) + constants; a part listed twice has a slot each. None when a
    part has no tensor shape."""
    try:
        shapes = [ctx.shape(p) if isinstance(p, fx.Node) else tuple(p.shape[1:]) for p in parts]
    except (ValueError, AttributeError):
        return None
    stack = ctx.node.target is torch.stack
    out = []
    for k, p in enumerate(parts):
        if ctx.is_constant(p):
            continue

        def place(x, k=k):  # x: one part's batch; the other parts zero
            zs = [x if j == k else x.new_zeros(x.shape[0], *shapes[j]) for j in range(len(parts))]
            return torch.stack(zs, dim) if stack else torch.cat(zs, dim)

        out.append((p, Select.of(place, shapes[k], label=f"slot {k} of {ctx.node.name}")))
    return tuple(out)
