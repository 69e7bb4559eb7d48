"""Robustness certificates and attack certificates from Lipschitz and curvature bounds (theory §6).

For an input x predicted as class p, with logit gaps m_i = f_p(x) − f_i(x) > 0, margin gradients
g_i = ‖∇(f_i − f_p)(x)‖ and constants L_i, M_i of the margin f_i − f_p:

- **Lipschitz radius** r_Lip = min_i m_i/L_i;
- **curvature radius** r_curv = min_i r_i, r_i = (−g_i + √(g_i² + 2M_i m_i))/M_i, the root of the
  worst-case quadratic model −m_i + g_i‖δ‖ + (M_i/2)‖δ‖² (computed as 2m_i/(g_i + √(…)), which
  is exact for M_i = 0 as well);
- the certified **radius** is max(r_Lip, r_curv), 0 for a misclassified input: no perturbation of
  norm < radius changes the prediction;
- **attack certificate**: along u = ∇(f_i − f_p)/g_i, f_i − f_p ≥ −m_i + g_i t − (M_i/2)t², so when
  g_i² > 2M_i m_i every t in (t*, t**) flips the label, t* = 2m_i/(g_i + √(g_i² − 2M_i m_i)).
  The smallest t* over i is the **attack radius** (an upper bound on the distance to the nearest
  adversarial example); the point x + t·u for a t just above t* is returned, with a flag saying
  whether it lies in the input domain.

Solvers (``solver=``): ``"closed"`` is the closed form above with two-sided constants (the paper's);
``"one-sided"`` uses in it the smaller one-sided constants K with ∇²(f_p − f_i) ⪰ −K·I
(``bf.margins().neg_curvature``; for the attack, ∇²(f_i − f_p) ⪰ −K·I); ``"convex"`` (default)
takes per class the larger of that and the convex dual certificate of
:mod:`curvbound.runtime.convex` (global one-sided K), whose iterates beyond the boundary, confirmed
by a forward pass, become attack certificates when nearer than t*.

Constants of the margins: pairwise ones from ``bf.margins()`` (theory §5) where it is available,
else √2 times the global bound (the certificate's ``margin_source`` says which), and, with
``local=True``, the curvature anchored at x (theory §7, :mod:`curvbound.runtime.anchored`) —
per pair when the output layer can fold the margin, else √2 times the anchored bound; each
M_i is the smallest of the valid bounds.

Activations whose torch implementation switches formulas (``nn.Softplus``/``F.softplus`` return x
once βx > threshold) make torch's map f discontinuous: f = F + E with F the smooth twin
(``bf.smooth_twin()``), whose constants the bounds are, and ‖E‖ ≤ ε = ``bf().error``. The
prediction p is f's; gaps, gradients and anchors are F's, and every gap is lowered by √2·ε
(raised for attacks), because |(e_i − e_p)ᵀE| ≤ √2·ε: f_i − f_p < 0 on the ball follows from
F_i − F_p < −√2·ε there. With ε = 0 (no switching activation) nothing changes.

Numerics: everything runs in float64 on a float64 copy of the model. Logit gaps are lowered and
gradient norms raised (raised and lowered for attacks) by 1e-9 relative, which covers the rounding
of a float64 forward and backward pass by a wide margin, and radii are rounded down.

Example:
    >>> import torch, curvbound
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x = torch.randn(64, 2)
    >>> cert = curvbound.certify(net, x)
    >>> print(cert.summary([0.01, 0.05]))  # doctest: +NORMALIZE_WHITESPACE
    64 samples, no labels (the predictions are certified); margins: pairwise (bf.margins());
    anchored curvature; convex certificate; bounds certified
    eps     certified  Lipschitz  curvature  attack bound  gap
    0.0100  1.0000     0.9844     1.0000     1.0000        0.0000
    0.0500  0.9375     0.8750     0.9375     0.9375        0.0000
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import sympy
import torch
from torch import Tensor, nn

from ..compiler.bound_function import check_finite_samples
from ..compiler.errors import InputError, NonSmoothError
from ..compiler.margins import evaluate_expression, pair_values
from ..compiler.rounding import rounding_exponent, rounding_factor
from ..compiler.trace import unwrap_model
from ..pipeline import compile as compile_bound
from ..runtime.convex import convex_radii
from ..runtime.margins import _Context
from .anchored import Capture, anchor_state
from .distributed import sharded

__all__ = [
    "Certificate",
    "AdversarialExamples",
    "Certifier",
    "certify",
    "certify_dataset",
    "lipschitz_radius",
    "curvature_radius",
    "capped_radius",
    "attack_distance",
]

_REL = 1e-9  # relative allowance for the float64 rounding of logits and gradients
#: Certificates :func:`certify` can compute (module docstring): the paper's closed form with
#: two-sided constants, the closed form with one-sided constants, and the convex (dual) one.
SOLVERS = ("closed", "one-sided", "convex")
_DOWN = 1 - 1e-12  # radii are rounded down by this factor


@dataclass
class AdversarialExamples:
    """Points x + t·u from attack certificates (one per attacked sample).

    ``index``: the samples they come from; ``points``: float64 (A, *input_shape); ``t``: their
    distance to the sample; ``target``: the class i whose margin f_i − f_p is provably positive
    there; ``in_domain``: whether each point lies in the domain box given to
    :meth:`Certificate.adversarial_examples` (the certificate itself ignores the domain).
    """

    index: Tensor
    points: Tensor
    t: Tensor
    target: Tensor
    in_domain: Tensor

    def __len__(self) -> int:
        return len(self.index)

    @torch.no_grad()
    def predictions(self, model: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
        """The classes ``model`` predicts at the points (a forward pass in ``dtype``)."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.long)
        ref = next((p for p in model.parameters()), None)
        if ref is not None and ref.dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
        return model(self.points.to(dtype)).argmax(dim=1)


