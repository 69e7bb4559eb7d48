"""What a rule returns (:class:`Transfer`) and what it may read (:class:`RuleContext`)."""

from __future__ import annotations

import operator
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx, nn

from ..runtime.norms import Norm, Quantity
from ..runtime.operators import Chain, Dense, FunctionOperator, LinearOperator
from .exprs import round_up
from .naming import node_label

__all__ = [
    "Transfer",
    "Elementwise",
    "RuleContext",
    "METHODS",
    "lipschitz_symbol",
    "curvature_symbol",
]

#: Methods a rule can be asked to serve (``compile(method=...)``): "naive" (products of norms),
#: "compositional" (the default: LipLT along chain segments, block rules, merged linear chains),
#: "paper" (the paper's Algorithm 1, passes/paper.py) and "crt" (Singla & Feizi, passes/crt.py).
METHODS = ("naive", "compositional", "paper", "crt")


#: Nonnegative symbols by name: sympy's own symbol cache is a bounded LRU, and past a few
#: thousand names (deep networks) every creation missed it and re-derived the assumptions.
_SYMBOLS: dict[str, sympy.Symbol] = {}


def nonnegative_symbol(name: str) -> sympy.Symbol:
    """``sympy.Symbol(name, nonnegative=True)`` (the same object: equal, hashed alike), memoised."""
    sym = _SYMBOLS.get(name)
    if sym is None:
        sym = _SYMBOLS[name] = sympy.Symbol(name, nonnegative=True)
    return sym


def lipschitz_symbol(name: str) -> sympy.Symbol:
    return nonnegative_symbol(f"L_{name}")


def curvature_symbol(name: str) -> sympy.Symbol:
    return nonnegative_symbol(f"M_{name}")


@dataclass(frozen=True)
class Transfer:
    """A node's transfer: its bounds as sympy expressions of its inputs' bound symbols.

    ``lipschitz``/``curvature`` use the symbols returned by :meth:`RuleContext.L` and
    :meth:`RuleContext.M` for the node's inputs and the keys of ``quantities`` (numbers computed at
    run time, e.g. spectral norms). ``operator`` and ``source`` are set by affine nodes
    (v = A·source + b) so that a consumer can apply a block rule; ``nonsmooth`` marks nodes whose
    curvature is infinite.
    """

    lipschitz: sympy.Expr
    curvature: sympy.Expr
    quantities: Mapping[sympy.Symbol, Quantity] = field(default_factory=dict)
    operator: LinearOperator | None = None
    source: fx.Node | None = None
    nonsmooth: bool = False
    note: str = ""
    #: set by elementwise activations (v = σ(input)): LipLT and the block rules read it
    elementwise: Elementwise | None = None
    #: set on affine nodes: how to fold a margin vector c into the node (runtime/margins.py)
    margin: Any = None
    #: Lipschitz factors of the node's value in the values of the nodes it reads:
    #: ‖v(u) − v(u')‖ ≤ Σ_k gains[u_k]·‖u_k − u_k'‖ (for an affine node, the key is its
    #: ``source`` and the factor ‖A‖). The compiler carries implementation errors (``error``)
    #: through them; None: unknown (an error upstream then makes the node's error ∞).
    gains: Mapping[fx.Node, sympy.Expr] | None = None
    #: the node's own implementation error in ℓ2: a bound of sup ‖ṽ − v‖ over the values of its
    #: inputs, where ṽ is what torch computes and v the smooth map that ``lipschitz`` and
    #: ``curvature`` bound (softplus's threshold switch); 0 for nodes computing v itself
    error: sympy.Expr = sympy.Integer(0)
    #: the smooth map v as a function of the node's single input tensor, when ``error`` > 0: the
    #: certificates run the model's smooth twin with it (apps/certificates.py)
    twin: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: set on linear merges (sums, differences, concatenations): v = Σ_k P_k(parts_k) + const
    #: with P_k a linear map from the part's shape to the node's; an affine consumer A then
    #: distributes over the parts (A·v = Σ_k (A∘P_k)(parts_k), passes/distribute.py)
    parts: tuple[tuple[fx.Node, LinearOperator], ...] | None = None


