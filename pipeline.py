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
from .compiler.bound_function import BoundFunction, CompileSpec, _rebuild
from .compiler.context import METHODS
from .compiler.errors import SerializationError, UnsupportedOperationError
from .compiler.registry import Registry, layered
from .compiler.trace import check_inputs, propagate_shapes, trace, unwrap_model
from .passes.checks import check_example_input, check_model_state, check_resources
from .passes.distribute import distribute
from .passes.lipschitz_lt import refine_affine
from .passes.methods import finalize as finalize_method
from .runtime.anchored import AnchorState
from .runtime.conv_products import border_budget
from .runtime.norms import MODES

__all__ = ["compile", "save", "load", "REFINERS"]

#: Passes every affine transfer goes through, in order (``RuleContext.linear`` applies them):
#: LipLT along chain segments and the two-layer block rules (passes/lipschitz_lt.py), then linear
#: maps distributed over the merges they follow (passes/distribute.py).
REFINERS = (refine_affine, distribute)

#: format tag of the files written by :func:`save`
_FORMAT = "curvbound.BoundFunction/1"


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
        ResourceError: the largest dense layer would need more working memory than is free.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if norms not in MODES:
        raise ValueError(f"norms must be one of {MODES}, got {norms!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # torch.compile, DataParallel, DistributedDataParallel
    check_model_state(model)
    check_resources(model, norms)
    example_input = check_example_input(model, example_input)
    registry = layered(rules)

    gm = trace(model, registry)
    check_inputs(gm)
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
    with border_budget():  # what certified products of convolutions may spend in this compile
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
        spec=CompileSpec(
            tuple(example_input.shape),
            example_input.dtype,
            method=method,
            norms=norms,
            rules=rules,
            anchored=anchored,
            refresh=refresh,
            compiler=compile,
        ),
    )
    cert, factors, why = rounding.certify_nodes(infos, quantities, norms)
    bf._node_certified, bf._rounding, bf._cert_notes = cert, factors, why
    made = codegen.generate_errors(gm)
    if made is not None:
        bf.error_code, bf._error_fn = made
        bf._error_factors, not_monotone = rounding.error_factors(infos)
        for name in not_monotone:  # never happens for the built-in rules; said, not assumed
            bf._node_certified[name] = False
        bf._twins = {n.name: t.twin for n, t in transfers.items() if t.twin is not None}
    bf._margin_fold = transfers[out].margin  # how bf.margins() folds e_i − e_j (runtime/margins)
    bf._anchor = anchor  # anchored quantities read the anchor's values from it (runtime/anchored)
    if refresh:
        bf.refresh()
    bf._check_values(transfers)  # a rule's negative or NaN number fails here, naming the node
    return bf


def save(bf: BoundFunction, f) -> None:
    """Save a bound function *without its model*: how it was compiled (input shape, dtype,
    method, norms, anchored) and its power-iteration state. :func:`load` compiles it again for
    a model you pass (saved the usual way, ``torch.save(model.state_dict(), ...)``).

    The file holds only strings, numbers and tensors, so ``torch.load(weights_only=True)``
    reads it. Per-call ``rules=`` are not saved: pass them to :func:`load` again.

    Example:
        >>> import io, torch, curvbound
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> bf = curvbound.compile(net, torch.zeros(1, 2))
        >>> buf = io.BytesIO(); curvbound.save(bf, buf); _ = buf.seek(0)
        >>> bf2 = curvbound.load(buf, net)
        >>> bool(torch.equal(bf2().lipschitz, bf().lipschitz))
        True
    """
    spec = bf._spec
    if spec is None:
        raise SerializationError("this bound function does not record how it was compiled")
    torch.save(
        {
            "format": _FORMAT,
            "input_shape": list(spec.input_shape),
            "dtype": str(spec.dtype).removeprefix("torch."),
            "method": spec.method,
            "norms": spec.norms,
            "anchored": bool(spec.anchored),
            "refresh": bool(spec.refresh),
            "custom_rules": spec.rules is not None,
            "model_type": type(bf.model).__name__,
            "state": {k: v.detach().cpu() for k, v in bf.state_dict().items()},
        },
        f,
    )


def load(
    f, model: nn.Module, *, rules: Registry | Mapping[Any, Any] | None = None
) -> BoundFunction:
    """Compile ``model`` as the bound function saved by :func:`save` and restore its
    power-iteration state. Raises :class:`~curvbound.SerializationError` when the file is not
    such a save or its state does not fit (another model structure, other rules)."""
    data = torch.load(f, weights_only=True, map_location="cpu")
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise SerializationError(
            "not a file written by curvbound.save (for a pickled bound function use "
            "torch.load(f, weights_only=False))"
        )
    if data["custom_rules"] and rules is None:
        raise SerializationError(
            "the bound function was compiled with rules=...; pass the same rules to "
            "curvbound.load(f, model, rules=...)"
        )
    model = unwrap_model(model)
    spec = CompileSpec(
        tuple(data["input_shape"]),
        getattr(torch, data["dtype"]),
        method=data["method"],
        norms=data["norms"],
        rules=rules,
        anchored=data["anchored"],
        refresh=data["refresh"],
        compiler=compile,
    )
    ref = next((t for t in model.parameters()), None)
    state = {k: v.to(ref.device) if ref is not None else v for k, v in data["state"].items()}
    return _rebuild(model, spec, state)
