"""Run-time quantities of the tightness methods (theory §3, §4, §10).

- :class:`ProductNorm`: ‖A_i ⋯ A_j‖ for consecutive linear maps of one chain segment (LipLT). All
  products of a :class:`Segment` advance together, in **one batched power iteration**: each step is
  a single sweep of the segment's layers on a batch holding every product's iteration vector, and
  one backward pass (autograd gives Aᵀ). Certified mode materialises a product when that is cheap
  (alone, or with every product ending at the same narrow layer in one backward sweep, whose Gram
  matrices are proven by one Cholesky each), bounds two convolutions through the map between them
  (:func:`~curvbound.runtime.conv_products.middle_product_norm`) or through their composed kernel,
  and otherwise takes the best split ‖A_i⋯A_{k+1}‖·‖A_k⋯A_j‖ of certified factors.
- :class:`HadamardNorm`: ‖Â‖ for Â: v ↦ G·diag(v)·W, the vectorised-Jacobian constant of a block
  x ↦ G σ(W x + b) (theory §3 (c)): ‖Â‖² = λ_max((GᵀG) ∘ (WWᵀ)).
- :class:`CRTSensitivity`: max_j (S_I)_j of Singla & Feizi's |W|-product recursion (theory §10).

Every quantity reads the model's live parameters through the operators, like
:class:`~curvbound.runtime.norms.Norm`.

>>> W1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); W2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
>>> A1, A2 = Dense(lambda: W1, (2,), (2,)), Dense(lambda: W2, (2,), (2,))
>>> seg = Segment([A1, A2])
>>> p = seg.add(ProductNorm(seg, 1, 0, ProductChain([A1, A2]), "estimate"))
>>> p.step(20); round(float(p()), 6)
2.0
>>> round(float(HadamardNorm(A2, A1, "certified")()), 6)   # ‖Â‖ for G = W2, W = W1
2.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .certified import _frobenius_sq_upper, certify, dense_norm, eigmax_bound, rounding_factor
from .conv_products import admit, border_cost, conv_product_norm, middle_cost, middle_product_norm
from .norms import Norm, Quantity, same_values
from .operators import (
    MATERIALIZE_LIMIT,
    Chain,
    Conv,
    Dense,
    LinearOperator,
    exact_arithmetic,
    precise,
)

__all__ = [
    "PRODUCT_ENTRY_LIMIT",
    "PRODUCT_COST_LIMIT",
    "HADAMARD_HIDDEN_LIMIT",
    "HADAMARD_COST_LIMIT",
    "apply_cost",
    "matrix_of",
    "single_core",
    "ProductChain",
    "Segment",
    "ProductNorm",
    "HadamardNorm",
    "hadamard_feasible",
    "LipLTFactor",
    "liplt_step",
    "CRTSensitivity",
]

#: A product of several layers is materialised for its certified norm up to this many entries ...
PRODUCT_ENTRY_LIMIT = 1 << 22
#: ... and this many multiply-adds (otherwise: the best split into certified factors).
PRODUCT_COST_LIMIT = 2e9
#: A product of dense layers is multiplied out (float64 matmuls) up to this many multiply-adds.
PRODUCT_DENSE_LIMIT = 4e9
#: Products ending at one narrow layer (at most MATERIALIZE_LIMIT outputs) are materialised
#: together from one backward sweep (:meth:`Segment.swept_norm`) up to this many multiply-adds
#: (counted at the speed of a float64 convolution, see :data:`GEMM_SPEEDUP`) ...
SWEEP_COST_LIMIT = 3e11
#: ... and this many stored entries (float64) for all of them together.
SWEEP_ENTRY_LIMIT = 1 << 27
#: A float64 matrix product does about this many multiply-adds in the time a float64 convolution
#: does one (measured on CPU: ~48 and ~10 GMAC/s); picks the cheaper way to form a Gram matrix.
GEMM_SPEEDUP = 4.0
#: The block norm ‖Â‖ is used when the hidden width m is at most this ...
HADAMARD_HIDDEN_LIMIT = 2048
#: ... and (except for the output block) its m×m Gram matrix costs at most this many
#: multiply-adds, m²·(out + in + m).
HADAMARD_COST_LIMIT = 1 << 28

_U = 2.0**-53
#: Lanczos cycle length of the batched product iteration (see :meth:`Segment.sweep`).
LANCZOS_CYCLE = 20


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u): the relative error bound of an n-term float64 dot product."""
    return n * _U / (1 - n * _U)


def apply_cost(op: LinearOperator) -> float:
    """Multiply-adds of applying ``op`` to one sample (a rough count for cost limits)."""
    if isinstance(op, Chain):
        return float(sum(apply_cost(o) for o in op.ops))
    if op.isometric:
        return 0.0
    if isinstance(op, Dense):
        return float(_numel(op.out_shape) * (op.in_shape[-1] if op.in_shape else 1))
    if isinstance(op, Conv):
        return float(_numel(op.out_shape) * op.weight()[0].numel())
    return float(_numel(op.in_shape) + _numel(op.out_shape))


#: Gram matrices of the row sweep larger than this are bounded by
#: :func:`~curvbound.runtime.certified.eigmax_bound` (one Cholesky), smaller ones by an eigensolver.
_EIGMAX_FROM = 1024


def _gram(A: Tensor, block: int = 1024) -> Tensor:
    """A·Aᵀ from the blocks on and below the diagonal (mirrored): half the multiply-adds of a
    plain product, each entry the same kind of p-term sum."""
    n = A.shape[0]
    G = torch.empty(n, n, dtype=A.dtype)
    for i in range(0, n, block):
        rows = A[i:i + block]
        G[i:i + block, :i + block] = rows @ A[:i + block].T
        G[:i, i:i + block] = G[i:i + block, :i].T
    return G


