"""Reference architectures for tests, examples and benchmarks.

Every builder returns a model in eval mode whose parameters (and batch-norm statistics) depend
only on ``seed``; the global random state is left untouched. ``act`` is an activation *factory*: a
module class such as ``nn.Tanh`` or any zero-argument callable returning a fresh module, e.g.
``functools.partial(nn.Softplus, beta=2.0)``. All forwards are plain tensor code that ``torch.fx``
can trace.

The paper's models (theory §12): MNIST ``kF`` = 784-(100×(k−1))-10 (``k`` linear layers), CIFAR-10
``6F`` = 3072-1024-512-256-256-128-10 and ``6C2F`` (six convolutions, two linear layers).

>>> model, shape = ZOO["mnist_3f"]()
>>> model(torch.zeros(2, *shape)).shape
torch.Size([2, 10])
>>> sorted(ZOO)[:3]
['all_activations', 'cifar_6c2f', 'cifar_6f']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .nn import CenteredSoftplus

__all__ = [
    "ZOO",
    "ActFactory",
    "AllActivations",
    "CenteredSoftplus",
    "ConcatModel",
    "ConvResidualBlock",
    "ResidualBlock",
    "ResidualCNN",
    "ResidualMLP",
    "all_activations_model",
    "cifar_6c2f",
    "cifar_6f",
    "concat_model",
    "mlp",
    "mnist_mlp",
    "residual_cnn_bn",
    "residual_mlp",
]

ActFactory = Callable[[], nn.Module]
"""A zero-argument callable returning a fresh activation module (``nn.Tanh`` itself qualifies)."""


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded, restoring the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _chain(widths: list[int], act: ActFactory) -> list[nn.Module]:
    """Linear layers between consecutive widths with ``act`` after every one but the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(act())
    return layers


def mlp(widths: list[int], act: ActFactory = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """Plain MLP ``Linear, act, …, Linear`` through ``widths`` (input width first).

    >>> mlp([4, 8, 3])
    Sequential(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): Tanh()
      (2): Linear(in_features=8, out_features=3, bias=True)
    )
    """
    if len(widths) < 2:
        raise ValueError(f"mlp needs at least an input and an output width, got {widths}")
    with _seeded(seed):
        model = nn.Sequential(*_chain(list(widths), act))
    return model.eval()


def mnist_mlp(depth: int, act: ActFactory = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """The paper's MNIST ``{depth}F``: Flatten, 784-(100×(depth−1))-10 (``depth`` linear layers).

    ``mnist_mlp(3)`` is 784-100-100-10 and ``mnist_mlp(6)`` is 784-100-100-100-100-100-10; the input
    has shape (1, 28, 28).
    """
    if depth < 2:
        raise ValueError(f"mnist_mlp needs depth >= 2 linear layers, got {depth}")
    widths = [28 * 28] + [100] * (depth - 1) + [10]
    with _seeded(seed):
        model = nn.Sequential(nn.Flatten(), *_chain(widths, act))
    return model.eval()


def cifar_6f(act: ActFactory = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """The paper's CIFAR-10 ``6F``: Flatten, 3072-1024-512-256-256-128-10; input (3, 32, 32)."""
    widths = [3 * 32 * 32, 1024, 512, 256, 256, 128, 10]
    with _seeded(seed):
        model = nn.Sequential(nn.Flatten(), *_chain(widths, act))
    return model.eval()


def cifar_6c2f(act: ActFactory = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """The paper's CIFAR-10 ``6C2F``; input (3, 32, 32).

    Convolutions (in→out, kernel, stride, padding): 3→32 k3 s1 p1, 32→32 k4 s2 p1, 32→64 k3 s1 p1,
    64→64 k4 s2 p1, 64→64 k3 s1 p1, 64→64 k4 s2 p1, each followed by ``act``; then Flatten
    (64·4·4 = 1024), Linear 1024→512, ``act``, Linear 512→10.
    """
    convs = [(3, 32, 3, 1), (32, 32, 4, 2), (32, 64, 3, 1), (64, 64, 4, 2), (64, 64, 3, 1),
             (64, 64, 4, 2)]
    with _seeded(seed):
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in convs:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=1), act()]
        layers += [nn.Flatten(), nn.Linear(64 * 4 * 4, 512), act(), nn.Linear(512, 10)]
        model = nn.Sequential(*layers)
    return model.eval()


class ResidualBlock(nn.Module):
    """x ↦ x + W₂ act(W₁ x + b₁) + b₂ (width-preserving)."""

    def __init__(self, width: int, hidden: int, act: ActFactory = nn.Tanh) -> None:
        super().__init__()
        self.inner = nn.Linear(width, hidden)
        self.act = act()
        self.outer = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(self.act(self.inner(x)))


class ResidualMLP(nn.Module):
    """Linear → act → residual blocks → Linear."""

    def __init__(self, d_in: int, width: int, d_out: int, blocks: int, hidden: int,
                 act: ActFactory = nn.Tanh) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.stem_act = act()
        self.blocks = nn.Sequential(*[ResidualBlock(width, hidden, act) for _ in range(blocks)])
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem_act(self.stem(x))))


