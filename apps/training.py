"""Training with the curvature bound as a regulariser (theory §9).

The bound function's estimated norms are differentiable in the weights (with the power-iteration
vectors held fixed, as in spectral normalisation), so ``bf().curvature`` can enter a loss.
:class:`CurvatureRegularizer` adds the primal–dual weight update of the paper:
λ ← max(λ + η·(M − M_target), λ_min).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..compiler.bound_function import BoundFunction

__all__ = ["CurvatureRegularizer"]


@dataclass
class CurvatureRegularizer:
    """``λ·M`` for a compiled bound, with warm-started power iterations and a dual update.

    Each call advances every power iteration by ``refresh_steps`` (the vectors are buffers of the
    bound function), evaluates the curvature bound on the live weights and returns ``λ·M``;
    :meth:`update` then moves λ towards the target. Converge the estimates (``bf.refresh()``)
    before reporting a number.

    Example:
        >>> import torch, curvbound
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> reg = CurvatureRegularizer(curvbound.compile(net, torch.zeros(1, 2)), target=0.1)
        >>> penalty = reg()
        >>> penalty.backward()          # gradients reach the model's weights
        >>> net[0].weight.grad is not None
        True
        >>> reg.update()                # λ grows while M is above the target
        >>> reg.lam > 0.01
        True
    """

    bound: BoundFunction
    target: float
    lam: float = 0.01
    dual_lr: float = 0.01
    lam_min: float = 0.0
    refresh_steps: int = 1
    last: float = float("nan")

    def __call__(self) -> Tensor:
        out = self.bound(refresh=self.refresh_steps)
        self.last = float(out.curvature.detach())
        return self.lam * out.curvature

    @torch.no_grad()
    def update(self) -> None:
        """Dual ascent on λ using the curvature of the last call."""
        self.lam = max(self.lam + self.dual_lr * (self.last - self.target), self.lam_min)
