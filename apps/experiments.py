"""The paper's MNIST and CIFAR-10 experiments, one command each (docs/experiments.md).

``run(name, ...)`` trains the experiment's model with the library's own training API (the curvature
penalty with its primal–dual weight update, theory §9), converges the bound, certifies the whole
test set with Lipschitz, global-curvature and anchored-curvature certificates, and writes into the
output folder:

- ``NAME.json``: the record (clean and certified accuracies per ε, the attack-certificate upper
  bound, the certified bounds, budget and timing, the library version, and a certified-accuracy
  curve over a grid of radii from which the plot is drawn);
- ``NAME.pt``: ``{"state_dict": ...}``, loadable into ``build(NAME)``;
- ``NAME.png``: certified accuracy against ε for each certificate (matplotlib, when installed).

Inputs are pixels in [0, 1]; any normalisation is part of the model (:class:`Normalize`), so radii
are in pixel units.

>>> sorted(EXPERIMENTS)[:4]
['cifar-6c2f', 'cifar-6f', 'cifar-sll-3c1f', 'mnist-2f']
>>> build("mnist-3f")
Sequential(
  (0): Flatten(start_dim=1, end_dim=-1)
  (1): Linear(in_features=784, out_features=100, bias=True)
  (2): Softplus(beta=1.0, threshold=20.0)
  (3): Linear(in_features=100, out_features=100, bias=True)
  (4): Softplus(beta=1.0, threshold=20.0)
  (5): Linear(in_features=100, out_features=10, bias=True)
)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pipeline import compile as compile_bound
from . import data as datasets
from .certificates import Certificate, certify_dataset
from .distributed import is_main_process
from .nn import sll_3c1f
from .training import Accuracy, CurvaturePenalty
from .zoo import cifar_6c2f, cifar_6f, mlp

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Normalize",
    "build",
    "run",
    "records_table",
    "plot_record",
]

MNIST_EPS = (0.5, 1.0, 1.58)
CIFAR_EPS = (36 / 255, 72 / 255, 108 / 255, 255 / 255)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)


class Normalize(nn.Module):
    """x ↦ (x − mean)/std per channel: the model's own input normalisation (radii stay in pixels).

    >>> Normalize((0.5,), (0.25,))(torch.ones(1, 1, 2, 2)).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Experiment:
    """One experiment: its model, data, radii and training budget.

    The loss is the paper's ``τ·CE((f(x) − o·onehot(y))/τ, y) + weight·M`` (theory §9) with offset
    ``o`` and temperature ``τ``; ``penalty=False`` trains the same model without the curvature term
    (the baseline). The primal–dual update steers the weight toward ``accuracy`` (the paper's
    accuracy target: the weight grows while the batch accuracy is above it) or, when that is None,
    toward the curvature bound ``target``.
    """

    name: str
    dataset: str
    factory: Callable[[], nn.Module]
    eps: tuple[float, ...]
    penalty: bool = True
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    offset: float = 1.0
    temperature: float = 0.25
    weight: float = 0.1
    target: float | None = None
    accuracy: float | None = None
    dual_lr: float = 0.01
    weight_min: float = 1e-4
    margins: bool = False
    augment: bool = False
    description: str = ""


def _mnist(widths: list[int]) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Flatten(), *mlp(widths, act=nn.Softplus))

    return factory


def _cifar(base: Callable[..., nn.Sequential]) -> Callable[[], nn.Module]:
    # the paper's models subtract the mean only (dividing by the std would scale every radius)
    def factory() -> nn.Module:
        return nn.Sequential(Normalize(CIFAR_MEAN, (1.0, 1.0, 1.0)), *base())

    return factory


