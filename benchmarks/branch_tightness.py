"""Tightness where networks branch (issue 13): bound / true constant by structure.

Small random networks (float64, input dimension 2–4) of one structure each: residual blocks
(add, sub, scaled), concatenations (two branches, and a node with itself), slicing and
reductions, batch norm, conv1d/conv2d networks, and a residual CNN. Their inputs are so small
that gradient ascent over many starting pairs and scales (``apps.empirical``, exact Jacobians)
finds values within a few per cent of the true constants, so bound / lower bound is close to
bound / true constant (and never below 1: that would be a soundness bug).

For each structure the script builds ``--seeds`` networks, compiles each with every method that
covers it (``naive``, ``paper`` where the network is sequential, ``compositional``; norms estimated
to convergence, and compositional with certified norms), and reports the median ratio of L and M
to the empirical lower bounds.

Run from the repository root:

    python benchmarks/branch_tightness.py                 # prints the table
    python benchmarks/branch_tightness.py --write         # and records it in docs/benchmarks.md
    python benchmarks/branch_tightness.py --json out.json # and the raw numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import curvbound
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound
from curvbound.compiler.errors import MethodCoverageError

HEADING = "## Tightness where networks branch"


def _act(kind: str) -> nn.Module:
    return {"tanh": nn.Tanh(), "softplus": nn.Softplus(), "silu": nn.SiLU()}[kind]


class Residual(nn.Module):
    """h ↦ h ∘ branch(h), ∘ ∈ {+, −, + α·}: branch = G σ(W h + b) (dense or conv)."""

    def __init__(self, inner: nn.Module, op: str, alpha: float = 1.0):
        super().__init__()
        self.inner, self.op, self.alpha = inner, op, alpha

    def forward(self, h):
        r = self.inner(h)
        if self.op == "sub":
            return h - r
        if self.op == "alpha":
            return torch.add(h, r, alpha=self.alpha)
        return h + r


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module | None):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, h):
        return torch.cat([self.a(h), self.b(h) if self.b is not None else self.a(h)], dim=1)


class Slice(nn.Module):
    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, h):
        return h[:, self.lo : self.hi]


class Mean(nn.Module):
    def forward(self, h):
        return h.mean(dim=-1)


def _builders() -> dict[str, Callable[[torch.Generator, str], tuple[nn.Module, tuple]]]:
    """structure → (random generator, activation) → (model, input shape)."""

    def mlp_in(d, w, act):
        return [nn.Linear(d, w), _act(act)]

    def residual(op, deep=False):
        def build(g, act):
            w, hid = 3, 8
            inner = nn.Sequential(nn.Linear(w, hid), _act(act), nn.Linear(hid, w))
            alpha = float(torch.empty(()).uniform_(-1.5, 1.5, generator=g))
            head = mlp_in(w, w, act) if deep else []
            return nn.Sequential(*head, Residual(inner, op, alpha), nn.Linear(w, 3)), (w,)
        return build

    def residual2(g, act):
        w = 3
        blocks = [Residual(nn.Sequential(nn.Linear(w, 8), _act(act), nn.Linear(8, w)), "add")
                  for _ in range(2)]
        return nn.Sequential(*blocks, nn.Linear(w, 3)), (w,)

    def concat(deep):
        def build(g, act):
            d = 3
            a = nn.Sequential(nn.Linear(d, 6), _act(act))
            head = mlp_in(d, d, act) if deep else []
            return nn.Sequential(*head, Concat(a, nn.Linear(d, 5)), nn.Linear(11, 3)), (d,)
        return build

    def concat_self(g, act):
        d = 3
        a = nn.Sequential(nn.Linear(d, 6), _act(act))
        return nn.Sequential(Concat(a, None), nn.Linear(12, 3)), (d,)

    def slicing(deep):
        def build(g, act):
            d = 3
            tail = [_act(act), nn.Linear(8, 3)] if deep else []
            return nn.Sequential(*mlp_in(d, 10, act), Slice(2, 8),
                                 nn.Linear(6, 8 if deep else 3), *tail), (d,)
        return build

    def mean(g, act):
        return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), _act(act), Mean(),
                             nn.Linear(4, 3)), (1, 4)

    def batchnorm(deep):
        def build(g, act):
            d, w = 3, 8
            bns = [nn.BatchNorm1d(w) for _ in range(2 if deep else 1)]
            for bn in bns:
                bn.running_mean.uniform_(-0.5, 0.5, generator=g)
                bn.running_var.uniform_(0.3, 2.0, generator=g)
                bn.weight.data.uniform_(0.5, 1.5, generator=g)
            more = [nn.Linear(w, w), bns[1], _act(act)] if deep else []
            return nn.Sequential(nn.Linear(d, w), bns[0], _act(act), *more,
                                 nn.Linear(w, 3)), (d,)
        return build

    def conv1d(deep):
        def build(g, act):
            more = [nn.Conv1d(4, 4, 3, padding=1), _act(act)] if deep else []
            return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), _act(act), *more, nn.Flatten(),
                                 nn.Linear(16, 3)), (1, 4)
        return build

    def conv2d(deep):
        def build(g, act):
            more = [nn.Conv2d(3, 3, 3, padding=1), _act(act)] if deep else []
            return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _act(act), *more, nn.Flatten(),
                                 nn.Linear(12, 3)), (1, 2, 2)
        return build

    def residual_cnn(g, act):
        inner = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _act(act),
                              nn.Conv2d(3, 1, 3, padding=1))
        return nn.Sequential(Residual(inner, "add"), nn.Flatten(), nn.Linear(4, 3)), (1, 2, 2)

    return {
        "residual add": residual("add"),
        "residual sub": residual("sub"),
        "residual scaled (α·)": residual("alpha"),
        "residual after a layer": residual("add", True),
        "two residual blocks": residual2,
        "concatenation": concat(False),
        "concatenation with itself": concat_self,
        "concatenation after a layer": concat(True),
        "slicing": slicing(False),
        "slicing, two layers": slicing(True),
        "mean": mean,
        "batch norm": batchnorm(False),
        "batch norm, two layers": batchnorm(True),
        "conv1d": conv1d(False),
        "conv1d, two layers": conv1d(True),
        "conv2d": conv2d(False),
        "conv2d, two layers": conv2d(True),
        "residual CNN": residual_cnn,
    }


STRUCTURES = _builders()
GROUPS = {  # the targets of the issue (median M ratio): residual/concat/slicing ≤ 3, conv ≤ 6
    name: ("residual" if "residual" in name and "CNN" not in name else
           "concat" if "concat" in name else
           "slicing" if name.startswith(("slicing", "mean")) else
           "bn" if name.startswith("batch") else "conv")
    for name in STRUCTURES
}
ACTS = ("tanh", "softplus", "silu")


def build(structure: str, seed: int) -> tuple[nn.Module, tuple]:
    """The ``seed``-th random network of a structure (float64, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, shape = STRUCTURES[structure](g, ACTS[seed % len(ACTS)])
    scale = 1.0 + float(torch.rand((), generator=g))  # weights × [1, 2]: visible curvature
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.weight.mul_(scale * 1.5)
    return model.double().eval(), shape


def lower_bounds(model: nn.Module, shape: tuple, samples: int, steps: int) -> tuple[float, float]:
    """Attained lower bounds on L and M: the best over starts at several scales."""
    lip = curv = 0.0
    for k, scale in enumerate((0.3, 1.0, 3.0)):
        kw = dict(samples=samples, steps=steps, scale=scale, seed=k)
        lip = max(lip, lipschitz_lower_bound(model, shape, **kw))
        curv = max(curv, curvature_lower_bound(model, shape, **kw))
    return lip, curv


def bounds(model: nn.Module, shape: tuple) -> dict[str, tuple[float, float]]:
    x = torch.zeros(1, *shape, dtype=torch.float64)
    out = {}
    for method, norms in (("naive", "estimate"), ("paper", "estimate"),
                          ("compositional", "estimate"), ("compositional", "certified")):
        key = method if norms == "estimate" else f"{method} (certified)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = curvbound.compile(model, x, method=method, norms=norms)()
        except MethodCoverageError:
            continue
        out[key] = (float(b.lipschitz.detach()), float(b.curvature.detach()))
    return out


def measure(seeds: int, samples: int, steps: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    for name in STRUCTURES:
        if only and not any(s.lower() in name.lower() for s in only):
            continue
        start = time.perf_counter()
        cases = []
        for seed in range(seeds):
            model, shape = build(name, seed)
            lip, curv = lower_bounds(model, shape, samples, steps)
            cases.append({"seed": seed, "lower": (lip, curv), "bounds": bounds(model, shape)})
        row = {"structure": name, "group": GROUPS[name], "cases": cases,
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _median(row: dict, method: str, k: int) -> float | None:
    ratios = [c["bounds"][method][k] / c["lower"][k] for c in row["cases"]
              if method in c["bounds"] and c["lower"][k] > 0]
    return statistics.median(ratios) if ratios else None


METHODS = ("naive", "paper", "compositional", "compositional (certified)")


def _line(row: dict) -> str:
    parts = [f"{row['structure']:28s}"]
    for m in METHODS:
        lm = [_median(row, m, k) for k in (0, 1)]
        parts.append(" n/a         " if lm[0] is None else f" {lm[0]:5.2f}/{lm[1]:6.2f}")
    return "".join(parts) + f"  ({row['seconds']:.0f} s)"


def table(rows: list[dict], before: list[dict] | None = None) -> str:
    head = "| structure | " + " | ".join(f"{m} L / M" for m in METHODS)
    head += " | before: compositional L / M |" if before else " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 1 + (1 if before else 0))]
    old = {r["structure"]: r for r in before or []}
    for row in rows:
        cells = []
        for m in METHODS:
            lm = [_median(row, m, k) for k in (0, 1)]
            cells.append("n/a" if lm[0] is None else f"{lm[0]:.2f} / {lm[1]:.2f}")
        line = f"| {row['structure']} | " + " | ".join(cells) + " |"
        if before:
            r = old.get(row["structure"])
            lm = [_median(r, "compositional", k) for k in (0, 1)] if r else [None, None]
            line += (" n/a |" if lm[0] is None else f" {lm[0]:.2f} / {lm[1]:.2f} |")
        lines.append(line)
    return "\n".join(lines)


def group_table(rows: list[dict], before: list[dict] | None = None) -> str:
    """Median over every network of a group of structures (the issue's targets: M ratio ≤ 3 for
    residual, concatenation and slicing structures, ≤ 6 for convolutional networks)."""
    targets = {"residual": 3, "concat": 3, "slicing": 3, "conv": 6, "bn": None}

    def med(rs, k):
        vals = [c["bounds"]["compositional"][k] / c["lower"][k] for r in rs for c in r["cases"]
                if "compositional" in c["bounds"] and c["lower"][k] > 0]
        return statistics.median(vals) if vals else float("nan")

    lines = ["| group | structures | compositional L / M | target M |"
             + (" before: L / M |" if before else ""),
             "|---|---|---|---|" + ("---|" if before else "")]
    for group, target in targets.items():
        rs = [r for r in rows if r["group"] == group]
        if not rs:
            continue
        line = (f"| {group} | {len(rs)} | {med(rs, 0):.2f} / {med(rs, 1):.2f} | "
                f"{'≤ ' + str(target) if target else '-'} |")
        if before:
            old = [r for r in before if r["group"] == group]
            line += f" {med(old, 0):.2f} / {med(old, 1):.2f} |"
        lines.append(line)
    return "\n".join(lines)


TRAINED = {"residual CNN, 1 block": 1, "residual CNN, 2 blocks": 2, "residual CNN, 4 blocks": 4}


def trained_rows(data_dir: str | None, cache: str) -> list[dict]:
    """Residual CNNs (``zoo.residual_cnn_bn``: 8 channels, tanh, batch norm) trained one epoch on
    5000 MNIST images (weights cached), their bounds next to an empirical lower bound (gradient
    ascent from mid-grey at two scales; 784 inputs, so a weak one: the ratios are upper bounds on
    the true looseness). Empty when MNIST is missing."""
    from curvbound.apps import data, zoo

    if not data.has_dataset("mnist", data_dir):
        print("MNIST not found: no trained residual CNNs", flush=True)
        return []
    rows = []
    x, y = data.load_mnist("train", data_dir, limit=5000)
    xt, yt = data.load_mnist("test", data_dir, limit=1000)
    for name, blocks in TRAINED.items():
        model = zoo.residual_cnn_bn(in_channels=1, channels=8, size=28, blocks=blocks)
        path = Path(cache) / f"residual_cnn_{blocks}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path))
        else:
            data.train_classifier(model, x, y, epochs=1, batch_size=128, lr=1e-3, seed=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        model = model.double().eval()
        acc = data.accuracy(model, xt.double(), yt)
        start = time.perf_counter()
        got = bounds(model, (1, 28, 28))
        seconds = time.perf_counter() - start
        centre = torch.full((784,), 0.5, dtype=torch.float64)
        curv = max(curvature_lower_bound(model, (1, 28, 28), center=centre, scale=sc, seed=k)
                   for k, sc in enumerate((1.0, 5.0)))
        lip = max(lipschitz_lower_bound(model, (1, 28, 28), center=centre, scale=sc, seed=k)
                  for k, sc in enumerate((1.0, 5.0)))
        rows.append({"model": name, "accuracy": acc, "bounds": got, "lower": (lip, curv),
                     "compile_seconds": seconds})
        print(name, acc, got, (lip, curv), flush=True)
    return rows


def trained_table(rows: list[dict], before: list[dict] | None = None) -> str:
    old = {r["model"]: r for r in before or []}
    lines = ["| model | accuracy | naive M | compositional M (ratio) | certified M (ratio) | "
             "lower bound M |" + (" before: compositional M / certified M |" if before else ""),
             "|---|---|---|---|---|---|" + ("---|" if before else "")]
    for r in rows:
        b, low = r["bounds"], r["lower"][1]
        line = (f"| {r['model']} | {r['accuracy']:.3f} | {b['naive'][1]:.4g} | "
                f"{b['compositional'][1]:.4g} ({b['compositional'][1] / low:.1f}×) | "
                f"{b['compositional (certified)'][1]:.4g} "
                f"({b['compositional (certified)'][1] / low:.1f}×) | {low:.4g} |")
        if before and r["model"] in old:
            ob = old[r["model"]]["bounds"]
            line += f" {ob['compositional'][1]:.4g} / {ob['compositional (certified)'][1]:.4g} |"
        lines.append(line)
    return "\n".join(lines)


def violations(rows: list[dict]) -> list[str]:
    """Bounds below their empirical lower bounds (soundness bugs) and broken orderings."""
    bad = []
    for row in rows:
        for c in row["cases"]:
            for m, (L, M) in c["bounds"].items():
                if L < c["lower"][0] * (1 - 1e-9) or M < c["lower"][1] * (1 - 1e-9):
                    bad.append(f"{row['structure']} seed {c['seed']} {m}: bound below lower bound")
            b = c["bounds"]
            for k in (0, 1):
                if "paper" in b and b["compositional"][k] > b["paper"][k] * (1 + 1e-9):
                    bad.append(f"{row['structure']} seed {c['seed']}: compositional > paper")
                if b["compositional"][k] > b["naive"][k] * (1 + 1e-9):
                    bad.append(f"{row['structure']} seed {c['seed']}: compositional > naive")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=9)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--only", nargs="*")
    p.add_argument("--json", help="write the raw numbers here")
    p.add_argument("--before", help="a JSON file of an earlier run to compare with")
    p.add_argument("--write", action="store_true", help="record the table in docs/benchmarks.md")
    p.add_argument("--from-json", help="render the tables of an earlier run (no measuring)")
    p.add_argument("--trained", action="store_true",
                   help="only the trained residual CNNs (MNIST; JSON to --json)")
    p.add_argument("--data-dir", default=None, help="where MNIST is (default: ../shared/data)")
    p.add_argument("--cache-dir", default="/tmp/curvbound-branch-cache")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.trained:
        if args.from_json:
            rows = json.loads(Path(args.from_json).read_text())
        else:
            rows = trained_rows(args.data_dir, args.cache_dir)
        before = json.loads(Path(args.before).read_text()) if args.before else None
        text = trained_table(rows, before)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        if args.write:
            _write_trained(text, bool(before))
        return 0
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = measure(args.seeds, args.samples, args.steps, args.only)
    before = json.loads(Path(args.before).read_text()) if args.before else None
    text = table(rows, before) + "\n\nBy group (median over all networks of the group):\n\n" + \
        group_table(rows, before)
    print(text)
    bad = violations(rows)
    print(f"{len(bad)} violations" + "".join(f"\n  {b}" for b in bad))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write:
        _write(text, args, time.perf_counter() - start)
    return 1 if bad else 0


def _write(text: str, args, seconds: float) -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    body = doc.read_text()
    section = (
        f"{HEADING}\n\n"
        "Produced by `python benchmarks/branch_tightness.py"
        + (f" --before {args.before}" if args.before else "") + " --write` "
        f"({platform.machine()}, "
        f"1 thread, torch {torch.__version__}; {args.seeds} random networks per structure; "
        f"whole run {seconds / 60:.1f} min). Median over the networks of bound / empirical lower "
        "bound for L and M (the map input → output in ℓ2); the lower bounds are the best of "
        f"gradient ascent from {args.samples} starting pairs × 3 scales, {args.steps} steps, exact "
        "Jacobians, on inputs of dimension 2–4, so they are close to the true constants. "
        "\"paper\" covers sequential networks only."
        + (" \"before\": the same networks and lower bounds measured with the code before issue 13"
           " (commit 6f5ef95; `benchmarks/results/branch_tightness_before.json`)."
           if args.before else "")
        + "\n\n" + text + "\n"
    )
    if HEADING in body:
        head, rest = body.split(HEADING, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        old = rest[: len(rest) - len(tail)]
        keep = old[old.find(TRAINED_HEADING):].rstrip() + "\n" if TRAINED_HEADING in old else ""
        body = head + section + ("\n" + keep if keep else "") + tail
    else:
        body = body.rstrip() + "\n\n" + section
    doc.write_text(body)


TRAINED_HEADING = "### Trained residual CNNs"


def _write_trained(text: str, before: bool) -> None:
    """Replace (or add) the trained-models subsection at the end of the section."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    body = doc.read_text()
    sub = (
        f"{TRAINED_HEADING}\n\n"
        "Produced by `python benchmarks/branch_tightness.py --trained --write` (MNIST in "
        "../shared/data). `zoo.residual_cnn_bn` (8 channels, tanh, batch norm, 28×28 input) with "
        "1, 2 and 4 residual blocks, trained one epoch on 5000 training images (Adam, seed 0); "
        "accuracy on the first 1000 test images. The lower bound is gradient ascent from mid-grey "
        "at two scales over 784 inputs, a weak one, so the ratios overstate the looseness; the "
        "bounds themselves compare methods and code versions."
        + (" \"before\": the same weights compiled by the code before issue 13 (commit 6f5ef95)."
           if before else "")
        + "\n\n" + text + "\n"
    )
    head, rest = body.split(HEADING, 1)
    end = rest.find("\n## ")
    section, tail = (rest, "") if end < 0 else (rest[:end], rest[end:])
    if TRAINED_HEADING in section:
        section = section.split(TRAINED_HEADING, 1)[0].rstrip() + "\n\n"
    else:
        section = section.rstrip() + "\n\n"
    doc.write_text(head + HEADING + section + sub + tail)


if __name__ == "__main__":
    sys.exit(main())