def _swept_value(part: tuple[Tensor, Tensor], route: tuple[str, float], gamma: float,
                 abs_bound: Tensor) -> Tensor | None:
    """Certified ‖T‖ (T = A_i⋯A_k) from what the sweep computed (:meth:`Segment._sweep_rows`).

    The rows R̃ satisfy ‖T − R̃‖ ≤ e₁ = 2γ·Π‖|A|‖ (``abs_bound``; forward and adjoint sums).
    "gemm": ‖T‖ ≤ ‖R̃‖ + e₁, ‖R̃‖ from its Gram matrix. "forward": M = fl(R̃Tᵀ) = R̃Tᵀ + E₂ with
    ‖E₂‖ ≤ ‖E₂‖_F ≤ γ·Π‖|A|‖·‖R̃‖_F (each column is T applied to a row of R̃), and
    TTᵀ = sym(M) − sym(E₂) − sym(E₁Tᵀ), so σ = ‖T‖ satisfies σ² ≤ λ + e₂ + e₁σ with
    λ ≥ λ_max(sym M), hence σ ≤ e₁ + √(λ + e₂).
    """
    M, frob = part
    e1 = 2 * gamma * abs_bound
    if route[0] == "gemm":
        if min(M.shape) <= _EIGMAX_FROM:
            return dense_norm(M) + e1
        A = M if M.shape[0] <= M.shape[1] else M.T
        lam = eigmax_bound(_gram(A))
        if lam is None:
            return None
        n = A.shape[1]
        lam = lam + _gamma(n) * frob
        return certify(torch.sqrt(lam.clamp_min(0)) + e1)
    lam = eigmax_bound(M)
    if lam is None:
        return None
    e2 = gamma * abs_bound * torch.sqrt(frob)
    return certify(torch.sqrt((lam + e2).clamp_min(0)) + e1)


def single_core(op: LinearOperator) -> bool:
    """True when ``op`` has one non-isometric factor: its matrix is materialised without rounding
    (each entry is one weight entry, up to the one rounding of a folded batch-norm scale)."""
    core = op.core if isinstance(op, Chain) else ([] if op.isometric else [op])
    return len(core) == 1


def matrix_of(op: LinearOperator) -> Tensor:
    """The (n_out, n_in) matrix of ``op``, differentiable in the live parameters.

    >>> matrix_of(Dense(lambda: torch.ones(2, 3), (3,), (2,))).shape
    torch.Size([2, 3])
    """
    if isinstance(op, Dense) and len(op.in_shape) == 1 and len(op.out_shape) == 1:
        return precise(op.weight())
    dense = _flat_dense(op)
    if dense is not None:  # e.g. Dense ∘ flatten: the weight itself, no identity pushed through
        return precise(dense.weight())
    ref = op.tensors()
    dtype = ref[0].dtype if ref and ref[0].is_floating_point() else torch.float64
    dtype = precise(torch.zeros((), dtype=dtype)).dtype
    n = _numel(op.in_shape)
    eye = torch.eye(n, dtype=dtype, device=ref[0].device if ref else None)
    return op.apply(eye.reshape(n, *op.in_shape)).reshape(n, -1).T


def _flat_dense(op: LinearOperator) -> Dense | None:
    """The one dense layer of a chain whose other factors only reshape in flat order (flatten,
    view), so that its weight is the chain's matrix; else None. Decided once per chain."""
    if not isinstance(op, Chain):
        return None
    if "_flat_dense" not in op.__dict__:
        found = None
        core = op.core
        if len(core) == 1 and isinstance(core[0], Dense) and len(core[0].in_shape) == 1 \
                and len(core[0].out_shape) == 1:
            found = core[0]
            with torch.no_grad():
                for o in op.ops:
                    if o is found:
                        continue
                    if not o.isometric:
                        found = None
                        break
                    n = _numel(o.in_shape)
                    probe = torch.arange(n, dtype=torch.float64).reshape(1, *o.in_shape)
                    if not torch.equal(o.apply(probe).reshape(-1), probe.reshape(-1)):
                        found = None
                        break
        op.__dict__["_flat_dense"] = found
    return op.__dict__["_flat_dense"]


class ProductChain(Chain):
    """A product A_i⋯A_j of a segment's layers. Its certified norm is an exact float64 SVD of the
    materialised product (with a rounding bound) when that is cheap; otherwise it raises
    ``NotImplementedError`` and :class:`ProductNorm` splits it into certified factors."""

    def __init__(self, ops: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Chain) else [op])
        super().__init__(flat)

    def certified_norm(self) -> Tensor:
        if len(self.core) <= 1:
            return super().certified_norm()
        mats = self._dense_factors()
        if mats is not None:
            cost = sum(m.shape[0] * m.shape[1] for m in mats[:-1]) * mats[-1].shape[1]
            if cost <= PRODUCT_DENSE_LIMIT:
                return _dense_product_norm(mats)
        n_in, n_out = _numel(self.in_shape), _numel(self.out_shape)
        cost = 3.0 * min(n_in, n_out) * apply_cost(self)
        small = n_in * n_out <= PRODUCT_ENTRY_LIMIT and min(n_in, n_out) <= MATERIALIZE_LIMIT
        if small and cost <= PRODUCT_COST_LIMIT:
            return LinearOperator.certified_norm(self)
        if "_border_admitted" not in self.__dict__:  # decided once: the same path after updates
            cost = border_cost(self.ops)
            self._border_admitted = cost is not None and admit(cost)
        # zero-padded convolutions: the interior/border split
        structured = conv_product_norm(self.ops) if self._border_admitted else None
        if structured is not None:
            self.bound_note = (f"‖{self.describe()}‖² ≤ ‖composed conv‖² + a border term "
                               "(runtime/conv_products.py)")
            self.structured = True
            return structured
        raise NotImplementedError(
            f"the product {self.describe()} ({self.in_shape} -> {self.out_shape}) is too costly "
            "to materialise"
        )


    def _dense_factors(self) -> list[Tensor] | None:
        """The weight matrices W_i, …, W_j (output side first) when every factor is a dense layer
        and every reshape keeps the flat order (flatten), else None."""
        mats: list[Tensor] = []
        with exact_arithmetic():
            for op in self.ops:
                if op.isometric:
                    n = _numel(op.in_shape)
                    probe = torch.arange(n, dtype=torch.float64).reshape(1, *op.in_shape)
                    if not torch.equal(op.apply(probe).reshape(-1), probe.reshape(-1)):
                        return None
                    continue
                if not (isinstance(op, Dense) and len(op.in_shape) == len(op.out_shape) == 1):
                    return None
                mats.append(precise(op.weight()).detach().double())
        return mats[::-1]


