"""Branching networks (issue 13): coordinate selections, exact per-position conv row norms, the
general block h = Hz + Gσ(Wz + b) and linear maps distributed over merges, each checked against
an independent computation (dense matrices, SVDs, brute-force formulas, empirical lower bounds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvbound
from curvbound import pipeline
from curvbound.apps.empirical import Margin, curvature_lower_bound, hessian_lower_bound
from curvbound.passes.lipschitz_lt import refine_affine
from curvbound.runtime.operators import (
    Chain,
    Conv,
    Dense,
    LinearSum,
    Select,
    _materialize,
    exact_arithmetic,
)
from curvbound.runtime.products import HadamardNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rule_specs import Branches  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    """float64 throughout this module (restored afterwards: other modules use the default)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _matrix(op) -> torch.Tensor:
    with exact_arithmetic():
        return _materialize(op, torch.float64)


def _sigma1(a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a, ord=2))


@pytest.mark.parametrize("fn, shape", [
    (lambda x: x[:, 1:4], (6,)),
    (lambda x: x[:, ::2], (7,)),
    (lambda x: x[:, :, 1:, ::3], (2, 4, 5)),
    (lambda x: torch.cat([x, torch.zeros_like(x)], 1), (3,)),
    (lambda x: torch.cat([x, x], 1), (3,)),
    (lambda x: torch.stack([torch.zeros_like(x), x], 1), (2, 3)),
])
def test_select_is_the_coordinate_map_and_its_norm_is_exact(fn, shape):
    s = Select.of(fn, shape)
    x = torch.randn(5, *shape)
    assert torch.equal(s.apply(x), fn(x))
    a = _matrix(s)
    assert float(s.certified_norm()) == pytest.approx(_sigma1(a), rel=1e-12)
    assert torch.equal(s.row_norms().reshape(-1), a.norm(dim=1))


def test_select_folds_into_dense_layers_exactly():
    w1, w2 = torch.randn(8, 3), torch.randn(4, 5)
    first = Dense(lambda: w1, (3,), (8,))
    sl = Select.of(lambda x: x[:, 2:7], (8,))
    second = Dense(lambda: w2, (5,), (4,))
    rows = Chain.of([first, sl])  # a slice after a dense layer: its rows
    cols = Chain.of([sl, second])  # a slice before one: its columns, zeros elsewhere
    assert isinstance(rows, Dense) and isinstance(cols, Dense)
    assert torch.equal(rows.weight(), w1[2:7])
    expected = torch.zeros(4, 8)
    expected[:, 2:7] = w2
    assert torch.equal(cols.weight(), expected)
    both = Chain.of([first, sl, second])
    assert torch.allclose(_matrix(both), w2 @ w1[2:7], atol=1e-12)
    # a slot that reads an entry twice is not folded (its columns would be sums)
    twice = Select.of(lambda x: torch.cat([x, x], 1), (3,))
    assert not twice.injective
    assert not isinstance(Chain.of([twice, Dense(lambda: torch.randn(2, 6), (6,), (2,))]), Dense)


@pytest.mark.parametrize("cfg", [
    dict(in_shape=(2, 5, 6), w=(3, 2, 3, 3), stride=1, padding=1, dilation=1, groups=1),
    dict(in_shape=(2, 7, 6), w=(3, 2, 4, 4), stride=2, padding=1, dilation=1, groups=1),
    dict(in_shape=(4, 6), w=(4, 2, 3), stride=2, padding=2, dilation=2, groups=2),
    dict(in_shape=(1, 2, 2), w=(3, 1, 3, 3), stride=1, padding=1, dilation=1, groups=1),
])
def test_conv_position_row_norms_are_the_rows_of_the_matrix(cfg):
    w = torch.randn(*cfg.pop("w"))
    in_shape = cfg.pop("in_shape")
    conv = nn.Conv2d if len(in_shape) == 3 else nn.Conv1d
    out_shape = tuple(getattr(torch.nn.functional, conv.__name__.lower())(
        torch.zeros(1, *in_shape), w, None, **cfg).shape[1:])
    op = Conv(lambda: w, in_shape, out_shape, **cfg)
    a = _matrix(op)
    rows = a.norm(dim=1).reshape(out_shape)
    assert torch.allclose(op.position_row_norms(), rows, rtol=1e-12, atol=1e-14)
    assert bool((op.row_norms() >= rows * (1 - 1e-12)).all())  # the per-channel bound
    scaled = _matrix(op.row_scaled())
    assert torch.allclose(scaled, rows.reshape(-1, 1) * a, rtol=1e-12, atol=1e-14)
    cert = float(op.row_scaled().certified_norm())
    assert cert >= _sigma1(rows.reshape(-1, 1) * a) * (1 - 1e-12)


