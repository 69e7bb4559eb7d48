"""Certified norms of products of zero-padded convolutions (issue 13).

A product T = A_k⋯A_1 of zero-padded convolutions (groups 1, dilation 1) differs from the single
convolution T' with the composed kernel K = K_k ⊛ ⋯ ⊛ K_1 (each K_l dilated by the stride before
it), composed stride Π s_l and padding Σ_l (Π_{m<l} s_m)·p_l, only through the zero padding
*between* the layers: T' keeps the values an intermediate layer would have just outside its map,
T sets them to 0. An input entry whose forward cone stays inside every intermediate map never
reaches those positions, so on such *interior* columns T = T'. With B the projection onto the
other (border) columns and ‖x‖² = ‖(I − B)x‖² + ‖Bx‖²,

    ‖T x‖ ≤ ‖T'(I − B)x‖ + ‖T B x‖ ≤ ‖T'‖·‖(I − B)x‖ + ‖T B‖·‖Bx‖,  so  ‖T‖ ≤ √(‖T'‖² + ‖TB‖²)

(Cauchy–Schwarz). ‖T'‖ is one convolution's certified per-frequency norm
(:func:`curvbound.runtime.certified.conv_norm`; the composed kernel is computed in float64 and
its rounding bounded through the Schur test of |K_k| ⊛ ⋯ ⊛ |K_1|), and T B has only as many
columns as there are border entries, so it is materialised, with the rounding bound of
:func:`curvbound.runtime.operators._materialized_with_error`.

The split above ignores that T B and T'B are nearly equal (they differ only by what passes
through the padding between layers). Tighter, with X = T·B and Y = T'·B: since T(I − B) =
T'(I − B), TTᵀ = T'(I − B)T'ᵀ + XXᵀ = T'T'ᵀ + (XXᵀ − YYᵀ), and Weyl's inequality gives

    ‖T‖² ≤ ‖T'‖² + λ_max(XXᵀ − YYᵀ),

where λ_max(XXᵀ − YYᵀ) needs only the Gram matrix of [X, Y] (twice as many rows and columns as
there are border columns) and is proven by an inertia count (:func:`gram_difference_bound`).
The computed kernel K̂ stands in for K throughout (T̂'·B is computed from one-hot inputs; its
rounding, and that of K̂ and X, enter as explicit terms), and the smaller of the two bounds is
returned. On the CIFAR 6C2F the two products at the 3-channel input come out 1.077 and 1.073
times their power-iteration estimates (1.17 and 1.21 by the split, 1.4–3.8 by certified factors).
Products with too many border columns return None (the caller keeps its fallback).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import certified
from .operators import (
    MATERIALIZE_ENTRIES,
    MATERIALIZE_LIMIT,
    Chain,
    Conv,
    LinearOperator,
    Select,
    _expand,
    _materialized_with_error,
    _numel,
    exact_arithmetic,
    precise,
)

__all__ = ["conv_product_norm", "border_cost", "border_budget", "admit", "interior_mask",
           "composed_kernel", "gram_difference_bound"]

_U = 2.0**-53
#: At most this many border columns (input channels × border positions) and multiply-adds for
#: the border part (materialising T·B and T̂'·B, their Gram matrix, two symmetric eigensolves of
#: its size): on CIFAR 6C2F the two products at the 3-channel input (372 and 720 columns, about 1
#: and 4 s); a product starting at an 8-channel 28×28 or 32×32 map has 864 or 992 columns
#: (1.5–5 s each). An 8-block residual CNN of 8 channels at 32×32 pays that for 20 products
#: (certified compile 107 s instead of 13 s, for an M bound 6.5× tighter).
BORDER_COLUMNS_LIMIT = 1024
BORDER_COST_LIMIT = 6e10
#: What one ``curvbound.compile`` may spend on border parts in all (multiply-adds of
#: :func:`border_cost`): products are admitted in the order they are first evaluated, while the
#: budget lasts, and a product keeps its admission afterwards (re-evaluations after a weight
#: update take the same path). About 20–30 s on one core; the rest keep the best split.
STRUCTURED_BUDGET = 2e11
#: Products with at most this many border columns and this many multiply-adds for materialising
#: T·B are always admitted, free of the budget (so that spending it on larger ones never leaves
#: a small product to the split).
BORDER_FREE_COLUMNS = 768
BORDER_FREE_COST = 1.2e10

_budget: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "curvbound_border_budget", default=None)


@contextlib.contextmanager
def border_budget(total: float | None = None) -> Iterator[None]:
    """Within the block, border parts draw on a budget of ``total`` multiply-adds (default
    :data:`STRUCTURED_BUDGET`); ``curvbound.compile`` opens one per compile. Outside any block
    only the per-product limits apply.

    >>> with border_budget(1e9):
    ...     admit(6e8), admit(6e8), admit(3e8)
    (True, False, True)
    """
    token = _budget.set([STRUCTURED_BUDGET if total is None else float(total)])
    try:
        yield
    finally:
        _budget.reset(token)


def admit(cost: float) -> bool:
    """Charge ``cost`` to the open :func:`border_budget`; False when it does not fit."""
    left = _budget.get()
    if left is None:
        return True
    if cost <= left[0]:
        left[0] -= cost
        return True
    return False


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def _geometry(convs: list[Conv]) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per convolution: (kernel size, stride, padding) per spatial axis, or raises ValueError for
    what the composition does not cover."""
    out = []
    for c in convs:
        if c.groups != 1 or c.padding_mode != "zeros":
            raise ValueError("groups or padding mode")
        if any(d != 1 for d in _expand(c.dilation, c.dims)):
            raise ValueError("dilation")
        pads = c._pads()
        if any(lo != hi for lo, hi in pads):
            raise ValueError("asymmetric padding")
        k = tuple(c.weight().shape[2:])
        out.append((k, _expand(c.stride, c.dims), tuple(lo for lo, _ in pads)))
    return out


