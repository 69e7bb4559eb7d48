"""The general block h(z) = H z + G σ(W z + b) (theory §3; the paper's block with H = I for a skip
connection), for residual merges h = α·z + β·r with r = G σ(W z + b) a branch on the same z.

With σ' ∈ [lo, hi], c = (lo + hi)/2, d = (hi − lo)/2 (theory §4), S(x) = diag(σ'(u(x))), u = Wz + b:

    Dh = (H + G S W)·Dz,   sup_S ‖H + G S W‖ ≤ ‖H + c·G W‖ + d·‖G‖‖W‖ =: λ

so L_h ≤ λ·L_z (the loop-transformed Lipschitz bound with H: ‖H + cGW‖ instead of
‖H‖ + |c|‖G W‖), and from

    Dh(x) − Dh(y) = (H + G S_x W)(Dz(x) − Dz(y)) + G (S_x − S_y) W Dz(y)

M_h ≤ λ·M_z + sup|σ''|·min(‖G‖L_u², ‖G‖‖diag(r)W‖L_z², ‖Â‖L_uL_z), the three block bounds of
the second term (``passes/lipschitz_lt.py``: |Δ_j| ≤ sup|σ''|·|u_j(x) − u_j(y)|, bounded by
L_u‖x − y‖, by r_j·L_z‖x − y‖, and in ℓ2 by L_u‖x − y‖). For a skip connection (H = αI, G → βG)
this replaces |α|·(L_z, M_z) + |β|·(L_r, M_r), whose M_z coefficient is |α| + |β|·(|c|‖GW‖ +
d‖G‖‖W‖) or more; a linear map A after the merge (``passes/distribute.py``) gives the block
H = αA, G → βA·G. Method "compositional"; the node keeps the minimum with its other bounds.
"""

from __future__ import annotations

import sympy
from torch import fx

from ..compiler.context import RuleContext
from ..compiler.exprs import smin
from ..runtime.margins import PairScaledRows, PairVectorNorm
from ..runtime.operators import Chain, LinearOperator, LinearSum, Scalar
from ..runtime.products import HadamardNorm, hadamard_feasible

__all__ = ["GeneralBlock", "general_block"]


class GeneralBlock:
    """Bounds of one general block: ``lipschitz``, ``curvature`` (sympy), their ``quantities``
    and the margin folding of the quantities that depend on the output map (``fold``)."""

    def __init__(self, lipschitz, curvature, quantities, fold):
        self.lipschitz, self.curvature = lipschitz, curvature
        self.quantities, self.fold = quantities, fold


def _branch(ctx: RuleContext, z: fx.Node, r: fx.Node):
    """(G, W, a, u) when r = G σ(u) (or r = σ(u): G = I), u = W z + b (affine nodes with these
    sources), else None."""
    if ctx.is_constant(r):
        return None
    tr = ctx.transfer(r)
    if tr.elementwise is not None:  # r = σ(W z + b) itself: G = I
        G, a = Scalar(1.0, ctx.shape(r)), r
    elif tr.operator is None or tr.source is None or ctx.is_constant(tr.source):
        return None
    else:
        G, a = tr.operator, tr.source
    info = ctx.transfer(a).elementwise
    if info is None:
        return None
    u = info.input
    tu = ctx.transfer(u)
    if tu.operator is None or tu.source is not z:
        return None
    return G, tu.operator, a, u


def _own_norm(ctx: RuleContext, n: fx.Node, op: LinearOperator):
    """(symbol, quantity) of the norm of ``op`` among node n's quantities, or None."""
    for sym, q in ctx.transfer(n).quantities.items():
        if getattr(q, "op", None) is op and sym.name.startswith(("norm_", "lt_")):
            return sym, q
    return None


def general_block(
    ctx: RuleContext, coef: dict[fx.Node, float], outer: LinearOperator | None = None,
    kind: str = "res",
) -> GeneralBlock | None:
    """The general-block bounds of A·(α z + β r) (A = ``outer``, the identity when None) for the
    two terms of ``coef`` = {z: α, r: β}, r = G σ(W z + b) (either order), or None when the merge
    is not such a block. Quantities are named ``<kind>norm_<node>`` etc."""
    if ctx.method != "compositional" or len(coef) != 2:
        return None
    (n1, c1), (n2, c2) = coef.items()
    orders = ((n1, c1, n2, c2), (n2, c2, n1, c1))
    found = next(((z, al, r, be, f) for z, al, r, be in orders
                  if (f := _branch(ctx, z, r)) is not None), None)
    if found is None:
        return None
    z, alpha, r, beta, (G, W, a, u) = found
    info = ctx.transfer(a).elementwise
    shape = ctx.shape(z)
    if ctx.shape(r) != shape:
        return None
    H_ops = [Scalar(alpha, shape)] + ([outer] if outer is not None else [])
    H = Chain.of(H_ops)
    Gb = Chain.of([G, Scalar(beta, ctx.shape(r))] + ([outer] if outer is not None else []))
    # the centre c of the slope range as a float c̃ (it goes inside a norm); then
    # ‖S − c̃I‖ ≤ max(hi − c̃, c̃ − lo) = d exactly, whatever the rounding of c̃
    c_num = float((info.lo + info.hi) / 2)
    c_exact = sympy.Rational(c_num)
    d = sympy.Max(info.hi - c_exact, c_exact - info.lo)
    loop = LinearSum([(1.0, H), (c_num, Chain.of([W, Gb]))])
    quantities, fold = {}, {}
    s_loop, q_loop = ctx.norm(loop, f"{kind}norm")
    quantities[s_loop] = q_loop
    fold[s_loop] = PairVectorNorm(loop)
    # ‖W‖ and, for a plain skip connection (β = ±1, no map after the merge), ‖G‖ are the norms
    # the branch's own nodes already computed: reused, not estimated twice
    found = _own_norm(ctx, u, W)
    if found is None:
        found = ctx.norm(W, f"{kind}wnorm")
        quantities[found[0]] = found[1]
    s_w, q_w = found
    found = _own_norm(ctx, r, G) if outer is None and abs(beta) == 1.0 and G is not None else None
    if found is None:
        found = ctx.norm(Gb, f"{kind}gnorm")
        quantities[found[0]] = found[1]
        fold[found[0]] = PairVectorNorm(Gb)
    s_g, q_g = found
    lam = s_loop + d * s_g * s_w
    L = lam * ctx.L(z)
    if info.curvature == sympy.oo or ctx.M(z) == sympy.oo:
        return GeneralBlock(L, sympy.oo, quantities, fold)
    first = [s_g * ctx.L(u) ** 2]
    rn = next((s for s in ctx.transfer(a).quantities if s.name.startswith("rnorm_")), None)
    if rn is not None:
        first.append(s_g * rn * ctx.L(z) ** 2)
    final = any(user.op == "output" for user in ctx.node.users)
    if ctx.anchor is None and hadamard_feasible(Gb, W, final=final):
        h = ctx.symbol(f"{kind}hnorm")
        quantities[h] = HadamardNorm(Gb, W, ctx.norms)
        fold[h] = PairScaledRows(Gb, W, 1, whole=quantities[h], w_norm=q_w)
        first.append(h * ctx.L(u) * ctx.L(z))
    M = lam * ctx.M(z) + info.curvature * smin(*first)
    return GeneralBlock(L, M, quantities, fold)
