"""CurvaturePenalty and radius_loss (issue 11): the penalty tracks the converged bound, its
gradient is the bound's, the dual update moves the weight as documented, training with it lowers
the certified curvature, and the differentiable radius is the certificate's radius."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps.training import Accuracy, margin_radii, unwrap_model
from curvbound.runtime.products import ProductNorm, matrix_of


def _mlp(d=16, w=24, k=5, depth=6, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, w), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(w, w), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(w, k)).to(dtype)


def _blobs(n=512, d=16, k=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + 0.8 * torch.randn(n, d, generator=g)
    return x.to(dtype), y


def _converged(pen) -> float:
    """The converged penalised value on the current weights, leaving the vectors untouched."""
    state = {k: v.clone() for k, v in pen.bound.state_dict().items()}
    value = pen.converge()
    pen.bound.load_state_dict(state)
    return value


def test_refresh_one_is_one_power_step_for_every_product():
    net = _mlp()
    bf = curvbound.compile(net, torch.zeros(1, 16))
    with torch.no_grad():  # move the weights away from the compile-time vectors
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p) / p.shape[-1] ** 0.5)
    prods = [q for q in bf.quantities.values() if isinstance(q, ProductNorm)]
    assert len(prods) > 10
    expected = []
    for q in prods:  # one power step u ← AᵀAu/‖AᵀAu‖ from the explicit matrix
        a = matrix_of(q.op).detach().double()
        u = q.u.detach().reshape(-1).double()
        w = a.T @ (a @ u)
        expected.append(w / w.norm())
    bf(refresh=1)
    for q, e in zip(prods, expected):
        got = q.u.detach().reshape(-1).double()
        assert torch.allclose(got, e, atol=1e-5), q.label


def test_penalty_with_defaults_tracks_the_converged_bound():
    net = _mlp()
    x, y = _blobs()
    pen = curvbound.CurvaturePenalty(net, x[:1], weight=0.01)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    ratios = []
    for step in range(1, 61):
        i = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[i]), y[i]) + pen()
        loss.backward()
        if step % 15 == 0:  # this step's value in the loss vs the converged bound, same weights
            ratios.append(pen.value / _converged(pen))
        opt.step()
    assert min(ratios) > 0.95, ratios
    assert max(ratios) < 1 + 1e-6, ratios  # power iteration approaches from below


def _train(weight: float, steps=100, margins=False):
    net = _mlp(d=2, w=16, k=2, depth=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    pen = curvbound.CurvaturePenalty(net, x[:1], weight=weight, margins=margins)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + pen()
        loss.backward()
        opt.step()
    return float(curvbound.compile(net.eval(), x[:1], norms="certified")().curvature)


def test_penalty_lowers_the_certified_curvature():
    plain, penalised = _train(0.0), _train(2.0)
    assert penalised < 0.5 * plain, (plain, penalised)


def _directional_fd(pen, value, net, h=1e-6):
    """∂ value/∂θ·D (autograd) and (value(θ + hD) − value(θ − hD))/2h, vectors held fixed."""
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(3)
    dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    grads = torch.autograd.grad(value(), params, allow_unused=True)  # biases: no effect on M
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, dirs) if g is not None)
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(sign * h * d)
            vals.append(float(value()))
            for p, d in zip(params, dirs):
                p.sub_(sign * h * d)
    return analytic, (vals[0] - vals[1]) / (2 * h)


@pytest.mark.parametrize("margins", [False, True])
def test_penalty_gradient_is_the_finite_difference_of_the_bound(margins):
    net = _mlp(d=6, w=10, k=4, depth=4, dtype=torch.float64)
    pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 6, dtype=torch.float64), weight=0.7,
                                     margins=margins, refresh_steps=0)
    pen.converge()
    analytic, fd = _directional_fd(pen, pen, net)
    assert analytic == pytest.approx(fd, rel=1e-5)
    # the penalty is weight × the bound the bound function reports
    with torch.no_grad():
        if margins:
            ref = pen.bound.margins().curvature.max()
        else:
            ref = pen.bound().curvature
    assert float(pen()) == pytest.approx(0.7 * float(ref), rel=1e-12)


def test_margins_penalty_is_below_sqrt2_times_the_bound():
    net = _mlp(d=6, w=10, k=4, depth=4)
    pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 6), margins=True)
    mg = float(pen.converge())
    full = float(pen.bound().curvature)
    assert 0 < mg <= math.sqrt(2) * full * (1 + 1e-9)


def test_margins_penalty_tracks_the_exact_pair_eigenvalues():
    net = _mlp(d=6, w=10, k=4, depth=4, dtype=torch.float64)
    pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 6, dtype=torch.float64), margins=True)
    pen.converge()
    off = ~torch.eye(4, dtype=torch.bool)
    exact = pen.bound.margins().curvature[off]  # one eigvalsh per pair
    assert torch.allclose(pen.margin_curvatures().detach()[off], exact, rtol=1e-9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for _ in range(10):  # the tracked per-pair vectors follow the weights
        pen()
    with torch.no_grad():
        tracked = pen.margin_curvatures()[off]
        exact = pen.bound.margins().curvature[off]  # same norm vectors, exact pair blocks
    assert (tracked <= exact * (1 + 1e-9)).all()  # Rayleigh quotients: from below
    assert (tracked >= 0.98 * exact).all()


def test_bound_target_dual_update():
    net = _mlp(d=4, w=8, k=3, depth=3)
    pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 4), weight=0.5, target=0.0,
                                     dual_lr=0.1, weight_min=0.2)
    pen()
    m = pen.value
    assert pen.step() == pytest.approx(0.5 + 0.1 * m)  # M above target: λ grows by η(M − M*)
    pen.target = 1e6
    assert pen.step() == 0.2  # far below the target: λ falls to λ_min
    fixed = curvbound.CurvaturePenalty(net, torch.zeros(1, 4), weight=0.5)
    fixed()
    assert fixed.step() == 0.5  # target=None: fixed weight


def test_accuracy_target_dual_update():
    net = _mlp(d=4, w=8, k=3, depth=3)
    pen = curvbound.CurvaturePenalty(net, torch.zeros(1, 4), weight=0.5,
                                     target=Accuracy(0.9), dual_lr=0.1)
    assert pen.step(accuracy=1.0) == pytest.approx(0.51)  # more accurate than needed: grows
    assert pen.step(accuracy=0.5) == pytest.approx(0.47)  # less accurate: shrinks
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert pen.step(logits=logits, labels=torch.tensor([0, 0])) == pytest.approx(0.43)
    with pytest.raises(curvbound.InputError, match="accuracy"):
        pen.step()
    with pytest.raises(curvbound.InputError):
        Accuracy(1.5)


def test_bad_inputs_are_named():
    relu = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(curvbound.InputError, match="not C¹"):
        curvbound.CurvaturePenalty(relu, torch.zeros(1, 2))
    net = _mlp(d=2, w=4, k=2, depth=2)
    with pytest.raises(curvbound.InputError, match="target"):
        curvbound.CurvaturePenalty(net, torch.zeros(1, 2), target=-1.0)
    with pytest.raises(curvbound.InputError, match="estimate"):
        curvbound.CurvaturePenalty(net, torch.zeros(1, 2),
                                   bound_fn=curvbound.compile(net, torch.zeros(1, 2),
                                                              norms="certified"))


def test_wrapped_models_are_unwrapped():
    net = _mlp(d=4, w=8, k=3, depth=3)
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(torch.compile(net)) is net
    assert unwrap_model(torch.compile(nn.DataParallel(net))) is net
    a = curvbound.CurvaturePenalty(torch.compile(net), torch.zeros(1, 4), refresh_steps=0)
    b = curvbound.CurvaturePenalty(net, torch.zeros(1, 4), refresh_steps=0)
    assert a.bound.model is net
    assert float(a()) == pytest.approx(float(b()))


def test_ddp_wrapped_model(single_process_group):
    net = _mlp(d=4, w=8, k=3, depth=3)
    ddp = nn.parallel.DistributedDataParallel(net)
    pen = curvbound.CurvaturePenalty(ddp, torch.zeros(1, 4))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = nn.functional.cross_entropy(ddp(x), y) + pen()
    loss.backward()
    assert pen.bound.model is net and net[0].weight.grad is not None


def test_radius_equals_the_certificate_curvature_radius():
    net = _mlp(d=6, w=12, k=4, depth=4, dtype=torch.float64)
    x, _ = _blobs(n=64, d=6, k=4, dtype=torch.float64)
    bf = curvbound.compile(net, x[:1], norms="estimate")
    bf.refresh()
    cert = curvbound.certify(net, x, bound_fn=bf, local=False, norms="estimate", solver="closed")
    pred = cert.predicted
    mg = bf.margins(differentiable=True)
    r = margin_radii(net, x, pred, mg.curvature)
    assert cert.margin_source.startswith("pairwise")
    assert torch.allclose(r.detach(), cert.curvature_radius, rtol=1e-7, atol=1e-12)
    # one number for every pair: the √2·M route
    m = math.sqrt(2) * float(bf().curvature)
    r2 = margin_radii(net, x, pred, m)
    assert (r2.detach() <= r.detach() * (1 + 1e-12)).all()  # pairwise constants are tighter


def test_radius_gradient_is_the_finite_difference():
    net = _mlp(d=5, w=8, k=3, depth=3, dtype=torch.float64)
    x, y = _blobs(n=16, d=5, k=3, dtype=torch.float64)
    pen = curvbound.CurvaturePenalty(net, x[:1], refresh_steps=0)
    pen.converge()

    def loss():
        return curvbound.radius_loss(net, x, y, pen, eps=5.0)

    assert float(loss()) > 0
    analytic, fd = _directional_fd(pen, loss, net)
    assert analytic == pytest.approx(fd, rel=1e-5)
    # in the input as well (double backpropagation through the margin gradients)
    xs = x[:3].clone().requires_grad_(True)
    mg = pen.margin_curvatures().detach()
    torch.autograd.gradcheck(lambda z: margin_radii(net, z, y[:3], mg), (xs,))


def test_radius_loss_is_zero_when_certified_and_checks_inputs():
    net = _mlp(d=3, w=6, k=3, depth=3)
    x, y = _blobs(n=8, d=3, k=3)
    pen = curvbound.CurvaturePenalty(net, x[:1])
    r = margin_radii(net, x, y, pen.margin_curvatures())
    per = curvbound.radius_loss(net, x, y, pen, eps=1e-9, reduction="none")
    assert torch.equal(per == 0, r.detach() >= 1e-9)
    with pytest.raises(curvbound.InputError, match="eps"):
        curvbound.radius_loss(net, x, y, pen, eps=0.0)
    with pytest.raises(curvbound.InputError, match="label"):
        margin_radii(net, x, y[:3], 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalty_on_cuda():
    net = _mlp(d=8, w=16, k=4, depth=4).cuda()
    x, y = _blobs(n=64, d=8, k=4)
    x, y = x.cuda(), y.cuda()
    for margins in (False, True):
        pen = curvbound.CurvaturePenalty(net, x[:1], margins=margins)
        loss = nn.functional.cross_entropy(net(x), y) + pen()
        loss = loss + curvbound.radius_loss(net, x, y, pen, eps=0.1)
        loss.backward()
        assert net[0].weight.grad.is_cuda and math.isfinite(pen.value)
        net.zero_grad()


def _doc_blocks(kind: str) -> list[str]:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    return [b.split("```", 1)[0] for b in doc.split(f"```{kind}\n")[1:]]


def test_training_doc_walk_through_runs_and_its_claims_hold():
    import subprocess
    import sys
    from pathlib import Path

    from curvbound.apps import data

    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "train_penalty.py"
    source = script.read_text()
    for block in _doc_blocks("python")[:2]:  # the walk-through's code is the example's code
        assert block.strip() in source, "docs/training.md shows code that examples/ does not run"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, cwd=root).stdout.strip().splitlines()
    steps = [float(line.split()[3]) for line in out if line.startswith("step")]
    assert len(steps) >= 5 and steps[-1] < 0.5 * steps[0]  # M falls during training
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out[-2:]}
    plain, pen = rows["plain"], rows["penalised"]
    assert pen[1] < 0.1 * plain[1]  # certified curvature markedly lower
    assert pen[4] > plain[4] + 0.3  # and far more certified at eps = 0.3
    if data.has_dataset("mnist"):  # the doc shows this very output (bounds may tighten a bit)
        shown = _doc_blocks("text")[0].strip().splitlines()
        assert len(shown) == len(out), "docs/training.md is stale"
        # the trajectory depends on float reduction order (threads, BLAS): 10 % on the steps
        for a, b in zip(shown[:6], out[:6]):
            assert a.split()[:2] == b.split()[:2], "docs/training.md is stale"
            for u, v in zip(a.split()[3::2], b.split()[3::2]):
                assert abs(float(u) - float(v)) <= 0.1 * abs(float(v)), "docs/training.md is stale"
        for a, b in zip(shown[-2:], out[-2:]):
            for u, v in zip(a.split()[1:], b.split()[1:]):
                assert abs(float(u) - float(v)) <= 0.05 * max(1.0, abs(float(v)))
