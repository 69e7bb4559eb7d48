"""Cost of a training step with the curvature penalty, and how well the penalty tracks the bound.

Model: the paper's MNIST 6F (``curvbound.zoo.mnist_mlp(6)``, tanh), Adam, batch 256.

1. **Cost**: the step variants below run interleaved (one of each per round, so that they share
   the machine's load) and the median over rounds is reported, with its ratio to the plain step.
   A step is zero_grad + forward + loss + backward + optimiser step.
   - plain: cross-entropy;
   - penalty, refresh k: + ``CurvaturePenalty`` (weight 0.01) with ``refresh_steps=k``, k = 1, 5
     and 10 (the default, ``REFRESH_STEPS``);
   - margins penalty: ``margins=True`` (largest pairwise margin curvature), default refresh;
   - radius loss: + ``radius_loss(..., eps=0.3)`` (per-sample certified radius; K margin
     gradients by double backpropagation).
2. **Tracking**: training with the penalty (weight 0.01) for ``--steps`` steps, every 10 steps the
   value used in the loss is compared with the converged value on the same weights
   (``converge()`` on a copy of the vectors), for ``refresh_steps`` 1, 5 and 10.

Run from the repository root:
    python benchmarks/training_cost.py            # 30 rounds, 150 tracking steps
    python benchmarks/training_cost.py --quick    # 8 rounds, 60 tracking steps
Writes JSON to ``--out`` (default benchmarks/training_cost.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import curvbound
from curvbound import zoo
from curvbound.apps import data
from curvbound.apps.training import REFRESH_STEPS


def batches(n=4096):
    if data.has_dataset("mnist"):
        x, y = data.load_mnist("train", limit=n)
        return x.reshape(-1, 1, 28, 28), y, "MNIST"
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=gen)
    centres = torch.rand(10, 1, 28, 28, generator=gen)
    return (centres[y] + 0.2 * torch.randn(n, 1, 28, 28, generator=gen)), y, "synthetic"


def make_step(kind: str, x0):
    net = zoo.mnist_mlp(6).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    pen = None
    if kind.startswith("penalty, refresh "):
        pen = curvbound.CurvaturePenalty(net, x0, weight=0.01, refresh_steps=int(kind.split()[-1]))
    elif kind in ("margins penalty", "radius loss"):
        pen = curvbound.CurvaturePenalty(net, x0, weight=0.01, margins=True)

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        if kind == "radius loss":
            loss = loss + curvbound.radius_loss(net, x, y, pen, eps=0.3)
        elif pen is not None:
            loss = loss + pen()
        loss.backward()
        opt.step()

    return step


def cost(x, y, rounds: int, batch: int) -> dict:
    kinds = ["plain", "penalty, refresh 1", "penalty, refresh 5", "penalty, refresh 10",
             "margins penalty", "radius loss"]
    steps = {k: make_step(k, x[:1]) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    gen = torch.Generator().manual_seed(0)
    for r in range(rounds + 2):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        for k in kinds:
            t0 = time.perf_counter()
            steps[k](x[idx], y[idx])
            if r >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"median_s": med[k], "ratio": med[k] / med["plain"]} for k in kinds}


def tracking(x, y, steps: int, batch: int, refresh: int) -> dict:
    net = zoo.mnist_mlp(6).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    pen = curvbound.CurvaturePenalty(net, x[:1], weight=0.01, refresh_steps=refresh)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for s in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx]) + pen()
        loss.backward()
        if s % 10 == 0:
            used = pen.value
            state = {k: v.clone() for k, v in pen.bound.state_dict().items()}
            conv = pen.converge()
            pen.bound.load_state_dict(state)
            rows.append({"step": s, "used": used, "converged": conv, "ratio": used / conv})
        opt.step()
    return {"rows": rows, "min_ratio": min(r["ratio"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/training_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds, steps = (8, 60) if args.quick else (30, 150)
    x, y, source = batches()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread",
        "model": "MNIST 6F (784-100x5-10, tanh)", "data": source, "batch": args.batch,
        "default_refresh_steps": REFRESH_STEPS, "rounds": rounds,
        "cost": cost(x, y, rounds, args.batch),
        "tracking": {str(r): tracking(x, y, steps, args.batch, r) for r in (1, 5, 10)},
    }
    print(f"{result['model']}, batch {args.batch}, {source} data, median of {rounds} rounds")
    print(f"{'step':<20} {'ms':>8} {'ratio':>7}")
    for k, v in result["cost"].items():
        print(f"{k:<20} {1e3 * v['median_s']:8.1f} {v['ratio']:7.2f}")
    for r, t in result["tracking"].items():
        last = t["rows"][-1]
        print(f"tracking, refresh_steps={r}: min used/converged {t['min_ratio']:.3f}; "
              f"at step {last['step']}: used {last['used']:.3f}, converged {last['converged']:.3f}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
