"""What a compiled bound says, per node: the records behind ``bf.table()``, ``bf.to_dot()``,
``bf.explain(node)`` and the notebook display (``bf._repr_html_()``).

These views need nothing beyond the standard library, so they live in the compiler core next to
:class:`~curvbound.compiler.bound_function.BoundFunction`, whose methods call them. Views that
need an optional extra (a matplotlib plot, an SVG drawn by Graphviz) are functions of the
applications layer, :mod:`curvbound.views` (``apps/views.py``), so the core never imports them.

**Share of the curvature.** Every curvature rule is, where it is evaluated, an affine function of
its inputs' curvatures (a minimum of such functions, each argument a valid bound, on its active
argument), so the output's bound splits as M_out = Σ_k (∂M_out/∂M_k)·I_k, where I_k ("own") is
the curvature node k *creates*: its rule's value minus Σ_i (∂M_k/∂M_i)·M_i over its inputs i (for
a rule without a minimum, its curvature with the inputs' curvatures set to 0). A node's share
is (∂M_out/∂M_k)·I_k / M_out; the shares sum to 1. Linear maps, sums and reshapes create no
curvature of their own (I_k = 0): they only carry their inputs' curvature on, so their share
is 0 even where their M, the bound of the whole sub-network from the input up to that node, is
the largest of the table. The table shows "-" for them. A node that does create
curvature can still have share 0 when the output's bound does not depend on its M (∂M_out/∂M_k =
0): a LipLT segment or a merged linear chain bounds a whole stretch of layers from the segment's
start at once and, where a rule takes the minimum of such a bound and the layer-by-layer one, the
segment's bound was the smaller; the activations inside it are then *subsumed* by the segment's
last node (the table says "subsumed").
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import sympy
from torch import fx

from .naming import node_label
from .registry import DEFAULT_REGISTRY, Registry, rule_name

__all__ = ["NodeRow", "contributions", "rows", "table", "table_html", "to_dot", "explain",
           "SORT_KEYS", "FOOTER"]

SORT_KEYS = ("graph", "share", "M", "L")
"""Orders accepted by ``bf.table(sort=...)``: graph order, or decreasing share, M or L."""

FOOTER = (
    "L: Lipschitz bound and M: curvature bound (Lipschitz constant of the Jacobian) of the map\n"
    "   from the network input to the node's output (ℓ2 norms).\n"
    "share: part of the output's curvature bound created at this node, (∂M_out/∂M_node)·own\n"
    "   / M_out, where own is the node's M minus what it carries from its inputs' M; the\n"
    "   shares sum to 100%. '-': the node creates no curvature (linear maps, sums, reshapes only\n"
    "   pass their inputs' curvature on, so a large M there comes from upstream). 'subsumed':\n"
    "   the output's bound does not depend on the node's M: a later rule bounds a stretch of\n"
    "   layers containing it at once (LipLT segment, merged chain) and that bound was the\n"
    "   smaller of its alternatives (see bf.explain(node) of the later nodes).\n"
    "cert: 'yes' when every number behind the node's bounds is guaranteed, 'est' when some are\n"
    "   power-iteration estimates (from below) or unproven."
)


@dataclass(frozen=True)
class NodeRow:
    """One node of a compiled bound, as the views show it.

    ``label``: module path and type (``"layer1.0.conv1 (Conv2d)"``, ``"add() in layer1"``);
    ``lipschitz``/``curvature``: the bounds of the map input → node; ``own``: the curvature the
    node creates (I_k above); ``share``: its part of the output's curvature bound (nan when that
    bound is 0 or infinite).
    """

    name: str
    label: str
    op: str
    rule: str
    lipschitz: float
    curvature: float
    own: float
    share: float
    certified: bool
    nonsmooth: bool
    constant: bool
    note: str


def label(bf, name: str) -> str:
    """Module path and type of node ``name`` (:func:`curvbound.compiler.naming.node_label`)."""
    node = _fx_nodes(bf).get(name)
    return name if node is None else node_label(node, bf.gm)


def _fx_nodes(bf) -> dict[str, fx.Node]:
    return {n.name: n for n in bf.gm.graph.nodes}


def contributions(bf) -> dict[str, tuple[float, float]]:
    """``{node: (own, share)}``: the curvature each node creates and its share of the output's
    bound (module docstring). Shares are nan when the output's curvature is 0 or infinite."""
    last = bf._latest()
    vals: dict[sympy.Symbol, float] = {
        sympy.Symbol(k, nonnegative=True): v for k, v in bf.quantity_values().items()
    }
    for name, (L, M) in last.nodes.items():
        vals[sympy.Symbol(f"L_{name}", nonnegative=True)] = float(L)
        vals[sympy.Symbol(f"M_{name}", nonnegative=True)] = float(M)
    total = float(last.curvature)
    sens = {nb.name: 0.0 for nb in bf._node_info}
    sens[bf.output] = 1.0
    own: dict[str, float] = {}
    for nb in reversed(bf._node_info):
        msyms = [sympy.Symbol(f"M_{i}", nonnegative=True) for i in nb.refs]
        expr = nb.curvature
        value = float(expr.xreplace(vals))
        carried = 0.0  # the part of the node's bound carried from its inputs' curvatures
        for i, m in zip(nb.refs, msyms):
            d = sympy.diff(expr, m)
            if d != 0:
                slope = float(d.xreplace(vals))
                sens[i] += sens[nb.name] * slope
                carried += slope * vals[m]
        mine = value - carried  # Euler residual: exact on the active argument of each minimum
        if not math.isfinite(mine):  # an infinite bound: what it is with its inputs' M at 0
            mine = float(expr.xreplace({m: sympy.S.Zero for m in msyms}).xreplace(vals))
        own[nb.name] = 0.0 if abs(mine) <= 1e-12 * abs(value) else mine
    finite = math.isfinite(total) and total != 0
    return {
        nb.name: (own[nb.name], sens[nb.name] * own[nb.name] / total if finite else math.nan)
        for nb in bf._node_info
    }


