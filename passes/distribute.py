"""Linear maps distributed over merges (theory §3, the general block h = Hz + Gσ(Wz + b)).

A sum, difference or concatenation v = Σ_k P_k(b_k) + const (``Transfer.parts``) followed by an
affine node w = A·v + c is the sum of the affine maps of its parts:

    w = Σ_k (A∘P_k)(b_k) + const,   so   L_w ≤ Σ_k L((A∘P_k)(b_k)),  M_w ≤ Σ_k M((A∘P_k)(b_k))

(Lipschitz constants and Jacobian Lipschitz constants are subadditive). Each term is an affine
node of its own: :meth:`RuleContext.linear` merges A∘P_k with the part's own affine producer
(a residual branch G σ(W z): A·G), extends the part's LipLT segment and applies the block rules
to it, so the skip connection z ↦ A z and the branch z ↦ A G σ(W z) each get the two-layer
block bound with their own matrices, instead of ‖A‖ times the merge's bound, where the products
‖A‖·‖G‖ and the sum of the parts' curvatures are paid separately. A concatenation followed by
a linear layer is likewise the sum of the linear layer's column blocks applied to each part.

This is a refiner (``curvbound.pipeline.REFINERS``), method "compositional" only: the node's
bound becomes min(its own transfer, the distributed sum), both valid. The terms are computed
on *virtual* nodes, fx nodes outside the graph named ``<node>_p<k>`` that carry the node's shape,
so that their quantities have their own names (``norm_fc_p0``, ``hnorm_fc_p1``, ...) and no
graph node sees them as inputs. Nested merges (a residual stream of several blocks) distribute
up to :data:`MAX_NESTING` level deep.
"""

from __future__ import annotations

import dataclasses
import math

from torch import fx

from ..compiler.context import RuleContext, Transfer
from ..compiler.exprs import smin
from ..runtime.margins import MarginFold
from ..runtime.operators import Chain, Scalar
from .residual import general_block

__all__ = ["distribute", "MAX_NESTING", "VIRTUAL_KEY"]

#: How many merges deep a linear map is distributed: A·(h + r(h)) becomes A·h + A·r(h), but h's
#: own parts are not split again (a ResNet stream of n blocks would give every block's first
#: layer a term for each earlier block, O(n²) norms, for a few per cent on the deep zoo ResNet).
MAX_NESTING = 1
#: ``node.meta`` key of a virtual node: the graph node it stands for
VIRTUAL_KEY = "curvbound.virtual_of"
_NESTING = "curvbound.distribute_nesting"


#: A linear map after a sum inside the network (not the output layer) is distributed only when
#: the sum has at most this many entries per sample; concatenations always are. In a wide
#: residual stream each block's first layer would get terms through the previous block's branch,
#: products of convolutions: on the 8-block zoo ResNet (8×32×32) 4 % tighter for twice the
#: compile time, the sums' own general blocks doing most of the work.
SUM_LIMIT = 4096


def _is_output(node: fx.Node) -> bool:
    return any(user.op == "output" for user in real_node(node).users)


def real_node(node: fx.Node) -> fx.Node:
    """The graph node a (possibly virtual) node stands for."""
    return node.meta.get(VIRTUAL_KEY, node)


def _virtual(node: fx.Node, k: int, nesting: int) -> fx.Node:
    v = fx.Node(node.graph, f"{node.name}_p{k}", "call_function", _term, (), {})
    v.meta.update({key: val for key, val in node.meta.items() if key == "tensor_meta"})
    v.meta[VIRTUAL_KEY] = real_node(node)
    v.meta[_NESTING] = nesting
    return v


def _term(*args):  # the target of virtual nodes (never called: they are not in the graph)
    raise RuntimeError("a virtual node of curvbound's distribute pass was executed")


def distribute(ctx: RuleContext, t: Transfer) -> Transfer:
    """Refine the affine transfer ``t`` of ``ctx.node`` (w = A·v + c) when v is a linear merge:
    L and M become min(own, Σ_k term_k) (module docstring)."""
    if ctx.method != "compositional" or t.operator is None or t.source is None:
        return t
    if ctx.is_constant(t.source):
        return t
    parts = ctx.transfer(t.source).parts
    nesting = ctx.node.meta.get(_NESTING, 0)
    if not parts or nesting >= MAX_NESTING or not math.prod(ctx.shape()):
        return t
    inside = not _is_output(ctx.node) and all(isinstance(P, Scalar) for _, P in parts)
    if inside and math.prod(ctx.shape(t.source)) > SUM_LIMIT:
        return t  # a wide sum inside the network: its own general block (passes/residual.py)
    parts = [(b, P) for b, P in parts if math.prod(P.in_shape)]  # an empty part adds nothing
    lips, curvs = [], []
    quantities = dict(t.quantities)
    margin = t.margin
    fold = dict(margin.fold) if margin is not None else {}
    extra = dict(margin.extra) if margin is not None else {}
    lower = dict(margin.lower) if margin is not None else {}
    upper = dict(margin.upper) if margin is not None else {}
    for k, (b, P) in enumerate(parts):
        node = _virtual(ctx.node, k, nesting + 1)
        sub = RuleContext(node, ctx.root, method=ctx.method, norms=ctx.norms,
                          transfers=ctx._transfers, constants=ctx._constants, anchor=ctx.anchor,
                          refiners=ctx.refiners)
        term = sub.linear(Chain.of([P, t.operator]), b)
        lips.append(term.lipschitz)
        curvs.append(term.curvature)
        quantities.update(term.quantities)
        if term.margin is not None:
            fold.update(term.margin.fold)
            extra.update(term.margin.extra)
            lower.update(term.margin.lower)
            upper.update(term.margin.upper)
    candidates = [sum(lips)], [sum(curvs)]
    # a skip connection and its branch, A·(αz + βGσ(Wz + b)): the general block with H = αA
    if all(isinstance(P, Scalar) for _, P in parts) and nesting == 0:
        block = general_block(ctx, {b: P.c for b, P in parts}, outer=t.operator, kind="resout")
        if block is not None:
            candidates[0].append(block.lipschitz)
            candidates[1].append(block.curvature)
            quantities.update(block.quantities)
            fold.update(block.fold)
    note = (t.note + "; " if t.note else "") + (
        f"distributed over the {len(parts)} parts of {t.source.name}: min(own, Σ parts"
        + (", general block)" if len(candidates[0]) > 1 else ")")
    )
    new_margin = None
    if margin is not None:
        new_margin = MarginFold(margin.op, fold, extra, margin.note, lower, upper)
    return dataclasses.replace(
        t,
        lipschitz=smin(t.lipschitz, *candidates[0]),
        curvature=smin(t.curvature, *candidates[1]),
        quantities=quantities,
        note=note,
        margin=new_margin,
    )
