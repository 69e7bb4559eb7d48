"""Linear operators: the linear part of an affine node, reading the model's live parameters.

An operator maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)`` and knows three things about
itself: how to apply itself (power iteration uses it with autograd for the adjoint), upper bounds
on the ℓ2 norms of its rows (for the row-norm block rule, theory §3 (d)), and a *certified*
(guaranteed) upper bound on its spectral norm. Operators hold references to modules or parameter
getters, never copies of tensors, so an optimiser step is seen without recompiling.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import certified
from .certified import _resolve_padding, padding_multiplicity

__all__ = [
    "LinearOperator",
    "Dense",
    "Conv",
    "Diagonal",
    "Scalar",
    "Reshape",
    "FunctionOperator",
    "Select",
    "Weighting",
    "LinearSum",
    "Chain",
    "RowNormScaled",
    "MATERIALIZE_LIMIT",
    "MATERIALIZE_ENTRIES",
    "TIGHTEN_LIMIT",
    "BORDER_ROWS_MIN",
    "exact_arithmetic",
    "per_channel_rows",
    "precise",
]

#: Operators with at most this many input (or output) entries are materialised for an exact
#: float64 SVD when no structure-specific certified norm exists.
MATERIALIZE_LIMIT = 4096

#: ... and at most this many matrix entries (128 MiB in float64; its SVD takes seconds).
MATERIALIZE_ENTRIES = 1 << 24

#: Convolutions use their exact per-position row norms (border rows are shorter) in the row-norm
#: block rule when at least this fraction of the rows are border rows (small feature maps); on
#: large maps the gain is small and the extra factor would cost certified norms their structure.
BORDER_ROWS_MIN = 0.25

#: Operators with a structured but possibly loose certified norm (convolutions other than
#: circular ones) are also materialised, and the smaller bound kept, up to this size.
TIGHTEN_LIMIT = 1024

Shape = tuple[int, ...]

_EXACT = contextvars.ContextVar("curvbound_exact_arithmetic", default=False)
#: whether :meth:`Conv.row_scaled` uses the exact per-position row norms (see
#: :func:`per_channel_rows`)
_BORDER_ROWS = contextvars.ContextVar("curvbound_border_rows", default=True)


@contextlib.contextmanager
def per_channel_rows() -> Iterator[None]:
    """Inside the block, convolutions' row-scaled operators use the per-channel kernel norms
    (the paper's Algorithm 1, ``method="paper"``) rather than the exact per-position ones."""
    token = _BORDER_ROWS.set(False)
    try:
        yield
    finally:
        _BORDER_ROWS.reset(token)


@contextlib.contextmanager
def exact_arithmetic() -> Iterator[None]:
    """Evaluate operators in float64 from the float64 values of the live parameters.

    Certified norms are computed inside this block (:class:`~curvbound.runtime.norms.Norm`):
    derived tensors (a batch norm's scale γ/√(var + ε), a conv weight with batch norm folded in,
    row-scaled weights) are then recomputed in float64 instead of being rounded to the model's
    dtype, so that the bound is that of the real-valued map the parameters define, up to float64
    rounding, which the safety margins cover. Outside the block nothing changes.

    >>> w = torch.tensor([[1.0, 2.0]])          # float32
    >>> with exact_arithmetic():
    ...     Dense(lambda: w, (2,), (1,)).apply(torch.ones(1, 2)).dtype
    torch.float64
    """
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def precise(t: Tensor) -> Tensor:
    """``t`` in float64 inside :func:`exact_arithmetic` (an exact conversion), else ``t`` as is.

    Getters of derived tensors call it on their inputs, e.g. ``precise(bn.running_var)``.
    """
    # under torch.compile (estimate mode only, see BoundFunction.compiled) the block is never
    # open, and dynamo cannot read a ContextVar without a graph break
    if torch.compiler.is_compiling():
        return t
    if _EXACT.get() and t.is_floating_point() and t.dtype != torch.float64:
        return t.double()
    return t


def _numel(shape: Shape) -> int:
    return math.prod(shape)


class LinearOperator:
    """Base class. Subclasses set ``in_shape``, ``out_shape`` and implement :meth:`apply`."""

    in_shape: Shape
    out_shape: Shape
    #: norm exactly 1 and the map only permutes/reshapes coordinates (flatten, permute, view)
    isometric: bool = False
    #: set by :meth:`certified_norm` when it fell back to a sound but looser bound (shown in the
    #: node's note)
    bound_note: str = ""

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
        """A guaranteed upper bound on ‖A‖₂, float64 (before the global safety margin).

        Called inside :func:`exact_arithmetic`. The default materialises the matrix (when the
        smaller side has at most :data:`MATERIALIZE_LIMIT` entries and the matrix at most
        :data:`MATERIALIZE_ENTRIES`) and takes its exact SVD plus an explicit bound on the
        rounding error of the materialisation.
        """
        n_in, n_out = _numel(self.in_shape), _numel(self.out_shape)
        if min(n_in, n_out) <= MATERIALIZE_LIMIT and n_in * n_out <= MATERIALIZE_ENTRIES:
            return _materialized_norm(self)
        raise NotImplementedError(
            f"{self.describe()} has no certified norm: its structure is unknown and it is too "
            f"large to materialise ({self.in_shape} -> {self.out_shape})"
        )

    def abs_norm_bound(self) -> Tensor | None:
        """An upper bound on ‖|A|‖₂ (|A| = entrywise absolute value of the matrix), or None.

        Used to bound the rounding error of a materialised chain A_k⋯A_1, which is at most
        γ·‖|A_k|⋯|A_1|‖₂ ≤ γ·Πᵢ‖|Aᵢ|‖₂. None means unknown: such a chain is not materialised.
        """
        return None

    def rounding_terms(self) -> int:
        """Most terms summed for one output entry when :meth:`apply` runs (for rounding bounds)."""
        return _numel(self.in_shape)

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.describe()}[{self.in_shape} -> {self.out_shape}]"


