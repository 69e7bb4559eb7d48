"""Small layers curvbound knows by name."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenteredSoftplus"]


class CenteredSoftplus(nn.Module):
    """softplus_β(x) − log(2)/β: a softplus through the origin (σ(0) = 0), as in the paper.

    Example:
        >>> import torch
        >>> CenteredSoftplus(beta=2.0)(torch.zeros(3))
        tensor([0., 0., 0.])
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, beta=self.beta) - math.log(2.0) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
