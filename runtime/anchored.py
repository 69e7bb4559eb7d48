"""Anchored (per-input) curvature bounds M(x₀) through the compiled propagation (theory §7).

An anchored bound fixes one point x₀ and bounds ‖Df(x) − Df(x₀)‖ ≤ M(x₀)·‖x − x₀‖ for every x.
It needs no new propagation code: ``curvbound.compile(model, x, anchored=True)`` runs the same
rules with ``ctx.anchor`` set, and the activation rules then replace two numbers by per-sample
quantities (tensors of shape (B,) that broadcast through the generated code):

- sup|σ''| → κ(x₀) = max_j β'(u_j(x₀)) (:class:`AnchoredCurvature`), where u is the activation's
  input and β' its anchored curvature (:mod:`curvbound.runtime.tables`);
- the row-norm block quantity ‖diag(r)A‖ → ‖diag(ρ ⊙ r)A‖ with ρ = β'(u(x₀))/κ(x₀) ∈ [0, 1],
  so that κ·that = ‖diag(β' ⊙ r)A‖, the anchored layer curvature of theory §7; and the block
  norm ‖Â‖ of G σ(W·) (``passes/lipschitz_lt.py``) → ‖Â·diag(ρ)‖ (:class:`AnchoredScaledNorm`).

Why this is sound. Every curvature rule bounds D(h∘u)(x) − D(h∘u)(x₀) by splitting it as
[Dh(u(x)) − Dh(u(x₀))]·Du(x) + Dh(u(x₀))·[Du(x) − Du(x₀)]. The second part is linear in the
anchored M of the input; in the first, the only place where sup|σ''| enters is
|σ'(u_j(x)) − σ'(u_j(x₀))| ≤ sup|σ''|·|u_j(x) − u_j(x₀)|, and β'(u_j(x₀)) may replace it there:
Δ = σ'(u(x)) − σ'(u(x₀)) = diag(β')·t with |t_j| ≤ |u_j(x) − u_j(x₀)|, so ‖Δ‖_∞ ≤ κ‖t‖,
‖diag(Δ)A‖ ≤ κ‖diag(ρ⊙r)A‖·‖z(x) − z(x₀)‖ and ‖G diag(Δ) W‖ ≤ κ‖Â diag(ρ)‖·‖t‖ replace the
three global steps. Every other number (norms, Lipschitz constants) is a global bound and stays
valid. With no anchor set, the anchored quantities return their global values, so the same bound
function also gives the global bounds.

Activations without a table (SiLU, GELU, Mish, ELU...) keep their global constants: their layers
are bounded as in the global bound, which is still valid.

Example:
    >>> import torch, curvbound
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified", anchored=True)
    >>> x0 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -5.0, 5.0, -5.0]])
    >>> b = curvbound.anchored_bounds(bf, x0)
    >>> [round(v, 4) for v in b.curvature.tolist()], round(float(bf().curvature), 4)
    ([0.2918, 0.2718], 0.3175)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import sympy
import torch
from torch import Tensor, fx

from .lanczos import lambda_max_upper
from .norms import Quantity
from .operators import LinearOperator, exact_arithmetic
from .products import matrix_of, single_core
from .tables import AnchoredTable, anchored_table

__all__ = [
    "AnchorState",
    "AnchoredCurvature",
    "AnchoredScaledNorm",
    "EXACT_LIMIT",
]

_U = 2.0**-53

#: Per-sample anchored norms are computed exactly (batched eigensolver) up to this many hidden
#: units; wider layers (convolutions) use the layer-cake bound.
EXACT_LIMIT = 160


class AnchorState:
    """The anchor's captured pre-activation values, shared by the anchored quantities of one
    bound function (``compile(..., anchored=True)`` creates it; ``bf._anchor`` holds it).

    ``nodes`` are the names of the graph nodes whose values the quantities read (the inputs of
    activations with an anchored table). While :meth:`anchored` is active, ``values`` maps each
    to a float64 tensor (B, *shape); otherwise it is None and the quantities are global.
    """

    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.values: dict[str, Tensor] | None = None
        self.tables: dict[str, AnchoredTable] = {}
        self._beta: dict[str, Tensor] = {}
        self.memo: dict[int, Tensor] = {}  # per-anchor results of the quantities, by id

    # -- used by the activation rules (passes/rules/base.py) -------------------------------------
    def curvature(self, ctx, u: fx.Node, record) -> tuple[sympy.Symbol, Quantity] | None:
        """κ's symbol and quantity for the activation ``ctx.node`` = σ(u), or None (no table)."""
        table = anchored_table(record)
        if table is None:
            return None
        if u.name not in self.nodes:
            self.nodes.append(u.name)
        self.tables[u.name] = table
        return ctx.symbol("kappa"), AnchoredCurvature(self, u.name, table)

    def row_norm(
        self, ctx, u: fx.Node, record, sym: sympy.Symbol, base: Quantity, op: LinearOperator
    ) -> dict[sympy.Symbol, Quantity]:
        """The quantities replacing ``sym`` = ‖diag(r)A‖ (A = ``op``, the affine map feeding u).

        In estimate mode the base norm is kept as a quantity of its own (``rbase_<node>``) so that
        ``bf.refresh()`` advances its power iteration.
        """
        table = self.tables.get(u.name)
        if table is None or op.row_norms() is None:
            return {sym: base}
        shape = tuple(ctx.shape(u))
        m = math.prod(shape)
        gram = None
        if m <= EXACT_LIMIT and single_core(op) and m * math.prod(op.in_shape) <= 1 << 22:
            gram = lambda: _row_gram(op)  # noqa: E731
        q = AnchoredScaledNorm(
            self, u.name, table, base, lambda: _row_weights(op, shape), gram, "diag(r)A",
            tensors=op.tensors,
        )
        out: dict[sympy.Symbol, Quantity] = {sym: q}
        if not base.certified:
            out[ctx.symbol("rbase")] = base
        return out

    def hadamard(self, ctx, u: fx.Node, base: Quantity, G, W) -> Quantity:
        """The quantity replacing ‖Â‖ of the block G σ(W·) whose hidden pre-activation is u
        (``passes/lipschitz_lt.py``): per sample ‖Â·diag(ρ)‖, or ``base`` without a table."""
        table = self.tables.get(u.name)
        if table is None:
            return base
        gram = (lambda: _hadamard_gram(G, W)) if math.prod(G.in_shape) <= EXACT_LIMIT else None
        return AnchoredScaledNorm(
            self, u.name, table, base, lambda: _hadamard_weights(G, W), gram, "Â",
            tensors=lambda: [*G.tensors(), *W.tensors()],
        )

    # -- anchors ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def anchored(self, values: dict[str, Tensor]) -> Iterator[None]:
        """Within the block the anchored quantities are per sample, for these captured values."""
        missing = [n for n in self.nodes if n not in values]
        if missing:
            raise ValueError(f"anchor values missing for nodes {missing}")
        self.values, self._beta, self.memo = values, {}, {}
        try:
            yield
        finally:
            self.values, self._beta, self.memo = None, {}, {}

    def beta(self, name: str, table: AnchoredTable) -> Tensor:
        """β'(u(x₀)) of node ``name``'s values, (B, m) float64, computed once per anchor."""
        if self.values is None:
            raise RuntimeError("no anchor is set")
        if name not in self._beta:
            self._beta[name] = table(self.values[name].flatten(1))
        return self._beta[name]