def test_linear_sum_norm_is_certified_above_the_exact_value():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 4, generator=g)
    H = Dense(lambda: h, (4,), (4,))
    W = torch.randn(6, 4, generator=g)
    G = torch.randn(4, 6, generator=g)
    GW = Chain([Dense(lambda: W, (4,), (6,)), Dense(lambda: G, (6,), (4,))])
    s = LinearSum([(1.0, H), (0.5, GW)])
    exact = _sigma1(h + 0.5 * G @ W)
    assert float(s.certified_norm()) >= exact
    assert float(s.certified_norm()) <= exact * (1 + 1e-8)
    assert torch.allclose(_matrix(s), h + 0.5 * G @ W, atol=1e-12)


def test_hadamard_norm_of_a_product_G_is_certified():
    g = torch.Generator().manual_seed(5)
    A, G0, W = (torch.randn(*s, generator=g) for s in ((3, 4), (4, 7), (7, 5)))
    G = Chain([Dense(lambda: G0, (7,), (4,)), Dense(lambda: A, (4,), (3,))])
    Gm = A @ G0
    exact = float(torch.linalg.eigvalsh((Gm.T @ Gm) * (W @ W.T))[-1].sqrt())
    Wop = Dense(lambda: W, (5,), (7,))
    cert = float(HadamardNorm(G, Wop, "certified")())
    est = float(HadamardNorm(G, Wop, "estimate")())
    assert cert >= exact and cert <= exact * (1 + 1e-8)
    assert est == pytest.approx(exact, rel=1e-9)
    # and it is the norm of v ↦ G diag(v) W, by brute force over the unit sphere
    v = torch.randn(20000, 7, generator=g)
    v = v / v.norm(dim=1, keepdim=True)
    brute = torch.linalg.matrix_norm(Gm * v[:, None, :] @ W, ord="fro").max()
    assert float(brute) <= exact * (1 + 1e-12)


def _bounds(model, shape, norms, refiners=None, monkeypatch=None):
    if refiners is not None:
        monkeypatch.setattr(pipeline, "REFINERS", refiners)
    x = torch.zeros(1, *shape)
    b = curvbound.compile(model, x, norms=norms)()
    return float(b.lipschitz.detach()), float(b.curvature.detach())


KINDS = [("residual", (3,)), ("residual_sigma", (3,)), ("concat", (3,)),
         ("self_concat", (3,)), ("slice", (3,)), ("conv_residual", (2, 3, 3))]


@pytest.mark.parametrize("kind, shape", KINDS)
@pytest.mark.parametrize("norms", ["estimate", "certified"])
def test_distribution_and_general_block_never_loosen_and_stay_sound(kind, shape, norms,
                                                                   monkeypatch):
    model = Branches(kind).eval()
    new = _bounds(model, shape, norms)
    with monkeypatch.context() as mp:
        old = _bounds(model, shape, norms, (refine_affine,), mp)
    assert new[0] <= old[0] * (1 + 1e-9) and new[1] <= old[1] * (1 + 1e-9)
    lower = max(curvature_lower_bound(model, shape, samples=32, steps=60, scale=s, seed=1)
                for s in (0.5, 2.0))
    assert new[1] >= lower * (1 - 1e-9)
    if kind in ("residual", "concat", "self_concat", "conv_residual"):
        assert new[1] < 0.9 * old[1]  # the pass matters on these


