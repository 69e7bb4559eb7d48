"""Linear operators: the linear part of an affine node, reading the model's live parameters.

An operator maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)`` and knows three things about itself:
how to apply itself (power iteration uses it with autograd for the adjoint), upper bounds on the
ℓ2 norms of its rows (for the row-norm block rule, theory §3 (d)), and a *certified* (guaranteed)
upper bound on its spectral norm. Operators hold references to modules or parameter getters, never
copies of tensors, so an optimiser step is seen without recompiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LinearOperator",
    "Dense",
    "Conv",
    "Diagonal",
    "Scalar",
    "Reshape",
    "FunctionOperator",
    "Chain",
    "RowNormScaled",
    "MATERIALIZE_LIMIT",
]

#: Operators with at most this many input (or output) entries are materialised for an exact
#: float64 SVD when no structure-specific certified norm exists.
MATERIALIZE_LIMIT = 4096

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


class LinearOperator:
    """Base class. Subclasses set ``in_shape``, ``out_shape`` and implement :meth:`apply`."""

    in_shape: Shape
    out_shape: Shape
    #: norm exactly 1 and the map only permutes/reshapes coordinates (flatten, permute, view)
    isometric: bool = False

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """The live tensors the operator reads (for caching and finiteness checks)."""
        return []

    def gram(self, u: Tensor) -> Tensor:
        """AᵀA u, the power-iteration step; the adjoint comes from autograd unless overridden."""
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            y = self.apply(x)
            (g,) = torch.autograd.grad(y, x, y.detach())
        return g

    def row_norms(self) -> Tensor | None:
        """Upper bounds on the ℓ2 norms of the rows, broadcastable to ``out_shape``, or None."""
        return None

    def row_scaled(self) -> LinearOperator | None:
        """The operator diag(r)·A with r = :meth:`row_norms`, or None when r is unavailable."""
        if self.row_norms() is None:
            return None
        return RowNormScaled(self)

    def certified_norm(self) -> Tensor:
        """A guaranteed upper bound on ‖A‖₂, float64 (before the global safety margin)."""
        if min(_numel(self.in_shape), _numel(self.out_shape)) <= MATERIALIZE_LIMIT:
            return _materialized_norm(self)
        raise NotImplementedError(
            f"{self.describe()} has no certified norm: its structure is unknown and it is too "
            f"large to materialise ({self.in_shape} -> {self.out_shape})"
        )

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.describe()}[{self.in_shape} -> {self.out_shape}]"


def _materialized_norm(op: LinearOperator) -> Tensor:
    from . import certified

    n = _numel(op.in_shape)
    with torch.no_grad():
        ref = op.tensors()
        dtype = ref[0].dtype if ref else torch.float64
        eye = torch.eye(n, dtype=dtype, device=ref[0].device if ref else None)
        cols = op.apply(eye.reshape(n, *op.in_shape)).reshape(n, -1)
        return certified.dense_norm(cols.double().T)


class Dense(LinearOperator):
    """x ↦ W x for a weight getter ``weight()`` of shape (out, in)."""

    def __init__(self, weight: Callable[[], Tensor], in_shape: Shape, out_shape: Shape, label="W"):
        self.weight, self.in_shape, self.out_shape, self.label = weight, in_shape, out_shape, label

    def apply(self, x: Tensor) -> Tensor:
        w = self.weight()
        return F.linear(x.to(w.dtype), w)

    def tensors(self) -> list[Tensor]:
        return [self.weight()]

    def gram(self, u: Tensor) -> Tensor:
        w = self.weight().detach()
        return F.linear(u.to(w.dtype), w) @ w

    def row_norms(self) -> Tensor:
        return self.weight().norm(dim=-1)

    def row_scaled(self) -> LinearOperator:
        def scaled() -> Tensor:
            w = self.weight()
            return w * w.norm(dim=1, keepdim=True)

        return Dense(scaled, self.in_shape, self.out_shape, f"diag(r){self.label}")

    def scaled(self, out_scale: Callable[[], Tensor] | None, in_scale=None) -> Dense:
        def w() -> Tensor:
            m = self.weight()
            if out_scale is not None:
                m = out_scale().reshape(-1, 1) * m
            if in_scale is not None:
                m = m * in_scale().reshape(1, -1)
            return m

        return Dense(w, self.in_shape, self.out_shape, self.label)

    def certified_norm(self) -> Tensor:
        from . import certified

        return certified.dense_norm(self.weight().detach().double())

    def describe(self) -> str:
        return f"Dense({self.label})"


class Conv(LinearOperator):
    """Convolution without bias (1-D or 2-D), zero or other padding modes."""

    def __init__(
        self,
        weight: Callable[[], Tensor],
        in_shape: Shape,
        out_shape: Shape,
        *,
        stride,
        padding,
        dilation,
        groups: int,
        padding_mode: str = "zeros",
        label: str = "K",
    ):
        self.weight, self.in_shape, self.out_shape = weight, in_shape, out_shape
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.label = padding_mode, label
        self.dims = len(in_shape) - 1

    def apply(self, x: Tensor) -> Tensor:
        w = self.weight()
        x = x.to(w.dtype)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        padding = self.padding
        if self.padding_mode != "zeros":
            pads = _expand(padding, self.dims)
            x = F.pad(x, [p for p in reversed(pads) for _ in range(2)], mode=self.padding_mode)
            padding = 0
        return conv(x, w, None, self.stride, padding, self.dilation, self.groups)

    def tensors(self) -> list[Tensor]:
        return [self.weight()]

    def row_norms(self) -> Tensor:
        # Row (c, i, j) holds kernel c restricted to the in-range taps: its norm is at most the full
        # kernel norm, with equality away from the border.
        w = self.weight()
        return w.flatten(1).norm(dim=1).reshape(-1, *([1] * self.dims))

    def scaled(self, out_scale: Callable[[], Tensor] | None, in_scale=None) -> Conv:
        def w() -> Tensor:
            k = self.weight()
            if out_scale is not None:
                k = out_scale().reshape(-1, *([1] * (self.dims + 1))) * k
            if in_scale is not None:
                k = k * in_scale().reshape(1, -1, *([1] * self.dims))
            return k

        return Conv(
            w,
            self.in_shape,
            self.out_shape,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
            label=self.label,
        )

    def row_scaled(self) -> LinearOperator:
        op = self.scaled(lambda: self.weight().flatten(1).norm(dim=1))
        op.label = f"diag(r){self.label}"
        return op

    def certified_norm(self) -> Tensor:
        from . import certified

        if isinstance(self.padding, str):
            return super().certified_norm()
        w = self.weight().detach().double()
        mode = {"zeros": {}, "circular": {"padding_mode": "circular"}}.get(self.padding_mode)
        if mode is None:  # reflect/replicate padding: not a sub-block of a circulant
            return super().certified_norm()
        return certified.conv_norm(
            w,
            tuple(self.in_shape),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            **mode,
        )

    def describe(self) -> str:
        return f"Conv{self.dims}d({self.label})"


def _expand(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class Diagonal(LinearOperator):
    """x ↦ s ⊙ x with ``s`` broadcast along the channel dimension (eval-mode batch norm)."""

    def __init__(self, scale: Callable[[], Tensor], shape: Shape, label="s"):
        self.scale, self.in_shape, self.out_shape, self.label = scale, shape, shape, label

    def _view(self, s: Tensor) -> Tensor:
        return s.reshape(-1, *([1] * (len(self.in_shape) - 1)))

    def apply(self, x: Tensor) -> Tensor:
        s = self.scale()
        return x.to(s.dtype) * self._view(s)

    def tensors(self) -> list[Tensor]:
        return [self.scale()]

    def gram(self, u: Tensor) -> Tensor:
        s = self._view(self.scale().detach())
        return u.to(s.dtype) * s * s

    def row_norms(self) -> Tensor:
        return self._view(self.scale().abs())

    def certified_norm(self) -> Tensor:
        return self.scale().detach().double().abs().max()

    def describe(self) -> str:
        return f"Diagonal({self.label})"


class Scalar(LinearOperator):
    """x ↦ c·x for a Python number c."""

    def __init__(self, c: float, shape: Shape):
        self.c, self.in_shape, self.out_shape = float(c), shape, shape

    def apply(self, x: Tensor) -> Tensor:
        return self.c * x

    def row_norms(self) -> Tensor:
        return torch.tensor(abs(self.c), dtype=torch.float64)

    def certified_norm(self) -> Tensor:
        return torch.tensor(abs(self.c), dtype=torch.float64)

    def describe(self) -> str:
        return f"Scalar({self.c:g})"


class Reshape(LinearOperator):
    """A pure reshape/permutation of coordinates (flatten, view, permute, transpose): an isometry."""

    isometric = True

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: Shape, out_shape: Shape, label=""):
        self.fn, self.in_shape, self.out_shape, self.label = fn, in_shape, out_shape, label

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def row_norms(self) -> Tensor:
        return torch.ones((), dtype=torch.float64)

    def certified_norm(self) -> Tensor:
        return torch.ones((), dtype=torch.float64)

    def describe(self) -> str:
        return f"Reshape({self.label})" if self.label else "Reshape"


class FunctionOperator(LinearOperator):
    """A linear map given by a bias-free function (pooling, slicing, a user layer).

    ``norm_bound`` optionally gives a certified norm (a callable returning a float64 tensor);
    ``rows`` optionally gives row-norm upper bounds.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        in_shape: Shape,
        out_shape: Shape,
        *,
        norm_bound: Callable[[], Tensor] | None = None,
        rows: Callable[[], Tensor] | None = None,
        params: Callable[[], list[Tensor]] | None = None,
        label: str = "f",
    ):
        self.fn, self.in_shape, self.out_shape = fn, in_shape, out_shape
        self.norm_bound, self.rows, self.params, self.label = norm_bound, rows, params, label

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def tensors(self) -> list[Tensor]:
        return self.params() if self.params else []

    def row_norms(self) -> Tensor | None:
        return self.rows() if self.rows else None

    def certified_norm(self) -> Tensor:
        if self.norm_bound is not None:
            return self.norm_bound()
        return super().certified_norm()

    def describe(self) -> str:
        return self.label


