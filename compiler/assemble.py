"""Propagation: attach a rule to every node and build its symbolic transfer (theory §2).

The pass walks the fx node list (already topological), asks the registry's rules for each node's
:class:`~curvbound.compiler.context.Transfer`, and writes one frozen :class:`NodeBound` per node
under ``node.meta[BOUND_KEY]``.
"""

from __future__ import annotations

import builtins
import dataclasses
import keyword
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import sympy
from torch import fx, nn

from .context import Refiner, RuleContext, Transfer, curvature_symbol, lipschitz_symbol
from .errors import (
    DiscontinuityError,
    InputError,
    MissingRule,
    RuleError,
    UnsupportedOperationError,
)
from .naming import node_label
from .registry import Registry, rule_name, rules_for, target_name

__all__ = [
    "BOUND_KEY",
    "NodeBound",
    "Decline",
    "find_constants",
    "check_coverage",
    "propagate",
]

BOUND_KEY = "curvbound.bound"

#: Ops whose result depends only on the input's shape, never on its values.
SHAPE_QUERIES = {"size", "dim", "numel", "ndimension", "nelement"}
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


class Decline(Exception):
    """Raised by a rule to decline a node *with a reason* (returning None declines silently)."""


@dataclass(frozen=True)
class NodeBound:
    """The bound attached to one node: local sympy expressions in its inputs' symbols."""

    name: str
    op: str
    target: str
    rule: str
    lipschitz: sympy.Expr
    curvature: sympy.Expr
    quantities: tuple[str, ...]
    certified: bool
    nonsmooth: bool
    constant: bool
    inputs: tuple[str, ...]
    refs: tuple[str, ...] = ()
    note: str = ""
    #: bound of sup_x ‖ṽ(x) − v(x)‖ (torch's value minus the smooth map's) as an expression of
    #: the inputs' ``E_<name>`` symbols and quantities: 0 unless a switching activation is
    #: upstream (:func:`error_expressions`)
    error: sympy.Expr = sympy.Integer(0)


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in SHAPE_QUERIES:
        return True
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in SHAPE_ATTRS
    )


