"""The compiled bound: an ``nn.Module`` running generated code over live model parameters."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import networkx as nx
import sympy
import torch
from torch import Tensor, fx, nn

from ..runtime.compiled_steps import StepPlan
from ..runtime.converge import converge
from ..runtime.norms import Norm, Quantity, shared_evaluation
from ..runtime.products import HadamardNorm
from . import report
from .errors import (
    InputError,
    ModelStateError,
    RuleError,
    SerializationError,
    StaleBoundError,
)
from .margins import margins
from .naming import node_label

__all__ = [
    "Bounds",
    "BoundFunction",
    "CompiledBound",
    "CompileSpec",
    "ModelStructure",
    "check_finite_samples",
    "substitute_twins",
]


@dataclass(frozen=True)
class CompileSpec:
    """How a bound function was compiled: enough to compile it again for a model (``recompile``,
    copies, pickling). ``compiler`` is the function that compiled it (``curvbound.compile``)."""

    input_shape: tuple[int, ...]
    dtype: torch.dtype
    method: str
    norms: str
    rules: Any = None
    anchored: bool = False
    refresh: bool = True
    compiler: Callable[..., Any] | None = None

    def compile(self, model: nn.Module, *, refresh: bool | None = None) -> BoundFunction:
        """Compile ``model`` again with these settings (an example input of zeros)."""
        if self.compiler is None:
            raise SerializationError("this bound function does not record how it was compiled")
        ref = next((t for t in model.parameters() if t.is_floating_point()), None)
        if ref is None:
            ref = next((t for t in model.buffers() if t.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else self.dtype
        device = ref.device if ref is not None else None
        x = torch.zeros(self.input_shape, dtype=dtype, device=device)
        return self.compiler(
            model,
            x,
            method=self.method,
            norms=self.norms,
            rules=self.rules,
            anchored=self.anchored,
            refresh=self.refresh if refresh is None else refresh,
        )


class ModelStructure:
    """What a compiled bound depends on, besides parameter values: the module tree (each
    submodule object and its type) and each parameter object and its shape, buffers' shapes.

    Holds references (not ids), so a replaced object cannot be mistaken for a new one at a
    reused address. Cheap: one walk over ``named_modules`` and ``named_parameters``.
    """

    def __init__(self, model: nn.Module):
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.params = [
            (n, p, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)
        ]
        self.buffers = [
            (n, tuple(b.shape)) for n, b in model.named_buffers(remove_duplicate=False)
        ]

    def changes(self, model: nn.Module, limit: int = 6) -> list[str]:
        """How ``model`` differs from the recorded structure (empty when it does not)."""
        out: list[str] = []
        now = list(model.named_modules(remove_duplicate=False))
        if len(now) != len(self.modules) or any(
            a[0] != b[0] or a[1] is not b[1] for a, b in zip(now, self.modules)
        ):
            old = dict(self.modules)
            new = dict(now)
            for path, m in new.items():
                if path not in old:
                    out.append(f"submodule '{path}' ({type(m).__name__}) was added")
                elif old[path] is not m:
                    out.append(
                        f"submodule '{path}' was replaced ({type(old[path]).__name__} -> "
                        f"{type(m).__name__})"
                    )
            out += [
                f"submodule '{p}' ({type(m).__name__}) was removed" for p, m in old.items()
                if p not in new
            ]
            if not out:
                out.append("the module tree was reordered")
        if len(out) < limit:
            now_p = list(model.named_parameters(remove_duplicate=False))
            if len(now_p) != len(self.params) or any(
                a[0] != b[0] or a[1] is not b[1] or tuple(a[1].shape) != b[2]
                for a, b in zip(now_p, self.params)
            ):
                old_p = {n: (p, s) for n, p, s in self.params}
                for n, p in now_p:
                    if n not in old_p:
                        out.append(f"parameter '{n}' was added")
                    elif old_p[n][0] is not p:
                        out.append(f"parameter '{n}' was replaced by a new object")
                    elif tuple(p.shape) != old_p[n][1]:
                        out.append(
                            f"parameter '{n}' changed shape {old_p[n][1]} -> {tuple(p.shape)}"
                        )
                names = {n for n, _ in now_p}
                out += [f"parameter '{n}' was removed" for n in old_p if n not in names]
        if len(out) < limit:
            now_b = [(n, tuple(b.shape)) for n, b in model.named_buffers(remove_duplicate=False)]
            if now_b != self.buffers:
                old_b, new_b = dict(self.buffers), dict(now_b)
                out += [
                    f"buffer '{n}' changed shape {old_b[n]} -> {s}" if n in old_b
                    else f"buffer '{n}' was added"
                    for n, s in new_b.items() if old_b.get(n) != s
                ]
                out += [f"buffer '{n}' was removed" for n in old_b if n not in new_b]
        return out[:limit]


def substitute_twins(g: fx.GraphModule, twins: dict[str, Callable]) -> dict[str, fx.Node]:
    """Replace, in place, each node named in ``twins`` by a call of its smooth twin on the node's
    input (the smooth map the bounds are for, e.g. softplus without its threshold); returns the
    graph's nodes by their *original* names (a replaced node's name maps to its replacement)."""
    nodes = {n.name: n for n in g.graph.nodes}
    for name, twin in twins.items():
        node = nodes[name]
        fn, kwargs = (twin.func, dict(twin.keywords)) if isinstance(twin, partial) else (twin, {})
        with g.graph.inserting_after(node):
            new = g.graph.call_function(fn, (node.all_input_nodes[0],), kwargs)
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)
        nodes[name] = new
    if twins:
        g.graph.lint()
        g.recompile()
    return nodes


def _zero() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


@dataclass
class Bounds:
    """Bounds for the map input → output (ℓ2 norms).

    ``lipschitz`` and ``curvature`` are 0-dim tensors (``inf`` curvature for non-C¹ models);
    ``certified`` is True exactly when every number that entered them is a guaranteed bound;
    ``nodes`` maps each node name to its (L, M) pair.

    ``error`` (0-dim, float64) is 0 unless the model uses an activation whose torch
    implementation switches formulas (``nn.Softplus``/``F.softplus``, which return x itself once
    βx > threshold). Then torch's map f is discontinuous and has no finite Lipschitz constant;
    ``lipschitz`` and ``curvature`` are the constants of its smooth twin F (every softplus
    without its threshold), and ``error`` bounds sup_x ‖f(x) − F(x)‖. Consequences for f itself:
    ‖f(x) − f(y)‖ ≤ lipschitz·‖x − y‖ + 2·error, and the certificates subtract √2·error from
    every logit gap (docs/certified_norms.md, "Activations that switch formulas").

    Example:
        >>> import torch, curvbound
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Softplus(beta=2, threshold=5))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.fill_(0.0)
        >>> curvbound.compile(net, torch.zeros(1, 1), norms="certified")()
        Bounds(lipschitz=1, curvature=0.5, error=0.00335767, certified)
    """

    lipschitz: Tensor
    curvature: Tensor
    certified: bool
    nodes: dict[str, tuple[Tensor, Tensor]] = field(repr=False, default_factory=dict)
    error: Tensor = field(default_factory=_zero)

    def __iter__(self):
        return iter((self.lipschitz, self.curvature))

    def __repr__(self) -> str:
        kind = "certified" if self.certified else "estimated"
        err = float(self.error.detach())
        extra = f"error={err:.6g}, " if err != 0 else ""
        return (
            f"Bounds(lipschitz={float(self.lipschitz.detach()):.6g}, "
            f"curvature={float(self.curvature.detach()):.6g}, "
            f"{extra}{kind})"
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
        spec: CompileSpec | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: its weights stay the user's
        # how it was compiled (recompile, copies, pickling) and what it depends on (staleness)
        self._spec = spec
        self._structure = ModelStructure(model)
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
        # set by compile when an activation's torch implementation switches formulas: the
        # generated error function (compiler/codegen.generate_errors), its rounding factors,
        # and the smooth replacement of each switching node (its "twin", see smooth_twin)
        self._error_fn: Callable | None = None
        self.error_code: str = ""
        self._error_factors: dict[str, float] = {}
        self._twins: dict[str, Callable] = {}
        self.last_convergence = None  # set by refresh() without steps (runtime/converge.py)

    @property
    def model(self) -> nn.Module:
        return self._model

    # -- state: staleness, recompiling, copies, pickling, devices ------------------------------
    def check_model(self) -> None:
        """Raise :class:`~curvbound.StaleBoundError` if the model's structure changed since
        compile (a submodule replaced, a parameter object swapped or reshaped). ``bf()`` calls it.

        Parameter *values* are read live: optimiser steps, ``load_state_dict`` and in-place edits
        are not changes of structure.
        """
        changes = self._structure.changes(self._model)
        if changes:
            raise StaleBoundError(
                f"the model ({type(self._model).__name__}) changed since this bound function was "
                "compiled, so its bound would describe the old model:\n"
                + "\n".join(f"  - {c}" for c in changes)
                + "\nCall bf.recompile() to compile the model's current structure (or "
                "curvbound.compile(model, example_input) again)."
            )

    def recompile(self) -> BoundFunction:
        """Compile the model again, in place, with the same settings (after a structural change
        such as ``model[2] = nn.Linear(8, 8)``). Power-iteration state starts afresh. Returns
        ``self``.

        Example:
            >>> import torch, curvbound
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
            >>> bf = curvbound.compile(net, torch.zeros(1, 2), norms="certified")
            >>> net[0] = torch.nn.Linear(2, 2)
            >>> bf()
            Traceback (most recent call last):
            ...
            curvbound.compiler.errors.StaleBoundError: the model (Sequential) changed ...
            >>> bf.recompile()()
            Bounds(lipschitz=..., curvature=..., certified)
        """
        if self._spec is None:
            raise SerializationError("this bound function does not record how it was compiled")
        fresh = self._spec.compile(self._model)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        return self

    def __deepcopy__(self, memo: dict) -> BoundFunction:
        """An independent bound function of a deep copy of the model: compiled again for the
        copy (the operators of the original read the original's parameters), with this one's
        power-iteration state."""
        if self._spec is None:
            raise SerializationError("this bound function does not record how it was compiled")
        model = copy.deepcopy(self._model, memo)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        new = _rebuild(model, self._spec, state)
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol: int):
        """Pickling (``pickle``, ``torch.save``): the model by value, how it was compiled, and the
        power-iteration state; unpickling compiles the model again (the rules that cover it must
        be registered, as at compile). ``torch.load(f, weights_only=False)`` reads it back."""
        if self._spec is None:
            raise SerializationError("this bound function does not record how it was compiled")
        if self._spec.rules is not None:
            try:
                pickle.dumps(self._spec.rules, protocol=protocol)
            except Exception as exc:  # noqa: BLE001 - pickle raises several kinds
                raise SerializationError(
                    "the rules passed to curvbound.compile(rules=...) cannot be pickled "
                    f"({type(exc).__name__}: {exc}). Define them at module level (not as "
                    "lambdas or local functions), or register them with @curvbound.rule when "
                    "your module is imported and compile without rules=."
                ) from exc
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return (_rebuild, (self._model, self._spec, state))

    def _apply(self, fn, recurse: bool = True):
        # bf.to(device) / .cuda() / .double() move the model too: generated code reads the
        # model's live parameters and the bound function's buffers together
        self._model._apply(fn)
        self.gm._apply(fn)  # root-level attributes of the traced graph (shared submodules moved)
        return super()._apply(fn, recurse)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample input shape the bound was compiled for (batch dimension dropped)."""
        if self._spec is not None:
            return tuple(self._spec.input_shape[1:])
        x = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        return tuple(x.meta["tensor_meta"].shape[1:])

    def check_input(self, x: object, name: str = "x") -> Tensor:
        """Raise :class:`~curvbound.InputError` unless ``x`` is a finite floating-point batch
        ``(B, *input_shape)`` of the compiled input shape; the message names the first bad
        sample. Returns ``x``."""
        want = self.input_shape
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InputError(
                f"{name} must be a floating-point tensor (B, {', '.join(map(str, want))}), got "
                f"{type(x).__name__}{'' if not isinstance(x, Tensor) else ' ' + str(x.dtype)}"
            )
        if tuple(x.shape[1:]) != want or x.dim() != len(want) + 1:
            raise InputError(
                f"{name} has shape {tuple(x.shape)}, but the bound was compiled for inputs "
                f"(B, {', '.join(map(str, want))}); pass a batch of such samples (x[None] for "
                "one sample)."
            )
        check_finite_samples(x, name)
        return x

    def _check_params(self, exc: BaseException | None = None) -> None:
        """Raise :class:`~curvbound.ModelStateError` naming every non-finite parameter/buffer."""
        bad = []
        for name, t in list(self._model.named_parameters()) + list(self._model.named_buffers()):
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                bad.append(f"'{name}' ({int((~torch.isfinite(t)).sum())} non-finite)")
        if bad:
            raise ModelStateError(
                "the model has NaN/inf values in " + ", ".join(bad) + "; its bound is "
                "meaningless. Check the training run (learning rate, loss) or the checkpoint."
            ) from exc

    def _check_values(self, _transfers=None) -> None:
        """Evaluate once and raise :class:`~curvbound.RuleError` naming the node and rule whose
        bound is negative or NaN (compile calls it)."""
        with torch.no_grad():
            q = {k: v for k, v in self.quantities.items()}
            try:
                _, _, nodes = self._fn(q)
            except Exception as exc:  # noqa: BLE001 - NaN weights surface as several errors
                self._check_params(exc)
                raise
        fx_nodes = {n.name: n for n in self.gm.graph.nodes}
        for nb in self._node_info:
            if nb.name not in nodes:
                continue
            L, M = (float(v) for v in nodes[nb.name])
            inputs_smooth = all(
                math.isfinite(float(nodes[i][1])) for i in nb.inputs if i in nodes
            )
            bad = [
                f"{k} = {v}" for k, v in (("L", L), ("M", M))
                if v < 0 or (math.isnan(v) and (k == "L" or inputs_smooth))
            ]
            if bad:
                self._check_params()
                where = node_label(fx_nodes[nb.name]) if nb.name in fx_nodes else nb.name
                raise RuleError(
                    f"rule {nb.rule} gave {', '.join(bad)} for {where} (fx node '{nb.name}'): a "
                    "bound must be ≥ 0 and not NaN. Check the rule and its constants."
                )

    # -- evaluation -----------------------------------------------------------------------------
    def forward(self, refresh: int = 0) -> Bounds:
        """Evaluate the bounds; ``refresh=k`` first advances every power iteration by k steps.

        Raises :class:`~curvbound.StaleBoundError` when the model's structure changed since
        compile, :class:`~curvbound.ModelStateError` when its parameters hold NaN/inf.
        """
        self.check_model()
        try:
            if refresh:
                self.refresh(refresh)
            q = {k: v for k, v in self.quantities.items()}
            with shared_evaluation():  # every quantity evaluated once per call (runtime/norms)
                L, M, nodes = self._fn(q)
        except (ValueError, RuntimeError) as exc:  # e.g. a certified SVD of a NaN matrix
            self._check_params(exc)
            raise
        if _nonfinite(L, M):
            self._check_params()
        if self.norms == "certified" and self._rounding:
            # rounding of the generated float64 arithmetic, bounded explicitly (compiler/rounding)
            f = self._rounding
            nodes = {k: (a * f[k][0], b * f[k][1]) for k, (a, b) in nodes.items()}
            L, M = nodes[self.output]
        L, M = _tensor(L), _tensor(M)
        nodes = {k: (_tensor(a), _tensor(b)) for k, (a, b) in nodes.items()}
        error = self._errors(q).get(self.output, _zero())
        out = Bounds(L, M, self.certified, nodes, error)
        self._last = Bounds(
            L.detach(),
            M.detach(),
            out.certified,
            {k: (a.detach(), b.detach()) for k, (a, b) in nodes.items()},
            error.detach(),
        )
        return out

    def _errors(self, q) -> dict[str, Tensor]:
        """Each node's implementation error (see :class:`Bounds`), rounded up when certified."""
        if self._error_fn is None:
            return {}
        raw = self._error_fn(q)
        f = self._error_factors if self.norms == "certified" else {}
        return {k: _tensor(v) * f.get(k, 1.0) for k, v in raw.items()}

    def smooth_twin(self, dtype: torch.dtype | None = None) -> fx.GraphModule:
        """A copy of the traced model with every switching activation replaced by its smooth
        function (``nn.Softplus``/``F.softplus`` → softplus without its threshold): the map whose
        constants ``bf()`` reports. It is the model itself (a copy) when ``bf().error`` is 0.

        Example:
            >>> import torch, curvbound
            >>> net = torch.nn.Sequential(torch.nn.Softplus(threshold=5))
            >>> twin = curvbound.compile(net, torch.zeros(1, 1)).smooth_twin()
            >>> x = torch.tensor([[5.5]])
            >>> float(net(x)), round(float(twin(x)), 6)  # torch returns x above the threshold
            (5.5, 5.504078)
        """
        g = copy.deepcopy(self.gm)
        substitute_twins(g, self._twins)
        return g if dtype is None else g.to(dtype)

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
        self.check_model()
        return margins(self, differentiable=differentiable, pair_steps=pair_steps)

    def node_certified(self, name: str) -> bool:
        """Whether node ``name``'s bounds are guaranteed (every quantity upstream is certified)."""
        return self._node_certified.get(name, False)

    @torch.no_grad()
    def refresh(
        self,
        steps: int | None = None,
        *,
        tol: float = 1e-6,
        max_steps: int = 2000,
        progress: bool | None = None,
    ) -> int:
        """Advance the warm-started power iterations.

        ``steps=k`` runs exactly k steps of every estimate. ``steps=None`` converges them
        (:func:`~curvbound.runtime.converge.converge`): batched restarted Lanczos cycles until
        the output's L and M change by at most ``tol`` (relative) over a cycle, at most
        ``max_steps`` steps (a warning says so when that is reached first); a progress bar
        (tqdm) appears after a second or two, or always with ``progress=True``. The estimates
        stay from below. Returns the steps run; ``self.last_convergence`` holds the report.
        """
        norms = [q for q in self.quantities.values() if isinstance(q, Norm) and not q.certified]
        blocks = [q for q in self.quantities.values()
                  if isinstance(q, HadamardNorm) and not q.certified]
        if steps is not None:
            for q in norms + blocks:
                q.step(steps)
            return steps
        for q in blocks:  # the block norms' eigenvectors directly (one small eigensolve each)
            q.settle()

        # quantities without iteration state (e.g. the eigenvalue of a block norm) once
        static = {id(q): q() for q in self.modules() if isinstance(q, Quantity) and q.static}

        def bound() -> tuple[float, float]:
            with shared_evaluation(static):
                out = self.forward()
            return float(out.lipschitz), float(out.curvature)

        report = converge(norms, bound, tol=tol, max_steps=max_steps, progress=progress,
                          known=static)
        self.last_convergence = report
        return report.steps

    def compiled(self, backend: str | Callable = "inductor", **options: Any) -> CompiledBound:
        """This bound under ``torch.compile``: a :class:`CompiledBound`, called like ``bf``
        (``cb()``, ``cb(refresh=k)``), evaluating the power/Lanczos steps and the bound code as
        one captured graph (no graph breaks, no recompiles across calls with the same ``k``).
        Estimate mode only (certified norms are exact float64 computations, cached: an
        :class:`~curvbound.InputError` says so). ``backend`` and ``options`` go to
        :func:`torch.compile`; ``"eager"``/``"aot_eager"`` check capture without code
        generation.

        Example:
            >>> import torch, curvbound
            >>> net = curvbound.zoo.mlp([4, 8, 3], torch.nn.Tanh)
            >>> cb = curvbound.compile(net, torch.zeros(1, 4)).compiled(backend="eager")
            >>> cb(refresh=1)
            Bounds(lipschitz=..., curvature=..., estimated)
        """
        return CompiledBound(self, backend, **options)

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
        """Nodes that are not C¹ themselves (ReLU, max-pool...): why the curvature is infinite,
        named by module path and type (``layers.3 (ReLU)``)."""
        fx_nodes = {n.name: n for n in self.gm.graph.nodes}
        return [
            node_label(fx_nodes[n.name]) if n.name in fx_nodes else n.name
            for n in self._node_info
            if n.nonsmooth
        ]

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

        M_out = Σ_k (∂M_out/∂M_k)·I_k, where I_k is node k's own term: its bound minus what it
        carries from its inputs' curvatures, Σ_i (∂M_k/∂M_i)·M_i (each rule is affine in the
        inputs' curvatures on the active argument of its minima). The share of node k is that
        summand over M_out; it is 0 for nodes that create no curvature (linear maps, sums),
        however large their M.
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


class CompiledBound:
    """``torch.compile`` of an estimate-mode bound function; create it with
    :meth:`BoundFunction.compiled <curvbound.compiler.bound_function.BoundFunction.compiled>`.

    Same values as ``bf(refresh=k)`` up to float rounding, the same gradients in the model's
    parameters, the same power-iteration state (the buffers of ``bf``, advanced in place).
    ``backend`` and the other keyword arguments go to :func:`torch.compile`; the first call of
    each distinct ``refresh`` compiles (seconds with ``"inductor"``).

    Example:
        >>> import torch, curvbound
        >>> net = curvbound.zoo.mlp([4, 8, 3], torch.nn.Tanh)
        >>> bf = curvbound.compile(net, torch.zeros(1, 4))
        >>> cb = bf.compiled(backend="eager")
        >>> a = cb(refresh=1)
        >>> b = bf()           # the same state, evaluated eagerly
        >>> bool(torch.allclose(a.curvature, b.curvature))
        True
    """

    def __init__(self, bf: BoundFunction, backend: str | Callable = "inductor", **options: Any):
        if bf.norms != "estimate":
            raise InputError(
                "bf.compiled() compiles estimate-mode bounds only: a certified bound "
                f"(norms={bf.norms!r}) is float64 exact SVDs and other one-off computations, "
                "cached until a parameter changes, so there is nothing to gain, and its "
                "soundness rests on the eager float64 arithmetic, which a compiler must not "
                "rewrite. Call bf() as it is, or compile with norms='estimate' for training."
            )
        self.bf = bf
        self.backend, self.options = backend, dict(options)
        self._setup()

    def _setup(self) -> None:
        # what the graphs step and read; again after bf.recompile() (new quantities)
        self._quantities = self.bf.quantities
        self._plan = StepPlan(list(self.bf.quantities.values()))
        self._fns: dict[int, Callable[[], tuple]] = {}

    def _entry(self, steps: int) -> Callable[[], tuple]:
        fn = self._fns.get(steps)
        if fn is None:
            bf, plan = self.bf, self._plan

            def bound() -> tuple:
                if steps:
                    plan.run(steps)
                q = dict(bf.quantities.items())
                with shared_evaluation():
                    L, M, nodes = bf._fn(q)
                    errors = bf._error_fn(q) if bf._error_fn is not None else {}
                return L, M, nodes, errors

            fn = torch.compile(bound, backend=self.backend, **self.options)
            self._fns[steps] = fn
        return fn

    def __call__(self, refresh: int = 0) -> Bounds:
        """Evaluate the bounds; ``refresh=k`` first advances every power iteration by k steps
        (inside the compiled graph). Raises what ``bf()`` raises on a changed or non-finite
        model."""
        if refresh < 0 or int(refresh) != refresh:
            raise InputError(f"refresh must be a whole number ≥ 0, got {refresh!r}")
        bf = self.bf
        bf.check_model()
        if bf.quantities is not self._quantities:
            self._setup()
        try:
            for q in self._plan.other:  # quantities with steps of their own: eagerly
                q.step(int(refresh))
            L, M, nodes, errors = self._entry(int(refresh))()
        except (ValueError, RuntimeError) as exc:
            bf._check_params(exc)
            raise
        if _nonfinite(L, M):
            bf._check_params()
        L, M = _tensor(L), _tensor(M)
        nodes = {k: (_tensor(a), _tensor(b)) for k, (a, b) in nodes.items()}
        error = _tensor(errors[bf.output]) if bf.output in errors else _zero()
        out = Bounds(L, M, bf.certified, nodes, error)
        bf._last = Bounds(
            L.detach(), M.detach(), out.certified,
            {k: (a.detach(), b.detach()) for k, (a, b) in nodes.items()}, error.detach(),
        )
        return out

    def __repr__(self) -> str:
        return f"CompiledBound({self.bf!r}, backend={self.backend!r})"


def _rebuild(model: nn.Module, spec: CompileSpec, state: dict[str, Tensor]) -> BoundFunction:
    """Compile ``model`` with ``spec`` and load the saved power-iteration ``state`` (unpickling,
    deep copies, ``curvbound.load``)."""
    bf = spec.compile(model, refresh=False)
    mine = bf.state_dict()
    if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in state):
        raise SerializationError(
            "the saved bound function's state does not fit the bound compiled now for this "
            f"model (saved {len(state)} entries, compiled {len(mine)}): the model or the "
            "registered rules differ from those at save time. Compile it afresh instead."
        )
    bf.load_state_dict(state)
    return bf


