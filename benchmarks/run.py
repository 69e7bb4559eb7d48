"""Performance benchmarks in one command: compile times, the per-call cost of the bound (the
training penalty) and its torch op count, optionally side by side with another git revision.

    python benchmarks/run.py [--quick] [--baseline REV] [--repeats N] [--json PATH] [--no-docs]

Every measurement runs in a fresh subprocess (``--worker``) with one torch thread; with
``--baseline REV`` the same measurements run on ``git archive REV`` in the same session, so the
ratios compare like with like on a shared machine. Times are CPU (process) times with one torch
thread, which a loaded machine distorts far less than wall time. Results go to
``benchmarks/results.json`` and the table between the ``perf-table`` markers of
``docs/benchmarks.md`` is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


# ----------------------------------------------------------------------------- measurements
def _task_models(name: str, quick: bool):
    import torch
    from torch import nn

    from curvbound.apps import zoo

    if name == "wide":
        n = 1024 if quick else 4096
        with zoo._seeded(0):
            model = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, 10)).eval()
        return f"Linear({n},{n})+tanh+Linear({n},10)", model, torch.zeros(1, n)
    if name == "deep":
        d = 100 if quick else 1000
        return (f"{d}-layer width-32 tanh MLP", zoo.mlp([32] * (d + 1), nn.Tanh),
                torch.zeros(1, 32))
    if name == "6f":
        return "MNIST 6F", zoo.mnist_mlp(6), torch.zeros(1, 1, 28, 28)
    if name == "6c2f":
        return "CIFAR 6C2F", zoo.cifar_6c2f(), torch.zeros(1, 3, 32, 32)
    raise ValueError(name)


def _worker(task: str, quick: bool, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import curvbound

    kind, _, which = task.partition(":")
    label, model, x = _task_models(which, quick)
    if kind == "compile":
        t0, c0 = time.perf_counter(), time.process_time()
        bf = curvbound.compile(model, x)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():
            out = bf()
        return {"label": label, "wall_s": wall, "cpu_s": cpu, "L": float(out.lipschitz),
                "M": float(out.curvature)}
    if kind == "penalty":
        return _penalty(curvbound, model, x, label, repeats)
    if kind == "tcompile":
        return _tcompile(curvbound, model, x, label, repeats)
    raise ValueError(task)


def _penalty(curvbound, model, x, label: str, repeats: int) -> dict:
    """One penalty call (bf(refresh=1) value + backward) against one plain training step of the
    model (batch 256, cross-entropy, SGD), medians over ``repeats``; torch ops per call."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    bf = curvbound.compile(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(256, *x.shape[1:], generator=g)
    yb = torch.randint(0, 10, (256,), generator=g)

    def plain():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    def penalised():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb) + bf(refresh=1).curvature
        loss.backward()
        opt.step()

    def penalty_only():
        opt.zero_grad()
        bf(refresh=1).curvature.backward()

    def median(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.process_time()  # CPU time: robust on a shared machine (one thread)
            fn()
            ts.append(time.process_time() - t)
        return statistics.median(ts)

    ops = {}
    for refresh in (0, 1):
        with Count() as c:
            bf(refresh=refresh).curvature.backward()
        ops[f"ops_refresh{refresh}"] = c.n
    # interleaved: each round measures the three side by side
    rounds = [(median(plain), median(penalised), median(penalty_only)) for _ in range(3)]
    p, q, r = (statistics.median(v) for v in zip(*rounds))
    return {"label": label, "plain_step_s": p, "penalised_step_s": q, "penalty_call_s": r,
            "ratio": q / p, **ops}


def _tcompile(curvbound, model, x, label: str, repeats: int, backend: str = "inductor") -> dict:
    """``bf.compiled()`` against ``bf``: the training step with the penalty (bf(refresh=1) /
    cb(refresh=1) value + backward, batch 256) over the plain step, eager and compiled; the first
    compiled call (compile time, wall and CPU); graphs, graph breaks and recompiles over the
    timed calls; torch ops per eager call and ops in the captured graph."""
    import torch
    from torch._dynamo.utils import counters

    bf = curvbound.compile(model, x)
    cb = bf.compiled(backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(256, *x.shape[1:], generator=g)
    yb = torch.randint(0, 10, (256,), generator=g)

    def step(pen):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if pen is not None:
            loss = loss + pen(refresh=1).curvature
        loss.backward()
        opt.step()

    def median(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            ts.append(time.process_time() - t)
        return statistics.median(ts)

    counters.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    first = cb(refresh=1)
    first.curvature.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    captured = counters["stats"]["calls_captured"]
    eager_value = float(bf().curvature)
    rounds = [(median(lambda: step(None)), median(lambda: step(bf)), median(lambda: step(cb)))
              for _ in range(3)]
    p, e, c = (statistics.median(v) for v in zip(*rounds))
    _, ops = _count_ops(lambda: bf(refresh=1).curvature.backward())
    return {"label": label, "backend": backend, "first_call_wall_s": wall,
            "first_call_cpu_s": cpu, "plain_step_s": p, "eager_step_s": e,
            "compiled_step_s": c, "eager_ratio": e / p, "compiled_ratio": c / p,
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters
            else 0,
            "ops_eager_refresh1": ops, "ops_captured_refresh1": captured,
            "M_compiled_first": float(first.curvature), "M_eager": eager_value}


def _count_ops(fn):
    """Run ``fn`` counting the torch (aten) ops it dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        out = fn()
    return out, c.n


# ----------------------------------------------------------------------------- orchestration
def _export(rev: str, into: Path) -> Path:
    """``git archive rev`` unpacked as ``into/curvbound`` (importable with PYTHONPATH=into)."""
    target = into / "curvbound"
    target.mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                          capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(target, filter="data")
    return into


def _run(task: str, pythonpath: Path, quick: bool, repeats: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--repeats",
           str(repeats)] + (["--quick"] if quick else [])
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, 1 thread, load average {load:.1f} at the start")


def _fmt(v, unit="s") -> str:
    if v is None:
        return "—"
    if unit:
        return f"{v:.2f} {unit}"
    return f"{v:,}" if isinstance(v, int) else f"{v:.2f}×"


def _table(results: dict, baseline: str | None) -> str:
    cur, base = results["current"], results.get("baseline", {})
    head = "| what | " + (f"baseline `{baseline}` | " if baseline else "") + "now | now/baseline |"
    lines = [head, "|---|" + ("---|" if baseline else "") + "---|---|"]

    def row(what, key, task, unit="s"):
        c = cur.get(task, {})
        b = base.get(task, {})
        cv, bv = c.get(key), b.get(key)
        cells = [what]
        if baseline:
            cells.append(b.get("error") or _fmt(bv, unit))
        cells.append(c.get("error") or _fmt(cv, unit))
        ratio = ""
        if bv and cv:
            ratio = f"{cv / bv:.2f}"
        cells.append(ratio)
        lines.append("| " + " | ".join(cells) + " |")

    for task in results["tasks"]:
        kind, _, _ = task.partition(":")
        label = cur.get(task, {}).get("label") or base.get(task, {}).get("label") or task
        if kind == "compile":
            row(f"compile (norms='estimate', CPU time), {label}", "cpu_s", task)
        elif kind == "tcompile":
            row(f"bf.compiled(): first call (compile), wall, {label}", "first_call_wall_s", task)
            row(f"step with the penalty / plain step, eager bf, {label}", "eager_ratio", task, "")
            row(f"step with the penalty / plain step, compiled, {label}", "compiled_ratio",
                task, "")
        else:
            row(f"penalty call bf(refresh=1) value + backward, {label}", "penalty_call_s", task)
            row(f"training step with the penalty / plain step (batch 256), {label}", "ratio",
                task, unit="")
            row(f"torch ops per penalty call (refresh=0), {label}", "ops_refresh0", task, "")
            row(f"torch ops per penalty call (refresh=1), {label}", "ops_refresh1", task, "")
    return "\n".join(lines)


def _write_doc(table: str, meta: str) -> None:
    text = DOC.read_text()
    block = f"{BEGIN}\n{meta}\n\n{table}\n{END}"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n## Performance (benchmarks/run.py)\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--baseline", help="git revision to measure side by side")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--tasks", default=None, help="comma-separated subset")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.quick, repeats)))
        return
    tasks = (args.tasks.split(",") if args.tasks else
             ["compile:wide", "compile:deep", "compile:6f", "compile:6c2f", "penalty:6f"])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict = {"machine": _machine(), "started": started, "quick": args.quick,
                     "repeats": repeats, "tasks": tasks, "current": {}}
    with tempfile.TemporaryDirectory() as tmp:
        impls = {"current": ROOT.parent}
        if args.baseline:
            impls["baseline"] = _export(args.baseline, Path(tmp))
            results["baseline_rev"] = args.baseline
        for task in tasks:  # side by side: each task on every implementation in turn
            for name, path in impls.items():
                r = _run(task, path, args.quick, repeats, args.timeout)
                results.setdefault(name, {})[task] = r
                print(f"{name:9s} {task:14s} {json.dumps(r)}", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results, args.baseline)
    print(table)
    if not args.no_docs:
        mode = "quick" if args.quick else "full"
        meta = (f"Command: `python benchmarks/run.py{' --quick' if args.quick else ''}"
                f"{' --baseline ' + args.baseline if args.baseline else ''}` ({mode} run, "
                f"{started}). Machine: {results['machine']}. Times are medians over {repeats} "
                "repeats of CPU time (process time, one torch thread: robust to the load; compile: "
                "one run each); the two columns ran side by side, task by task, in one session.")
        _write_doc(table, meta)


if __name__ == "__main__":
    main()