class RowNormScaled(LinearOperator):
    """diag(r)·A for any operator A with known row-norm bounds r."""

    def __init__(self, op: LinearOperator):
        self.op, self.in_shape, self.out_shape = op, op.in_shape, op.out_shape

    def apply(self, x: Tensor) -> Tensor:
        return self.op.row_norms() * self.op.apply(x)

    def tensors(self) -> list[Tensor]:
        return self.op.tensors()

    def certified_norm(self) -> Tensor:
        try:
            return super().certified_norm()
        except NotImplementedError:
            r = self.op.row_norms().detach().double()
            return r.abs().max() * self.op.certified_norm()

    def describe(self) -> str:
        return f"diag(r)·{self.op.describe()}"


def _fuse(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """b∘a as one operator of the same kind when that is exact and cheap (folds batch norm)."""
    if isinstance(b, Diagonal) and isinstance(a, Conv):
        return a.scaled(b.scale)
    if isinstance(b, Diagonal) and isinstance(a, Dense) and len(a.out_shape) == 1:
        return a.scaled(b.scale)
    if isinstance(a, Diagonal) and isinstance(b, Conv) and b.groups == 1:
        return b.scaled(None, a.scale)
    if isinstance(a, Diagonal) and isinstance(b, Dense) and len(b.in_shape) == 1:
        return b.scaled(None, a.scale)
    if isinstance(a, Scalar) and isinstance(b, Scalar):
        return Scalar(a.c * b.c, a.in_shape)
    if isinstance(b, Scalar) and isinstance(a, (Conv, Dense)):
        return a.scaled(lambda: torch.tensor(b.c))
    if isinstance(a, Scalar) and isinstance(b, (Conv, Dense)):
        return b.scaled(lambda: torch.tensor(a.c))
    return None


class Chain(LinearOperator):
    """Composition ``ops[-1] ∘ … ∘ ops[0]`` of linear operators (a merged linear chain).

    Adjacent batch norms and scalings are folded into their convolution or dense neighbour.
    """

    def __init__(self, ops: Sequence[LinearOperator]):
        fused: list[LinearOperator] = []
        for op in ops:
            if fused:
                f = _fuse(fused[-1], op)
                if f is not None:
                    fused[-1] = f
                    continue
            fused.append(op)
        self.ops = fused
        self.in_shape, self.out_shape = ops[0].in_shape, ops[-1].out_shape

    @staticmethod
    def of(ops: Sequence[LinearOperator]) -> LinearOperator:
        chain = Chain(ops)
        core = [o for o in chain.ops if not o.isometric]
        if len(core) == 1 and len(chain.ops) == 1:
            return core[0]
        return chain

    @property
    def core(self) -> list[LinearOperator]:
        return [o for o in self.ops if not o.isometric]

    def apply(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.apply(x)
        return x

    def tensors(self) -> list[Tensor]:
        return [t for op in self.ops for t in op.tensors()]

    def row_norms(self) -> Tensor | None:
        ops = list(self.ops)
        while ops and ops[0].isometric:  # input permutations keep every row's norm
            ops.pop(0)
        if not ops:
            return torch.ones((), dtype=torch.float64)
        r = ops[0].row_norms()
        if r is None:
            return None
        for op in ops[1:]:
            if isinstance(op, (Diagonal, Scalar)):
                r = r * op.row_norms()
            elif isinstance(op, Reshape):
                r = op.apply(r.expand(op.in_shape).unsqueeze(0))[0]
            else:
                return None
        return r

    def row_scaled(self) -> LinearOperator | None:
        if len(self.core) == 1 and all(o.isometric for o in self.ops[1:]) and self.core[0] is self.ops[0]:
            inner = self.ops[0].row_scaled()
            return None if inner is None else Chain.of([inner, *self.ops[1:]])
        return super().row_scaled()

    def certified_norm(self) -> Tensor:
        core = self.core
        if len(core) == 1:
            return core[0].certified_norm()
        try:
            return super().certified_norm()
        except NotImplementedError:
            out = torch.ones((), dtype=torch.float64)
            for op in core:  # submultiplicativity: a valid, looser bound
                out = out * op.certified_norm()
            return out

    def describe(self) -> str:
        return " ∘ ".join(op.describe() for op in reversed(self.ops))