class AnchoredCurvature(Quantity):
    """κ(x₀) = min(sup|σ''|, max_j β'(u_j(x₀))), shape (B,); sup|σ''| (0-dim) without an anchor.

    A proven bound (the table is sound), so ``certified`` is True.
    """

    certified = True

    def __init__(self, state: AnchorState, node: str, table: AnchoredTable):
        super().__init__()
        self.state, self.node, self.table = state, node, table
        self.register_buffer("cap", torch.tensor(table.cap, dtype=torch.float64))

    def forward(self) -> Tensor:
        if self.state.values is None:
            return self.cap
        return self.state.beta(self.node, self.table).amax(dim=1).clamp_max(self.cap)

    def extra_repr(self) -> str:
        return f"max_j β'({self.node}_j(x₀)), {self.table.kind}"


class AnchoredScaledNorm(Quantity):
    """‖X·diag(ρ)‖ per sample, shape (B,), for a fixed matrix X with one column per entry of u and
    ρ = β'(u(x₀))/κ(x₀) ∈ [0, 1]; without an anchor, the base quantity's ‖X‖.

    Two uses (module docstring): X = (diag(r)A)ᵀ, the row-norm block quantity ‖diag(ρ⊙r)A‖, and
    X = Â, the block's vectorised-Jacobian norm ‖Â·diag(ρ)‖ (theory §3 (c)). Both are
    nondecreasing in every ρ_j (‖X diag(ρ)‖² = max_{‖w‖=1} Σ_j ρ_j²(x_jᵀw)²) and at most ‖X‖.

    - **exact** (``gram`` given, m ≤ :data:`EXACT_LIMIT`): λ_max(diag(ρ)·XᵀX·diag(ρ)) for all
      samples at once by batched Lanczos, certified by a float64 Cholesky test with its rounding
      margin (:func:`~curvbound.runtime.lanczos.lambda_max_upper`; a symmetric eigensolver with
      its backward error where the test fails), plus explicit bounds on the rounding of XᵀX
      (``gram`` returns it with a bound on ‖XᵀX − Ĝ‖₂) and of the scaling. The Gram matrix is
      computed once and reused while the operators' tensors (``tensors``) are unchanged.
    - **layer cake** (any size): with v_j = ρ_j² sorted decreasingly and c_j ≥ ‖x_j‖² (``weights``),
      X diag(v) Xᵀ = ∫₀^∞ Σ_{v_j ≥ t} x_j x_jᵀ dt and ‖Σ_{j∈S} x_j x_jᵀ‖ ≤ min(‖X‖², Σ_{j∈S} c_j),
      so ‖X diag(ρ)‖² ≤ Σ_k (v_k − v_{k+1})·min(‖X‖², c_1 + … + c_k): one sort per sample.

    Certified when the base quantity is.
    """

    def __init__(
        self,
        state: AnchorState,
        node: str,
        table: AnchoredTable,
        base: Quantity,
        weights: Callable[[], Tensor],
        gram: Callable[[], tuple[Tensor, Tensor]] | None = None,
        label: str = "",
        tensors: Callable[[], list[Tensor]] | None = None,
    ):
        super().__init__()
        self.state, self.node, self.table, self.label = state, node, table, label
        self.base, self.weights, self.gram = base, weights, gram
        self.tensors = tensors  # the live tensors ``gram`` reads (None: no caching)
        self._gram_cache = None
        self._gram_frobenius = None
        self.certified = bool(base.certified)
        self.note = base.note

    def forward(self) -> Tensor:
        base = self.base()
        if self.state.values is None:
            return base
        if id(self) in self.state.memo:
            return self.state.memo[id(self)]
        b = base.detach().double()
        with torch.no_grad(), exact_arithmetic():
            beta = self.state.beta(self.node, self.table)
            kappa = beta.amax(dim=1, keepdim=True)
            rho = torch.where(kappa > 0, beta / kappa.clamp_min(1e-300), torch.zeros_like(beta))
            if self.gram is not None:
                out = self._exact(rho)
            else:
                out = self._layer_cake(rho, b)
            out = torch.minimum(out / (1 - 2 * _U), b)  # ρ's rounding (ρ̂ ≥ (1 − u)ρ)
        self.state.memo[id(self)] = out
        return out

    def _exact(self, rho: Tensor) -> Tensor:
        g, err = self._gram()
        # λ_max(DĜD) for every sample by batched Lanczos, certified by a Cholesky test of
        # τI − DĜD (eigvalsh where the test fails): runtime/lanczos.py
        lam, _ = lambda_max_upper(rho, g)
        # λ_max(DGD) ≤ λ_max(DĜD) + max(ρ)²‖G − Ĝ‖ (ρ ≤ 1); forming DĜD rounds each entry
        # twice, by at most 3u‖DĜD‖_F ≤ 3u·max(ρ)²·‖Ĝ‖_F in all
        peak = rho.amax(dim=1) ** 2 * (1 + 4 * _U)
        lam = lam + err + 3 * _U * peak * self._gram_frobenius
        return lam.sqrt() * (1 + 4 * _U)

    def _gram(self) -> tuple[Tensor, Tensor]:
        """``self.gram()``, recomputed only when one of the operators' live tensors changed
        (another object, another storage, or an in-place update: ``_version``)."""
        live = list(self.tensors()) if self.tensors is not None else []
        live = live or None  # an operator that lists no tensors is never cached
        cached = self._gram_cache
        if live is not None and cached is not None and len(cached[0]) == len(live) and all(
            t is c and t._version == v and t.data_ptr() == p
            for t, (c, v, p) in zip(live, cached[0])
        ):
            return cached[1]
        g, err = self.gram()
        self._gram_frobenius = torch.linalg.matrix_norm(g) * (1 + _gamma(g.numel() + 2))
        if live is not None:  # strong references: their storage cannot be reused meanwhile
            self._gram_cache = ([(t, t._version, t.data_ptr()) for t in live], (g, err))
        return g, err

    def _layer_cake(self, rho: Tensor, b: Tensor) -> Tensor:
        w = self.weights()
        v, order = (rho * rho).sort(dim=1, descending=True)
        c = w[order].cumsum(dim=1)
        dv = v - torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        bound = (dv * torch.minimum(c, b * b)).sum(dim=1).sqrt()
        return bound * (1 + 8 * (v.shape[1] + 8) * _U)  # the sums and the √

    def step(self, steps: int = 1) -> None:
        self.base.step(steps)

    def extra_repr(self) -> str:
        how = "exact" if self.gram is not None else "layer cake"
        return f"{self.label}·diag(ρ), ρ = β'({self.node}(x₀))/κ, {self.table.kind}, {how}"


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def _row_gram(op: LinearOperator) -> tuple[Tensor, Tensor]:
    """(Ĝ, bound on ‖G − Ĝ‖₂) for G = BBᵀ, B = diag(r)A, r ≥ the row norms of A (exact matrix)."""
    a = matrix_of(op).detach().double()
    r = a.norm(dim=1) * (1 + _gamma(a.shape[1] + 4))
    bm = r[:, None] * a
    g = bm @ bm.T
    err = _gamma(a.shape[1] + 8) * torch.linalg.matrix_norm(bm.abs() @ bm.abs().T)
    return g, err


