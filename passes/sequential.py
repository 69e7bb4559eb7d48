"""Sequential networks: the layer list input → (affine → σ)* → affine that the methods "paper" and
"crt" need, or a :class:`~curvbound.compiler.errors.MethodCoverageError` naming the first node that
breaks it."""

from __future__ import annotations

import sympy
from torch import fx

from ..compiler.context import Transfer
from ..compiler.errors import MethodCoverageError
from ..compiler.naming import node_label

__all__ = ["Layer", "sequential_path"]


class Layer:
    """One step of a sequential network: an affine node and the activation that follows it (None
    for the output layer)."""

    def __init__(self, affine: fx.Node, activation: fx.Node | None):
        self.affine, self.activation = affine, activation

    def __repr__(self) -> str:
        act = self.activation.name if self.activation is not None else "-"
        return f"Layer({self.affine.name}, {act})"


def _describe(node: fx.Node, rules: dict[fx.Node, str]) -> str:
    return f"{node_label(node)} (fx node '{node.name}', rule {rules.get(node, '?')})"


def sequential_path(
    gm: fx.GraphModule,
    transfers: dict[fx.Node, Transfer],
    rules: dict[fx.Node, str],
    out: fx.Node,
    constants: set[fx.Node],
    method: str,
) -> list[Layer]:
    """The layers of a sequential network input → (affine → σ)* → affine = output.

    Affine nodes are those whose transfer carries a linear operator (consecutive ones are merged:
    only the last of a run, the one that feeds an activation or is the output, is a layer);
    activations are elementwise rules with a finite curvature. Raises
    :class:`~curvbound.compiler.errors.MethodCoverageError` naming the first offending node.
    """
    fix = "Use method='compositional', which covers any graph."

    def fail(msg: str) -> MethodCoverageError:
        return MethodCoverageError(f"method={method!r}: {msg}. {fix}")

    live = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr") and n not in constants]
    for node in live:
        users = [u for u in node.users if u not in constants]
        if node is not out and len(users) != 1:
            names = ", ".join(u.name for u in users)
            raise fail(f"{_describe(node, rules)} feeds {len(users)} nodes ({names}); it covers "
                       "sequential networks only (no branches or residual connections)")
        if node.op == "placeholder":
            continue
        ins = [i for i in node.all_input_nodes if i not in constants]
        if len(ins) != 1:
            names = ", ".join(i.name for i in ins)
            raise fail(f"{_describe(node, rules)} combines {len(ins)} input-dependent tensors "
                       f"({names}); it covers sequential networks only")
    layers: list[Layer] = []
    pending: fx.Node | None = None  # the last affine node not yet followed by an activation
    for node in live:
        if node.op == "placeholder":
            continue
        t = transfers[node]
        if t.operator is not None:
            pending = node
            continue
        info = t.elementwise
        if info is None:
            raise fail(f"{_describe(node, rules)} is neither a linear map nor an elementwise "
                       "activation")
        if pending is None or info.input is not pending:
            raise fail(f"activation {_describe(node, rules)} does not follow a linear layer")
        if info.curvature == sympy.oo:
            raise fail(f"activation {_describe(node, rules)} is not C¹ (σ' is discontinuous), so "
                       "its curvature is infinite")
        layers.append(Layer(pending, node))
        pending = None
    if pending is not out:
        raise fail(f"the network must end with a linear layer, but the output is "
                   f"{_describe(out, rules)}")
    layers.append(Layer(out, None))
    return layers