@dataclass
class Certificate:
    """Per-sample certificates of a batch or dataset (tensors of length N, float64 radii).

    - ``predicted``: argmax of the logits; ``label``/``correct``: when labels were given;
    - ``margin``: gap between the top logit and the runner-up;
    - ``lipschitz_radius``, ``curvature_radius``: the two certified radii (theory §6);
    - ``radius``: the best valid one (0 when misclassified): the prediction provably does not
      change under any perturbation of ℓ2 norm < radius; it includes the combined radius
      (``combined_radius``, :func:`capped_radius` per class: the slope bound min(L_i, g_i + M_i·t)
      uses both constants at once, so it is never below either and strictly above m/L where
      g_i < L_i);
    - ``attack_radius``: t* of the attack certificate, an upper bound on the distance to the
      nearest adversarial example (the points at distance t ∈ (t*, t**) along the margin
      gradient are adversarial); inf when there is none, 0 when misclassified;
      ``attack_class``: the class it flips to (−1 when none); ``attack_t``: the t of the
      returned example (slightly above t*);
    - per class (N, K): ``logit_gaps`` m_i, ``gradient_norms`` g_i, ``lipschitz_constants`` L_i
      and ``curvature_constants`` M_i (∞ at the predicted class or when not used);
    - ``certified``: every constant was a guaranteed bound (False with ``norms="estimate"``);
      ``margin_source``: pairwise constants or the √2 fallback (and why); ``local``: anchored
      curvature was used; ``curvature_used``: False for Lipschitz-only certificates.
    """

    predicted: Tensor
    label: Tensor | None
    correct: Tensor | None
    margin: Tensor
    lipschitz_radius: Tensor
    curvature_radius: Tensor
    radius: Tensor
    attack_radius: Tensor
    attack_class: Tensor
    attack_t: Tensor
    logit_gaps: Tensor
    gradient_norms: Tensor
    lipschitz_constants: Tensor
    curvature_constants: Tensor
    attack_index: Tensor
    attack_points: Tensor
    certified: bool
    margin_source: str
    local: bool
    curvature_used: bool
    notes: list[str] = field(default_factory=list)
    #: √2·ε subtracted from every logit gap (added for attacks), ε = ``Bounds.error``: how far
    #: torch's switching activations can move a margin from the smooth twin's (0 without them)
    error: float = 0.0
    solver: str = "closed"
    convex_radius: Tensor | None = None
    #: per class the radius of :func:`capped_radius` (slope bound min(L_i, g_i + M_i·t)), the
    #: minimum over classes; ``radius`` is the largest of this and the two radii above
    combined_radius: Tensor | None = None

    def __len__(self) -> int:
        return len(self.predicted)

    def _ok(self) -> Tensor:
        if self.correct is not None:
            return self.correct
        return torch.ones_like(self.radius, dtype=torch.bool)

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of samples that are correct (or, without labels, any) with radius > eps."""
        if len(self) == 0:
            return float("nan")
        return float((self._ok() & (self.radius > eps)).double().mean())

    def robust_accuracy_upper(self, eps: float) -> float:
        """Upper bound on robust accuracy at eps: samples that are correct and have no attack
        certificate below eps (misclassified samples count as attacked at distance 0)."""
        if len(self) == 0:
            return float("nan")
        return float((self._ok() & ~(self.attack_radius < eps)).double().mean())

    def _fraction(self, r: Tensor, eps: float) -> float:
        return float((self._ok() & (r > eps)).double().mean()) if len(self) else float("nan")

    def summary(self, eps_list: Sequence[float]) -> str:
        """A printable table: per ε the certified accuracy (best, Lipschitz only, curvature
        only), the attack-certificate upper bound on robust accuracy and the gap between them."""
        n = len(self)
        head = f"{n} samples, "
        if self.correct is not None:
            head += f"clean accuracy {float(self.correct.double().mean()):.4f}"
        else:
            head += "no labels (the predictions are certified)"
        kind = "certified" if self.certified else "ESTIMATED (not guaranteed)"
        curv = (
            ("anchored curvature" if self.local else "global curvature")
            if (self.curvature_used)
            else "Lipschitz only"
        )
        solver = {"closed": "closed form", "one-sided": "one-sided closed form",
                  "convex": "convex certificate"}.get(self.solver, self.solver)
        if not self.curvature_used:
            solver = "closed form"
        head += f"; margins: {self.margin_source};\n{curv}; {solver}; bounds {kind}"
        rows = [("eps", "certified", "Lipschitz", "curvature", "attack bound", "gap")]
        for eps in eps_list:
            cert, up = self.certified_accuracy(eps), self.robust_accuracy_upper(eps)
            rows.append((
                f"{eps:.4f}", f"{cert:.4f}", f"{self._fraction(self.lipschitz_radius, eps):.4f}",
                f"{self._fraction(self.curvature_radius, eps):.4f}", f"{up:.4f}",
                f"{up - cert:.4f}",
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([head, *lines])

    def adversarial_examples(
        self, domain: tuple[float, float] | None = (0.0, 1.0)
    ) -> AdversarialExamples:
        """The points x + t·u of the attack certificates, with ``in_domain`` flags for the box
        ``domain`` = (low, high) (``None``: every point counts as inside)."""
        pts = self.attack_points
        if domain is None or len(pts) == 0:
            inside = torch.ones(len(pts), dtype=torch.bool)
        else:
            lo, hi = domain
            flat = pts.flatten(1)
            inside = ((flat >= lo) & (flat <= hi)).all(dim=1)
        idx = self.attack_index
        return AdversarialExamples(idx, pts, self.attack_t[idx], self.attack_class[idx], inside)

    @staticmethod
    def cat(parts: Sequence[Certificate]) -> Certificate:
        """Concatenate certificates of consecutive batches (indices are shifted)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        out = {}
        offset, offsets = 0, []
        for p in parts:
            offsets.append(offset)
            offset += len(p)
        for f in fields(Certificate):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "attack_index":
                out[f.name] = torch.cat([v + o for v, o in zip(vals, offsets)])
            elif isinstance(vals[0], Tensor):
                out[f.name] = torch.cat(vals)
            elif vals[0] is None:
                out[f.name] = None
            elif f.name == "certified":
                out[f.name] = all(vals)
            elif f.name == "notes":
                out[f.name] = list(dict.fromkeys(n for v in vals for n in v))
            else:
                out[f.name] = getattr(first, f.name)
        return Certificate(**out)

    def __repr__(self) -> str:
        kind = "certified" if self.certified else "estimated"
        med = float(self.radius.median()) if len(self) else float("nan")
        return (
            f"Certificate(n={len(self)}, median radius={med:.4g}, "
            f"attacks={len(self.attack_index)}, {kind})"
        )


