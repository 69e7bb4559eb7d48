"""Certified norms (runtime/certified.py) against independent checks.

Every bound is compared with the exact float64 norm of the materialised operator (numpy's SVD) or,
for the realistic 6C2F layers, with a converged power-iteration estimate from below.
"""

from __future__ import annotations

import doctest
import functools
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from curvbound.runtime import certified
from curvbound.runtime.certified import (
    ABSOLUTE_MARGIN,
    SAFETY_MARGIN,
    adaptive_avg_pool_norm,
    certify,
    conv_norm,
    conv_transpose_norm,
    dense_norm,
    diagonal_norm,
    gram_iteration_norm,
    matrix_of,
    pooling_norm,
)

# deterministic, and no example database written into the working tree
HYP = settings(max_examples=120, deadline=None, derandomize=True, database=None)
CONV = {1: F.conv1d, 2: F.conv2d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d}
ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def exact_norm(fn, input_shape) -> float:
    """Spectral norm of a linear map: materialised, then a real float64 SVD of the whole matrix.

    torch's LAPACK rather than numpy's here: interleaving the two libraries' thread pools in a tight
    loop makes their busy-waiting threads fight on a loaded 2-core machine (10-40x slowdowns).
    """
    with torch.no_grad():
        A = matrix_of(fn, input_shape)
        return float(torch.linalg.svdvals(A)[0]) if A.numel() else 0.0


def assert_upper(bound: torch.Tensor, exact: float, rtol: float | None = None) -> None:
    """bound ≥ exact (soundness) and, if rtol is given, bound ≤ exact·(1 + rtol)."""
    assert bound.dtype == torch.float64 and bound.dim() == 0
    assert bound.item() >= exact, (bound.item(), exact)
    if rtol is not None:
        assert bound.item() <= exact * (1 + rtol) + 2 * ABSOLUTE_MARGIN, (bound.item(), exact)


# --------------------------------------------------------------------------- margin and docs


def test_certify_applies_margin():
    assert 0 < SAFETY_MARGIN <= 1e-6
    x = torch.tensor(3.0, dtype=torch.float32)
    out = certify(x)
    assert out.dtype == torch.float64
    assert out.item() == 3.0 * (1 + SAFETY_MARGIN) + ABSOLUTE_MARGIN
    assert out.item() > 3.0 * (1 + 0.5 * SAFETY_MARGIN)
    assert certify(0.0).item() == ABSOLUTE_MARGIN > 0
    # every public bound goes through certify: an exactly known norm comes back with the margin
    assert dense_norm(torch.eye(3)).item() == certify(1.0).item()
    assert diagonal_norm(torch.tensor([-4.0, 1.0])).item() == certify(4.0).item()


def test_docstring_examples_print_real_output():
    result = doctest.testmod(certified, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


def test_matrix_of_recovers_a_dense_matrix():
    W = torch.randn(7, 5, dtype=torch.float64)
    M = matrix_of(lambda x: x @ W.T, (5,), batch_size=2)
    torch.testing.assert_close(M, W, rtol=0, atol=0)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (40, 25), (64, 64), (200, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_norm_matches_numpy(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g, dtype=dtype)
    exact = float(np.linalg.norm(W.double().numpy(), 2))
    assert_upper(dense_norm(W), exact, rtol=1e-8)


def test_dense_norm_gradient_is_top_singular_pair():
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    dense_norm(W).backward()
    U, _, Vh = np.linalg.svd(W.detach().numpy())
    expected = (1 + SAFETY_MARGIN) * np.outer(U[:, 0], Vh[0])
    np.testing.assert_allclose(W.grad.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 1e150, 1e-150])
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512), (1024, 1024)])
def test_dense_norm_gram_eigenvalue_route(monkeypatch, shape, scale):
    # large matrices take λ_max of the smaller Gram matrix plus its rounding bound; the result
    # must still be above the SVD's σ₁ and agree with it closely, at any scale
    g = torch.Generator().manual_seed(shape[0])
    W = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    W[0] *= 30.0  # a dominant singular value, as in trained layers
    assert W.numel() >= certified.DENSE_GRAM_MIN_ENTRIES
    exact = float(torch.linalg.svdvals(W)[0])
    gram = dense_norm(W)
    assert_upper(gram, exact, rtol=1e-8)
    monkeypatch.setattr(certified, "DENSE_GRAM_MIN_ENTRIES", 1 << 40)
    assert gram.item() == pytest.approx(dense_norm(W).item(), rel=1e-8)