_MATERIALIZE_CHUNK = 1 << 22  # float64 entries per batch of basis vectors (32 MiB)


def _materialize(op: LinearOperator, dtype: torch.dtype) -> Tensor:
    """The (out_numel, in_numel) matrix of ``op``: columns A e_j, or rows Aᵀ e_i by autograd when
    the output is the smaller side (batches of basis vectors; rows of a batch are independent)."""
    n_in, n_out = _numel(op.in_shape), _numel(op.out_shape)
    ref = op.tensors()
    device = ref[0].device if ref else None
    if n_in == 0 or n_out == 0:
        return torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    chunk = max(1, _MATERIALIZE_CHUNK // max(n_in, n_out, 1))
    parts = []
    if n_in <= n_out:
        with torch.no_grad():
            for start in range(0, n_in, chunk):
                b = min(chunk, n_in - start)
                basis = torch.zeros(b, n_in, dtype=dtype, device=device)
                basis[torch.arange(b), torch.arange(start, start + b)] = 1
                parts.append(op.apply(basis.reshape(b, *op.in_shape)).reshape(b, n_out))
        return torch.cat(parts).T.to(torch.float64)
    for start in range(0, n_out, chunk):
        b = min(chunk, n_out - start)
        with torch.enable_grad():
            x = torch.zeros(b, *op.in_shape, dtype=dtype, device=device, requires_grad=True)
            y = op.apply(x).reshape(b, n_out)
            seed = torch.zeros(b, n_out, dtype=y.dtype, device=device)
            seed[torch.arange(b), torch.arange(start, start + b)] = 1
            (g,) = torch.autograd.grad(y, x, seed)
        parts.append(g.detach().reshape(b, n_in))
    return torch.cat(parts).to(torch.float64)


def _materialized_with_error(op: LinearOperator) -> tuple[Tensor, Tensor]:
    """The materialised matrix Â of ``op`` and a bound on ‖Â − A‖₂ (float64 scalar).

    Â is built in float64 inside :func:`exact_arithmetic` (in the parameters' dtype only when the
    operator cannot run in float64, e.g. a user function mixing dtypes). Evaluating
    A_k⋯A_1 e_j step by step gives |Â − A| ≤ γ_p·|A_k|⋯|A_1| entrywise (Higham, Accuracy and
    Stability of Numerical Algorithms, §3.5), with p the total number of terms summed per output
    entry over the steps, hence ‖A‖₂ ≤ σ₁(Â) + γ_p·Πᵢ‖|Aᵢ|‖₂ (see ``abs_norm_bound``).
    A single operator of unknown structure is assumed to compute each entry as an ordinary sum of
    products, so that ‖|A|‖₂ ≤ ‖Â‖_F (to first order) stands in for the unknown bound.
    """
    with exact_arithmetic():
        try:
            A = _materialize(op, torch.float64)
            unit = 2.0**-53
        except RuntimeError:  # e.g. "expected scalar type Float": a function fixed to its dtype
            ref = op.tensors()
            dtype = ref[0].dtype if ref and ref[0].is_floating_point() else torch.float32
            A = _materialize(op, dtype)
            unit = torch.finfo(dtype).eps / 2
        if torch.isnan(A).any():
            raise ValueError(f"{op.describe()}: the materialised matrix contains NaN")
        abs_bound = op.abs_norm_bound()
        if abs_bound is None:
            if isinstance(op, Chain) and len(op.core) > 1:
                raise NotImplementedError(
                    f"{op.describe()}: a factor has no bound on ‖|A|‖, so the rounding error of "
                    "the materialised product cannot be bounded"
                )
            abs_bound = torch.linalg.matrix_norm(A) * 1.01
        p = 2 * op.rounding_terms() + 4  # generous: FMA/blocked sums, the final conversions
        gamma = p * unit / (1 - p * unit)
        return A, 2 * gamma * abs_bound.detach().double()


def _materialized_norm(op: LinearOperator) -> Tensor:
    """σ₁ of the materialised matrix Â (exact float64 SVD) plus the bound on ‖Â − A‖₂ of
    :func:`_materialized_with_error`."""
    A, err = _materialized_with_error(op)
    with exact_arithmetic():
        return certified.dense_norm(A) + err


class Dense(LinearOperator):
    """x ↦ W x for a weight getter ``weight()`` of shape (out, in)."""

    def __init__(self, weight: Callable[[], Tensor], in_shape: Shape, out_shape: Shape, label="W"):
        self.weight, self.in_shape, self.out_shape, self.label = weight, in_shape, out_shape, label

    def apply(self, x: Tensor) -> Tensor:
        w = precise(self.weight())
        return F.linear(x.to(w.dtype), w)

    def tensors(self) -> list[Tensor]:
        return [self.weight()]

    def gram(self, u: Tensor) -> Tensor:
        w = self.weight().detach()
        return F.linear(u.to(w.dtype), w) @ w

    def row_norms(self) -> Tensor:
        return precise(self.weight()).norm(dim=-1)

    def row_scaled(self) -> LinearOperator:
        def scaled() -> Tensor:
            w = precise(self.weight())
            return w * w.norm(dim=1, keepdim=True)

        return _RowScaledDense(scaled, self.in_shape, self.out_shape, f"diag(r){self.label}",
                               base=self.weight)

    def scaled(self, out_scale: Callable[[], Tensor] | None, in_scale=None) -> Dense:
        def w() -> Tensor:
            m = precise(self.weight())
            if out_scale is not None:
                m = precise(out_scale()).to(m.dtype).reshape(-1, 1) * m
            if in_scale is not None:
                m = m * precise(in_scale()).to(m.dtype).reshape(1, -1)
            return m

        return Dense(w, self.in_shape, self.out_shape, self.label)

    def certified_norm(self) -> Tensor:
        return certified.dense_norm(self.weight().detach().double())

    def abs_norm_bound(self) -> Tensor:
        return torch.linalg.matrix_norm(self.weight().detach().double())  # ‖|W|‖₂ ≤ ‖W‖_F

    def rounding_terms(self) -> int:
        return int(self.in_shape[-1]) if self.in_shape else 1

    def describe(self) -> str:
        return f"Dense({self.label})"


class _RowScaledDense(Dense):
    """diag(r)·W with r the row norms of W: a :class:`Dense` whose ``weight()`` materialises
    diag(r)·W (values, certified norms), while :meth:`gram` applies Wᵀ diag(r²) W without
    building that copy (power iteration on a wide layer allocated it at every step)."""

    def __init__(self, weight, in_shape, out_shape, label, *, base: Callable[[], Tensor]):
        super().__init__(weight, in_shape, out_shape, label)
        self.base = base

    def gram(self, u: Tensor) -> Tensor:
        w = self.base().detach()
        r2 = torch.linalg.vector_norm(w, dim=1).square()  # no copy of w
        return (F.linear(u.to(w.dtype), w) * r2) @ w


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
        w = precise(self.weight())
        x = x.to(w.dtype)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        padding = self.padding
        if self.padding_mode != "zeros":
            pads = [v for lo, hi in reversed(self._pads()) for v in (lo, hi)]
            x = F.pad(x, pads, mode=self.padding_mode)
            padding = 0
        return conv(x, w, None, self.stride, padding, self.dilation, self.groups)

    def _pads(self) -> list[tuple[int, int]]:
        """Per-axis (before, after) padding; strings 'same'/'valid' resolved as torch does."""
        ksize = tuple(self.weight().shape[2:])
        dil, stride = _expand(self.dilation, self.dims), _expand(self.stride, self.dims)
        return _resolve_padding(self.padding, self.dims, ksize, dil, stride)

    def multiplicity(self) -> int:
        """Most padded positions that read one input entry: 1 for zero padding; for circular,
        reflect and replicate padding the padded input is P·x with P a 0/1 matrix, ‖P‖² = this."""
        if getattr(self, "_multiplicity", None) is None:  # shapes and padding are fixed
            self._multiplicity = padding_multiplicity(
                self.in_shape[1:], self._pads(), self.padding_mode
            )
        return self._multiplicity

    def tensors(self) -> list[Tensor]:
        return [self.weight()]

    def row_norms(self) -> Tensor:
        # Row (c, i, j) holds kernel c restricted to the in-range taps: its norm is at most the full
        # kernel norm, with equality away from the border. With circular/reflect/replicate
        # padding a row is row(K_valid)·P and taps may land on one input entry, so its norm is
        # at most ‖w_c‖·‖P‖ = ‖w_c‖·√multiplicity.
        w = precise(self.weight())
        r = w.flatten(1).norm(dim=1) * math.sqrt(self.multiplicity())
        return r.reshape(-1, *([1] * self.dims))

    def scaled(self, out_scale: Callable[[], Tensor] | None, in_scale=None) -> Conv:
        def w() -> Tensor:
            k = precise(self.weight())
            if out_scale is not None:
                k = precise(out_scale()).to(k.dtype).reshape(-1, *([1] * (self.dims + 1))) * k
            if in_scale is not None:  # input channel g·(C_in/g) + j feeds weight[:, j] of group g
                s = precise(in_scale()).to(k.dtype)
                g, c_out, cig = self.groups, k.shape[0], k.shape[1]
                s = s.reshape(g, 1, cig).expand(g, c_out // g, cig).reshape(c_out, cig)
                k = k * s.reshape(c_out, cig, *([1] * self.dims))
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

    def position_row_norms(self) -> Tensor | None:
        """The exact row norms per output entry (c, position) for zero padding: a border row
        holds only the taps that land inside the input, r²[c, p] = Σ_{valid taps} K[c, ·, t]²
        (the convolution of K² with a ones input); None for other padding modes."""
        if self.padding_mode != "zeros":
            return None
        w = precise(self.weight())
        conv = F.conv1d if self.dims == 1 else F.conv2d
        # which taps are in range does not depend on the input channel: one input channel of ones
        # against Σ_ci K[c, ci, t]² (groups read their own channels, with the same pattern)
        ones = torch.ones(1, 1, *self.in_shape[1:], dtype=w.dtype, device=w.device)
        taps = (w * w).sum(1, keepdim=True)
        r2 = conv(ones, taps, None, self.stride, self.padding, self.dilation, 1)
        return r2[0].clamp_min(0).sqrt()

    def row_scaled(self) -> LinearOperator:
        """diag(r)·K with the rows' exact norms: diag(r_c)·K (a convolution, per output channel c)
        followed by the per-position factors r[c, p]/r_c ≤ 1 of the shorter border rows, when
        there are any (‖diag(r)K‖ is then at most the per-channel value, never above it)."""
        op = self.scaled(lambda: self.row_norms().flatten())
        op.label = f"diag(r){self.label}"
        if not _BORDER_ROWS.get():  # method "paper": the paper's per-channel row norms
            return op
        with torch.no_grad():
            pos = self.position_row_norms()
            if pos is None:
                return op
            full = self.row_norms().to(pos.dtype)
            shorter = (pos < full * (1 - 1e-12)).to(torch.float64).mean()
            if float(shorter) < BORDER_ROWS_MIN:  # a large feature map: border rows are few
                return op

        def border() -> Tensor:
            r = self.position_row_norms()
            full = self.row_norms().to(r.dtype)
            return torch.where(full > 0, r / torch.where(full > 0, full, 1), 0).clamp_max(1)

        return _BorderRows([op, Weighting(border, self.out_shape, "border rows")])

    def certified_norm(self) -> Tensor:
        w = self.weight().detach().double()
        bound = certified.conv_norm(
            w,
            tuple(self.in_shape),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )
        n_in, n_out = _numel(self.in_shape), _numel(self.out_shape)
        small = min(n_in, n_out) <= TIGHTEN_LIMIT and n_in * n_out <= MATERIALIZE_ENTRIES
        if small and self.padding_mode != "circular":
            # the circulant embedding of zero padding loses a few % on small images, the
            # structured bound ‖K_valid‖·‖P‖ of reflect/replicate up to 2×; an SVD is cheap here
            bound = torch.minimum(bound, _materialized_norm(self))
        elif self.padding_mode in ("reflect", "replicate"):
            self.bound_note = (
                f"{self.describe()}: ‖K‖ ≤ √{self.multiplicity()}·‖K_valid‖ "
                f"({self.padding_mode} padding copies an entry ≤ {self.multiplicity()} times)"
            )
        return bound

    def abs_norm_bound(self) -> Tensor:
        # Schur test on |K|: a row sums |w_c| over its taps (collisions only cancel), a column
        # meets each (output channel, tap) of its group at most `multiplicity` times.
        w = self.weight().detach().double().abs()
        mult = self.multiplicity()
        g, c_out, cig = self.groups, w.shape[0], w.shape[1]
        rows = w.flatten(1).sum(1).max()
        cols = w.reshape(g, c_out // g, cig, -1).sum(dim=(1, 3)).max() * mult
        return torch.sqrt(rows * cols) * (1 + 1e-12)

    def rounding_terms(self) -> int:
        return int(self.weight()[0].numel()) * self.multiplicity()

    def describe(self) -> str:
        return f"Conv{self.dims}d({self.label})"


class _BorderRows(LinearOperator):
    """diag(s)·C for a convolution C = diag(r_c)·K and border factors 0 ≤ s ≤ 1 (see
    :meth:`Conv.row_scaled`). Certified norm: an exact SVD when the smaller side is at most
    :data:`TIGHTEN_LIMIT`, else ‖C‖·max s from C's structured (per-frequency) bound, never a large
    materialisation."""

    def __init__(self, ops: list[LinearOperator]):
        self.chain = Chain(ops)
        self.conv, self.weights = ops
        self.in_shape, self.out_shape = self.chain.in_shape, self.chain.out_shape

    def apply(self, x: Tensor) -> Tensor:
        return self.chain.apply(x)

    def tensors(self) -> list[Tensor]:
        return self.chain.tensors()

    def certified_norm(self) -> Tensor:
        n_in, n_out = _numel(self.in_shape), _numel(self.out_shape)
        bound = self.conv.certified_norm() * self.weights.certified_norm()
        if min(n_in, n_out) <= TIGHTEN_LIMIT and n_in * n_out <= MATERIALIZE_ENTRIES:
            bound = torch.minimum(bound, _materialized_norm(self))
        return bound

    def abs_norm_bound(self) -> Tensor | None:
        inner = self.conv.abs_norm_bound()
        return None if inner is None else inner * self.weights.certified_norm()

    def rounding_terms(self) -> int:
        return self.chain.rounding_terms()

    def describe(self) -> str:
        return self.chain.describe()


def _expand(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class Diagonal(LinearOperator):
    """x ↦ s ⊙ x with ``s`` broadcast along the channel dimension (eval-mode batch norm)."""

    def __init__(self, scale: Callable[[], Tensor], shape: Shape, label="s"):
        self.scale, self.in_shape, self.out_shape, self.label = scale, shape, shape, label

    def _view(self, s: Tensor) -> Tensor:
        return s.reshape(-1, *([1] * (len(self.in_shape) - 1)))

    def apply(self, x: Tensor) -> Tensor:
        s = precise(self.scale())
        return x.to(s.dtype) * self._view(s)

    def tensors(self) -> list[Tensor]:
        return [self.scale()]

    def gram(self, u: Tensor) -> Tensor:
        s = self._view(self.scale().detach())
        return u.to(s.dtype) * s * s

    def row_norms(self) -> Tensor:
        return self._view(precise(self.scale()).abs())

    def certified_norm(self) -> Tensor:
        return self.scale().detach().double().abs().max()

    def abs_norm_bound(self) -> Tensor:
        return self.certified_norm()

    def rounding_terms(self) -> int:
        return 1

    def describe(self) -> str:
        return f"Diagonal({self.label})"


class Weighting(Diagonal):
    """x ↦ s ⊙ x for a live per-entry weight s of the full shape; unlike the per-channel
    :class:`Diagonal` (batch norm) it is never folded into a neighbouring layer."""

    def _view(self, s: Tensor) -> Tensor:
        return s.reshape(self.in_shape)

    def describe(self) -> str:
        return self.label


class LinearSum(LinearOperator):
    """x ↦ Σ_k c_k·A_k(x) for operators of one shape (the Jacobian of a residual block at a fixed
    activation slope, H + c·G·W). Certified norm: the exact SVD of the materialised sum when it is
    small, else the triangle inequality Σ|c_k|·‖A_k‖ (never above the parts' own bound).

    >>> A = Dense(lambda: torch.eye(2, dtype=torch.float64), (2,), (2,))
    >>> round(float(LinearSum([(1.0, A), (-0.5, A)]).certified_norm()), 6)
    0.5
    """

    def __init__(self, terms: Sequence[tuple[float, LinearOperator]], label: str = ""):
        self.terms = [(float(c), op) for c, op in terms]
        first = self.terms[0][1]
        self.in_shape, self.out_shape = first.in_shape, first.out_shape
        self.label = label or " + ".join(f"{c:g}·{op.describe()}" for c, op in self.terms)

    def apply(self, x: Tensor) -> Tensor:
        out = None
        for c, op in self.terms:
            y = op.apply(x)
            y = y if c == 1.0 else c * y
            out = y if out is None else out + y
        return out

    def tensors(self) -> list[Tensor]:
        return [t for _, op in self.terms for t in op.tensors()]

    def certified_norm(self) -> Tensor:
        try:
            if self.abs_norm_bound() is None:
                raise NotImplementedError("a term has no bound on ‖|A|‖")
            return LinearOperator.certified_norm(self)  # materialised within the size limits
        except NotImplementedError as exc:
            out = torch.zeros((), dtype=torch.float64)
            for c, op in self.terms:
                out = out + abs(c) * op.certified_norm()
            self.bound_note = f"‖{self.describe()}‖ ≤ Σ|c_k|·‖A_k‖ (triangle inequality; {exc})"
            return out

    def abs_norm_bound(self) -> Tensor | None:
        out = torch.zeros((), dtype=torch.float64)
        for c, op in self.terms:
            b = op.abs_norm_bound()
            if b is None:
                return None
            out = out + abs(c) * b.detach().double()
        return out

    def rounding_terms(self) -> int:
        return max(op.rounding_terms() for _, op in self.terms) + len(self.terms)

    def describe(self) -> str:
        return self.label


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

    def abs_norm_bound(self) -> Tensor:
        return self.certified_norm()

    def rounding_terms(self) -> int:
        return 1

    def describe(self) -> str:
        return f"Scalar({self.c:g})"


class Reshape(LinearOperator):
    """A pure reshape/permutation of coordinates (flatten, view, permute, transpose): an
    isometry."""

    isometric = True

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: Shape, out_shape: Shape, label=""):
        self.fn, self.in_shape, self.out_shape, self.label = fn, in_shape, out_shape, label

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def row_norms(self) -> Tensor:
        return torch.ones((), dtype=torch.float64)

    def certified_norm(self) -> Tensor:
        return torch.ones((), dtype=torch.float64)

    def abs_norm_bound(self) -> Tensor:
        return self.certified_norm()

    def rounding_terms(self) -> int:
        return 0

    def describe(self) -> str:
        return f"Reshape({self.label})" if self.label else "Reshape"


class FunctionOperator(LinearOperator):
    """A linear map given by a bias-free function (pooling, slicing, a user layer).

    ``norm_bound`` optionally gives a certified norm (a callable returning a float64 tensor);
    ``rows`` optionally gives row-norm upper bounds; ``abs_bound`` optionally bounds ‖|A|‖₂ (for
    the nonnegative or diagonal maps of pooling, slicing, reductions and scalings it is
    ``norm_bound`` itself); ``params`` lists the live tensors ``fn`` reads (a certified norm is
    recomputed when one of them changes).
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
        abs_bound: Callable[[], Tensor] | None = None,
        label: str = "f",
    ):
        self.fn, self.in_shape, self.out_shape = fn, in_shape, out_shape
        self.norm_bound, self.rows, self.params, self.label = norm_bound, rows, params, label
        self.abs_bound = abs_bound

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

    def abs_norm_bound(self) -> Tensor | None:
        return self.abs_bound() if self.abs_bound is not None else None

    def describe(self) -> str:
        return self.label


class Select(LinearOperator):
    """A coordinate map: output entry k is input entry ``index[k]`` (flat, per sample), or 0 where
    ``index[k] < 0``. Slicing (each input read at most once) and the slot of one part in a
    concatenation (zeros elsewhere) are such maps. AᵀA is diagonal with the number of outputs
    reading each input, so ‖A‖ = √(max count), exactly; each row has one 1 or none.

    Next to a dense layer it folds into the weight (:func:`_fuse`): W·A selects, scatters or
    zero-pads W's columns and A·W its rows, entry by entry, so the merged matrix is exact and a
    slice between layers does not cost the block rules their materialised matrices.

    >>> s = Select.of(lambda x: x[:, 1:3], (4,))
    >>> s.index.tolist(), float(s.certified_norm())
    ([1, 2], 1.0)
    >>> s.apply(torch.tensor([[5.0, 6.0, 7.0, 8.0]])).tolist()
    [[6.0, 7.0]]
    """

    def __init__(self, index: Tensor, in_shape: Shape, out_shape: Shape, label: str = "select"):
        self.index, self.in_shape, self.out_shape, self.label = index, in_shape, out_shape, label
        valid = index[index >= 0]
        counts = torch.bincount(valid, minlength=_numel(in_shape)) if valid.numel() else None
        self.multiplicity = int(counts.max()) if counts is not None else 0
        self._gather = torch.where(index >= 0, index, _numel(in_shape))  # → an appended zero

    @staticmethod
    def of(fn: Callable[[Tensor], Tensor], in_shape: Shape, label: str = "select") -> Select:
        """The coordinate map of ``fn`` (an indexing/concatenation of one sample's entries),
        found by applying it to the entry numbers 1..n (0 marks an entry that is not read)."""
        n = _numel(in_shape)
        probe = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, *in_shape)
        out = fn(probe)
        return Select(out.reshape(-1).round().long() - 1, tuple(in_shape), tuple(out.shape[1:]),
                      label)

    @property
    def injective(self) -> bool:
        """Each input entry is read at most once."""
        return self.multiplicity <= 1

    def apply(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
        idx = self._gather.to(flat.device)
        return flat[:, idx].reshape(x.shape[0], *self.out_shape)

    def row_norms(self) -> Tensor:
        return (self.index >= 0).to(torch.float64).reshape(self.out_shape)

    def certified_norm(self) -> Tensor:
        return torch.tensor(float(self.multiplicity), dtype=torch.float64).sqrt()

    def abs_norm_bound(self) -> Tensor:
        return self.certified_norm()  # |A| = A

    def rounding_terms(self) -> int:
        return 1

    def describe(self) -> str:
        return self.label

    def select_columns(self, w: Tensor) -> Tensor:
        """W·A for a matrix W acting on this map's (flat) output: W's columns moved to the
        inputs they read (injective maps only: no column is a sum)."""
        out = w.new_zeros(w.shape[0], _numel(self.in_shape))
        keep = (self.index >= 0).nonzero().reshape(-1).to(w.device)
        return out.index_copy(1, self.index.to(w.device)[keep], w[:, keep])

    def select_rows(self, w: Tensor) -> Tensor:
        """A·W for a matrix W whose output is this map's (flat) input."""
        w = torch.cat([w, w.new_zeros(1, w.shape[1])])
        return w[self._gather.to(w.device)]


def _dense_select(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """b∘a as one dense layer when one of them is a :class:`Select` and the other a flat dense."""
    flat = lambda d: isinstance(d, Dense) and len(d.in_shape) == len(d.out_shape) == 1  # noqa: E731
    if isinstance(a, Select) and flat(b) and a.injective and len(a.in_shape) == 1 \
            and len(a.out_shape) == 1:
        return Dense(lambda: a.select_columns(precise(b.weight())), a.in_shape, b.out_shape,
                     f"{b.label}·{a.label}")
    if isinstance(b, Select) and flat(a) and len(b.in_shape) == 1 and len(b.out_shape) == 1:
        return Dense(lambda: b.select_rows(precise(a.weight())), a.in_shape, b.out_shape,
                     f"{b.label}·{a.label}")
    return None


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
            self.bound_note = (
                f"‖diag(r)A‖ ≤ max r·‖A‖, A = {self.op.describe()} (too large to materialise)"
            )
            return r.abs().max() * self.op.certified_norm()

    def abs_norm_bound(self) -> Tensor | None:
        inner = self.op.abs_norm_bound()
        return None if inner is None else self.op.row_norms().detach().double().max() * inner

    def rounding_terms(self) -> int:
        return self.op.rounding_terms() + 1

    def describe(self) -> str:
        return f"diag(r)·{self.op.describe()}"


def _fuse(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """b∘a as one operator of the same kind when that is exact and cheap (folds batch norm,
    coordinate selections next to dense layers)."""
    if isinstance(a, Select) or isinstance(b, Select):
        return _dense_select(a, b)
    if type(b) is Diagonal and isinstance(a, Conv):
        return a.scaled(b.scale)
    if type(b) is Diagonal and isinstance(a, Dense) and len(a.out_shape) == 1:
        return a.scaled(b.scale)
    if type(a) is Diagonal and isinstance(b, Conv):
        return b.scaled(None, a.scale)
    if type(a) is Diagonal and isinstance(b, Dense) and len(b.in_shape) == 1:
        return b.scaled(None, a.scale)
    if isinstance(a, Scalar) and isinstance(b, Scalar):
        return Scalar(a.c * b.c, a.in_shape)
    if isinstance(b, Scalar) and isinstance(a, (Conv, Dense)):
        return a.scaled(lambda: torch.tensor(b.c, dtype=torch.float64))
    if isinstance(a, Scalar) and isinstance(b, (Conv, Dense)):
        return b.scaled(lambda: torch.tensor(a.c, dtype=torch.float64))
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
        rest_isometric = all(o.isometric for o in self.ops[1:])
        if len(self.core) == 1 and rest_isometric and self.core[0] is self.ops[0]:
            inner = self.ops[0].row_scaled()
            return None if inner is None else Chain.of([inner, *self.ops[1:]])
        return super().row_scaled()

    def certified_norm(self) -> Tensor:
        core = self.core
        if len(core) == 1:
            value = core[0].certified_norm()
            self.bound_note = core[0].bound_note
            return value
        try:
            return super().certified_norm()
        except NotImplementedError as exc:
            out = torch.ones((), dtype=torch.float64)
            for op in core:  # submultiplicativity: a valid, looser bound
                out = out * op.certified_norm()
            inner = "; ".join(op.bound_note for op in core if op.bound_note)
            self.bound_note = (
                f"‖{self.describe()}‖ ≤ product of the factors' norms (submultiplicativity; "
                f"{str(exc).split(':')[-1].strip()})" + (f"; {inner}" if inner else "")
            )
            return out

    def abs_norm_bound(self) -> Tensor | None:
        out = torch.ones((), dtype=torch.float64)
        for op in self.ops:
            b = op.abs_norm_bound()
            if b is None:
                return None
            out = out * b
        return out

    def rounding_terms(self) -> int:
        return sum(op.rounding_terms() for op in self.ops)

    def describe(self) -> str:
        return " ∘ ".join(op.describe() for op in reversed(self.ops))
