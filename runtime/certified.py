"""Guaranteed upper bounds on ℓ2 operator (spectral) norms, computed in float64.

Everything here returns a value that is provably **at least** the true norm (theory.md §11):
exact float64 SVDs of small matrices, the Gram iteration of Delattre et al. (ICML 2023) with its
rounding errors bounded explicitly, exact per-frequency SVDs of the circulant embedding of a
convolution, and the Schur test for average pooling. Power iteration, which approaches a norm from
below, is never used. Each result is a 0-dim float64 tensor passed through :func:`certify`, which
adds the documented :data:`SAFETY_MARGIN` for floating-point rounding; where the computation is
made of differentiable torch operations the result carries gradients with respect to the weights.

>>> import torch
>>> from curvbound.runtime.certified import conv_norm, dense_norm
>>> dense_norm(torch.tensor([[3.0, 0.0], [4.0, 5.0]]))   # exactly sqrt(45)
tensor(6.7082, dtype=torch.float64)
>>> laplacian = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])
>>> conv_norm(laplacian, (1, 8, 8), padding=1)         # exactly 4 + 4 cos(pi/9)
tensor(7.7588, dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "UNIT_ROUNDOFF",
    "rounding_factor",
    "ABSOLUTE_MARGIN",
    "DENSE_SVD_MAX_DIM",
    "DENSE_GRAM_MIN_ENTRIES",
    "SAFETY_MARGIN",
    "adaptive_avg_pool_norm",
    "certify",
    "conv_norm",
    "conv_transpose_norm",
    "dense_norm",
    "eigmax_bound",
    "diagonal_norm",
    "gram_iteration_norm",
    "matrix_of",
    "padding_multiplicity",
    "pooling_norm",
]

SAFETY_MARGIN: float = 1e-9
"""Relative margin multiplied onto every certified value.

Why 1e-9: LAPACK's SVD is backward stable, so the computed singular values are the exact singular
values of W + E with ‖E‖₂ ≤ p(m, n)·u·‖W‖₂, u = 2⁻⁵³ ≈ 1.1e-16 and p a modest polynomial (c·n in
the usual analyses); by Weyl's inequality σ̂₁ ≥ σ₁ − p·u·σ₁. A margin of 1e-9 covers p up to 9·10⁶,
i.e. the constant c up to about 2000 at the default SVD size limit n = 4096. The other error sources
are far smaller: converting float32/float16 weights to float64 is exact; each entry of a
convolution's per-frequency matrix is a direct sum of k taps (error ≤ γ_k·Σ|w|, about 1e-13 relative
to the norm even for 4096 channels, see :func:`conv_norm`); the Gram iteration bounds its own
rounding explicitly; the few float64 operations that combine results cost a few u each.
"""

ABSOLUTE_MARGIN: float = 1e-300
"""Absolute margin added by :func:`certify`: rounding in the subnormal range (below
2⁻¹⁰²² ≈ 2.2e-308) is absolute rather than relative, so a purely relative margin would not cover a
norm that is itself tiny."""

DENSE_SVD_MAX_DIM: int = 4096
"""Largest min(m, n) for which :func:`dense_norm` runs an exact SVD, not the Gram iteration."""

#: From this many entries on, :func:`dense_norm` takes the top eigenvalue of the smaller Gram
#: matrix with an explicit rounding bound instead of an SVD (same result to ~1e-12, faster).
DENSE_GRAM_MIN_ENTRIES: int = 1 << 20

_UNIT_ROUNDOFF = 2.0**-53
_UNDERFLOW_SLACK = 2.0**-1000  # covers gradual underflow in the scaled Gram products (entries ~1)
_FREQ_CHUNK_ELEMENTS = 1 << 22  # complex128 entries per frequency chunk in conv_norm (64 MiB)


UNIT_ROUNDOFF = _UNIT_ROUNDOFF


def rounding_factor(exponent: float) -> float:
    """A float64 number ≥ (1 − u)^−(E+1): the factor that makes a computed value an upper bound.

    >>> rounding_factor(0.0) > 1.0
    True
    """
    if exponent * UNIT_ROUNDOFF > 1e-3:
        raise ValueError(f"rounding exponent {exponent:g} is too large to bound")
    return math.nextafter(1.0 + 2.0 * (exponent + 2.0) * UNIT_ROUNDOFF, math.inf)


def certify(value: Tensor | float) -> Tensor:
    """Return ``value·(1 + SAFETY_MARGIN) + ABSOLUTE_MARGIN`` as a float64 tensor (keeps gradients).

    >>> certify(torch.tensor(2.0)).item() == 2.0 * (1 + SAFETY_MARGIN) + ABSOLUTE_MARGIN
    True
    """
    value = torch.as_tensor(value).to(torch.float64)
    return value * (1.0 + SAFETY_MARGIN) + ABSOLUTE_MARGIN


def _gamma(n: int) -> float:
    """Higham's γ_n = n·u/(1 − n·u): bound on the relative error of an n-term dot product."""
    nu = n * _UNIT_ROUNDOFF
    if nu >= 0.5:
        raise ValueError(f"inner dimension {n} too large for a float64 rounding bound")
    return nu / (1.0 - nu)