_BASE = [
    Experiment(
        "mnist-2f", "mnist", _mnist([784, 1024, 10]), MNIST_EPS,
        description="784-1024-10 softplus (the shape of CRT's 2-layer network)",
        offset=3.0, weight=0.1, target=0.5, dual_lr=0.05,
    ),
    Experiment(
        "mnist-3f", "mnist", _mnist([784, 100, 100, 10]), MNIST_EPS,
        description="the paper's 3F: 784-100-100-10 softplus", offset=3.0, weight=0.1,
        target=0.5, dual_lr=0.05,
    ),
    Experiment(
        "mnist-6f", "mnist", _mnist([784, 100, 100, 100, 100, 100, 10]), MNIST_EPS,
        description="the paper's 6F: 784-100×5-10 softplus", offset=3.0, weight=0.1,
        target=0.5, dual_lr=0.05,
    ),
    Experiment(
        "cifar-6c2f", "cifar10", _cifar(lambda: cifar_6c2f(act=nn.Tanh)), CIFAR_EPS,
        batch_size=128, augment=True,
        description="the paper's 6C2F (tanh); the mean is subtracted inside the model",
        offset=1.0, weight=0.1, target=0.5,
    ),
    Experiment(
        "cifar-6f", "cifar10", _cifar(lambda: cifar_6f(act=nn.Tanh)), CIFAR_EPS,
        batch_size=256, augment=True,
        description="the paper's 6F: 3072-1024-512-256-256-128-10 (tanh)",
        offset=1.0, weight=0.1, target=0.5,
    ),
    Experiment(
        "cifar-sll-3c1f", "cifar10", _cifar(sll_3c1f), CIFAR_EPS, batch_size=128, augment=True,
        description="SLL 3C1F: three SLL convolutions (15 channels), one SLL linear layer",
        offset=1.0, weight=0.01, target=0.5,
    ),
]

#: name → experiment; each MNIST experiment also has a "-plain" twin trained without the penalty
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in _BASE}
EXPERIMENTS.update(
    {f"{e.name}-plain": replace(e, name=f"{e.name}-plain", penalty=False,
                                description=e.description + ", no curvature penalty")
     for e in _BASE if e.dataset == "mnist"}
)


def _experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}"
        ) from None


