"""Dataset loading (skipped without the files) and the deterministic training loop."""

from __future__ import annotations

import sys

import pytest
import torch

from curvbound import zoo
from curvbound.apps import data

needs_mnist = pytest.mark.skipif(
    not data.has_dataset("mnist"),
    reason=f"mnist.npz not found (set {data.DATA_ENV} to the folder holding it)")
needs_cifar = pytest.mark.skipif(
    not data.has_dataset("cifar10"),
    reason=f"cifar10_jpeg.npz not found (set {data.DATA_ENV} to the folder holding it)")


@needs_mnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist(split):
    x, y = data.load_mnist(split, limit=400)
    assert x.shape == (400, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (400,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    assert abs(float(x.mean()) - 0.1307) < 0.015


@needs_cifar
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10(split):
    x, y = data.load_cifar10(split, limit=300)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (300,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    assert 0.35 < float(x.mean()) < 0.6
    assert x.is_contiguous()


@needs_mnist
def test_path_may_name_the_folder_or_the_file():
    folder = data.data_dir()
    a, _ = data.load_mnist(path=folder, limit=3)
    b, _ = data.load_mnist(path=folder / data.FILES["mnist"], limit=3)
    assert torch.equal(a, b)


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*CURVBOUND_DATA"):
        data.data_dir(missing)
    monkeypatch.setenv(data.DATA_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=r"\$CURVBOUND_DATA"):
        data.data_dir()
    assert not data.has_dataset("mnist")


def test_environment_variable_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path
    assert not data.has_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="cifar10_jpeg.npz"):
        data.load_cifar10(limit=1)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.has_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("validation", path=tmp_path)


def test_cifar_without_pillow_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="Pillow"):
        data.load_cifar10(limit=1)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(3, 5, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return centres[y] + torch.randn(n, 5, generator=gen), y


def test_train_classifier_is_deterministic_and_learns():
    x, y = _blobs(600, seed=0)
    state = torch.random.get_rng_state()
    models = [data.train_classifier(zoo.mlp([5, 16, 3], seed=1), x, y, epochs=5, batch_size=64,
                                    lr=1e-2, seed=2) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not models[0].training
    x_test, y_test = _blobs(300, seed=0)
    assert data.accuracy(models[0], x_test, y_test) > 0.9


def test_train_classifier_adds_the_regularizer():
    x, y = _blobs(200, seed=1)
    plain = data.train_classifier(zoo.mlp([5, 8, 3], seed=0), x, y, epochs=3, lr=1e-2)
    shrunk = data.train_classifier(
        zoo.mlp([5, 8, 3], seed=0), x, y, epochs=3, lr=1e-2,
        regularizer=lambda m: 10.0 * sum(p.square().sum() for p in m.parameters()))
    size = [sum(float(p.square().sum()) for p in m.parameters()) for m in (plain, shrunk)]
    assert size[1] < size[0]
    with pytest.raises(ValueError, match="samples"):
        data.train_classifier(plain, x, y[:10])
