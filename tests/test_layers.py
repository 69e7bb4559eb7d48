"""The package's layers depend one way (docs/architecture.md).

Every import of curvbound's own modules, at any depth, is read with ``ast``; the test fails on a
cycle between modules, on any import inside a function (optional third-party extras excepted), and
on any import that points up the layers
``runtime`` ← ``compiler`` ← ``passes`` ← ``pipeline`` ← ``apps`` ← the package's root modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "curvbound"
NOT_PACKAGE = {"tests", "benchmarks", "examples", "docs", ".venv", "build", ".git"}

#: rank of each top-level part of the package; a module may import only modules of rank ≤ its own
LAYERS = {"runtime": 0, "compiler": 1, "passes": 2, "pipeline": 3, "apps": 4}
ROOT_RANK = 5  # the package's own __init__, __main__ and re-export modules: the public face

#: third-party packages that are optional extras: imported where they are used, so that the core
#: works without them
OPTIONAL_EXTRAS = {"matplotlib", "graphviz", "PIL", "tqdm", "sklearn", "IPython"}


def package_modules() -> dict[str, Path]:
    """Dotted module name (relative to the package, '' for its __init__) → file."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def rank(module: str) -> int:
    head = module.split(".")[0] if module else ""
    return LAYERS.get(head, ROOT_RANK)


class Imports(ast.NodeVisitor):
    """Collects (target module, line, inside a function) for every import in one module."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]):
        self.module, self.is_package, self.modules = module, is_package, modules
        self.found: list[tuple[str, int, bool]] = []
        self.inner_third_party: list[tuple[str, int]] = []
        self.beyond: list[int] = []
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _own(self, dotted: str) -> str | None:
        if dotted == PACKAGE:
            return ""
        if dotted.startswith(PACKAGE + "."):
            return dotted[len(PACKAGE) + 1 :]
        return None

    def _add(self, target: str, node: ast.AST) -> None:
        # the longest prefix that is a module of the package
        parts = target.split(".") if target else []
        while parts and ".".join(parts) not in self.modules:
            parts.pop()
        self.found.append((".".join(parts), node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            own = self._own(alias.name)
            if own is not None:
                self._add(own, node)
            elif self.depth > 0:
                self.inner_third_party.append((alias.name, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".") if self.module else []
            if not self.is_package:
                base = base[:-1]
            if node.level - 1 > len(base):  # `from ..x` in a top-level module: outside the package
                self.beyond.append(node.lineno)
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            own = self._own(node.module or "")
            if own is None:
                if self.depth > 0:
                    self.inner_third_party.append((node.module or "", node.lineno))
                return
            target = own
        for alias in node.names:
            sub = f"{target}.{alias.name}" if target else alias.name
            self._add(sub if sub in self.modules else target, node)


def scan():
    modules = package_modules()
    graph = nx.DiGraph()
    inner, inner_third, upward = [], [], []
    for name, path in modules.items():
        graph.add_node(name)
        visitor = Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        where = path.relative_to(ROOT)
        for target, line, in_function in visitor.found:
            if target == name:
                continue
            graph.add_edge(name, target, line=line)
            if in_function:
                inner.append(f"{where}:{line} imports {target or PACKAGE} inside a function")
            if rank(target) > rank(name):
                upward.append(f"{where}:{line} ({name or PACKAGE}, layer {rank(name)}) imports "
                              f"{target or PACKAGE} (layer {rank(target)})")
        for line in visitor.beyond:
            upward.append(f"{where}:{line} imports from beyond the package")
        for mod, line in visitor.inner_third_party:
            if mod.split(".")[0] not in OPTIONAL_EXTRAS:
                inner_third.append(f"{where}:{line} imports {mod} inside a function")
    return modules, graph, inner, inner_third, upward


MODULES, GRAPH, INNER, INNER_THIRD, UPWARD = scan()


def test_the_scan_sees_the_package():
    # the walk must find the layers and the edges between them, or the checks below prove nothing
    assert {"runtime.operators", "compiler.context", "passes.lipschitz_lt", "pipeline",
            "apps.certificates", ""} <= set(MODULES)
    assert GRAPH.has_edge("pipeline", "compiler.assemble")
    assert GRAPH.has_edge("apps.certificates", "pipeline")
    assert GRAPH.number_of_edges() > 60


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + c[:1]) for c in cycles[:10])


def test_no_imports_inside_functions():
    assert not INNER, "\n".join(INNER)
    assert not INNER_THIRD, "\n".join(INNER_THIRD)


def test_imports_point_down_the_layers():
    assert not UPWARD, "\n".join(UPWARD)


def test_a_relative_import_beyond_the_package_is_caught():
    visitor = Imports("experiments", False, MODULES)
    visitor.visit(ast.parse("from ..pipeline import compile\n"))
    assert visitor.beyond == [1]


@pytest.mark.parametrize(
    "source, verdict",
    [
        ("from ..pipeline import compile\n", "upward"),
        ("def f():\n    from ..runtime import norms\n", "inner"),
        ("def f():\n    import numpy\n", "inner third-party"),
        ("def f():\n    import matplotlib.pyplot as plt\n", None),
        ("from .norms import Norm\n", None),
    ],
)
def test_the_checks_catch_what_they_claim(source, verdict):
    # the visitor, applied to a snippet placed in runtime/operators.py
    visitor = Imports("runtime.operators", False, MODULES)
    visitor.visit(ast.parse(source))
    ups = [t for t, _, _ in visitor.found if rank(t) > rank("runtime.operators")]
    inner = [t for t, _, f in visitor.found if f]
    third = [m for m, _ in visitor.inner_third_party if m.split(".")[0] not in OPTIONAL_EXTRAS]
    got = "upward" if ups else "inner" if inner else "inner third-party" if third else None
    assert got == verdict
