"""Names users know: a node's module path and type (``layers.3 (ReLU)``) rather than its fx name.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> [node_label(n) for n in gm.graph.nodes][1:3]
    ['0 (Linear)', '1 (ReLU)']
"""

from __future__ import annotations

from torch import fx

__all__ = ["node_label"]


def node_label(node: fx.Node) -> str:
    """``path (Type)`` for a module call, ``path: fn()`` / ``fn()`` for a function or method."""
    owner = node.graph.owning_module
    if node.op == "call_module":
        try:
            kind = type(owner.get_submodule(node.target)).__name__ if owner is not None else "?"
        except AttributeError:
            kind = "?"
        return f"{node.target} ({kind})"
    if node.op in ("call_function", "call_method"):
        if node.op == "call_method":
            fn = f".{node.target}()"
        else:
            fn = f"{getattr(node.target, '__name__', str(node.target))}()"
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            last = list(stack.values())[-1]
            if isinstance(last, tuple) and len(last) == 2:
                kind = getattr(last[1], "__name__", str(last[1]).rsplit(".", 1)[-1])
                path = f"{last[0]} ({kind})"
            else:
                path = str(last)
        return f"{path}: {fn}" if path else fn
    if node.op == "placeholder":
        return f"input '{node.target}'"
    return node.name
