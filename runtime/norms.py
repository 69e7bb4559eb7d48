"""Norm quantities: the numbers a bound function reads at run time.

A :class:`Quantity` is a small module computing one scalar from the model's live parameters. The
only kind the core needs is :class:`Norm`, the spectral norm of a linear operator, in one of two
modes:

- ``"estimate"``: ‖A u‖ for a unit vector ``u`` held as a buffer and advanced by power iteration
  (:meth:`Norm.step`). It approaches ‖A‖ **from below**; its gradient in the weights is the spectral
  normalisation gradient. Fast and differentiable: for training and quick looks.
- ``"certified"``: a guaranteed upper bound in float64 (exact SVD, circulant embedding of
  convolutions, Schur test for pooling...), times ``1 + SAFETY_MARGIN``. Cached until a parameter
  changes. Not differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .operators import LinearOperator

__all__ = ["Quantity", "Norm", "Constant", "MODES"]

MODES = ("estimate", "certified")


class Quantity(nn.Module):
    """A named scalar computed at run time. ``certified`` says whether it is a guaranteed bound."""

    certified: bool = False

    def step(self, steps: int = 1) -> None:
        """Advance internal iterative state (no-op by default)."""

    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Constant(Quantity):
    """A fixed number (an exact constant or a certified one computed once)."""

    def __init__(self, value: float, certified: bool = True, label: str = ""):
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value), dtype=torch.float64))
        self.certified, self.label = certified, label

    def forward(self) -> Tensor:
        return self.value


def _unit(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((1, *shape), generator=g, dtype=torch.float64)
    return (u / u.norm()).to(dtype)


class Norm(Quantity):
    """Spectral norm ‖A‖₂ of a linear operator, estimated (power iteration) or certified.

    Example:
        >>> import torch
        >>> from curvbound.runtime.operators import Dense
        >>> W = torch.diag(torch.tensor([3.0, 1.0]))
        >>> n = Norm(Dense(lambda: W, (2,), (2,)), "estimate")
        >>> n.step(50)
        >>> round(float(n()), 4)
        3.0
        >>> round(float(Norm(Dense(lambda: W, (2,), (2,)), "certified")()), 6)
        3.0
    """

    def __init__(
        self,
        op: LinearOperator,
        mode: str = "estimate",
        *,
        seed: int = 0,
        label: str = "",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"norms must be one of {MODES}, got {mode!r}")
        self.op, self.mode, self.label = op, mode, label or op.describe()
        self.certified = mode == "certified"
        ref = op.tensors()
        if dtype is None:
            dtype = ref[0].dtype if ref and ref[0].is_floating_point() else torch.float32
        self.register_buffer("u", _unit(tuple(op.in_shape), dtype, seed))
        self._cache: tuple[tuple, Tensor] | None = None

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.op.tensors())

    def forward(self) -> Tensor:
        if self.certified:
            key = self._key()
            if self._cache is None or self._cache[0] != key:
                from .certified import certify

                with torch.no_grad():
                    self._cache = (key, certify(self.op.certified_norm().double()))
            return self._cache[1]
        return self.op.apply(self.u).norm()

    @torch.no_grad()
    def step(self, steps: int = 1) -> None:
        """``steps`` power iterations u ← AᵀAu/‖AᵀAu‖ (the adjoint by autograd)."""
        if self.certified:
            return
        u = self.u
        for _ in range(steps):
            w = self.op.gram(u.to(self._dtype()))
            n = w.norm()
            if not torch.isfinite(n) or n == 0:
                break
            u = (w / n).to(self.u.dtype)
        self.u.copy_(u)

    def _dtype(self) -> torch.dtype:
        ref = self.op.tensors()
        return ref[0].dtype if ref and ref[0].is_floating_point() else self.u.dtype

    def extra_repr(self) -> str:
        return f"{self.label}, mode={self.mode}"
