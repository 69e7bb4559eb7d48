"""The main job: compile two models into bound functions and print what they say.

Run with `make demo` (sets everything up first) or `python examples/demo.py`.
For each model it prints the per-node bound table and the whole-network Lipschitz and curvature
bounds for each method, estimated (power iteration) and certified (guaranteed), next to empirical
lower bounds found by gradient ascent: every bound must sit above its lower bound.
"""

from __future__ import annotations

import time

import torch

import curvbound
from curvbound import zoo
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound


def show(name: str, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    print(f"\n=== {name}: input {tuple(input_shape)} ===")
    x = torch.zeros(1, *input_shape)
    t0 = time.perf_counter()
    bf = curvbound.compile(model, x, norms="certified")
    print(f"compiled in {time.perf_counter() - t0:.2f} s; per-node bounds (compositional):")
    print(bf.table())
    print()
    print(f"{'method':15s} {'norms':10s} {'Lipschitz':>12s} {'curvature':>12s}")
    for method in ("naive", "compositional"):
        for norms in ("estimate", "certified"):
            out = curvbound.compile(model, x, method=method, norms=norms)()
            print(
                f"{method:15s} {norms:10s} {float(out.lipschitz.detach()):12.5g} "
                f"{float(out.curvature.detach()):12.5g}"
            )
    lip = lipschitz_lower_bound(model, input_shape, samples=8, steps=20)
    curv = curvature_lower_bound(model, input_shape, samples=8, steps=20)
    print(f"{'empirical':15s} {'lower bd':10s} {lip:12.5g} {curv:12.5g}")


def main() -> None:
    torch.manual_seed(0)
    for name in ("residual_cnn_bn", "mnist_6f"):
        model, shape = zoo.ZOO[name]()
        show(name, model, tuple(shape))


if __name__ == "__main__":
    main()