def build(name: str, seed: int = 0) -> nn.Module:
    """The untrained model of experiment ``name`` (eval mode), initialised from ``seed``."""
    exp = _experiment(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = exp.factory()
    return model.eval()


def _load(dataset: str, split: str, data_dir, limit: int | None) -> tuple[Tensor, Tensor]:
    loader = datasets.load_mnist if dataset == "mnist" else datasets.load_cifar10
    return loader(split, data_dir, limit=limit)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crops of the 4-pixel zero-padded image and horizontal flips (the usual CIFAR
    augmentation), one draw per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    idx = torch.arange(n)[:, None, None, None]
    out = padded[idx, torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _loss(logits: Tensor, y: Tensor, offset: float, temperature: float) -> Tensor:
    shifted = logits - offset * F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return temperature * F.cross_entropy(shifted / temperature, y)


def train(exp: Experiment, model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int,
          progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place (Adam, cosine learning rate) and return the training log."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=exp.lr)
    steps = epochs * math.ceil(len(x) / exp.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    pen = None
    if exp.penalty:
        target = Accuracy(exp.accuracy) if exp.accuracy is not None else exp.target
        pen = CurvaturePenalty(model, x[:1], weight=exp.weight, target=target,
                               dual_lr=exp.dual_lr, weight_min=exp.weight_min,
                               margins=exp.margins)
    log: dict[str, Any] = {"epochs": [], "steps": steps}
    bar = _progress(steps, f"train {exp.name}", progress)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total, correct, seen = 0.0, 0, 0
        for start in range(0, len(x), exp.batch_size):
            idx = order[start:start + exp.batch_size]
            xb, yb = x[idx], y[idx]
            if exp.augment:
                xb = _augment(xb, gen)
            logits = model(xb)
            loss = _loss(logits, yb, exp.offset, exp.temperature)
            if pen is not None:
                loss = loss + pen()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pen is not None:
                pen.step(logits=logits, labels=yb)
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if bar is not None:
                bar.update(1)
        entry = {"epoch": epoch + 1, "loss": total / seen, "train_accuracy": correct / seen}
        if pen is not None:
            entry["penalty_weight"] = float(pen.weight)
            entry["curvature_estimate"] = float(pen.value)
        log["epochs"].append(entry)
    if bar is not None:
        bar.close()
    model.eval()
    if pen is not None:
        pen.converge()
    return log


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _fraction(mask: Tensor) -> float:
    return float(mask.double().mean()) if len(mask) else float("nan")


def summarize(global_cert: Certificate, local_cert: Certificate,
              eps: Sequence[float]) -> dict[str, Any]:
    """Certified accuracies per ε for each certificate, the attack bound, and the curves."""
    ok = global_cert.correct
    lip = global_cert.lipschitz_radius
    curv = global_cert.curvature_radius
    anch = local_cert.curvature_radius
    best = torch.stack([lip, curv, anch, global_cert.radius, local_cert.radius]).amax(0)
    attack = torch.minimum(global_cert.attack_radius, local_cert.attack_radius)
    radii = {"lipschitz": lip, "curvature": curv, "anchored": anch, "best": best}

    def acc(r: Tensor, e: float) -> float:
        return _fraction(ok & (r > e))

    out = {k: [acc(r, e) for e in eps] for k, r in radii.items()}
    upper = [_fraction(ok & ~(attack < e)) for e in eps]
    top = max(eps) * 1.25
    grid = [top * i / 40 for i in range(41)]
    curve = {"eps": grid, **{k: [acc(r, e) for e in grid] for k, r in radii.items()},
             "attack_upper": [_fraction(ok & ~(attack < e)) for e in grid]}
    return {"certified_accuracy": out, "attack_upper": upper, "curve": curve,
            "attack_certificates": int((attack < math.inf).sum())}


def _version() -> str:
    try:
        return metadata.version("curvbound")
    except metadata.PackageNotFoundError:
        return "unknown"


def run(name: str, *, epochs: int | None = None, seed: int = 0, data_dir=None,
        out: str | Path = "experiments", train_limit: int | None = None,
        test_limit: int | None = None, progress: bool = True,
        certify_only: bool = False) -> dict[str, Any]:
    """Train, converge, certify and record experiment ``name``; returns the JSON record.

    ``epochs`` defaults to the experiment's budget; ``train_limit``/``test_limit`` use a prefix
    of each split (each split was shuffled once when the files were made); ``data_dir`` is the
    dataset folder (``$CURVBOUND_DATA`` or ``../shared/data`` by default). ``certify_only``
    skips training: the model is the checkpoint ``OUT/NAME.pt`` of an earlier run, and the
    training part of the record (budget, time, log) is kept from ``OUT/NAME.json``.
    """
    exp = _experiment(name)
    epochs = exp.epochs if epochs is None else epochs
    if epochs < 0:
        raise ValueError(f"epochs must be ≥ 0, got {epochs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = _load(exp.dataset, "test", data_dir, test_limit)
    torch.manual_seed(seed)
    model = build(name, seed)
    if certify_only:
        for path in (out / f"{name}.pt", out / f"{name}.json"):
            if not path.exists():
                raise FileNotFoundError(f"certify_only needs {path} from an earlier run")
        model.load_state_dict(torch.load(out / f"{name}.pt")["state_dict"])
        old = json.loads((out / f"{name}.json").read_text())
        epochs, seed, train_seconds = old["epochs"], old["seed"], old["train_seconds"]
        n_train, log = old["train_samples"], {"epochs": old["training"]["log"]}
    else:
        x_train, y_train = _load(exp.dataset, "train", data_dir, train_limit)
        n_train = len(x_train)
        start = time.perf_counter()
        log = train(exp, model, x_train, y_train, epochs=epochs, seed=seed, progress=progress)
        train_seconds = time.perf_counter() - start
        if is_main_process():
            torch.save({"state_dict": model.state_dict(), "experiment": name}, out / f"{name}.pt")

    start = time.perf_counter()
    bf = compile_bound(model, x_test[:1], norms="certified")
    bounds = bf()
    batches = [(x_test[i:i + 500], y_test[i:i + 500]) for i in range(0, len(x_test), 500)]
    # the closed-form radii (theory §6): the convex solver (certify's default) is stronger but
    # costs about 0.6 s per image on these models (docs/certificates.md)
    g = certify_dataset(model, batches, local=False, solver="closed", progress=progress)
    anchored = certify_dataset(model, batches, local=True, solver="closed", progress=progress)
    certify_seconds = time.perf_counter() - start
    record = {
        "experiment": name,
        "dataset": exp.dataset,
        "description": exp.description,
        "epochs": epochs,
        "seed": seed,
        "train_samples": n_train,
        "test_samples": len(x_test),
        "train_seconds": round(train_seconds, 1),
        "certify_seconds": round(certify_seconds, 1),
        "clean_accuracy": _fraction(g.correct),
        "eps": list(exp.eps),
        **summarize(g, anchored, exp.eps),
        "bounds": {"lipschitz": float(bounds.lipschitz), "curvature": float(bounds.curvature),
                   "certified": bool(bounds.certified)},
        "margins": anchored.margin_source,
        # what "best" takes the largest of, per image (the combined radius: Certificate.radius)
        "best_of": ["lipschitz", "curvature", "anchored", "combined"],
        # the settings of this run (``epochs`` is what ran, not the experiment's default budget)
        "training": {**{k: v for k, v in asdict(exp).items() if k not in ("factory", "eps")},
                     "epochs": epochs, "log": log["epochs"]},
        "torch": torch.__version__,
        "version": _version(),
    }
    if is_main_process():  # under torchrun every rank trains alike and certifies its share
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        plot_record(record, out / f"{name}.png")
    return record


def plot_record(record: dict[str, Any], path: str | Path) -> Path | None:
    """Certified accuracy against ε (Lipschitz, curvature, anchored, with the attack-certificate
    upper bound) from a record's curve; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional extra
        return None
    curve = record["curve"]
    scale = 255 if record["dataset"] == "cifar10" else 1
    eps = [e * scale for e in curve["eps"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"lipschitz": ("Lipschitz", "-"), "curvature": ("curvature (global)", "-"),
              "anchored": ("curvature (anchored)", "--"), "attack_upper": ("attack bound", ":")}
    for key, (label, style) in styles.items():
        ax.plot(eps, curve[key], style, label=label)
    for e in record["eps"]:
        ax.axvline(e * scale, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("ℓ2 radius ε" + (" (×1/255)" if scale == 255 else ""))
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{record['experiment']}: clean {record['clean_accuracy']:.3f}, "
                 f"{record['epochs']} epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def records_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of certified accuracies (Lipschitz / curvature / anchored / best per ε)
    for the given records, as docs/experiments.md shows it."""
    lines = ["| experiment | epochs | train s | clean | ε | Lipschitz | curvature | anchored "
             "| best | attack bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        scale, unit = (255, "/255") if r["dataset"] == "cifar10" else (1, "")
        for i, e in enumerate(r["eps"]):
            ca = r["certified_accuracy"]
            head = (f"| {r['experiment']} | {r['epochs']} | {r['train_seconds']:.0f} | "
                    f"{r['clean_accuracy']:.3f} |") if i == 0 else "| | | | |"
            lines.append(
                f"{head} {e * scale:.4g}{unit} | {ca['lipschitz'][i]:.3f} | "
                f"{ca['curvature'][i]:.3f} | {ca['anchored'][i]:.3f} | {ca['best'][i]:.3f} | "
                f"{r['attack_upper'][i]:.3f} |"
            )
    return "\n".join(lines)
