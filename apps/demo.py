"""The main job in under a minute: train a smooth classifier with the curvature penalty, compile its
bound, certify the test split and compare Lipschitz with curvature certificates.

``make demo`` / ``curvbound demo`` runs it on scikit-learn's bundled 8×8 digits (1797 images, no
download); ``curvbound demo --data mnist --data-dir PATH`` on MNIST. Steps:

1. train an MLP with tanh activations on cross-entropy plus λ·M, where M is the network's
   curvature bound (differentiable in the weights) and λ follows the primal–dual update of
   theory §9;
2. compile the trained network with certified norms and print the per-node table;
3. certify every test image: certified ℓ2 radii from the Lipschitz bound and from the curvature
   bound (global, and anchored at each input), and the attack certificates' upper bound on
   robust accuracy;
4. print certified accuracy at several radii, save a plot and say where to go next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pipeline import compile as compile_bound
from .certificates import Certificate, Certifier
from .data import load_mnist
from .training import CurvaturePenalty
from .views import _matplotlib, plot_contributions

__all__ = ["DemoConfig", "DemoResult", "CONFIGS", "load_digits", "run_demo", "curvature_penalty"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and certifies for one dataset (radii in pixel units, ℓ2)."""

    widths: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    weight: float
    target: float
    eps: tuple[float, ...]
    train_limit: int | None = None
    test_limit: int | None = None


CONFIGS = {
    "digits": DemoConfig(widths=(64, 64, 10), epochs=20, batch_size=64, lr=3e-3, weight=0.05,
                         target=1.0, eps=(0.1, 0.25, 0.5, 0.75, 1.0)),
    "mnist": DemoConfig(widths=(784, 128, 10), epochs=2, batch_size=128, lr=2e-3, weight=0.05,
                        target=1.0, eps=(0.25, 0.5, 1.0, 1.58), train_limit=20000,
                        test_limit=1000),
}


@dataclass
class DemoResult:
    """What :func:`run_demo` measured (also printed)."""

    dataset: str
    model: nn.Module
    bound: object
    clean_accuracy: float
    train_seconds: float
    certify_seconds: float
    eps: list[float]
    certified_accuracy: dict[str, list[float]] = field(default_factory=dict)
    attack_upper: list[float] = field(default_factory=list)
    plot: Path | None = None


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels, split once
    with a seeded permutation: ``(x_train, y_train, x_test, y_test)``. Needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as error:
        raise ImportError(
            "the demo's default dataset is scikit-learn's bundled digits: `pip install "
            "scikit-learn` (or pip install 'curvbound[demo]'), or run it on MNIST with "
            "--data mnist --data-dir PATH"
        ) from error
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _load(dataset: str, data_dir: str | None, cfg: DemoConfig):
    if dataset == "digits":
        return load_digits()
    if dataset == "mnist":
        xtr, ytr = load_mnist("train", data_dir, limit=cfg.train_limit)
        xte, yte = load_mnist("test", data_dir, limit=cfg.test_limit)
        return xtr, ytr, xte, yte
    raise ValueError(f"unknown demo dataset {dataset!r}; choose one of {sorted(CONFIGS)}")


def build_model(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """``Flatten, Linear, Tanh, …, Linear`` through ``widths`` (seeded initialisation)."""
    layers: list[nn.Module] = [nn.Flatten()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
    return nn.Sequential(*layers).eval()


def curvature_penalty(model: nn.Module, example: Tensor, *, weight: float,
                      target: float) -> CurvaturePenalty:
    """The demo's curvature penalty (:class:`curvbound.CurvaturePenalty`, bound target).

    Three power-iteration steps per batch keep the estimate within about 1% of the converged
    bound on this small network (measured by the demo's test); the library's default (10) is
    for models whose weights move faster.
    """
    return CurvaturePenalty(model, example[:1], weight=weight, target=target, dual_lr=0.01,
                            refresh_steps=3)


def train(model: nn.Module, x: Tensor, y: Tensor, cfg: DemoConfig, *, seed: int = 0,
          progress: bool = True) -> nn.Module:
    """Adam on cross-entropy + the curvature penalty, with a dual step on λ after every batch."""
    pen = curvature_penalty(model, x, weight=cfg.weight, target=cfg.target)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shuffle = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=cfg.epochs, desc="train", disable=not progress)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for start in range(0, len(x), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch]) + pen()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pen.step()
        bar.update(1)
        bar.set_postfix(M=f"{pen.value:.3g}", lam=f"{pen.weight:.3g}")
    bar.close()
    return model.eval()


