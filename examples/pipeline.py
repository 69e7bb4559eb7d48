"""The three stages on one small residual network: trace → per-node bounds → generated code.

Run: python examples/pipeline.py (its output is what the package docstring and docs/index.md show).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import curvbound


class TinyResidual(nn.Module):
    """x ↦ out(h + softplus₂(fc2 h)), h = tanh(fc1 x)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + F.softplus(self.fc2(h), beta=2.0)
        return self.out(h)


def main() -> None:
    torch.manual_seed(0)
    model = TinyResidual().eval()
    bf = curvbound.compile(model, torch.zeros(1, 4), norms="certified")
    print("1. traced graph (torch.fx):")
    print(bf.gm.graph)
    print("2. per-node bounds:")
    print(bf.table())
    print("3. generated bound function (bf.code):")
    print(bf.code)
    print("bf() ->", bf())


if __name__ == "__main__":
    main()
