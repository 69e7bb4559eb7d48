"""The ``curvbound`` command line (also ``python -m curvbound``); see docs/cli.md.

Subcommands: ``demo``, ``inspect MODEL``, ``certify MODEL``, ``experiment NAME``. MODEL is
``path/to/file.py:factory`` (a function returning a model, or a ``(model, input_shape)`` pair) or
the name of a model of the zoo (``curvbound.zoo.ZOO``) or of an experiment.

Errors of the library end the command with a message (never a traceback) and an exit code per
error type (:data:`EXIT_CODES`), so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..compiler import errors
from ..compiler.report import rows
from ..pipeline import compile as compile_bound
from . import demo as demo_app
from . import experiments as _experiments
from . import views, zoo
from .certificates import Certificate, Certifier
from .data import load_cifar10, load_mnist
from .distributed import ensure_process_group, gather_batches, is_main_process, mine

__all__ = ["main", "EXIT_CODES", "load_model", "parse_shape"]

EXIT_CODES: dict[type, int] = {
    errors.UnsupportedOperationError: 3,
    errors.TracingError: 4,
    errors.ModelStateError: 5,
    errors.InputError: 6,
    errors.RuleError: 7,
    errors.NonSmoothError: 8,
    errors.MethodCoverageError: 9,
    errors.StaleBoundError: 12,
    errors.DiscontinuityError: 13,
    errors.ResourceError: 14,
    errors.CurvboundError: 10,
}
"""Exit code per library error (the most specific class wins); 2: bad command line or files,
11: a missing optional dependency, 0: success."""

USAGE_ERROR, MISSING_EXTRA = 2, 11

EXAMPLES = """examples:
  curvbound demo                                    train, compile and certify on 8x8 digits
  curvbound demo --data mnist --data-dir ../shared/data
  curvbound inspect residual_cnn_bn --input-shape 1,3,8,8 --json bf.json --dot bf.dot
  curvbound inspect models.py:make_net --input-shape 1,784 --sort share
  curvbound certify models.py:make_net --weights net.pt --data mnist --eps 0.5 1 1.58
  curvbound experiment mnist-2f --epochs 1 --out runs/
exit codes: 0 ok; 2 bad arguments or files; 3 unsupported ops (all listed); 4 tracing failed;
  5 model state; 6 bad input; 7 a rule failed; 8 not smooth; 9 method does not cover the model;
  10 other curvbound error; 11 an optional dependency is missing; 12 stale bound;
  13 an activation jumps too much; 14 not enough memory."""

DATASETS = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class UsageError(Exception):
    """A command-line mistake (bad MODEL spec, missing file): exit code 2 with the message."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` → ``(1, 3, 32, 32)`` (the leading batch dimension is part of it)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError as error:
        raise UsageError(f"--input-shape must be integers separated by commas, e.g. 1,3,32,32; "
                         f"got {text!r}") from error
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """MODEL → (model in eval mode, per-sample input shape or None).

    ``file.py:factory`` runs the file and calls ``factory()``; a bare name is looked up in the
    zoo, then in the experiments (``curvbound.experiments.build``). The factory may return a
    model or a ``(model, input_shape)`` pair.
    """
    if ":" in spec and not Path(spec).exists():
        path, _, name = spec.rpartition(":")
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"MODEL {spec!r}: no file {path!r}")
        namespace = runpy.run_path(str(file), run_name="curvbound_model")
        if name not in namespace or not callable(namespace[name]):
            found = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))
            raise UsageError(f"MODEL {spec!r}: {path} defines no function {name!r}; callables "
                             f"there: {', '.join(found) or 'none'}")
        built = namespace[name]()
    elif spec.endswith(".py"):
        raise UsageError(f"MODEL {spec!r}: name the factory too, as {spec}:make_model")
    elif spec in zoo.ZOO:
        built = zoo.ZOO[spec]()
    elif spec in _experiments.EXPERIMENTS:
        built = _experiments.build(spec)
    else:
        known = sorted(zoo.ZOO) + sorted(_experiments.EXPERIMENTS)
        raise UsageError(f"MODEL {spec!r} is neither path/to/file.py:factory nor a known model "
                         f"name ({', '.join(known)})")
    shape = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        built, shape = built[0], tuple(int(d) for d in built[1])
    if not isinstance(built, nn.Module):
        raise UsageError(f"MODEL {spec!r} returned {type(built).__name__}, not a torch.nn.Module")
    return built.eval(), shape


def _load_weights(model: nn.Module, path: str | None) -> None:
    if path is None:
        return
    if not Path(path).is_file():
        raise UsageError(f"--weights {path!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"--weights {path!r} does not fit the model: {error}") from error


def _input_shape(args, default: tuple[int, ...] | None) -> tuple[int, ...]:
    if args.input_shape:
        return parse_shape(args.input_shape)
    if default is not None:
        return (1, *default)
    raise UsageError("give --input-shape (e.g. --input-shape 1,3,32,32): the model's factory "
                     "does not say which input it takes")


# -- subcommands ------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    demo_app.run_demo(args.data, args.data_dir, out=args.out, seed=args.seed, epochs=args.epochs,
                      progress=not args.quiet)
    return 0


