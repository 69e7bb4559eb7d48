"""The MNIST and CIFAR-10 files of ``shared/data`` and a small deterministic training loop.

The datasets are never part of the package: they are found through an explicit ``path``, else the
environment variable ``CURVBOUND_DATA``, else ``shared/data`` next to the repository root (the
layout of the development checkout). Tests call :func:`has_dataset` and skip when it is False.

>>> x, y = load_mnist("test", limit=4)  # doctest: +SKIP
>>> x.shape, x.dtype, y.dtype  # doctest: +SKIP
(torch.Size([4, 1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DATA_ENV",
    "FILES",
    "accuracy",
    "data_dir",
    "has_dataset",
    "load_cifar10",
    "load_mnist",
    "train_classifier",
]

DATA_ENV = "CURVBOUND_DATA"
"""Environment variable naming the folder that holds the dataset files."""

FILES = {"mnist": "mnist.npz", "cifar10": "cifar10_jpeg.npz"}
"""Dataset name → file name inside the data folder (see shared/data/README.md for the layouts)."""

_SPLITS = ("train", "test")


def _default_dir() -> Path:
    # The repository root is the package itself (runtime/ is one level below); shared/ is beside it.
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dataset folder: ``path``, else ``$CURVBOUND_DATA``, else ``<repo>/../shared/data``.

    An explicit ``path`` or environment variable that does not exist is an error rather than
    silently falling back. Raises ``FileNotFoundError`` naming every place tried and how to point
    elsewhere.
    """
    if path is not None:
        candidates = [(Path(path), "the path argument")]
    elif os.environ.get(DATA_ENV):
        candidates = [(Path(os.environ[DATA_ENV]), f"${DATA_ENV}")]
    else:
        candidates = [(_default_dir(), "the default next to the repository")]
    for folder, _ in candidates:
        if folder.is_dir():
            return folder
    tried = "; ".join(f"{folder} ({origin})" for folder, origin in candidates)
    raise FileNotFoundError(
        f"no curvbound data folder found; tried {tried}. Pass path=... (or --data-dir) or set "
        f"{DATA_ENV} to the folder holding {' and '.join(FILES.values())}.")


def _dataset_file(name: str, path: str | os.PathLike[str] | None) -> Path:
    if name not in FILES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(FILES)}")
    if path is not None and Path(path).is_file():
        return Path(path)
    file = data_dir(path) / FILES[name]
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; the {name} dataset is the file "
                                f"{FILES[name]} (see shared/data/README.md)")
    return file


def has_dataset(name: str, path: str | os.PathLike[str] | None = None) -> bool:
    """Whether the file of dataset ``name`` ("mnist" or "cifar10") can be found (to skip tests)."""
    try:
        _dataset_file(name, path)
    except FileNotFoundError:
        return False
    return True


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def load_mnist(split: str = "test", path: str | os.PathLike[str] | None = None,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images as float32 (N, 1, 28, 28) in [0, 1] and labels as int64 (N,).

    ``path`` is the data folder or the ``mnist.npz`` file itself; ``limit`` keeps the first images
    (each split was shuffled once when the file was made, so a prefix is a fair sample).
    """
    _check_split(split)
    with np.load(_dataset_file("mnist", path)) as archive:
        images = archive[f"x_{split}"][:limit]
        labels = archive[f"y_{split}"][:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_cifar10(split: str = "test", path: str | os.PathLike[str] | None = None,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images as float32 (N, 3, 32, 32) in [0, 1] and labels as int64 (N,).

    The file stores JPEG bytes, decoded here with Pillow (needed only for this function). ``path``
    is the data folder or the ``cifar10_jpeg.npz`` file; ``limit`` decodes only the first images.
    """
    _check_split(split)
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("load_cifar10 decodes JPEG images with Pillow; install it with "
                          "`pip install pillow` (or the `data` extra of curvbound)") from error
    with np.load(_dataset_file("cifar10", path)) as archive:
        blob = archive[f"{split}_jpeg"]
        offsets = archive[f"{split}_offsets"]
        labels = archive[f"y_{split}"][:limit]
    count = len(labels)
    pixels = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as image:
            pixels[i] = np.asarray(image.convert("RGB"))
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     weight_decay: float = 0.0,
                     regularizer: Callable[[nn.Module], torch.Tensor] | None = None
                     ) -> nn.Module:
    """Train ``model`` in place with Adam on cross-entropy and return it in eval mode.

    Deterministic on CPU for a given ``seed``: the shuffling uses its own generator and any
    randomness inside the model (dropout) runs under a forked, seeded global state.
    ``regularizer(model)``, if given, is added to every batch's loss (e.g. a differentiable
    curvature bound, theory §9).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x, y = x.to(dtype), y.long()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=shuffle)
            for start in range(0, len(x), batch_size):
                batch = order[start:start + batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                if regularizer is not None:
                    loss = loss + regularizer(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (the model's mode is left as it is)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size].to(dtype))
        correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    return correct / max(len(x), 1)
