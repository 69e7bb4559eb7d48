"""``curvbound.compile``: trace → checks → passes → rules → symbolic assembly → code generation.

The pipeline sits above the three stages (``runtime`` ← ``compiler`` ← ``passes``) and below the
applications (``apps``): it is the one place that wires passes into the core (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .compiler import assemble, codegen, rounding
from .compiler.bound_function import BoundFunction
from .compiler.context import METHODS
from .compiler.errors import UnsupportedOperationError
from .compiler.registry import Registry, layered
from .compiler.trace import propagate_shapes, trace
from .passes.checks import check_example_input, check_model_state
from .passes.lipschitz_lt import refine_affine
from .passes.methods import finalize as finalize_method
from .runtime.anchored import AnchorState
from .runtime.norms import MODES

__all__ = ["compile", "REFINERS"]

#: Passes every affine transfer goes through, in order (``RuleContext.linear`` applies them):
#: LipLT along chain segments and the two-layer block rules (passes/lipschitz_lt.py).
REFINERS = (refine_affine,)


def compile(  # noqa: A001 - the public name is fixed by the API
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    method: str = "compositional",
    norms: str = "estimate",
    rules: Registry | Mapping[Any, Any] | None = None,
    refresh: bool = True,
    anchored: bool = False,
) -> BoundFunction:
    """Compile ``model`` into a :class:`~curvbound.compiler.bound_function.BoundFunction`.

    Args:
        model: an ``nn.Module`` in eval mode whose forward fx can trace.
        example_input: a batched input the model accepts (fixes shapes; values are not used).
        method: ``"compositional"`` (block rules, LipLT along chain segments, merged linear
            chains), ``"naive"`` (products of layer norms, per-layer curvature sup|σ''|·‖W‖²),
            ``"paper"`` (the paper's Algorithm 1, sequential networks) or ``"crt"`` (Singla &
            Feizi's bound, MLPs); see ``passes/paper.py`` and ``passes/crt.py``.
        norms: ``"estimate"`` (warm-started power iteration, from below: fast, differentiable)
            or ``"certified"`` (guaranteed upper bounds in float64).
        rules: per-call rule overrides, layered on the default registry:
            ``{target: rule}`` or a :class:`~curvbound.compiler.registry.Registry`.
        refresh: run power iteration to convergence before returning (estimate mode).
        anchored: also create per-sample anchored quantities (theory §7, methods
            "compositional" and "naive"): ``curvbound.anchored_bounds(bf, x0)`` then gives the
            curvature anchored at each sample of x0; ``bf()`` still gives the global bounds.
            See ``runtime/anchored.py``.

    Raises (before any numeric work where possible):
        UnsupportedOperationError: nodes without a rule, all of them listed with hints.
        TracingError, ModelStateError, InputError: untraceable model, train-mode batch norm or
        NaN weights, an unsuitable example input.
        MethodCoverageError: ``method="paper"``/``"crt"`` on a graph it does not cover.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if norms not in MODES:
        raise ValueError(f"norms must be one of {MODES}, got {norms!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model_state(model)
    example_input = check_example_input(model, example_input)
    registry = layered(rules)

    gm = trace(model, registry)
    constants = assemble.find_constants(gm.graph)
    missing = assemble.check_coverage(gm, registry, constants)
    if missing:
        raise UnsupportedOperationError(missing)
    propagate_shapes(gm, example_input)

    anchor = None
    if anchored:
        if method not in ("compositional", "naive"):
            raise ValueError(
                f"anchored=True supports methods 'compositional' and 'naive', not {method!r}"
            )
        anchor = AnchorState()
    transfers, rule_names, out = assemble.propagate(
        gm, registry, method=method, norms=norms, constants=constants, anchor=anchor,
        refiners=REFINERS,
    )
    # "paper"/"crt": check the graph is covered and rewrite the output node's transfer
    finalize_method(
        gm, transfers, rule_names, out, method=method, norms=norms, constants=constants,
        refiners=REFINERS,
    )
    assemble.node_bounds(gm, transfers, rule_names, constants)
    quantities = {str(s): q for t in transfers.values() for s, q in t.quantities.items()}
    code, fn = codegen.generate(gm, out)
    infos = [n.meta[assemble.BOUND_KEY] for n in gm.graph.nodes if assemble.BOUND_KEY in n.meta]
    bf = BoundFunction(
        model,
        gm,
        quantities,
        code,
        fn,
        method=method,
        norms=norms,
        output=out.name,
        node_info=infos,
        expr_builder=lambda: assemble.full_expressions(gm, out),
    )
    cert, factors, why = rounding.certify_nodes(infos, quantities, norms)
    bf._node_certified, bf._rounding, bf._cert_notes = cert, factors, why
    bf._margin_fold = transfers[out].margin  # how bf.margins() folds e_i − e_j (runtime/margins)
    bf._anchor = anchor  # anchored quantities read the anchor's values from it (runtime/anchored)
    if refresh:
        bf.refresh()
    return bf
