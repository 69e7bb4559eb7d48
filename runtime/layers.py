"""Small layers curvbound knows by name, and smooth forms of torch functions that switch."""

from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = ["CenteredSoftplus", "smooth_softplus"]


def smooth_softplus(x: Tensor, beta: float = 1.0) -> Tensor:
    """log(1 + e^{βx})/β without torch's threshold: one smooth function on the whole line.

    ``torch.nn.functional.softplus(x, beta, threshold)`` returns x itself once βx > threshold, so
    it jumps by log(1 + e^{−threshold})/β there. This form never switches: with a = βx it
    computes a + log1p(e^{−a}) for a > 0 and log1p(e^{a}) for a ≤ 0 (both accurate to a few ulps;
    the clamps keep the branch that is not taken finite, so autograd gives σ'(0) = 1/2 exactly).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.tensor([20.5], dtype=torch.float64)
        >>> float(smooth_softplus(x) - F.softplus(x)) > 1e-9  # torch returns x above 20
        True
        >>> torch.allclose(smooth_softplus(torch.tensor([-3.0, 0.0, 3.0]), 2.0),
        ...                F.softplus(torch.tensor([-3.0, 0.0, 3.0]), 2.0))
        True
    """
    a = x * beta
    pos = a.clamp(min=0)
    neg = a.clamp(max=0)
    return (pos + (-pos).exp().log1p()).where(a > 0, neg.exp().log1p()) / beta


class CenteredSoftplus(nn.Module):
    """softplus_β(x) − log(2)/β: a softplus through the origin (σ(0) = 0), as in the paper.

    Unlike ``nn.Softplus`` it has no threshold: it computes the smooth softplus on the whole line
    (:func:`smooth_softplus`), so its certified bounds carry no switching error.

    Example:
        >>> import torch
        >>> CenteredSoftplus(beta=2.0)(torch.zeros(3))
        tensor([0., 0., 0.])
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return smooth_softplus(x, self.beta) - math.log(2.0) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