def test_dense_norm_gram_route_is_differentiable(monkeypatch):
    monkeypatch.setattr(certified, "DENSE_GRAM_MIN_ENTRIES", 1)
    W = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    dense_norm(W).backward()
    U, _, Vh = np.linalg.svd(W.detach().numpy())
    np.testing.assert_allclose(W.grad.numpy(), np.outer(U[:, 0], Vh[0]), atol=1e-8)


def test_dense_norm_falls_back_to_gram_iteration():
    W = torch.randn(30, 50, dtype=torch.float64)
    exact = float(np.linalg.norm(W.numpy(), 2))
    assert_upper(dense_norm(W, svd_max_dim=10), exact, rtol=1e-3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30, 1e300])
def test_gram_iteration_is_an_upper_bound_within_one_percent(seed, scale):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(200, 300, generator=g, dtype=torch.float64) * scale
    if seed % 2:
        W = W.T  # tall and wide
    exact = float(np.linalg.norm(W.numpy(), 2))
    assert math.isfinite(exact) and exact > 0
    assert_upper(gram_iteration_norm(W, iters=6), exact, rtol=0.01)


def test_gram_iteration_edge_cases():
    W = torch.randn(20, 10, dtype=torch.float64)
    exact = float(np.linalg.norm(W.numpy(), 2))
    # 0 iterations is the Frobenius norm; the bound never drops below σ₁ as iterations increase
    assert_upper(gram_iteration_norm(W, iters=0), float(np.linalg.norm(W.numpy())))
    for t in range(1, 12):
        assert_upper(gram_iteration_norm(W, iters=t), exact)
    # rank one: converged immediately, so the bound is tight up to the margins
    v = torch.randn(15, 1, dtype=torch.float64)
    rank_one = v @ v.T
    assert_upper(gram_iteration_norm(rank_one, 3), float(v.norm() ** 2), rtol=1e-8)
    assert gram_iteration_norm(torch.zeros(4, 5)).item() == certify(0.0).item()
    assert gram_iteration_norm(torch.tensor([[math.inf]])).item() == math.inf
    with pytest.raises(ValueError):
        gram_iteration_norm(torch.zeros(2, 2, 2))


def test_gram_iteration_is_differentiable():
    W = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    gram_iteration_norm(W, iters=8).backward()
    U, _, Vh = np.linalg.svd(W.detach().numpy())
    np.testing.assert_allclose(W.grad.numpy(), np.outer(U[:, 0], Vh[0]), atol=1e-3)


def test_diagonal_norm():
    s = torch.tensor([0.3, -7.5, 2.0], requires_grad=True)
    out = diagonal_norm(s)
    assert_upper(out, 7.5, rtol=1e-8)
    out.backward()
    assert s.grad.abs().sum().item() == pytest.approx(1 + SAFETY_MARGIN)


# --------------------------------------------------------------------------- convolutions


@st.composite
def conv_configs(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 4]))
    c_in = groups * draw(st.integers(1, 6 // groups))
    c_out = groups * draw(st.integers(1, 6 // groups))
    k = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(4, 9)) for _ in range(nd))
    assume(all(n + 2 * padding - dilation * (k - 1) >= 1 for n in spatial))
    seed = draw(st.integers(0, 2**31 - 1))
    return nd, groups, c_in, c_out, k, stride, padding, dilation, spatial, seed


@HYP
@given(conv_configs())
def test_conv_norm_is_an_upper_bound(cfg):
    nd, groups, c_in, c_out, k, stride, padding, dilation, spatial, seed = cfg
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, *([k] * nd), generator=g, dtype=torch.float64)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    exact = exact_norm(lambda x: CONV[nd](x, w, **kw), (c_in, *spatial))
    assert_upper(conv_norm(w, (c_in, *spatial), **kw), exact)


@HYP
@given(conv_configs(), st.integers(0, 2))
def test_conv_transpose_norm_is_an_upper_bound(cfg, output_padding):
    nd, groups, c_in, c_out, k, stride, padding, dilation, spatial, seed = cfg
    assume(output_padding < max(stride, dilation))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_in, c_out // groups, *([k] * nd), generator=g, dtype=torch.float64)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out_size = [
        (n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1 for n in spatial
    ]
    assume(min(out_size) >= 1)
    exact = exact_norm(
        lambda x: CONV_T[nd](x, w, output_padding=output_padding, **kw), (c_in, *spatial)
    )
    assert_upper(
        conv_transpose_norm(w, (c_in, *spatial), output_padding=output_padding, **kw), exact
    )


@HYP
@given(conv_configs())
def test_circular_padding_is_an_upper_bound_and_exact_when_circulant(cfg):
    nd, groups, c_in, c_out, k, stride, padding, dilation, spatial, seed = cfg
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, *([k] * nd), generator=g, dtype=torch.float64)
    layer = (torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d)(
        c_in,
        c_out,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        padding_mode="circular",
    ).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    exact = exact_norm(layer, (c_in, *spatial))
    bound = conv_norm(
        w,
        (c_in, *spatial),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode="circular",
    )
    # stride 1 and an output exactly one period long: the map is a (shifted) circulant
    exact_case = stride == 1 and padding * 2 == dilation * (k - 1)
    assert_upper(bound, exact, rtol=1e-8 if exact_case else None)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k,dilation", [(2, 1), (3, 2), (4, 1), (5, 1)])