def composed_kernel(convs: list[Conv], absolute: bool = False):
    """(K, stride, padding) of the single convolution equal to the product without the masks
    between layers (module docstring); |K_l| throughout with ``absolute``."""
    geo = _geometry(convs)
    transpose = F.conv_transpose1d if convs[0].dims == 1 else F.conv_transpose2d
    K = precise(convs[0].weight()).double()
    K = K.abs() if absolute else K
    stride, pad = geo[0][1], geo[0][2]
    for c, (_, s, p) in zip(convs[1:], geo[1:]):
        w = precise(c.weight()).double()
        w = w.abs() if absolute else w
        K = transpose(w, K, stride=stride)
        pad = tuple(P + S * q for P, S, q in zip(pad, stride, p))
        stride = tuple(S * t for S, t in zip(stride, s))
    return K, stride, pad


def interior_mask(convs: list[Conv]) -> Tensor:
    """Boolean mask over the input's spatial positions: True where the forward cone of the
    position stays inside the map of every layer but the last."""
    geo = _geometry(convs)
    spatial = convs[0].in_shape[1:]
    axes = []
    for ax, n0 in enumerate(spatial):
        ok = []
        for i in range(n0):
            lo = hi = i
            n = n0
            inside = True
            for k, s, p in geo[:-1]:
                kk, ss, pp = k[ax], s[ax], p[ax]
                lo, hi = -((-(lo + pp - kk + 1)) // ss), (hi + pp) // ss
                n = (n + 2 * pp - kk) // ss + 1
                if lo < 0 or hi > n - 1:
                    inside = False
                    break
            ok.append(inside)
        axes.append(torch.tensor(ok))
    mask = axes[0]
    for a in axes[1:]:
        mask = mask[..., None] & a
    return mask


def _schur(K: Tensor) -> float:
    """Schur-test bound √(max row sum · max column sum) on the norm of the zero-padded
    convolution with a nonnegative kernel K (each tap meets an input entry at most once)."""
    rows = float(K.flatten(1).sum(1).max())
    cols = float(K.transpose(0, 1).flatten(1).sum(1).max())
    return math.sqrt(rows * cols)


def _inertia_certifies(G: Tensor, k: int, mu: float, err_G: float) -> bool:
    """Whether λ_max(Z J Zᵀ) ≤ ``mu`` is proven for G = ZᵀZ (2k×2k, known up to ‖Ĝ − G‖₂ ≤
    ``err_G``) and J = diag(I_k, −I_k).

    Haynsworth's inertia additivity for [[J, Zᵀ], [Z, μI]] (Schur complements on either diagonal
    block) gives n₋(J − G/μ) = n₋(J) + n₋(μI − ZJZᵀ) = k + n₋(μI − ZJZᵀ), so μI − ZJZᵀ ⪰ 0 exactly
    when the (k+1)-th smallest eigenvalue of H = J − G/μ is ≥ 0. It is checked on the computed
    eigenvalues of the computed Ĥ with margins for ‖Ĝ − G‖/μ, the rounding of forming Ĥ and the
    backward error of the symmetric eigensolver (16·n·u·‖Ĥ‖_F, generous for LAPACK's syevd).
    """
    n = G.shape[0]
    J = torch.cat([G.new_ones(k), -G.new_ones(n - k)])
    H = torch.diag(J) - G / mu
    fro_G = float(torch.linalg.matrix_norm(G)) * (1 + 1e-6)
    err_H = err_G / mu + 4 * _U * (1 + fro_G / mu)
    ev = torch.linalg.eigvalsh(H)
    err_eig = 16 * n * _U * float(torch.linalg.matrix_norm(H)) * (1 + 1e-6)
    return bool(ev[k] >= err_H + err_eig)


def gram_difference_bound(X: Tensor, Y: Tensor) -> Tensor | None:
    """Certified upper bound on λ_max(X Xᵀ − Y Yᵀ) for explicit float64 matrices X, Y (m × k),
    or None when the check does not succeed.

    With Z = [X, Y] and J = diag(I_k, −I_k), X Xᵀ − Y Yᵀ = Z J Zᵀ, whose nonzero eigenvalues are
    those of J·ZᵀZ: only the 2k×2k Gram matrix G = ZᵀZ is needed. An estimate λ̂ (eigenvalues of
    LᵀJL for a Cholesky factor L of G + δI) is raised slightly to μ and μ proven by inertia
    (:func:`_inertia_certifies`); the Gram matrix's rounding is |Ĝ − G| ≤ γ_m·|Z|ᵀ|Z|, so
    ‖Ĝ − G‖₂ ≤ γ_m·‖Z‖_F².

    >>> X = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    >>> Y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    >>> float(torch.linalg.eigvalsh(X @ X.T - Y @ Y.T)[-1])   # the exact value
    3.23606797749979
    >>> round(float(gram_difference_bound(X, Y)), 6)
    3.236068
    """
    if X.shape != Y.shape or X.dim() != 2:
        raise ValueError(f"X and Y must be matrices of one shape, got {tuple(X.shape)}, "
                         f"{tuple(Y.shape)}")
    m, k = X.shape
    if k == 0:
        return X.new_zeros(())
    with exact_arithmetic(), torch.no_grad():
        Z = torch.cat([X, Y], 1).double()
        if not torch.isfinite(Z).all():
            return None
        G = Z.T @ Z
        fro2 = float((Z * Z).sum()) * (1 + _gamma(Z.numel() + 2))
        if fro2 == 0.0:
            return X.new_zeros((), dtype=torch.float64)
        err_G = _gamma(m + 2) * fro2
        scale = float(G.diagonal().max())
        J = torch.cat([G.new_ones(k), -G.new_ones(k)])
        try:
            L = torch.linalg.cholesky(G + 1e-12 * scale * torch.eye(2 * k, dtype=G.dtype))
            lam = float(torch.linalg.eigvalsh(L.T @ (J[:, None] * L))[-1])
        except RuntimeError:  # not numerically positive definite: through G's eigenvectors
            w, V = torch.linalg.eigh(G)
            R = V * w.clamp_min(0).sqrt()
            lam = float(torch.linalg.eigvalsh(R.T @ (J[:, None] * R))[-1])
        step = 1e-9 * scale
        for _ in range(5):
            mu = max(lam, 0.0) + step
            if _inertia_certifies(G, k, mu, err_G):
                return G.new_tensor(mu)
            step *= 30
    return None


def _prepare(ops: list[LinearOperator]):
    """(K, K_abs, stride, pad, border mask, cost of the border part) for a covered product of
    zero-padded convolutions, None when it is not covered or over the per-product limits."""
    if len(ops) < 2 or not all(isinstance(o, Conv) for o in ops):
        return None
    try:
        K, stride, pad = composed_kernel(ops)
        K_abs, _, _ = composed_kernel(ops, absolute=True)
        inner = interior_mask(ops)
    except ValueError:
        return None
    in_shape, out_shape = tuple(ops[0].in_shape), tuple(ops[-1].out_shape)
    conv = F.conv1d if ops[0].dims == 1 else F.conv2d
    probe = torch.zeros(1, *in_shape, dtype=torch.float64, device="meta")
    if tuple(conv(probe, K.to("meta"), None, stride, pad).shape[1:]) != out_shape:
        return None
    c_in = in_shape[0]
    border = (~inner).expand(c_in, *inner.shape).reshape(-1)
    n_border = int(border.sum())
    n_out = _numel(out_shape)
    cost = 0.0
    if n_border:
        columns = float(n_border) * sum(_numel(o.out_shape) * o.weight()[0].numel() for o in ops)
        cost = columns + n_border * n_out * K[0].numel()
        cost += n_out * (2.0 * n_border) ** 2 + 2 * (2.0 * n_border) ** 3
        if (n_border > BORDER_COLUMNS_LIMIT or min(n_border, n_out) > MATERIALIZE_LIMIT
                or n_border * n_out > MATERIALIZE_ENTRIES or cost > BORDER_COST_LIMIT):
            return None
        if n_border <= BORDER_FREE_COLUMNS and columns <= BORDER_FREE_COST:
            cost = 0.0
    return K, K_abs, stride, pad, border, cost


def border_cost(ops: list[LinearOperator]) -> float | None:
    """Multiply-adds of :func:`conv_product_norm`'s border part that the budget is charged (0
    without border columns or within the free limits), or None when the product is not covered
    or over the per-product limits."""
    prepared = _prepare(ops)
    return None if prepared is None else prepared[-1]


def conv_product_norm(ops: list[LinearOperator]) -> Tensor | None:
    """Certified ‖ops[-1]∘⋯∘ops[0]‖ for zero-padded convolutions by the interior/border split
    (module docstring), or None when the product is not covered or too costly."""
    prepared = _prepare(ops)
    if prepared is None:
        return None
    K, K_abs, stride, pad, border, _ = prepared
    in_shape = tuple(ops[0].in_shape)
    conv = F.conv1d if ops[0].dims == 1 else F.conv2d
    n_border = int(border.sum())
    # ‖T'‖: the composed kernel's certified norm, plus the rounding of K (|K̂ − K| ≤ γ_p·|K|⊛…)
    terms = sum(o.weight()[0].numel() for o in ops) + 4 * len(ops)
    a_hat = certified.conv_norm(K, in_shape, stride=stride, padding=pad, dilation=1, groups=1)
    eps_K = _gamma(terms) * _schur(K_abs) * (1 + 1e-6)
    a = a_hat + eps_K
    if not n_border:
        return a
    # X = T·B, the border columns, materialised with a bound on their rounding
    index = torch.full((_numel(in_shape),), -1, dtype=torch.long)
    index[border] = torch.arange(n_border)
    embed = Select(index, (n_border,), in_shape, label="border columns")
    X, e_X = _materialized_with_error(Chain([embed, *ops]))
    with exact_arithmetic(), torch.no_grad():
        basis = torch.zeros(n_border, _numel(in_shape), dtype=torch.float64)
        basis[torch.arange(n_border), torch.nonzero(border).squeeze(1)] = 1
        Y = conv(basis.reshape(n_border, *in_shape), K, None, stride, pad).reshape(n_border, -1).T
        # the border columns reach only the outputs near the border: the other rows are zero in
        # both X and Y and change neither norm nor Gram matrix
        live = (X != 0).any(1) | (Y != 0).any(1)
        X, Y = X[live], Y[live]
        b = certified.dense_norm(X) + e_X
        quadrature = torch.sqrt(a.double() ** 2 + b.double() ** 2) * (1 + 4 * _U)
        # Y = T̂'·B (the computed kernel's convolution on the same columns), and
        # ‖T‖² ≤ ‖T̂'‖² + λ_max(XXᵀ − YYᵀ): module docstring
        e_Y = _gamma(K[0].numel() + 4) * _schur(K.abs()) * (1 + 1e-6)
        mu = gram_difference_bound(X, Y)
        if mu is None:
            return quadrature
        mu = mu + 2 * a_hat.double() * e_Y + e_Y**2
        weyl = (torch.sqrt(a_hat.double() ** 2 + mu) + eps_K + e_X) * (1 + 4 * _U)
        return torch.minimum(quadrature, weyl)