def test_general_block_lipschitz_matches_the_formula():
    # h = x + G tanh(W x), tanh' ∈ [0, 1]: L_h ≤ ‖I + ½GW‖ + ½‖G‖‖W‖ (theory §3-4)
    torch.manual_seed(0)
    W, G = nn.Linear(3, 6), nn.Linear(6, 3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.G = W, G

        def forward(self, x):
            return x + self.G(torch.tanh(self.W(x)))

    bf = curvbound.compile(Block().double().eval(), torch.zeros(1, 3), norms="certified")
    w, g = W.weight.detach().double(), G.weight.detach().double()
    formula = _sigma1(torch.eye(3) + 0.5 * g @ w) + 0.5 * _sigma1(g) * _sigma1(w)
    separate = 1 + 0.5 * _sigma1(g @ w) + 0.5 * _sigma1(g) * _sigma1(w)
    L = float(bf().lipschitz)
    assert L <= formula * (1 + 1e-8)
    assert L >= min(formula, separate) * (1 - 1e-8)


def test_margins_of_a_distributed_output_are_sound():
    model = Branches("residual").eval()
    bf = curvbound.compile(model, torch.zeros(1, 3), norms="certified")
    m = bf.margins()
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            low = hessian_lower_bound(Margin(model, i, j), (3,), samples=32, steps=60, scale=2.0)
            assert float(m.curvature[i, j]) >= low * (1 - 1e-9)
            assert float(m.curvature[i, j]) <= 2 ** 0.5 * float(bf().curvature) * (1 + 1e-9)


def test_large_feature_maps_keep_the_per_channel_row_norms():
    w = torch.randn(3, 2, 3, 3)
    big = Conv(lambda: w, (2, 32, 32), (3, 32, 32), stride=1, padding=1, dilation=1, groups=1)
    small = Conv(lambda: w, (2, 4, 4), (3, 4, 4), stride=1, padding=1, dilation=1, groups=1)
    assert isinstance(big.row_scaled(), Conv)  # 12 % border rows: one convolution, as before
    assert not isinstance(small.row_scaled(), Conv)  # 75 %: the exact rows


@pytest.mark.parametrize("layers, in_shape", [
    ([(3, 4, 3, 1, 1), (4, 5, 4, 2, 1)], (3, 9, 8)),
    ([(2, 3, 3, 1, 1), (3, 3, 3, 1, 1), (3, 2, 3, 2, 1)], (2, 7, 7)),
    ([(1, 3, 3, 1, 1), (3, 2, 5, 1, 2)], (1, 11)),
])
def test_conv_product_bound_is_certified_and_near_the_norm(layers, in_shape):
    """The conv-product bound (the smaller of its split and Weyl forms) ≥ the exact norm of the
    zero-padded product (an SVD of its materialised matrix), and T = T' on interior columns."""
    from curvbound.runtime.conv_products import composed_kernel, conv_product_norm, interior_mask

    g = torch.Generator().manual_seed(len(layers))
    ops, shape = [], in_shape
    dims = len(in_shape) - 1
    fn = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv1d
    for c_in, c_out, k, s, p in layers:
        w = torch.randn(c_out, c_in, *([k] * dims), generator=g)
        out = tuple(fn(torch.zeros(1, *shape), w, None, s, p).shape[1:])
        ops.append(Conv(lambda w=w: w, shape, out, stride=s, padding=p, dilation=1, groups=1))
        shape = out
    chain = Chain(ops)
    exact = _sigma1(_matrix(chain))
    bound = float(conv_product_norm(ops))
    assert bound >= exact
    assert bound <= 1.6 * exact
    # and no looser than √(‖T'‖² + λ_max(TTᵀ − T'T'ᵀ)), T' the composed convolution (a Weyl
    # bound on the dense matrices; ‖T'‖ by the certified per-frequency norm it uses)
    from curvbound.runtime.certified import conv_norm

    K, stride, pad = composed_kernel(ops)
    n = _matrix(chain).shape[1]
    eye = torch.eye(n).reshape(n, *in_shape)
    T = chain.apply(eye).reshape(n, -1).T
    Tp = fn(eye, K, None, stride, pad).reshape(n, -1).T
    lam = float(torch.linalg.eigvalsh(T @ T.T - Tp @ Tp.T)[-1])
    a = float(conv_norm(K, in_shape, stride=stride, padding=pad, dilation=1, groups=1))
    assert exact**2 <= _sigma1(Tp) ** 2 + lam + 1e-9  # the inequality the bound rests on
    assert bound <= (a * a + max(lam, 0.0)) ** 0.5 * (1 + 1e-6) + 1e-9
    K, stride, pad = composed_kernel(ops)
    inner = interior_mask(ops)
    x = torch.randn(4, *in_shape, generator=g) * inner
    assert torch.allclose(chain.apply(x), fn(x, K, None, stride, pad), atol=1e-10)
    assert not torch.allclose(chain.apply(torch.ones(1, *in_shape)),
                              fn(torch.ones(1, *in_shape), K, None, stride, pad))


@pytest.mark.parametrize("m, k, kind", [(12, 3, "random"), (40, 9, "random"), (9, 9, "random"),
                                        (30, 6, "dominated"), (25, 5, "zero")])
def test_gram_difference_bound_is_certified_and_tight(m, k, kind):
    """λ_max(XXᵀ − YYᵀ) from the 2k×2k Gram matrix with an inertia proof ≥ the exact value (the
    eigenvalues of the m×m matrix) and within 1e-6 of it; a candidate below it is refused."""
    from curvbound.runtime.conv_products import _inertia_certifies, gram_difference_bound

    g = torch.Generator().manual_seed(m * k)
    Y = torch.randn(m, k, generator=g)
    X = {"random": torch.randn(m, k, generator=g), "dominated": 0.5 * Y,
         "zero": torch.zeros(m, k)}[kind]
    exact = float(torch.linalg.eigvalsh(X @ X.T - Y @ Y.T)[-1])
    bound = float(gram_difference_bound(X, Y))
    scale = float((torch.cat([X, Y], 1) ** 2).sum())
    assert bound >= exact
    assert bound <= exact + 1e-6 * scale
    if exact > 1e-6 * scale:  # the proof itself: refused just below the value, accepted above
        Z = torch.cat([X, Y], 1)
        G = Z.T @ Z
        assert not _inertia_certifies(G, k, 0.99 * exact, 1e-14)
        assert _inertia_certifies(G, k, 1.01 * exact, 1e-14)


@pytest.mark.parametrize("speedup, eigmax_from", [(None, None), (1e-9, 0), (1e9, 0)])
def test_products_ending_at_a_narrow_layer_are_materialised_in_one_sweep(monkeypatch, speedup,
                                                                          eigmax_from):
    """With the per-product paths switched off, every LipLT product of a conv-conv-linear chain is
    certified from the shared backward sweep: equal to the exact norm of its own materialised
    matrix (to the rounding margins), labelled, and recomputed when a weight changes in place;
    also with the Gram matrices formed by pushing the rows forward (a tiny GEMM_SPEEDUP) or all
    by matrix products, and bounded by one Cholesky (eigmax_bound) instead of an eigensolver."""
    from curvbound.runtime import conv_products, products

    if speedup is not None:
        monkeypatch.setattr(products, "GEMM_SPEEDUP", speedup)
        monkeypatch.setattr(products, "_EIGMAX_FROM", eigmax_from)
        routes = []
        orig = products.Segment._gram_route

        def spy(self, k, i):
            out = orig(self, k, i)
            routes.append(out[0])
            return out

        monkeypatch.setattr(products.Segment, "_gram_route", spy)
    monkeypatch.setattr(products, "PRODUCT_COST_LIMIT", 0.0)
    monkeypatch.setattr(products, "PRODUCT_DENSE_LIMIT", 0.0)
    monkeypatch.setattr(conv_products, "BORDER_COLUMNS_LIMIT", 0)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(4, 4, 4, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 8), nn.Tanh(), nn.Linear(8, 3))
    bf = curvbound.compile(model, torch.zeros(1, 2, 6, 6), norms="certified")

    def check():
        swept = 0
        for q in bf.quantities.values():
            if not isinstance(q, products.ProductNorm) or q.i == q.j:
                continue
            value = float(q())
            exact = _sigma1(_matrix(q.op))
            assert value >= exact
            if "backward sweep" in getattr(q, "note", ""):
                swept += 1
                assert value <= exact * (1 + 1e-6) + 1e-9
        return swept

    assert check() >= 3
    with torch.no_grad():
        model[2].weight.mul_(1.5)  # in place: the sweep's cache must notice
    assert check() >= 3
    if speedup is not None:  # the route the parameters ask for was taken
        assert ("forward" in routes) == (speedup < 1)


