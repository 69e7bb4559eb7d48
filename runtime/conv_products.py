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

__all__ = ["conv_product_norm", "middle_product_norm", "middle_cost", "border_cost",
           "border_budget", "admit", "interior_mask", "composed_kernel", "gram_difference_bound"]

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

_budget: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "curvbound_border_budget", default=None)


@contextlib.contextmanager
def border_budget(total: float | None = None, middle: float | None = None) -> Iterator[None]:
    """Within the block, border parts draw on a budget of ``total`` multiply-adds (default
    :data:`STRUCTURED_BUDGET`) and :func:`middle_product_norm` on one of ``middle`` (default
    :data:`MIDDLE_BUDGET`); ``curvbound.compile`` opens one per compile. Outside any block only
    the per-product limits apply.

    >>> with border_budget(1e9):
    ...     admit(6e8), admit(6e8), admit(3e8)
    (True, False, True)
    """
    token = _budget.set({"border": STRUCTURED_BUDGET if total is None else float(total),
                         "middle": MIDDLE_BUDGET if middle is None else float(middle)})
    try:
        yield
    finally:
        _budget.reset(token)


def admit(cost: float, kind: str = "border") -> bool:
    """Charge ``cost`` to the open :func:`border_budget` (its ``kind`` part: "border" or
    "middle"); False when it does not fit."""
    left = _budget.get()
    if left is None:
        return True
    if cost <= left[kind]:
        left[kind] -= cost
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


# ------------------------------------------------------------------ two factors, narrow middle

#: :func:`middle_product_norm` runs when the map between the two convolutions has at most this
#: many entries (its dense m×m matrices: five of them, 512 MiB each at m = 8192) ...
MIDDLE_LIMIT = 8192
#: ... and at most this many probes (batched applications of each factor and its adjoint).
MIDDLE_PROBES_LIMIT = 4096
#: Middle maps up to this many entries are always admitted; larger ones draw their cost
#: (:func:`middle_cost`) on a budget of MIDDLE_BUDGET multiply-adds per compile
#: (:func:`border_budget`; separate from the border parts', so that it never takes their place).
#: It is tried only for pairs without a composed-kernel bound (over the border limits).
MIDDLE_FREE = 4096
MIDDLE_BUDGET = 2e11


