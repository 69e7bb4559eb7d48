"""Certified accuracy against CRT (Singla & Feizi, ICML 2020) on their own MNIST model.

The model: ``saved_models/mnist_2_softplus_L2_1.58_EIGEN_0.005`` of
github.com/singlasahil14/so-robust (784-1024-10, softplus, inputs in [0, 1], a state dict with
fc1/fc2). It is not shipped: fetch the repository and extract the file, then pass its path, e.g.

    git clone https://github.com/singlasahil14/so-robust /tmp/so-robust
    python benchmarks/certify_crt.py \
        --checkpoint /tmp/so-robust/saved_models/mnist_2_softplus_L2_1.58_EIGEN_0.005

Certificates compared on the first ``--limit`` MNIST test images (all sound except CRT's):

- ``closed``: the paper's closed form, two-sided pairwise + anchored curvature (solver="closed");
- ``one-sided``: the same closed form with one-sided constants ∇²(f_p − f_i) ⪰ −K·I
  (``bf.margins().neg_curvature``) where smaller (solver="one-sided");
- ``convex``: the default, the dual certificate with the strong-convexity bound on the inner
  minimisation, per class the better of it and the one-sided closed form (solver="convex");
- ``CRT (all classes)`` / ``CRT (runner-up)``: CRT's certificate reimplemented from its paper's
  formulas: K = ¼·λ_max(W₁ᵀ diag(c̃⁻) W₁) from the weights (exact eigenvalues, no rounding
  allowance), the same dual search, and their acceptance rule (the dual value F_η(x̂) at an
  approximate minimiser whose gradient norm is below 1e-5) — not a certificate, shown for
  comparison; "runner-up" checks only the runner-up class, as their evaluation does.

Reported: certified accuracy at each ε, time per image (after the one-off compile and pairwise
margins, reported separately), and the attack-certificate upper bound of the convex solver. JSON
goes to ``--out`` (default benchmarks/results/certify_crt.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

import curvbound
from curvbound.apps import data
from curvbound.apps.certificates import Certifier
from curvbound.runtime.convex import convex_radii


def crt_model(path: str) -> nn.Sequential:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.Softplus(), nn.Linear(1024, 10))
    with torch.no_grad():
        net[1].weight.copy_(sd["fc1.weight"])
        net[1].bias.copy_(sd["fc1.bias"])
        net[3].weight.copy_(sd["fc2.weight"])
        net[3].bias.copy_(sd["fc2.bias"])
    return net.eval()


def crt_constants(net: nn.Sequential) -> torch.Tensor:
    """K[p, i] = ¼·λ_max(W₁ᵀ diag(c̃⁻) W₁), c̃ = W₂ᵀ(e_p − e_i): CRT's two-layer bound on
    −λ_min(∇²(f_p − f_i)) for softplus (0 ≤ σ'' ≤ ¼)."""
    w1 = net[1].weight.detach().double()
    w2 = net[3].weight.detach().double()
    k = w2.shape[0]
    out = torch.zeros(k, k, dtype=torch.float64)
    for p in range(k):
        for i in range(k):
            if p != i:
                neg = (w2[i] - w2[p]).clamp_min(0)
                out[p, i] = 0.25 * torch.linalg.eigvalsh(w1.T @ (neg[:, None] * w1))[-1]
    return out


def run_crt(net, x, y, k_crt, outer, inner, batch):
    """CRT's value per (sample, class) (0 where not computed), per sample its runner-up class."""
    net64 = _double(net)
    with torch.no_grad():
        logits = net64(x.double())
    pred = logits.argmax(1)
    runner = logits.scatter(1, pred[:, None], -math.inf).argmax(1)
    b, k = logits.shape
    values = torch.zeros(b, k, dtype=torch.float64)
    for s in range(0, b, batch):
        rows = torch.arange(s, min(b, s + batch)).repeat_interleave(k)
        cls = torch.arange(k).repeat(len(rows) // k)
        keep = (cls != pred[rows]) & (pred[rows] == y[rows])
        rows, cls = rows[keep], cls[keep]
        p = pred[rows]
        r = convex_radii(net64, x[rows].double(), p, cls, k_crt[p, cls], k_crt[cls, p],
                         outer=outer, inner=inner, accept_tol=1e-5)
        values[rows, cls] = r.radius
    values[torch.arange(b), pred] = math.inf
    all_cls = values.min(1).values
    runner_up = values[torch.arange(b), runner]
    ok = pred == y
    return torch.where(ok, all_cls, 0), torch.where(ok, runner_up, 0)


def _double(net):
    import copy

    return copy.deepcopy(net).double().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="path of the CRT state dict")
    parser.add_argument("--limit", type=int, default=500, help="first test images")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 1.58])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-crt", action="store_true", help="skip CRT's certificate")
    parser.add_argument(
        "--undecided-only", action="store_true",
        help="run the convex solver only on the images the one-sided certificate leaves "
             "undecided at some ε (correct, radius ≤ ε and no attack certificate below ε); the "
             "others are decided at every listed ε, so the certified accuracies are the same; "
             "the record is rewritten after every batch (for the full test set)")
    parser.add_argument("--only-crt", action="store_true", help="only CRT's certificate")
    parser.add_argument("--crt-steps", type=int, nargs=2, default=[14, 12],
                        help="CRT's bisection and inner steps (their acceptance rule needs a "
                             "converged inner problem: more inner steps certify more)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out",
                        default=str(Path(__file__).parent / "results" / "certify_crt.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = crt_model(args.checkpoint)
    x, y = data.load_mnist("test", path=args.data_dir, limit=args.limit)
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).double().mean())
    print(f"{len(x)} test images, clean accuracy {acc:.4f}; torch {torch.__version__}, "
          f"{platform.machine()}, {args.threads} thread(s)")
    t0 = time.perf_counter()
    bf = curvbound.compile(net, x[:1], norms="certified", anchored=True)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    margins = bf.margins()
    t_margins = time.perf_counter() - t0
    k_crt = crt_constants(net)
    off = ~torch.eye(10, dtype=torch.bool)
    ratio = (margins.neg_curvature[off] / k_crt[off])
    print(f"compile {t_compile:.1f} s, pairwise margins {t_margins:.1f} s; one-sided K / CRT's K: "
          f"min {float(ratio.min()):.9f}, max {float(ratio.max()):.9f}; two-sided / one-sided "
          f"median {float((margins.curvature[off] / margins.neg_curvature[off]).median()):.3f}")
    results = {"images": len(x), "clean_accuracy": acc, "compile_s": t_compile,
               "margins_s": t_margins, "eps": args.eps, "certificates": {}}
    solvers = () if args.only_crt else ("closed", "one-sided", "convex")
    certs = {}
    for solver in solvers:
        if solver == "convex" and args.undecided_only:
            _convex_undecided(net, bf, x, y, certs["one-sided"], args, results)
            continue
        certifier = Certifier(net, x[:1], bound_fn=bf, solver=solver)
        t0 = time.perf_counter()
        parts = []
        for s in range(0, len(x), args.batch_size):
            parts.append(certifier(x[s : s + args.batch_size], y[s : s + args.batch_size]))
            if len(x) > 1000 and (s // args.batch_size) % 10 == 9:  # long runs: progress
                print(f"  {solver}: {s + args.batch_size}/{len(x)} images, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        dt = (time.perf_counter() - t0) / len(x)
        cert = certs[solver] = parts[0].cat(parts)
        accs = [cert.certified_accuracy(e) for e in args.eps]
        upper = [cert.robust_accuracy_upper(e) for e in args.eps]
        adv = cert.adversarial_examples(domain=(0.0, 1.0))
        flipped = int((adv.predictions(net) != cert.predicted[adv.index]).sum())
        results["certificates"][solver] = {
            "certified_accuracy": accs, "attack_upper_bound": upper, "s_per_image": dt,
            "certified": cert.certified, "attacks": len(adv), "attacks_misclassified": flipped,
            "median_radius": float(cert.radius[cert.correct].median()),
        }
        print(f"{solver:10s} " + "  ".join(f"{a:.4f}" for a in accs)
              + "   attack bound " + "  ".join(f"{u:.4f}" for u in upper)
              + f"   {dt:.3f} s/image, {len(adv)} attacks ({flipped} misclassified)")
        _write(args.out, results)  # after each solver: a long run keeps what it has
    if not args.no_crt:
        t0 = time.perf_counter()
        all_cls, runner = run_crt(net, x, y, k_crt, *args.crt_steps, args.batch_size)
        dt = (time.perf_counter() - t0) / len(x)
        for name, r in (("CRT (all classes)", all_cls), ("CRT (runner-up)", runner)):
            accs = [float((r > e).double().mean()) for e in args.eps]
            results["certificates"][name] = {"certified_accuracy": accs, "s_per_image": dt,
                                             "certified": False, "steps": args.crt_steps}
            print(f"{name:18s} " + "  ".join(f"{a:.4f}" for a in accs) + f"   {dt:.3f} s/image")
    print(f"wrote {_write(args.out, results)}")


def _convex_undecided(net, bf, x, y, one_sided, args, results) -> None:
    """The convex certificate where it can change a certified accuracy at the listed ε.

    The convex solver's radius is never below the one-sided one (it takes the better of both per
    class) and never above a verified attack distance, so an image is decided at ε without it
    when it is misclassified, certified beyond ε by the one-sided closed form, or attacked below
    ε. Only the rest is solved (with ``radius_cap`` = the largest ε, which skips the margins
    certified beyond it), in order; after every batch the record holds the certified accuracy
    over the test images up to the last one solved (decided ones included).
    """
    eps = torch.tensor(args.eps, dtype=torch.float64)
    ok = one_sided.correct
    r_os, att_os = one_sided.radius, one_sided.attack_radius
    open_ = ok[:, None] & (r_os[:, None] <= eps) & ~(att_os[:, None] < eps)
    todo = open_.any(1).nonzero()[:, 0]
    radius, attack = r_os.clone(), att_os.clone()
    # and per image only the margins that can decide an ε: radius_cap = the largest ε
    certifier = Certifier(net, x[:1], bound_fn=bf, solver="convex", radius_cap=max(args.eps))
    entry = results["certificates"]["convex"] = {
        "undecided_images": len(todo), "solved_images": 0, "images_covered": 0,
        "certified": one_sided.certified, "note": (
            "convex solver run on the images the one-sided certificate leaves undecided at "
            "some ε; certified accuracy over the first images_covered test images")}
    t0 = time.perf_counter()
    for s in range(0, len(todo), args.batch_size):
        idx = todo[s : s + args.batch_size]
        cert = certifier(x[idx], y[idx])
        radius[idx] = torch.maximum(radius[idx], cert.radius)
        attack[idx] = torch.minimum(attack[idx], cert.attack_radius)
        n = len(x) if s + args.batch_size >= len(todo) else int(idx[-1]) + 1
        part = slice(0, n)
        entry.update({
            "solved_images": s + len(idx), "images_covered": n,
            "certified_accuracy": [float((ok[part] & (radius[part] > e)).double().mean())
                                   for e in args.eps],
            "attack_upper_bound": [float((ok[part] & ~(attack[part] < e)).double().mean())
                                   for e in args.eps],
            "s_per_solved_image": (time.perf_counter() - t0) / (s + len(idx)),
            "median_radius_lower": float(radius[ok].median()),
        })
        _write(args.out, results)
        print(f"  convex: {s + len(idx)}/{len(todo)} undecided images solved, first {n} test "
              f"images: " + "  ".join(f"{a:.4f}" for a in entry["certified_accuracy"])
              + f"   {time.perf_counter() - t0:.0f} s", flush=True)


def _write(path: str, results: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
