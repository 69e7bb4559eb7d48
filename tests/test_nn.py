"""curvbound.nn: SLL layers are 1-Lipschitz (certified and empirically), their curvature bounds
sit above empirical lower bounds, the quantities match independent computations, and smooth()
leaves no non-smooth node."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvbound
from curvbound.apps.empirical import curvature_lower_bound, lipschitz_lower_bound
from curvbound.compiler.errors import InputError
from curvbound.nn import (
    LeakySoftplus,
    NormalizedLinear,
    PadChannels,
    SLLConv2d,
    SLLLinear,
    SLLLipschitz,
    SmoothClamp,
    sll_3c1f,
    smooth,
)


def _randomize(layer: nn.Module, seed: int, gain: float = 1.0) -> nn.Module:
    """Random weights, biases and q (so that the q-weighted sums matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name == "log_q" else gain
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return layer


LAYERS = [
    ("linear_tanh", lambda: SLLLinear(6, activation="tanh"), (6,)),
    ("linear_softplus_wide", lambda: SLLLinear(4, 9, activation="softplus", beta=2.0), (4,)),
    ("linear_centered", lambda: SLLLinear(5, 3, activation="centered_softplus", beta=0.5), (5,)),
    ("conv_tanh", lambda: SLLConv2d(2, activation="tanh"), (2, 5, 5)),
    ("conv_softplus", lambda: SLLConv2d(2, 5, inner_channels=3, activation="softplus"), (2, 4, 6)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[x[0] for x in LAYERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sll_layer_is_certified_one_lipschitz(name, make, shape, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(_randomize(make(), seed=1)).to(dtype).eval()
    x = torch.zeros(1, *shape, dtype=dtype)
    bf = curvbound.compile(net, x, norms="certified")
    out = bf()
    assert out.certified
    lip = {k: v for k, v in bf.quantity_values().items() if k.startswith("lip_")}
    assert lip == {"lip__0": 1.0}  # the dominance check holds with the layer's own rounded T
    assert 1.0 <= float(out.lipschitz) <= 1.0 + 1e-12
    emp = lipschitz_lower_bound(net.double(), shape, samples=8, steps=20, seed=0)
    assert 0.5 < emp <= 1.0 + 1e-9


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[x[0] for x in LAYERS])
def test_sll_curvature_bound_above_empirical(name, make, shape):
    net = nn.Sequential(_randomize(make(), seed=2)).double().eval()
    x = torch.zeros(1, *shape, dtype=torch.float64)
    bounds = {}
    for method in ("naive", "compositional"):
        cert = curvbound.compile(net, x, method=method, norms="certified")()
        est = curvbound.compile(net, x, method=method)()
        assert cert.certified
        assert float(est.curvature) <= float(cert.curvature) * (1 + 1e-9)
        bounds[method] = float(cert.curvature)
    assert bounds["compositional"] <= bounds["naive"] * (1 + 1e-12)
    emp = curvature_lower_bound(net, shape, samples=8, steps=30, seed=0)
    assert 0 < emp <= bounds["compositional"] * (1 + 1e-9)


def _jacobian_norm(f, x: torch.Tensor) -> float:
    J = torch.autograd.functional.jacobian(lambda z: f(z[None])[0].flatten(), x)
    return float(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), 2))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sll_lipschitz_quantity_bounds_a_layer_with_too_small_t(kind, monkeypatch):
    """When T is too small (c > 1) the certificate is √(1 + 4c(c − 1)) > 1, and it still
    bounds the Jacobian norm found at random points (worst D: the slope near 1 at z = 0)."""
    layer = SLLLinear(5) if kind == "linear" else SLLConv2d(2)
    layer = _randomize(layer, seed=3).double()
    with torch.no_grad():
        layer.bias.zero_()
    shrink = 6.0
    original = type(layer).scale
    monkeypatch.setattr(layer, "scale", lambda: shrink * original(layer))
    q = SLLLipschitz(layer, "certified")
    c = float(q.ratio())
    assert c > 1
    bound = float(q())
    assert bound == pytest.approx(math.sqrt(1 + 4 * c * (c - 1)), rel=1e-8)
    shape = (5,) if kind == "linear" else (2, 4, 4)
    g = torch.Generator().manual_seed(0)
    worst = max(_jacobian_norm(layer, 0.01 * torch.randn(shape, generator=g, dtype=torch.float64))
                for _ in range(4))
    assert worst > 1.0  # the broken layer really expands
    assert worst <= bound * (1 + 1e-9)


def test_sll_linear_quantities_match_independent_computations():
    layer = _randomize(SLLLinear(4, 6), seed=4).double()
    net = nn.Sequential(layer).eval()
    bf = curvbound.compile(net, torch.zeros(1, 4, dtype=torch.float64), norms="certified")
    vals = bf.quantity_values()
    with torch.no_grad():
        W, s = layer.weight, layer.scale()
        G = -W.T * s  # (n, m): column l is −s_l w_l
        A = torch.stack([torch.outer(G[:, j], W[j]).flatten() for j in range(W.shape[0])], 1)
        had = float(torch.linalg.matrix_norm(A, 2))
        snorm = float(torch.linalg.matrix_norm(torch.sqrt(W.norm(dim=1) * s)[:, None] * W, 2))
        wnorm = float(torch.linalg.matrix_norm(W, 2))
    assert vals["hadamard__0"] == pytest.approx(had, rel=1e-8)
    assert vals["snorm__0"] == pytest.approx(snorm, rel=1e-8)
    assert vals["norm__0"] == pytest.approx(wnorm, rel=1e-8)
    assert vals["hadamard__0"] >= had and vals["snorm__0"] >= snorm
    sup2 = 4 * math.sqrt(3) / 9  # tanh
    M = float(bf().curvature)
    assert M == pytest.approx(sup2 * min(had * wnorm, snorm**2), rel=1e-8)


def test_sll_conv_t_is_the_kernel_autocorrelation():
    """t_i = Σ_j Σ_δ |(K ⋆ K)_ij(δ)| q_j/q_i, with the correlation taken from the dense matrix of
    the convolution on an image large enough that no offset touches the border."""
    layer = _randomize(SLLConv2d(2, inner_channels=3), seed=5).double()
    n = 9
    with torch.no_grad():
        eye = torch.eye(2 * n * n, dtype=torch.float64).reshape(-1, 2, n, n)
        Wm = F.conv2d(eye, layer.weight, padding=1).reshape(2 * n * n, -1).T  # (3·n·n, 2·n·n)
        B = (Wm @ Wm.T).reshape(3, n, n, 3, n, n)[:, n // 2, n // 2]  # rows at the centre
        sums = B.abs().sum(dim=(2, 3))  # (i, j)
        q = torch.exp(layer.log_q - layer.log_q.max())
        t = (sums @ q) / q
        s = layer.scale()
    assert torch.allclose(2 / s, t, rtol=1e-9)


def test_sll_conv_hadamard_quantity_is_the_torus_block_norm():
    """‖Â_C‖ of the circular convolution on a torus where no offset wraps (N ≥ 2k − 1), from
    its materialised matrix, equals √λ_max(P); and for the zero-padded layer
    ‖Wᵀdiag(s∘Δ)W‖ ≤ ‖Â_C‖·‖Δ‖ at random Δ (the step of the proof that uses the torus)."""
    layer = _randomize(SLLConv2d(2, inner_channels=3), seed=7).double()
    N, c_in = 7, 2
    with torch.no_grad():
        s = layer.scale()
        eye = torch.eye(c_in * N * N, dtype=torch.float64).reshape(-1, c_in, N, N)
        C = F.conv2d(F.pad(eye, (1, 1, 1, 1), mode="circular"), layer.weight)
        C = C.reshape(c_in * N * N, -1).T  # (3·N·N, 2·N·N)
        sv = s.repeat_interleave(N * N)
        S_C = sv[:, None] * (C @ C.T) ** 2 * sv[None, :]
        torus = float(torch.linalg.eigvalsh(S_C)[-1]) ** 0.5
        for mode in ("estimate", "certified"):
            q = float(curvbound.nn.SLLConvHadamard(layer, mode)())
            assert q == pytest.approx(torus, rel=1e-8) and (mode == "estimate" or q >= torus)
        n = 5
        eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
        W = F.conv2d(eye, layer.weight, padding=1).reshape(c_in * n * n, -1).T
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            delta = torch.randn(W.shape[0], generator=g, dtype=torch.float64)
            v = s.repeat_interleave(n * n) * delta
            lhs = torch.linalg.matrix_norm(W.T @ (v[:, None] * W), 2)
            assert float(lhs) <= torus * float(delta.norm()) * (1 + 1e-12)


def test_sll_gradient_flows_to_weights_and_q():
    layer = _randomize(SLLLinear(4), seed=6)
    bf = curvbound.compile(nn.Sequential(layer).eval(), torch.zeros(1, 4))
    bf().curvature.backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.log_q.grad.abs().sum() > 0


def test_sll_network_is_sound_end_to_end():
    torch.manual_seed(0)
    net = sll_3c1f(num_classes=3, channels=4, image_size=4, pool=2, activation="softplus")
    net = net.double().eval()
    shape = (3, 4, 4)
    bf = curvbound.compile(net, torch.zeros(1, *shape, dtype=torch.float64), norms="certified")
    out = bf()
    assert out.certified
    head = net[-1].normalized_weight().detach()
    assert float(out.lipschitz) <= float(torch.linalg.matrix_norm(head, 2)) * (1 + 1e-8)
    emp_L = lipschitz_lower_bound(net, shape, samples=8, steps=20, seed=0)
    emp_M = curvature_lower_bound(net, shape, samples=8, steps=20, seed=0)
    assert emp_L <= float(out.lipschitz) * (1 + 1e-9)
    assert 0 < emp_M <= float(out.curvature) * (1 + 1e-9)
    m = bf.margins()
    assert m.pairwise and float(m.curvature.max()) <= math.sqrt(2) * float(out.curvature) * 1.001


def test_normalized_linear_and_pad_channels_norms_are_exact():
    torch.manual_seed(0)
    head = NormalizedLinear(5, 4).double()
    net = nn.Sequential(PadChannels(3), nn.Flatten(), nn.Tanh(), nn.Linear(3 * 2 * 2, 5),
                        nn.Tanh(), head).double().eval()
    bf = curvbound.compile(net, torch.zeros(1, 2, 2, 2, dtype=torch.float64), norms="certified")
    vals = bf.quantity_values()
    w = head.normalized_weight().detach()
    assert torch.allclose(w.norm(dim=1), torch.ones(4, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(w, 2))
    assert vals["norm__5"] == pytest.approx(exact, rel=1e-8) and vals["norm__5"] >= exact
    assert PadChannels(3)(torch.ones(1, 2, 2, 2)).norm() == torch.ones(1, 2, 2, 2).norm()
    with pytest.raises(InputError, match="normalize"):
        NormalizedLinear(2, 2, normalize="spectral")


def test_bad_arguments_raise_library_errors():
    with pytest.raises(InputError, match="activation"):
        SLLLinear(3, activation="relu")
    with pytest.raises(InputError, match="odd"):
        SLLConv2d(3, kernel_size=2)
    with pytest.raises(InputError, match="activation"):
        smooth(nn.ReLU(), activation="tanh")
    with pytest.raises(InputError, match="dilation"):
        smooth(nn.Sequential(nn.MaxPool2d(2, dilation=2)))


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = torch.relu(h).flatten(1)
        return F.leaky_relu(self.fc(h), 0.1).relu()


def test_smooth_removes_every_nonsmooth_node():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2, stride=1),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU6(), nn.Linear(8, 8), nn.ELU(alpha=2.0),
        nn.Linear(8, 8), nn.Hardtanh(-2.0, 2.0), nn.Linear(8, 3),
    ).eval()
    x = torch.zeros(1, 1, 8, 8)
    assert curvbound.compile(model, x).nonsmooth_nodes  # the original is not C¹
    soft = smooth(model, beta=4.0)
    report = [(r.path, r.old, r.new) for r in soft.smooth_report]
    assert report == [
        ("1", "ReLU", "Softplus"), ("2", "MaxPool2d", "AvgPool2d"),
        ("4", "LeakyReLU", "LeakySoftplus"), ("5", "MaxPool2d", "AvgPool2d"),
        ("8", "ReLU6", "SmoothClamp"), ("10", "ELU", "CELU"), ("12", "Hardtanh", "SmoothClamp"),
    ]
    assert isinstance(model[1], nn.ReLU)  # the original is untouched
    assert soft[5].stride == 1 and soft[5].kernel_size == 2
    bf = curvbound.compile(soft, x, norms="certified")
    assert bf.nonsmooth_nodes == []
    out = bf()
    assert out.certified and math.isfinite(float(out.curvature))
    emp = curvature_lower_bound(soft, (1, 8, 8), samples=4, steps=10, seed=0)
    assert emp <= float(out.curvature) * (1 + 1e-9)
    functional = smooth(_Functional().eval(), activation="centered_softplus", beta=2.0)
    assert len(functional.smooth_report) == 5
    bf = curvbound.compile(functional, x)
    assert bf.nonsmooth_nodes == [] and math.isfinite(float(bf().curvature))


@pytest.mark.parametrize("module,slope,curv", [
    (LeakySoftplus(0.2, beta=3.0), 1.0, 0.8 * 3.0 / 4),
    (LeakySoftplus(-1.5, beta=1.0), 1.5, 2.5 / 4),
    (SmoothClamp(-0.5, 0.7, beta=3.0), 1.0, 3.0 / 4),
])
def test_smooth_counterpart_constants_dominate_attained_values(module, slope, curv):
    t = torch.linspace(-12, 12, 24001, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(module(t).sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    assert float(d1.abs().max()) <= slope * (1 + 1e-12)
    assert float(d2.abs().max()) <= curv * (1 + 1e-12)
    assert float(d2.abs().max()) >= 0.5 * curv  # the constant is not wildly loose


def test_curvature_penalty_trains_through_sll_layers():
    """The SLL quantities are differentiable in the weights and q: minimising the penalty alone
    lowers the certified curvature, and every SLL layer stays certified 1-Lipschitz."""
    torch.manual_seed(0)
    net = sll_3c1f(num_classes=3, channels=4, image_size=4, pool=2).eval()
    x = torch.zeros(1, 3, 4, 4)

    def certified():
        bf = curvbound.compile(net, x, norms="certified")
        lips = [v for k, v in bf.quantity_values().items() if k.startswith("lip_")]
        return float(bf().curvature), lips

    before, _ = certified()
    pen = curvbound.CurvaturePenalty(net, x)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(10):
        opt.zero_grad()
        pen().backward()
        opt.step()
    after, lips = certified()
    assert after < 0.95 * before
    assert lips == [1.0] * 4
