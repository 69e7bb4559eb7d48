"""LipLT along chain segments and the two-layer block rules (theory §3–§5).

:meth:`RuleContext.linear <curvbound.compiler.context.RuleContext.linear>` hands every affine node
v = G·a + b with a norm quantity to :func:`refine_affine`, the one code path of the affine
transfer, parameterised by the method:

- **chain segments**: when a = σ(u) for an elementwise σ and u is itself an affine node of a
  segment, v extends that segment (z_k = A_k σ_{k−1}(z_{k−1}) + b_k, A_k the merged linear
  chain of node k); otherwise v starts one at its source s. A residual merge or any other node
  ends a segment, which is where products of bounds take over again.
- **LipLT** (methods "compositional" and "paper"; theory §4): with σ_k = c_k·id + ψ_k, ψ_k
  d_k-Lipschitz (c_k, d_k the centre and half-width of σ_k's slope range), the recursion
  L(z_n) ≤ Σ_{j<n} (Π_{l=n−j}^{n−1}|c_l|)·d_{n−j−1}·‖A_n⋯A_{n−j}‖·L(z_{n−j−1})
  + (Π_{l<n}|c_l|)·‖A_n⋯A_0‖·L_s is homogeneous in L_s: L(z_n) ≤ μ_n·L_s with μ_n a numeric
  quantity (:class:`~curvbound.runtime.products.LipLTFactor`; written out symbolically the
  recursion would grow exponentially with depth). "compositional" keeps the product bound
  ‖A_n‖·L(σ(z_{n−1})) when it is smaller and restarts a segment after :data:`MAX_DEPTH` layers.
- **block rule** ("compositional", at every v = G σ(W z + b)): with u = Wz + b, a = σ(u),
  M_v ≤ sup|σ''|·min(‖G‖L_u², ‖G‖‖diag(r)W‖L_z², ‖Â‖L_uL_z)
        + min(sup|σ'|·‖G‖·M_u, (|c|‖GW‖ + d‖G‖‖W‖)·M_z).
  Proof: Dv(x) − Dv(y) = G[diag(σ'(u(x)) − σ'(u(y)))]Du(x) + G diag(σ'(u(y)))[Du(x) − Du(y)]; each
  argument of the first min bounds the first term (‖Δ‖_∞ ≤ sup|σ''|L_u‖x−y‖; rule (d);
  ‖G diag(Δ) W‖ ≤ ‖Â‖‖Δ‖₂ with ‖Δ‖₂ ≤ sup|σ''|·L_u‖x−y‖). The second term is at most
  sup|σ'|·‖G‖·M_u (the chain rule, with M_u from u's own block rule) and, with Du = W·Dz, at most
  sup over s ∈ [lo, hi]^m of ‖G diag(s) W‖·M_z ≤ (|c|‖GW‖ + d‖G‖‖W‖)·M_z (the loop
  transformation). Neither dominates: the first is smaller on the MLPs of the zoo, the second on
  the CNNs. Referring to both M_u and M_z at every node would make the written-out bound
  (``bf.expr``) grow exponentially with depth (Fibonacci), so both are offered at the output node
  and while their written-out size is at most :data:`BOTH_TERMS_OPS` operations, the chain rule
  alone beyond (:func:`expanded_ops`). The rule is positively homogeneous in the curvatures, so
  ``bf.table()`` shares still sum to 1, and it is never above the chain rule's ‖G‖·M(σ(u)) with
  M(σ(u)) from rule (d) (its arguments include the chain's).
  For a scalar margin (G → cᵀG) Singla & Feizi's sup|σ''|·‖diag(√|c̃|)W‖²·L_z² joins the min.
- "paper" uses the chain rule here and the paper's final block (:mod:`curvbound.passes.paper`).
- "naive" and "crt" only record how to fold a margin into the node
  (:mod:`curvbound.runtime.margins`).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import sympy
from torch import fx

from ..compiler.codegen import round_up
from ..compiler.context import Elementwise, RuleContext, Transfer
from ..compiler.exprs import LazyMin, smin
from ..compiler.naming import node_label
from ..runtime.margins import MarginFold, PairLipLT, PairScaledRows, PairVectorNorm
from ..runtime.norms import Norm
from ..runtime.operators import LinearOperator
from ..runtime.products import (
    HadamardNorm,
    LipLTFactor,
    ProductChain,
    ProductNorm,
    Segment,
    hadamard_feasible,
)
from .distribute import real_node

__all__ = [
    "ChainSegment",
    "LazyMin",
    "MAX_DEPTH",
    "refine_affine",
    "segment_of",
    "final_block",
    "slope_split",
    "smin",
]


#: "compositional" restarts a segment after this many layers (its products and LipLT factors
#: cost O(depth²) and O(depth³) per evaluation); "paper" never does (Algorithm 1 is exact).
MAX_DEPTH = 8
#: The block rule offers both second terms (chain rule and loop transformation) while their
#: written-out expressions have at most this many operations together (see :func:`_block`).
BOTH_TERMS_OPS = 400


class ChainSegment(Segment):
    """A :class:`~curvbound.runtime.products.Segment` with its graph nodes: ``start`` feeds A_0,
    ``nodes[k]`` is the affine node z_k, ``acts[k]`` = (|c_k|, d_k, sup|σ_k'|) of the activation
    on z_k, and ``symbols[(i, j)]`` names ‖A_i⋯A_j‖ in the bound expressions."""

    def __init__(self, start: fx.Node, ops, nodes, acts):
        super().__init__(ops)
        self.start = start
        self.nodes: list[fx.Node] = list(nodes)
        self.acts: list[tuple[sympy.Expr, sympy.Expr, sympy.Expr]] = list(acts)
        self.symbols: dict[tuple[int, int], sympy.Symbol] = {}


def slope_split(info: Elementwise) -> tuple[sympy.Expr, sympy.Expr]:
    """(c, d): σ = c·id + ψ with ψ d-Lipschitz, from the slope range [lo, hi] (theory §4)."""
    return (info.lo + info.hi) / 2, (info.hi - info.lo) / 2


def _act(info: Elementwise) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(|c|, d, sup|σ'|) of an activation, as the segment records it."""
    c, d = slope_split(info)
    return abs(c), d, info.slope


def segment_of(ctx: RuleContext, node: fx.Node) -> tuple[ChainSegment, int] | None:
    """The segment whose last-added affine node is ``node``, and its index there."""
    for q in ctx.transfer(node).quantities.values():
        if isinstance(q, ProductNorm) and q.i == q.j and isinstance(q.segment, ChainSegment):
            seg = q.segment
            if q.i < len(seg.nodes) and seg.nodes[q.i] is node:
                return seg, q.i
    return None


def _feeding(ctx: RuleContext, src: fx.Node) -> tuple[ChainSegment, int, Elementwise] | None:
    """(segment, index of u, σ's record) when ``src`` = σ(u) with u affine on a segment."""
    if ctx.is_constant(src):
        return None
    info = ctx.transfer(src).elementwise
    if info is None:
        return None
    found = segment_of(ctx, info.input)
    return None if found is None else (*found, info)


def _extend(feeding, op: LinearOperator, node: fx.Node, src: fx.Node) -> tuple[ChainSegment, int]:
    if feeding is None:
        return ChainSegment(src, [op], [node], []), 0
    seg, i, info = feeding
    act = _act(info)
    if len(seg.nodes) == i + 1:  # v continues the segment
        seg.ops.append(op)
        seg.nodes.append(node)
        seg.acts.append(act)
        return seg, i + 1
    # another consumer already continued it: fork, sharing the products of the common prefix
    fork = ChainSegment(seg.start, seg.ops[: i + 1] + [op], seg.nodes[: i + 1] + [node],
                        seg.acts[:i] + [act])
    for key, q in seg.norms.items():
        if key[0] <= i:
            fork.add(q, own=False)
            fork.symbols[key] = seg.symbols[key]
    return fork, i + 1


def _adopt(seg: ChainSegment, n: int, sym: sympy.Symbol, q: Norm) -> ProductNorm:
    """The node's own norm ‖A_n‖ as a segment member (same symbol, state and certified cache)."""
    m = ProductNorm(seg, n, n, q.op, q.mode, label=q.label, dtype=q.u.dtype)
    m.u.copy_(q.u)
    m._cache, m.note = q._cache, q.note
    seg.add(m)
    seg.symbols[(n, n)] = sym
    return m


def _product(ctx: RuleContext, seg: ChainSegment, i: int, j: int, quantities: dict) -> sympy.Symbol:
    """Symbol of ‖A_i⋯A_j‖ (``lt_<z_j>_<z_i>``), creating the quantity when it is new."""
    if (i, j) in seg.symbols:
        return seg.symbols[(i, j)]
    op = ProductChain(seg.ops[j : i + 1])
    kind = f"lt_{seg.nodes[j].name}"
    sym = ctx.symbol(kind)
    seed = zlib.crc32(f"{ctx.node.name}/{kind}".encode())
    meta = ctx.node.meta.get("tensor_meta")
    dtype = meta.dtype if meta is not None else None
    q = ProductNorm(seg, i, j, op, ctx.norms, seed=seed, label=op.describe(), dtype=dtype)
    seg.add(q)
    if ctx.norms == "certified":
        try:
            q()
        except NotImplementedError as exc:
            seg.own.remove(q)
            q = ProductNorm(seg, i, j, op, "estimate", seed=seed, label=op.describe(), dtype=dtype)
            q.note = f"{sym} is a power-iteration ESTIMATE, not a bound: {exc}"
            warnings.warn(f"{node_label(ctx.node)}: {q.note}", stacklevel=3)
            seg.add(q)
    seg.symbols[(i, j)] = sym
    quantities[sym] = q
    return sym


def _rnorm(t: Transfer) -> sympy.Symbol | None:
    return next((s for s in t.quantities if s.name.startswith("rnorm_")), None)


def _recursion_keys(seg: ChainSegment, i: int) -> list[tuple[int, int]]:
    """The products ‖A_i⋯A_j‖ that μ_i reads (zero coefficients skip theirs)."""
    keys, coef = [], sympy.Integer(1)
    for jj in range(i):
        k = i - 1 - jj  # the term ψ_k(z_k), mapped through A_i⋯A_{k+1}
        c_k, d_k, _ = seg.acts[k]
        if d_k != 0:
            keys.append((i, k + 1))
        coef = coef * c_k
        if coef == 0:
            return keys
    return keys + [(i, 0)]


def _liplt(ctx: RuleContext, seg: ChainSegment, n: int, quantities: dict) -> sympy.Expr:
    """LipLT bound μ_n·L_s on the Lipschitz constant of segment node n (module docstring): the
    products of node n become quantities of the node, μ_n a numeric quantity reading them."""
    for key in _recursion_keys(seg, n):
        _product(ctx, seg, *key, quantities)
    keys = [(0, 0)] + [key for i in range(1, n + 1) for key in _recursion_keys(seg, i)]
    keep = ctx.method != "paper"  # compositional: min with the product bound at every step
    if keep:
        keys += [(i, i) for i in range(1, n + 1)]
    acts = [tuple(round_up(v) for v in a) for a in seg.acts[:n]]
    products = {key: seg.norms[key] for key in keys}
    mu = LipLTFactor(n, acts, products, keep_product=keep, label=f"LipLT μ_{n}")
    sym = ctx.symbol("liplt")
    quantities[sym] = mu
    return sym * ctx.L(seg.start)


def refine_affine(ctx: RuleContext, t: Transfer) -> Transfer:
    """The affine transfer of ``ctx.node`` (its norm quantity already made) refined by method."""
    (sym, q), = t.quantities.items()
    op, src = t.operator, t.source
    fold: dict = {sym: PairVectorNorm(op)}
    if ctx.method in ("naive", "crt") or not isinstance(q, Norm) or src is None:
        return dataclasses.replace(t, margin=MarginFold(op, fold))
    feeding = _feeding(ctx, src)
    if feeding is not None and ctx.method == "compositional" and feeding[1] + 1 >= MAX_DEPTH:
        feeding = None  # a new segment starts at src: bounded cost on deep chains
    seg, n = _extend(feeding, op, ctx.node, src)
    quantities: dict = {sym: _adopt(seg, n, sym, q)}
    if feeding is None:
        return dataclasses.replace(t, quantities=quantities, margin=MarginFold(op, fold))
    liplt = _liplt(ctx, seg, n, quantities)
    lipschitz = liplt  # "compositional": μ_n already includes the product bound
    curvature, extra = t.curvature, {}
    info = feeding[2]
    if ctx.method == "compositional" and info.curvature != sympy.oo:
        curvature, extra = _block(ctx, seg, n, src, info, quantities, fold)
    _fold_products(seg, n, quantities, fold)
    mu = ctx.symbol("liplt")
    note = (t.note + "; " if t.note else "") + (
        f"LipLT over {n + 1} layers: L ≤ {mu}·L_{seg.start.name} (products of consecutive layers)"
    )
    return dataclasses.replace(
        t,
        lipschitz=lipschitz,
        curvature=curvature,
        quantities=quantities,
        note=note,
        margin=MarginFold(
            op, fold,
            {m: v for m, v in extra.items() if not isinstance(m, tuple)},
            lower={m[1]: v for m, v in extra.items() if isinstance(m, tuple) and m[0] == "lower"},
            upper={m[1]: v for m, v in extra.items() if isinstance(m, tuple) and m[0] == "upper"},
        ),
    )


def _fold_products(seg: ChainSegment, n: int, quantities: dict, fold: dict) -> None:
    """Margin folding of node n's G-dependent quantities: its products ‖A_n⋯A_j‖ and μ_n."""
    for key, s in seg.symbols.items():
        if key[0] == n and s in quantities and s not in fold:
            fold[s] = PairVectorNorm(seg.norms[key].op)
    for s, q in quantities.items():
        if isinstance(q, LipLTFactor):
            keys = _recursion_keys(seg, n) + ([(n, n)] if q.keep_product else [])
            ops = {key: seg.norms[key].op for key in keys}
            fold[s] = PairLipLT(q, ops)


def _block(ctx, seg, n, act, info, quantities, fold, paper: bool = False):
    """Curvature of v = G σ(W z + b) by the block rule (module docstring; ``paper``: the paper's
    final block sup|σ''|·‖W‖·‖Â‖·L_z² + (|c|‖GW‖ + d‖G‖‖W‖)·M_z, theory §3)."""
    G, W = seg.ops[n], seg.ops[n - 1]
    u = seg.nodes[n - 1]
    z = ctx.transfer(u).source
    p_g, p_w = seg.symbols[(n, n)], seg.symbols[(n - 1, n - 1)]
    p_gw = _product(ctx, seg, n, n - 1, quantities)
    c, d = slope_split(info)
    curv = info.curvature
    loop = abs(c) * p_gw + d * p_g * p_w  # sup over σ' ∈ [lo, hi] of ‖G diag(σ') W‖
    h = None
    final = paper or any(user.op == "output" for user in real_node(ctx.node).users)
    if hadamard_feasible(G, W, final=final, products=ctx.method != "paper"):
        h = ctx.symbol("hnorm")
        quantities[h] = whole = HadamardNorm(G, W, ctx.norms)
        if ctx.anchor is not None:  # anchored compile: per-sample ‖Â·diag(ρ)‖ (runtime/anchored)
            quantities[h] = ctx.anchor.hadamard(ctx, u, quantities[h], G, W)
        fold[h] = PairScaledRows(G, W, 1, whole=whole, w_norm=seg.norms[(n - 1, n - 1)])
    if paper:
        if h is None:
            return None, {}
        return curv * p_w * h * ctx.L(z) ** 2 + loop * ctx.M(z), {}
    first = [p_g * ctx.L(u) ** 2]
    rn = _rnorm(ctx.transfer(act))
    if rn is not None:
        first.append(p_g * rn * ctx.L(z) ** 2)
    extra = {}
    if h is not None:
        first.append(h * ctx.L(u) * ctx.L(z))
        own = smin(*first)
        if isinstance(own, sympy.Min):
            sf = ctx.symbol("sfnorm")
            fold[sf] = PairScaledRows(G, W, 0.5)
            extra[own] = (sf * ctx.L(z) ** 2,)
            sides = _one_sided_weights(info)
            if sides is not None:
                for key, (wp, wn) in zip(("lower", "upper"), sides):
                    s = ctx.symbol(f"sf{key}")
                    fold[s] = PairScaledRows(G, W, 0.5, signs=(wp, wn))
                    extra[(key, own)] = (s * ctx.L(z) ** 2,)
    else:
        own = smin(*first)
    # The second term: the chain rule's sup|σ'|·‖G‖·M_u (M_u from u's own block rule: tighter
    # for MLPs) or the loop transformation's (|c|‖GW‖ + d‖G‖‖W‖)·M_z (tighter for CNNs here).
    # Offering both at every node would make the written-out bound (bf.expr) grow exponentially
    # with depth (Fibonacci: M_v refers to M_u and M_z, M_u to M_z and the M before it), so both
    # are offered at the output node and while the two are small; beyond, the chain rule alone.
    chain, looped = info.slope * p_g * ctx.M(u), loop * ctx.M(z)
    if final or expanded_ops(ctx, u) + expanded_ops(ctx, z) <= BOTH_TERMS_OPS:
        return curv * own + smin(chain, looped), extra
    return curv * own + chain, extra


def _one_sided_weights(info: Elementwise) -> tuple[tuple[float, float], ...] | None:
    """Weights (w₊, w₋) of the one-sided final-block terms (runtime/margins.py, :class:`Margins`)
    for an activation with proven a ≤ σ'' ≤ b (``info.second``), relative to h = max(−a, b):
    lower: c̃ⱼσ''ⱼ ≥ −h·(c̃ⱼ⁺·(−a/h) + c̃ⱼ⁻·(b/h)); upper: c̃ⱼσ''ⱼ ≤ h·(c̃ⱼ⁺·(b/h) + c̃ⱼ⁻·(−a/h)).
    None without a range, or for a symmetric one (the two-sided bound is as good)."""
    if info.second is None:
        return None
    a, b = (sympy.sympify(v) for v in info.second)
    if not (a.is_number and b.is_number) or a > 0 or b < 0 or a == -b:
        return None
    h = sympy.Max(-a, b)
    if info.curvature.is_number and h > info.curvature:
        return None  # the expression's sup|σ''| must be at least h
    wa, wb = (round_up(v) for v in (-a / h, b / h))
    return (wa, wb), (wb, wa)


_SIZE_KEY = "curvbound.expanded_ops"


def expanded_ops(ctx: RuleContext, n: fx.Node, kind: str = "M") -> int:
    """Operations of node n's curvature (``kind="M"``) or Lipschitz (``"L"``) bound written out
    in quantity symbols, as ``bf.expr`` would show it (tree size), without writing it out:
    each node's own count plus, per occurrence of another node's symbol, that node's size.
    Memoised in ``n.meta`` (transfers are final once computed)."""
    if ctx.is_constant(n):
        return 0
    t = ctx.transfer(n)
    memo = n.meta.setdefault(_SIZE_KEY, {})
    key = (kind, id(t))
    if key not in memo:
        expr = t.curvature if kind == "M" else t.lipschitz
        nodes = _nodes_by_name(n.graph)
        size = sympy.count_ops(expr)
        for atom in sympy.preorder_traversal(expr):
            name = getattr(atom, "name", "")
            if atom.is_Symbol and name[:2] in ("L_", "M_") and name[2:] in nodes:
                size += expanded_ops(ctx, nodes[name[2:]], name[0])
        memo[key] = size
    return memo[key]


def _nodes_by_name(graph: fx.Graph) -> dict[str, fx.Node]:
    """``{name: node}`` of ``graph``, built once per graph (rebuilding it for every node made
    :func:`expanded_ops` quadratic in depth)."""
    cached = getattr(graph, "_curvbound_nodes", None)
    if cached is None or len(cached) != len(graph.nodes):
        cached = {m.name: m for m in graph.nodes}
        graph._curvbound_nodes = cached
    return cached


def final_block(ctx: RuleContext, t: Transfer) -> Transfer | None:
    """The paper's final block for the output node v = G σ(W z + b) (None: Â is too large)."""
    found = segment_of(ctx, ctx.node)
    if found is None or found[1] == 0:
        return None
    seg, n = found
    src = t.source
    info = ctx.transfer(src).elementwise
    quantities = dict(t.quantities)
    fold = dict(t.margin.fold) if t.margin is not None else {}
    curvature, _ = _block(ctx, seg, n, src, info, quantities, fold, paper=True)
    if curvature is None:
        return None
    note = t.note + "; paper final block (c) with the loop-transformed Lipschitz constant"
    return dataclasses.replace(
        t, curvature=curvature, quantities=quantities, note=note,
        margin=MarginFold(t.operator, fold),
    )