class Certifier:
    """Certifies batches of one model with one compiled bound (what :func:`certify` and
    :func:`certify_dataset` use). Build once, call :meth:`__call__` per batch.

    The constants that do not depend on the input (pairwise margins, the pair quantities of the
    anchored output block) are computed here once.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        *,
        bound_fn=None,
        local: bool = True,
        norms: str = "certified",
        curvature: bool | None = None,
        method: str = "compositional",
        solver: str = "convex",
        convex_steps: tuple[int, int] = (14, 12),
        radius_cap: float | None = None,
    ):
        if solver not in SOLVERS:
            raise InputError(
                f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}"
            )
        self.solver, self.convex_steps = solver, tuple(convex_steps)
        if radius_cap is not None and not (float(radius_cap) > 0):
            raise InputError(f"radius_cap must be a positive radius or None, got {radius_cap!r}")
        #: the convex solver skips margins whose closed-form radius already exceeds this
        self.radius_cap = None if radius_cap is None else float(radius_cap)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        example, _ = _check_batch(example, None)
        model = unwrap_model(model)  # torch.compile, DataParallel, DistributedDataParallel
        if bound_fn is not None and bound_fn.model is not model:
            raise InputError(
                "bound_fn was compiled for a different model; pass the model it was compiled "
                "from, or leave bound_fn=None to compile one"
            )
        self.notes: list[str] = []
        bf = bound_fn
        if bf is not None and local and getattr(bf, "_anchor", None) is None:
            self.notes.append(
                "bound_fn was not compiled with anchored=True; an anchored copy was compiled "
                "with the same method and norms (custom rules are not carried over)"
            )
            bf = None
            method, norms = bound_fn.method, bound_fn.norms
        if bf is None:
            # the example only fixes shapes: give it the parameters' dtype (the certificates
            # themselves are computed in float64 whatever the dtype of x)
            dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()),
                         example.dtype)
            bf = compile_bound(model, example[:1].detach().to(dtype), method=method, norms=norms,
                               anchored=local)
        self.bf = bf
        self.model = bf.model
        self.input_shape = tuple(example.shape[1:])
        nonsmooth = list(bf.nonsmooth_nodes)
        self.curvature_used = curvature is not False
        if nonsmooth:
            where = ", ".join(f"'{n}'" for n in nonsmooth)
            if curvature:
                raise NonSmoothError(
                    f"curvature certificates were requested, but nodes {where} are not C¹ "
                    "(their derivative jumps), so the model has no finite curvature bound. Use "
                    "smooth activations (tanh, softplus, ...) or certify with curvature=False "
                    "(Lipschitz certificates only)."
                )
            if curvature is None:
                warnings.warn(
                    f"the model is not C¹ at nodes {where}: curvature bounds are infinite, "
                    "falling back to Lipschitz certificates (and no attack certificates)",
                    stacklevel=3,
                )
            self.curvature_used = False
        anchored = getattr(bf, "_anchor", None) is not None
        self.local = bool(local) and self.curvature_used and anchored
        with torch.no_grad():
            glob = bf()
        self.certified = bool(glob.certified)
        self.global_lipschitz = float(glob.lipschitz)
        self.global_curvature = float(glob.curvature)
        self._pairs(bf)
        names = anchor_state(bf).nodes if self.local else []
        twins = getattr(bf, "_twins", {})
        # torch's switching activations: gaps, gradients and anchors come from the smooth twin,
        # the prediction from the model itself, and √2·ε covers the difference (module docstring)
        self.capture = Capture(bf.gm, names, twins=twins)
        self.real = Capture(bf.gm, []) if twins else None
        eps = float(glob.error)
        self.error = eps * math.sqrt(2) * (1 + 4 * 2.0**-53) if eps else 0.0
        if eps:
            self.notes.append(
                f"torch's switching activations ({', '.join(sorted(twins))}): every logit gap "
                f"lowered by √2·error = {self.error:.3g} (Bounds.error)"
            )
        self._plain: nn.Module | None = None
        self.anchored_pairs = _AnchoredPairs(bf) if self.local else None

    def _pairs(self, bf) -> None:
        k = self.classes = _classes(bf)
        if k < 2:
            raise InputError(f"certificates need a classifier with at least 2 outputs; got {k}")
        root2 = math.sqrt(2) * (1 + 4 * 2.0**-53)
        off = 1 - torch.eye(k, dtype=torch.float64)
        try:
            mg = bf.margins()
            lip, curv = mg.lipschitz.double(), mg.curvature.double()
            neg = mg.neg_curvature.double()
            self.margin_source = "pairwise (bf.margins())" if mg.pairwise else mg.note
            self.certified = self.certified and bool(mg.certified)
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the global bound
            lip = root2 * self.global_lipschitz * off
            curv = neg = root2 * self.global_curvature * off
            self.margin_source = f"√2·global bound (bf.margins() unavailable: {exc})"
        self.pair_lipschitz = lip
        inf = torch.full_like(curv, math.inf)
        self.pair_curvature = curv if self.curvature_used else inf
        # neg[i, j]: ∇²(f_i − f_j) ⪰ −K·I (global, one-sided; ≤ the two-sided bound)
        self.pair_neg_curvature = torch.minimum(neg, curv) if self.curvature_used else inf

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Certificate:
        """Certificates for the batch ``x`` (labels ``y`` optional)."""
        x, y = _check_batch(x, y)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(
                f"x has shape {tuple(x.shape)}, but this certifier was built for inputs "
                f"(B, {', '.join(map(str, self.input_shape))})"
            )
        outside = None if y is None else (y < 0) | (y >= self.classes)
        if outside is not None and outside.any():
            bad = int(outside.nonzero()[0, 0])
            raise InputError(
                f"label y[{bad}] = {int(y[bad])} is not a class of this {self.classes}-class "
                f"model (labels must lie in 0..{self.classes - 1})"
            )
        x64 = x.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            logits, values = self.capture(x64)
            if logits.dim() != 2 or logits.shape[1] != self.classes:
                raise InputError(f"the model returned shape {tuple(logits.shape)}, expected (B, K)")
            if self.real is not None:  # torch's prediction; the twin's logits for the gaps
                with torch.no_grad():
                    real = self.real(x64.detach())[0]
                pred = real.argmax(dim=1)
            else:
                real = None
                pred = logits.argmax(dim=1)
            grads = _margin_gradients(logits, x64, pred)  # (K, B, *shape)
        logits = logits.detach()
        b, k = logits.shape
        gaps = logits.gather(1, pred[:, None]) - logits  # m_i (B, K), 0 at p
        g = grads.flatten(2).norm(dim=2).T.contiguous()  # (B, K)
        is_p = torch.nn.functional.one_hot(pred, k).bool()
        lip = self.pair_lipschitz[pred]  # (B, K)
        curv = self.pair_curvature[pred]
        if self.local:
            # one evaluation of the anchored bound at every sample: the whole model's M(x)
            # (times √2 for a margin) and, per pair, the folded output block
            state = anchor_state(self.bf)
            with state.anchored({n: v.detach() for n, v in values.items()}), torch.no_grad():
                anch = self.bf()
                qv = {n: q().detach().double() for n, q in self.bf.quantities.items()}
            self.bf._last = None  # per-sample values must not feed bf.table()
            root2 = math.sqrt(2) * (1 + 4 * 2.0**-53)
            curv = torch.minimum(curv, root2 * anch.curvature.expand(b)[:, None])
            pairs = self.anchored_pairs.curvature(anch, qv, pred)
            if pairs is not None:
                curv = torch.minimum(curv, pairs)
        inf = torch.tensor(math.inf, dtype=torch.float64)
        lip = torch.where(is_p, inf, lip)
        curv = torch.where(is_p, inf, curv)
        curv_att = curv
        if self.solver != "closed":
            # one-sided constants: ∇²(f_p − f_i) ⪰ −neg[p, i]·I bounds the certificate's quadratic
            # model from below, ∇²(f_i − f_p) ⪰ −neg[i, p]·I the attack's
            neg_cert = self.pair_neg_curvature[pred]
            neg_att = self.pair_neg_curvature[:, pred].T
            curv = torch.minimum(curv, torch.where(is_p, inf, neg_cert))
            curv_att = torch.minimum(curv_att, torch.where(is_p, inf, neg_att))
        scale = logits.abs()
        slack = _REL * (scale + scale.gather(1, pred[:, None])) + 1e-300
        m_lo = torch.where(is_p, inf, (gaps - slack - self.error).clamp_min(0))
        g_hi = g * (1 + _REL) + 1e-300
        # certified radii
        r_lip = torch.where(is_p, inf, lipschitz_radius(m_lo, lip)).amin(dim=1) * _DOWN
        r_i = torch.where(is_p, inf, curvature_radius(m_lo, g_hi, curv))
        correct = None if y is None else pred == y
        convex = None
        if self.solver == "convex" and self.curvature_used:
            need = None
            if self.radius_cap is not None:  # margins that cannot decide a radius ≤ the cap
                closed = torch.maximum(torch.maximum(r_i, lipschitz_radius(m_lo, lip)),
                                       capped_radius(m_lo, g_hi, lip, curv))
                need = closed * _DOWN <= self.radius_cap
            convex = self._convex(x64.detach(), pred, correct, need)
            r_i = torch.maximum(r_i, torch.where(is_p, inf, convex[0]))
        r_curv = r_i.amin(dim=1) * _DOWN
        if not self.curvature_used:
            r_curv = torch.zeros_like(r_curv)
            r_both = r_curv
        else:  # both constants per class: ≥ either radius, > m/L wherever g < L
            r_both = torch.where(is_p, inf, torch.maximum(
                r_i, capped_radius(m_lo, g_hi, lip, curv))).amin(dim=1) * _DOWN
        radius = torch.maximum(torch.maximum(r_lip, r_curv), r_both)
        if correct is not None:
            radius = torch.where(correct, radius, torch.zeros_like(radius))
        # attack certificates
        m_hi = gaps + slack + self.error
        g_lo = (g * (1 - _REL)).clamp_min(0)
        t_star = torch.where(is_p, inf, attack_distance(m_hi, g_lo, curv_att))
        root = torch.sqrt((g_lo * g_lo - 2 * curv_att * m_hi).clamp_min(0))
        t_best, cls = t_star.min(dim=1)
        attacked = torch.isfinite(t_best)
        if correct is not None:
            attacked = attacked & correct
        attack_radius = torch.where(attacked, t_best, inf)
        if correct is not None:
            attack_radius = torch.where(correct, attack_radius, torch.zeros_like(attack_radius))
        attack_class = torch.where(attacked, cls, torch.full_like(cls, -1))
        # the example: t = t* + s with s = 0.1·min(D/M, t*), where the lower model is ≥ 0.95·D·s
        d = root.gather(1, cls[:, None])[:, 0]
        m_c = curv_att.gather(1, cls[:, None])[:, 0]
        s = 0.1 * torch.minimum(torch.where(m_c > 0, d / m_c.clamp_min(1e-300), inf), t_best)
        t_ex = torch.where(attacked, t_best + s, inf)
        direction = grads[cls.clamp_min(0), torch.arange(b)].detach()
        norms = direction.flatten(1).norm(dim=1).clamp_min(1e-300)
        shape = (-1,) + (1,) * (direction.dim() - 1)
        step = (torch.where(attacked, t_ex, 0) / norms).reshape(shape)
        all_points = x64.detach() + step * direction
        if convex is not None:  # nearer adversarial points found by the convex solver
            _, c_dist, c_point, c_cls = convex
            use = c_dist < t_ex
            if correct is not None:
                use = use & correct
            attack_radius = torch.where(use, c_dist, attack_radius)
            attack_class = torch.where(use, c_cls, attack_class)
            t_ex = torch.where(use, c_dist, t_ex)
            all_points = torch.where(use.reshape(shape), c_point, all_points)
            attacked = attacked | use
        idx = attacked.nonzero()[:, 0]
        points = all_points[idx]
        return Certificate(
            predicted=pred,
            label=y,
            correct=correct,
            margin=_runner_up_gap(logits if real is None else real),
            lipschitz_radius=r_lip,
            curvature_radius=r_curv,
            radius=radius,
            attack_radius=attack_radius,
            attack_class=attack_class,
            attack_t=t_ex,
            logit_gaps=torch.where(is_p, inf, gaps),
            gradient_norms=g,
            lipschitz_constants=lip,
            curvature_constants=curv,
            attack_index=idx,
            attack_points=points,
            certified=self.certified,
            margin_source=self.margin_source,
            local=self.local,
            curvature_used=self.curvature_used,
            notes=list(self.notes),
            error=self.error,
            solver=self.solver if self.curvature_used else "closed",
            convex_radius=None if convex is None else torch.where(is_p, inf, convex[0]),
            combined_radius=r_both,
        )

    def _convex(self, x: Tensor, pred: Tensor, correct: Tensor | None,
                need: Tensor | None = None):
        """The convex certificate of every margin f_p − f_i (runtime/convex.py), or of those
        where ``need`` (B, K) holds: per (B, K) the radius lower bound (0 where not computed),
        and per sample the nearest verified adversarial point (distance ∞ where none), its point
        and its class."""
        if self._plain is None:
            # the float64 (smooth-twin) copy the certificates' gradients come from; called
            # through its graph module so that the solver's steps are not counted as samples
            twins = getattr(self.bf, "_twins", {})
            self._plain = Capture(self.bf.gm, [], twins=twins).gm
        plain = self._plain

        def fn(z: Tensor) -> Tensor:
            return plain(z)[0]

        b, k = len(x), self.classes
        rows = torch.arange(b).repeat_interleave(k)
        cls = torch.arange(k).repeat(b)
        keep = cls != pred[rows]
        if correct is not None:
            keep = keep & correct[rows]
        if need is not None:
            keep = keep & need[rows, cls]
        rows, cls = rows[keep], cls[keep]
        p = pred[rows]
        k_neg = self.pair_neg_curvature[p, cls]
        k_pos = self.pair_neg_curvature[cls, p]
        outer, inner = self.convex_steps
        # the one-sided K bounds the smooth twin; torch's margin differs by at most √2·ε, so
        # the distance to {twin margin ≤ √2·ε} bounds torch's (offset = self.error)
        res = convex_radii(fn, x[rows], p, cls, k_neg, k_pos, outer=outer, inner=inner,
                           offset=self.error)
        radii = torch.zeros(b, k, dtype=torch.float64)
        radii[rows, cls] = res.radius
        # the primal points: adversarial when the float64 forward pass says so
        dist = torch.full((b,), math.inf, dtype=torch.float64)
        point = x.clone()
        klass = torch.full((b,), -1, dtype=torch.long)
        found = torch.isfinite(res.primal_distance).nonzero()[:, 0]
        if len(found):
            with torch.no_grad():  # torch's own model decides (not the smooth twin)
                pts = res.primal_points[found]
                at = (self.real(pts)[0] if self.real is not None else fn(pts)).argmax(dim=1)
            ok = at != p[found]
            found, at = found[ok], at[ok]
            # per sample the nearest confirmed point; among equal distances the first problem
            # (vectorised: a scatter-min of the distances, then of the winners' positions)
            r_f, d_f = rows[found], res.primal_distance[found]
            dist.scatter_reduce_(0, r_f, d_f, reduce="amin")
            win = (d_f == dist[r_f]).nonzero()[:, 0]
            first = torch.full((b,), len(found), dtype=torch.long)
            first.scatter_reduce_(0, r_f[win], win, reduce="amin")
            hit = (first < len(found)).nonzero()[:, 0]
            j = found[first[hit]]
            point[hit] = res.primal_points[j]
            klass[hit] = at[first[hit]]
        return radii, dist, point, klass


def lipschitz_radius(m: Tensor, lipschitz: Tensor) -> Tensor:
    """m/L: no perturbation of norm < m/L closes a gap m of an L-Lipschitz margin.

    >>> float(lipschitz_radius(torch.tensor(1.0), torch.tensor(4.0)))
    0.25
    """
    return m / lipschitz


def curvature_radius(m: Tensor, g: Tensor, curvature: Tensor) -> Tensor:
    """The root r of −m + g·r + (M/2)·r² (theory §6): 2m/(g + √(g² + 2Mm)), = m/g for M = 0,
    0 for M = ∞. A margin with gap m, gradient norm g and curvature M cannot close within r.

    >>> round(float(curvature_radius(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0))), 6)
    0.618034
    """
    r = 2 * m / (g + torch.sqrt(g * g + 2 * curvature * m))
    return torch.where(torch.isinf(curvature), torch.zeros_like(r), r)


def capped_radius(m: Tensor, g: Tensor, lipschitz: Tensor, curvature: Tensor) -> Tensor:
    """The certified radius of a margin that uses both constants (theory §6, combined per class).

    Along any unit direction u the margin's slope is at least −‖∇φ(x + tu)‖ ≥ −min(L, g + M·t):
    the gradient norm is at most L everywhere and moves by at most M·t from g (for an anchored M,
    from the anchor x; with a one-sided K, ∇²φ ⪰ −K·I bounds the directional slope the same way).
    So the gap m cannot close before r, the root of ∫₀^r min(L, g + M·t) dt = m: the curvature
    radius while r ≤ t* = (L − g)/M, else t* + (m − (L² − g²)/(2M))/L. It is never below either
    the Lipschitz radius m/L or the curvature radius, and strictly above m/L whenever g < L.

    >>> m, g, L, M = (torch.tensor(v) for v in (1.0, 0.5, 1.0, 1.0))
    >>> [round(float(r), 6) for r in (lipschitz_radius(m, L), curvature_radius(m, g, M),
    ...                               capped_radius(m, g, L, M))]
    [1.0, 1.0, 1.125]
    """
    gl = torch.minimum(g, lipschitz)
    rising = (lipschitz > gl) & (curvature > 0)
    safe_m = torch.where(rising, curvature, torch.ones_like(curvature))
    t_star = torch.where(rising, (lipschitz - gl) / safe_m, torch.zeros_like(gl))
    # the area under the slope bound up to t*: g·t* + M·t*²/2 = (L² − g²)/(2M); ∞ when M = 0
    area = torch.where(rising, (lipschitz - gl) * (lipschitz + gl) / (2 * safe_m),
                       torch.zeros_like(gl))
    area = torch.where((curvature == 0) & (lipschitz > gl), torch.full_like(gl, math.inf), area)
    r_curv = curvature_radius(m, gl, curvature)
    r_tail = t_star + (m - area).clamp_min(0) / lipschitz
    return torch.where(m <= area, r_curv, r_tail)


def attack_distance(m: Tensor, g: Tensor, curvature: Tensor) -> Tensor:
    """t* = 2m/(g + √(g² − 2Mm)), the smaller root of −m + g·t − (M/2)·t² (theory §6): along the
    gradient direction the margin provably flips for every t in (t*, t**). ∞ where g² ≤ 2Mm (no
    certificate), where M = ∞, or where g = 0.

    >>> round(float(attack_distance(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(2.0))), 6)
    0.381966
    """
    disc = g * g - 2 * curvature * m
    ok = (disc > 0) & torch.isfinite(curvature) & (g > 0)
    t = 2 * m / (g + torch.sqrt(disc.clamp_min(0)))
    return torch.where(ok, t, torch.full_like(t, math.inf))


class _AnchoredPairs:
    """Pairwise anchored margin curvature: the output block's expression evaluated with the
    anchored per-sample values (B, 1) and the per-pair quantities (P,) of ``bf.margins()``'s fold
    (computed once: they depend on the last layer only), giving (B, P)."""

    def __init__(self, bf):
        fold = getattr(bf, "_margin_fold", None)
        out_info = next(nb for nb in bf._node_info if nb.name == bf.output)
        self.ok = fold is not None
        if not self.ok:
            return
        k = _classes(bf)
        self.k = k
        certified = bool(bf.certified)
        ctx = _Context(k, certified)
        self.i, self.j = ctx.i, ctx.j
        self.expr = out_info.curvature.xreplace(
            {m: sympy.Min(*m.args, *extra) for m, extra in fold.extra.items()}
        )
        names = {a.name for a in self.expr.free_symbols}
        try:
            with torch.no_grad():
                self.pairs = pair_values(bf, fold, ctx, names)
        except NotImplementedError:
            self.ok = False
            return
        self.factor = 1.0
        if certified:
            e = rounding_exponent(self.expr, {})
            if e is None:
                self.ok = False
                return
            self.factor = rounding_factor(e)
        self.evaluate = evaluate_expression

    def curvature(self, b, quantities: dict[str, Tensor], pred: Tensor) -> Tensor | None:
        """(B, K) anchored curvature of the margins f_i − f_p from the anchored bounds ``b`` and
        the anchored quantity values, or None when not available."""
        if not self.ok:
            return None
        vals = {name: _column(v) for name, v in quantities.items()}
        for name, (L, M) in b.nodes.items():
            vals[f"L_{name}"] = _column(L.detach().double())
            vals[f"M_{name}"] = _column(M.detach().double())
        vals.update(self.pairs)
        c = self.evaluate(self.expr, vals) * self.factor
        batch = len(pred)
        c = torch.broadcast_to(c, (batch, len(self.i)))
        square = torch.zeros(batch, self.k, self.k, dtype=torch.float64)
        square[:, self.i, self.j] = c
        square[:, self.j, self.i] = c
        return square[torch.arange(batch), pred]


def _column(v: Tensor) -> Tensor:
    return v.reshape(-1, 1) if v.dim() == 1 else v


def _classes(bf) -> int:
    for node in bf.gm.graph.nodes:
        if node.name == bf.output:
            return math.prod(node.meta["tensor_meta"].shape[1:])
    raise ValueError(f"output node '{bf.output}' not found")


def _runner_up_gap(logits: Tensor) -> Tensor:
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def _margin_gradients(logits: Tensor, x: Tensor, pred: Tensor) -> Tensor:
    """∇(f_i − f_p)(x) for every class i and sample: (K, B, *input_shape).

    One backward pass per class over the whole batch, with cotangent e_i − e_p per sample (no loop
    over samples). On CPU this is faster than one vmapped pass (``is_grads_batched``), which
    falls back to slow kernels for convolutions. (K − 1 passes, class (p + j) mod K in pass j,
    would skip the zero gradient of i = p, but scattering their results back into class order
    cost more than the pass they save: measured, docs/benchmarks.md.)
    """
    b, k = logits.shape
    eye = torch.eye(k, dtype=logits.dtype)
    cot = eye[:, None, :] - torch.nn.functional.one_hot(pred, k).to(logits.dtype)[None]
    out = []
    for i in range(k):
        (gi,) = torch.autograd.grad(logits, x, cot[i], retain_graph=i + 1 < k)
        out.append(gi)
    return torch.stack(out)


def _check_batch(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(
            "x must be a floating-point tensor with a batch dimension (B, *input_shape), got "
            f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}"
        )
    check_finite_samples(x, "x")
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape != (len(x),) or y.is_floating_point():
            raise InputError(
                f"y must hold one integer label per sample, shape ({len(x)},), "
                f"got {tuple(y.shape)} {y.dtype}"
            )
        y = y.long()
    return x, y


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    bound_fn=None,
    local: bool = True,
    norms: str = "certified",
    curvature: bool | None = None,
    method: str = "compositional",
    solver: str = "convex",
    radius_cap: float | None = None,
) -> Certificate:
    """Certified radii and attack certificates for the batch ``x`` (theory §6–§7).

    Args:
        model: a classifier returning logits (B, K).
        x: the inputs (B, *input_shape), any floating dtype (certificates are computed in
            float64); ``y``: their labels in 0..K−1 (optional; without them the prediction is
            certified).
        bound_fn: a compiled bound to reuse (``curvbound.compile``; with ``anchored=True`` for
            ``local``); compiled here when None.
        local: use curvature anchored at each input (tighter, one extra pass per batch).
        norms: ``"certified"`` (guaranteed) or ``"estimate"`` (quick, not guaranteed).
        curvature: None: curvature certificates when the model is C¹, else a warning and
            Lipschitz certificates; True: raise :class:`~curvbound.NonSmoothError` for a non-C¹
            model; False: Lipschitz certificates only.
        method: the bound's method when it is compiled here.
        solver: ``"convex"`` (default, the strongest): per class the larger of the one-sided
            closed-form radius and the convex dual certificate (:mod:`curvbound.runtime.convex`),
            whose primal points also serve as attack certificates; ``"one-sided"``: the closed
            form with the one-sided constants ``bf.margins().neg_curvature`` where they are
            smaller; ``"closed"``: the paper's closed form with two-sided constants (fastest).
        radius_cap: with the convex solver, solve only the margins whose closed-form radius is
            ≤ this radius (e.g. the largest ε you report): every radius stays sound, radii above
            the cap may be the closed form's, and the certified accuracy at every ε ≤ the cap is
            exactly the uncapped one (a margin certified beyond the cap certifies every such ε).

    Returns:
        a :class:`Certificate` (see the module docstring for an example).
    """
    _check_batch(x, y)  # lengths, labels' dtype, NaN samples: before any compile work
    cert = Certifier(
        model, x, bound_fn=bound_fn, local=local, norms=norms, curvature=curvature, method=method,
        solver=solver, radius_cap=radius_cap,
    )
    return cert(x, y)


@sharded
def certify_dataset(
    model: nn.Module,
    loader: Iterable,
    *,
    bound_fn=None,
    local: bool = True,
    norms: str = "certified",
    curvature: bool | None = None,
    method: str = "compositional",
    limit: int | None = None,
    progress: bool = True,
    solver: str = "convex",
    distributed: bool | None = None,
    radius_cap: float | None = None,
) -> Certificate:
    """Certify a dataset batch by batch and return the concatenated :class:`Certificate`.

    ``loader`` yields ``(x, y)`` pairs or bare ``x`` batches (a ``DataLoader`` or any iterable);
    the bound is compiled once from the first batch. ``limit`` stops after that many samples;
    ``progress`` prints a one-line progress report on stderr; ``solver`` and ``radius_cap`` are
    :func:`certify`'s.

    Under ``torch.distributed`` (a process group of several ranks, or a process started by
    torchrun) each rank certifies every W-th batch of the same loader and every rank returns the
    whole certificate, equal to a single-process run (``distributed=False``: only what the local
    loader yields); see :mod:`curvbound.apps.distributed` and docs/distributed.md.
    """
    certifier: Certifier | None = None
    parts: list[Certificate] = []
    total = _length(loader)
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    done, start = 0, time.perf_counter()
    for batch in loader:
        if isinstance(batch, dict):
            raise InputError(
                f"the loader yielded a dict (keys {sorted(map(str, batch))}); certify_dataset "
                "needs batches x or pairs (x, y), e.g. ((b['image'], b['label']) for b in loader)"
            )
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if limit is not None:
            x = x[: limit - done]
            y = None if y is None else y[: limit - done]
        if len(x) == 0:
            break
        check_finite_samples(x, f"x (the batch from dataset sample {done})")
        x, y = _check_batch(x, y)  # before the compile that the first batch triggers
        if certifier is None:
            certifier = Certifier(
                model,
                x,
                bound_fn=bound_fn,
                local=local,
                norms=norms,
                curvature=curvature,
                method=method,
                solver=solver,
                radius_cap=radius_cap,
            )
        parts.append(certifier(x, y))
        done += len(x)
        if progress:
            rate = done / max(time.perf_counter() - start, 1e-9)
            of = f"/{total}" if total else ""
            sys.stderr.write(f"\rcertify: {done}{of} samples, {rate:.1f} samples/s")
            sys.stderr.flush()
        if limit is not None and done >= limit:
            break
    if progress and parts:
        sys.stderr.write("\n")
    if not parts:
        raise InputError("the loader yielded no samples")
    return Certificate.cat(parts)


def _length(loader) -> int | None:
    """The number of samples of a DataLoader's dataset; None for other iterables (their len()
    counts batches)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None
