"""Model factories for the command line examples of docs/cli.md (``curvbound inspect FILE:NAME``).

A factory returns a model, or a ``(model, input_shape)`` pair so that ``--input-shape`` can be
left out.
"""

from __future__ import annotations

import torch
from torch import nn

from curvbound import zoo


def residual_cnn():
    """An 8-block residual CNN with batch norm on 3×32×32 inputs (random weights)."""
    return zoo.residual_cnn_bn(in_channels=3, channels=8, size=32, blocks=8), (3, 32, 32)


def digits_mlp():
    """A 64-64-10 tanh MLP for the 8×8 digits (``curvbound certify ... --data digits``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)), (1, 8, 8)


class SortTopK(nn.Module):
    """Uses two ops curvbound has no rule for: ``inspect`` lists both and exits with code 3."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.sort(self.fc(x), dim=1).values
        return torch.topk(h, 3, dim=1).values


def sort_topk():
    return SortTopK(), (6,)
