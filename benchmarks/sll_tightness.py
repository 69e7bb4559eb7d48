"""Tightness of the SLL layer rules (curvbound.nn): certified L and M of single SLL layers against
empirical lower bounds (``apps.empirical``, gradient ascent over input pairs, float64).

Each layer has its default initialisation (``torch.manual_seed(0)``; xavier weights, q = 1).
"M naive" is the row-scaled bound sup|σ''|·‖diag(√(r∘s))W‖² alone, "M comp" the smaller of it and
the vectorised-Jacobian bound (theory §3; rule ``curvbound.apps.nn.sll_rule``). Every ratio must be
≥ 1.

    python benchmarks/sll_tightness.py
"""

from __future__ import annotations

import platform
import time

import torch
from torch import nn

import curvbound
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound
from curvbound.nn import SLLConv2d, SLLLinear

LAYERS = [
    ("SLLLinear(16), tanh", lambda: SLLLinear(16, activation="tanh"), (16,)),
    ("SLLLinear(16, 32), softplus", lambda: SLLLinear(16, 32, activation="softplus"), (16,)),
    ("SLLLinear(64), centered softplus",
     lambda: SLLLinear(64, activation="centered_softplus"), (64,)),
    ("SLLConv2d(4), tanh, 4×6×6", lambda: SLLConv2d(4, activation="tanh"), (4, 6, 6)),
    ("SLLConv2d(3, k5, inner 6), softplus, 3×8×8",
     lambda: SLLConv2d(3, 5, 6, activation="softplus"), (3, 8, 8)),
]


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {platform.platform()}, torch {torch.__version__}")
    header = (f"{'layer':44s} {'L cert':>9s} {'L emp':>7s} {'M comp':>8s} {'M naive':>8s} "
              f"{'M emp':>7s} {'comp/emp':>9s} {'naive/emp':>10s}")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for name, make, shape in LAYERS:
        torch.manual_seed(0)
        net = nn.Sequential(make()).double().eval()
        x = torch.zeros(1, *shape, dtype=torch.float64)
        res = {}
        for method in ("naive", "compositional"):
            out = curvbound.compile(net, x, method=method, norms="certified")()
            assert out.certified
            res[method] = (float(out.lipschitz), float(out.curvature))
        lip = lipschitz_lower_bound(net, shape, samples=32, steps=80, seed=0)
        curv = curvature_lower_bound(net, shape, samples=32, steps=80, seed=0)
        (L, Mc), Mn = res["compositional"], res["naive"][1]
        print(f"{name:44s} {L:9.6f} {lip:7.4f} {Mc:8.4f} {Mn:8.4f} {curv:7.4f} "
              f"{Mc / curv:9.2f} {Mn / curv:10.2f}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
