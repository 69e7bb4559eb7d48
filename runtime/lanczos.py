"""Certified top eigenvalues of many small scaled Gram matrices: batched Lanczos + a Cholesky test.

The anchored norms (:mod:`curvbound.runtime.anchored`) need, per sample b, an upper bound on
λ_max(S_b) with S_b = diag(d_b)·G·diag(d_b), G a fixed symmetric n×n float64 matrix (n ≤ a few
hundred) and d_b ≥ 0. A symmetric eigensolver per sample costs ~(4/3)n³ flops plus LAPACK's
per-call overhead; here instead:

1. **Lanczos, batched across samples** (``steps`` iterations, three-term recurrence): the
   product S_b·v = d_b ⊙ (G·(d_b ⊙ v)) is one matrix product for the whole batch, and the
   largest eigenvalue θ_b of each small tridiagonal matrix estimates λ_max(S_b) from below. No
   property of θ_b is relied on: it only proposes the shift.
2. **A certificate by a Cholesky test.** With τ_b = θ_b·(1 + ``rel``), form M̂ = fl(τ_b·I − Ŝ_b)
   (Ŝ_b the float64 S_b, formed as in the eigensolver path) and factor it in float64. If the
   factorisation succeeds, then (Demmel; Higham, *Accuracy and Stability*, Thm 10.3) the computed
   factor satisfies R̂ᵀR̂ = M̂ + ΔM with |ΔM| ≤ γ_{n+1}·|R̂ᵀ||R̂| entrywise, for any order of the
   inner products (blocked LAPACK included; FMAs only shrink the error). By Cauchy–Schwarz
   ‖|R̂ᵀ||R̂|‖₂ ≤ ‖R̂‖_F² = tr(M̂ + ΔM), so ‖ΔM‖₂ ≤ γ/(1 − γ)·tr(M̂), and R̂ᵀR̂ ⪰ 0 gives
   M̂ ⪰ −γ/(1 − γ)·tr(M̂)·I. Forming M̂ rounds only its diagonal (τ − ŝ_ii, one subtraction):
   τI − Ŝ = M̂ + E, ‖E‖₂ ≤ u·max_i|m̂_ii|. Hence

       λ_max(Ŝ_b) ≤ τ_b + γ'·tr(M̂) + u·max_i|m̂_ii|,

   a rounding margin of about n²·u·τ relative (≈ 10⁻¹² at n = 100). γ' is taken as γ_{4n+4}
   (four times the proven constant) and the sums are rounded up. Subnormal arithmetic makes
   the error bounds absolute; the matrices are scaled by a power of two (exact) so that their
   largest diagonal entry lies in [1, 2), and an absolute 2⁻⁹⁰⁰ (far above the underflow terms)
   is added.
3. **Fallback**: where the factorisation fails (θ_b had not converged to the top of the spectrum,
   e.g. for a tight cluster of top eigenvalues) or θ_b is not finite, ``eigvalsh`` of Ŝ_b plus its
   backward error (:func:`~curvbound.runtime.certified.certify`).

Every result is therefore an upper bound on λ_max(Ŝ_b), and where the test succeeds it is within
``rel`` (+ the rounding margin) of θ_b ≤ λ_max, i.e. within about ``rel`` of the exact value.

>>> import torch
>>> g = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
>>> d = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
>>> lam, used = lambda_max_upper(d, g)
>>> [round(v, 6) for v in lam.tolist()], used.tolist()  # exact: 3 and 2, plus ~1e-9 relative
([3.0, 2.0], [False, False])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .certified import certify

__all__ = ["lambda_max_upper", "cholesky_upper", "lanczos_top"]

_U = 2.0**-53
_TINY = 2.0**-900  # absolute allowance for underflow (entries are scaled to O(1))


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def lanczos_top(d: Tensor, g: Tensor, steps: int) -> Tensor:
    """Largest Ritz value of ``steps`` Lanczos iterations on diag(d_b)·G·diag(d_b), per row b of d
    (no reorthogonalisation: lost orthogonality only duplicates converged Ritz values; an
    estimate, not a bound). (B,) float64."""
    b, n = d.shape
    k = max(1, min(steps, n))
    # a fixed start vector with every component nonzero (deterministic, no generator state)
    idx = torch.arange(n, dtype=torch.float64)
    top = d.amax(dim=1, keepdim=True)
    top = torch.where(top > 0, top, 1.0)  # d may vanish in places, or everywhere
    v = (1.0 + 0.5 * torch.sin(1.0 + 3.7 * idx)) * (d + 1e-3 * top)
    v = v / v.norm(dim=1, keepdim=True)
    alpha = torch.zeros(k, b, dtype=torch.float64)
    beta = torch.zeros(k, b, dtype=torch.float64)
    prev = v
    for j in range(k):
        w = torch.mm(d * v, g).mul_(d)  # S_b v for every b (G symmetric): one matrix product
        a = (w * v).sum(dim=1)
        alpha[j] = a
        if j + 1 == k:
            break
        # w − α_j v_j − β_{j−1} v_{j−1}; a breakdown (β = 0) leaves v = 0 and zeros in T
        w.sub_(a[:, None] * v)
        if j:
            w.sub_(beta[j - 1][:, None] * prev)
        nb = w.norm(dim=1)
        beta[j] = nb
        prev, v = v, w.div_(nb.clamp_min(1e-300)[:, None])
    off = beta[: k - 1].T
    t = torch.diag_embed(alpha.T) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    # a non-finite T (overflow; d is scaled so that it cannot happen) proposes 0: the test fails
    t = torch.where(torch.isfinite(t).all(dim=2).all(dim=1)[:, None, None], t, 0.0)
    return torch.linalg.eigvalsh(t)[:, -1]


def cholesky_upper(s: Tensor, tau: Tensor, *, negated: bool = False) -> tuple[Tensor, Tensor]:
    """For symmetric float64 ``s`` (B, n, n) and shifts ``tau`` (B,): (bound, ok), where ``ok[b]``
    says that the float64 Cholesky factorisation of τ_b·I − s_b succeeded, and then
    ``bound[b]`` ≥ λ_max(s_b) rigorously (module docstring, step 2). ``s`` is overwritten
    (``negated``: it already holds −s_b, exactly)."""
    n = s.shape[-1]
    m = s if negated else s.neg_()
    diag = m.diagonal(dim1=1, dim2=2)
    diag.add_(tau[:, None])
    dmax = diag.abs().amax(dim=1)
    trace = diag.sum(dim=1) * (1 + _gamma(n + 1))
    _, info = torch.linalg.cholesky_ex(m)
    ok = (info == 0) & (trace > 0) & torch.isfinite(tau)
    margin = _gamma(4 * n + 4) / (1 - _gamma(4 * n + 4)) * trace.clamp_min(0) + _U * dmax
    bound = (tau + margin) * (1 + 4 * _U)
    return bound, ok


def lambda_max_upper(d: Tensor, g: Tensor, *, steps: int = 16, rel: float = 1e-9,
                     chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Upper bounds on λ_max(Ŝ_b), Ŝ_b = fl(diag(d_b)·G·diag(d_b)) formed entrywise in float64
    (as ``d[:, :, None] * g * d[:, None, :]``), for every row b of ``d`` (module docstring).

    Returns (bounds (B,), fallback (B,) bool: where ``eigvalsh`` was used). ``g`` must be
    symmetric; ``d`` ≥ 0 finite. The caller accounts for the rounding of Ŝ against the exact
    diag(d)·G·diag(d) (two roundings per entry) and for that of G itself.
    """
    d = d.to(torch.float64)
    g = g.to(torch.float64)
    b, n = d.shape
    out = torch.empty(b, dtype=torch.float64)
    fallback = torch.zeros(b, dtype=torch.bool)
    if b == 0:
        return out, fallback
    # power-of-two scaling so that max_i s_ii ∈ [1, 2) per sample (exact: no rounding)
    diag = d * d * g.diagonal()[None]
    peak = diag.amax(dim=1)
    expo = torch.where(peak > 0, torch.frexp(peak.clamp_min(1e-300))[1] - 1, 0)
    half = torch.div(expo, 2, rounding_mode="floor")  # d scaled by 2^-half → s by 2^-2·half
    ds = torch.ldexp(d, -half[:, None].to(d.dtype))
    theta = lanczos_top(ds, g, steps)
    tau = theta.clamp_min(0) * (1 + rel) + _TINY
    gneg = -g  # fl(fl(d_i·(−g_ij))·d_j) = −fl(fl(d_i·g_ij)·d_j): rounding is sign-symmetric
    buf = torch.empty(min(chunk, b), n, n, dtype=torch.float64)
    for start in range(0, b, chunk):
        sl = slice(start, min(b, start + chunk))
        dd = ds[sl]
        m = torch.mul(dd[:, :, None], gneg, out=buf[: len(dd)]).mul_(dd[:, None, :])
        bound, ok = cholesky_upper(m, tau[sl], negated=True)
        out[sl] = bound + _TINY
        fallback[sl] = ~ok
    bad = fallback.nonzero()[:, 0]
    if len(bad):
        dd = ds[bad]
        s = dd[:, :, None] * g * dd[:, None, :]
        lam = torch.linalg.eigvalsh(s)[:, -1].clamp_min(0)
        out[bad] = certify(lam) + _TINY
    return torch.ldexp(out, (2 * half).to(out.dtype)), fallback