def cmd_inspect(args) -> int:
    model, default = load_model(args.model)
    _load_weights(model, args.weights)
    shape = _input_shape(args, default)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    t0 = time.perf_counter()
    bf = compile_bound(model, torch.zeros(shape, dtype=dtype), method=args.method,
                       norms=args.norms)
    out = bf()
    seconds = time.perf_counter() - t0
    print(f"{args.model}: {type(model).__name__}, input {shape}, compiled and evaluated in "
          f"{seconds:.2f} s")
    print(bf.table(sort=args.sort))
    if args.json:
        record = {
            "model": args.model,
            "input_shape": list(shape),
            "method": bf.method,
            "norms": bf.norms,
            "certified": bool(out.certified),
            "lipschitz": float(out.lipschitz),
            "curvature": float(out.curvature),
            "nonsmooth_nodes": list(bf.nonsmooth_nodes),
            "nodes": [
                {"name": r.name, "label": r.label, "rule": r.rule, "lipschitz": _num(r.lipschitz),
                 "curvature": _num(r.curvature), "own_curvature": _num(r.own),
                 "share": _num(r.share), "certified": r.certified, "note": r.note}
                for r in rows(bf)
            ],
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.dot:
        Path(args.dot).write_text(bf.to_dot())
        print(f"wrote {args.dot}")
    if args.svg:
        views.to_svg(bf, args.svg)
        print(f"wrote {args.svg}")
    return 0


def _num(v: float):
    """JSON has no inf/nan: they are written as strings."""
    return v if math.isfinite(v) else str(v)


def _dataset(name: str, data_dir: str | None, limit: int | None):
    if name == "digits":
        _, _, x, y = demo_app.load_digits()
        return x[:limit], y[:limit]
    if name == "mnist":
        return load_mnist("test", data_dir, limit=limit)
    if name == "cifar10":
        return load_cifar10("test", data_dir, limit=limit)
    raise UsageError(f"unknown dataset {name!r}")


def cmd_certify(args) -> int:
    model, _ = load_model(args.model)
    _load_weights(model, args.weights)
    try:
        x, y = _dataset(args.data, args.data_dir, args.limit)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = x.to(dtype)
    t0 = time.perf_counter()
    bf = compile_bound(model, x[:1], norms=args.norms, anchored=args.local)
    certifiers = {"global": Certifier(model, x[:1], bound_fn=bf, local=False)}
    if args.local:
        certifiers["local"] = Certifier(model, x[:1], bound_fn=bf, local=True)
    # under torchrun: every rank certifies every W-th batch, rank 0 reports (docs/distributed.md)
    ensure_process_group()
    starts = [(i, s) for i, s in enumerate(range(0, len(x), args.batch_size)) if mine(i)]
    parts: dict[str, list[tuple[int, Certificate]]] = {k: [] for k in certifiers}
    bar = demo_app.progress_bar(total=sum(len(x[s:s + args.batch_size]) for _, s in starts),
                                desc="certify", disable=args.quiet or not is_main_process())
    for i, start in starts:
        xb, yb = x[start:start + args.batch_size], y[start:start + args.batch_size]
        for k, c in certifiers.items():
            parts[k].append((i, c(xb, yb)))
        bar.update(len(xb))
    bar.close()
    certs = {k: gather_batches(v) for k, v in parts.items()}
    if not is_main_process():
        return 0
    glob = certs["global"]
    local = certs.get("local", glob)
    eps = list(args.eps) if args.eps else list(demo_app.CONFIGS.get(args.data, _CIFAR).eps)
    table = demo_app.accuracy_table(glob, local, eps)
    seconds = time.perf_counter() - t0
    print(f"{args.model} on {args.data} ({len(x)} test images): clean accuracy "
          f"{float(glob.correct.double().mean()):.4f}; bounds "
          f"{'certified' if glob.certified else 'ESTIMATED (not guaranteed)'}; margins "
          f"{glob.margin_source}; {seconds:.1f} s")
    print(demo_app.format_accuracy(table, eps))
    if not args.local:
        print("(--global: the 'anchored' column repeats the global curvature certificate)")
    if args.json:
        record = {"model": args.model, "dataset": args.data, "samples": len(x), "eps": eps,
                  "clean_accuracy": float(glob.correct.double().mean()),
                  "certified": bool(glob.certified), "local": bool(args.local),
                  "certified_accuracy": {k: v for k, v in table.items() if k != "attack_upper"},
                  "attack_upper": table["attack_upper"],
                  "bounds": {"lipschitz": float(bf().lipschitz), "curvature": _num(
                      float(bf().curvature))}}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        demo_app.plot_accuracy(table, eps, Path(args.plot), f"{args.model} on {args.data}")
        print(f"wrote {args.plot}")
    return 0


_CIFAR = demo_app.DemoConfig(widths=(), epochs=0, batch_size=0, lr=0, weight=0, target=0,
                             eps=(36 / 255, 72 / 255, 108 / 255, 1.0))


def cmd_experiment(args) -> int:
    record = _experiments.run(
        args.name, epochs=args.epochs, seed=args.seed, data_dir=args.data_dir, out=args.out,
        train_limit=args.train_limit, test_limit=args.test_limit, progress=not args.quiet,
        certify_only=args.certify_only,
    )
    if not is_main_process():
        return 0
    print(_experiments.records_table([record]))
    b = record["bounds"]
    kind = "certified" if b["certified"] else "ESTIMATED"
    print(f"bounds: L = {b['lipschitz']:.5g}, M = {b['curvature']:.5g} ({kind}); "
          f"trained {record['train_seconds']:.0f} s; wrote {args.name}.json, .pt, .png to "
          f"{args.out}")
    return 0


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvbound", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Provable Lipschitz and curvature bounds of PyTorch models, and robustness "
                    "certificates from them.", epilog=EXAMPLES)
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 for demo)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="train, compile and certify a small network (< 1 min)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  curvbound demo --data mnist --data-dir ../shared/data")
    p.add_argument("--data", choices=sorted(demo_app.CONFIGS), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (default); mnist: needs "
                        "--data-dir or $CURVBOUND_DATA")
    p.add_argument("--data-dir", default=None, help="folder holding mnist.npz")
    p.add_argument("--out", default=".", help="folder of the plot demo_<data>.png")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="compile MODEL and print its per-node bound table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  curvbound inspect residual_cnn_bn --json bf.json "
                              "--dot bf.dot\n  curvbound inspect net.py:build --input-shape "
                              "1,3,32,32 --sort share --svg bf.svg")
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or a zoo name")
    p.add_argument("--input-shape", default=None,
                   help="example input shape with the batch dimension, e.g. 1,3,32,32")
    p.add_argument("--method", default="compositional",
                   choices=["compositional", "naive", "paper", "crt"])
    p.add_argument("--norms", default="certified", choices=["certified", "estimate"],
                   help="certified (default, guaranteed) or estimate (power iteration)")
    p.add_argument("--weights", default=None, help="a state_dict (or {'state_dict': ...}) .pt")
    p.add_argument("--sort", default="graph", choices=["graph", "share", "M", "L"],
                   help="row order: graph order or decreasing share / M / L")
    p.add_argument("--json", default=None, metavar="F", help="write the bounds as JSON")
    p.add_argument("--dot", default=None, metavar="F", help="write the graph as Graphviz DOT")
    p.add_argument("--svg", default=None, metavar="F",
                   help="render the graph to SVG (needs graphviz and dot)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("certify", help="certify MODEL on a test set",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  curvbound certify net.py:build --weights net.pt "
                              "--data mnist --data-dir ../shared/data --eps 0.5 1 1.58 "
                              "--json cert.json --plot cert.png")
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or a zoo name")
    p.add_argument("--data", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-dir", default=None, help="folder of the dataset files "
                   "(default $CURVBOUND_DATA or ../shared/data)")
    p.add_argument("--weights", default=None, help="a state_dict (or {'state_dict': ...}) .pt")
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help="ℓ2 radii in pixel units (inputs in [0, 1])")
    p.add_argument("--limit", type=int, default=None, help="certify the first N test images")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--local", dest="local", action="store_true", default=True,
                       help="also anchored (per-input) curvature certificates (default)")
    group.add_argument("--global", dest="local", action="store_false",
                       help="global curvature bound only")
    p.add_argument("--norms", default="certified", choices=["certified", "estimate"])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", default=None, metavar="F", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="F", help="save certified accuracy vs ε")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("experiment", help="run a named experiment (docs/experiments.md)",
                       epilog="example:\n  curvbound experiment mnist-2f --epochs 1 --out runs/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", choices=sorted(_experiments.EXPERIMENTS),
                   help="one of: " + ", ".join(sorted(_experiments.EXPERIMENTS)))
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the "
                   "experiment's budget, docs/experiments.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, metavar="D",
                   help="folder with mnist.npz / cifar10_jpeg.npz")
    p.add_argument("--out", default="experiments", metavar="OUT",
                   help="folder for NAME.json, NAME.pt, NAME.png")
    p.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="train on the first N training images")
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="certify the first N test images")
    p.add_argument("--certify-only", action="store_true",
                   help="certify OUT/NAME.pt of an earlier run again (no training)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see :data:`EXIT_CODES`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.command == "demo" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return args.func(args)
    except errors.CurvboundError as error:
        code = next(c for t, c in EXIT_CODES.items() if isinstance(error, t))
        print(f"curvbound {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return code
    except UsageError as error:
        print(f"curvbound {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except views.MissingExtraError as error:
        print(f"curvbound {args.command}: {error}", file=sys.stderr)
        return MISSING_EXTRA
    except ImportError as error:
        print(f"curvbound {args.command}: {error}", file=sys.stderr)
        return MISSING_EXTRA
    except BrokenPipeError:  # `curvbound inspect … | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