def _scale_pow2(x: Tensor, exponent: int) -> Tensor:
    """x·2^exponent, split into steps so that no factor overflows (exact unless the result does)."""
    while exponent != 0:
        step = max(-1000, min(1000, exponent))
        x = x * (2.0**step)
        exponent -= step
    return x


def _max_abs_exponent(x: Tensor) -> int:
    """The e with max|x| ∈ [2^(e−1), 2^e), i.e. x·2^(−e) has entries in (−1, 1)."""
    return int(torch.frexp(x.detach().abs().max()).exponent)


def _frobenius_sq_upper(x: Tensor) -> Tensor:
    """Upper bound on ‖x‖_F²: the float64 sum of squares inflated by its worst-case error."""
    return (x * x).sum() * (1.0 + 2.0 * _gamma(x.numel() + 1))


def gram_iteration_norm(W: Tensor, iters: int = 6) -> Tensor:
    """Certified upper bound on ‖W‖₂ by the Gram iteration of Delattre et al. (ICML 2023).

    Math: with G₀ = W and G_{t+1} = G_tᵀG_t, σ₁(W)^(2^t) = σ₁(G_t) ≤ ‖G_t‖_F, and the ratio of the
    bound to σ₁ is (Σᵢ (σᵢ/σ₁)^(2^(t+1)))^(1/2^(t+1)) ≤ rank^(1/2^(t+1)), so it converges quickly.

    Overflow is avoided by rescaling every iterate by an exact power of two 2^(−e_t) (entries in
    (−1, 1)); the exponents are tracked as integers. Rounding is bounded explicitly rather than left
    to the margin: a float64 product H = fl(AAᵀ) with inner dimension p satisfies
    ‖H − AAᵀ‖₂ ≤ ‖H − AAᵀ‖_F ≤ γ_p‖A‖_F², hence σ₁(A)² ≤ σ₁(H) + γ_p‖A‖_F². Unrolling from the last
    iterate (σ₁ ≤ ‖·‖_F) back to W gives the returned bound b₀·2^(e₀) with
    b_t = ‖A_t‖_F,  b_k = sqrt(2^(e_{k+1})·b_{k+1} + γ_p‖A_k‖_F²).

    Args:
        W: a 2-D tensor (any floating dtype; computed in float64, differentiable).
        iters: number of Gram steps t (6 is within about 0.3% of σ₁ on random 200×300 matrices).
    """
    if W.dim() != 2:
        raise ValueError(f"gram_iteration_norm expects a 2-D matrix, got shape {tuple(W.shape)}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    A = W.to(torch.float64)
    if A.numel() == 0:
        return certify(A.new_zeros(()))
    if torch.isnan(A).any():
        raise ValueError("matrix contains NaN")
    if not torch.isfinite(A).all():
        return A.new_tensor(math.inf)
    if not A.detach().any():
        return certify(A.abs().sum())  # zero, but keeps the autograd graph
    if A.shape[0] > A.shape[1]:
        A = A.T  # ‖W‖ = ‖Wᵀ‖; make the Gram matrix AAᵀ the smaller one
    e0 = _max_abs_exponent(A)
    A = _scale_pow2(A, -e0)
    frob_sq = [_frobenius_sq_upper(A)]
    slack: list[float] = []
    exps: list[int] = []
    for _ in range(iters):
        slack.append(_gamma(A.shape[1]))
        H = A @ A.T  # square and symmetric from now on
        e = _max_abs_exponent(H)
        A = _scale_pow2(H, -e)
        exps.append(e)
        frob_sq.append(_frobenius_sq_upper(A))
    b = frob_sq[-1].sqrt()
    for k in reversed(range(iters)):
        b = torch.sqrt(_scale_pow2(b, exps[k]) + slack[k] * frob_sq[k] + _UNDERFLOW_SLACK)
    return certify(_scale_pow2(b, e0))


def dense_norm(W: Tensor, *, svd_max_dim: int = DENSE_SVD_MAX_DIM, gram_iters: int = 10) -> Tensor:
    """Certified ‖W‖₂ of a 2-D matrix: exact float64 SVD when min(m, n) ≤ ``svd_max_dim`` (from
    :data:`DENSE_GRAM_MIN_ENTRIES` entries on, the exact top eigenvalue of the smaller Gram matrix
    plus its rounding bound), otherwise :func:`gram_iteration_norm` with ``gram_iters`` steps
    (≤ rank^(1/2048) above σ₁ for 10 steps).

    >>> W = torch.tensor([[3.0, 0.0], [4.0, 5.0]])
    >>> dense_norm(W)
    tensor(6.7082, dtype=torch.float64)
    >>> dense_norm(W, svd_max_dim=1)   # forces the Gram iteration
    tensor(6.7082, dtype=torch.float64)
    """
    if W.dim() != 2:
        raise ValueError(f"dense_norm expects a 2-D matrix, got shape {tuple(W.shape)}")
    if min(W.shape) > svd_max_dim:
        return gram_iteration_norm(W, iters=gram_iters)
    A = W.to(torch.float64)
    if A.numel() == 0:
        return certify(A.new_zeros(()))
    if torch.isnan(A).any():
        raise ValueError("matrix contains NaN")
    if not torch.isfinite(A).all():
        return A.new_tensor(math.inf)
    if A.numel() >= DENSE_GRAM_MIN_ENTRIES and A.detach().any():
        return _gram_eigenvalue_norm(A)
    return certify(torch.linalg.svdvals(A)[0])


def _gram_eigenvalue_norm(A: Tensor) -> Tensor:
    """‖A‖₂ from the top eigenvalue of the smaller Gram matrix H = fl(AAᵀ) (several times faster
    than an SVD of a large or rectangular A): σ₁(A)² ≤ λ_max(H) + γ_p‖A‖_F² with p the inner
    dimension, as in :func:`gram_iteration_norm`; A is first scaled by an exact power of two.

    >>> W = torch.tensor([[3.0, 0.0, 0.0], [4.0, 5.0, 0.0]])
    >>> _gram_eigenvalue_norm(W)   # sqrt(45)
    tensor(6.7082, dtype=torch.float64)
    """
    if A.shape[0] > A.shape[1]:
        A = A.T
    e0 = _max_abs_exponent(A)
    A = _scale_pow2(A.to(torch.float64), -e0)
    lam = torch.linalg.eigvalsh(A @ A.T)[-1].clamp_min(0.0)
    b = torch.sqrt(lam + _gamma(A.shape[1]) * _frobenius_sq_upper(A) + _UNDERFLOW_SLACK)
    return certify(_scale_pow2(b, e0))


def _top_eigenpair(H: Tensor, dim: int = 384, block: int = 16,
                   matmul: Callable[[Tensor], Tensor] | None = None) -> tuple[float, Tensor]:
    """An estimate (θ, v) of the top eigenpair of a symmetric H: ``eigh`` for small H, otherwise
    block Lanczos (blocks of ``block`` vectors up to ``dim``, full reorthogonalisation,
    Rayleigh-Ritz, stopped when θ settles: gemms of n×block, each one pass over the memory of H;
    ``matmul`` replaces ``H @ X``). It only has to land close:
    :func:`eigmax_bound` proves the bound."""
    n = H.shape[0]
    if n <= 2 * dim:
        w, V = torch.linalg.eigh(H)
        return float(w[-1]), V[:, -1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, block, generator=gen, dtype=H.dtype).to(H.device))
    basis, images, last = [Q], [], -math.inf
    while True:
        images.append(H @ basis[-1] if matmul is None else matmul(basis[-1]))
        V = torch.cat(basis, dim=1)
        w, Y = torch.linalg.eigh(V.T @ torch.cat(images, dim=1))
        theta = float(w[-1])
        if len(basis) * block >= dim or theta - last <= 1e-10 * abs(theta):
            return theta, V @ Y[:, -1]
        last = theta
        W = images[-1]
        for _ in range(2):
            W = W - V @ (V.T @ W)
        Q, _ = torch.linalg.qr(W)
        basis.append(Q)