def test_string_padding(padding, k, dilation):
    w = torch.randn(3, 2, k, k, dtype=torch.float64)
    exact = exact_norm(lambda x: F.conv2d(x, w, padding=padding, dilation=dilation), (2, 9, 8))
    assert_upper(conv_norm(w, (2, 9, 8), padding=padding, dilation=dilation), exact)


def test_conv_norm_is_tight_for_stride_one_with_padding():
    """Stride 1, padding ≥ k//2, spatial 8–12: the circulant bound stays close to the exact norm."""
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(40):
        nd = int(rng.integers(1, 3))
        k = int(rng.choice([1, 3, 5]))
        padding = k // 2 + int(rng.integers(0, 2))
        c_in, c_out = (int(c) for c in rng.integers(1, 7, size=2))
        spatial = tuple(int(n) for n in rng.integers(8, 13, size=nd))
        w = torch.from_numpy(rng.standard_normal((c_out, c_in, *([k] * nd))))
        conv = functools.partial(CONV[nd], weight=w, padding=padding)
        exact = exact_norm(conv, (c_in, *spatial))
        bound = conv_norm(w, (c_in, *spatial), padding=padding)
        assert_upper(bound, exact)
        ratios.append(bound.item() / exact)
    print(f"\nstride-1 tightness: median ratio {np.median(ratios):.4f}, max {max(ratios):.4f}")
    assert max(ratios) <= 1.3


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 2), (2, 1, 1), (3, 2, 2)])
def test_conv3d_norm_is_an_upper_bound(stride, padding, groups):
    w = torch.randn(4, 4 // groups, 3, 2, 3, dtype=torch.float64)
    kw = {"stride": stride, "padding": padding, "groups": groups}
    exact = exact_norm(lambda x: F.conv3d(x, w, **kw), (4, 4, 5, 4))
    assert_upper(conv_norm(w, (4, 4, 5, 4), **kw), exact)


def test_conv_norm_frequency_chunks_agree(monkeypatch):
    """Large grids are processed in chunks of frequencies; chunking must not change the value."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    whole = conv_norm(w, (2, 9, 7), stride=2, padding=1)
    monkeypatch.setattr(certified, "_FREQ_CHUNK_ELEMENTS", 1)  # one frequency row per chunk
    chunked = conv_norm(w, (2, 9, 7), stride=2, padding=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=0)


def test_conv_norm_is_differentiable():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    conv_norm(w, (3, 6, 6), stride=2, padding=1).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_conv_norm_rejects_unsupported_settings():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        conv_norm(w, (2, 8, 8), padding=1, padding_mode="symmetric")
    with pytest.raises(ValueError, match="reflect padding must be smaller"):
        conv_norm(w, (2, 3, 3), padding=3, padding_mode="reflect")
    with pytest.raises(ValueError, match="channels"):
        conv_norm(w, (3, 8, 8))
    with pytest.raises(ValueError, match="spatial"):
        conv_norm(w, (2, 8))
    with pytest.raises(ValueError, match="strided"):
        conv_norm(w, (2, 8, 8), padding="same", stride=2)
    with pytest.raises(ValueError, match="empty"):
        conv_norm(w, (2, 1, 1))


SIX_C_TWO_F = [  # (C_in, C_out, kernel, stride, padding, spatial): the conv layers of 6C2F on CIFAR
    (3, 32, 3, 1, 1, 32),
    (32, 32, 4, 2, 1, 32),
    (32, 64, 3, 1, 1, 16),
    (64, 64, 4, 2, 1, 16),
    (64, 64, 3, 1, 1, 8),
    (64, 64, 4, 2, 1, 8),
]


def power_iteration_conv(w, input_shape, stride, padding, iters=500) -> float:
    """Lower estimate of ‖conv‖ by power iteration on convᵀconv (float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *input_shape, generator=g, dtype=torch.float64)
    for _ in range(iters):
        y = F.conv2d(x, w, stride=stride, padding=padding)
        x = torch.nn.grad.conv2d_input(x.shape, w, y, stride=stride, padding=padding)
        x = x / x.norm()
    return F.conv2d(x, w, stride=stride, padding=padding).norm().item()


def test_6c2f_layers_within_1_5_of_power_iteration():
    torch.manual_seed(0)
    lines = []
    for c_in, c_out, k, stride, padding, n in SIX_C_TWO_F:
        w = torch.empty(c_out, c_in, k, k, dtype=torch.float64)
        torch.nn.init.kaiming_normal_(w)
        start = time.perf_counter()
        bound = conv_norm(w, (c_in, n, n), stride=stride, padding=padding)
        elapsed = time.perf_counter() - start
        estimate = power_iteration_conv(w, (c_in, n, n), stride, padding)
        ratio = bound.item() / estimate
        lines.append(
            f"conv {c_in:>2}->{c_out:<2} k{k} s{stride} p{padding} on {n:>2}x{n:<2}: "
            f"bound {bound.item():.4f}  power-it {estimate:.4f}  ratio {ratio:.4f}  "
            f"time {elapsed * 1e3:.1f} ms"
        )
        assert 1.0 <= ratio <= 1.5
    print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------- pooling


POOL_CASES = [
    (nd, k, s, p, cip, ceil)
    for nd in (1, 2)
    for k in range(1, 5)
    for s in range(1, 5)
    for p in range(2)
    for cip in (True, False)
    for ceil in (False, True)
    if p <= k // 2
]


@pytest.mark.parametrize("nd,k,s,p,cip,ceil", POOL_CASES)
def test_pooling_norm_is_an_upper_bound(nd, k, s, p, cip, ceil):
    shape = (2, 7) if nd == 1 else (2, 7, 6)
    kw = {"count_include_pad": cip, "ceil_mode": ceil}
    exact = exact_norm(lambda x: AVG_POOL[nd](x, k, s, p, **kw), shape)
    assert_upper(pooling_norm(k, s, p, shape, method="schur", **kw), exact)
    # the factor-SVD variant is exact, and 'auto' picks the smaller sound value
    assert_upper(pooling_norm(k, s, p, shape, method="svd", **kw), exact, rtol=1e-8)
    assert_upper(pooling_norm(k, s, p, shape, **kw), exact, rtol=1e-8)


@pytest.mark.parametrize("divisor", [1, 3, 5])
def test_pooling_divisor_override(divisor):
    exact = exact_norm(lambda x: F.avg_pool2d(x, 3, 2, 1, divisor_override=divisor), (1, 7, 7))
    bound = pooling_norm(3, 2, 1, (1, 7, 7), divisor_override=divisor, method="schur")
    assert_upper(bound, exact)
    assert_upper(pooling_norm(3, 2, 1, (1, 7, 7), divisor_override=divisor), exact, rtol=1e-8)


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("n", [1, 5, 7, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_adaptive_avg_pool_norm_is_an_upper_bound(nd, n, m):
    shape = (3, n) if nd == 1 else (3, n, n + 1)
    exact = exact_norm(lambda x: ADAPTIVE[nd](x, m), shape)
    assert_upper(adaptive_avg_pool_norm(shape, m, method="schur"), exact)
    assert_upper(adaptive_avg_pool_norm(shape, m), exact, rtol=1e-8)


def test_adaptive_avg_pool_output_size_none():
    exact = exact_norm(lambda x: F.adaptive_avg_pool2d(x, (None, 2)), (1, 4, 6))
    assert_upper(adaptive_avg_pool_norm((1, 4, 6), (None, 2)), exact, rtol=1e-8)


@pytest.mark.parametrize("stride, padding, mode", [(1, 1, "zeros"), (2, 1, "zeros"),
                                                   (1, 2, "zeros"), (1, 1, "reflect")])
def test_small_convolutions_are_certified_exactly(stride, padding, mode):
    # the circulant embedding of zero padding is a few % loose on small images; small operators
    # are also materialised (with a rounding bound) and the smaller certified value kept
    from curvbound.runtime.operators import Conv, exact_arithmetic

    g = torch.Generator().manual_seed(stride + 3 * padding)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    in_shape = (3, 6, 6)

    def fn(x):
        if mode != "zeros":
            return F.conv2d(F.pad(x, (padding,) * 4, mode=mode), w, stride=stride)
        return F.conv2d(x, w, stride=stride, padding=padding)

    out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    op = Conv(lambda: w, in_shape, out_shape, stride=(stride, stride), padding=(padding, padding),
              dilation=(1, 1), groups=1, padding_mode=mode)
    exact = exact_norm(fn, in_shape)
    with exact_arithmetic():
        bound = op.certified_norm()
    assert_upper(bound, exact, rtol=1e-8)
    structured = conv_norm(w, in_shape, stride=stride, padding=padding, padding_mode=mode)
    assert structured.item() > exact * (1 + 1e-4)  # the tightening is what made it exact
