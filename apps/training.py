"""Training with the curvature bound (theory §9): a penalty, its primal–dual weight, a radius loss.

The bound function's estimated norms are differentiable in the weights (with the power-iteration
vectors held fixed, the spectral-normalisation gradient), so the curvature bound M can enter a
loss. :class:`CurvaturePenalty` wraps a compiled bound for that:

- ``pen()`` advances every power iteration by ``refresh_steps`` (warm-started: the vectors persist
  between calls and follow the weights) and returns ``weight·M`` on the live weights;
- ``pen.step(...)`` is the paper's primal–dual update of the weight λ toward the target: a bound
  target (``target=M_target``, λ ← max(λ + η·(M − M_target), λ_min)) or an accuracy target
  (``target=Accuracy(a)``, λ ← max(λ + η·(acc − a), λ_min), acc the batch accuracy);
- ``pen.converge()`` converges the estimates before evaluation.

With ``margins=True`` the penalised quantity is the largest pairwise margin curvature
max_{i≠j} M(f_i − f_j) (theory §5; ≤ √2·M and usually well below), computed differentiably.
:func:`radius_loss` is a per-sample alternative: a hinge on the curvature certified radius
(theory §6). See docs/training.md for when to use which.

>>> import torch, curvbound
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 2), weight=0.1, target=0.05)
>>> loss = pen()                    # 0.1·M, differentiable in the weights
>>> loss.backward(); net[0].weight.grad is not None
True
>>> _ = pen.step()                  # M is above its target: the weight grows
>>> pen.weight > 0.1
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..compiler.bound_function import BoundFunction
from ..compiler.errors import InputError
from ..compiler.margins import reset_pair_vectors
from ..pipeline import compile as compile_bound

__all__ = [
    "Accuracy",
    "CurvaturePenalty",
    "CurvatureRegularizer",
    "unwrap_model",
    "margin_radii",
    "radius_loss",
]


#: Default power-iteration steps per penalty call (see :class:`CurvaturePenalty`).
REFRESH_STEPS = 10


@dataclass(frozen=True)
class Accuracy:
    """An accuracy target for :class:`CurvaturePenalty`: ``target=Accuracy(0.9)``.

    The weight then grows while the measured batch accuracy is above ``value`` (there is accuracy
    to trade for a smaller bound) and shrinks while it is below.
    """

    value: float

    def __post_init__(self):
        if not 0.0 <= float(self.value) <= 1.0:
            raise InputError(f"Accuracy target must lie in [0, 1], got {self.value}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, unwrapped repeatedly.

    >>> net = torch.nn.Linear(2, 2)
    >>> unwrap_model(torch.nn.DataParallel(net)) is net
    True
    """
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _float(x: float | Tensor) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


