"""Whole-graph steps of the methods "paper" and "crt", run after the per-node propagation.

Both methods cover only sequential networks (one chain of linear maps and elementwise activations
ending in a linear map). :func:`~curvbound.passes.sequential.sequential_path` checks that and names
the first node that breaks it; :func:`finalize` then rewrites the output node's transfer (the
paper's final block, or CRT's bound) and leaves the other methods' transfers as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from ..compiler.context import Refiner, RuleContext, Transfer
from .crt import crt_output
from .paper import paper_output
from .sequential import sequential_path

__all__ = ["finalize"]


def finalize(
    gm: fx.GraphModule,
    transfers: dict[fx.Node, Transfer],
    rules: dict[fx.Node, str],
    out: fx.Node,
    *,
    method: str,
    norms: str,
    constants: set[fx.Node],
    refiners: Sequence[Refiner] = (),
) -> None:
    """Method-specific rewrite of the output node's transfer (in place): "paper" → the paper's final
    block (:mod:`.paper`), "crt" → Singla & Feizi's bound (:mod:`.crt`); others: nothing."""
    if method not in ("paper", "crt"):
        return
    layers = sequential_path(gm, transfers, rules, out, constants, method)
    ctx = RuleContext(out, gm, method=method, norms=norms, transfers=transfers,
                      constants=constants, refiners=refiners)
    if method == "paper":
        transfers[out] = paper_output(ctx, layers, rules)
        rules[out] = f"{rules[out]} + paper.final_block"
    else:
        transfers[out] = crt_output(ctx, layers, rules)
        rules[out] = f"{rules[out]} + crt"