def _dense_product_norm(mats: list[Tensor]) -> Tensor:
    """Certified ‖W_i⋯W_j‖ from the float64 product of the matrices (output side first): an exact
    SVD of the computed product plus the rounding bound γ_p·Π‖|W_k|‖ (Higham §3.5; p = the summed
    inner dimensions), ‖|W_k|‖ ≤ ‖W_k‖_F."""
    prod = mats[0]
    terms = 0
    for w in mats[1:]:
        terms += w.shape[0]
        prod = prod @ w
    abs_bound = math.prod(float(torch.linalg.matrix_norm(w)) for w in mats)
    return dense_norm(prod) + 2 * _gamma(terms + len(mats)) * abs_bound


class Segment:
    """A chain segment of the graph: z_0 = A_0·s + b_0, z_k = A_k·σ_{k−1}(z_{k−1}) + b_k.

    Holds the layers ``ops``, the product quantities by (i, j) (``norms``: its own and, for a
    segment forked from another, the parent's shared ones) and the batched power iteration over
    its own products. Graph bookkeeping (nodes, activation slopes) is attached by the compiler pass
    (:mod:`curvbound.passes.lipschitz_lt`).
    """

    def __init__(self, ops: Sequence[LinearOperator]):
        self.ops: list[LinearOperator] = list(ops)
        self.norms: dict[tuple[int, int], ProductNorm] = {}
        self.own: list[ProductNorm] = []
        # end layer i -> (tensor values the sweep read, {j: certified ‖A_i⋯A_j‖})
        self._swept: dict[int, tuple[list[Tensor], dict[int, Tensor]]] = {}

    def swept_norm(self, member: ProductNorm) -> Tensor | None:
        """Certified ‖A_i⋯A_j‖ for ``member`` from one backward sweep shared by the products that
        end at layer i, or None when the sweep does not apply (output wider than
        :data:`~curvbound.runtime.operators.MATERIALIZE_LIMIT`, over the limits, or a factor
        without a bound on ‖|A_k|‖).

        Seeding the n_out unit vectors at the output of A_i and running one backward pass from the
        input of A_j0 gives, at the input of every A_j (j ≥ j0), the rows of A_i⋯A_j: every
        product of the row is materialised for the cost of the longest (at most
        :data:`SWEEP_COST_LIMIT` multiply-adds, :data:`SWEEP_ENTRY_LIMIT` stored entries). Each
        value is the exact float64 norm of its matrix plus the rounding bound
        2·γ_p·Π_k‖|A_k|‖ with p = 2·Σ_k max(terms of A_k, its outputs) + 4, which covers both the
        forward and the adjoint sums. Cached by the values of the tensors the sweep read.
        """
        i, j = member.i, member.j
        if not 0 <= j <= i < len(self.ops) or self.norms.get((i, j)) is not member:
            return None
        ops = self.ops
        n_out = _numel(ops[i].out_shape)
        if n_out > MATERIALIZE_LIMIT or any(ops[k].abs_norm_bound() is None
                                            for k in range(j, i + 1)):
            return None
        with exact_arithmetic(), torch.no_grad():
            current = [t.detach() for k in range(i + 1) for t in ops[k].tensors()]
            cached = self._swept.get(i)
            if cached is not None and j in cached[1] and same_values(cached[0], current):
                return cached[1][j]
            # every product A_i⋯A_k of the row at once (LipLT asks for all of them, one at a
            # time: sweeping only the ones registered so far would repeat the sweep per product);
            # the single layer A_i has its own rules
            starts = list(range(i)) if j < i else [i]
            for j0 in starts:  # the longest run of products that fits and contains j
                if j0 > j:
                    return None
                entries = self._sweep_entries(j0, i, starts)
                if (self._sweep_cost(j0, i, starts) <= SWEEP_COST_LIMIT
                        and entries <= SWEEP_ENTRY_LIMIT):
                    break
            else:  # not even the product of j fits
                return None
            wanted = [k for k in starts if j0 <= k <= i]
            routes = {k: self._gram_route(k, i) for k in wanted}
            try:
                parts = self._sweep_rows(j0, i, wanted, routes)
            except RuntimeError:  # e.g. a user function fixed to float32: the per-product paths
                return None
            values: dict[int, Tensor] = {}
            terms, abs_bound = 0, torch.ones((), dtype=torch.float64)
            for k in range(i, j0 - 1, -1):  # products A_i⋯A_k, shortest first
                op, factor = ops[k], ops[k].abs_norm_bound()
                if factor is None:  # no rounding bound from here on (j's factors have one)
                    break
                terms += max(op.rounding_terms(), _numel(op.out_shape))
                abs_bound = abs_bound * factor.detach().double()
                if k in parts:
                    p = 2 * terms + 4
                    gamma = p * _U / (1 - p * _U)
                    value = _swept_value(parts[k], routes[k], gamma, abs_bound)
                    if value is not None:
                        values[k] = value
            self._swept[i] = ([t.clone() for t in current], values)
            return values.get(j)

    def _gram_route(self, k: int, i: int) -> tuple[str, float]:
        """How the sweep forms the Gram matrix of A_i⋯A_k, and its cost in convolution
        multiply-adds: "gemm" (the stored rows times their transpose, on the smaller side) or
        "forward" (A_i⋯A_k applied to each row: n_out columns of T·R̃ᵀ, never storing R̃)."""
        n_out, n = _numel(self.ops[i].out_shape), _numel(self.ops[k].in_shape)
        gemm = min(n, n_out) ** 2 * max(n, n_out) / GEMM_SPEEDUP
        forward = n_out * sum(apply_cost(self.ops[m]) for m in range(k, i + 1))
        m = min(n, n_out)
        eig = m**3 / 8 if m > _EIGMAX_FROM else m**3 / 3  # one Cholesky (or a dense eigensolver)
        if n > n_out and forward < gemm:
            return "forward", forward + eig
        return "gemm", gemm + eig

    def _sweep_cost(self, j0: int, i: int, starts: list[int]) -> float:
        """Convolution multiply-adds of a sweep from layer j0 to i: the backward passes and the
        Gram matrices of the norms (:meth:`_gram_route`)."""
        n_out = _numel(self.ops[i].out_shape)
        sweep = n_out * sum(apply_cost(self.ops[k]) for k in range(j0, i + 1))
        return sweep + sum(self._gram_route(k, i)[1] for k in starts if j0 <= k <= i)

    def _sweep_entries(self, j0: int, i: int, starts: list[int]) -> int:
        """float64 entries the sweep stores: the rows of "gemm" products, the n_out² Gram
        matrices of "forward" ones."""
        n_out = _numel(self.ops[i].out_shape)
        total = 0
        for k in starts:
            if j0 <= k <= i:
                route = self._gram_route(k, i)[0]
                total += n_out * (n_out if route == "forward" else _numel(self.ops[k].in_shape))
        return total

    def _sweep_rows(self, j0: int, i: int, wanted: list[int],
                    routes: dict[int, tuple[str, float]]) -> dict[int, tuple[Tensor, Tensor]]:
        """{k: (M, ‖R̃‖_F² bound)} for k in ``wanted``, in float64, from backward passes seeded
        with the unit vectors at the output of A_i (in chunks, batched over one forward pass of a
        zero input: the maps are linear), R̃ the computed (n_out, n_in_k) matrix of A_i⋯A_k. M is R̃
        itself for a "gemm" route, and fl(R̃·(A_i⋯A_k)ᵀ) (each row of R̃ pushed through the layers
        k..i, chunk by chunk) for a "forward" route."""
        ops = self.ops
        n_out = _numel(ops[i].out_shape)
        ref = [t for k in range(j0, i + 1) for t in ops[k].tensors()]
        device = ref[0].device if ref else None
        width = max(_numel(ops[k].in_shape) for k in range(j0, i + 1))
        chunk = max(1, min(n_out, (1 << 22) // max(width, 1)))
        parts: dict[int, list[Tensor]] = {k: [] for k in wanted}
        frob = {k: torch.zeros((), dtype=torch.float64) for k in wanted}
        with torch.enable_grad():  # one forward pass; the backward is batched over the seeds
            x = torch.zeros(1, *ops[j0].in_shape, dtype=torch.float64, device=device,
                            requires_grad=True)
            inputs, h = {}, x
            for k in range(j0, i + 1):
                inputs[k] = h
                h = ops[k].apply(h)
            y = h.reshape(1, n_out)
            for start in range(0, n_out, chunk):
                b = min(chunk, n_out - start)
                seed = torch.zeros(b, 1, n_out, dtype=y.dtype, device=device)
                seed[torch.arange(b), 0, torch.arange(start, start + b)] = 1
                grads = torch.autograd.grad(y, [inputs[k] for k in wanted], seed,
                                            retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
                for k, g in zip(wanted, grads):
                    if g is None:
                        g = torch.zeros(b, *ops[k].in_shape, dtype=torch.float64, device=device)
                    g = g.detach().double()
                    frob[k] = frob[k] + _frobenius_sq_upper(g)
                    if routes[k][0] == "forward":
                        with torch.no_grad():
                            out = g.reshape(b, *ops[k].in_shape)
                            for m in range(k, i + 1):
                                out = ops[m].apply(out)
                        g = out
                    parts[k].append(g.reshape(b, -1))
        return {k: (torch.cat(v), frob[k]) for k, v in parts.items()}

    def add(self, member: ProductNorm, own: bool = True) -> ProductNorm:
        """Register a product quantity (``own``: stepped by this segment's batched iteration)."""
        self.norms[(member.i, member.j)] = member
        if own:
            self.own.append(member)
        return member

    def advance(self, member: ProductNorm, steps: int) -> None:
        """Bring ``member`` ``steps`` further, batched with the other products that lag behind.

        The first request of a round (e.g. of :meth:`BoundFunction.refresh`) steps every lagging
        product that has not converged, so the later requests of the round find their product
        already advanced and cost nothing; a product whose last cycle no longer increased its
        estimate is left out until it asks itself.
        """
        member._seen += steps
        target = member._seen
        if member._done >= target:
            return
        batch = [
            m
            for m in self.own
            if not m.certified and m._done < target and (m is member or not m._converged
                                                          or member._converged)
        ]
        run = target - member._done
        self.sweep(run, batch)
        for m in batch:
            m._done += run

    def sweep(self, steps: int, members: list[ProductNorm] | None = None) -> None:
        """``steps`` applications of AᵀA to every own product, batched (restarted Lanczos).

        Each cycle of s ≤ :data:`LANCZOS_CYCLE` steps builds the Krylov basis V of B = AᵀA from
        the current vector u (full reorthogonalisation, float64), takes the top Ritz pair (θ, Vy)
        and restarts from B·Vy = θ·Vy + β_s·y_s·v_{s+1}, which the Lanczos relation gives for free
        from the cycle's last residual: one power step on the Ritz vector. So a cycle of one step
        is exactly one power-iteration step (``bf(refresh=1)`` moves every vector), and a longer
        cycle is at least as good as power iteration. ‖A u‖ never decreases: the Ritz vector's
        Rayleigh quotient is ≥ u's (u lies in the Krylov space), and a power step of a PSD B does
        not lower it (xᵀB³x/xᵀB²x ≥ xᵀBx/xᵀx by log-convexity of k ↦ xᵀBᵏx). For the nearly
        equal top singular values of random or briefly trained layers it converges in far fewer
        steps than power iteration (error ~exp(−4s√δ) per cycle of s steps instead of
        (1 − δ)^(2s), δ the gap).
        """
        live = [m for m in (self.own if members is None else members) if not m.certified]
        while live and steps > 0:
            cycle = min(steps, LANCZOS_CYCLE)
            self._lanczos(live, cycle)
            steps -= cycle

    def _gram(self, live: list[ProductNorm], xs: list[Tensor]) -> list[Tensor]:
        """AᵀA x for every live product at once: one sweep through the layers and one backward."""
        with torch.enable_grad():
            xs = [x.detach().to(m._dtype()).requires_grad_(True) for m, x in zip(live, xs)]
            outs: list[Tensor] = []
            carry: list[tuple[int, Tensor]] = []
            for layer, op in enumerate(self.ops):
                carry += [(k, xs[k]) for k, m in enumerate(live) if m.j == layer]
                if not carry:
                    continue
                y = op.apply(torch.cat([t for _, t in carry]))
                parts = y.split([t.shape[0] for _, t in carry])
                nxt = []
                for (k, _), part in zip(carry, parts):
                    if live[k].i == layer:
                        outs.append(part)
                    else:
                        nxt.append((k, part))
                carry = nxt
            # d/dx ⟨Ax, (Ax)⟩ with the second factor held fixed is AᵀAx, for every row at once
            loss = sum((y * y.detach()).sum() for y in outs)
            grads = torch.autograd.grad(loss, xs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(xs, grads)]

    @torch.no_grad()
    def _lanczos(self, live: list[ProductNorm], cycle: int) -> None:
        shapes = [m.u.shape for m in live]
        basis = [[_unit_flat(m.u)] for m in live]
        alphas: list[list[float]] = [[] for _ in live]
        betas: list[list[float]] = [[] for _ in live]
        tails: list[Tensor | None] = [None] * len(live)  # β_s·v_{s+1}, the last residual
        running = [True] * len(live)
        for _ in range(cycle):
            if not any(running):
                break
            ws = self._gram(live, [b[-1].reshape(sh) for b, sh in zip(basis, shapes)])
            for k, w in enumerate(ws):
                if not running[k]:
                    continue
                w = w.reshape(-1).double()
                if not torch.isfinite(w).all():
                    running[k] = False
                    continue
                v = basis[k]
                a = float(v[-1] @ w)
                alphas[k].append(a)
                for _ in range(2):  # full reorthogonalisation, twice is enough
                    w = w - torch.stack(v).T @ (torch.stack(v) @ w)
                b = float(w.norm())
                if b <= 1e-12 * max(abs(a), 1e-300):
                    running[k] = False  # invariant subspace: the Ritz vector is exact
                    continue
                if len(alphas[k]) == cycle:
                    running[k] = False
                    tails[k] = w
                    continue
                betas[k].append(b)
                v.append(w / b)
        for k, m in enumerate(live):
            n = len(alphas[k])
            if n == 0:
                continue
            t = torch.diag(torch.tensor(alphas[k], dtype=torch.float64))
            off = torch.tensor(betas[k][: n - 1], dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
            vals, vecs = torch.linalg.eigh(t)
            theta, y = float(vals[-1]), vecs[:, -1]
            u = torch.stack(basis[k][:n]).T @ y
            residual = 0.0
            if tails[k] is not None:  # B·(Vy) = θ·Vy + β_s·y_s·v_{s+1}: one power step for free
                residual = abs(float(y[-1])) * float(tails[k].norm())
                u = theta * u + float(y[-1]) * tails[k]
            # converged: the cycle did not raise the Rayleigh quotient (the Ritz value ≥ it) and
            # the Ritz pair's residual ‖B·Vy − θ·Vy‖ is small
            m._converged = (theta - alphas[k][0] <= 1e-10 * abs(theta)
                            and residual <= 1e-5 * abs(theta))
            norm = u.norm()
            if torch.isfinite(norm) and norm > 0:
                m.u.copy_((u / norm).reshape(m.u.shape).to(m.u.dtype))


def _unit_flat(u: Tensor) -> Tensor:
    v = u.detach().reshape(-1).double()
    return v / v.norm().clamp_min(1e-300)


class ProductNorm(Norm):
    """‖A_i⋯A_j‖ of segment layers j..i, a :class:`~curvbound.runtime.norms.Norm` whose power
    iteration is batched with the other products of its segment (see :class:`Segment`)."""

    def __init__(
        self,
        segment: Segment,
        i: int,
        j: int,
        op: LinearOperator,
        mode: str = "estimate",
        *,
        seed: int = 0,
        label: str = "",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(op, mode, seed=seed, label=label, dtype=dtype)
        self.segment, self.i, self.j = segment, i, j
        # steps requested, steps applied, and whether the last cycle left the estimate unchanged
        self._seen, self._done, self._converged = 0, 0, False
        self._final: tuple | None = None

    def step(self, steps: int = 1) -> None:
        if not self.certified:
            self.segment.advance(self, steps)

    def forward(self) -> Tensor:
        if not self.certified:
            return super().forward()
        # the final value (a minimum over several certified bounds) is cached by the values of
        # the tensors of the product's layers, which are all that any of them reads
        with exact_arithmetic(), torch.no_grad():
            current = [t.detach() for t in self.op.tensors()]
            final = self._cached(current, self._final) if self._final is not None else None
        if final is not None:
            return final
        value = self._certified_value()
        self._final = ([t.clone() for t in current], value)
        return value

    def _certified_value(self) -> Tensor:
        try:
            value = super().forward()
        except NotImplementedError:
            value = None
        if value is not None and not getattr(self.op, "structured", False):
            return value
        swept = self.segment.swept_norm(self)  # materialised with the other products of its row
        if swept is not None:
            swept = certify(swept.double())
            self.note = "materialised in one backward sweep with the products ending at its layer"
            return swept if value is None else torch.minimum(value, swept)
        if value is None and self.i == self.j + 1:
            # two convolutions through the map between them, where no structured bound exists
            # (the composed-kernel bound is within ~1.1× when it is admitted; this one costs more)
            pair = self.segment.ops[self.j:self.i + 1]
            if "_middle_admitted" not in self.__dict__:  # decided once, like the border part
                cost = middle_cost(pair)
                self._middle_admitted = cost is not None and admit(cost, "middle")
            middle = middle_product_norm(pair) if self._middle_admitted else None
            if middle is not None:
                self.note = ("two convolutions through the map between them"
                             " (runtime/conv_products.py)")
                return middle
        if value is not None:  # a structured bound: the best split into factors may still win
            try:
                return torch.minimum(value, self._best_split())
            except NotImplementedError:
                return value
        with exact_arithmetic(), torch.no_grad():
            current = [t.detach() for t in self.op.tensors()]
            value = self._cached(current)
            if value is None:
                value = self._best_split()
                self._cache = ([t.clone() for t in current], value)
                self.note = "product of certified factors (too costly to materialise)"
        return value

    def _best_split(self) -> Tensor:
        """min over k of ‖A_i⋯A_{k+1}‖·‖A_k⋯A_j‖ from certified members (recursively)."""
        norms = self.segment.norms
        memo: dict[tuple[int, int], Tensor | None] = {}

        def best(i: int, j: int) -> Tensor | None:
            if (i, j) in memo:
                return memo[(i, j)]
            memo[(i, j)] = None  # guards against re-entry
            cands: list[Tensor] = []
            m = norms.get((i, j))
            if m is not None and m is not self and m.certified:
                try:
                    cands.append(m())
                except NotImplementedError:
                    pass
            for k in range(j, i):
                a, b = best(i, k + 1), best(k, j)
                if a is not None and b is not None:
                    cands.append(a * b)
            memo[(i, j)] = min(cands, key=float) if cands else None
            return memo[(i, j)]

        out = best(self.i, self.j)
        if out is None:
            raise NotImplementedError(f"no certified factors for {self.op.describe()}")
        return out


def hadamard_feasible(G: LinearOperator, W: LinearOperator, *, final: bool = False,
                      products: bool = True) -> bool:
    """Whether ‖Â‖ of the block G σ(W·) is computed: a single-factor W and G (exact matrices) or,
    with ``products``, a G of several factors cheap to materialise (a linear map distributed over
    a merge); hidden width m ≤ :data:`HADAMARD_HIDDEN_LIMIT` and, unless ``final`` (the output
    block, which the paper's Algorithm 1 always needs), m²·(out + in + m) ≤
    :data:`HADAMARD_COST_LIMIT`."""
    m = _numel(G.in_shape)
    if m != _numel(W.out_shape) or m > HADAMARD_HIDDEN_LIMIT:
        return False
    if not single_core(W):
        return False
    if not single_core(G):
        if not products:  # method "paper": single-factor matrices only, as published
            return False
        # a product G = A_k⋯A_1 (a linear map distributed over a residual branch): materialised
        # per evaluation, with its rounding bounded through ‖|A_k|⋯|A_1|‖ in certified mode
        if G.abs_norm_bound() is None or m * apply_cost(G) > PRODUCT_COST_LIMIT:
            return False
    if max(_numel(G.out_shape), _numel(W.in_shape)) * m > PRODUCT_ENTRY_LIMIT:
        return False
    return final or m * m * (_numel(G.out_shape) + _numel(W.in_shape) + m) <= HADAMARD_COST_LIMIT


class HadamardNorm(Quantity):
    """‖Â‖ for the block x ↦ G σ(W x + b) (theory §3 (c)): Â maps v to G·diag(v)·W, its column l
    is vec(g_l w_lᵀ), so ‖Â‖² = λ_max(S) with S = (GᵀG) ∘ (WWᵀ) (m×m, m the hidden width).

    Estimate mode: √(vᵀSv) for a unit vector ``v`` (a buffer), an estimate from below whose
    gradient is that of √λ_max(S) once v is the top eigenvector. ``v`` is set to that eigenvector
    at construction and by :meth:`settle` (``bf.refresh()``), and tracks it by power iteration on
    S under :meth:`step` (``bf(refresh=k)``): no eigensolver per call. Certified mode: ‖Ŝ‖₂
    (exact float64 SVD) plus an explicit bound on the rounding of Ŝ, cached until a parameter
    changes.

    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); G = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> h = HadamardNorm(Dense(lambda: G, (2,), (2,)), Dense(lambda: W, (2,), (2,)))
    >>> round(float(h()), 6)
    2.0
    """

    #: no state that the convergence loop changes (``bf.refresh()`` settles ``v`` before it)
    static = True

    def __init__(self, G: LinearOperator, W: LinearOperator, mode: str = "estimate", label=""):
        super().__init__()
        if _numel(G.in_shape) != _numel(W.out_shape):
            raise ValueError(f"G takes {G.in_shape}, W gives {W.out_shape}: not one hidden layer")
        self.G, self.W, self.mode = G, W, mode
        self.label = label or f"Â[{G.describe()} ∘ σ ∘ {W.describe()}]"
        self.certified = mode == "certified"
        self._cache: tuple[list[Tensor], Tensor] | None = None
        if not self.certified:
            ref = G.tensors() + W.tensors()
            dtype = next((t.dtype for t in ref if t.is_floating_point()), torch.float32)
            device = ref[0].device if ref else None
            m = _numel(G.in_shape)
            self.register_buffer("v", torch.full((m,), m**-0.5, dtype=dtype, device=device))
            if not any(t.is_meta for t in ref):
                self.settle()

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(G as out×m, W as m×in) matrices of the live parameters."""
        g, w = matrix_of(self.G), matrix_of(self.W)
        return g, w.to(g.dtype)

    def gram(self) -> Tensor:
        """S = (GᵀG) ∘ (WWᵀ), differentiable in the live parameters."""
        g, w = self.matrices()
        return (g.T @ g) * (w @ w.T)

    def forward(self) -> Tensor:
        if not self.certified:
            s = self.gram()
            v = self.v.to(s.dtype)
            return (v @ (s @ v)).clamp_min(0).sqrt()
        with exact_arithmetic(), torch.no_grad():
            current = [t.detach().clone() for t in self.G.tensors() + self.W.tensors()]
            if self._cache is not None and same_values(self._cache[0], current):
                return self._cache[1]
            value = self._certified()
            self._cache = (current, value)
        return value

    @torch.no_grad()
    def step(self, steps: int = 1) -> None:
        """``steps`` power iterations v ← Sv/‖Sv‖ (tensor operations only: no host sync, so
        ``torch.compile`` captures it; a non-finite or zero step keeps v)."""
        if self.certified or steps <= 0:
            return
        s = self.gram().detach()
        v = self.v.to(s.dtype)
        for _ in range(steps):
            w = s @ v
            n = w.norm()
            ok = torch.isfinite(n) & (n > 0)
            v = torch.where(ok, w / torch.where(ok, n, torch.ones_like(n)), v)
        self.v.copy_(v.to(self.v.dtype))

    @torch.no_grad()
    def settle(self) -> None:
        """v ← the top eigenvector of S (one symmetric eigensolve, float64)."""
        if self.certified:
            return
        s = self.gram().detach().double()
        if not bool(torch.isfinite(s).all()):
            return
        _, vecs = torch.linalg.eigh(s)
        self.v.copy_(vecs[:, -1].to(self.v.dtype))

    def _certified(self) -> Tensor:
        g, w = (t.detach().double() for t in self.matrices())
        # G of several factors is materialised with rounding: Ĝ = G + Δ, ‖Δ‖₂ ≤ 2γ_p‖|A_k|⋯|A_1|‖
        # (as in operators._materialized_norm), and ‖Â_G‖ ≤ ‖Â_Ĝ‖ + ‖Δ‖₂·max_j‖w_j‖ because
        # ‖Δ diag(v) W‖_F ≤ ‖Δ‖₂‖diag(v)W‖_F ≤ ‖Δ‖₂·max_j‖w_j‖ for a unit v.
        slack = 0.0
        if not single_core(self.G):
            p = 2 * self.G.rounding_terms() + 4
            delta = 2 * _gamma(p) * float(self.G.abs_norm_bound())
            slack = delta * float(w.norm(dim=1).max()) * (1 + 1e-6)
        a1, a2 = g.T @ g, w @ w.T
        s = a1 * a2
        # |Â1 − GᵀG| ≤ γ|G|ᵀ|G|, |Â2 − WWᵀ| ≤ γ|W||W|ᵀ (dot products; +8 covers the entries' own
        # rounding when a batch-norm scale was folded in), then the Hadamard product rounds once.
        e1 = _gamma(g.shape[0] + 8) * (g.abs().T @ g.abs())
        e2 = _gamma(w.shape[1] + 8) * (w.abs() @ w.abs().T)
        err = (e1 * (a2.abs() + e2) + a1.abs() * e2 + _U * s.abs()) * (1 + 1e-6)
        lam = dense_norm(s) + torch.linalg.matrix_norm(err)  # λ_max(S) ≤ ‖Ŝ‖₂ + ‖S − Ŝ‖_F
        return certify((torch.sqrt(lam) + slack) * (1 + 4 * _U))

    def extra_repr(self) -> str:
        return f"{self.label}, mode={self.mode}"


def liplt_step(i: int, acts, mu: list, product) -> Any:
    """μ_i from μ_0..μ_{i−1}, ``acts[k]`` = (|c_k|, d_k, …) and ``product((i, j))`` = ‖A_i⋯A_j‖
    (tensors of any shape broadcast: the pairwise margins use vectors)."""
    if i == 0:
        return product((0, 0))
    total, coef = None, 1.0
    for jj in range(i):
        k = i - 1 - jj  # ψ_k(z_k) mapped through A_i⋯A_{k+1}
        c, d = acts[k][0], acts[k][1]
        if d != 0:
            term = coef * d * product((i, k + 1)) * mu[k]
            total = term if total is None else total + term
        coef *= c
        if coef == 0:
            return total
    term = coef * product((i, 0))
    return term if total is None else total + term


class LipLTFactor(Quantity):
    """μ_n: the LipLT bound of node n of a chain segment per unit Lipschitz constant of the
    segment's start s (theory §4), so that L(z_n) ≤ μ_n·L_s. With σ_k = c_k·id + ψ_k
    (ψ_k d_k-Lipschitz),

        μ_0 = ‖A_0‖,  μ_i = Σ_{j<i} (Π_{l=i−j}^{i−1}|c_l|)·d_{i−j−1}·‖A_i⋯A_{i−j}‖·μ_{i−j−1}
                          + (Π_{l<i}|c_l|)·‖A_i⋯A_0‖.

    A numeric quantity rather than a symbolic expression because the recursion, written out as a
    formula, grows exponentially with the depth. ``products`` maps (i, j) to the norm quantities
    of A_i⋯A_j (owned by the bound function, not by this module); ``acts`` holds (|c_k|, d_k,
    sup|σ_k'|) rounded up. With ``keep_product`` every step also takes the minimum with the
    product bound ‖A_i‖·sup|σ'_{i−1}|·μ_{i−1} (both are valid). Certified when every product is:
    computed in float64 from the certified values, times a factor covering its rounding (all
    terms are nonnegative).

    >>> from curvbound.runtime.norms import Constant
    >>> one, half = Constant(1.0), Constant(0.5)
    >>> mu = LipLTFactor(1, [(0.5, 0.5, 1.0)], {(0, 0): one, (1, 1): one, (1, 0): half})
    >>> round(float(mu()), 9)  # ½·‖A_1‖·μ_0 + ½·‖A_1A_0‖
    0.75
    """

    def __init__(self, n: int, acts: Sequence[tuple[float, float, float]],
                 products: dict[tuple[int, int], Quantity], *, keep_product: bool = False,
                 label: str = ""):
        super().__init__()
        self.n, self.acts, self.label = n, [tuple(a) for a in acts], label
        self.keep_product = keep_product
        object.__setattr__(self, "_products", dict(products))  # not submodules: no duplicates
        self.certified = all(q.certified for q in products.values())
        missing = [q.note for q in products.values() if q.note]
        self.note = "; ".join(missing)

    def values(self) -> list[Tensor]:
        """μ_0, …, μ_n."""
        p = {key: q() for key, q in self._products.items()}
        mu: list[Tensor] = []
        for i in range(self.n + 1):
            total = liplt_step(i, self.acts, mu, lambda key: p[key])
            if self.keep_product and i > 0:  # the product bound ‖A_i‖·sup|σ'|·μ_{i−1}
                total = torch.minimum(total, p[(i, i)] * self.acts[i - 1][2] * mu[i - 1])
            mu.append(total)
        return mu

    def forward(self) -> Tensor:
        if not self.certified:
            return self.values()[-1]
        with torch.no_grad():
            value = self.values()[-1].double()
        return value * rounding_factor(8.0 * (self.n + 1) ** 2)

    def extra_repr(self) -> str:
        return f"{self.label}, n={self.n}, certified={self.certified}"


class CRTSensitivity(Quantity):
    """max_j of Singla & Feizi's S_I without its slope factors (theory §10), for the worst unit c.

    ``ops`` are the weight layers W_{I+1}, …, W_L of an MLP (matrices via :func:`matrix_of`). With
    S_{L−1} = (‖W_L e_k‖)_k, the column norms (≥ |cᵀW_L| entrywise for every unit c), and
    S_I = S_{I+1}·|W_{I+1}|, the value is max_j (S_I)_j; the expression multiplies it by
    g^{L−1−I}. Computed exactly in float64 (nonnegative sums, rounded up in certified mode).

    >>> W = torch.tensor([[3.0, -4.0]])
    >>> float(CRTSensitivity([Dense(lambda: W, (2,), (1,))])())
    4.0
    """

    static = True  # no iteration state

    def __init__(self, ops: Sequence[LinearOperator], mode: str = "estimate", label: str = ""):
        super().__init__()
        self.ops, self.mode, self.label = list(ops), mode, label
        self.certified = mode == "certified"

    def vectors(self, top: Tensor | None = None) -> Tensor:
        """S_I for the rows of ``top`` (P×m_{L−1} values of |cᵀW_L|; default: column norms)."""
        mats = [matrix_of(op) for op in self.ops]
        s = mats[-1].norm(dim=0, keepdim=True) if top is None else top
        for w in reversed(mats[:-1]):
            s = s @ w.abs().to(s.dtype)
        return s

    def forward(self) -> Tensor:
        if not self.certified:
            return self.vectors().max()
        with exact_arithmetic(), torch.no_grad():
            value = self.vectors().double().max()
            terms = sum(_numel(op.in_shape) + 2 for op in self.ops)
        return certify(value * (1 + 2 * _gamma(terms)))

    def extra_repr(self) -> str:
        return f"{self.label}, mode={self.mode}"