@pytest.mark.parametrize("kind", ["psd", "indefinite", "clustered", "negative", "tiny"])
def test_eigmax_bound_is_proven_above_the_top_eigenvalue(kind):
    """eigmax_bound ≥ λ_max (float64 eigvalsh) and within 1e-4 of the spectrum's scale, for a
    Wishart matrix, an indefinite one, a top cluster 1e-9 apart, a negative definite one and one
    scaled to 1e-200; its gradient is that of λ_max (vvᵀ for a simple top eigenvalue)."""
    from curvbound.runtime.certified import eigmax_bound

    g = torch.Generator().manual_seed(7)
    n = 1200
    if kind == "clustered":
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        w = torch.linspace(0, 1, n, dtype=torch.float64)
        w[-4:] = 1 - torch.arange(4, dtype=torch.float64) * 1e-9
        S = (Q * w) @ Q.T
    else:
        A = torch.randn(n, n + 5, generator=g, dtype=torch.float64) / n**0.5
        S = {"psd": A @ A.T, "indefinite": (A[:, :n] + A[:, :n].T) / 2,
             "negative": -(A @ A.T), "tiny": 1e-200 * (A @ A.T)}[kind]
    S = (S + S.T) / 2
    exact = float(torch.linalg.eigvalsh(S)[-1])
    scale = float(S.abs().max())
    bound = float(eigmax_bound(S))
    assert bound >= exact
    assert bound <= exact + 1e-4 * scale
    assert eigmax_bound(torch.full((3, 3), float("nan"))) is None
    if kind == "psd":
        H = S.clone().requires_grad_(True)
        eigmax_bound(H).backward()
        v = torch.linalg.eigh(S)[1][:, -1]
        assert torch.allclose(H.grad, torch.outer(v, v), atol=1e-5)


