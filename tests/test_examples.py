"""The examples run, and what they print is right (checked independently)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvbound
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound

ROOT = Path(__file__).resolve().parents[1]


def test_custom_rules_example(capsys):
    ns = runpy.run_path(str(ROOT / "examples" / "custom_rules.py"), run_name="example")
    Swish, Tied = ns["Swish"], ns["Tied"]
    torch.manual_seed(1)
    enc = torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(enc, Swish(), Tied(enc.weight, 0.5), torch.nn.Tanh()).double()
    bf = curvbound.compile(model.eval(), torch.zeros(1, 6, dtype=torch.float64), norms="certified")
    out = bf()
    w = torch.linalg.matrix_norm(enc.weight.detach(), 2).item()
    assert float(out.lipschitz) == pytest.approx(1.0999 * w * 0.5 * w, rel=1e-8)
    assert float(out.lipschitz) >= lipschitz_lower_bound(model, (6,))
    assert float(out.curvature) >= curvature_lower_bound(model, (6,))
    rules = {n: a["rule"] for n, a in bf.graph.nodes(data=True)}
    assert rules["_1"] == "elementwise(slope=1.0999, curvature=0.5)"
    assert rules["_2"].endswith(".tied")
    curvbound.DEFAULT_REGISTRY.unregister(Swish, Tied)  # the example used the default registry


@pytest.mark.parametrize("script", ["custom_rules.py", "pipeline.py"])
def test_example_scripts_run(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "output" in out.stdout and "certified" in out.stdout
