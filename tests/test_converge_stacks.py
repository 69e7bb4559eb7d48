"""The batched convergence (runtime/converge.py stacks) against a straightforward evaluation of
the same quantities: every quantity's AᵀA applied on its own through its operator (autograd for
the adjoint), and one Lanczos cycle per quantity with plain per-vector float64 bookkeeping.
No timings here: speed is measured by benchmarks/run.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvbound
from curvbound.apps import zoo
from curvbound.runtime import converge as cv
from curvbound.runtime.norms import Norm
from curvbound.runtime.products import LANCZOS_CYCLE, ProductNorm, matrix_of


def _models():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 12), nn.Tanh(), nn.Linear(12, 3),
    ).eval()
    return {
        # deep: many segments of the same structure (one stack), a shorter last segment
        "deep": (zoo.mlp([6] * 21, nn.Tanh), torch.zeros(1, 6)),
        # widths that vary: products of different input sizes in one segment stack
        "widths": (zoo.mlp([5, 9, 7, 11, 6, 8, 4, 10, 3], nn.Tanh), torch.zeros(1, 5)),
        # convolutions: the general route next to the dense stacks
        "cnn": (cnn, torch.zeros(1, 2, 8, 8)),
    }


def _estimates(bf):
    return [q for q in bf.quantities.values() if isinstance(q, Norm) and not q.certified]


def _reference_gram(q: Norm, x: torch.Tensor) -> torch.Tensor:
    """AᵀA x for one quantity on its own: its operator's product applied by autograd."""
    with torch.enable_grad():
        x = x.detach().to(q._dtype()).requires_grad_(True)
        y = q.op.apply(x)
        (g,) = torch.autograd.grad(y, x, y.detach())
    return g.detach()


def _reference_cycle(q: Norm, length: int) -> None:
    """One restarted Lanczos cycle for one quantity, written out per vector."""
    v = [q.u.detach().reshape(-1).double()]
    v[0] = v[0] / v[0].norm()
    alphas, betas, tail = [], [], None
    for step in range(length):
        w = _reference_gram(q, v[-1].reshape(q.u.shape)).reshape(-1).double()
        alphas.append(float(v[-1] @ w))
        for _ in range(2):
            for b in v:
                w = w - (b @ w) * b
        if step == length - 1:
            tail = w
            break
        b = float(w.norm())
        if b <= 1e-12 * abs(alphas[-1]):  # an invariant subspace: the rest of the basis is 0
            betas.append(0.0)
            v.append(torch.zeros_like(w))
            continue
        betas.append(b)
        v.append(w / b)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas, dtype=torch.float64)
    t = t + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(t)
    y = vecs[:, -1]
    u = vals[-1] * (torch.stack(v).T @ y) + y[-1] * tail
    q.u.copy_((u / u.norm()).reshape(q.u.shape).to(q.u.dtype))


@pytest.mark.parametrize("name", ["deep", "widths", "cnn"])
def test_stacked_gram_equals_each_quantity_on_its_own(name):
    model, x = _models()[name]
    bf = curvbound.compile(model, x, refresh=False)
    norms = _estimates(bf)
    stacks = cv._stacks(cv._groups(norms))
    kinds = {type(s).__name__ for s in stacks}
    if name != "cnn":
        assert "_DenseSegments" in kinds and "_General" not in kinds
    else:
        assert "_General" in kinds
    if name == "deep":
        assert max(s.n_seg for s in stacks if isinstance(s, cv._DenseSegments)) >= 2
    gen = torch.Generator().manual_seed(1)
    seen = 0
    for st in stacks:
        xs = {n: torch.randn(len(ms), n, generator=gen, dtype=torch.float64)
              for n, ms in st.blocks.items()}
        out = st.gram(xs)
        for n, ms in st.blocks.items():
            assert out[n].shape == (len(ms), n)
            for row, q in enumerate(ms):
                want = _reference_gram(q, xs[n][row].reshape(q.u.shape)).reshape(-1).double()
                torch.testing.assert_close(out[n][row], want, rtol=1e-5,
                                           atol=1e-5 * want.abs().max())
                seen += 1
    assert seen == len(norms)  # every estimate in exactly one stack
    # the batched values ‖A u‖ (preset while bound() runs) against each quantity's forward
    values = {}
    for st in cv._stacks(cv._groups(norms), everything=True):
        values.update(st.values())
    assert set(values) <= {id(q) for q in norms}
    if name != "cnn":  # (convolutions: evaluated by the quantities themselves)
        assert len(values) == len(norms)
    for q in norms:
        if id(q) in values:
            assert float(values[id(q)]) == pytest.approx(float(q()), rel=1e-5), q.label


