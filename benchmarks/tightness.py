"""Tightness of the curvature bounds (issue 4): naive, CRT, the paper's Algorithm 1 and
compositional, against an empirical lower bound, on the paper's architectures.

Models: MNIST 3F–6F tanh MLPs, CIFAR-10 6C2F and 6F (``curvbound.zoo``), each with its random
initialisation and briefly trained (``apps.data.train_classifier`` on a subset of the training
data in ../shared/data; weights cached under ``--cache-dir``). For each model and method the script
compiles the bound (float64 copy of the model; norms estimated by power iteration run to
convergence, plus "compositional" with certified norms), and reports the curvature bound M of the
vector map, its ratio to the empirical lower bound (``apps.empirical.curvature_lower_bound``,
gradient ascent over input pairs: every ratio must be ≥ 1), and compile times. A second table
measures ``bf.margins()`` for K = 10 and K = 100 classes next to ``bf()`` in the same run.

Run from the repository root:

    python benchmarks/tightness.py                  # prints the tables
    python benchmarks/tightness.py --write   # and replaces "## Tightness" in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import curvbound
from curvbound import zoo
from curvbound.apps import data
from curvbound.apps.empirical import curvature_lower_bound
from curvbound.compiler.errors import MethodCoverageError

METHODS = ("naive", "crt", "paper", "compositional")

MODELS = {
    "MNIST 3F": ("mnist", lambda: zoo.mnist_mlp(3), (1, 28, 28)),
    "MNIST 4F": ("mnist", lambda: zoo.mnist_mlp(4), (1, 28, 28)),
    "MNIST 5F": ("mnist", lambda: zoo.mnist_mlp(5), (1, 28, 28)),
    "MNIST 6F": ("mnist", lambda: zoo.mnist_mlp(6), (1, 28, 28)),
    "CIFAR 6C2F": ("cifar10", lambda: zoo.cifar_6c2f(), (3, 32, 32)),
    "CIFAR 6F": ("cifar10", lambda: zoo.cifar_6f(), (3, 32, 32)),
}


#: test accuracy (first 1000 test images) of each trained model, filled in by :func:`trained`
ACCURACY: dict[str, float] = {}


def trained(name: str, args) -> nn.Module | None:
    """The model trained briefly (cached), or None when the dataset is missing."""
    dataset, build, _ = MODELS[name]
    if not data.has_dataset(dataset):
        return None
    path = Path(args.cache_dir) / f"{name.replace(' ', '_').lower()}_{args.train_limit}.pt"
    model = build()
    load = data.load_mnist if dataset == "mnist" else data.load_cifar10
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        x, y = load("train", limit=args.train_limit)
        start = time.perf_counter()
        data.train_classifier(model, x, y, epochs=args.epochs, batch_size=128, lr=1e-3, seed=0)
        print(f"  trained {name} on {len(x)} images, {args.epochs} epochs "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    xt, yt = load("test", limit=1000)
    ACCURACY[name] = data.accuracy(model.eval(), xt, yt)
    return model.eval()


def bound(model: nn.Module, shape, method: str, norms: str) -> tuple[float, float] | None:
    """(curvature bound, compile seconds), or None when the method does not cover the model."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bf = curvbound.compile(model, x, method=method, norms=norms)
            value = float(bf().curvature.detach())
    except MethodCoverageError:
        return None
    return value, time.perf_counter() - start


def empirical(model: nn.Module, shape, budget: float) -> float:
    """The best of two gradient-ascent runs: around 0 and around mid-grey with a large scale."""
    n = math.prod(shape)
    runs = [
        dict(seed=0),
        dict(seed=1, center=torch.full((n,), 0.5, dtype=torch.float64), scale=10.0),
    ]
    return max(curvature_lower_bound(model, shape, budget=budget, **kw) for kw in runs)