def find_constants(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values do not depend on the values of the network input."""
    constants: set[fx.Node] = set()
    first = True
    for node in graph.nodes:
        if node.op == "placeholder":
            if not first and node.args:  # a further argument left at its default value
                constants.add(node)
            first = False
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr" or _is_shape_query(node):
            constants.add(node)
            continue
        if all(i in constants for i in node.all_input_nodes):
            constants.add(node)
    return constants


def _describe_target(node: fx.Node, root: nn.Module) -> tuple[str, str | None, str]:
    """(target name, module path, ready-to-paste registration hint)."""
    note = ""
    if node.op == "call_module":
        cls = type(root.get_submodule(node.target))
        name = f"{cls.__module__}.{cls.__qualname__}"
        if "<locals>" in cls.__qualname__:  # a class defined in a function: use its name there
            key = cls.__name__
            note = f"  # {cls.__name__}: the class defined in {cls.__qualname__.split('.<')[0]}\n"
        else:
            key = name if cls.__module__ != "__main__" else cls.__qualname__
        path = node.target
        raw = cls.__name__
    elif node.op == "call_method":
        name, key, path = f"method '{node.target}'", repr(node.target), None
        raw = node.target
    else:
        name = target_name(node.target)
        key, path = name, None
        raw = getattr(node.target, "__name__", "my")
    root_mod = key.split(".")[0] if "." in key and not key.startswith("'") else ""
    imports = f"import {root_mod}\n" if root_mod and root_mod != "curvbound" else ""
    hint = (
        f"{imports}import curvbound\n{note}"
        f"@curvbound.rule({key})\n"
        f"def {_identifier(raw)}_rule(node, ctx):\n"
        f"    # elementwise smooth map:  return curvbound.rules.elementwise(slope=..., "
        f"curvature=...)(node, ctx)\n"
        f"    # linear map (bias-free f): return ctx.linear(lambda x: f(x))\n"
        f"    ..."
    )
    return name, path, hint


def _identifier(raw: str) -> str:
    """A valid, readable Python function-name stem from a target name (``MyAct`` -> ``myact``)."""
    fn = "".join(c if c.isalnum() else "_" for c in str(raw).split(".")[-1]).strip("_").lower()
    if not fn:
        return "my"
    if fn[0].isdigit() or keyword.iskeyword(fn):
        fn = f"op_{fn}"
    return fn


def _declined_hint(node: fx.Node, root: nn.Module, hint: str) -> str:
    """The hint for a node whose target has rules that all declined: a rule registered on that
    target would apply to every such call (every product, for operator.mul)."""
    if node.op == "call_module":
        return hint
    name = target_name(node.target)
    return (
        f"{name} already has rules, and they declined this call. A rule you register for "
        f"{name} is tried first for EVERY {name} call of the model: return None from it for\n"
        "the calls it does not handle, or move this computation into a submodule and register "
        "a rule for that module class:\n" + hint
    )


def _reads_result(node: fx.Node) -> bool:
    """``getattr(r, 'values')`` / ``r[0]`` reading a field of another node's result."""
    return node.op == "call_function" and node.target in (builtins.getattr, operator.getitem)


def check_coverage(
    gm: fx.GraphModule, registry: Registry, constants: set[fx.Node]
) -> list[MissingRule]:
    """Every input-dependent call node without a candidate rule (the pre-flight check)."""
    missing: list[MissingRule] = []
    uncovered: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node in constants:
            continue
        if _reads_result(node) and node.args and node.args[0] in uncovered:
            # `.values` of an uncovered torch.sort: the fix is a rule for sort, not for getattr
            uncovered.add(node)
            continue
        if not rules_for(node, gm, registry):
            uncovered.add(node)
            name, path, hint = _describe_target(node, gm)
            readers = [u for u in node.users if _reads_result(u)]
            reason = "no rule is registered for it"
            if readers:
                fields = ", ".join(repr(u.args[1]) for u in readers if len(u.args) > 1)
                reason += (
                    f" (its result is a tuple; the model reads field(s) {fields} of it: the "
                    "rule describes the map to the field(s) used)"
                )
            missing.append(
                MissingRule(node.name, node.op, name, path, hint, reason, node_label(node))
            )
    return missing


def _has_inf(expr: sympy.Expr) -> bool:
    return expr.has(sympy.oo) or expr.has(sympy.zoo)


def propagate(
    gm: fx.GraphModule,
    registry: Registry,
    *,
    method: str,
    norms: str,
    constants: set[fx.Node],
    anchor: object | None = None,
    refiners: Sequence[Refiner] = (),
) -> tuple[dict[fx.Node, Transfer], dict[fx.Node, str], fx.Node]:
    """Compute every node's transfer; returns (transfers, rule names, the output's value node).

    ``anchor``: the :class:`~curvbound.runtime.anchored.AnchorState` of an anchored compile,
    handed to every rule as ``ctx.anchor``; ``refiners``: the passes every affine transfer goes
    through (``ctx.refiners``).
    """
    transfers: dict[fx.Node, Transfer] = {}
    rules: dict[fx.Node, str] = {}
    declined: list[MissingRule] = []
    zero = sympy.Integer(0)
    out_node: fx.Node | None = None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node in constants:
            transfers[node], rules[node] = Transfer(zero, zero), "constant"
            continue
        if node.op == "placeholder":
            if node is not placeholders[0]:
                raise InputError(
                    f"the model's forward takes more than one input ('{node.name}'); curvbound "
                    "bounds maps of one tensor. Wrap the model so that forward(x) takes one tensor."
                )
            transfers[node], rules[node] = Transfer(sympy.Integer(1), zero), "input"
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise InputError(_output_message(out))
            if out in constants:
                raise InputError("the model's output does not depend on its input")
            out_node = out
            continue
        if node in constants:
            transfers[node], rules[node] = Transfer(zero, zero), "constant"
            continue
        ctx = RuleContext(
            node,
            gm,
            method=method,
            norms=norms,
            transfers=transfers,
            constants=constants,
            anchor=anchor,
            refiners=refiners,
        )
        result, reasons = None, []
        for fn in rules_for(node, gm, registry):
            try:
                result = fn(node, ctx)
            except Decline as d:
                reasons.append(f"{rule_name(fn)}: {d}")
                result = None
            except DiscontinuityError:
                raise  # names the node and the fix already (torch's softplus threshold)
            except Exception as exc:
                raise RuleError(
                    f"rule {rule_name(fn)} failed on {node_label(node)} (fx node '{node.name}', "
                    f"{node.op} {_describe_target(node, gm)[0]}): {type(exc).__name__}: {exc}"
                ) from exc
            if result is not None:
                result = _check_transfer(result, fn, node)
                rules[node] = rule_name(fn)
                break
        if result is None:
            name, path, hint = _describe_target(node, gm)
            why = "; ".join(reasons) if reasons else "every candidate rule declined it"
            declined.append(
                MissingRule(
                    node.name,
                    node.op,
                    name,
                    path,
                    _declined_hint(node, gm, hint),
                    reason=why,
                    label=node_label(node),
                )
            )
            transfers[node] = Transfer(sympy.oo, sympy.oo)
            continue
        if _has_inf(result.curvature) or result.nonsmooth:
            result = dataclasses.replace(  # keeps every other field (elementwise, margin...)
                result,
                curvature=sympy.oo,
                nonsmooth=result.nonsmooth or _own_nonsmooth(result, ctx),
            )
        transfers[node] = result
    if declined:
        raise UnsupportedOperationError(declined)
    assert out_node is not None
    return transfers, rules, out_node


def _output_message(out: object) -> str:
    if isinstance(out, dict):
        keys = ", ".join(repr(k) for k in list(out)[:6])
        return (
            f"the model returns a dict with keys {keys}; curvbound bounds a map to one tensor. "
            "Wrap the model to return the entry to bound, e.g. forward(x): return "
            f"model(x)[{next(iter(out), 'key')!r}]."
        )
    if isinstance(out, (tuple, list)):
        return (
            f"the model returns a {type(out).__name__} of {len(out)} values; curvbound bounds a "
            "map to one tensor. Wrap the model to return the tensor to bound, e.g. forward(x): "
            "return model(x)[0]."
        )
    return (
        f"the model returns {type(out).__name__}, not one tensor; curvbound bounds a map to one "
        "tensor. Wrap the model to return the tensor to bound."
    )


def _check_transfer(result: object, fn, node: fx.Node) -> Transfer:
    """A rule must return a Transfer whose bounds can be bounds: not negative, not NaN."""
    where = f"{node_label(node)} (fx node '{node.name}')"
    if not isinstance(result, Transfer):
        raise RuleError(
            f"rule {rule_name(fn)} returned {type(result).__name__} {result!r:.40} for {where}; a "
            "rule must return a curvbound.Transfer (e.g. ctx.linear(...), "
            "curvbound.rules.elementwise(...)(node, ctx)) or None to decline."
        )
    fixed = {}
    for field_name in ("lipschitz", "curvature"):
        v = getattr(result, field_name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            fixed[field_name] = sympy.oo if v == float("inf") else sympy.sympify(v)
    if fixed:
        result = dataclasses.replace(result, **fixed)
    for kind, expr in (("Lipschitz", result.lipschitz), ("curvature", result.curvature)):
        if not isinstance(expr, sympy.Basic):
            raise RuleError(
                f"rule {rule_name(fn)} gave a {kind} bound of type {type(expr).__name__} for "
                f"{where}; Transfer fields are sympy expressions (wrap numbers with "
                "curvbound.rules.number)."
            )
        if expr.has(sympy.nan) or (expr.is_number and expr.is_extended_negative):
            raise RuleError(
                f"rule {rule_name(fn)} gave the {kind} bound {expr} for {where}: a bound must be "
                "≥ 0 and not NaN. Check the rule's constants (absolute values of sup|σ'|, "
                "sup|σ''|)."
            )
        if not expr.is_number and not _nonnegative(expr) and expr.is_extended_negative:
            raise RuleError(
                f"rule {rule_name(fn)} gave the {kind} bound {expr} for {where}, which is "
                "negative for nonnegative inputs; a bound must be ≥ 0."
            )
    return result


def _nonnegative(expr: sympy.Basic) -> bool:
    """True when ``expr`` is ≥ 0 by its structure: nonnegative symbols and numbers combined by
    +, ×, min, max, |·| and powers of nonnegative bases with real exponents. A cheap test that
    answers most bounds; False means "not shown" (sympy's assumptions then decide), never
    "negative". Walks the expression once (shared subexpressions once).

    >>> a = sympy.Symbol("a", nonnegative=True)
    >>> _nonnegative(2 * a + sympy.Max(a, 1) * a**-1), _nonnegative(a - 1)
    (True, False)
    """
    seen: dict[sympy.Basic, bool] = {}

    def walk(e: sympy.Basic) -> bool:
        if e in seen:
            return seen[e]
        if e.is_Symbol or e.is_Number:
            ok = e.is_nonnegative is True
        elif isinstance(e, sympy.Abs):
            ok = True
        elif isinstance(e, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
            ok = all(walk(a) for a in e.args)
        elif isinstance(e, sympy.Pow):
            base, exp = e.args
            ok = walk(base) and ((exp.is_Number and exp.is_real is True) or walk(exp))
        else:
            ok = False
        seen[e] = ok
        return ok

    return walk(expr)


def _own_nonsmooth(result: Transfer, ctx: RuleContext) -> bool:
    """True when the node itself (not an input) makes the curvature infinite."""
    return not any(ctx.M(i) == sympy.oo for i in ctx.tensor_inputs())


def error_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(f"E_{name}", nonnegative=True)


def error_expressions(
    gm: fx.GraphModule, transfers: dict[fx.Node, Transfer], constants: set[fx.Node]
) -> dict[fx.Node, sympy.Expr]:
    """Each node's implementation error: a bound of sup_x ‖ṽ(x) − v(x)‖.

    Here ṽ is the node's value in the model torch runs and v its value in the *smooth twin*,
    the same graph with every switching activation replaced by its smooth function (softplus
    without its threshold), whose constants the Lipschitz and curvature bounds are. With the
    node's own error e (``Transfer.error``) and its ``gains`` g_k:
    ‖ṽ − v‖ ≤ ‖h̃(ũ) − h(ũ)‖ + ‖h(ũ) − h(u)‖ ≤ e + Σ_k g_k‖ũ_k − u_k‖, so
    E_v = e + Σ_k g_k·E_{u_k}. A node whose gains are unknown gets ∞ when an input's error is
    not 0 (a bound without it would be wrong). Nodes with no error upstream get 0.
    """
    zero = sympy.Integer(0)
    errors: dict[fx.Node, sympy.Expr] = {}
    for node in gm.graph.nodes:
        t = transfers.get(node)
        if t is None or node in constants or node.op == "placeholder":
            if t is not None:
                errors[node] = zero
            continue
        own = sympy.sympify(t.error)
        upstream = [i for i in node.all_input_nodes if errors.get(i, zero) != 0]
        if not upstream:
            errors[node] = own
            continue
        gains = t.gains
        if gains is not None and t.source is not None and t.source in gains:
            # an affine node v = A·source + b, possibly a merged chain reading a node further
            # up: the nodes in between are affine (no error of their own), so E_source is all
            # that enters
            reads = [t.source]
        else:
            reads = upstream
        if gains is None or any(i not in gains for i in reads):
            errors[node] = sympy.oo
            continue
        total = own
        for u in reads:
            if errors.get(u, zero) != 0:
                total = total + gains[u] * error_symbol(u.name)
        errors[node] = total
    return errors


def node_bounds(
    gm: fx.GraphModule,
    transfers: dict[fx.Node, Transfer],
    rules: dict[fx.Node, str],
    constants: set[fx.Node],
) -> None:
    """Write one frozen :class:`NodeBound` per node under ``node.meta[BOUND_KEY]``."""
    names = {n.name for n in gm.graph.nodes}
    errors = error_expressions(gm, transfers, constants)
    for node in gm.graph.nodes:
        t = transfers.get(node)
        if t is None:
            continue
        syms = t.lipschitz.free_symbols | t.curvature.free_symbols
        refs = sorted({s.name[2:] for s in syms if s.name[:2] in ("L_", "M_")} & names)
        node.meta[BOUND_KEY] = NodeBound(
            name=node.name,
            op=node.op,
            target=(
                _describe_target(node, gm)[0] if node.op.startswith("call") else str(node.target)
            ),
            rule=rules[node],
            lipschitz=t.lipschitz,
            curvature=t.curvature,
            quantities=tuple(str(s) for s in t.quantities),
            certified=all(q.certified for q in t.quantities.values()),
            nonsmooth=t.nonsmooth,
            constant=node in constants,
            inputs=tuple(i.name for i in node.all_input_nodes if i not in constants),
            refs=tuple(refs),
            note=t.note,
            error=errors.get(node, sympy.Integer(0)),
        )


def full_expressions(
    gm: fx.GraphModule, out: fx.Node
) -> tuple[dict[str, sympy.Expr], dict[str, sympy.Expr]]:
    """Each node's bounds as expressions of quantity symbols only (inputs substituted)."""
    full_l: dict[str, sympy.Expr] = {}
    full_m: dict[str, sympy.Expr] = {}
    for node in gm.graph.nodes:
        nb: NodeBound | None = node.meta.get(BOUND_KEY)
        if nb is None:
            continue
        subs = {}
        for name in nb.refs:
            subs[lipschitz_symbol(name)] = full_l[name]
            subs[curvature_symbol(name)] = full_m[name]
        full_l[node.name] = nb.lipschitz.xreplace(subs)
        full_m[node.name] = nb.curvature.xreplace(subs)
    return full_l, full_m