def _row_weights(op: LinearOperator, shape: tuple[int, ...]) -> Tensor:
    """Upper bounds r_j⁴ on the squared row norms of diag(r)A (r = ``op.row_norms()``)."""
    r = op.row_norms().detach().double().expand(shape).reshape(-1)
    return (r * r * (1 + 4 * _U)) ** 2 * (1 + 4 * _U)


def _hadamard_gram(G: LinearOperator, W: LinearOperator) -> tuple[Tensor, Tensor]:
    """(Ŝ, bound on ‖S − Ŝ‖₂) for S = ÂᵀÂ = (GᵀG) ∘ (WWᵀ) (exact matrices of G and W)."""
    g, w = matrix_of(G).detach().double(), matrix_of(W).detach().double()
    a1, a2 = g.T @ g, w @ w.T
    s = a1 * a2
    e1 = _gamma(g.shape[0] + 8) * (g.abs().T @ g.abs())
    e2 = _gamma(w.shape[1] + 8) * (w.abs() @ w.abs().T)
    err = (e1 * (a2.abs() + e2) + a1.abs() * e2 + _U * s.abs()) * (1 + 1e-6)
    return s, torch.linalg.matrix_norm(err)


def _hadamard_weights(G: LinearOperator, W: LinearOperator) -> Tensor:
    """Upper bounds ‖g_l‖²‖w_l‖² on the squared column norms of Â."""
    g, w = matrix_of(G).detach().double(), matrix_of(W).detach().double()
    cg = (g * g).sum(dim=0) * (1 + _gamma(g.shape[0] + 8))
    rw = (w * w).sum(dim=1) * (1 + _gamma(w.shape[1] + 8))
    return cg * rw * (1 + 2 * _U)
