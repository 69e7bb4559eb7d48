"""A small ℓ2 PGD attack: the empirical counterpart of certified radii (an attack that succeeds
inside a certified radius would be a soundness bug).

>>> import torch
>>> net = torch.nn.Linear(2, 2).double()
>>> with torch.no_grad():
...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
>>> x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # class 0; boundary at ‖δ‖ = 1/√2
>>> [pgd_l2(net, x, torch.tensor([eps]))[1].item() for eps in (0.70, 0.72)]
[False, True]
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["pgd_l2"]


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    eps: Tensor | float,
    *,
    label: Tensor | None = None,
    steps: int = 50,
    restarts: int = 2,
    step_size: float = 2.5,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """ℓ2 PGD on the margin max_{i≠y} f_i − f_y within ‖δ‖ ≤ eps (per sample), in float64.

    ``label`` defaults to the model's prediction at x. Each restart starts at a random point of
    the ball (the first at x itself) and takes ``steps`` normalised-gradient steps of length
    ``step_size``·eps/steps, projecting back onto the ball. Returns ``(x_adv, success)``: the best
    point found per sample and whether the prediction there differs from ``label``.
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.detach().to(torch.float64)
    b = len(x)
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand(b).reshape(b, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        y = model(x).argmax(dim=1) if label is None else label.long()
    gen = torch.Generator().manual_seed(seed)
    best = x.clone()
    best_val = torch.full((b,), -torch.inf, dtype=torch.float64)
    alpha = step_size * eps_t / steps
    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x)
        else:
            d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            d = d / _norm(d)
            delta = (
                d
                * eps_t
                * torch.rand((b,) + (1,) * (x.dim() - 1), generator=gen, dtype=torch.float64)
            )
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            with torch.enable_grad():
                val = _margin(model(x + delta), y)
                (grad,) = torch.autograd.grad(val.sum(), delta)
            with torch.no_grad():
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best[better] = (x + delta)[better]
                delta = delta + alpha * grad / _norm(grad)
                delta = delta * torch.clamp(eps_t / _norm(delta), max=1.0)
    with torch.no_grad():
        success = model(best).argmax(dim=1) != y
    return best, success


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(-1, *([1] * (v.dim() - 1)))


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    own = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return other - own
