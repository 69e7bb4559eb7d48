'''Smooth layers with their rules: certifiable models in a few lines (``curvbound.nn``).

- :class:`SLLLinear`, :class:`SLLConv2d`: the SLL residual layers of Araujo et al. (ICLR 2023),
  h(z) = z − 2Wᵀ T⁻¹ σ(Wz + b), 1-Lipschitz by construction, with a smooth activation (tanh,
  softplus, centered softplus). Their rule certifies L ≤ 1 (rounding included) and bounds the
  curvature (theory §3).
- :class:`CenteredSoftplus`, :class:`NormalizedLinear` (a head whose rows have norm 1),
  :class:`PadChannels` (zero channels, an isometry), :func:`pool_flatten` (1-Lipschitz sum pooling
  and flatten) and :func:`sll_3c1f`, the paper's SLL "3C1F" CIFAR-10 network.
- :func:`smooth`: a copy of a ReLU / max-pool model with every non-smooth part replaced by a smooth
  counterpart, so that it has a finite curvature bound (fine-tune it after the conversion).

The 3C1F network is these few lines (``sll_3c1f()`` builds it)::

    >>> import torch, curvbound
    >>> from curvbound.nn import (NormalizedLinear, PadChannels, SLLConv2d, SLLLinear,
    ...                           pool_flatten)
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(
    ...     PadChannels(15),                                    # 3 → 15 channels
    ...     *[SLLConv2d(15, activation="tanh") for _ in range(3)],
    ...     pool_flatten(4),                                    # 15×32×32 → 960
    ...     SLLLinear(960, activation="tanh"),
    ...     NormalizedLinear(960, 10),
    ... ).eval()
    >>> bf = curvbound.compile(net, torch.zeros(1, 3, 32, 32), norms="certified")
    >>> {k: v for k, v in bf.quantity_values().items() if k.startswith("lip")}
    {'lip__1': 1.0, 'lip__2': 1.0, 'lip__3': 1.0, 'lip__5': 1.0}
    >>> bf()
    Bounds(lipschitz=1..., curvature=..., certified)

Every SLL layer is certified 1-Lipschitz; the network's L is that of the normalised head.
'''

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch import nn as tnn

from ..compiler.context import RuleContext, Transfer
from ..compiler.errors import InputError
from ..compiler.registry import DEFAULT_REGISTRY, rule
from ..compiler.trace import trace
from ..passes.rules.base import elementwise_transfer, number
from ..runtime import smoothness as S
from ..runtime.certified import certify, dense_norm
from ..runtime.norms import Quantity
from ..runtime.operators import Conv, Dense, FunctionOperator, precise
from ..runtime.products import HADAMARD_HIDDEN_LIMIT, HadamardNorm
from ..runtime.smoothness import smooth_softplus

__all__ = [
    "CenteredSoftplus",
    "SLLLinear",
    "SLLConv2d",
    "NormalizedLinear",
    "PadChannels",
    "LeakySoftplus",
    "SmoothClamp",
    "pool_flatten",
    "sll_3c1f",
    "smooth",
    "Replacement",
    "SLLLipschitz",
    "SLLConvHadamard",
]

_U = 2.0**-53  # float64 unit roundoff
#: The vectorised-Jacobian norm ‖Â‖ of an SLLLinear is computed up to this many multiply-adds of
#: its m×m Gram matrices, m²·(n + m) (beyond it only the row-scaled bound is used).
HADAMARD_SLL_COST_LIMIT = 4e9


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


