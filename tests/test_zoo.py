"""The reference architectures: they build, run, are in eval mode, are seeded and trace with fx."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from curvbound import zoo


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_zoo_has_the_named_entries():
    expected = {"mnist_3f", "mnist_6f", "cifar_6c2f", "cifar_6f", "residual_mlp", "residual_cnn_bn",
                "concat", "all_activations"}
    assert expected <= set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_entry_builds_runs_and_is_in_eval_mode(name):
    model, shape = zoo.ZOO[name]()
    assert isinstance(shape, torch.Size)
    assert not any(module.training for module in model.modules())
    x = torch.rand(3, *shape)
    out = model(x)
    assert out.shape[0] == 3 and out.dim() == 2
    assert torch.isfinite(out).all()
    # Eval mode: a sample's output does not depend on the rest of the batch (batch norm included).
    assert torch.allclose(model(x[:1]), out[:1], atol=1e-6)
    again, _ = zoo.ZOO[name]()
    assert _same_state(model, again)
    assert torch.equal(again(x), out)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_entry_traces_with_fx(name):
    model, shape = zoo.ZOO[name]()
    traced = fx.symbolic_trace(model)
    x = torch.rand(2, *shape)
    assert torch.allclose(traced(x), model(x))


@pytest.mark.parametrize("build", [
    lambda seed: zoo.mlp([5, 7, 3], seed=seed),
    lambda seed: zoo.mnist_mlp(3, seed=seed),
    lambda seed: zoo.residual_mlp(seed=seed),
    lambda seed: zoo.residual_cnn_bn(seed=seed),
    lambda seed: zoo.concat_model(seed=seed),
    lambda seed: zoo.all_activations_model(seed=seed),
])
def test_builders_are_seeded_and_leave_the_global_rng_alone(build):
    state = torch.random.get_rng_state()
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_state(a, b)
    assert not _same_state(a, c)


def _linear_widths(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def test_paper_mlp_widths():
    assert _linear_widths(zoo.mnist_mlp(3)) == [784, 100, 100, 10]
    assert _linear_widths(zoo.mnist_mlp(6)) == [784, 100, 100, 100, 100, 100, 10]
    assert _linear_widths(zoo.cifar_6f()) == [3072, 1024, 512, 256, 256, 128, 10]
    assert isinstance(zoo.mnist_mlp(4)[0], nn.Flatten)
    with pytest.raises(ValueError):
        zoo.mnist_mlp(1)


def test_cifar_6c2f_matches_the_paper():
    model = zoo.cifar_6c2f()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    spec = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
            for c in convs]
    assert spec == [(3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1),
                    (64, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
    assert _linear_widths(model) == [1024, 512, 10]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 7


def test_activation_is_a_parameter():
    model = zoo.mlp([4, 6, 6, 2], act=nn.Softplus)
    assert [type(m) for m in model] == [nn.Linear, nn.Softplus, nn.Linear, nn.Softplus, nn.Linear]
    conv = zoo.cifar_6c2f(act=lambda: nn.Softplus(beta=2.0))
    assert all(m.beta == 2.0 for m in conv.modules() if isinstance(m, nn.Softplus))
    assert not any(isinstance(m, nn.Tanh) for m in zoo.residual_cnn_bn(act=nn.SiLU).modules())


def test_batch_norm_statistics_are_not_trivial():
    model = zoo.residual_cnn_bn()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) >= 2
    for bn in norms:
        assert bn.running_mean.abs().max() > 0.01
        assert (bn.running_var - 1).abs().max() > 0.01
        assert (bn.weight - 1).abs().max() > 0.01
    assert any(isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d) for m in model.modules())


def test_residual_models_have_skip_connections():
    graph = fx.symbolic_trace(zoo.residual_mlp()).graph
    assert sum(n.target is operator.add for n in graph.nodes) == 2
    graph = fx.symbolic_trace(zoo.residual_cnn_bn()).graph
    assert any(n.target is operator.add for n in graph.nodes)
    graph = fx.symbolic_trace(zoo.concat_model()).graph
    assert any(n.target is torch.cat for n in graph.nodes)


def test_all_activations_model_uses_every_activation():
    model = zoo.all_activations_model()
    kinds = {type(m) for m in model.modules()}
    assert {nn.Tanh, nn.Sigmoid, nn.Softplus, zoo.CenteredSoftplus, nn.SiLU, nn.GELU, nn.ELU,
            nn.CELU, nn.Mish, nn.LogSigmoid} <= kinds
    gelus = {m.approximate for m in model.modules() if isinstance(m, nn.GELU)}
    assert gelus == {"none", "tanh"}
    targets = {n.target for n in fx.symbolic_trace(model).graph.nodes}
    assert {torch.tanh, F.softplus, "sigmoid", operator.neg, operator.mul} <= targets
    # The initialisation keeps the long chain alive: outputs vary with the input.
    out = model(torch.randn(64, 8))
    assert out.std(dim=0).min() > 1e-2


def test_centered_softplus():
    module = zoo.CenteredSoftplus(beta=2.0)
    x = torch.linspace(-3, 3, 13)
    assert module(torch.zeros(1)).abs().item() < 1e-7
    assert torch.allclose(module(x), F.softplus(x, beta=2.0) - math.log(2.0) / 2.0)
    assert "beta=2.0" in repr(module)
