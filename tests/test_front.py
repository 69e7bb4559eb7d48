"""The front door: the views of a bound (table, DOT, explain, HTML, plots), the command line,
the demo and the generated op catalogue."""

from __future__ import annotations

import doctest
import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch
from torch import nn

import curvbound
from curvbound import views, zoo
from curvbound.apps import catalogue, cli
from curvbound.apps.data import has_dataset
from curvbound.compiler import report

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "cli_models.py"


class TinyResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + nn.functional.softplus(self.fc2(h), beta=2.0)
        return self.out(h)


@pytest.fixture(scope="module")
def residual_bf():
    torch.manual_seed(0)
    return curvbound.compile(TinyResidual().eval(), torch.zeros(1, 4), norms="certified")


@pytest.fixture(scope="module")
def cnn_bf():
    model, shape = zoo.ZOO["residual_cnn_bn"]()
    return curvbound.compile(model, torch.zeros(1, *shape), norms="certified")


# -- views ----------------------------------------------------------------------------------------
def test_views_docstring_examples_run():
    module = importlib.import_module("curvbound.apps.views")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _output_curvature(bf, bump: str | None = None, delta: float = 0.0) -> float:
    """The output's M re-evaluated node by node from the per-node sympy expressions, with
    ``delta`` added to node ``bump``'s M (a finite-difference probe of ∂M_out/∂M_bump that does
    not use the share code)."""
    vals = {sympy.Symbol(k, nonnegative=True): v for k, v in bf.quantity_values().items()}
    nodes = bf().nodes
    for name, (L, _) in nodes.items():
        vals[sympy.Symbol(f"L_{name}", nonnegative=True)] = float(L)
    for nb in bf._node_info:
        m = float(nb.curvature.xreplace(vals)) + (delta if nb.name == bump else 0.0)
        vals[sympy.Symbol(f"M_{nb.name}", nonnegative=True)] = m
    return vals[sympy.Symbol(f"M_{bf.output}", nonnegative=True)]


def _own(nb, vals: dict) -> float:
    """The curvature a node creates: its bound minus the part carried from its inputs'
    curvatures, Σ_i (∂M/∂M_i)·M_i with the slopes by finite differences (exact on the active
    argument of a minimum; the bound itself when there are no such inputs)."""
    expr = nb.curvature
    value = float(expr.xreplace(vals))
    carried = 0.0
    for s in expr.free_symbols:
        if str(s).startswith("M_") and vals[s] > 0:
            h = 1e-7 * vals[s]
            slope = (float(expr.xreplace({**vals, s: vals[s] + h})) - value) / h
            carried += slope * vals[s]
    return value - carried


@pytest.mark.parametrize("which", ["residual_bf", "cnn_bf"])
def test_share_column_says_what_it_means(which, request):
    bf = request.getfixturevalue(which)
    table = bf.table(footer=False)
    body = table.splitlines()[2:-1]
    rows = {r.name: r for r in report.rows(bf)}
    assert len(body) == len(rows)
    shares = bf.curvature_shares()
    assert sum(v for v in shares.values()) == pytest.approx(1.0, rel=1e-9)
    total = _output_curvature(bf)
    assert total == pytest.approx(float(bf().curvature), rel=1e-9)
    for nb in bf._node_info:
        if nb.constant:
            continue
        r = rows[nb.name]
        cell = next(line for line in body if line.startswith(r.label + " "))
        delta = 1e-6 * total
        sens = (_output_curvature(bf, nb.name, delta) - total) / delta
        vals = ({sympy.Symbol(k, nonnegative=True): v for k, v in bf.quantity_values().items()}
                | {sympy.Symbol(f"L_{k}", nonnegative=True): float(v[0])
                   for k, v in bf().nodes.items()}
                | {sympy.Symbol(f"M_{k}", nonnegative=True): float(v[1])
                   for k, v in bf().nodes.items()})
        own = _own(nb, vals)
        own = 0.0 if abs(own) <= 1e-6 * max(total, 1e-300) else own
        assert r.own == pytest.approx(own, rel=1e-5, abs=1e-9 * total)
        assert r.share == pytest.approx(sens * own / total, rel=1e-4, abs=1e-6)
        if own == 0:  # creates no curvature: "-" (not a misleading 0.0%)
            assert " - " in cell
        elif abs(sens) < 1e-9:  # the output's bound does not depend on its M
            assert "subsumed" in cell
        else:
            assert re.search(r"\d+\.\d%", cell)
    footer = bf.table()
    assert "share: part of the output's curvature bound created at this node" in footer
    assert "'-': the node creates no curvature" in footer and "'subsumed'" in footer


def test_cnn_table_names_rows_by_module_path(cnn_bf):
    table = cnn_bf.table()
    assert "blocks.0.conv1 (Conv2d)" in table and "head (Linear)" in table
    assert "blocks_0_conv1" not in table  # fx names do not show