@pytest.mark.parametrize("a, b", [
    ((2, 3, 4, 2, 1, (12, 12), 1), (3, 4, 3, 1, 1, 1)),   # stride 2 then 3×3
    ((2, 3, 3, 1, 1, (6, 6), 1), (3, 2, 5, 1, 2, 1)),     # more middle entries than inputs
    ((3, 2, 3, 1, 1, (10,), 1), (2, 3, 3, 2, 0, 1)),      # 1-D, strided second factor
    ((2, 2, 3, 1, 0, (5, 7), 1), (2, 3, 3, 1, 1, 2)),     # valid conv, dilated second factor
    ((2, 2, 3, 1, 1, (3, 4), 1), (2, 2, 5, 1, 2, 1)),     # map smaller than the probe period
])
def test_two_convolutions_through_the_middle_map(a, b):
    """The probed Gram matrices CCᵀ and BᵀB equal the dense ones, and middle_product_norm ≥ the
    exact norm of the zero-padded product (SVD of its matrix) and within 1e-6 of it; circular
    padding is not covered."""
    from curvbound.runtime import conv_products as cp

    g = torch.Generator().manual_seed(sum(a[:3]) + sum(b[:3]))

    def conv(c_in, c_out, k, s, p, shape, d, mode="zeros"):
        w = torch.randn(c_out, c_in, *([k] * len(shape)), generator=g, dtype=torch.float64)
        fn = torch.nn.functional.conv2d if len(shape) == 2 else torch.nn.functional.conv1d
        out = tuple(fn(torch.zeros(1, c_in, *shape, dtype=torch.float64), w, None, s, p,
                       d).shape[1:])
        return Conv(lambda w=w: w, (c_in, *shape), out, stride=s, padding=p, dilation=d,
                    groups=1, padding_mode=mode)

    C = conv(*a)
    B = conv(*b[:5], tuple(C.out_shape[1:]), b[5])
    for side, op in (("out", C), ("in", B)):
        M = _matrix(op)
        ref = M @ M.T if side == "out" else M.T @ M
        got = cp._probed_gram(op, side, cp._coupling_radius(op, side))
        assert torch.allclose(got, ref.to(got.dtype), atol=1e-12 * float(ref.abs().max()))
    exact = _sigma1(_matrix(Chain([C, B])))
    bound = float(cp.middle_product_norm([C, B]))
    assert exact <= bound <= exact * (1 + 1e-6)
    wrap = conv(*a[:6], a[6], mode="circular")
    assert cp.middle_product_norm([wrap, conv(*b[:5], tuple(wrap.out_shape[1:]), b[5])]) is None