# -- activations ---------------------------------------------------------------------------------
class CenteredSoftplus(tnn.Module):
    """softplus_β(x) − log(2)/β: a softplus through the origin (σ(0) = 0), as in the paper.

    Unlike ``nn.Softplus`` it has no threshold: it computes the smooth softplus on the whole line
    (:func:`~curvbound.runtime.smoothness.smooth_softplus`), so its bounds carry no switching
    error (``Bounds.error`` stays 0).

    Example:
        >>> import torch
        >>> CenteredSoftplus(beta=2.0)(torch.zeros(3))
        tensor([0., 0., 0.])
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return smooth_softplus(x, self.beta) - math.log(2.0) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class LeakySoftplus(tnn.Module):
    """a·x + (1 − a)·softplus_β(x): the smooth counterpart of LeakyReLU(a) (what :func:`smooth`
    puts in its place). σ' = a + (1 − a)·s(βx) lies between a and 1, |σ''| ≤ |1 − a|·β/4.

    Example:
        >>> LeakySoftplus(0.1, beta=20.0)(torch.tensor([-1.0, 2.0]))
        tensor([-0.1000,  2.0000])
    """

    def __init__(self, negative_slope: float = 0.01, beta: float = 1.0):
        super().__init__()
        self.negative_slope, self.beta = float(negative_slope), float(beta)

    def forward(self, x: Tensor) -> Tensor:
        a = self.negative_slope
        return a * x + (1.0 - a) * smooth_softplus(x, self.beta)  # no threshold: smooth

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, beta={self.beta}"


class SmoothClamp(tnn.Module):
    """lo + softplus_β(x − lo) − softplus_β(x − hi): the smooth counterpart of Hardtanh(lo, hi)
    and ReLU6 (what :func:`smooth` puts in their place). σ' = s(β(x − lo)) − s(β(x − hi)) ∈ (0, 1),
    |σ''| ≤ β/4 (a difference of two functions with values in [0, β/4]).

    Example:
        >>> SmoothClamp(0.0, 6.0, beta=20.0)(torch.tensor([-3.0, 3.0, 9.0])).round(decimals=4)
        tensor([0., 3., 6.])
    """

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, beta: float = 1.0):
        super().__init__()
        if not min_val < max_val:
            raise InputError(f"SmoothClamp: need min_val < max_val, got {min_val}, {max_val}")
        self.min_val, self.max_val, self.beta = float(min_val), float(max_val), float(beta)

    def forward(self, x: Tensor) -> Tensor:
        lo, hi, b = self.min_val, self.max_val, self.beta
        return lo + smooth_softplus(x - lo, b) - smooth_softplus(x - hi, b)  # no threshold

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}, beta={self.beta}"


def _activation(activation: str | tnn.Module, beta: float) -> tnn.Module:
    if isinstance(activation, tnn.Module):
        if not isinstance(activation, (tnn.Tanh, tnn.Softplus, CenteredSoftplus)):
            raise InputError(
                f"SLL layers need an activation with slopes in [0, 1] and a known curvature: "
                f"tanh, softplus or centered_softplus, got {type(activation).__name__}"
            )
        return activation
    make = {
        "tanh": lambda: tnn.Tanh(),
        "softplus": lambda: tnn.Softplus(beta=beta),
        "centered_softplus": lambda: CenteredSoftplus(beta=beta),
    }
    if activation not in make:
        raise InputError(
            f"activation must be one of {sorted(make)} (or such a module), got {activation!r}"
        )
    return make[activation]()


def _activate(act: tnn.Module, u: Tensor) -> Tensor:
    """σ(u) for an SLL layer: ``nn.Softplus`` as the smooth softplus (without torch's threshold,
    whose jump the layer's rule does not cover), any other activation as itself."""
    if isinstance(act, tnn.Softplus):
        return smooth_softplus(u, float(act.beta))
    return act(u)


def _smoothness(act: tnn.Module) -> S.Smoothness:
    """The proven constants of an SLL layer's activation (theory §8)."""
    if isinstance(act, tnn.Tanh):
        return S.tanh()
    if isinstance(act, tnn.Softplus):
        return S.softplus(float(act.beta))
    return S.centered_softplus(float(act.beta))


def _safe_scale(t: Tensor) -> Tensor:
    """2/t where t > 0, 0 where t = 0 (a zero row of W contributes nothing)."""
    tiny = torch.finfo(t.dtype).tiny
    return torch.where(t > 0, 2.0 / t.clamp_min(tiny), torch.zeros_like(t))


def _q(log_q: Tensor) -> Tensor:
    """q = exp(log_q) scaled so that max q = 1 (only the ratios q_j/q_i matter)."""
    return torch.exp(log_q - log_q.max().detach())


# -- SLL layers ----------------------------------------------------------------------------------
class _SLL(tnn.Module):
    """Common part of the SLL layers: h(z) = z − Wᵀ diag(s) σ(Wz + b) with s = 2/t.

    t_i = (1 + δ)·Σ_j |(WWᵀ)_ij|·q_j/q_i (for convolutions, WWᵀ is replaced by the kernel
    auto-correlation summed over offsets). The factor 1 + δ, δ = min(4·terms·ε, 10⁻³) with ε of
    the layer's dtype (≈ 1e-5 for a float32 layer of 12 features), makes T larger than the rounding
    of its own computation, so that the certificate L ≤ 1 survives float rounding; any T ≽ WWᵀ
    keeps the layer 1-Lipschitz. (In half precision the cap can leave c slightly above 1: the
    certificate then reports √(1 + 4c(c − 1)), see :class:`SLLLipschitz`.)
    """

    log_q: Tensor
    bias: Tensor | None

    def _terms(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def gram_abs(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self) -> Tensor:
        """s = 2/t, the diagonal the forward pass uses, computed in the layer's dtype."""
        g = self.gram_abs()
        q = _q(self.log_q)
        t = (g @ q) / q
        eps = torch.finfo(t.dtype).eps
        return _safe_scale(t * (1.0 + min(4.0 * self._terms() * eps, 1e-3)))

    def smoothness(self) -> S.Smoothness:
        return _smoothness(self.activation)


class SLLLinear(_SLL):
    """SLL residual layer h(z) = z − 2Wᵀ T⁻¹ σ(Wz + b) on vectors of size ``features``.

    W is (``inner_features`` × ``features``) (default square), T = diag(t),
    t_i = Σ_j |(WWᵀ)_ij| q_j/q_i with q = exp(log_q) learnable. ``activation``: "tanh",
    "softplus" or "centered_softplus" (``beta`` for the softplus ones), all with slopes in [0, 1],
    which makes h 1-Lipschitz (see :func:`sll_rule` for the proof and the curvature bound).
    Compile it inside a container (``nn.Sequential(layer)``): a root module is traced into, not
    matched against its rule.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = SLLLinear(4)
        >>> x, y = torch.randn(2, 4)
        >>> bool((layer(x[None]) - layer(y[None])).norm() <= (x - y).norm())
        True
    """

    def __init__(
        self,
        features: int,
        inner_features: int | None = None,
        *,
        activation: str | tnn.Module = "tanh",
        beta: float = 1.0,
        bias: bool = True,
    ):
        super().__init__()
        m = inner_features or features
        self.features, self.inner_features = features, m
        self.weight = tnn.Parameter(torch.empty(m, features))
        tnn.init.xavier_normal_(self.weight)
        self.bias = tnn.Parameter(torch.zeros(m)) if bias else None
        if bias:
            tnn.init.uniform_(self.bias, -1 / math.sqrt(features), 1 / math.sqrt(features))
        self.log_q = tnn.Parameter(torch.zeros(m))
        self.activation = _activation(activation, beta)

    def _terms(self) -> int:
        return self.features + self.inner_features

    def gram_abs(self) -> Tensor:
        """|WWᵀ| (m × m)."""
        return (self.weight @ self.weight.T).abs()

    def forward(self, x: Tensor) -> Tensor:
        y = _activate(self.activation, F.linear(x, self.weight, self.bias))
        return x - F.linear(y * self.scale(), self.weight.T)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}"


class SLLConv2d(_SLL):
    """Convolutional SLL layer h(z) = z − 2Kᵀ T⁻¹ σ(K z + b) on (``channels``, H, W) images.

    K is a ``kernel_size`` × ``kernel_size`` convolution from ``channels`` to ``inner_channels``
    (default ``channels``), stride 1, zero padding kernel_size // 2 (odd sizes), Kᵀ its adjoint
    (the transposed convolution). T is constant over positions:
    t_i = Σ_j Σ_δ |(K ⋆ K)_ij(δ)|·q_j/q_i with (K ⋆ K)_ij(δ) = Σ_c Σ_u K_ic(u)K_jc(u − δ) the
    kernels' cross-correlation at offset δ (:meth:`gram_abs`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = SLLConv2d(3)
        >>> x, y = torch.randn(2, 1, 3, 5, 5)
        >>> bool((layer(x) - layer(y)).norm() <= (x - y).norm())
        True
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        inner_channels: int | None = None,
        *,
        activation: str | tnn.Module = "tanh",
        beta: float = 1.0,
        bias: bool = True,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise InputError(f"SLLConv2d: kernel_size must be odd, got {kernel_size}")
        m = inner_channels or channels
        self.channels, self.inner_channels, self.kernel_size = channels, m, kernel_size
        self.padding = kernel_size // 2
        self.weight = tnn.Parameter(torch.empty(m, channels, kernel_size, kernel_size))
        tnn.init.xavier_normal_(self.weight)
        self.bias = tnn.Parameter(torch.zeros(m)) if bias else None
        if bias:
            fan_in = channels * kernel_size**2
            tnn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.log_q = tnn.Parameter(torch.zeros(m))
        self.activation = _activation(activation, beta)

    def _terms(self) -> int:
        return self.channels * self.kernel_size**2 + self.inner_channels * (
            2 * self.kernel_size - 1
        ) ** 2

    def correlation(self, kernel: Tensor | None = None) -> Tensor:
        """(K ⋆ K)_ij(δ), shape (m, m, 2k − 1, 2k − 1)."""
        k = self.weight if kernel is None else kernel
        return F.conv2d(k, k, padding=self.kernel_size - 1)

    def gram_abs(self) -> Tensor:
        """Σ_δ |(K ⋆ K)_ij(δ)| (m × m)."""
        return self.correlation().abs().sum(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        y = _activate(self.activation, F.conv2d(x, self.weight, self.bias, padding=self.padding))
        y = y * self.scale().reshape(1, -1, 1, 1)
        return x - F.conv_transpose2d(y, self.weight, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner_channels={self.inner_channels}, "
                f"kernel_size={self.kernel_size}")


class SLLLipschitz(Quantity):
    """Certified Lipschitz constant of an SLL layer from the diagonal s = 2/t it really uses.

    Certified mode computes, in float64 with explicit rounding bounds, the smallest c with
    c·t̃_i ≥ Σ_j |(WWᵀ)_ij| q_j/q_i for every i with s̃_i > 0 (t̃ = 2/s̃, s̃ the layer's own float
    values). Then c·T̃ ≽ WWᵀ (on the rows in use) and the layer's Lipschitz constant is at most 1
    when c ≤ 1 and √(1 + 4c(c − 1)) otherwise (proof in :func:`sll_rule`). Estimate mode returns 1
    (the exact-arithmetic value). Cached until a parameter changes.
    """

    def __init__(self, layer: _SLL, mode: str, label: str = ""):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: no duplicated parameters
        self.mode, self.certified, self.label = mode, mode == "certified", label
        self._cache: tuple[list[Tensor], Tensor] | None = None

    def ratio(self) -> Tensor:
        """The certified dominance ratio c (float64)."""
        layer = self._layer
        with torch.no_grad():
            s = layer.scale().detach().double()  # the float values the forward pass uses
            q = _q(layer.log_q.detach().double())
            w = layer.weight.detach().double()
            if isinstance(layer, SLLConv2d):
                corr = layer.correlation(w)
                acorr = layer.correlation(w.abs())
                n = layer.channels * layer.kernel_size**2
                up = (corr.abs() + _gamma(n + 2) * acorr).sum(dim=(2, 3))
                terms = layer.inner_channels * (2 * layer.kernel_size - 1) ** 2
            else:
                n = w.shape[1]
                up = (w @ w.T).abs() + _gamma(n + 2) * (w.abs() @ w.abs().T)
                terms = w.shape[0]
            r = (up @ q) / q  # every entry ≥ 0: relative rounding ≤ γ_(terms + 4)
            used = s > 0
            if not bool(used.any()):
                return torch.zeros((), dtype=torch.float64)
            c = (r[used] * s[used] / 2).max()
            return c * (1 + 2 * _gamma(terms + 8))

    def forward(self) -> Tensor:
        if not self.certified:
            return torch.ones((), dtype=torch.float64)
        layer = self._layer
        current = [p.detach().clone() for p in (layer.weight, layer.log_q)]
        if self._cache is not None and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(self._cache[0], current)
        ):
            return self._cache[1]
        c = float(self.ratio())
        if not math.isfinite(c):
            value = torch.tensor(math.inf, dtype=torch.float64)
        elif c <= 1.0:
            value = torch.ones((), dtype=torch.float64)
        else:
            value = certify(math.sqrt(1.0 + 4.0 * c * (c - 1.0)) * (1 + 4 * _U))
        self._cache = (current, value)
        return value

    def extra_repr(self) -> str:
        return f"{self.label}, mode={self.mode}"


class SLLConvHadamard(Quantity):
    """√λ_max(P) with P_ij = s_i s_j Σ_δ (K ⋆ K)_ij(δ)²: a bound on ‖Â‖ of an SLLConv2d (see
    :func:`sll_rule`, curvature (iii)). Estimate mode: a differentiable eigenvalue of P in the
    layer's dtype; certified mode: float64 with explicit bounds on every rounding of P, then
    λ_max(P) ≤ ‖P̂‖₂ + ‖P − P̂‖_F.
    """

    def __init__(self, layer: SLLConv2d, mode: str, label: str = ""):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self.mode, self.certified, self.label = mode, mode == "certified", label

    def forward(self) -> Tensor:
        layer = self._layer
        if not self.certified:
            s = layer.scale()
            p = s[:, None] * s[None, :] * (layer.correlation() ** 2).sum(dim=(2, 3))
            return torch.linalg.eigvalsh(p)[-1].clamp_min(0).sqrt()
        with torch.no_grad():
            s = layer.scale().detach().double()
            w = layer.weight.detach().double()
            c = layer.correlation(w)
            n = layer.channels * layer.kernel_size**2
            e = _gamma(n + 2) * layer.correlation(w.abs())  # |ĉ − c| ≤ e
            sq = (c * c).sum(dim=(2, 3))
            terms = (2 * layer.kernel_size - 1) ** 2
            err_sq = (e * (2 * c.abs() + e)).sum(dim=(2, 3)) + _gamma(terms + 2) * sq
            ss = s[:, None] * s[None, :]
            p = ss * sq
            err = (ss * err_sq) * (1 + 4 * _U) + 4 * _U * p.abs()
            lam = dense_norm(p) + torch.linalg.matrix_norm(err)
            return certify(torch.sqrt(lam) * (1 + 4 * _U))

    def extra_repr(self) -> str:
        return f"{self.label}, mode={self.mode}"


def _curvature_weight(layer: SLLLinear) -> Callable[[], Tensor]:
    """diag(√(r ∘ s̃))·W with r_j = ‖w_j‖. Inside exact arithmetic the factors are rounded up by
    1 + 2(n + 16)u, more than the float64 rounding of the norm of n entries, a product and two
    square roots (‖diag(f)W‖ grows with every |f_j|, so a larger factor keeps the bound)."""

    def weight() -> Tensor:
        w = precise(layer.weight)
        s = precise(layer.scale()).to(w.dtype)
        f = torch.sqrt(w.norm(dim=1) * s)
        if _exact():
            f = f * (1 + 2 * (w.shape[1] + 16) * _U)
        return f.reshape(-1, 1) * w

    return weight


def _curvature_kernel(layer: SLLConv2d) -> Callable[[], Tensor]:
    """K with output channel i scaled by √(‖K_i‖·s̃_i) (‖K_i‖ ≥ the norm of every row of channel
    i of the convolution matrix), rounded up as in :func:`_curvature_weight`."""

    def kernel() -> Tensor:
        k = precise(layer.weight)
        s = precise(layer.scale()).to(k.dtype)
        f = torch.sqrt(k.flatten(1).norm(dim=1) * s)
        if _exact():
            f = f * (1 + 2 * (k[0].numel() + 16) * _U)
        return f.reshape(-1, 1, 1, 1) * k

    return kernel


def _exact() -> bool:
    return precise(torch.zeros((), dtype=torch.float32)).dtype == torch.float64


@rule(SLLLinear, SLLConv2d)
def sll_rule(node: fx.Node, ctx: RuleContext) -> Transfer:
    """SLL layer: L_h ≤ 1 (certified check), M_h ≤ L_σ'·min(‖W‖·‖Â‖, ‖diag(√(r∘s))W‖²).

    Notation: h(z) = z − Wᵀ diag(s) σ(Wz + b), s = 2/t̃ the layer's float values (0 where t̃ = 0;
    those rows drop out and are ignored below), T̃ = diag(t̃), D = diag(σ'(Wz + b)) ∈ [0, 1]
    (tanh and softplus slopes), r_j = ‖w_j‖, L_σ' = sup|σ''|.

    Lipschitz. Dh = I − 2WᵀSW with S = D T̃⁻¹ ≽ 0 diagonal. If c·T̃ ≽ WWᵀ then
    S^½ WWᵀ S^½ ≼ c·S^½ T̃ S^½ = cD ≼ cI, so (Dh)ᵀDh = I − 4WᵀSW + 4WᵀS^½(S^½WWᵀS^½)S^½W
    ≼ I + 4(c − 1)WᵀSW, and ‖WᵀSW‖ ≤ ‖T̃^−½WWᵀT̃^−½‖ ≤ c: ‖Dh‖ ≤ 1 for c ≤ 1, else
    ≤ √(1 + 4c(c − 1)). c·T̃ ≽ WWᵀ follows from c·t̃_i ≥ Σ_j |(WWᵀ)_ij|q_j/q_i: with Q = diag(q),
    Q(cT̃ − WWᵀ)Q is symmetric and diagonally dominant with a nonnegative diagonal, hence PSD.
    :class:`SLLLipschitz` computes c in float64 with explicit bounds on every rounding (|(WWᵀ)^ −
    WWᵀ| ≤ γ_n|W||W|ᵀ, then sums of nonnegative terms). For a convolution with zero padding,
    W = R·C·E with C the circular convolution on a torus large enough that no offsets wrap, E the
    zero-extension and R the restriction (‖E‖ = ‖R‖ = 1, EEᵀ ≼ I), so WWᵀ ≼ R CCᵀ Rᵀ, and the
    weighted row sums of |CCᵀ| are Σ_j Σ_δ |(K ⋆ K)_ij(δ)|q_j/q_i: the same check proves
    c·T̃ ≽ WWᵀ.

    Curvature. Dh(z) − Dh(z') = −Wᵀ diag(s ∘ Δ) W with |Δ_j| ≤ L_σ'|w_jᵀ(z − z')|.
    (i) vectorised Jacobian (theory §3 (c), G = −Wᵀdiag(s)): ‖·‖ ≤ ‖Â‖‖Δ‖ ≤ L_σ'‖Â‖‖W‖‖z − z'‖,
    ‖Â‖² = λ_max((GᵀG) ∘ (WWᵀ)) (dense layers, :class:`~curvbound.runtime.products.HadamardNorm`);
    (ii) −Wᵀ diag(s∘Δ⁻)W ≼ Wᵀ diag(s∘Δ)W ≼ Wᵀ diag(s∘Δ⁺)W gives
    ‖Wᵀdiag(s∘Δ)W‖ ≤ ‖diag(√(s∘|Δ|))W‖² ≤ L_σ'‖z − z'‖·‖diag(√(s∘r))W‖² (dense and conv; for a
    convolution r_j ≤ ‖K_i‖ of its output channel i). Method "naive" uses (ii) alone.
    """
    m = ctx.module
    u = ctx.input()
    rec = m.smoothness()
    lo, hi = rec.slope_range
    if not (lo >= 0 and hi <= 1):
        raise InputError(f"node '{node.name}': the SLL activation needs slopes in [0, 1]")
    lip_sym = ctx.symbol("lip")
    quantities: dict[sympy.Symbol, Quantity] = {
        lip_sym: SLLLipschitz(m, ctx.norms, label=f"L[{node.target}]")
    }
    if isinstance(m, SLLConv2d):
        shape = ctx.shape(u)
        inner = (m.inner_channels, *shape[1:])
        op = Conv(_curvature_kernel(m), shape, inner, stride=1, padding=m.padding, dilation=1,
                  groups=1, label=f"diag(√(r·s)){node.target}")
        snorm, q = ctx.norm(op, "snorm")
        quantities[snorm] = q
        own: sympy.Expr = snorm**2
        if ctx.method != "naive":
            wop = Conv(lambda: m.weight, shape, inner, stride=1, padding=m.padding, dilation=1,
                       groups=1, label=str(node.target))
            norm_sym, nq = ctx.norm(wop, "norm")
            had = ctx.symbol("hadamard")
            quantities[norm_sym] = nq
            quantities[had] = SLLConvHadamard(m, ctx.norms, label=f"Â[{node.target}]")
            own = sympy.Min(norm_sym * had, own, evaluate=False)
    else:
        n, k = m.features, m.inner_features
        op = Dense(_curvature_weight(m), (n,), (k,), f"diag(√(r·s)){node.target}")
        snorm, q = ctx.norm(op, "snorm")
        quantities[snorm] = q
        own = snorm**2
        cost = k * k * (n + k)
        if ctx.method != "naive" and k <= HADAMARD_HIDDEN_LIMIT and cost <= HADAMARD_SLL_COST_LIMIT:
            wop = Dense(lambda: m.weight, (n,), (k,), str(node.target))
            gop = Dense(lambda: precise(m.weight).T * precise(m.scale()), (k,), (n,),
                        f"Wᵀdiag(s){node.target}")
            norm_sym, nq = ctx.norm(wop, "norm")
            had = ctx.symbol("hadamard")
            quantities[norm_sym] = nq
            quantities[had] = HadamardNorm(gop, wop, ctx.norms, label=f"Â[{node.target}]")
            own = sympy.Min(norm_sym * had, own, evaluate=False)
    lip = lip_sym
    Mh = number(rec.curvature) * own
    return Transfer(
        lip * ctx.L(u),
        Mh * ctx.L(u) ** 2 + lip * ctx.M(u),
        quantities,
        note=f"SLL({rec.name}): L ≤ {lip_sym}, M_h = sup|σ''|·{own}",
    )


@rule(CenteredSoftplus)
def centered_softplus(node: fx.Node, ctx: RuleContext) -> Transfer:
    """centered softplus_β − log2/β: sup|σ'| = 1, sup|σ''| = β/4."""
    rec = S.centered_softplus(float(ctx.module.beta))
    return elementwise_transfer(ctx, rec.slope, rec.curvature, rec.name, rec.slope_range,
                                record=rec)


@rule(LeakySoftplus)
def leaky_softplus(node: fx.Node, ctx: RuleContext) -> Transfer:
    """a·x + (1 − a)·softplus_β: sup|σ'| = max(1, |a|), sup|σ''| = |1 − a|·β/4."""
    m = ctx.module
    a, b = number(m.negative_slope), number(m.beta)
    return elementwise_transfer(
        ctx, sympy.Max(1, abs(a)), abs(1 - a) * b / 4, f"leaky_softplus({m.negative_slope})",
        (sympy.Min(a, 1), sympy.Max(a, 1)),
    )


@rule(SmoothClamp)
def smooth_clamp(node: fx.Node, ctx: RuleContext) -> Transfer:
    """softplus_β(x − lo) − softplus_β(x − hi) + lo: sup|σ'| ≤ 1, sup|σ''| ≤ β/4."""
    b = number(ctx.module.beta)
    return elementwise_transfer(ctx, 1, b / 4, "smooth_clamp", (0, 1))


# -- heads ---------------------------------------------------------------------------------------
class NormalizedLinear(tnn.Module):
    """Linear head with normalised weights: ``normalize="rows"`` makes every row a unit vector
    (each logit 1-Lipschitz, each margin f_i − f_j at most ‖w_i − w_j‖ ≤ 2), ``"frobenius"``
    divides W by ‖W‖_F (the whole head 1-Lipschitz). The rule reads the normalised weight the
    forward pass uses, so pairwise margins (``bf.margins()``) get ‖w_i − w_j‖ exactly.

    Example:
        >>> head = NormalizedLinear(3, 2)
        >>> head.normalized_weight().norm(dim=1)
        tensor([1.0000, 1.0000], grad_fn=<LinalgVectorNormBackward0>)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 normalize: str = "rows"):
        super().__init__()
        if normalize not in ("rows", "frobenius"):
            raise InputError(f"normalize must be 'rows' or 'frobenius', got {normalize!r}")
        lin = tnn.Linear(in_features, out_features, bias=bias)
        self.weight, self.bias = lin.weight, lin.bias
        self.in_features, self.out_features, self.normalize = in_features, out_features, normalize

    def normalized_weight(self) -> Tensor:
        w = self.weight
        tiny = torch.finfo(w.dtype).tiny
        if self.normalize == "rows":
            return w / w.norm(dim=1, keepdim=True).clamp_min(tiny)
        return w / w.norm().clamp_min(tiny)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"normalize={self.normalize!r}")


@rule(NormalizedLinear)
def normalized_linear(node: fx.Node, ctx: RuleContext) -> Transfer:
    """NormalizedLinear: ‖W̃‖ of the normalised weight the forward pass computes."""
    m = ctx.module
    return ctx.dense(m.normalized_weight)


class PadChannels(tnn.Module):
    """Append zero channels up to ``channels`` (dim 1): an isometry (‖x‖ is kept), as the SLL
    networks do to widen the 3 input channels.

    Example:
        >>> PadChannels(4)(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [1.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: Tensor) -> Tensor:
        extra = self.channels - x.shape[1]
        pad = [0, 0] * (x.dim() - 2) + [0, extra]
        return F.pad(x, pad)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


@rule(PadChannels)
def pad_channels(node: fx.Node, ctx: RuleContext) -> Transfer:
    """PadChannels: an isometric embedding, ‖A‖ = 1 (|A| = A, rows of norm 0 or 1)."""
    m, u = ctx.module, ctx.input()
    shape_in, shape_out = ctx.shape(u), ctx.shape()
    if shape_out[0] < shape_in[0]:
        raise InputError(f"node '{node.name}': PadChannels({m.channels}) gets {shape_in[0]} "
                         "channels, more than it pads to")
    one = torch.ones((), dtype=torch.float64)

    def rows() -> Tensor:
        r = torch.zeros(shape_out, dtype=torch.float64)
        r[: shape_in[0]] = 1
        return r

    op = FunctionOperator(m, shape_in, shape_out, norm_bound=lambda: one, abs_bound=lambda: one,
                          rows=rows, label=f"PadChannels({m.channels})")
    return ctx.linear(op, norm=1)


def pool_flatten(kernel_size: int) -> tnn.Sequential:
    """Sum pooling over k×k windows divided by k (norm exactly 1 for non-overlapping windows:
    ‖sum over k² entries‖ = k), then flatten: the 1-Lipschitz pooling head of the SLL networks.

    Example:
        >>> pool_flatten(2)(torch.ones(1, 1, 4, 4))
        tensor([[2., 2., 2., 2.]])
    """
    return tnn.Sequential(
        tnn.AvgPool2d(kernel_size, divisor_override=kernel_size), tnn.Flatten()
    )


def sll_3c1f(
    num_classes: int = 10,
    *,
    channels: int = 15,
    in_channels: int = 3,
    image_size: int = 32,
    pool: int = 4,
    activation: str = "tanh",
    beta: float = 1.0,
) -> tnn.Sequential:
    """The paper's SLL "3C1F" network: PadChannels, 3 SLLConv2d of ``channels`` channels,
    :func:`pool_flatten`, one SLLLinear, a row-normalised linear head (module docstring).

    Example:
        >>> net = sll_3c1f()
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if image_size % pool:
        raise InputError(f"image_size {image_size} is not a multiple of pool {pool}")
    features = channels * (image_size // pool) ** 2
    if in_channels > channels:
        raise InputError(f"in_channels {in_channels} > channels {channels}")
    kw = dict(activation=activation, beta=beta)
    return tnn.Sequential(
        PadChannels(channels),
        *[SLLConv2d(channels, **kw) for _ in range(3)],
        pool_flatten(pool),
        SLLLinear(features, **kw),
        NormalizedLinear(features, num_classes),
    )


# -- smooth(): replace non-smooth parts ----------------------------------------------------------
@dataclass(frozen=True)
class Replacement:
    """One part :func:`smooth` replaced: module path (or graph node), old and new type."""

    path: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old} -> {self.new}"


def _smooth_activation(activation: str, beta: float) -> tnn.Module:
    if activation == "softplus":
        return tnn.Softplus(beta=beta)
    if activation == "centered_softplus":
        return CenteredSoftplus(beta=beta)
    raise InputError(
        f"smooth(): activation must be 'softplus' or 'centered_softplus', got {activation!r}"
    )


def _pool(path: str, m: Any, dims: int) -> tnn.Module:
    if getattr(m, "return_indices", False):
        raise InputError(f"smooth(): max pooling '{path}' returns indices; no smooth counterpart")
    dil = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
    if any(d != 1 for d in dil):
        raise InputError(f"smooth(): max pooling '{path}' has dilation {m.dilation}; average "
                         "pooling has none. Remove the dilation or replace the module yourself.")
    cls = tnn.AvgPool2d if dims == 2 else tnn.AvgPool1d
    return cls(m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
               count_include_pad=False)


def _replacement(path: str, m: tnn.Module, activation: str, beta: float) -> tnn.Module | None:
    """The smooth counterpart of module ``m``, or None when it is smooth (or not an activation)."""
    if isinstance(m, tnn.ReLU):
        return _smooth_activation(activation, beta)
    if isinstance(m, tnn.LeakyReLU):
        return LeakySoftplus(m.negative_slope, beta)
    if isinstance(m, tnn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return SmoothClamp(m.min_val, m.max_val, beta)
    if isinstance(m, tnn.ELU) and float(m.alpha) != 1.0:
        return tnn.CELU(alpha=float(m.alpha))
    if isinstance(m, tnn.MaxPool2d):
        return _pool(path, m, 2)
    if isinstance(m, tnn.MaxPool1d):
        return _pool(path, m, 1)
    return None


_FUNCTIONAL_RELU = {F.relu, torch.relu, "relu"}
_FUNCTIONAL = _FUNCTIONAL_RELU | {F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.max_pool1d,
                                  F.max_pool2d, torch.max_pool1d, torch.max_pool2d}


def _functional_module(node: fx.Node, activation: str, beta: float) -> tnn.Module | None:
    """The module replacing a functional non-smooth call (None: leave it)."""
    t = node.target

    def arg(i: int, name: str, default: Any) -> Any:
        if name in node.kwargs:
            return node.kwargs[name]
        return node.args[i] if i < len(node.args) else default

    if t in _FUNCTIONAL_RELU:
        return _smooth_activation(activation, beta)
    if t is F.leaky_relu:
        return LeakySoftplus(float(arg(1, "negative_slope", 0.01)), beta)
    if t is F.relu6:
        return SmoothClamp(0.0, 6.0, beta)
    if t is F.hardtanh:
        return SmoothClamp(float(arg(1, "min_val", -1.0)), float(arg(2, "max_val", 1.0)), beta)
    if t is F.elu:
        alpha = float(arg(1, "alpha", 1.0))
        return tnn.CELU(alpha) if alpha != 1.0 else None
    if t in (F.max_pool1d, F.max_pool2d, torch.max_pool1d, torch.max_pool2d):
        dims = 2 if t in (F.max_pool2d, torch.max_pool2d) else 1
        kernel = arg(1, "kernel_size", None)
        stride = arg(2, "stride", None)
        pool = tnn.MaxPool2d if dims == 2 else tnn.MaxPool1d
        fake = pool(kernel, stride=stride or None, padding=arg(3, "padding", 0),
                    dilation=arg(4, "dilation", 1), ceil_mode=bool(arg(5, "ceil_mode", False)),
                    return_indices=bool(arg(6, "return_indices", False)))
        return _pool(node.name, fake, dims)
    return None


def smooth(model: tnn.Module, activation: str = "softplus", *, beta: float = 1.0,
           functional: bool = True) -> tnn.Module:
    """A deep copy of ``model`` with every non-smooth part replaced by a smooth counterpart.

    Modules: ReLU → softplus_β (or ``activation="centered_softplus"``), LeakyReLU(a) →
    :class:`LeakySoftplus`, Hardtanh/ReLU6 → :class:`SmoothClamp`, ELU(α ≠ 1) → CELU(α) (C¹),
    MaxPool1d/2d → AvgPool1d/2d with the same kernel, stride, padding and ceil mode
    (``count_include_pad=False``, like max pooling's −∞ padding). With ``functional`` the copy is
    also traced (torch.fx, modules with a rule kept whole) and functional calls (F.relu,
    torch.relu, x.relu(), F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.max_pool1d/2d) are replaced
    the same way; the result is then a ``torch.fx.GraphModule``. A larger β is closer to the
    original function but has a larger curvature (β/4 per activation): fine-tune after converting.

    The copy's attribute ``smooth_report`` lists the :class:`Replacement` records. ``model`` is
    left unchanged.

    Example:
        >>> import curvbound
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
        ...                           torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        ...                           torch.nn.Linear(2, 1)).eval()
        >>> soft = smooth(net, beta=10.0)
        >>> for r in soft.smooth_report: print(r)
        1: ReLU -> Softplus
        2: MaxPool2d -> AvgPool2d
        >>> curvbound.compile(soft, torch.zeros(1, 1, 4, 4)).nonsmooth_nodes
        []
    """
    if not isinstance(model, tnn.Module):
        raise InputError(f"smooth() needs a torch.nn.Module, got {type(model).__name__}")
    _smooth_activation(activation, beta)  # validates the arguments before any work
    out = copy.deepcopy(model)
    report: list[Replacement] = []
    for path, mod in list(out.named_modules()):
        if not path:
            continue
        new = _replacement(path, mod, activation, beta)
        if new is None:
            continue
        new.train(mod.training)
        parent_path, _, name = path.rpartition(".")
        parent = out.get_submodule(parent_path) if parent_path else out
        setattr(parent, name, new)
        report.append(Replacement(path, type(mod).__name__, type(new).__name__))
    root = _replacement("", out, activation, beta)  # the model itself is an activation
    if root is not None:
        report.append(Replacement("", type(out).__name__, type(root).__name__))
        out = root
    if functional:
        out = _smooth_functional(out, activation, beta, report)
    out.smooth_report = report
    return out


def _smooth_functional(model: tnn.Module, activation: str, beta: float,
                       report: list[Replacement]) -> tnn.Module:
    try:
        gm = trace(model, DEFAULT_REGISTRY)
    except Exception:  # an untraceable model: modules were replaced, functional calls cannot be
        return model
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _FUNCTIONAL:
            continue
        if node.op == "call_method" and node.target != "relu":
            continue
        new = _functional_module(node, activation, beta)
        if new is None:
            continue
        name = f"smooth_{node.name}"
        gm.add_submodule(name, new)
        with gm.graph.inserting_after(node):
            repl = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(repl)
        gm.graph.erase_node(node)
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        report.append(Replacement(f"{node.name} (call {target})", target, type(new).__name__))
        changed = True
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    return gm

