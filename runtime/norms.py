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

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from .certified import certify
from .operators import Chain, FunctionOperator, LinearOperator, RowNormScaled, exact_arithmetic

__all__ = ["Quantity", "Norm", "Constant", "MODES", "shared_evaluation"]

MODES = ("estimate", "certified")


#: The values computed in the current :func:`shared_evaluation` block, by quantity id.
_SHARED: ContextVar[dict[int, object] | None] = ContextVar("curvbound_shared", default=None)
#: The same under torch.compile (dynamo cannot trace a ContextVar): a stack of plain dicts, which
#: dynamo tracks, so that every quantity is one node of the captured graph, read by every reader.
_TRACED: list[dict[int, object]] = []


@contextmanager
def shared_evaluation(known: dict[int, object] | None = None) -> Iterator[None]:
    """Inside the block every :class:`Quantity` called without arguments is evaluated once and
    its value (the same tensor, with its autograd graph) shared by every later call: the
    generated code and each LipLT factor read the same product norms, which were otherwise
    recomputed by every reader. Parameters must not change inside the block; nested blocks
    share the outer one. :meth:`BoundFunction.forward` opens one per call. ``known`` pre-sets
    values by ``id(quantity)`` (the convergence loop evaluates ``static`` quantities once).

    >>> from curvbound.runtime.operators import Dense
    >>> W = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> n = Norm(Dense(lambda: W, (2,), (2,)), "estimate")
    >>> with shared_evaluation():
    ...     a, b = n(), n()
    >>> a is b, n() is n()
    (True, False)
    """
    if torch.compiler.is_compiling():
        if _TRACED:
            yield
            return
        _TRACED.append(dict(known or {}))
        try:
            yield
        finally:
            _TRACED.pop()
        return
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set(dict(known or {}))
    try:
        yield
    finally:
        _SHARED.reset(token)


class Quantity(nn.Module):
    """A named scalar computed at run time. ``certified`` says whether it is a guaranteed bound;
    ``note`` says why not, where a certified one was asked for and could not be had.
    Within :func:`shared_evaluation` each quantity is evaluated once."""

    certified: bool = False
    note: str = ""
    #: True when the value does not depend on power-iteration state (only on the parameters):
    #: the convergence loop of ``bf.refresh()`` then evaluates it once
    static: bool = False

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            memo = _TRACED[-1] if _TRACED else None
        else:
            memo = _SHARED.get()
        if memo is None or args or kwargs:
            return super().__call__(*args, **kwargs)
        key = id(self)
        if key not in memo:
            memo[key] = super().__call__()
        return memo[key]

    def step(self, steps: int = 1) -> None:
        """Advance internal iterative state (no-op by default)."""

    def settle(self) -> None:
        """Set iteration state to its exact value where a direct solve is cheap (no-op by
        default); ``bf.refresh()`` calls it before converging the power iterations."""

    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Constant(Quantity):
    """A fixed number (an exact constant or a certified one computed once)."""

    static = True

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


def same_values(saved: list[Tensor], current: list[Tensor]) -> bool:
    """Whether two lists of tensors are equal in shape, dtype, device and every value (the key of
    the certified caches: a version counter or data pointer misses ``p.data`` updates)."""
    if len(saved) != len(current):
        return False
    return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
               and torch.equal(a, b) for a, b in zip(saved, current))


def _cacheable(op: LinearOperator) -> bool:
    """False when the operator may read tensors it does not list (a user function given neither
    ``params`` nor ``norm_bound``): its certified norm is then recomputed on every call."""
    if isinstance(op, FunctionOperator):
        return op.params is not None or op.norm_bound is not None
    if isinstance(op, Chain):
        return all(_cacheable(o) for o in op.ops)
    if isinstance(op, RowNormScaled):
        return _cacheable(op.op)
    return True


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

    def _cached(self, current: list[Tensor], cache: tuple | None = None) -> Tensor | None:
        """The cached certified value (``self._cache``, or ``cache``) if it was computed from
        exactly these tensor values."""
        cache = self._cache if cache is None else cache
        if cache is None or not _cacheable(self.op):
            return None
        saved, value = cache
        return value if same_values(saved, current) else None

    def forward(self) -> Tensor:
        if self.certified:
            # Computed in float64 from the live parameters (exact_arithmetic) and cached by the
            # *values* of the tensors it reads, in float64: a version counter or a data pointer
            # misses `p.data` updates and reuses freed addresses for recomputed derived tensors.
            with exact_arithmetic(), torch.no_grad():
                current = [t.detach() for t in self.op.tensors()]
                value = self._cached(current)
                if value is None:
                    value = certify(self.op.certified_norm().double())
                    self._cache = ([t.clone() for t in current], value)
                    self.note = self.op.bound_note  # how a looser fallback bound was obtained
            return value
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