def test_converge_with_batched_values_equals_plain_bound_evaluation():
    model, x = _models()["deep"]
    bf = curvbound.compile(model, x, refresh=False)
    bf.refresh()
    with torch.no_grad():
        out = bf()
    batched = []
    cv.converge(_estimates(bf), lambda: batched.append(bf()) or (0.0,), max_steps=1)
    assert float(batched[0].lipschitz) == pytest.approx(float(out.lipschitz), rel=1e-5)
    assert float(batched[0].curvature) == pytest.approx(float(out.curvature), rel=1e-5)


@pytest.mark.parametrize("name", ["deep", "widths", "cnn"])
def test_batched_cycle_equals_per_quantity_lanczos(name):
    model, x = _models()[name]
    model = model.double()
    x = x.double()
    a = curvbound.compile(model, x, refresh=False)
    b = curvbound.compile(model, x, refresh=False)
    qa, qb = _estimates(a), _estimates(b)
    assert [q.label for q in qa] == [q.label for q in qb]
    groups = cv._groups(qa)
    for _ in range(2):
        cv._cycle(groups, LANCZOS_CYCLE, 0.0)
        for q in qb:
            _reference_cycle(q, LANCZOS_CYCLE)
    for p, q in zip(qa, qb):
        assert float(p()) == pytest.approx(float(q()), rel=1e-9), p.label


def test_batched_convergence_reaches_the_exact_norms():
    model = zoo.mlp([4, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 3], nn.Tanh).double()
    bf = curvbound.compile(model, torch.zeros(1, 4, dtype=torch.float64), refresh=False)
    bf.refresh(tol=1e-10)
    assert bf.last_convergence.converged
    products = 0
    for q in _estimates(bf):
        exact = float(torch.linalg.matrix_norm(matrix_of(q.op).detach().double(), 2))
        est = float(q())
        assert exact * (1 - 1e-6) <= est <= exact * (1 + 1e-9), (q.label, est, exact)
        products += isinstance(q, ProductNorm)
    assert products >= 20


def test_stacks_when_the_first_products_have_settled():
    """Segments whose products starting at the first layers dropped out of the cycles."""
    model, x = _models()["widths"]
    bf = curvbound.compile(model, x, refresh=False)
    groups = cv._groups(_estimates(bf))
    for g in groups:
        if g.segment is not None:
            g.active = [m for m in g.active if m.j >= 2]
    stacks = [s for s in cv._stacks(groups) if isinstance(s, cv._DenseSegments)]
    assert stacks
    gen = torch.Generator().manual_seed(3)
    for st in stacks:
        xs = {n: torch.randn(len(ms), n, generator=gen, dtype=torch.float64)
              for n, ms in st.blocks.items()}
        out = st.gram(xs)
        for n, ms in st.blocks.items():
            for row, q in enumerate(ms):
                want = _reference_gram(q, xs[n][row].reshape(q.u.shape)).reshape(-1).double()
                torch.testing.assert_close(out[n][row], want, rtol=1e-5,
                                           atol=1e-5 * want.abs().max())
    cv._cycle(groups, 3, 0.0)  # runs