def tightness_rows(args) -> list[dict]:
    rows = []
    for name, (_, build, shape) in MODELS.items():
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        variants = [("random", build())]
        if not args.no_train:
            t = trained(name, args)
            if t is not None:
                variants.append(("trained", t))
        for label, model in variants:
            model = model.double().eval()
            row = {"model": name, "weights": label, "M": {}, "time": {}}
            for method in METHODS:
                got = bound(model, shape, method, "estimate")
                if got is not None:
                    row["M"][method], row["time"][method] = got
            got = bound(model, shape, "compositional", "certified")
            row["M"]["compositional (certified)"], row["time"]["compositional (certified)"] = got
            start = time.perf_counter()
            row["lower"] = empirical(model, shape, args.budget)
            row["time"]["lower"] = time.perf_counter() - start
            rows.append(row)
            print(_row(row), flush=True)
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


COLUMNS = ["naive", "crt", "paper", "compositional", "compositional (certified)"]


def _row(row: dict) -> str:
    lower = row["lower"]
    weights = row["weights"]
    if weights == "trained" and row["model"] in ACCURACY:
        weights += f" (acc. {ACCURACY[row['model']]:.2f})"
    cells = [row["model"], weights]
    for c in COLUMNS:
        m = row["M"].get(c)
        cells.append("n/a" if m is None else f"{m:.4g} ({m / lower:.1f}×)")
    cells.append(f"{lower:.4g}")
    comp, paper = row["M"].get("compositional"), row["M"].get("paper")
    cells.append("n/a" if paper is None else f"{paper / comp:.2f}")
    cells.append(f"{row['M']['naive'] / comp:.1f}")
    return "| " + " | ".join(cells) + " |"


