"""Names a user recognises for traced nodes: module paths and types, not fx node names.

fx names nodes after attribute paths with dots replaced (``features.3`` becomes ``features_3``)
and numbers repeated calls (``relu_1``), so a ReLU inside a ``Sequential`` called ``linear`` is
``linear_1``. Messages, tables and views use :func:`node_label` instead: the module path and the
module's type for a module call, and the function with the module it is called from otherwise.

>>> import torch
>>> from torch import nn
>>> from curvbound.compiler.registry import DEFAULT_REGISTRY
>>> from curvbound.compiler.trace import trace
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(4, 4)
...     def forward(self, x):
...         return torch.relu(self.fc(x)) + x
>>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Block()), DEFAULT_REGISTRY)
>>> for n in gm.graph.nodes:
...     print(f"{n.name:6} {node_label(n)}")
input_1 input
_0     0 (Linear)
_1     1 (ReLU)
_2_fc  2.fc (Linear)
relu   relu() in 2 (Block)
add    add() in 2 (Block)
output output
"""

from __future__ import annotations

from torch import fx, nn

__all__ = ["node_label", "module_path", "target_label"]


def target_label(node: fx.Node) -> str:
    """The called function or method as a short name: ``relu()``, ``add()``, ``view()``."""
    if node.op == "call_method":
        return f"{node.target}()"
    name = getattr(node.target, "__name__", None) or str(node.target)
    return f"{name}()"


def _stack(node: fx.Node) -> list[tuple[str, type]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, None)
        out.append((str(path), cls))
    return out


def module_path(node: fx.Node) -> str | None:
    """The module path a node belongs to (its own for a module call, else the calling module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = _stack(node)
    return stack[-1][0] if stack else None


def _type_name(cls) -> str:
    return getattr(cls, "__name__", None) or str(cls)


def node_label(node: fx.Node, root: nn.Module | None = None) -> str:
    """``"features.3 (ReLU)"`` for a module call, ``"relu() in block (Block)"`` for a function
    called inside a module, ``"relu()"`` at the top level; ``root`` (the traced module) gives the
    type of a module call when the trace recorded none."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return f"{node.target} (tensor attribute)"
    if node.op == "call_module":
        stack = _stack(node)
        cls = stack[-1][1] if stack and stack[-1][0] == str(node.target) else None
        if cls is None and root is not None:
            try:
                cls = type(root.get_submodule(str(node.target)))
            except AttributeError:
                cls = None
        return f"{node.target} ({_type_name(cls)})" if cls is not None else str(node.target)
    label = target_label(node)
    stack = _stack(node)
    if stack:
        path, cls = stack[-1]
        return f"{label} in {path} ({_type_name(cls)})" if cls is not None else f"{label} in {path}"
    return label
