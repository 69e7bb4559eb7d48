"""Certification throughput: samples/s of ``curvbound.certify``, global vs anchored curvature.

For MNIST 6F and CIFAR-10 6C2F (``curvbound.zoo``, tanh, float32 weights, briefly trained here so
that the certificates mean something) the script certifies the test images batch by batch with
certifiers that share one compiled bound (``compile(..., norms="certified", anchored=True)``):

- floor: not a certifier but the work every certificate needs, the float64 forward pass (logits)
  and the K − 1 margin gradients ∇(f_i − f_p) (one backward pass each over the batch);
- global: closed-form radii from the pairwise margin constants (``bf.margins()``, computed once);
- anchored: additionally the curvature anchored at every image (theory §7), per pair
  (``local=True``, closed form);
- convex: what ``curvbound.certify`` does by default (anchored, ``solver="convex"``), on the first
  ``--convex-batches`` batches only (it is two to three orders of magnitude slower).

All run on the same batch one after the other, so their ratios to the floor are measured side by
side under the same machine load. Each certifier's time covers everything per batch: the float64
forward pass, the margin gradients, the anchored bound and the radii. Reported: samples/s, the
time ratio to the floor, compile times, and what the certificates give (certified accuracy,
median radius, attack certificates).

Run from the repository root:
    python benchmarks/certify_throughput.py                 # the 10,000 test images of each
    python benchmarks/certify_throughput.py --limit 500     # a quick run
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import torch

import curvbound
from curvbound import zoo
from curvbound.apps import data
from curvbound.apps.anchored import Capture
from curvbound.apps.certificates import Certifier

MODELS = {
    "MNIST 6F": (lambda: zoo.mnist_mlp(6), data.load_mnist, (0.02, 0.05, 0.1)),
    "CIFAR 6C2F": (zoo.cifar_6c2f, data.load_cifar10, (2 / 255, 8 / 255, 36 / 255)),
}


def _train(model: torch.nn.Module, load, samples: int, epochs: int) -> tuple[float, float]:
    if samples <= 0:
        return 0.0, float("nan")
    x, y = load("train", limit=samples)
    start = time.perf_counter()
    data.train_classifier(model, x, y, epochs=epochs, lr=1e-3, seed=0)
    return time.perf_counter() - start, len(x)


class Floor:
    """The unavoidable work of a certificate: float64 logits and the K − 1 margin gradients."""

    def __init__(self, bf):
        self.plain = Capture(bf.gm, [], twins=getattr(bf, "_twins", {}))

    def __call__(self, x: torch.Tensor, y=None) -> torch.Tensor:
        x64 = x.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            logits = self.plain(x64)[0]
            pred = logits.argmax(dim=1)
            k = logits.shape[1]
            eye = torch.eye(k, dtype=logits.dtype)
            out = []
            for j in range(1, k):
                cot = eye[(pred + j) % k] - eye[pred]
                out.append(torch.autograd.grad(logits, x64, cot, retain_graph=j + 1 < k)[0])
        return torch.stack(out)


def bench(name: str, limit: int, batch: int, train: int, epochs: int,
          convex_batches: int) -> dict:
    build, load, eps_list = MODELS[name]
    model = build()
    train_s, _ = _train(model, load, train, epochs)
    xt, yt = load("test", limit=limit)
    t0 = time.perf_counter()
    plain = curvbound.compile(model, xt[:1], norms="certified")
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    bf = curvbound.compile(model, xt[:1], norms="certified", anchored=True)
    t_anch = time.perf_counter() - t0
    del plain
    t0 = time.perf_counter()
    certifiers = {
        "floor": Floor(bf),
        "global": Certifier(model, xt[:1], bound_fn=bf, local=False, solver="closed"),
        "anchored": Certifier(model, xt[:1], bound_fn=bf, local=True, solver="closed"),
        "convex": Certifier(model, xt[:1], bound_fn=bf, local=True, solver="convex"),
    }
    t_setup = time.perf_counter() - t0
    for cert in certifiers.values():  # warm-up (first-call allocations, the convex model copy)
        cert(xt[:2], yt[:2])
    times = {k: [] for k in certifiers}
    parts = {k: [] for k in certifiers if k != "floor"}
    for i, start in enumerate(range(0, len(xt), batch)):
        xb, yb = xt[start : start + batch], yt[start : start + batch]
        for key, cert in certifiers.items():
            if key == "convex" and i >= convex_batches:
                continue
            t0 = time.perf_counter()
            out = cert(xb, yb)
            times[key].append(time.perf_counter() - t0)
            if key != "floor":
                parts[key].append(out)
        done = start + len(xb)
        rate = done / sum(times["anchored"])
        sys.stderr.write(f"\r{name}: {done}/{len(xt)} (anchored {rate:.1f} samples/s)")
        sys.stderr.flush()
    sys.stderr.write("\n")
    certs = {k: curvbound.Certificate.cat(v) for k, v in parts.items()}
    floor = times["floor"]
    ratio = {k: sum(v) / sum(floor[: len(v)]) for k, v in times.items()}
    ratio_median = {k: statistics.median(a / f for a, f in zip(v, floor)) for k, v in times.items()}
    counts = {k: sum(len(p) for p in parts[k]) if k in parts else len(xt) for k in times}
    return {
        "name": name,
        "n": len(xt),
        "train_s": train_s,
        "compile_plain": t_plain,
        "compile_anchored": t_anch,
        "setup": t_setup,
        "rate": {k: counts[k] / sum(v) for k, v in times.items()},
        "ratio": ratio,
        "ratio_median": ratio_median,
        "convex_n": counts["convex"],
        "certs": certs,
        "eps": eps_list,
    }


def report(r: dict) -> None:
    g, a = r["certs"]["global"], r["certs"]["anchored"]
    acc = float(g.correct.double().mean())
    print(f"\n### {r['name']} ({r['n']} test images, clean accuracy {acc:.4f})")
    print(
        f"compile: plain {r['compile_plain']:.2f} s, anchored {r['compile_anchored']:.2f} s; "
        f"certifier setup (pairwise margins, pair quantities) {r['setup']:.2f} s; "
        f"training {r['train_s']:.1f} s"
    )
    keys = ("floor", "global", "anchored", "convex")
    print(f"\n| | {' | '.join(keys)} |")
    print("|---|---|---|---|---|")
    print("| samples/s | " + " | ".join(f"{r['rate'][k]:.1f}" for k in keys) + " |")
    print("| time / floor (median over batches) | " + " | ".join(
        f"{r['ratio'][k]:.2f} ({r['ratio_median'][k]:.2f})" for k in keys) + " |")
    ok = g.correct
    med = [float(c.radius[ok].median()) if ok.any() else math.nan for c in (g, a)]
    print(f"| median certified radius (correct) | | {med[0]:.4f} | {med[1]:.4f} | |")
    for eps in r["eps"]:
        cg, ca = g.certified_accuracy(eps), a.certified_accuracy(eps)
        print(f"| certified accuracy, ε = {eps:.4f} | | {cg:.4f} | {ca:.4f} | |")
        ug, ua = g.robust_accuracy_upper(eps), a.robust_accuracy_upper(eps)
        print(f"| attack upper bound, ε = {eps:.4f} | | {ug:.4f} | {ua:.4f} | |")
    print(f"| attack certificates | | {len(g.attack_index)} | {len(a.attack_index)} | |")
    finite = torch.isfinite(g.curvature_constants)
    ratio = (a.curvature_constants[finite] / g.curvature_constants[finite]).median()
    print(f"| median margin curvature bound M_i | | 1 | {float(ratio):.3f} | |")
    c = r["certs"]["convex"]
    n = r["convex_n"]
    print(f"\nconvex solver on the first {n} images: certified accuracy "
          + ", ".join(f"ε = {eps:g}: {c.certified_accuracy(eps):.4f} "
                      f"(anchored closed form on the same images "
                      f"{_prefix(a, n).certified_accuracy(eps):.4f})" for eps in r["eps"]))


def _prefix(c, n: int):
    ok = c.correct[:n]
    return type("Prefix", (), {"certified_accuracy": lambda self, eps: float(
        (ok & (c.radius[:n] > eps)).double().mean())})()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--limit", type=int, default=10000, help="test images per model")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--train", type=int, default=20000, help="training images (0: none)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--convex-batches", type=int, default=2,
                        help="batches certified with the (slow) default convex solver")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, batch {args.batch_size}"
    )
    for name in args.models:
        report(bench(name, args.limit, args.batch_size, args.train, args.epochs,
                     args.convex_batches))


if __name__ == "__main__":
    main()