def tightness_table(rows: list[dict]) -> str:
    head = ["model", "weights", *[f"{c}" for c in COLUMNS], "empirical lower bound",
            "paper / comp.", "naive / comp."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def times_table(rows: list[dict]) -> str:
    head = ["model", "weights", *COLUMNS, "lower bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["weights"]]
        cells += [_fmt(r["time"].get(c)) for c in COLUMNS]
        cells.append(_fmt(r["time"]["lower"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- cost of bf.margins() -----------------------------------------------------------------------
def _with_classes(build, classes: int) -> nn.Module:
    model = build()
    last = model[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(classes)
        model[-1] = nn.Linear(last.in_features, classes)
    return model.double().eval()


def margins_rows(args) -> list[dict]:
    rows = []
    cases = [("MNIST 4F", 10), ("MNIST 4F", 100), ("CIFAR 6F", 10), ("CIFAR 6F", 100),
             ("CIFAR 6C2F", 10), ("CIFAR 6C2F", 100)]
    for name, k in cases:
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        _, build, shape = MODELS[name]
        model = _with_classes(build, k)
        x = torch.zeros(1, *shape, dtype=torch.float64)
        for norms in ("estimate", "certified"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bf = curvbound.compile(model, x, norms=norms)
            call = _best(lambda: bf(), 3)
            marg = _best(lambda: bf.margins(), 2)
            m = bf.margins()
            off = ~torch.eye(k, dtype=torch.bool)
            glob = math.sqrt(2) * float(bf().curvature.detach())
            gain = float(m.curvature[off].max()) / glob
            rows.append({"model": name, "K": k, "norms": norms, "call": call, "margins": marg,
                         "pairs": k * (k - 1) // 2, "gain": gain,
                         "mean_gain": float(m.curvature[off].mean()) / glob})
            print(rows[-1], flush=True)
    return rows


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def margins_table(rows: list[dict]) -> str:
    head = ["model", "K", "pairs", "norms", "bf() [s]", "bf.margins() [s]", "margins / bf()",
            "max pairwise M / (√2·M)", "mean pairwise M / (√2·M)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['K']} | {r['pairs']} | {r['norms']} | {r['call']:.3g} | "
            f"{r['margins']:.3g} | {r['margins'] / r['call']:.1f} | {r['gain']:.3f} | "
            f"{r['mean_gain']:.3f} |"
        )
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace the "## Tightness" section of ``path`` (up to the next "## ") or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find("\n## Tightness\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = old.find("\n## ", start + 1)
        new = old[: start + 1] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=os.path.join("/tmp", "curvbound-tightness-cache"))
    p.add_argument("--train-limit", type=int, default=5000, help="training images per dataset")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--budget", type=float, default=1.5e11, help="FLOPs per empirical ascent")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="random weights only")
    p.add_argument("--only", nargs="*", help="substrings of model names to run")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = tightness_rows(args)
    mrows = margins_rows(args)
    total = time.perf_counter() - start
    text = render(rows, mrows, args, total)
    print(text)
    if args.write:
        write_section(text, Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")


def render(rows, mrows, args, total) -> str:
    machine = f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch " \
              f"{torch.__version__}"
    return f"""## Tightness

Produced by `python benchmarks/tightness.py --write` ({machine}; whole run {total / 60:.1f} min).
Curvature bound M of the vector map input → logits (ℓ2), for each method, with its ratio to the
empirical lower bound in parentheses (a lower bound attained by gradient ascent over input pairs,
`apps/empirical.py`, float64: the true constant lies between it and every bound, so smaller
ratios are tighter and none may be below 1). Norms are power-iteration estimates run to
convergence, except the certified column (guaranteed norms in float64). "trained": the zoo model
after {args.epochs} epochs of Adam on the first {args.train_limit} training images (weights cached
in `{args.cache_dir}`; accuracy on the first 1000 test images in brackets). CRT covers MLPs only
(n/a for 6C2F); it bounds a scalar margin through |W| products, which is why it loses to naive on
deeper random networks. The last two columns are the factors by which compositional improves on
the paper's Algorithm 1 and on the naive products. The ratios are large on random networks: with
default initialisation the signal shrinks layer by layer (pre-activation spread 0.32 → 0.07 through
MNIST 6F), so these networks are nearly linear and their true curvature is tiny, while bounds
built from operator norms cannot see that the top singular directions of consecutive layers do
not align. The lower bounds there are not merely weak searches: ascents at input scales ×10 to
×1000 and second derivatives along the top singular directions of the Jacobian at 0 found no
larger values.

{tightness_table(rows)}

Compile time in seconds (including power iteration to convergence; same run):

{times_table(rows)}

Notes. The certified compositional bound of 6C2F is within a few per cent of the estimated one
(compare the two columns): LipLT's products of convolutions are materialised (one backward sweep
per end layer with at most 4096 outputs, `runtime/products.py`), bounded through the map between
two convolutions or through the composed kernel (`runtime/conv_products.py`,
docs/certified_norms.md); the two products that start at the 3-channel input keep the
composed-kernel bound (1.07–1.08× their estimates on random weights). Dense products (MLPs, 6F)
are multiplied out in float64 and certified exactly, which is why the certified and estimated
columns agree for them. The "trained" CIFAR models are weak classifiers (2 epochs on 5000
images); they are here for the weight statistics training produces, not as accurate models.

### Cost of `bf.margins()`

Pairwise margin bounds for all K(K−1)/2 pairs (the output block re-evaluated with c = e_i − e_j
folded into the last layer, batched over the pairs), timed next to one `bf()` evaluation of the
same compiled bound (best of 2–3 runs; compositional method; the last layer replaced by a random
K-class layer). The last two columns compare the pairwise curvature bounds with the global
route √2·M (smaller is better). The per-pair block norms ‖diag(c̃)W‖ and ‖diag(√|c̃|)W‖² are
exact eigenvalue problems while m³ × pairs ≤ 1e10 (`runtime/margins.PAIR_EIG_BUDGET`, m the hidden
width of the output block) and Schur-test bounds beyond (1–13 % looser than the exact ones and
10–40× faster, measured for K = 100 on MNIST 4F and CIFAR 6F; on the trained 6C2F of the
throughput benchmark the exact bounds certify 11 % more images at ε = 8/255, which is why the
budget covers K = 10 there).

{margins_table(mrows)}
"""


if __name__ == "__main__":
    main()