def check_finite_samples(x: Tensor, name: str = "x") -> None:
    """Raise :class:`~curvbound.InputError` naming the first sample of ``x`` with NaN/inf."""
    if x.is_meta:
        raise InputError(f"{name} is on the meta device: it has no values")
    finite = torch.isfinite(x.detach()).reshape(len(x), -1).all(dim=1) if len(x) else None
    if finite is not None and not bool(finite.all()):
        bad = (~finite).nonzero()[:, 0]
        shown = ", ".join(str(int(i)) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise InputError(
            f"{name} has NaN or inf values in {len(bad)} sample(s), first at index {int(bad[0])} "
            f"(samples {shown}); nothing was computed. Remove or fix those samples."
        )


def _nonfinite(L: Any, M: Any) -> bool:
    """NaN in either bound, or an infinite Lipschitz bound (curvature may be ∞: not C¹)."""
    lv = L.detach() if isinstance(L, Tensor) else torch.tensor(float(L))
    mv = M.detach() if isinstance(M, Tensor) else torch.tensor(float(M))
    return bool(torch.isnan(lv).any() or torch.isnan(mv).any() or torch.isinf(lv).any())


def _tensor(v) -> Tensor:
    # float64: a float32 tensor would round a Python number (a float64 bound) down half the time
    return v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
