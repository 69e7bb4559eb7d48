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

__all__ = ["trace", "propagate_shapes", "unwrap_model", "check_inputs"]


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that computes: unwraps ``torch.compile`` (``_orig_mod``), ``DataParallel`` and
    ``DistributedDataParallel`` (``.module``), repeatedly. Any other module is returned as is.

    The wrappers share their parameters with the inner module, so a bound of the inner module
    reads the same live weights.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 16:  # wrappers of wrappers; a cycle cannot make this loop forever
        seen += 1
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo's OptimizedModule
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        break
    return model


def check_inputs(gm: fx.GraphModule) -> None:
    """Raise :class:`InputError` unless forward takes exactly one tensor without a default.

    Run right after tracing, before the example input is run through the model.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise InputError("the model's forward takes no input; curvbound bounds maps of one tensor")
    extra = [n.target for n in placeholders[1:] if not n.args]  # args = (default,) when given
    if extra:
        names = ", ".join(str(n.target) for n in placeholders)
        raise InputError(
            f"the model's forward takes {len(placeholders)} inputs ({names}); curvbound bounds a "
            f"map of one tensor. Fix the other input(s) ({', '.join(map(str, extra))}): give "
            "them defaults, or wrap the model, e.g.\n"
            "    class Wrapped(torch.nn.Module):\n"
            "        def __init__(self, model, y):\n"
            "            super().__init__(); self.model, self.y = model, y\n"
            "        def forward(self, x):\n"
            "            return self.model(x, self.y)"
        )


def trace(model: nn.Module, registry: Registry) -> fx.GraphModule:
    """Symbolically trace ``model``; modules with a rule stay single ``call_module`` nodes."""
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TracingError(
            f"the model is wrapped by torch.compile ({type(model).__name__}); pass the module it "
            "wraps, model._orig_mod (curvbound.compile unwraps it itself)"
        )
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
