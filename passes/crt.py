"""``method="crt"``: Singla & Feizi's curvature bound (ICML 2020; theory §10) for MLPs.

For f = W_L σ(W_{L−1} ⋯ σ(W_1 x)) (biases omitted) with one smooth activation σ, g = sup|σ'|,
h = sup|σ''|, and a margin vector c:

    ‖∇²(cᵀf)(x)‖ ≤ h·Σ_{I=1}^{L−1} r_I²·max_j (S_I)_j,
    r_1 = ‖W_1‖, r_I = g‖W_I‖r_{I−1},  S_{L−1} = |cᵀW_L|,  S_I = g·S_{I+1}·|W_{I+1}|.

(∇²(cᵀf) = Σ_I Dz_Iᵀ diag(λ_I ⊙ σ''(z_I)) Dz_I with λ_I = ∂(cᵀf)/∂a_I, |λ_I| ≤ S_I entrywise and
‖Dz_I‖ ≤ r_I.) The r_I are the naive Lipschitz bounds of the pre-activations, i.e. the nodes' L.

**The vector map.** ``bf()`` reports a bound on M_f = sup_{‖c‖=1} M(cᵀf) (for every unit c,
‖Df(x) − Df(y)‖ = sup_c ‖∇(cᵀf)(x) − ∇(cᵀf)(y)‖): the same formula with S_{L−1} replaced by the
column norms of W_L, which bound |cᵀW_L| entrywise for every unit c. Note that the maximum of the
pairwise margin bounds divided by √2 would *not* be a bound on M_f (the pairs are only some of
the unit vectors c). ``bf.margins()`` uses S_{L−1} = |(e_i − e_j)ᵀW_L| for each pair; since
|w_ik − w_jk| ≤ √2‖W_L e_k‖ every pairwise entry is ≤ √2 times the global bound.

Covered graphs: Linear layers (flatten and reshapes allowed) alternating with one smooth activation
type, ending in a Linear layer; anything else raises
:class:`~curvbound.compiler.errors.MethodCoverageError` naming the node.

>>> import torch, curvbound
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
...                           torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
>>> bf = curvbound.compile(net, torch.zeros(1, 4, dtype=torch.float64), method="crt",
...                        norms="certified")
>>> bf()
Bounds(lipschitz=0.691655, curvature=0.833416, certified)
>>> bf.margins().curvature.max() <= 2**0.5 * bf().curvature
tensor(True)
"""

from __future__ import annotations

import dataclasses

import sympy

from ..compiler.context import RuleContext, Transfer
from ..compiler.errors import MethodCoverageError
from ..compiler.naming import node_label
from ..runtime.margins import MarginFold, PairCRT, PairVectorNorm
from ..runtime.operators import Chain, Dense
from ..runtime.products import CRTSensitivity
from .sequential import Layer

__all__ = ["crt_output"]


def _is_linear(op) -> bool:
    core = op.core if isinstance(op, Chain) else [op]
    return len(core) == 1 and isinstance(core[0], Dense)


def crt_output(ctx: RuleContext, layers: list[Layer], rules: dict) -> Transfer:
    """The output node's transfer under CRT (``layers`` from ``sequential_path``)."""
    for layer in layers:
        op = ctx.transfer(layer.affine).operator
        if not _is_linear(op):
            raise MethodCoverageError(
                f"method='crt' covers MLPs (Linear layers, flatten, one smooth activation); "
                f"{node_label(layer.affine)} (fx node '{layer.affine.name}', rule "
                f"{rules.get(layer.affine)}) is {op.describe()}. "
                "Use method='compositional'."
            )
    acts = [ctx.transfer(layer.activation).elementwise for layer in layers[:-1]]
    names = sorted({a.name for a in acts})
    if len(names) > 1:
        first = next(layer.activation for layer, a in zip(layers, acts) if a.name != acts[0].name)
        raise MethodCoverageError(
            f"method='crt' needs one activation type; {node_label(first)} (fx node "
            f"'{first.name}') is {names} "
            f"(mixed). Use method='compositional'."
        )
    t = ctx.transfer(ctx.node)
    if not acts:
        return t
    g, h = acts[0].slope, acts[0].curvature
    ops = [ctx.transfer(layer.affine).operator for layer in layers]
    quantities = dict(t.quantities)
    fold = dict(t.margin.fold) if t.margin is not None else {}
    if len(fold) != 1:  # the output's own norm only (no LipLT under "crt")
        fold = {s: PairVectorNorm(t.operator) for s in t.quantities}
    terms = []
    last = len(layers) - 1
    for index, layer in enumerate(layers[:-1]):  # I = index + 1 runs over 1..L−1
        sym = ctx.symbol(f"crt_{layer.affine.name}")
        q = CRTSensitivity(ops[index + 1 :], ctx.norms, label=f"S_{index + 1}")
        quantities[sym] = q
        fold[sym] = PairCRT(q)
        power = last - 1 - index  # g^(L−1−I)
        terms.append(g**power * ctx.L(layer.affine) ** 2 * sym)
    curvature = h * sympy.Add(*terms)
    note = "CRT (Singla & Feizi 2020): h·Σ r_I²·max(S_I), worst unit c for the vector map"
    return dataclasses.replace(
        t, curvature=curvature, quantities=quantities, note=note,
        margin=MarginFold(t.operator, fold, note="CRT per pair: S_{L-1} = |(e_i - e_j)ᵀW_L|"),
    )