@dataclass(frozen=True)
class Elementwise:
    """What an elementwise activation v = σ(input) tells its consumers: sup|σ'| (``slope``),
    sup|σ''| (``curvature``) and proven bounds ``lo ≤ σ' ≤ hi`` (the slope range LipLT needs).
    ``second``: proven global bounds (a, b) with a ≤ σ'' ≤ b everywhere for a C² activation (the
    sign structure one-sided margin curvature uses), None when unknown (then (−c, c) with c the
    global sup|σ''|)."""

    input: fx.Node
    slope: sympy.Expr
    curvature: sympy.Expr
    lo: sympy.Expr
    hi: sympy.Expr
    name: str = "σ"
    second: tuple[sympy.Expr, sympy.Expr] | None = None


#: A pass that refines the transfer of an affine node: ``refine(ctx, transfer) -> transfer``. The
#: pipeline installs them (``curvbound.pipeline.REFINERS``); the core never names one.
Refiner = Callable[["RuleContext", Transfer], Transfer]


class RuleContext:
    """Read-only view a rule gets of its node, the model and the transfers computed so far.

    ``anchor`` is set by ``compile(..., anchored=True)``: an
    :class:`~curvbound.runtime.anchored.AnchorState` through which activation rules create
    per-sample anchored quantities (theory §7); None for global bounds. ``refiners`` are the
    passes that refine every affine transfer (:meth:`linear` applies them in order).
    """

    def __init__(
        self,
        node: fx.Node,
        root: nn.Module,
        *,
        method: str,
        norms: str,
        transfers: Mapping[fx.Node, Transfer],
        constants: set[fx.Node],
        anchor: Any = None,
        refiners: Sequence[Refiner] = (),
    ):
        self.node, self.root, self.method, self.norms = node, root, method, norms
        self._transfers, self._constants = transfers, constants
        self.anchor = anchor
        self.refiners = tuple(refiners)

    # -- the node -------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module | None:
        """The called module, for ``call_module`` nodes."""
        if self.node.op == "call_module":
            return self.root.get_submodule(self.node.target)
        return None

    def arg(self, position: int | None, name: str | None = None, default: Any = None) -> Any:
        """An argument of the node by position or keyword, with a default."""
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        if position is not None and position < len(self.node.args):
            return self.node.args[position]
        return default

    def tensor_inputs(self) -> list[fx.Node]:
        """The node's inputs that depend on the network input, in argument order."""
        out: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: out.append(n) or n)
        seen: list[fx.Node] = []
        for n in out:
            if n not in self._constants and n not in seen:
                seen.append(n)
        return seen

    def input(self) -> fx.Node:
        """The single input-dependent argument (rules for unary ops use this)."""
        ins = self.tensor_inputs()
        if len(ins) != 1:
            raise ValueError(
                f"expected exactly one input-dependent argument, found {[n.name for n in ins]}"
            )
        return ins[0]

    def is_constant(self, value: Any) -> bool:
        """True for Python numbers and nodes whose value does not depend on the network input."""
        return not isinstance(value, fx.Node) or value in self._constants

    def shape(self, n: fx.Node | None = None) -> tuple[int, ...]:
        """Per-sample shape (batch dimension dropped) of a node's tensor value."""
        meta = (n or self.node).meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ValueError(f"node '{(n or self.node).name}' has no tensor shape")
        return tuple(meta.shape[1:])

    def value(self, n: Any) -> Any:
        """The concrete value of a constant argument (numbers as is, get_attr tensors live)."""
        if not isinstance(n, fx.Node):
            return n
        if n.op == "get_attr":
            obj: Any = self.root
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if "constant_value" in n.meta:
            return n.meta["constant_value"]
        raise ValueError(f"argument '{n.name}' is not a constant this rule can read")

    def live(self, n: Any) -> Callable[[], Any]:
        """A getter of a constant argument's *current* value, recomputed from the live parameters
        on every call: a parameter (``get_attr``) or a value computed from parameters in forward
        (a weight-normalised ``g·v/‖v‖``, a transposed weight). Python values are returned as is.

        Raises ValueError (with the reason) for values that depend on random draws or on the
        input's values.
        """
        if not isinstance(n, fx.Node):
            return lambda: n
        if n not in self._constants:
            raise ValueError(f"argument '{n.name}' depends on the network input")
        order: list[fx.Node] = []
        seen: set[fx.Node] = set()

        def visit(m: fx.Node) -> None:
            if m in seen:
                return
            seen.add(m)
            for i in m.all_input_nodes:
                visit(i)
            order.append(m)

        visit(n)
        for m in order:
            if m.op in ("call_function", "call_method") and _is_random(m):
                raise ValueError(
                    f"argument '{n.name}' is computed with a random draw ('{m.name}'): the "
                    "model is not a fixed function"
                )
        root, graph_order = self.root, order

        def get() -> Any:
            env: dict[fx.Node, Any] = {}
            for m in graph_order:
                if m.op == "get_attr":
                    obj: Any = root
                    for part in m.target.split("."):
                        obj = getattr(obj, part)
                    env[m] = obj
                elif m.op == "placeholder" and m.args:  # an argument left at its default
                    env[m] = m.args[0]
                elif m.op == "placeholder":  # the input: only its shape is read (x.size())
                    meta = m.meta.get("tensor_meta")
                    env[m] = torch.empty(tuple(meta.shape), dtype=meta.dtype, device="meta")
                else:
                    args, kwargs = fx.node.map_arg((m.args, m.kwargs), lambda a: env[a])
                    if m.op == "call_function":
                        env[m] = m.target(*args, **kwargs)
                    elif m.op == "call_method":
                        env[m] = getattr(args[0], m.target)(*args[1:], **kwargs)
                    else:
                        env[m] = root.get_submodule(m.target)(*args, **kwargs)
            return env[n]

        return get

    # -- the inputs' bounds ---------------------------------------------------------------------
    def transfer(self, n: fx.Node) -> Transfer:
        """The transfer already computed for an input node (read-only)."""
        return self._transfers[n]

    def L(self, n: Any) -> sympy.Expr:
        """Symbol of an input's Lipschitz bound (0 for constants, the number itself if known)."""
        if self.is_constant(n):
            return sympy.Integer(0)
        t = self._transfers[n]
        return t.lipschitz if t.lipschitz.is_number else lipschitz_symbol(n.name)

    def M(self, n: Any) -> sympy.Expr:
        """Symbol of an input's curvature bound (0 for constants, ∞ for non-smooth inputs)."""
        if self.is_constant(n):
            return sympy.Integer(0)
        t = self._transfers[n]
        return t.curvature if t.curvature.is_number else curvature_symbol(n.name)

    # -- building transfers ---------------------------------------------------------------------
    def symbol(self, kind: str) -> sympy.Symbol:
        """A quantity symbol named after this node, e.g. ``norm_fc1``."""
        return nonnegative_symbol(f"{kind}_{self.node.name}")

    def norm(self, op: LinearOperator, kind: str = "norm") -> tuple[sympy.Symbol, Norm]:
        """A spectral-norm quantity of ``op`` in this compile's norm mode, and its symbol."""
        seed = zlib.crc32(f"{self.node.name}/{kind}".encode())  # deterministic across runs
        dtype = self.node.meta.get("tensor_meta").dtype if "tensor_meta" in self.node.meta else None
        sym = self.symbol(kind)
        q = Norm(op, self.norms, seed=seed, label=op.describe(), dtype=dtype)
        if self.norms == "certified":
            try:
                q()  # computed (and cached) now, so that a missing certificate shows at compile
            except NotImplementedError as exc:
                # No guaranteed bound exists for this structure: say so rather than fail, and
                # fall back to an estimate that makes Bounds.certified False.
                q = Norm(op, "estimate", seed=seed, label=op.describe(), dtype=dtype)
                q.note = f"{sym} is a power-iteration ESTIMATE, not a bound: {exc}"
                warnings.warn(f"{node_label(self.node)}: {q.note}", stacklevel=2)
        return sym, q

    def dense(self, weight: Callable[[], torch.Tensor], source: fx.Node | None = None) -> Transfer:
        """Transfer of v = W·source + b for a live weight getter (a user's linear layer).

        Unlike a plain function, a dense weight exposes its rows, so a following activation can
        use the row-norm block rule.
        """
        source = source if source is not None else self.input()
        return self.linear(Dense(weight, self.shape(source), self.shape(), self.node.name), source)

    def linear(
        self,
        op: LinearOperator | Callable[[torch.Tensor], torch.Tensor],
        source: fx.Node | None = None,
        *,
        norm: float | sympy.Expr | None = None,
    ) -> Transfer:
        """Transfer of an affine node v = A(source) + b: L_v = ‖A‖·L_s, M_v = ‖A‖·M_s.

        ``op`` is a :class:`LinearOperator` or a bias-free linear function of the batched input.
        Pass ``norm`` when ‖A‖ is a known exact constant (no quantity is created). With
        ``method="compositional"`` a chain of affine nodes is merged: the norm is that of the
        composed map, which is often far below the product of the parts' norms.
        """
        source = source if source is not None else self.input()
        if not isinstance(op, LinearOperator):
            op = FunctionOperator(op, self.shape(source), self.shape(), label=self.node.name)
        if isinstance(op, FunctionOperator) and op.norm_bound is None and norm is not None:
            known = sympy.sympify(norm)
            if known.is_number:  # the rule's exact norm also serves the op inside merged chains
                value = round_up(known)
                op.norm_bound = lambda: torch.tensor(value, dtype=torch.float64)
        ops: list[LinearOperator] = [op]
        src = source
        merged = False
        if self.method != "naive":
            prev = self._transfers.get(source)
            if prev is not None and prev.operator is not None and prev.source is not None:
                inner = prev.operator
                ops = [*(inner.ops if isinstance(inner, Chain) else [inner]), op]
                src, merged = prev.source, True
        chain = Chain.of(ops) if merged else op
        if merged and op.isometric:  # a reshape after an affine chain: same norm, no new quantity
            gains = prev.gains if prev.gains is not None else None
            return Transfer(
                prev.lipschitz, prev.curvature, {}, chain, src, note=prev.note, gains=gains
            )
        if norm is not None and not merged:
            n = sympy.sympify(norm)
            return Transfer(n * self.L(src), n * self.M(src), {}, chain, src, gains={src: n})
        if merged and isinstance(chain, Chain) and not chain.core:
            n = sympy.Integer(1)
            return Transfer(n * self.L(src), n * self.M(src), {}, chain, src, gains={src: n})
        sym, q = self.norm(chain)
        note = f"merged: {chain.describe()}" if merged else ""
        t = Transfer(
            sym * self.L(src), sym * self.M(src), {sym: q}, chain, src, note=note, gains={src: sym}
        )
        # passes that refine an affine transfer (LipLT, block rules: passes/lipschitz_lt.py) run
        # here, in the order the pipeline installed them
        for refine in self.refiners:
            t = refine(self, t)
        return t


_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
    torch.multinomial, torch.rand_like, torch.randn_like, torch.randint_like, torch.poisson,
}
_RANDOM_METHODS = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_"}


def _is_random(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.target in _RANDOM:
        return True
    name = getattr(node.target, "__name__", "")
    return "dropout" in name and bool(node.kwargs.get("training", True))


def is_reduction_free_getitem(node: fx.Node) -> bool:
    """True when ``x[idx]`` keeps the batch dimension whole (idx starts with ':' or '...')."""
    if node.target is not operator.getitem:
        return False
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    first = idx[0] if idx else slice(None)
    return first is Ellipsis or first == slice(None, None, None)