def _coupling_radius(conv: Conv, side: str) -> tuple[int, ...] | None:
    """Per spatial axis, the largest distance between two positions that couple in CCᵀ (``side``
    "out": two outputs whose windows overlap) or in CᵀC ("in": two inputs in one window); None
    when the padding wraps around (circular, reflect, replicate: distant positions couple)."""
    if conv.padding_mode != "zeros":
        return None
    k = tuple(conv.weight().shape[2:])
    dil, stride = _expand(conv.dilation, conv.dims), _expand(conv.stride, conv.dims)
    span = [d * (kk - 1) for d, kk in zip(dil, k)]
    if side == "out":
        return tuple(sp // s for sp, s in zip(span, stride))
    return tuple(span)


def _probed_gram(conv: Conv, side: str, radius: tuple[int, ...]) -> Tensor:
    """The dense Gram matrix CCᵀ (``side`` "out", on the output map) or CᵀC ("in", on the input
    map) of one zero-padded convolution, float64, from grouped probes: the positions of one
    channel whose coordinates agree modulo 2r+1 on every axis are seeded together (their
    columns have disjoint supports, each within distance r of its seed), so the product costs
    channels·Π(2r+1) batched applications of C and Cᵀ instead of one per entry. Each column's
    entries are the same float64 sums as for a single seed (the other seeds add exact zeros)."""
    shape = tuple(conv.out_shape if side == "out" else conv.in_shape)
    c, grid = shape[0], shape[1:]
    period = [min(2 * r + 1, n) for r, n in zip(radius, grid)]
    m = _numel(shape)
    dtype = torch.float64
    pos = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")).reshape(
        len(grid), -1)  # (d, P) coordinates of every position
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    G = torch.zeros(m, m, dtype=dtype)
    x = torch.zeros(1, *conv.in_shape, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        y = conv.apply(x)
    r_t, per = torch.tensor(radius)[:, None], torch.tensor(period)[:, None]
    whole = torch.tensor([p == n for p, n in zip(period, grid)])  # one seed on the axis
    for colour in torch.cartesian_prod(*[torch.arange(p) for p in period]).reshape(-1, len(grid)):
        # owner of each position q: the seed p ≡ colour (mod period) with |p − q| ≤ r per axis
        owner = pos + ((colour[:, None] - pos + r_t) % per) - r_t
        owner = torch.where(whole[:, None], colour[:, None].expand_as(owner), owner)
        valid = ((owner >= 0) & (owner < torch.tensor(grid)[:, None])).all(0)
        seeded = (pos - colour[:, None]) % per == 0
        seeds = torch.zeros(c, c, *grid, dtype=dtype)
        spot = seeded.all(0).reshape(grid)
        for ch in range(c):
            seeds[ch, ch][spot] = 1.0
        if side == "out":  # C(Cᵀ s)
            (back,) = torch.autograd.grad(y, x, seeds[:, None], retain_graph=True,
                                          is_grads_batched=True)
            res = conv.apply(back.reshape(c, *conv.in_shape).detach())
        else:  # Cᵀ(C s)
            fwd = conv.apply(seeds).detach()
            (res,) = torch.autograd.grad(y, x, fwd[:, None], retain_graph=True,
                                         is_grads_batched=True)
        res = res.detach().reshape(c, c, -1)  # (seed channel, channel, position)
        own = (owner * torch.tensor(strides)[:, None]).sum(0)  # flat owner position
        q = torch.nonzero(valid).squeeze(1)
        P = pos.shape[1]
        rows = (torch.arange(c)[:, None] * P + q[None, :]).reshape(-1)  # (channel, q)
        for ch in range(c):
            cols = (ch * P + own[q]).repeat(c)
            G[rows, cols] = res[ch][:, q].reshape(-1)
    return G


def _banded_matmul(A: Tensor, B: Tensor, block: int, a: tuple[int, int], b: tuple[int, int]
                   ) -> Tensor:
    """A·B for block-banded A, B (``a`` = (lower, upper) block bandwidths of A, ``b`` of B; blocks
    of ``block`` rows/columns): only the products of blocks inside both bands are formed. Each
    entry is still a sum over at most n products (the others are exact zeros)."""
    n = A.shape[0]
    nb = -(-n // block)
    C = torch.zeros(n, B.shape[1], dtype=A.dtype)
    sl = [slice(t * block, min(n, (t + 1) * block)) for t in range(nb)]
    for r in range(nb):
        for c in range(max(0, r - a[0] - b[0]), min(nb, r + a[1] + b[1] + 1)):
            lo, hi = max(0, r - a[0], c - b[1]), min(nb - 1, r + a[1], c + b[0])
            if lo > hi:
                continue
            inner = slice(sl[lo].start, sl[hi].stop)
            C[sl[r], sl[c]] = A[sl[r], inner] @ B[inner, sl[c]]
    return C


def _band_times(A: Tensor, X: Tensor, block: int, band: int) -> Tensor:
    """A·X for a block-banded A (|row block − column block| ≤ ``band``) and a dense X."""
    n = A.shape[0]
    out = torch.empty(n, X.shape[1], dtype=torch.promote_types(A.dtype, X.dtype))
    for start in range(0, n, block):
        stop = min(n, start + block)
        lo, hi = max(0, start - band * block), min(n, stop + band * block)
        out[start:stop] = A[start:stop, lo:hi] @ X[lo:hi]
    return out


def _banded_cholesky(A: Tensor, block: int, band: int) -> tuple[Tensor, Tensor]:
    """(L, info) like ``torch.linalg.cholesky_ex`` for a symmetric A that is block-banded
    (|row block − column block| ≤ ``band``; read from its lower triangle): the factor has the same
    band, and each entry is formed by the usual recurrence l_ij = (a_ij − Σ_k l_ik l_jk)/l_jj with
    the terms in another order (the zero terms outside the band left out), so Demmel's backward
    error bound for a Cholesky that runs to completion holds as for the dense one. info ≠ 0 when
    a pivot block is not positive definite."""
    n = A.shape[0]
    nb = -(-n // block)
    sl = [slice(t * block, min(n, (t + 1) * block)) for t in range(nb)]
    L = torch.zeros_like(A)
    for c in range(nb):
        lo = max(0, c - band)
        left = L[sl[c], sl[lo].start:sl[c].start]
        D = torch.tril(A[sl[c], sl[c]])
        D = D + torch.tril(D, -1).T
        if left.numel():
            D = D - left @ left.T
        LJ, info = torch.linalg.cholesky_ex(D)
        if int(info) != 0:
            return L, torch.tensor(sl[c].start + int(info), dtype=torch.int32)
        L[sl[c], sl[c]] = LJ
        for r in range(c + 1, min(nb, c + band + 1)):
            lo_r = max(0, r - band)
            X = A[sl[r], sl[c]]
            if lo_r < c:
                done = slice(sl[lo_r].start, sl[c].start)
                X = X - L[sl[r], done] @ L[sl[c], done].T
            L[sl[r], sl[c]] = torch.linalg.solve_triangular(LJ, X.T, upper=False).T
    return L, torch.tensor(0, dtype=torch.int32)


def _middle_plan(ops: list[LinearOperator]):
    """(C, B, m, r_G, r_K, block, probes) when :func:`middle_product_norm` covers ``ops``, else
    None."""
    if len(ops) != 2 or not all(isinstance(o, Conv) for o in ops):
        return None
    C, B = ops
    m = _numel(C.out_shape)
    if tuple(C.out_shape) != tuple(B.in_shape) or m > MIDDLE_LIMIT or C.dims != B.dims:
        return None
    r_g, r_k = _coupling_radius(C, "out"), _coupling_radius(B, "in")
    if r_g is None or r_k is None:
        return None
    grid = tuple(C.out_shape[1:])
    probes = C.out_shape[0] * (math.prod(min(2 * r + 1, n) for r, n in zip(r_g, grid))
                               + math.prod(min(2 * r + 1, n) for r, n in zip(r_k, grid)))
    if probes > MIDDLE_PROBES_LIMIT:
        return None
    return C, B, m, r_g, r_k, m // grid[0], probes


def middle_cost(ops: list[LinearOperator]) -> float | None:
    """Multiply-adds :func:`middle_product_norm` charges the budget (0 for a middle map of at most
    :data:`MIDDLE_FREE` entries), or None when it does not cover ``ops``: the probes (each a
    forward and an adjoint pass of both factors), the banded products and factorisations
    (≈ 4·m·w², w the half-band of LᵀKL in entries) and the estimate (384 vectors over the band)."""
    plan = _middle_plan(ops)
    if plan is None:
        return None
    C, B, m, r_g, r_k, block, probes = plan
    if m <= MIDDLE_FREE:
        return 0.0
    passes = sum(_numel(o.out_shape) * o.weight()[0].numel() for o in (C, B))
    w = (r_g[0] + r_k[0] + 1) * block
    return 2.0 * probes * passes + 4.0 * m * w * w + 384.0 * m * (2 * w)


def middle_product_norm(ops: list[LinearOperator]) -> Tensor | None:
    """Certified ‖B∘C‖ for two zero-padded convolutions (``ops`` = [C, B]) through the map between
    them, or None when not covered (other operators, wrap-around padding, a middle map over
    :data:`MIDDLE_LIMIT` entries, too many probes, a failed factorisation).

    Math: with G = CCᵀ and K = BᵀB on the middle map (m entries), ‖BC‖² = λ_max(K^½GK^½); with
    G = LLᵀ this is λ_max(LᵀKL), an m×m problem however large the input and output are (the CIFAR
    6C2F pair 32×32×32 → 16×16×32 → 16×16×64 has m = 8192 against 16384 outputs and 32768 inputs).
    G and K are block-banded in position-major order (blocks of one row of the map; couplings
    reach r rows, :func:`_coupling_radius`), formed by grouped probes (:func:`_probed_gram`), L is
    banded like G, and H = LᵀKL is formed from the blocks inside the bands. The bound is proven:

    ‖BC‖² ≤ λ̄(H̃) + γ_{2m}‖L̃‖_F²‖|K̃|‖ + e_K‖L̃‖_F² + (‖K̃‖ + e_K)(e_G + d_G),

    where G̃, K̃ are the computed Gram matrices (‖G̃ − G‖ ≤ e_G = γ_p‖|C|‖² + the symmetrisation,
    likewise e_K), L̃L̃ᵀ = G̃ + ΔG with ‖ΔG‖ ≤ d_G = γ_{m+1}tr(G̃)/(1 − γ_{m+1}) (Demmel's bound
    for a Cholesky that runs to completion), the γ_{2m} term bounds the rounding of H̃ = fl(L̃ᵀK̃L̃),
    and λ̄ is :func:`~curvbound.runtime.certified.eigmax_bound`: G ⪯ L̃L̃ᵀ + (e_G + d_G)I (also
    when a singular G̃ is factored as G̃ + δI, which only enlarges L̃L̃ᵀ) gives
    K^½GK^½ ⪯ K^½L̃L̃ᵀK^½ + (e_G + d_G)K, and LᵀKL ⪯ L̃ᵀK̃L̃ + e_K·L̃ᵀL̃.
    """
    plan = _middle_plan(ops)
    if plan is None:
        return None
    C, B, m, r_g, r_k, block, _ = plan
    channels = C.out_shape[0]
    abs_c, abs_b = C.abs_norm_bound(), B.abs_norm_bound()
    if abs_c is None or abs_b is None:
        return None
    with exact_arithmetic(), torch.no_grad():
        G = _probed_gram(C, "out", r_g)
        K = _probed_gram(B, "in", r_k)
        # position-major order: blocks of one row of the map (first spatial axis) are banded
        perm = torch.arange(m).reshape(channels, -1).T.reshape(-1)
        G, K = G[perm][:, perm], K[perm][:, perm]
        bg, bk = r_g[0], r_k[0]
        fro = lambda X: float(certified._frobenius_sq_upper(X).sqrt())  # noqa: E731
        t_c = 2 * max(C.rounding_terms(), m) + 4
        t_b = 2 * max(B.rounding_terms(), _numel(B.out_shape)) + 4
        e_g = _gamma(t_c) * float(abs_c.double()) ** 2 + 1.01 * _U * fro(G)
        e_k = _gamma(t_b) * float(abs_b.double()) ** 2 + 1.01 * _U * fro(K)
        G = (G + G.T) * 0.5
        K = (K + K.T) * 0.5
        L, info = _banded_cholesky(G, block, bg)
        if int(info) != 0:  # singular (more middle entries than inputs): factor G̃ + δI ⪰ G̃
            G.diagonal().add_(2.0**-30 * float(torch.diagonal(G).max()))
            L, info = _banded_cholesky(G, block, bg)
        if int(info) != 0 or not torch.isfinite(L).all():
            return None
        d_g = _gamma(m + 1) * float(torch.diagonal(G).sum()) * (1 + 2 * _gamma(m)) \
            / (1 - _gamma(m + 1))
        KL = _banded_matmul(K, L, block, (bk, bk), (bg, 0))
        H = _banded_matmul(L.T.contiguous(), KL, block, (0, bg), (bk + bg, bk))
        band = bg + bk  # H = LᵀKL: L reaches bg blocks below, K bk either side
        lam = certified.eigmax_bound(H, cholesky=lambda A: _banded_cholesky(A, block, band),
                                     matmul=lambda X: _band_times(H, X, block, band))
        if lam is None:
            return None
        fro_l = float(certified._frobenius_sq_upper(L))
        abs_k = float(K.abs().sum(1).max()) * (1 + 2 * _gamma(m))
        total = (float(lam) + _gamma(2 * m) * fro_l * abs_k + e_k * fro_l
                 + (abs_k + e_k) * (e_g + d_g))
        return certified.certify(math.sqrt(max(total, 0.0)))
