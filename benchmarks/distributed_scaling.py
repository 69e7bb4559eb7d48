"""Scaling of ``certify_dataset`` over processes: 1 process vs W processes (gloo, this machine).

MNIST 6F (``curvbound.zoo.mnist_mlp(6)``, tanh, briefly trained here), anchored certified
certificates of the first ``--limit`` test images in batches of ``--batch-size``. In one run of
the script: one process certifies everything, then W processes started like torchrun
(``torch.multiprocessing``, RANK/WORLD_SIZE/MASTER_ADDR in the environment, the process group
initialised by ``certify_dataset`` itself) certify their shares and gather the certificate. Times
are wall-clock seconds of the ``certify_dataset`` call (the bound compiled on each rank before a
barrier; the slowest rank, gather included), of that compile, and of the whole launch (process
start, imports, training excluded). The W-process certificate is
checked to equal the single-process one exactly. Every process uses 1 thread.

Run from the repository root:
    python benchmarks/distributed_scaling.py                     # 2,000 images, 2 processes
    python benchmarks/distributed_scaling.py --limit 500 --world 2
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvbound
from curvbound import zoo
from curvbound.apps import data
from curvbound.apps.distributed import ensure_process_group


def _loader(limit: int, batch: int):
    x, y = data.load_mnist("test", limit=limit)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _certify(weights: str, limit: int, batch: int) -> tuple[float, float, curvbound.Certificate]:
    model = zoo.mnist_mlp(6)
    model.load_state_dict(torch.load(weights))
    loader = _loader(limit, batch)
    t0 = time.perf_counter()
    bf = curvbound.compile(model, torch.zeros(1, 1, 28, 28), norms="certified", anchored=True)
    compile_s = time.perf_counter() - t0
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    cert = curvbound.certify_dataset(model, loader, bound_fn=bf, progress=False)
    return compile_s, time.perf_counter() - t0, cert


def _worker(rank: int, world: int, port: int, weights: str, limit: int, batch: int,
            out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # the group is initialised before the timed call so that its setup is not counted
    ensure_process_group()
    compile_s, seconds, cert = _certify(weights, limit, batch)
    result = {"compile": compile_s, "seconds": seconds, "cert": cert}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equal(a, b) -> bool:
    for f in fields(a):
        u, v = getattr(a, f.name), getattr(b, f.name)
        if isinstance(u, torch.Tensor):
            if not (torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(),
                                                                        v.nan_to_num())):
                return False
        elif u != v:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=2000, help="test images")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--world", type=int, default=2, help="processes")
    parser.add_argument("--train", type=int, default=10000, help="training images (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = zoo.mnist_mlp(6)
    if args.train:
        x, y = data.load_mnist("train", limit=args.train)
        data.train_classifier(model, x, y, epochs=1, lr=1e-3, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "mnist_6f.pt")
        torch.save(model.state_dict(), weights)
        t0 = time.perf_counter()
        one_compile, one, ref = _certify(weights, args.limit, args.batch_size)
        one_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        mp.start_processes(
            _worker, args=(args.world, _free_port(), weights, args.limit, args.batch_size, tmp),
            nprocs=args.world, start_method="spawn",
        )
        many_total = time.perf_counter() - t0
        res = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
               for r in range(args.world)]
    many = max(r["seconds"] for r in res)
    many_compile = max(r["compile"] for r in res)
    same = all(_equal(r["cert"], ref) for r in res)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average (1/5/15 min) at the end: {load}")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"1 thread per process; MNIST 6F, {args.limit} test images, batches of "
          f"{args.batch_size}, anchored certified certificates")
    print(f"| | 1 process | {args.world} processes | ratio 1/{args.world} |")
    print("|---|---|---|---|")
    print(f"| certify_dataset (s) | {one:.2f} | {many:.2f} | {one / many:.2f} |")
    print(f"| compile, anchored (s; slowest rank) | {one_compile:.2f} | {many_compile:.2f} | |")
    print(f"| samples/s | {args.limit / one:.1f} | {args.limit / many:.1f} | |")
    print(f"| whole launch (s) | {one_total:.2f} | {many_total:.2f} | "
          f"{one_total / many_total:.2f} |")
    print(f"every rank's certificate equals the single-process one: {same}; "
          f"certified accuracy at 0.05: {ref.certified_accuracy(0.05):.4f}")


if __name__ == "__main__":
    main()