def eigmax_bound(H: Tensor, cholesky: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                 matmul: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
    """Certified upper bound on λ_max(S), S = (H + Hᵀ)/2, from one Cholesky factorisation, or
    None when no attempt succeeds (non-finite input, or a spectrum the estimate misses badly).

    Math: an estimate θ of λ_max (:func:`_top_eigenpair`; if it misses by more than 1e-4 and
    n ≤ 4096, the exact float64 spectrum) is raised to μ = θ + δ·max(|θ|, ‖S‖_max) for
    δ = 1e-7, 1e-5, 1e-4 (then up to 1e-3, or 1e-2 for n > 4096); μI − S is formed as Ã
    (off-diagonal entries −S_ij are exact, each diagonal entry fl(μ − S_ii) is off by at most
    u·|Ã_ii|) and factored. If floating-point
    Cholesky of the symmetric Ã runs to completion, R̂ᵀR̂ = Ã + ΔA with |ΔA| ≤ γ_{n+1}|R̂ᵀ||R̂|
    (Demmel; Higham, *Accuracy and Stability*, Thm 10.3, for any order of the inner products).
    Then ‖R̂‖_F² = tr(Ã + ΔA) ≤ tr(Ã) + γ_{n+1}‖R̂‖_F², so ‖ΔA‖₂ ≤ γ_{n+1}‖|R̂|‖₂² ≤
    γ_{n+1}·tr(Ã)/(1 − γ_{n+1}) =: ε, and Ã + ΔA ⪰ 0 gives λ_min(Ã) ≥ −ε. Hence
    λ_max(S) ≤ μ + ε + u·max_i|Ã_ii| (+ the rounding of the symmetrisation, ≤ u‖S‖_F, and an
    underflow slack; S is first scaled by an exact power of two). One Cholesky costs n³/3
    multiply-adds, a dense eigensolver about 4n³/3 and proves nothing by itself. The result is
    differentiable: its value is the bound, its gradient that of the Rayleigh quotient vᵀSv
    (v the estimated eigenvector, i.e. the gradient of λ_max where it is simple). ``cholesky``
    replaces ``torch.linalg.cholesky_ex`` (same contract, e.g. one that exploits a band), ``matmul``
    the products H·X of the estimate (X an n×16 block; e.g. over the band only).

    >>> S = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    >>> b = eigmax_bound(S)
    >>> 3.0 <= b.item() <= 3.0 * (1 + 1e-6)
    True
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"eigmax_bound expects a square matrix, got shape {tuple(H.shape)}")
    n = H.shape[0]
    S = H.to(torch.float64)
    if n == 0:
        return None
    with torch.no_grad():
        top = float(S.detach().abs().max())
        if not math.isfinite(top):
            return None
        if top == 0.0:
            return certify(S.new_zeros(()))
        e = _max_abs_exponent(S)
        Ss = _scale_pow2(S.detach(), -e)
        Ss = (Ss + Ss.T) * 0.5
        sym_err = _UNIT_ROUNDOFF * float(_frobenius_sq_upper(Ss).sqrt()) * 1.01
        scale = float(Ss.abs().max())
        theta, v = _top_eigenpair(
            Ss, matmul=None if matmul is None else (lambda X: _scale_pow2(matmul(X), -e)))
        factor = torch.linalg.cholesky_ex if cholesky is None else cholesky
        g = _gamma(n + 1)
        bound, deltas, exact = None, [1e-7, 1e-5, 1e-4], False
        while bound is None and deltas:
            delta = deltas.pop(0)
            mu = theta + delta * max(abs(theta), scale)
            diag = mu - torch.diagonal(Ss)
            A = -Ss
            A.diagonal().copy_(diag)
            if bool((diag > 0).all()) and int(factor(A)[1]) == 0:
                trace = float(diag.sum()) * (1.0 + 2.0 * _gamma(n + 1))
                eps = g * trace / (1.0 - g) + _UNIT_ROUNDOFF * float(diag.max()) * 1.01
                bound = (mu + eps + sym_err + n * _UNDERFLOW_SLACK) * (1.0 + 4 * _UNIT_ROUNDOFF)
            elif not deltas and not exact:  # the estimate missed
                exact = True
                if n <= 4096:  # take the exact spectrum (4n³/3 multiply-adds)
                    w, V = torch.linalg.eigh(Ss)
                    theta, v = float(w[-1]), V[:, -1]
                    deltas = [1e-7, 1e-5, 1e-3]
                else:
                    deltas = [1e-3, 1e-2]
        if bound is None:
            return None
    v = v.to(S.dtype)
    rayleigh = v @ (S @ v) / (v @ v)  # = vᵀ((S + Sᵀ)/2)v
    value = _scale_pow2(torch.as_tensor(bound, dtype=torch.float64), e)
    return certify(rayleigh + (value - rayleigh).detach())


def diagonal_norm(scale: Tensor) -> Tensor:
    """Certified ‖diag(scale)‖₂ = max|scaleᵢ| (exact; the margin is added for uniformity).

    >>> diagonal_norm(torch.tensor([0.5, -2.0, 1.0])).item() == certify(2.0).item()
    True
    """
    s = scale.to(torch.float64)
    if s.numel() == 0:
        return certify(s.new_zeros(()))
    return certify(s.abs().amax())


def matrix_of(
    linear_fn: Callable[[Tensor], Tensor],
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float64,
    *,
    batch_size: int = 4096,
) -> Tensor:
    """Materialise a linear map as its (out_numel, in_numel) matrix by applying it to a basis.

    ``linear_fn`` receives a batch of identity-basis tensors of shape (b, *input_shape) and must
    return a tensor whose first dimension is b; column j of the result is ``linear_fn(e_j)``
    flattened. Meant for tests and for merging short linear chains; the cost is in_numel
    evaluations (batched).

    >>> matrix_of(lambda x: 2 * x.flip(-1), (3,))
    tensor([[0., 0., 2.],
            [0., 2., 0.],
            [2., 0., 0.]], dtype=torch.float64)
    """
    shape = tuple(int(d) for d in input_shape)
    n = math.prod(shape)
    columns = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        basis = torch.zeros(b, n, dtype=dtype)
        basis[torch.arange(b), torch.arange(start, start + b)] = 1
        out = linear_fn(basis.reshape(b, *shape))
        columns.append(out.reshape(b, -1))
    return torch.cat(columns).T.contiguous()


# --------------------------------------------------------------------------- convolutions


def _per_axis(value: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * nd
    if len(value) != nd:
        raise ValueError(f"{name} must be an int or a tuple of {nd} ints, got {value}")
    return value


def _strided_circulant_norm(
    w: Tensor, grid: Sequence[int], sub: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Exact ‖S∘C‖₂ for the multi-channel circular correlation C on the grid Z_N1×…×Z_Nd followed by
    subsampling S at multiples of ``sub`` (each sub_t divides N_t), maximised over groups.

    ``w`` has shape (groups, C_out/g, C_in/g, k1, …, kd). Math (1-D; axes multiply): with M = N/s
    and K̂(ω) = Σ_a w[a]·e^(−2πi·ω·d·a/N), the aliasing identity (Sy)^(ξ) = (1/s)Σ_j ŷ(ξ + jM) and
    Parseval give ‖S∘C‖ = max_ξ σ₁([K̂(ξ), K̂(ξ + M), …, K̂(ξ + (s−1)M)]) / √s (polyphase form;
    s = 1 is the usual max_ω σ₁(K̂(ω))).

    The DFT is evaluated directly from the k taps per axis (a dense (N × k) exponential matrix)
    rather than by an FFT of the zero-padded kernel: it costs k·N per axis instead of N·log N, taps
    that alias modulo N (dilated kernels wider than the grid) are summed automatically, phases are
    reduced modulo N in exact integer arithmetic, and each entry is a k-term sum whose rounding
    error is ≤ γ_{k+2}·Σ|w|.
    """
    nd = len(grid)
    g, c_out, c_in = w.shape[:3]
    ksize = w.shape[3:]
    wc = w.to(torch.complex128)

    def dft_rows(axis: int, freqs: Tensor) -> Tensor:
        taps = torch.arange(ksize[axis], dtype=torch.int64) * dilation[axis]
        phase = (freqs[:, None] * taps[None, :]) % grid[axis]  # exact integer reduction
        angle = phase.to(torch.float64) * (-2.0 * math.pi / grid[axis])
        return torch.polar(torch.ones_like(angle), angle)  # (len(freqs), k)

    # Axes 2..d are transformed once at all frequencies; their order (j, ξ) comes from ω = j·M + ξ.
    M = [n // s for n, s in zip(grid, sub)]
    rest = []
    for axis in range(1, nd):
        rest.append(dft_rows(axis, torch.arange(grid[axis], dtype=torch.int64)))
    per_xi0 = g * c_out * c_in * sub[0] * math.prod(grid[1:])
    chunk = max(1, _FREQ_CHUNK_ELEMENTS // per_xi0)
    maxima = []
    for start in range(0, M[0], chunk):
        xi0 = torch.arange(start, min(start + chunk, M[0]), dtype=torch.int64)
        freqs0 = (torch.arange(sub[0], dtype=torch.int64)[:, None] * M[0] + xi0[None, :]).reshape(
            -1
        )
        x = torch.tensordot(wc, dft_rows(0, freqs0), dims=([3], [1]))
        for E in rest:  # contracting kernel axis 3 each time appends its frequency axis at the end
            x = torch.tensordot(x, E, dims=([3], [1]))
        # x: (g, C_out, C_in, s1·c, N2, …, Nd) -> split each frequency axis into (s_t, ξ_t)
        split = [sub[0], len(xi0)]
        for axis in range(1, nd):
            split += [sub[axis], M[axis]]
        x = x.reshape(g, c_out, c_in, *split)
        xi_axes = [4 + 2 * t for t in range(nd)]
        alias_axes = [3 + 2 * t for t in range(nd)]
        x = x.permute(*xi_axes, 0, 1, 2, *alias_axes)
        blocks = x.reshape(-1, c_out, c_in * math.prod(sub))
        maxima.append(torch.linalg.svdvals(blocks)[:, 0].max())
    return torch.stack(maxima).max() / math.sqrt(math.prod(sub))


def _padding_source(q: int, n: int, mode: str) -> int | None:
    """The input index whose value sits at padded position q ∈ [−before, n + after) (torch's
    circular, reflect and replicate modes; None for zero padding outside [0, n))."""
    if 0 <= q < n:
        return q
    if mode == "zeros":
        return None
    if mode == "circular":
        return q % n
    if mode == "replicate":
        return min(max(q, 0), n - 1)
    if mode == "reflect":
        if n == 1:
            return 0
        period = 2 * (n - 1)  # reflection without repeating the edge, as in torch
        q %= period
        return q if q < n else period - q
    raise ValueError(f"unknown padding_mode {mode!r}")


def padding_multiplicity(
    spatial: Sequence[int], pads: Sequence[tuple[int, int]], mode: str
) -> int:
    """Most positions of the padded input that hold a copy of one input entry.

    Padding is x ↦ P x with P a 0/1 matrix with at most one 1 per row, so PᵀP is diagonal with
    these counts and ‖P‖₂ = √(multiplicity). Padding is separable (P = P₁ ⊗ … ⊗ P_d), so the
    count is the product of the per-axis counts. Zero padding copies nothing: 1.

    >>> padding_multiplicity((5,), [(2, 2)], "replicate")   # x[0] fills positions -2, -1, 0
    3
    >>> padding_multiplicity((5, 5), [(1, 1), (1, 1)], "reflect")   # x[1] also at -1: 2 per axis
    4
    """
    if mode == "zeros":
        return 1
    total = 1
    for n, (lo, hi) in zip(spatial, pads):
        counts = Counter(_padding_source(q, n, mode) for q in range(-lo, n + hi))
        total *= max(counts.values())
    return total


def _resolve_padding(
    padding: int | Sequence[int] | str,
    nd: int,
    ksize: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
) -> list[tuple[int, int]]:
    """Per-axis (before, after) padding, following torch's conventions for ints, tuples, strings."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions (as in torch)"
                )
            total = [d * (k - 1) for d, k in zip(dilation, ksize)]
            return [(t // 2, t - t // 2) for t in total]
        raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    return [(p, p) for p in _per_axis(padding, nd, "padding")]


def conv_norm(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    padding_mode: str = "zeros",
) -> Tensor:
    """Certified ‖conv‖₂ of a 1-D, 2-D or 3-D convolution (torch's conv{1,2,3}d / conv_transpose).

    Args:
        weight: (C_out, C_in/groups, k1, …) as for ``F.conv2d``; for ``transposed=True`` the
            ``ConvTranspose`` layout (C_in, C_out/groups, k1, …).
        input_shape: (C_in, n1, …) without the batch dimension.
        stride, padding, dilation, groups, output_padding, padding_mode: as in ``torch.nn.Conv2d``;
            padding may be an int, a tuple, 'valid' or 'same'; padding_mode 'zeros', 'circular',
            'reflect' or 'replicate' (the last two: ‖valid conv on the padded size‖·√multiplicity,
            see :func:`padding_multiplicity`).

    Math (zero padding, per axis): put the input at positions [0, n) of a cyclic grid Z_N and let C
    be the circular correlation (Cz)[q] = Σ_a w[a]·z[(q − p_before + d·a) mod N]. Output i of the
    true convolution reads the padded input at r = s·i − p_before + d·a ∈ [−p_before, r_max] with
    r_max = s·(n_out − 1) − p_before + d·(k − 1) ≤ n + p_after − 1. If N ≥ n + p_before,
    N > r_max and N > s·(n_out − 1), every negative read wraps to N + r ≥ n (a zero), every read in
    [n, r_max] stays put (a zero), reads of data are untouched, and outputs sit at distinct
    positions s·i: no wrap-around into the data, so conv = crop ∘ S ∘ C ∘ embed with S the
    subsampling at multiples of s (N is rounded up to a multiple of s). Embedding is an isometry
    and a crop has norm ≤ 1, hence ‖conv‖ ≤ ‖S∘C‖, computed exactly in the Fourier domain
    (polyphase form, see ``_strided_circulant_norm``) and maximised over groups (block-diagonal).
    Any larger valid N also gives a bound; the smallest is used (usually n + p_before: fewer
    frequencies, and a coarser frequency grid, which is usually tighter).
    Circular padding is exactly a circulant on Z_n: conv = R∘C with R selecting output rows, and
    ‖R‖ = √(max multiplicity of a selected row).

    Rounding: each per-frequency entry is a k-tap sum (error ≤ γ_{k+2}Σ|w|); by Parseval the bound
    is at least ‖w‖_F/√min(C_out, C_in·S), so the relative perturbation is ≲ γ·√(K·C) ≈ 1e-13 for
    K = 49 taps and 4096 channels, far below :data:`SAFETY_MARGIN`; the SVDs are covered as in
    :func:`dense_norm`.

    >>> laplacian = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])
    >>> conv_norm(laplacian, (1, 8, 8), padding=1)   # the exact norm is 4 + 4cos(π/9) = 7.7588
    tensor(7.7588, dtype=torch.float64)
    >>> conv_norm(torch.full((1, 1, 2, 2), 0.25), (1, 8, 8), stride=2)   # 2×2 mean: exactly 1/2
    tensor(0.5000, dtype=torch.float64)
    """
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"conv weight must be 3-, 4- or 5-D, got shape {tuple(weight.shape)}")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != nd + 1:
        raise ValueError(
            f"input_shape must be (C_in, *spatial) with {nd} spatial dims, got {shape} "
            "(no batch dimension)"
        )
    stride_t = _per_axis(stride, nd, "stride")
    dil_t = _per_axis(dilation, nd, "dilation")
    ksize = tuple(weight.shape[2:])
    if min(stride_t) < 1 or min(dil_t) < 1 or groups < 1:
        raise ValueError("stride, dilation and groups must be positive")

    if transposed:
        # conv_transpose(·, w) is the adjoint of conv(·, w) on the transposed output size (cropped
        # to the given input size when output_padding ≥ stride), and adjoints have equal norms.
        if padding_mode != "zeros":
            raise ValueError(
                "transposed convolutions support only padding_mode='zeros' (as in torch)"
            )
        if isinstance(padding, str):
            raise ValueError("transposed convolutions take int or tuple padding, not strings")
        if shape[0] != weight.shape[0]:
            raise ValueError(
                f"input has {shape[0]} channels but the transposed weight expects {weight.shape[0]}"
            )
        pad_t = _per_axis(padding, nd, "padding")
        opad_t = _per_axis(output_padding, nd, "output_padding")
        out_spatial = tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, s, p, d, k, op in zip(shape[1:], stride_t, pad_t, dil_t, ksize, opad_t)
        )
        if min(out_spatial) < 1:
            raise ValueError(f"transposed convolution output size {out_spatial} is empty")
        adjoint_input = (weight.shape[1] * groups, *out_spatial)
        return conv_norm(
            weight, adjoint_input, stride=stride_t, padding=pad_t, dilation=dil_t, groups=groups
        )

    c_out, c_in_g = weight.shape[:2]
    if c_out % groups or shape[0] != c_in_g * groups:
        raise ValueError(
            f"weight {tuple(weight.shape)} with groups={groups} does not match {shape[0]} input "
            "channels"
        )
    pads = _resolve_padding(padding, nd, ksize, dil_t, stride_t)
    spatial = shape[1:]
    n_out = [
        (n + lo + hi - d * (k - 1) - 1) // s + 1
        for n, (lo, hi), d, k, s in zip(spatial, pads, dil_t, ksize, stride_t)
    ]
    if min(n_out) < 1:
        raise ValueError(f"convolution output would be empty (input {shape}, kernel {ksize})")

    grid: list[int] = []
    sub: list[int] = []
    row_gain = 1.0  # ‖R‖² for the circular row selection
    if padding_mode == "zeros":
        for n, (lo, _), s, d, k, m in zip(spatial, pads, stride_t, dil_t, ksize, n_out):
            r_max = s * (m - 1) - lo + d * (k - 1)  # largest padded position read (docstring)
            need = max(n + lo, r_max + 1, s * (m - 1) + 1)
            grid.append(-(-need // s) * s)  # round up to a multiple of s for the polyphase form
            sub.append(s)
    elif padding_mode == "circular":
        for n, (lo, hi), s, m in zip(spatial, pads, stride_t, n_out):
            if lo > n or hi > n:
                raise ValueError("circular padding larger than the input is not supported by torch")
            counts = Counter((s * i - lo) % n for i in range(m))
            row_gain *= max(counts.values())
            grid.append(n)
            sub.append(s if n % s == 0 else 1)  # rows s·i − lo lie in one coset of sZ_n iff s | n
    elif padding_mode in ("reflect", "replicate"):
        # conv = conv_valid ∘ P with P the padding map, ‖P‖ = √multiplicity (padding_multiplicity):
        # a sound bound, loose by at most that factor.
        for n, (lo, hi) in zip(spatial, pads):
            if padding_mode == "reflect" and (lo >= n or hi >= n) and n > 1:
                raise ValueError("reflect padding must be smaller than the input (as in torch)")
        mult = padding_multiplicity(spatial, pads, padding_mode)
        padded = (shape[0], *(n + lo + hi for n, (lo, hi) in zip(spatial, pads)))
        inner = conv_norm(
            weight, padded, stride=stride_t, padding=0, dilation=dil_t, groups=groups
        )
        return certify(inner * math.sqrt(mult))
    else:
        raise ValueError(
            f"padding_mode={padding_mode!r} is not supported; use 'zeros', 'circular', "
            "'reflect' or 'replicate'"
        )
    w = weight.to(torch.float64).reshape(groups, c_out // groups, c_in_g, *ksize)
    value = _strided_circulant_norm(w, grid, sub, dil_t) * math.sqrt(row_gain)
    return certify(value)


def conv_transpose_norm(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """Certified ‖conv_transpose‖₂, weight in the ``ConvTranspose`` layout (C_in, C_out/groups, k…):
    the norm of its adjoint convolution, see :func:`conv_norm`."""
    return conv_norm(
        weight,
        input_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        transposed=True,
        output_padding=output_padding,
    )


# --------------------------------------------------------------------------- pooling


def _schur_and_factors(factors: list[Tensor], scale: float, method: str) -> Tensor:
    """Bound ‖scale·(A₁ ⊗ … ⊗ A_d)‖₂ = scale·Πₜ‖Aₜ‖₂ (a per-channel pooling matrix is a Kronecker
    product of 1-D factors). 'schur': Πₜ √(‖Aₜ‖₁‖Aₜ‖∞) (Schur test; ‖·‖₁, ‖·‖∞ are multiplicative
    over ⊗); 'svd': exact factor SVDs; 'auto': the smaller of the two (both are upper bounds)."""
    if method not in ("auto", "schur", "svd"):
        raise ValueError(f"method must be 'auto', 'schur' or 'svd', got {method!r}")
    schur = torch.tensor(scale, dtype=torch.float64)
    exact = torch.tensor(scale, dtype=torch.float64)
    for A in factors:
        max_row = A.abs().sum(dim=1).max()
        max_col = A.abs().sum(dim=0).max()
        schur = schur * torch.sqrt(max_row * max_col)
        if method != "schur":
            exact = exact * torch.linalg.svdvals(A)[0]
    if method == "schur":
        return certify(schur)
    if method == "svd":
        return certify(exact)
    return certify(torch.minimum(schur, exact))


def _pool_output_size(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape (dilation 1)."""
    span = n + 2 * p - k + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def pooling_norm(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    input_shape: Sequence[int],
    *,
    count_include_pad: bool = True,
    ceil_mode: bool = False,
    divisor_override: int | None = None,
    method: str = "auto",
) -> Tensor:
    """Certified ‖avg_pool‖₂ for ``F.avg_pool{1,2,3}d`` on inputs of shape (C, n1, …), no batch dim.

    The map acts identically on every channel, so its norm is that of one channel's matrix A, whose
    entries are 1/divisor on each window; torch's divisor is a product of per-axis window lengths
    (or ``divisor_override``), so A = A₁ ⊗ … ⊗ A_d. Schur test: ‖A‖₂ ≤ √(max row sum · max column
    sum), computed from the window weights. ``method='svd'`` uses exact float64 SVDs of the 1-D
    factors instead, and the default 'auto' returns the smaller of the two.

    >>> pooling_norm(2, 2, 0, (3, 8, 8))   # disjoint 2×2 means: exactly 1/2
    tensor(0.5000, dtype=torch.float64)
    """
    spatial = tuple(int(v) for v in input_shape[1:])
    nd = len(spatial)
    if nd not in (1, 2, 3):
        raise ValueError(
            f"input_shape must be (C, *spatial) with 1 to 3 spatial dims, got {input_shape}"
        )
    ks = _per_axis(kernel_size, nd, "kernel_size")
    st = ks if stride is None or stride == () else _per_axis(stride, nd, "stride")
    pd = _per_axis(padding, nd, "padding")
    factors = []
    for n, k, s, p in zip(spatial, ks, st, pd):
        if p > k // 2:
            raise ValueError(f"padding {p} must be at most half the kernel size {k} (as in torch)")
        m = _pool_output_size(n, k, s, p, ceil_mode)
        if m < 1:
            raise ValueError(f"pooling output would be empty (input {input_shape}, kernel {ks})")
        A = torch.zeros(m, n, dtype=torch.float64)
        for i in range(m):
            start = i * s - p
            end = min(start + k, n + p)
            padded_len = end - start
            start, end = max(start, 0), min(end, n)
            if divisor_override is not None:
                weight = 1.0
            else:
                weight = 1.0 / (padded_len if count_include_pad else end - start)
            A[i, start:end] = weight
        factors.append(A)
    scale = 1.0 if divisor_override is None else 1.0 / abs(divisor_override)
    return _schur_and_factors(factors, scale, method)


def adaptive_avg_pool_norm(
    input_shape: Sequence[int],
    output_size: int | Sequence[int | None] | None,
    *,
    method: str = "auto",
) -> Tensor:
    """Certified ‖adaptive_avg_pool‖₂ for inputs of shape (C, n1, …), by the same Kronecker/Schur
    argument as :func:`pooling_norm`, with torch's windows [⌊i·n/m⌋, ⌈(i+1)·n/m⌉).

    >>> adaptive_avg_pool_norm((16, 8, 8), 1)   # global average pool: 1/8 = 1/√64
    tensor(0.1250, dtype=torch.float64)
    """
    spatial = tuple(int(v) for v in input_shape[1:])
    nd = len(spatial)
    if nd not in (1, 2, 3):
        raise ValueError(
            f"input_shape must be (C, *spatial) with 1 to 3 spatial dims, got {input_shape}"
        )
    if output_size is None or isinstance(output_size, int):
        sizes = (output_size,) * nd
    else:
        sizes = tuple(output_size)
        if len(sizes) != nd:
            raise ValueError(f"output_size must have {nd} entries, got {output_size}")
    factors = []
    for n, m in zip(spatial, sizes):
        m = n if m is None else int(m)
        if m < 1:
            raise ValueError(f"output size must be positive, got {m}")
        A = torch.zeros(m, n, dtype=torch.float64)
        for i in range(m):
            start, end = (i * n) // m, -(-((i + 1) * n) // m)
            A[i, start:end] = 1.0 / (end - start)
        factors.append(A)
    return _schur_and_factors(factors, 1.0, method)