def test_table_sorts_by_share(cnn_bf):
    rows = report.rows(cnn_bf, sort="share")
    shares = [0.0 if math.isnan(r.share) else r.share for r in rows]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0
    lines = cnn_bf.table(sort="share", footer=False).splitlines()
    assert lines[2].startswith(rows[0].label)
    with pytest.raises(ValueError, match="sort must be one of"):
        cnn_bf.table(sort="bogus")


def test_dot_has_every_node_and_edge(cnn_bf):
    dot = cnn_bf.to_dot()
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    names = [r.name for r in report.rows(cnn_bf)]
    for name in names:
        assert re.search(rf'^  "{re.escape(name)}" \[label="', dot, re.M), name
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";$', dot, re.M)
    g = cnn_bf.graph
    expected = {(a, b) for a, b in g.edges if a in names and b in names}
    assert set(edges) == expected
    r = next(r for r in report.rows(cnn_bf) if r.label == "post_act (Tanh)")
    assert f"M = {r.curvature:.4g}" in dot and "activations.tanh" in dot


def test_explain_gives_statement_expression_and_numbers(residual_bf):
    text = residual_bf.explain("tanh")
    assert "statement: tanh: sup|σ'| = 1, sup|σ''| = 4/(3√3)." in text
    nb = next(n for n in residual_bf._node_info if n.name == "tanh")
    assert f"M_tanh = {nb.curvature}" in text
    L, M = residual_bf().nodes["tanh"]
    assert f"M = {float(M):.6g}" in text
    # the numbers it lists evaluate the expression to the node's value
    vals = {}
    for line in text.splitlines():
        m = re.match(r"  (\w+) = ([0-9.e+-]+)", line)
        if m:
            vals[sympy.Symbol(m.group(1), nonnegative=True)] = float(m.group(2))
    assert float(nb.curvature.xreplace(vals)) == pytest.approx(float(M), rel=1e-5)
    assert residual_bf.explain("fc1").startswith("node fc1: fc1 (Linear)")  # by module path
    with pytest.raises(KeyError, match="no node 'nope'"):
        residual_bf.explain("nope")


def test_html_table(residual_bf):
    out = residual_bf._repr_html_()
    assert out.count("<tr>") == 1 + len(report.rows(residual_bf))
    assert "<th>share</th>" in out and "fc2 (Linear)" in out and "share: part of" in out


