"""Soundness fuzzer, long run: random architectures, certified bounds vs empirical lower bounds.

Each case is a random smooth architecture from ``tests/fuzz_models.py`` (the generator the test
suite uses), compiled with both methods and both norm modes. A *violation* is a certified bound
below a float64 gradient-ascent lower bound, an estimate above the certified bound, or a certified
compile not flagged certified; with torch's switching softplus (small thresholds are among the
activations), also a pair straddling a switch where ‖f(x) − f(y)‖ > L‖x − y‖ + 2·error or
‖f − smooth twin‖ > error (``check_case``). The script prints the count, the violations (must
be 0) and the distribution of bound/lower-bound ratios for L and M.

Run from the repository root:

    python benchmarks/fuzz.py --cases 2000 --seed 0 --jobs 2

Case i uses ``random.Random(seed * 1_000_003 + i)``, so any case can be replayed alone with
``--replay i``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from fuzz_models import check_case, random_case  # noqa: E402

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _rng(seed: int, i: int) -> random.Random:
    return random.Random(seed * 1_000_003 + i)


def run_case(args: tuple) -> dict:
    """One case: the bounds, the lower bounds and the violations, as plain data."""
    seed, i, samples, steps, *rest = args
    sll = rest[0] if rest else 0.0
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    case = random_case(_rng(seed, i), sll=sll)
    start = time.perf_counter()
    try:
        r = check_case(case.model, case.input_shape, samples=samples, steps=steps, seed=i)
    except Exception as exc:  # an error is reported like a violation, with the architecture
        return {"i": i, "error": f"{type(exc).__name__}: {exc}", "arch": case.describe()}
    return {
        "i": i,
        "bounds": r.bounds,
        "lip": r.lip_lower,
        "curv": r.curv_lower,
        "violations": r.violations,
        "arch": case.describe() if r.violations else "",
        "seconds": time.perf_counter() - start,
        "straddling": r.straddling,
        "switch_error": max(r.errors.values(), default=0.0),
        "kinds": sorted({s.kind if s.kind != "module" else type(s.modules[0]).__name__
                         for s in case.steps}),
    }


def quantiles(values: list[float]) -> list[float]:
    """Empirical quantiles (nearest rank) of the finite values."""
    v = sorted(x for x in values if math.isfinite(x))
    if not v:
        return [math.nan] * len(QUANTILES)
    return [v[min(len(v) - 1, int(round(q * (len(v) - 1))))] for q in QUANTILES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--samples", type=int, default=6, help="empirical ascent batch")
    parser.add_argument("--steps", type=int, default=15, help="empirical ascent steps")
    parser.add_argument("--replay", type=int, default=None, help="run and print one case")
    parser.add_argument("--sll", type=float, default=0.0,
                        help="probability that a step is an SLL layer of curvbound.nn")
    args = parser.parse_args(argv)

    if args.replay is not None:
        print(random_case(_rng(args.seed, args.replay), sll=args.sll).describe())
        print(run_case((args.seed, args.replay, args.samples, args.steps, args.sll)))
        return 0

    start = time.perf_counter()
    work = [(args.seed, i, args.samples, args.steps, args.sll) for i in range(args.cases)]
    run_case(work[0])  # warm-up in the parent: every lazy import is done before the workers fork
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(run_case, work, chunksize=8)
    else:
        results = [run_case(w) for w in work]
    wall = time.perf_counter() - start

    errors = [r for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    bad = [r for r in done if r["violations"]]
    print(f"command: python benchmarks/fuzz.py --cases {args.cases} --seed {args.seed} "
          f"--jobs {args.jobs} --samples {args.samples} --steps {args.steps}"
          + (f" --sll {args.sll:g}" if args.sll else ""))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"cases: {len(results)}  checked: {len(done)}  errors: {len(errors)}  "
          f"violating cases: {len(bad)}  wall: {wall:.0f} s "
          f"({sum(r['seconds'] for r in done) / max(len(done), 1):.2f} s per case)")
    kinds: dict[str, int] = {}
    for r in done:
        for k in r["kinds"]:
            kinds[k] = kinds.get(k, 0) + 1
    print("cases containing each step kind: "
          + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    switching = [r for r in done if r["switch_error"] > 0]
    print(f"cases with torch's switching softplus (Bounds.error > 0): {len(switching)}, "
          f"pairs straddling a switch checked: {sum(r['straddling'] for r in switching)}, "
          f"largest error: {max((r['switch_error'] for r in switching), default=0.0):.3g}")
    for r in bad + errors:
        print(f"\n--- case {r['i']}: {r.get('violations') or r.get('error')}\n{r['arch']}")

    header = "ratio bound/lower bound   " + "".join(f"{f'q{q:g}':>9}" for q in QUANTILES)
    print("\n" + header)
    print("-" * len(header))
    for method in ("compositional", "naive"):
        for norms in ("certified", "estimate"):
            for j, (name, key) in enumerate((("L", "lip"), ("M", "curv"))):
                ratios = [r["bounds"][method, norms][j] / r[key] for r in done if r[key] > 0]
                row = f"{name} {method:13s} {norms:9s}"
                print(f"{row:26s}" + "".join(f"{v:9.3g}" for v in quantiles(ratios)))
    zero_m = sum(1 for r in done if r["curv"] == 0)
    print(f"\n(M ratios omit {zero_m} cases whose empirical curvature is 0: affine models)")
    tight = [r["bounds"]["compositional", "certified"][0] / r["lip"] for r in done if r["lip"] > 0]
    print(f"cases with certified L within 1% of the lower bound: "
          f"{sum(1 for t in tight if t <= 1.01)} of {len(tight)}")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
