"""Pictures and tables of a compiled bound: ``curvbound.views``.

Where each view lives: the ones that need only the standard library are implemented in the
compiler core (:mod:`curvbound.compiler.report`) and are also methods of the bound function
(``bf.table()``, ``bf.to_dot()``, ``bf.explain(node)``, the notebook display); the ones that need
an optional extra (matplotlib for :func:`plot_contributions`, the ``graphviz`` package and the
``dot`` program for :func:`to_svg`) are functions here, in the applications layer, so the core
never imports a plotting library. Every view is also a function of this module.

Example:
    >>> import torch, curvbound
    >>> from curvbound import views
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> bf = curvbound.compile(net, torch.zeros(1, 2), norms="certified")
    >>> print(views.table(bf, footer=False))
    node        rule              L       M       share     cert
    ----------  ----------------  ------  ------  --------  ----
    input       input             1       0       -         yes
    0 (Linear)  linear.linear     1.261   0       -         yes
    1 (Tanh)    activations.tanh  1.261   0.7221  subsumed  yes
    2 (Linear)  linear.linear     0.6505  0.2804  100.0%    yes
    output _2: L = 0.650512, M = 0.280445 [compositional, certified]
    >>> print(views.to_dot(bf).splitlines()[0])
    digraph "curvbound_Sequential" {
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..compiler.report import explain, rows, table, table_html, to_dot

__all__ = [
    "table",
    "table_html",
    "to_dot",
    "to_svg",
    "explain",
    "rows",
    "plot_contributions",
    "MissingExtraError",
]


class MissingExtraError(ImportError):
    """An optional dependency of a view is not installed (the message says how to install it)."""


def _matplotlib():
    try:
        import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend
    except ImportError as error:
        raise MissingExtraError(
            "this view draws with matplotlib, which is not installed: "
            "`pip install matplotlib` (or the `views` extra: pip install 'curvbound[views]')"
        ) from error
    return plt


def to_svg(bf, path: str | Path | None = None) -> str:
    """Render :func:`to_dot` with Graphviz; returns the SVG text (and writes it to ``path``).

    Needs the ``graphviz`` Python package and Graphviz's ``dot`` program; raises
    :class:`MissingExtraError` saying which is missing otherwise (``bf.to_dot()`` needs neither).
    """
    try:
        import graphviz
    except ImportError as error:
        raise MissingExtraError(
            "SVG output needs the graphviz Python package: `pip install graphviz` (or "
            "pip install 'curvbound[views]'), and Graphviz's `dot` program (e.g. apt-get "
            "install graphviz). bf.to_dot() gives the DOT source without either."
        ) from error
    if shutil.which("dot") is None:
        raise MissingExtraError(
            "SVG output needs Graphviz's `dot` program on PATH (e.g. apt-get install graphviz or "
            "brew install graphviz). bf.to_dot() gives the DOT source without it."
        )
    svg = graphviz.Source(to_dot(bf)).pipe(format="svg").decode()
    if path is not None:
        Path(path).write_text(svg)
    return svg


def plot_contributions(bf, path: str | Path | None = None, *, ax=None, top: int | None = 20):
    """Bar chart of each node's share of the output's curvature bound ("which layer dominates"),
    with the curvature M of the sub-network up to each node on a second axis.

    Nodes in graph order; ``top`` keeps the nodes with the largest shares (all when None).
    Saves to ``path`` when given; returns the matplotlib ``Axes``. Needs matplotlib.
    """
    plt = _matplotlib()
    data = rows(bf)
    if top is not None and len(data) > top:
        keep = {r.name for r in sorted(data, key=lambda r: -_num(r.share))[:top]}
        data = [r for r in data if r.name in keep]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(data) + 2), 4.2))
    xs = list(range(len(data)))
    shares = [100 * _num(r.share) for r in data]
    colors = ["#d95f02" if r.nonsmooth else "#1b9e77" for r in data]
    ax.bar(xs, shares, color=colors)
    ax.set_ylabel("share of the output's curvature bound (%)")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.label for r in data], rotation=60, ha="right", fontsize=8)
    curv = [r.curvature for r in data]
    if all(math.isfinite(c) for c in curv):
        twin = ax.twinx()
        twin.plot(xs, curv, "k.-", lw=1, label="M up to the node")
        twin.set_ylabel("M (curvature bound up to the node)")
        twin.legend(loc="upper left", fontsize=8)
    last = bf._latest()
    ax.set_title(f"{type(bf.model).__name__}: M = {float(last.curvature):.4g} "
                 f"({'certified' if bf.certified else 'estimated'}); where it comes from",
                 fontsize=10)
    if fig is not None:
        fig.tight_layout()
    if path is not None:
        ax.figure.savefig(path, dpi=120)
        if fig is not None:
            plt.close(fig)
    return ax


def _num(v: float) -> float:
    return 0.0 if math.isnan(v) else v

