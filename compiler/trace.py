"""Tracing: torch.fx symbolic tracing that keeps modules with a registered rule as leaves."""

from __future__ import annotations

import contextlib
import io
import re

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError, TracingError
from .registry import Registry

__all__ = ["trace", "propagate_shapes"]


class _Tracer(fx.Tracer):
    def __init__(self, registry: Registry):
        super().__init__()
        self.registry = registry

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.registry.module_rules(type(m)):
            return True
        # torch's own layers without a rule stay leaves so that the coverage check names the
        # layer (nn.MultiheadAttention) rather than its internals; containers and user modules
        # are traced into.
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, registry: Registry) -> fx.GraphModule:
    """Symbolically trace ``model``; modules with a rule stay single ``call_module`` nodes."""
    tracer = _Tracer(registry)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds: TraceError, TypeError, NotImplementedError...
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "curvbound needs a graph it can trace symbolically. Usual causes and fixes:\n"
            "  - Python control flow on tensor values (if x.sum() > 0, loops over x.shape of "
            "data):\n"
            "    make it structural, or register a rule for the submodule that contains it so it\n"
            "    becomes a leaf (@curvbound.rule(MyBlock)).\n"
            "  - calls into non-torch code (numpy, .item(), .tolist()): remove them from forward.\n"
            "  - helper functions fx should not look into: torch.fx.wrap('fn_name') and "
            "register a\n"
            "    rule for fn_name."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(model, graph, name)


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Run the example input through the graph, recording ``tensor_meta`` on every node."""
    try:
        # ShapeProp prints the failing node's traceback itself; the error below says it better
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        found = re.search(r"node=%(\w+)", str(exc))
        where = f" at node '{found.group(1)}'" if found else ""
        root = exc.__cause__ or exc
        raise InputError(
            f"the model failed on the example input of shape {tuple(example_input.shape)} and "
            f"dtype {example_input.dtype}{where}: {type(root).__name__}: {root}\n"
            "Pass a batched example input that the model accepts, e.g. "
            "torch.zeros(1, *input_shape) with the dtype of the model's parameters."
        ) from exc
