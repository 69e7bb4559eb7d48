"""The compiled bound: an ``nn.Module`` running generated code over live model parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
from torch import Tensor, fx, nn

from ..runtime.norms import Norm, Quantity
from . import report
from .margins import margins

__all__ = ["Bounds", "BoundFunction"]


@dataclass
class Bounds:
    """Bounds for the map input → output (ℓ2 norms).

    ``lipschitz`` and ``curvature`` are 0-dim tensors (``inf`` curvature for non-C¹ models);
    ``certified`` is True exactly when every number that entered them is a guaranteed bound;
    ``nodes`` maps each node name to its (L, M) pair.
    """

    lipschitz: Tensor
    curvature: Tensor
    certified: bool
    nodes: dict[str, tuple[Tensor, Tensor]] = field(repr=False, default_factory=dict)

    def __iter__(self):
        return iter((self.lipschitz, self.curvature))

    def __repr__(self) -> str:
        kind = "certified" if self.certified else "estimated"
        return (
            f"Bounds(lipschitz={float(self.lipschitz.detach()):.6g}, "
            f"curvature={float(self.curvature.detach()):.6g}, "
            f"{kind})"
        )


class BoundFunction(nn.Module):
    """A model's compiled Lipschitz/curvature bound. Create it with :func:`curvbound.compile`.

    Calling it (``bf()``) evaluates the generated code on the model's *live* parameters, so an
    optimiser step is reflected without recompiling and gradients flow into the parameters
    (``norms="estimate"``). Power-iteration vectors are buffers (``state_dict()``), advanced by
    :meth:`refresh` or by ``bf(refresh=k)``; calling ``bf()`` never advances them by itself.
    """

    def __init__(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        quantities: dict[str, Quantity],
        code: str,
        fn: Callable,
        *,
        method: str,
        norms: str,
        output: str,
        node_info: list,
        expr_builder: Callable[[], tuple[dict, dict]],
    ):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: its weights stay the user's
        self.quantities = nn.ModuleDict(quantities)
        self.code, self._fn = code, fn
        self.method, self.norms, self.output = method, norms, output
        object.__setattr__(self, "gm", gm)  # the traced graph; shares the model's weights
        self._node_info = node_info
        self._expr_builder = expr_builder
        self._full: tuple[dict, dict] | None = None
        self._last: Bounds | None = None
        # set by compile (compiler/rounding.py): per-node certified flags, notes on the
        # certificates (why not certified; looser fallbacks), and the (L, M) factors covering
        # float64 rounding in certified mode
        self._node_certified: dict[str, bool] = {}
        self._cert_notes: dict[str, str] = {}
        self._rounding: dict[str, tuple[float, float]] = {}
        # set by compile: how to fold a margin e_i − e_j into the output node (runtime/margins.py)
        self._margin_fold = None

    @property
    def model(self) -> nn.Module:
        return self._model

    # -- evaluation -----------------------------------------------------------------------------
    def forward(self, refresh: int = 0) -> Bounds:
        """Evaluate the bounds; ``refresh=k`` first advances every power iteration by k steps."""
        if refresh:
            self.refresh(refresh)
        q = {k: v for k, v in self.quantities.items()}
        L, M, nodes = self._fn(q)
        if self.norms == "certified" and self._rounding:
            # rounding of the generated float64 arithmetic, bounded explicitly (compiler/rounding)
            f = self._rounding
            nodes = {k: (a * f[k][0], b * f[k][1]) for k, (a, b) in nodes.items()}
            L, M = nodes[self.output]
        L, M = _tensor(L), _tensor(M)
        nodes = {k: (_tensor(a), _tensor(b)) for k, (a, b) in nodes.items()}
        out = Bounds(L, M, self.certified, nodes)
        self._last = Bounds(
            L.detach(),
            M.detach(),
            out.certified,
            {k: (a.detach(), b.detach()) for k, (a, b) in nodes.items()},
        )
        return out

    @property
    def certified(self) -> bool:
        """True when every number that enters the output's bounds is guaranteed: certified norms,
        exact or proven constants, and arithmetic whose rounding is covered (``norms="certified"``).
        """
        if self._node_certified:
            return self._node_certified.get(self.output, False)
        return self.norms == "certified" and all(q.certified for q in self.quantities.values())

    def margins(self, *, differentiable: bool = False, pair_steps: int | None = None):
        """Bounds on every logit difference f_i − f_j, a :class:`~.margins.Margins`,
        with K×K ``lipschitz`` and ``curvature`` tensors (zero diagonal) and ``certified``.

        Each pair c = e_i − e_j is folded into the last linear layer and only the output block is
        recomputed, for all pairs in one batch (theory §5); where that does not apply the result is
        √2 times the global bound and ``.pairwise`` is False. See :mod:`curvbound.runtime.margins`.
        ``differentiable=True`` (estimate mode) keeps the result on the weights' autograd graph;
        ``pair_steps`` (see :func:`~.margins.margins`) tracks the per-pair eigenvectors instead.
        """
        return margins(self, differentiable=differentiable, pair_steps=pair_steps)

    def node_certified(self, name: str) -> bool:
        """Whether node ``name``'s bounds are guaranteed (every quantity upstream is certified)."""
        return self._node_certified.get(name, False)

    @torch.no_grad()
    def refresh(self, steps: int | None = None, *, tol: float = 1e-6, max_steps: int = 2000) -> int:
        """Advance the warm-started power iterations.

        ``steps=k`` runs exactly k steps; ``steps=None`` iterates until every estimate changes by
        less than ``tol`` (relative) over 10 steps, at most ``max_steps``. Returns the steps run.
        """
        norms = [q for q in self.quantities.values() if isinstance(q, Norm) and not q.certified]
        if steps is not None:
            for q in norms:
                q.step(steps)
            return steps
        done = 0
        active = list(norms)
        while active and done < max_steps:
            before = [float(q()) for q in active]
            for q in active:
                q.step(10)
            after = [float(q()) for q in active]
            done += 10
            active = [
                q for q, a, b in zip(active, before, after) if abs(b - a) > tol * max(abs(b), 1e-30)
            ]
        return done

    # -- views ----------------------------------------------------------------------------------
    def _latest(self) -> Bounds:
        if self._last is None:
            with torch.no_grad():
                self.forward()
        return self._last

    @property
    def expr(self) -> dict[str, sympy.Expr]:
        """The whole network's bounds as sympy expressions of quantity symbols (norms)."""
        full_l, full_m = self._full_exprs()
        return {"lipschitz": full_l[self.output], "curvature": full_m[self.output]}

    def _full_exprs(self) -> tuple[dict, dict]:
        if self._full is None:
            self._full = self._expr_builder()
        return self._full

    def quantity_values(self) -> dict[str, float]:
        """Current numeric value of every quantity symbol (what ``expr`` is evaluated at)."""
        with torch.no_grad():
            return {k: float(q()) for k, q in self.quantities.items()}

    @property
    def nonsmooth_nodes(self) -> list[str]:
        """Nodes that are not C¹ themselves (ReLU, max-pool...): why the curvature is infinite."""
        return [n.name for n in self._node_info if n.nonsmooth]

    @property
    def graph(self) -> nx.DiGraph:
        """networkx view: one node per fx node with its rule, bounds and expressions."""
        last = self._latest()
        g = nx.DiGraph(name=f"curvbound:{type(self.model).__name__}")
        for nb in self._node_info:
            L, M = last.nodes.get(nb.name, (torch.tensor(0.0), torch.tensor(0.0)))
            g.add_node(
                nb.name,
                op=nb.op,
                target=nb.target,
                rule=nb.rule,
                lipschitz=float(L),
                curvature=float(M),
                expr_lipschitz=nb.lipschitz,
                expr_curvature=nb.curvature,
                quantities=nb.quantities,
                certified=self.node_certified(nb.name),
                note=" ".join(x for x in (nb.note, self._cert_notes.get(nb.name, "")) if x),
                nonsmooth=nb.nonsmooth,
                constant=nb.constant,
            )
            for i in nb.inputs:
                g.add_edge(i, nb.name)
        return g

    def curvature_shares(self) -> dict[str, float]:
        """Each node's share of the output's curvature bound (they sum to 1 when it is finite).

        Every curvature rule is positively homogeneous of degree one in its inputs' curvatures,
        so M_out = Σ_k (∂M_out/∂M_k)·I_k, where I_k is node k's own term (its curvature with
        the inputs' curvatures set to 0). The share of node k is that summand over M_out; it is
        0 for nodes that create no curvature (linear maps, sums), however large their M.
        """
        return {k: share for k, (_, share) in report.contributions(self).items()}

    def table(self, sort: str = "graph", footer: bool = True) -> str:
        """Per-node text table: node (module path and type), rule, L, M, share of the output's
        curvature bound, certified; ``sort="share"`` (or ``"M"``, ``"L"``) lists the largest
        first; the footer explains the columns (``footer=False`` leaves it out)."""
        return report.table(self, sort=sort, footer=footer)

    def _repr_html_(self) -> str:
        return report.table_html(self)

    def to_dot(self) -> str:
        """Graphviz source of the graph with each node's rule, L, M and share (render it with
        ``dot -Tsvg`` or :func:`curvbound.views.to_svg`)."""
        return report.to_dot(self)

    def explain(self, node: str) -> str:
        """Node ``node`` (fx name, module path or table label): its rule's mathematical
        statement, its symbolic bounds and the numbers they evaluate to."""
        return report.explain(self, node)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, method={self.method}, norms={self.norms}"


def _tensor(v) -> Tensor:
    # float64: a float32 tensor would round a Python number (a float64 bound) down half the time
    return v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
