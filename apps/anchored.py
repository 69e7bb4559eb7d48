"""Anchored bounds of a compiled model at given inputs (theory §7): the application side.

:mod:`curvbound.runtime.anchored` holds the per-sample quantities that generated code evaluates;
this module captures the anchors' activations with one float64 forward pass and evaluates a bound
function compiled with ``anchored=True`` at them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..compiler.bound_function import substitute_twins
from ..runtime.anchored import AnchorState

__all__ = ["AnchoredBounds", "Capture", "anchored_bounds", "anchor_state", "evaluate_anchored"]


def anchor_state(bf) -> AnchorState:
    """The :class:`AnchorState` of a bound function compiled with ``anchored=True``."""
    state = getattr(bf, "_anchor", None)
    if state is None:
        raise ValueError(
            "this bound function has no anchored quantities; compile it with "
            "curvbound.compile(model, example_input, anchored=True)"
        )
    return state


class Capture(nn.Module):
    """A float64 copy of a traced model that also returns the values of some nodes.

    ``Capture(gm, names)(x)`` returns ``(output, {name: value})`` from one forward pass (the
    graph's output node is rewritten to return the extra values). The copy is independent of
    later changes to the model's weights: make a new one after training. ``twins`` (node name →
    smooth function, ``bf._twins``) makes it a copy of the smooth twin
    (:func:`~curvbound.compiler.bound_function.substitute_twins`).
    """

    def __init__(self, gm: fx.GraphModule, names: list[str], twins: dict | None = None):
        super().__init__()
        g = copy.deepcopy(gm)
        nodes = substitute_twins(g, dict(twins or {}))
        unknown = [n for n in names if n not in nodes]
        if unknown:
            raise ValueError(f"nodes {unknown} are not in the traced graph")
        out = next(n for n in g.graph.nodes if n.op == "output")
        result = out.args[0]
        out.args = ((result, *[nodes[n] for n in names]),)
        g.recompile()
        self.names = list(names)
        self.gm = g.to(torch.float64).eval()
        for p in self.gm.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out, *values = self.gm(x.to(torch.float64))
        return out, {n: v for n, v in zip(self.names, values)}


@dataclass
class AnchoredBounds:
    """Per-sample bounds anchored at each row x₀ of a batch (shape (B,), float64).

    ``curvature[b]`` bounds ‖Df(x) − Df(x₀)‖/‖x − x₀‖ over all x for x₀ = sample b;
    ``lipschitz`` is the global Lipschitz bound (broadcast); ``certified`` as for :class:`Bounds`.
    """

    lipschitz: Tensor
    curvature: Tensor
    certified: bool
    nodes: dict[str, tuple[Tensor, Tensor]]


def evaluate_anchored(bf, values: dict[str, Tensor], batch: int) -> AnchoredBounds:
    """Evaluate an anchored bound function for captured anchor ``values`` (B = ``batch``)."""
    state = anchor_state(bf)
    with state.anchored(values), torch.no_grad():
        b = bf()
    bf._last = None  # the per-sample values must not feed bf.table() and friends
    shape = (batch,)
    nodes = {k: (L.expand(shape), M.expand(shape)) for k, (L, M) in b.nodes.items()}
    return AnchoredBounds(b.lipschitz.expand(shape), b.curvature.expand(shape), b.certified, nodes)


def anchored_bounds(bf, x0: Tensor) -> AnchoredBounds:
    """Curvature bounds of ``bf``'s model anchored at each sample of the batch ``x0``.

    ``bf`` must be compiled with ``anchored=True``. One float64 forward pass captures the
    pre-activation values at the anchors; the compiled bound is then evaluated with per-sample
    anchored quantities (module docstring). Every value is ≤ the global bound ``bf().curvature``.
    With torch's switching softplus (``bf().error`` > 0) the bounds are those of the smooth twin
    anchored at x0, and the pass runs the twin (``bf.smooth_twin()``).
    """
    state = anchor_state(bf)
    if not isinstance(x0, Tensor) or x0.dim() < 1:
        raise TypeError("x0 must be a batched tensor (B, *input_shape)")
    bf.check_input(x0, "x0")  # InputError naming the expected shape / the first NaN sample
    with torch.no_grad():
        _, values = Capture(bf.gm, state.nodes, twins=getattr(bf, "_twins", {}))(x0)
    return evaluate_anchored(bf, values, len(x0))