def test_plot_contributions_writes_a_png(residual_bf, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "c.png"
    views.plot_contributions(residual_bf, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svg_needs_graphviz(residual_bf, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz raises ImportError
    with pytest.raises(views.MissingExtraError, match="pip install graphviz"):
        views.to_svg(residual_bf)


# -- command line ---------------------------------------------------------------------------------
def test_inspect_residual_cnn_writes_json_and_dot(tmp_path, capsys):
    js, dot = tmp_path / "bf.json", tmp_path / "bf.dot"
    code = cli.main(["--threads", "1", "inspect", f"{MODELS}:residual_cnn", "--json", str(js),
                     "--dot", str(dot)])
    out = capsys.readouterr().out
    assert code == 0
    assert "blocks.7.conv2 (Conv2d)" in out and "output head:" in out
    record = json.loads(js.read_text())
    assert record["input_shape"] == [1, 3, 32, 32] and record["certified"] is True
    labels = [n["label"] for n in record["nodes"]]
    assert sum(1 for n in labels if n.endswith("(Conv2d)")) == 1 + 2 * 8
    # the JSON's bound is the model's bound, recompiled independently here
    model, shape = zoo.residual_cnn_bn(in_channels=3, channels=8, size=32, blocks=8), (3, 32, 32)
    ref = curvbound.compile(model, torch.zeros(1, *shape), norms="certified")()
    assert record["lipschitz"] == pytest.approx(float(ref.lipschitz), rel=1e-12)
    assert dot.read_text().startswith("digraph")


def test_inspect_unsupported_ops_exit_code_lists_all():
    out = subprocess.run(
        [sys.executable, "-m", "curvbound", "--threads", "1", "inspect", f"{MODELS}:sort_topk"],
        capture_output=True, text=True, cwd=ROOT.parent,
    )
    assert out.returncode == cli.EXIT_CODES[curvbound.UnsupportedOperationError] == 3
    assert "torch.sort" in out.stderr and "torch.topk" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    "argv, code, text",
    [
        (["inspect", "no_such_model"], 2, "neither path/to/file.py:factory nor a known model"),
        (["inspect", "missing.py:f"], 2, "no file 'missing.py'"),
        (["inspect", f"{MODELS}:nothing"], 2, "defines no function 'nothing'"),
        (["inspect", f"{MODELS}:sort_topk", "--input-shape", "1,a"], 2, "--input-shape"),
        (["inspect", "mnist_3f", "--input-shape", "1,3,4,4"], 6, "InputError"),
    ],
)
def test_cli_errors_are_messages(argv, code, text, capsys):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "examples:" in out and "exit codes:" in out


def test_certify_digits_json(tmp_path, capsys):
    pytest.importorskip("sklearn")
    model, _ = cli.load_model(f"{MODELS}:digits_mlp")
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    js = tmp_path / "c.json"
    code = cli.main(["--threads", "1", "certify", f"{MODELS}:digits_mlp", "--data", "digits",
                     "--weights", str(weights), "--limit", "60", "--eps", "0.05", "0.2",
                     "--json", str(js), "--quiet"])
    assert code == 0
    rec = json.loads(js.read_text())
    acc, up = rec["certified_accuracy"], rec["attack_upper"]
    assert rec["samples"] == 60 and rec["certified"] is True
    for i in range(2):
        best = acc["best"][i]
        assert max(acc["lipschitz"][i], acc["curvature"][i], acc["anchored"][i]) <= best
        assert best <= up[i] <= rec["clean_accuracy"]
    # Lipschitz certified accuracy, recomputed from the logits and the pairwise margins
    x, y = cli._dataset("digits", None, 60)
    bf = curvbound.compile(model, x[:1], norms="certified")
    with torch.no_grad():
        logits = model(x).double()
    lip = bf.margins().lipschitz.double()
    pred = logits.argmax(1)
    ok = []
    for b in range(60):
        p = int(pred[b])
        radius = min(float(logits[b, p] - logits[b, j]) / float(lip[p, j])
                     for j in range(10) if j != p)
        ok.append(p == int(y[b]) and radius > 0.05)
    assert acc["lipschitz"][0] == pytest.approx(sum(ok) / 60, abs=1 / 60 + 1e-12)


# -- demo -----------------------------------------------------------------------------------------
def test_demo_runs_and_reports(tmp_path):
    pytest.importorskip("sklearn")
    from curvbound.apps.demo import run_demo

    lines: list[str] = []
    torch.set_num_threads(1)
    res = run_demo(out=tmp_path, epochs=2, progress=False, echo=lines.append)
    text = "\n".join(lines)
    assert "certified accuracy" in text and "Where to go next" in text
    assert "attack bound" in text and res.bound.certified
    for i in range(len(res.eps)):
        best = res.certified_accuracy["best"][i]
        assert res.certified_accuracy["lipschitz"][i] <= best <= res.attack_upper[i]
        assert res.attack_upper[i] <= res.clean_accuracy + 1e-12
    if res.plot is not None:
        assert res.plot.read_bytes()[:4] == b"\x89PNG"


def test_demo_penalty_keeps_its_estimates_honest():
    """The training penalty's power-iteration estimates stay close to the converged norms (with
    one step per batch, Adam drove them far below; see apps/demo.py)."""
    pytest.importorskip("sklearn")
    from curvbound.apps import demo

    xtr, ytr, _, _ = demo.load_digits()
    model = demo.build_model((64, 32, 10))
    pen = demo.curvature_penalty(model, xtr, weight=0.05, target=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for start in range(0, 640, 64):
        loss = nn.functional.cross_entropy(model(xtr[start:start + 64]), ytr[start:start + 64])
        opt.zero_grad()
        (loss + pen()).backward()
        opt.step()
        pen.step()
    tracked = float(pen.bound().curvature)
    true = float(curvbound.compile(model.eval(), xtr[:1], norms="certified")().curvature)
    assert tracked <= true * (1 + 1e-6) and tracked >= 0.8 * true


# -- docs -----------------------------------------------------------------------------------------
def test_ops_catalogue_is_generated():
    assert catalogue.DOC.read_text() == catalogue.render(), (
        "docs/ops.md is stale: python -m curvbound.apps.catalogue")
    text = catalogue.render()
    assert "| `activations.tanh` | `method 'tanh'`, `torch.nn.Tanh`, `torch.tanh` |" in text


def _doc_commands() -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    return [m.group(1) for m in re.finditer(r"^\$ curvbound (.+)$", text, re.M)]


@pytest.mark.parametrize("command", _doc_commands())
def test_cli_doc_examples_run(command, tmp_path, capsys):
    """Every `$ curvbound ...` line of docs/cli.md runs with the exit code the doc states."""
    command, _, comment = command.partition("#")
    expected = re.match(r"\s*exit code (\d+)", comment)
    argv = command.split()
    for name in ("mnist", "cifar10"):
        if name in argv and not has_dataset(name):
            pytest.skip(f"needs the {name} file (see shared/data/README.md)")
    if argv[0] == "demo" or "digits" in argv:
        pytest.importorskip("sklearn")  # the `demo` extra
    if argv[0] == "demo":
        argv += ["--epochs", "1", "--quiet", "--out", str(tmp_path)]
    argv = [a.replace("examples/", f"{ROOT}/examples/") for a in argv]
    argv = [str(tmp_path / a) if a.endswith((".json", ".dot", ".png")) else a for a in argv]
    if argv[0] == "experiment":
        pytest.skip("the experiments are tested with the experiments")
    want = int(expected.group(1)) if expected else 0
    threads = torch.get_num_threads()
    try:
        code = cli.main(["--threads", "1", *argv])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == want, err
    assert "Traceback" not in err
