"""Train a small tanh network on MNIST with and without the curvature penalty, then certify both.

The same network, data and optimiser are trained twice for two epochs on 6,000 images: plain
cross-entropy, and cross-entropy + ``curvbound.CurvaturePenalty`` with a bound target (the
paper's primal–dual weight, theory §9). It prints the penalty's M as training goes, the
converged and certified curvature bounds of both models, and their certified accuracies on 300
test images. Synthetic blobs stand in for MNIST when the data is absent. docs/training.md shows
its output.

Run from the repository root:  python examples/train_penalty.py
"""

from __future__ import annotations

import torch
from torch import nn

import curvbound
from curvbound.apps import data


def load():
    if data.has_dataset("mnist"):
        x, y = data.load_mnist("train", limit=6000)
        xt, yt = data.load_mnist("test", limit=300)
        return x, y, xt, yt, 28 * 28
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(10, 20, generator=gen)
    y = torch.randint(0, 10, (6300,), generator=gen)
    x = (centres[y] + 0.12 * torch.randn(6300, 20, generator=gen)).clamp(0, 1)
    return x[:6000], y[:6000], x[6000:], y[6000:], 20


def model(n_in: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 64), nn.Tanh(), nn.Linear(64, 64),
                         nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def train(net, x, y, pen=None, epochs=2, batch=100):
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            logits = net(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            if pen is not None:
                loss = loss + pen()  # weight·M on the live weights
            loss.backward()
            opt.step()
            if pen is not None:
                pen.step()  # primal–dual: the weight follows M − target
                step += 1
                if step % 20 == 0:
                    print(f"step {step:3d}  M {pen.value:7.3f}  weight {pen.weight:.4f}")


def main() -> None:
    torch.set_num_threads(1)
    x, y, xt, yt, n_in = load()
    plain, penalised = model(n_in), model(n_in)
    train(plain, x, y)
    pen = curvbound.CurvaturePenalty(penalised, x[:1], weight=0.01, target=1.0, dual_lr=0.002)
    train(penalised, x, y, pen)
    print(f"converged M of the penalised model: {pen.converge():.3f} (estimate)")
    print("\ncertified on 300 test images (accuracy certified at radius eps)")
    print(f"{'model':<10} {'clean':>6} {'cert. M':>9} {'eps=0.1':>8} {'eps=0.2':>8} {'eps=0.3':>8}")
    for name, net in (("plain", plain), ("penalised", penalised)):
        net.eval()
        bf = curvbound.compile(net, xt[:1], norms="certified", anchored=True)
        cert = curvbound.certify(net, xt, yt, bound_fn=bf)
        accs = " ".join(f"{cert.certified_accuracy(e):8.3f}" for e in (0.1, 0.2, 0.3))
        clean = float(cert.correct.double().mean())
        print(f"{name:<10} {clean:6.3f} {float(bf().curvature):9.3f} {accs}")

if __name__ == "__main__":
    main()