def rows(bf, sort: str = "graph") -> list[NodeRow]:
    """The non-constant nodes as :class:`NodeRow` records, in graph order or sorted (SORT_KEYS)."""
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {SORT_KEYS}, got {sort!r}")
    last = bf._latest()
    contrib = contributions(bf)
    out = []
    for nb in bf._node_info:
        if nb.constant:
            continue
        L, M = last.nodes.get(nb.name, (0.0, 0.0))
        own, share = contrib.get(nb.name, (math.nan, math.nan))
        note = " ".join(x for x in (nb.note, bf._cert_notes.get(nb.name, "")) if x)
        out.append(NodeRow(nb.name, label(bf, nb.name), nb.op, nb.rule, float(L), float(M),
                           own, share, bf.node_certified(nb.name), nb.nonsmooth, nb.constant,
                           note))
    key = {"share": lambda r: r.share, "M": lambda r: r.curvature, "L": lambda r: r.lipschitz}
    if sort != "graph":
        out.sort(key=lambda r: -_orderable(key[sort](r)))
    return out


def _orderable(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _share_text(r: NodeRow) -> str:
    if r.own == 0:
        return "-"
    if r.share == 0:
        return "subsumed"
    return "" if math.isnan(r.share) else f"{100 * r.share:.1f}%"


def _cells(bf, sort: str) -> list[tuple[str, ...]]:
    return [
        (r.label, r.rule, f"{r.lipschitz:.4g}", f"{r.curvature:.4g}", _share_text(r),
         "yes" if r.certified else "est")
        for r in rows(bf, sort)
    ]


HEADER = ("node", "rule", "L", "M", "share", "cert")


def summary(bf) -> str:
    """The last line of the table: the output's bounds, the method and whether it is certified."""
    last = bf._latest()
    kind = "certified" if bf.certified else "estimated (power iteration)"
    err = float(getattr(last, "error", 0.0))
    extra = f", error = {err:.6g}" if err != 0 else ""  # torch's switching softplus (Bounds)
    return (f"output {bf.output}: L = {float(last.lipschitz):.6g}, "
            f"M = {float(last.curvature):.6g}{extra} [{bf.method}, {kind}]")


def table(bf, sort: str = "graph", footer: bool = True) -> str:
    """Per-node text table (columns explained in the footer when ``footer``)."""
    cells = [HEADER, *_cells(bf, sort)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(summary(bf))
    if footer:
        lines.append(FOOTER)
        if float(getattr(bf._latest(), "error", 0.0)) != 0:
            lines.append(ERROR_FOOTER)
    return "\n".join(lines)


ERROR_FOOTER = (
    "error: torch's softplus returns x once beta*x > threshold, so the model jumps there; L and M\n"
    "   are the constants of the smooth twin (bf.smooth_twin()) and torch's output is within\n"
    "   error of the twin's (docs/certified_norms.md)."
)


def table_html(bf, sort: str = "graph") -> str:
    """The table as an HTML fragment (what a notebook shows for ``bf``)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in _cells(bf, sort)
    )
    foot = esc(FOOTER).replace("\n", "<br>")
    return (f"<div><p><b>curvbound bound of {esc(type(bf.model).__name__)}</b>: "
            f"{esc(summary(bf))}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table><p style=\"font-size:smaller\">{foot}</p></div>")


def to_dot(bf) -> str:
    """Graphviz source of the graph: one box per node with its rule, L, M and share."""
    lines = [f"digraph {_dot_id('curvbound_' + type(bf.model).__name__)} {{",
             "  rankdir=TB;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    shown = set()
    for r in rows(bf):
        share = _share_text(r)
        text = (f"{r.label}\\n{r.rule}\\nL = {r.lipschitz:.4g}   M = {r.curvature:.4g}"
                + (f"\\nshare {share}" if share not in ("", "-") else ""))
        big = not math.isnan(r.share) and r.share >= 0.2
        style = ', style=filled, fillcolor="#fde0c5"' if big else ""
        if r.nonsmooth:
            style = ', style=filled, fillcolor="#f4b6b6"'
        lines.append(f'  {_dot_id(r.name)} [label="{_dot_escape(text)}"{style}];')
        shown.add(r.name)
    for nb in bf._node_info:
        for i in nb.inputs:
            if i in shown and nb.name in shown:
                lines.append(f"  {_dot_id(i)} -> {_dot_id(nb.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


def rule_statement(rule: str, registry: Registry = DEFAULT_REGISTRY) -> str:
    """The mathematical statement of a rule: the first paragraph of its docstring."""
    for key in registry.keys():
        for fn in registry.candidates(key):
            if rule_name(fn) == rule:
                return _first_paragraph(fn.__doc__)
    return ""


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def find_node(bf, node: str) -> str:
    """The fx name of ``node``: an fx node name, a module path or a row label."""
    names = [nb.name for nb in bf._node_info]
    if node in names:
        return node
    for nb in bf._node_info:
        fxn = _fx_nodes(bf).get(nb.name)
        if fxn is not None and fxn.op == "call_module" and fxn.target == node:
            return nb.name
        if label(bf, nb.name) == node:
            return nb.name
    raise KeyError(f"no node {node!r} in this bound; nodes: {', '.join(names)}")


def explain(bf, node: str) -> str:
    """A node's rule with its mathematical statement, symbolic bounds and numbers.

    ``node`` is an fx node name, a module path (``"layer1.0.conv1"``) or a table label.
    """
    name = find_node(bf, node)
    nb = next(n for n in bf._node_info if n.name == name)
    row = next((r for r in rows(bf) if r.name == name), None)
    vals = bf.quantity_values()
    last = bf._latest()
    lines = [f"node {name}: {label(bf, name)}", f"rule: {nb.rule}"]
    statement = rule_statement(nb.rule)
    if statement:
        lines.append(f"statement: {statement}")
    if nb.inputs:
        lines.append(f"inputs: {', '.join(nb.inputs)}")
    lines += [f"L_{name} = {nb.lipschitz}", f"M_{name} = {nb.curvature}"]
    used = sorted({str(s) for e in (nb.lipschitz, nb.curvature) for s in e.free_symbols})
    if used:
        lines.append("where:")
        for s in used:
            if s in vals:
                kind = "certified" if bf.quantities[s].certified else "estimate"
                lines.append(f"  {s} = {vals[s]:.6g}  ({kind})")
            elif s[:2] in ("L_", "M_") and s[2:] in last.nodes:
                L, M = last.nodes[s[2:]]
                lines.append(f"  {s} = {float(L if s[0] == 'L' else M):.6g}  (node {s[2:]})")
    if row is not None:
        lines.append(f"value: L = {row.lipschitz:.6g}, M = {row.curvature:.6g}, "
                     f"own curvature {row.own:.6g}, share {_share_text(row) or 'n/a'}, "
                     f"{'certified' if row.certified else 'estimated'}")
    if row is not None and row.note:
        lines.append(f"note: {row.note}")
    return "\n".join(lines)