def residual_mlp(d_in: int = 16, width: int = 32, d_out: int = 10, blocks: int = 2,
                 hidden: int | None = None, act: ActFactory = nn.Tanh,
                 seed: int = 0) -> ResidualMLP:
    """input → Linear → act → [x + Linear(act(Linear(x)))] × ``blocks`` → Linear; input (d_in,)."""
    with _seeded(seed):
        model = ResidualMLP(d_in, width, d_out, blocks, hidden or width, act)
    return model.eval()


def _randomize_batch_norm(model: nn.Module) -> None:
    """Give every batch norm non-trivial affine parameters and running statistics (caller seeds)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.2 * torch.randn(c))
                module.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0))
                if module.affine:
                    module.weight.copy_(torch.empty(c).uniform_(0.5, 1.5))
                    module.bias.copy_(0.1 * torch.randn(c))


class ConvResidualBlock(nn.Module):
    """x ↦ x + BN(Conv(act(BN(Conv(x))))) with 3×3 same-size convolutions."""

    def __init__(self, channels: int, act: ActFactory = nn.Tanh) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = act()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class ResidualCNN(nn.Module):
    """Conv → BN → act → residual conv blocks → act → AvgPool2d(2) → Flatten → Linear."""

    def __init__(self, in_channels: int, channels: int, size: int, classes: int, blocks: int,
                 act: ActFactory = nn.Tanh) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.stem_act = act()
        self.blocks = nn.Sequential(*[ConvResidualBlock(channels, act) for _ in range(blocks)])
        self.post_act = act()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels * (size // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_act(self.stem_bn(self.stem(x)))
        h = self.post_act(self.blocks(h))
        return self.head(self.flatten(self.pool(h)))


def residual_cnn_bn(in_channels: int = 3, channels: int = 8, size: int = 8, classes: int = 10,
                    blocks: int = 1, act: ActFactory = nn.Tanh, seed: int = 0) -> ResidualCNN:
    """Small residual CNN with batch norm (random running statistics); input (C, size, size)."""
    if size % 2:
        raise ValueError(f"size must be even for the 2×2 average pool, got {size}")
    with _seeded(seed):
        model = ResidualCNN(in_channels, channels, size, classes, blocks, act)
        _randomize_batch_norm(model)
    return model.eval()


class ConcatModel(nn.Module):
    """Two branches of the input, tanh(W₁x) and sigmoid(W₂x), concatenated, then a Linear."""

    def __init__(self, d_in: int, w_tanh: int, w_sigmoid: int, d_out: int) -> None:
        super().__init__()
        self.branch_tanh = nn.Linear(d_in, w_tanh)
        self.branch_sigmoid = nn.Linear(d_in, w_sigmoid)
        self.head = nn.Linear(w_tanh + w_sigmoid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.branch_tanh(x))
        b = torch.sigmoid(self.branch_sigmoid(x))
        return self.head(torch.cat([a, b], dim=1))


def concat_model(d_in: int = 10, w_tanh: int = 12, w_sigmoid: int = 8, d_out: int = 5,
                 seed: int = 0) -> ConcatModel:
    """``Linear(cat[tanh(Linear x), sigmoid(Linear x)])``; input (d_in,)."""
    with _seeded(seed):
        model = ConcatModel(d_in, w_tanh, w_sigmoid, d_out)
    return model.eval()


def _smooth_activations() -> list[nn.Module]:
    """One instance of every smooth activation module the library covers."""
    return [nn.Tanh(), nn.Sigmoid(), nn.Softplus(beta=2.0), CenteredSoftplus(beta=1.5), nn.SiLU(),
            nn.GELU(), nn.GELU(approximate="tanh"), nn.ELU(alpha=1.0), nn.CELU(alpha=0.5),
            nn.Mish(), nn.LogSigmoid()]


class AllActivations(nn.Module):
    """A narrow MLP chain using every smooth activation once, as modules and in functional form.

    Module part: ``Linear → σ`` for each σ of :func:`_smooth_activations`. Functional tail:
    ``torch.tanh``, ``F.softplus``, the method ``.sigmoid()``, a scalar multiply, a negation and a
    sum of two branches, then a final Linear.

    The weights are drawn N(0, gain²/fan_in) (×4 after the sigmoid, whose slope is at most ¼) so
    that the signal neither vanishes nor saturates through the long chain: with the default gain
    the model's Lipschitz and curvature constants are of order 1 rather than 10⁻⁶.
    """

    def __init__(self, d_in: int, width: int, d_out: int, gain: float = 1.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = d_in
        for activation in _smooth_activations():
            layers += [nn.Linear(fan_in, width), activation]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.fc_tanh = nn.Linear(width, width)
        self.fc_softplus = nn.Linear(width, width)
        self.fc_sigmoid = nn.Linear(width, width)
        self.head = nn.Linear(width, d_out)
        previous: nn.Module | None = None
        for module in [*self.body, self.fc_tanh, self.fc_softplus, self.fc_sigmoid, self.head]:
            if isinstance(module, nn.Linear):
                boost = 4.0 if isinstance(previous, nn.Sigmoid) else 1.0
                with torch.no_grad():
                    module.weight.normal_(0.0, boost * gain / math.sqrt(module.in_features))
                    module.bias.normal_(0.0, 0.1)
            previous = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        a = torch.tanh(self.fc_tanh(h))
        b = F.softplus(self.fc_softplus(a))
        c = self.fc_sigmoid(b).sigmoid()
        return self.head(0.5 * a + (-c))


def all_activations_model(d_in: int = 8, width: int = 12, d_out: int = 4, gain: float = 1.25,
                          seed: int = 0) -> AllActivations:
    """See :class:`AllActivations`; input (d_in,)."""
    with _seeded(seed):
        model = AllActivations(d_in, width, d_out, gain)
    return model.eval()


ZOO: dict[str, Callable[[], tuple[nn.Module, torch.Size]]] = {
    "mnist_3f": lambda: (mnist_mlp(3), torch.Size([1, 28, 28])),
    "mnist_6f": lambda: (mnist_mlp(6), torch.Size([1, 28, 28])),
    "cifar_6c2f": lambda: (cifar_6c2f(), torch.Size([3, 32, 32])),
    "cifar_6f": lambda: (cifar_6f(), torch.Size([3, 32, 32])),
    "residual_mlp": lambda: (residual_mlp(), torch.Size([16])),
    "residual_cnn_bn": lambda: (residual_cnn_bn(), torch.Size([3, 8, 8])),
    "concat": lambda: (concat_model(), torch.Size([10])),
    "all_activations": lambda: (all_activations_model(), torch.Size([8])),
}
"""Name → factory returning ``(model in eval mode, input shape without the batch dimension)``."""
