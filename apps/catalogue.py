"""The catalogue of covered ops, generated from the default registry: ``docs/ops.md``.

Regenerate it with ``python -m curvbound.apps.catalogue`` (a test checks the file equals the
text :func:`render` returns, so a new rule shows up in the docs or the suite fails).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ..compiler.registry import DEFAULT_REGISTRY, Registry, rule_name, target_name

__all__ = ["render", "DOC"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"

_HEAD = """# Covered ops

Every op curvbound has a transfer rule for, grouped by rule, with the rule's mathematical
statement (the first paragraph of its docstring; docs/theory.md proves them). An op is a torch
function (`torch.tanh`), a tensor method (`method 'tanh'`) or a module class (`torch.nn.Tanh`,
which also covers its subclasses that keep its `forward`). Anything else is traced into, or
reported by `curvbound.compile` (all uncovered nodes at once, before any numeric work); cover it
with `@curvbound.rule` (docs/writing_rules.md).

Generated from the default registry by `python -m curvbound.apps.catalogue`; do not edit by hand.
"""


def render(registry: Registry = DEFAULT_REGISTRY) -> str:
    """The text of docs/ops.md for ``registry``: one section per rule family, one row per rule."""
    rules: dict[str, tuple[set[str], str]] = {}
    for key in registry.keys():
        for fn in registry.candidates(key):
            entry = rules.setdefault(rule_name(fn), (set(), _statement(fn)))
            entry[0].add(op_name(key))
    families: dict[str, list[str]] = {}
    for rule, (targets, statement) in sorted(rules.items()):
        family = rule.split(".", 1)[0] if "." in rule else "other"
        ops = ", ".join(f"`{t}`" for t in sorted(targets))
        families.setdefault(family, []).append(
            f"| `{rule}` | {ops} | {_cell(statement) or '(no statement)'} |")
    lines = [_HEAD]
    for family in sorted(families):
        lines += [f"## {family}", "", "| rule | ops | statement |", "| --- | --- | --- |"]
        lines += families[family]
        lines.append("")
    return "\n".join(lines)


def op_name(key) -> str:
    """The shortest public spelling of a registry key: ``torch.nn.Tanh``, ``F.max_pool2d``."""
    if isinstance(key, type) and getattr(nn, key.__name__, None) is key:
        return f"torch.nn.{key.__name__}"
    name = getattr(key, "__name__", None)
    if callable(key) and name and getattr(torch.nn.functional, name, None) is key:
        return f"torch.nn.functional.{name}"
    return target_name(key)


def _statement(fn) -> str:
    doc = (fn.__doc__ or "").strip()
    return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