def progress_bar(total: int, desc: str, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return _NoBar()
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def certify_split(bf, x: Tensor, y: Tensor, *, batch_size: int = 500,
                  progress: bool = True) -> tuple[Certificate, Certificate]:
    """Certificates of ``(x, y)`` with global curvature and with curvature anchored at each input
    (one compiled bound ``bf``, compiled with ``anchored=True``)."""
    glob = Certifier(bf.model, x[:1], bound_fn=bf, local=False)
    local = Certifier(bf.model, x[:1], bound_fn=bf, local=True)
    parts_g, parts_l = [], []
    bar = progress_bar(total=len(x), desc="certify", disable=not progress)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        parts_g.append(glob(xb, yb))
        parts_l.append(local(xb, yb))
        bar.update(len(xb))
    bar.close()
    return Certificate.cat(parts_g), Certificate.cat(parts_l)


def accuracy_table(glob: Certificate, local: Certificate, eps: list[float]) -> dict[str, list]:
    """Certified accuracy per ε with each kind of certificate, and the attack upper bound."""
    def frac(r: Tensor, e: float) -> float:
        return float((local.correct & (r > e)).double().mean())

    best = torch.maximum(local.radius, glob.radius)
    return {
        "lipschitz": [frac(local.lipschitz_radius, e) for e in eps],
        "curvature": [frac(glob.curvature_radius, e) for e in eps],
        "anchored": [frac(local.curvature_radius, e) for e in eps],
        "best": [frac(best, e) for e in eps],
        "attack_upper": [min(local.robust_accuracy_upper(e), glob.robust_accuracy_upper(e))
                         for e in eps],
    }


def format_accuracy(table: dict[str, list], eps: list[float]) -> str:
    """The certified-accuracy table as text, one row per ε."""
    cols = [("eps", "Lipschitz", "curvature", "anchored", "best", "attack bound")]
    for i, e in enumerate(eps):
        cols.append((f"{e:g}",) + tuple(
            f"{100 * table[k][i]:.1f}%"
            for k in ("lipschitz", "curvature", "anchored", "best", "attack_upper")))
    widths = [max(len(r[j]) for r in cols) for j in range(len(cols[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_accuracy(table: dict[str, list], eps: list[float], path: Path, title: str,
                  bf=None) -> Path:
    """Certified accuracy against ε (and, given ``bf``, the per-node curvature shares)."""
    plt = _matplotlib()
    ncols = 2 if bf is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 4.4), squeeze=False)
    ax = axes[0, 0]
    for key, label, style in (("lipschitz", "Lipschitz certificates", "s--"),
                              ("curvature", "curvature (global)", "o-"),
                              ("anchored", "curvature (anchored)", "^-"),
                              ("attack_upper", "attack upper bound", "k:")):
        ax.plot(eps, [100 * v for v in table[key]], style, label=label)
    ax.set_xlabel("ℓ2 radius ε (pixel units)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if bf is not None:
        plot_contributions(bf, ax=axes[0, 1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


NEXT_STEPS = """Where to go next:
  curvbound inspect MODEL --input-shape 1,3,32,32    the per-node table of your own model
  curvbound certify MODEL --data mnist --weights W.pt  certify a trained model on a dataset
  docs/index.md (start here), docs/cli.md (the command line), docs/certificates.md,
  docs/ops.md (the ops curvbound covers), docs/writing_rules.md (cover your own layers)"""


def run_demo(dataset: str = "digits", data_dir: str | None = None, *, out: str | Path = ".",
             seed: int = 0, epochs: int | None = None, progress: bool = True,
             plot: bool = True, echo=print) -> DemoResult:
    """Train, compile, certify and report on ``dataset`` ("digits" or "mnist"); see the module
    docstring. ``out`` is the folder of the plot ``demo_<dataset>.png``; ``echo`` prints."""
    if dataset not in CONFIGS:
        raise ValueError(f"unknown demo dataset {dataset!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[dataset]
    if epochs is not None:
        cfg = DemoConfig(**{**cfg.__dict__, "epochs": epochs})
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = _load(dataset, data_dir, cfg)
    model = build_model(cfg.widths, seed)
    arch = "-".join(map(str, cfg.widths))
    echo(f"1. train a {arch} tanh network on {dataset} ({len(xtr)} training images, "
         f"{cfg.epochs} epochs) with the curvature penalty λ·M (target M = {cfg.target:g})")
    t0 = time.perf_counter()
    train(model, xtr, ytr, cfg, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        clean = float((model(xte).argmax(1) == yte).double().mean())
    echo(f"   trained in {train_s:.1f} s; clean test accuracy {100 * clean:.1f}%")
    echo("\n2. compile its bound (certified norms) and see where the curvature comes from:")
    bf = compile_bound(model, xte[:1], norms="certified", anchored=True)
    echo(bf.table(sort="graph"))
    echo(f"\n3. certify the {len(xte)} test images (ℓ2 radii, pixel units in [0, 1])")
    t0 = time.perf_counter()
    glob, local = certify_split(bf, xte, yte, progress=progress)
    cert_s = time.perf_counter() - t0
    eps = list(cfg.eps)
    table = accuracy_table(glob, local, eps)
    kind = "certified" if local.certified else "ESTIMATED"
    echo(f"   certified in {cert_s:.1f} s; bounds {kind}; margins {local.margin_source}")
    echo("\ncertified accuracy (share of test images provably classified correctly within ε):")
    echo(format_accuracy(table, eps))
    echo("Lipschitz: radius m/L; curvature: the curvature certificate with the global bound M;\n"
         "anchored: with M anchored at each input (theory §7); best: the largest valid radius;\n"
         "attack bound: accuracy left after the attack certificates (an upper bound).")
    result = DemoResult(dataset, model, bf, clean, train_s, cert_s, eps,
                        {k: v for k, v in table.items() if k != "attack_upper"},
                        table["attack_upper"])
    if plot:
        path = Path(out) / f"demo_{dataset}.png"
        try:
            plot_accuracy(table, eps, path, f"{dataset} {arch} tanh, penalised (M = "
                          f"{float(bf().curvature):.3g})", bf=bf)
            result.plot = path
            echo(f"\nplot saved to {path}")
        except ImportError as error:
            echo(f"\nno plot: {error}")
    echo("\n" + NEXT_STEPS)
    return result
