"""Certify a small tanh network on MNIST (synthetic blobs when the data is absent).

Trains 784-48-48-10 for two epochs on 8,000 images (a few seconds), then certifies 300 test
images with the default (convex) certificate and curvature anchored at each image, compares with
global curvature and with the paper's closed form, and checks the adversarial examples of the
attack certificates. docs/certificates.md shows its output.

Run from the repository root:  python examples/certify_mnist.py
"""

from __future__ import annotations

import torch
from torch import nn

import curvbound
from curvbound.apps import data


def load():
    if data.has_dataset("mnist"):
        x, y = data.load_mnist("train", limit=8000)
        xt, yt = data.load_mnist("test", limit=300)
        return x, y, xt, yt, 28 * 28
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(10, 20, generator=gen)
    y = torch.randint(0, 10, (8300,), generator=gen)
    x = (centres[y] + 0.12 * torch.randn(8300, 20, generator=gen)).clamp(0, 1)
    return x[:8000], y[:8000], x[8000:], y[8000:], 20


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, xt, yt, n_in = load()
    net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 48), nn.Tanh(), nn.Linear(48, 48),
                        nn.Tanh(), nn.Linear(48, 10))  # fmt: skip
    data.train_classifier(net, x, y, epochs=2, lr=2e-3, seed=0)

    # one compiled bound serves both: global without an anchor, per-sample anchored with one
    bf = curvbound.compile(net, xt[:1], norms="certified", anchored=True)
    cert = curvbound.certify(net, xt, yt, bound_fn=bf)
    print(cert.summary([0.1, 0.2, 0.3, 0.5]))

    glob = curvbound.certify(net, xt, yt, bound_fn=bf, local=False)
    closed = curvbound.certify(net, xt, yt, bound_fn=bf, solver="closed")
    ok = cert.correct
    print(
        f"\nmedian certified radius: closed form {float(closed.radius[ok].median()):.4f}, "
        f"convex with global curvature {float(glob.radius[ok].median()):.4f}, "
        f"convex with anchored {float(cert.radius[ok].median()):.4f}"
    )

    adv = cert.adversarial_examples(domain=(0.0, 1.0))
    flipped = adv.predictions(net) != cert.predicted[adv.index]
    print(
        f"attack certificates: {len(adv)}, misclassified by a forward pass: {int(flipped.sum())}, "
        f"inside [0, 1]^n: {int(adv.in_domain.sum())}"
    )


if __name__ == "__main__":
    main()
