"""Certified vs estimated norms: compile time, per-call time and per-layer ratios, side by side.

For each model (MNIST 6F, CIFAR-10 6C2F, CIFAR-10 6F from ``curvbound.zoo``; float32, random
weights) the script measures in one run, alternating the two modes:

- compile: ``curvbound.compile(..., norms=mode)``; for "estimate" this includes refreshing the
  power iterations to convergence (the default), for "certified" computing every certified norm;
- call: ``bf()`` with unchanged weights (certified norms come from the cache, estimates are one
  ``‖A u‖`` each);
- call after a weight update: every parameter is changed by a relative 1e-6 first, so certified
  norms are recomputed, and estimates take ``refresh=1`` (one power-iteration step each, the
  training setting).

It then reports, per norm quantity, certified / converged estimate (power iteration to a relative
change below 1e-9 per 10 steps), and the resulting L and M.

Run from the repository root:  python benchmarks/certified_timing.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

import curvbound
from curvbound import zoo

MODELS = {
    "MNIST 6F": lambda: (zoo.mnist_mlp(6), (1, 28, 28)),
    "CIFAR 6C2F": lambda: (zoo.cifar_6c2f(), (3, 32, 32)),
    "CIFAR 6F": lambda: (zoo.cifar_6f(), (3, 32, 32)),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _nudge(model: torch.nn.Module, k: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + (1e-6 if k % 2 else -1e-6))


def bench(name: str, repeats: int) -> None:
    model, shape = MODELS[name]()
    x = torch.zeros(1, *shape)
    times: dict[tuple[str, str], list[float]] = {}
    bfs = {}
    for k in range(repeats):
        for mode in ("estimate", "certified"):
            t = _timed(lambda: bfs.__setitem__(mode, curvbound.compile(model, x, norms=mode)))
            times.setdefault((mode, "compile"), []).append(t)
            bf = bfs[mode]
            bf()
            times.setdefault((mode, "call"), []).append(_timed(lambda: bf()))
            _nudge(model, k)
            call = (lambda: bf(refresh=1)) if mode == "estimate" else (lambda: bf())
            times.setdefault((mode, "update"), []).append(_timed(call))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n## {name}  (median of {repeats})")
    print(f"{'':34s}{'estimate':>12s}{'certified':>12s}{'cert/est':>10s}")
    rows = [("compile", "compile (s)"), ("call", "bf() (ms)"),
            ("update", "bf() after a weight update (ms)")]
    for key, label in rows:
        scale = 1 if key == "compile" else 1e3
        e, c = med["estimate", key] * scale, med["certified", key] * scale
        print(f"{label:34s}{e:12.3f}{c:12.3f}{c / e:10.2f}")

    est = curvbound.compile(model, x, norms="estimate", refresh=False)
    est.refresh(tol=1e-9, max_steps=20000)
    cert = bfs["certified"]
    ev, cv = est.quantity_values(), cert.quantity_values()
    print(f"\n{'quantity':24s}{'operator':44s}{'estimate':>11s}{'certified':>11s}{'ratio':>8s}")
    for q in cert.quantities:
        label = cert.quantities[q].label
        label = label if len(label) <= 42 else label[:39] + "..."
        print(f"{q:24s}{label:44s}{ev[q]:11.5g}{cv[q]:11.5g}{cv[q] / ev[q]:8.4f}")
    e_out, c_out = est(), cert()
    print(f"{'L':68s}{float(e_out.lipschitz):11.5g}{float(c_out.lipschitz):11.5g}"
          f"{float(c_out.lipschitz) / float(e_out.lipschitz):8.4f}")
    print(f"{'M':68s}{float(e_out.curvature):11.5g}{float(c_out.curvature):11.5g}"
          f"{float(c_out.curvature) / float(e_out.curvature):8.4f}")
    print(f"certified: {c_out.certified}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"command: python benchmarks/certified_timing.py --repeats {args.repeats} "
          f"--threads {args.threads}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} torch threads")
    for name in args.models:
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