def test_banded_cholesky_matches_the_dense_factor():
    """The block-banded Cholesky equals LAPACK's on a banded positive definite matrix (and keeps
    its band), and reports a failed pivot on an indefinite one."""
    from curvbound.runtime.conv_products import _banded_cholesky

    g = torch.Generator().manual_seed(0)
    n, block, band = 60, 8, 2
    idx = torch.arange(n) // block
    gap = idx[:, None] - idx[None, :]
    mask = (gap.abs() <= band) & (gap >= 0)  # the lower band
    M = torch.randn(n, n, generator=g, dtype=torch.float64) * ((gap >= 0) & (gap <= 1))
    M = M + 5 * torch.eye(n, dtype=torch.float64)
    S = M @ M.T  # block bandwidth 2
    L, info = _banded_cholesky(S, block, band)
    assert int(info) == 0
    assert torch.allclose(L, torch.linalg.cholesky(S), atol=1e-10)
    assert not L[~mask].any()
    top = float(torch.linalg.eigvalsh(S)[-1])
    shifted = S - (top / 2) * torch.eye(n, dtype=torch.float64)
    assert int(_banded_cholesky(shifted, block, band)[1]) != 0


def test_border_budget_admits_in_order_and_the_decision_sticks(monkeypatch):
    """Over the free limits a product's border part draws on the compile's budget: refused when
    it does not fit (the caller falls back), and the refusal sticks to the product afterwards."""
    from curvbound.runtime import conv_products
    from curvbound.runtime.products import ProductChain

    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    ops = [Conv(lambda: w1, (3, 7, 7), (4, 7, 7), stride=1, padding=1, dilation=1, groups=1),
           Conv(lambda: w2, (4, 7, 7), (5, 7, 7), stride=1, padding=1, dilation=1, groups=1)]
    from curvbound.runtime import products

    monkeypatch.setattr(products, "PRODUCT_COST_LIMIT", 0.0)  # not materialised as a whole
    monkeypatch.setattr(conv_products, "BORDER_FREE_COLUMNS", 0)
    cost = conv_products.border_cost(ops)
    assert cost > 0
    exact = _sigma1(_matrix(Chain(ops)))
    with exact_arithmetic():
        refused = ProductChain(ops)
        with conv_products.border_budget(cost / 2):
            with pytest.raises(NotImplementedError):
                refused.certified_norm()
        with pytest.raises(NotImplementedError):  # still refused outside the budget
            refused.certified_norm()
        admitted = ProductChain(ops)
        with conv_products.border_budget(cost * 1.5):
            assert float(admitted.certified_norm()) >= exact
            assert not conv_products.admit(cost)  # what is left is too little for another
        assert float(admitted.certified_norm()) >= exact


def test_middle_map_pair_draws_on_its_own_budget(monkeypatch):
    """In a compiled network a pair of convolutions without a composed-kernel bound is certified
    through its middle map when the middle budget admits it (and then within 1e-6 of the exact
    norm), and falls back to certified factors when it does not."""
    from curvbound.runtime import conv_products, products

    monkeypatch.setattr(conv_products, "BORDER_COLUMNS_LIMIT", 0)
    monkeypatch.setattr(products, "PRODUCT_COST_LIMIT", 0.0)
    monkeypatch.setattr(products, "SWEEP_COST_LIMIT", 0.0)
    monkeypatch.setattr(conv_products, "MIDDLE_FREE", 0)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 4, stride=2, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    x = torch.zeros(1, 2, 12, 12)

    def pair(budget):
        monkeypatch.setattr(conv_products, "MIDDLE_BUDGET", budget)
        bf = curvbound.compile(model, x, norms="certified")
        (q,) = [q for q in bf.quantities.values()
                if isinstance(q, products.ProductNorm) and q.i == q.j + 1
                and all(isinstance(o, Conv) for o in q.op.ops)]
        return float(q()), getattr(q, "note", ""), _sigma1(_matrix(q.op))

    value, note, exact = pair(1e15)
    assert "map between them" in note
    assert exact <= value <= exact * (1 + 1e-6)
    value, note, exact = pair(0.0)
    assert "map between them" not in note
    assert value >= exact
