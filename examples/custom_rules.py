"""Registering rules for your own layers: an activation in one line, a linear layer in three.

Run: python examples/custom_rules.py   (tests/test_examples.py runs it too)
"""

from __future__ import annotations

import torch
from torch import nn

import curvbound


class Swish(nn.Module):
    """x·sigmoid(x). fx sees a product of two input-dependent tensors, which has no generic rule."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class Tied(nn.Module):
    """A linear layer with a tied, scaled weight: y = s·Wᵀx (a user layer fx would trace into)."""

    def __init__(self, weight: nn.Parameter, scale: float):
        super().__init__()
        self.weight, self.scale = weight, scale

    def forward(self, x):
        return self.scale * x @ self.weight


# One line for a smooth activation: sup|σ'| and sup|σ''| (SiLU: ≈1.0998 at x≈2.40, 1/2 at 0).
curvbound.activation(Swish, slope=1.0999, curvature=0.5)


# A linear layer: hand curvbound the live weight (it computes the norm, estimated or certified).
@curvbound.rule(Tied)
def tied(node, ctx):
    """Tied: ‖s·Wᵀ‖ = |s|·‖W‖."""
    m = ctx.module
    return ctx.dense(lambda: m.scale * m.weight.T)


def main() -> None:
    torch.manual_seed(0)
    enc = nn.Linear(6, 4)
    model = nn.Sequential(enc, Swish(), Tied(enc.weight, 0.5), nn.Tanh()).eval()
    bf = curvbound.compile(model, torch.zeros(1, 6), norms="certified")
    print(bf.table())


if __name__ == "__main__":
    main()