class CurvaturePenalty:
    """``weight·M`` for a model's compiled curvature bound M, tracking the real bound as the
    weights change, with the paper's primal–dual update of the weight (theory §9).

    Args:
        model: the model being trained (a DDP/DataParallel/``torch.compile`` wrapper is unwrapped).
        example_input: one batch (or one sample with its batch dimension) fixing the input shape.
        weight: λ, the initial weight of the penalty.
        target: ``None`` (fixed weight), a number M_target (bound target) or ``Accuracy(a)``
            (accuracy target); see :meth:`step`.
        dual_lr: η of the dual update.
        weight_min: λ_min, the floor of the weight.
        method: the bound's method (``curvbound.compile``).
        margins: penalise the largest pairwise margin curvature max_{i≠j} M(f_i − f_j) instead
            of M (the network's bound; margins need K ≥ 2 outputs).
        refresh_steps: power-iteration steps per call (warm-started; the products of a chain
            take them as one batched Lanczos cycle). The default keeps the value used in the loss
            within a few percent of the converged bound under Adam; one step is not enough: the
            penalty's gradient shrinks the weights along the very vector that measures them, and
            the estimate falls behind (docs/training.md has the measurements).
        bound_fn: an estimate-mode bound compiled from this model, to reuse instead of compiling.
        torch_compile: a ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ...) to run
            the refresh steps and the bound as one compiled graph (``bf.compiled``, docs/api.md),
            or None (eager). Same values and gradients; the first call compiles, and the graph
            unrolls the ``refresh_steps`` steps, so compile time grows with them (on MNIST 6F:
            docs/benchmarks.md). Not with ``margins=True``.

    ``pen.value`` is the last M (detached, estimated from below by power iteration).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        *,
        weight: float = 0.01,
        target: float | Accuracy | None = None,
        dual_lr: float = 0.01,
        weight_min: float = 0.0,
        method: str = "compositional",
        margins: bool = False,
        refresh_steps: int = REFRESH_STEPS,
        bound_fn: BoundFunction | None = None,
        torch_compile: str | None = None,
    ):
        inner = unwrap_model(model)
        if not isinstance(inner, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, Tensor):
            raise InputError(
                f"example_input must be a tensor batch, got {type(example_input).__name__}"
            )
        if target is not None and not isinstance(target, Accuracy):
            if not math.isfinite(_float(target)) or _float(target) < 0:
                raise InputError(f"target must be a bound ≥ 0 or Accuracy(a), got {target!r}")
        if refresh_steps < 0 or int(refresh_steps) != refresh_steps:
            raise InputError(f"refresh_steps must be a whole number ≥ 0, got {refresh_steps!r}")
        if weight < 0 or weight_min < 0 or dual_lr < 0:
            raise InputError("weight, weight_min and dual_lr must be ≥ 0")
        if bound_fn is None:
            bound_fn = compile_bound(inner, example_input[:1].detach(), method=method,
                                     norms="estimate")
        elif bound_fn.model is not inner:
            raise InputError("bound_fn was compiled for a different model than `model`")
        if bound_fn.norms != "estimate":
            raise InputError("CurvaturePenalty needs an estimate-mode bound (norms='estimate')")
        if math.isinf(float(bound_fn._latest().curvature)):
            where = ", ".join(f"'{n}'" for n in bound_fn.nonsmooth_nodes) or "some nodes"
            raise InputError(
                f"the model's curvature bound is infinite (not C¹ at {where}): use smooth "
                "activations (tanh, softplus, ...) to train with a curvature penalty"
            )
        if torch_compile is not None and margins:
            raise InputError(
                "torch_compile is not available with margins=True: the pairwise margins are "
                "evaluated eagerly (bf.margins); use margins=False or torch_compile=None"
            )
        self.model, self.bound = inner, bound_fn
        self.torch_compile = torch_compile
        self._compiled = None if torch_compile is None else bound_fn.compiled(torch_compile)
        self.weight, self.target = float(weight), target
        self.dual_lr, self.weight_min = float(dual_lr), float(weight_min)
        self.margins, self.refresh_steps = bool(margins), int(refresh_steps)
        self._pair_steps = self.refresh_steps
        self.value = float("nan")
        self._dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()),
                           torch.float32)

    # -- the penalised quantity -------------------------------------------------------------------
    def curvature(self) -> Tensor:
        """The penalised curvature (M, or the largest pairwise margin curvature with
        ``margins=True``) on the live weights, differentiable, at the current power-iteration
        vectors (this call does not advance them)."""
        if not self.margins:
            return self.bound().curvature
        return self.margin_curvatures().max()

    def margin_curvatures(self) -> Tensor:
        """K×K differentiable matrix of M(f_i − f_j) (zero diagonal): pairwise where the output
        layer folds the margin, else √2·M (theory §5). The per-pair block norms are tracked by
        warm-started power iteration (``refresh_steps`` steps per call, exact after
        :meth:`converge`), see ``bf.margins(pair_steps=...)``."""
        mg = self.bound.margins(differentiable=True, pair_steps=self._pair_steps)
        if mg.pairwise:
            return mg.curvature
        k = mg.classes
        off = 1 - torch.eye(k, dtype=torch.float64)
        m = self.bound().curvature.double()
        return math.sqrt(2) * m * off.to(m.device)

    def __call__(self) -> Tensor:
        """Advance the power iterations by ``refresh_steps`` and return ``weight·M``."""
        if self._compiled is not None:  # the steps and the bound in one compiled graph
            m = self._compiled(refresh=self.refresh_steps).curvature
            self.value = float(m.detach())
            return (self.weight * m).to(self._dtype)
        if self.refresh_steps:
            self.bound.refresh(self.refresh_steps)
        m = self.curvature()
        self.value = float(m.detach())
        return (self.weight * m).to(self._dtype)

    # -- the dual update -------------------------------------------------------------------------
    def step(
        self,
        *,
        accuracy: float | Tensor | None = None,
        logits: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> float:
        """The primal–dual update of the weight; returns the new weight.

        - bound target (``target=M_target``): λ ← max(λ + η·(M − M_target), λ_min), M the value
          of the last call: λ grows while the bound is above its target.
        - accuracy target (``target=Accuracy(a)``): λ ← max(λ + η·(acc − a), λ_min) with acc the
          batch accuracy, given as ``accuracy=`` or computed from ``logits=`` and ``labels=``: λ
          grows while the model is more accurate than required.
        - ``target=None``: the weight stays fixed.
        """
        if self.target is None:
            return self.weight
        if isinstance(self.target, Accuracy):
            if accuracy is None:
                if logits is None or labels is None:
                    raise InputError(
                        "an Accuracy target needs the batch accuracy: pen.step(accuracy=acc) or "
                        "pen.step(logits=out, labels=y)"
                    )
                accuracy = (logits.detach().argmax(dim=1) == labels).double().mean()
            gap = _float(accuracy) - float(self.target.value)
        else:
            if math.isnan(self.value):
                raise InputError("call pen() (the penalty) before pen.step()")
            gap = self.value - _float(self.target)
        self.weight = max(self.weight + self.dual_lr * gap, self.weight_min)
        return self.weight

    @torch.no_grad()
    def converge(self, **kwargs) -> float:
        """Converge every power iteration (``bf.refresh()``; keyword arguments go there) and
        return the converged penalised curvature (an estimate from below, not certified)."""
        self.bound.refresh(**kwargs)
        reset_pair_vectors(self.bound)  # the next margin evaluation starts from exact vectors
        self.value = float(self.curvature())
        return self.value

    def state_dict(self) -> dict:
        """Power-iteration vectors and the dual state, for checkpoints."""
        return {"bound": self.bound.state_dict(), "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.bound.load_state_dict(state["bound"])
        self.weight = float(state["weight"])

    def __repr__(self) -> str:
        what = "max pairwise margin curvature" if self.margins else "curvature bound"
        return (f"CurvaturePenalty({what}, weight={self.weight:.4g}, target={self.target!r}, "
                f"last M={self.value:.6g})")


# -- per-sample certified radius -----------------------------------------------------------------
def margin_radii(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    curvature: Tensor | float,
    *,
    create_graph: bool = True,
) -> Tensor:
    """Differentiable per-sample curvature radius r(x) = min_{i≠y} r_i (theory §6), with
    r_i = 2m_i/(g_i + √(g_i² + 2M_i·m_i)), m_i = f_y(x) − f_i(x), g_i = ‖∇ₓ(f_i − f_y)(x)‖.

    ``curvature`` holds the margins' constants M_i: a K×K matrix (``pen.margin_curvatures()``
    or ``bf.margins().curvature``) or one number for every pair (e.g. √2·M). For m_i > 0 this is
    the certificate's curvature radius; for m_i ≤ 0 (misclassified) it continues as the signed
    first-order distance m_i/g_i < 0, so misclassified samples keep a gradient. The gradient
    norms use double backpropagation (``create_graph``), one vector–Jacobian product per class.

    Returns a (B,) tensor in the logits' dtype.
    """
    if x.dim() < 1 or y.shape != x.shape[:1]:
        raise InputError(
            f"y must hold one label per sample: x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        if logits.dim() != 2:
            raise InputError(f"the model returned shape {tuple(logits.shape)}, expected (B, K)")
        b, k = logits.shape
        if (y < 0).any() or (y >= k).any():
            raise InputError(f"labels must lie in 0..{k - 1}")
        rows = []
        for i in range(k):  # ∇ₓ f_i for every sample (samples are independent)
            (gi,) = torch.autograd.grad(logits[:, i].sum(), xg, create_graph=create_graph)
            rows.append(gi.reshape(b, -1))
        jac = torch.stack(rows, dim=1)  # (B, K, n)
    fy = logits.gather(1, y[:, None])
    gaps = fy - logits  # m_i (B, K)
    jy = jac.gather(1, y[:, None, None].expand(b, 1, jac.shape[2]))
    g = (jac - jy).norm(dim=2)  # ‖∇(f_i − f_y)‖ (B, K); the norm at i = y is 0 (masked below)
    curv = torch.as_tensor(curvature, dtype=logits.dtype, device=logits.device)
    curv = curv[y] if curv.dim() == 2 else curv.expand(b, k)
    is_y = nn.functional.one_hot(y, k).bool()
    safe_g = torch.where(is_y, torch.ones_like(g), g)
    m_pos = gaps.clamp_min(0)
    r = 2 * gaps / (safe_g + torch.sqrt(safe_g * safe_g + 2 * curv * m_pos))
    r = torch.where(is_y, torch.full_like(r, math.inf), r)
    return r.amin(dim=1)


def radius_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    curvature: Tensor | float | CurvaturePenalty,
    *,
    eps: float,
    reduction: str = "mean",
) -> Tensor:
    """Per-sample certified-radius hinge max(0, ε − r(x)) (theory §6), r from :func:`margin_radii`.

    ``curvature``: a :class:`CurvaturePenalty` (its differentiable pairwise margin curvatures,
    after advancing its power iterations by its ``refresh_steps``), a K×K matrix or one number.
    A sample already certified at ``eps`` contributes 0; the others are pushed to a larger
    margin, a smaller margin gradient and (through M) a smaller curvature. Add it to the
    classification loss with a weight. ``reduction``: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if eps <= 0:
        raise InputError(f"eps must be > 0, got {eps}")
    if isinstance(curvature, CurvaturePenalty):
        if curvature.refresh_steps:
            curvature.bound.refresh(curvature.refresh_steps)
        curvature = curvature.margin_curvatures()
    r = margin_radii(model, x, y, curvature)
    loss = (eps - r).clamp_min(0)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise InputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class CurvatureRegularizer:
    """Deprecated: use :class:`CurvaturePenalty` (``weight`` for ``lam``, :meth:`step` for
    :meth:`update`). Kept as a thin shim over a compiled bound.

    >>> import torch, curvbound
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     reg = CurvatureRegularizer(curvbound.compile(net, torch.zeros(1, 2)), target=0.1)
    >>> reg().backward(); reg.update(); reg.lam > 0.01
    True
    """

    def __init__(self, bound: BoundFunction, target: float, lam: float = 0.01,
                 dual_lr: float = 0.01, lam_min: float = 0.0, refresh_steps: int = 1):
        warnings.warn("CurvatureRegularizer is deprecated: use curvbound.CurvaturePenalty",
                      DeprecationWarning, stacklevel=2)
        self._pen = CurvaturePenalty(bound.model, torch.zeros(1), weight=lam, target=target,
                                     dual_lr=dual_lr, weight_min=lam_min,
                                     refresh_steps=refresh_steps, bound_fn=bound)

    bound = property(lambda self: self._pen.bound)
    target = property(lambda self: self._pen.target)
    lam_min = property(lambda self: self._pen.weight_min)
    last = property(lambda self: self._pen.value)

    @property
    def lam(self) -> float:
        return self._pen.weight

    @lam.setter
    def lam(self, value: float) -> None:
        self._pen.weight = float(value)

    def __call__(self) -> Tensor:
        return self._pen()

    def update(self) -> None:
        """Dual ascent on λ using the curvature of the last call."""
        self._pen.step()
