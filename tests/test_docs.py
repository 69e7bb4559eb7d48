"""Documentation stays true: docstring examples run, and the pipeline shown in the package
docstring and docs/index.md is what the code prints today."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import curvbound

ROOT = Path(__file__).resolve().parents[1]

DOCTEST_MODULES = [
    "curvbound",
    "curvbound.compiler.registry",
    "curvbound.compiler.naming",
    "curvbound.compiler.trace",
    "curvbound.compiler.bound_function",
    "curvbound.pipeline",
    "curvbound.passes.rules.base",
    "curvbound.runtime.norms",
    "curvbound.apps.nn",
    "curvbound.apps.training",
]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _pipeline_output() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pipeline.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return out.stdout


def test_pipeline_output_matches_docs():
    out = _pipeline_output()
    table = out.split("2. per-node bounds:\n")[1].split("3. generated")[0].strip()
    index = (ROOT / "docs" / "index.md").read_text()
    assert table in index, "docs/index.md shows a stale table: rerun examples/pipeline.py"
    doc_lines = [line[4:] for line in curvbound.__doc__.splitlines() if line.startswith("    ")]
    assert table in "\n".join(doc_lines), "the package docstring shows a stale table"
