"""Certification and training across processes (apps/distributed.py, issue 16).

Two CPU processes (gloo, started with torch.multiprocessing like torchrun would: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment and no init_process_group call) run every scenario once in a
module fixture; the tests compare what each rank saw with a single-process run in this process:
- certify_dataset: each rank's Certificate equals the single-process one field by field, exactly,
  and each rank evaluated the model on only its half of the samples (a forward hook counts rows);
- the loader's order, ``limit``, ``distributed=False``, mismatched loaders and an error on one rank;
- training: a few DDP steps with the curvature bound of ``ddp.module`` as a penalty keep the
  ranks' parameters, power-iteration vectors and penalties identical, and equal (to float32
  rounding) to one process training on the union of the two shards; the same with
  ``curvbound.CurvaturePenalty`` on the DDP model.
"""

from __future__ import annotations

import doctest
import importlib.util
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvbound
from curvbound.apps import cli
from curvbound.apps import distributed as cdist
from curvbound.apps.anchored import Capture
from curvbound.compiler.errors import InputError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
N, BATCH, LIMIT = 50, 8, 37  # 7 batches: rank 0 gets 4 (26 samples), rank 1 gets 3 (24)
STEPS, LAM = 3, 0.05


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def _loader(seed: int = 1):
    x, y = _data(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


class _Rows:
    """Counts the rows the certifier evaluates the model on (its float64 copy, ``Capture``),
    while in a ``with`` block."""

    def __enter__(self):
        self.n, self._forward = 0, Capture.forward
        forward = self._forward

        def counted(capture, x):
            self.n += x.shape[0]
            return forward(capture, x)

        Capture.forward = counted
        return self

    def __exit__(self, *exc):
        Capture.forward = self._forward


def _fields(cert) -> dict:
    return {f.name: getattr(cert, f.name) for f in fields(cert)}


def _train_data():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(2 * WORLD * 4, 4, generator=gen), torch.randint(0, 3, (2 * WORLD * 4,),
                                                                       generator=gen)


def _train(model: nn.Module, train, rank: int = 0, size: int = 1) -> dict:
    """STEPS steps of SGD on cross-entropy + λ·M, M = bf(refresh=2).curvature, the bound of the
    (unwrapped) model, on shard ``rank`` of ``size`` of the data."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    bf = curvbound.compile(net, torch.zeros(1, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = train
    share = len(x) // size
    xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    penalties = []
    for _ in range(STEPS):
        opt.zero_grad()
        m = bf(refresh=2).curvature
        loss = nn.functional.cross_entropy(model(xs), ys) + LAM * m
        loss.backward()
        opt.step()
        penalties.append(float(m.detach()))
    return {
        "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in bf.state_dict().items()},
        "penalties": penalties,
        "bf": bf,
    }


def _train_penalty(model: nn.Module, rank: int = 0, size: int = 1) -> dict:
    """STEPS steps of SGD on cross-entropy + ``curvbound.CurvaturePenalty`` (bound target)."""
    pen = curvbound.CurvaturePenalty(model, torch.zeros(1, 4), weight=LAM, target=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _train_data()
    share = len(x) // size
    xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    values = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xs), ys) + pen()
        loss.backward()
        opt.step()
        pen.step()
        values.append(pen.value)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in pen.bound.state_dict().items()},
        "values": values,
        "weight": pen.weight,
        "in_sync": cdist.in_sync(net, pen.bound),
    }


def _cli(json_path: Path) -> tuple[int, str, dict | None]:
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        code = cli.main(["certify", f"{ROOT}/examples/cli_models.py:digits_mlp", "--data",
                         "digits", "--limit", "60", "--batch-size", "16", "--quiet", "--json",
                         str(json_path)])
        printed = sys.stdout.getvalue()
    finally:
        sys.stdout = stdout
    record = json.loads(json_path.read_text()) if json_path.exists() else None
    return code, printed, record


def _worker(rank: int, size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # what torchrun sets; certify_dataset initialises the process group from it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    res: dict = {}
    net = _net()
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        with _Rows() as rows:
            cert = curvbound.certify_dataset(net, _loader(), progress=True)
    finally:
        sys.stderr = stderr
    res["initialised"] = dist.is_initialized() and dist.get_world_size() == size
    res["progress"] = err.getvalue()
    res["rows"] = rows.n
    res["cert"] = _fields(cert)
    res["limited"] = _fields(curvbound.certify_dataset(net, _loader(), limit=LIMIT,
                                                       progress=False))
    with _Rows() as rows:
        local = curvbound.certify_dataset(net, _loader(), distributed=False, progress=False)
    res["local"], res["local_rows"] = _fields(local), rows.n
    # rank 1 gets no batch at all; bare x batches of unequal sizes (no labels)
    x, y = _data()
    res["one_batch"] = _fields(curvbound.certify_dataset(net, [(x[:5], y[:5])], progress=False))
    res["bare"] = _fields(curvbound.certify_dataset(net, [x[:20], x[20:23], x[23:]],
                                                    progress=False))
    # the command line under torchrun: rank 0 prints and writes, both certify half the batches
    if HAS_SKLEARN:
        res["cli"] = _cli(Path(out) / f"cli{rank}.json")
    # data sharded by the user (here every other sample): local certificates, gathered
    x, y = _data()
    mine = curvbound.certify_dataset(net, [(x[rank::size], y[rank::size])], distributed=False,
                                     progress=False)
    res["gathered"] = _fields(cdist.gather_certificate(mine))
    # a loader that differs across ranks (e.g. an unsynchronised shuffle) is an error everywhere
    try:
        curvbound.certify_dataset(net, _loader(seed=10 + rank), progress=False)
    except Exception as exc:
        res["mismatch"] = (type(exc).__name__, str(exc))
    # a bad label in batch 1 (rank 1's share): rank 1 raises it, rank 0 is told, nobody hangs
    x, y = _data()
    y[BATCH + 2] = 7
    try:
        curvbound.certify_dataset(net, [(x[i:i + BATCH], y[i:i + BATCH]) for i in (0, 8, 16)],
                                  progress=False)
    except Exception as exc:
        res["failure"] = (type(exc).__name__, str(exc))
    # training with the bound of ddp.module as a penalty
    ddp = nn.parallel.DistributedDataParallel(_net())
    res["compile_ddp"] = curvbound.compile(ddp, torch.zeros(1, 4)).model is ddp.module
    trained = _train(ddp, _train_data(), rank, size)
    bf = trained.pop("bf")
    res["train"] = trained
    res["in_sync"] = cdist.in_sync(ddp.module, bf)
    # issue 11's penalty (it unwraps the DDP model itself)
    res["penalty"] = _train_penalty(nn.parallel.DistributedDataParallel(_net()), rank, size)
    if rank == 1:  # a drifted vector is detected, and broadcast_bound repairs it
        with torch.no_grad():
            next(iter(bf.buffers())).mul_(-1)
    res["drifted_in_sync"] = cdist.in_sync(bf)
    cdist.broadcast_bound(bf)
    res["repaired_in_sync"] = cdist.in_sync(bf)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the distributed workers did not finish in 240 s (a hang?)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    net = _net()
    with _Rows() as rows:
        cert = curvbound.certify_dataset(net, _loader(), progress=False)
    return {
        "cert": _fields(cert),
        "rows": rows.n,
        "limited": _fields(curvbound.certify_dataset(net, _loader(), limit=LIMIT, progress=False)),
    }


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].isnan(), b[k].isnan()), k
            assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), k
        else:
            assert a[k] == b[k], k


def test_every_rank_gets_the_single_process_certificate(ranks, single):
    ref = single["cert"]
    assert len(ref["radius"]) == N and len(ref["attack_index"]) > 0  # attacks are reassembled too
    assert (ref["radius"] > 0).any()
    for res in ranks:
        assert res["initialised"]  # from the torchrun-style environment alone
        _assert_identical(res["cert"], ref)
        _assert_identical(res["limited"], single["limited"])
    assert len(single["limited"]["radius"]) == LIMIT


def test_each_rank_evaluates_only_its_share(ranks, single):
    assert single["rows"] == N  # one process evaluates every sample once
    shares = [4 * BATCH - (BATCH - N % BATCH), 3 * BATCH]  # batches 0,2,4,6 and 1,3,5
    for res, share in zip(ranks, shares):
        assert res["rows"] == share < 0.6 * N
    assert sum(shares) == N


def test_progress_is_printed_by_rank_0_only(ranks):
    assert "certify: 26/26 samples" in ranks[0]["progress"]  # rank 0's share of the 50
    assert ranks[1]["progress"] == ""


def test_a_rank_without_batches_and_unlabelled_batches(ranks):
    x, y = _data()
    net = _net()
    one = _fields(curvbound.certify_dataset(net, [(x[:5], y[:5])], progress=False))
    bare = _fields(curvbound.certify_dataset(net, [x[:20], x[20:23], x[23:]], progress=False))
    assert bare["label"] is None and len(bare["radius"]) == N
    for res in ranks:
        _assert_identical(res["one_batch"], one)
        _assert_identical(res["bare"], bare)


def test_distributed_false_certifies_the_local_loader(ranks, single):
    for res in ranks:
        _assert_identical(res["local"], single["cert"])  # each rank's loader has everything
        assert res["local_rows"] == N


@pytest.mark.skipif(not HAS_SKLEARN, reason="the digits data set needs scikit-learn")
def test_cli_certify_under_torchrun_reports_once_what_one_process_reports(ranks, tmp_path):
    code, printed, record = _cli(tmp_path / "one.json")
    assert code == 0 and record["samples"] == 60
    (c0, p0, r0), (c1, p1, r1) = ranks[0]["cli"], ranks[1]["cli"]
    assert c0 == c1 == 0
    assert r0 == record and r1 is None  # the same numbers, written once
    assert p1 == ""
    timing = re.compile(r"; [0-9.]+ s$", re.M)  # the wall time differs, and the JSON's name
    assert "wrote " in p0 and "60 test images" in p0
    assert timing.sub("", p0).split("wrote ")[0] == timing.sub("", printed).split("wrote ")[0]


def test_gather_certificate_concatenates_user_shards_in_rank_order(ranks):
    x, y = _data()
    net = _net()
    ref = curvbound.Certificate.cat([
        curvbound.certify_dataset(net, [(x[r::WORLD], y[r::WORLD])], progress=False)
        for r in range(WORLD)
    ])
    for res in ranks:
        _assert_identical(res["gathered"], _fields(ref))


def test_different_loaders_on_different_ranks_are_an_error(ranks):
    for res in ranks:
        kind, msg = res["mismatch"]
        assert kind == "InputError" and "different data on rank 1" in msg
        assert "distributed=False" in msg


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    kind, msg = ranks[1]["failure"]
    assert kind == "InputError" and "label y[2] = 7" in msg
    kind, msg = ranks[0]["failure"]
    assert kind == "DistributedError" and "rank 1" in msg and "label y[2] = 7" in msg


def test_ddp_training_with_the_penalty_keeps_ranks_identical(ranks):
    a, b = ranks[0]["train"], ranks[1]["train"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["buffers"].keys() == b["buffers"].keys() and a["buffers"]
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    assert a["penalties"] == b["penalties"]
    assert all(res["in_sync"] for res in ranks)
    assert not any(res["drifted_in_sync"] for res in ranks)
    assert all(res["repaired_in_sync"] for res in ranks)


def test_ddp_training_matches_one_process_on_the_union(ranks):
    torch.set_num_threads(1)
    ref = _train(_net(), _train_data())
    got = ranks[0]["train"]
    start = _net().state_dict()
    for k, v in ref["params"].items():
        assert not torch.equal(v, start[k])  # the steps moved the weights
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6)
    for k, v in ref["buffers"].items():
        torch.testing.assert_close(got["buffers"][k], v, rtol=1e-4, atol=1e-5)
    assert all(math.isclose(p, q, rel_tol=1e-5) for p, q in zip(got["penalties"],
                                                                 ref["penalties"]))


def test_ddp_training_with_curvature_penalty_keeps_ranks_identical(ranks):
    a, b = ranks[0]["penalty"], ranks[1]["penalty"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["buffers"].keys() == b["buffers"].keys() and a["buffers"]
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    assert a["values"] == b["values"] and a["weight"] == b["weight"] > LAM  # λ grew (M > 0)
    assert a["in_sync"] and b["in_sync"]
    torch.set_num_threads(1)
    ref = _train_penalty(_net())  # one process on the union of the two shards
    for k, v in ref["params"].items():
        torch.testing.assert_close(a["params"][k], v, rtol=1e-5, atol=1e-6)
    assert all(math.isclose(p, q, rel_tol=1e-5) for p, q in zip(a["values"], ref["values"]))


def test_compiling_the_ddp_wrapper_bounds_the_wrapped_module(ranks):
    # compile() unwraps DistributedDataParallel and DataParallel (compiler.trace.unwrap_model)
    assert all(res["compile_ddp"] for res in ranks)
    dp = nn.DataParallel(_net())
    assert curvbound.compile(dp, torch.zeros(1, 4)).model is dp.module


def test_docstring_examples_run():
    result = doctest.testmod(cdist, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_without_a_process_group_nothing_changes():
    assert cdist.world() == (0, 1) and cdist.is_main_process()
    with pytest.raises(cdist.DistributedError, match="no torch.distributed process group"):
        curvbound.certify_dataset(_net(), _loader(), distributed=True, progress=False)
    with pytest.raises(InputError, match="no samples"):
        curvbound.certify_dataset(_net(), [], progress=False)


@pytest.mark.slow
def test_example_under_torchrun_prints_the_single_process_summary_once():
    script = str(ROOT / "examples" / "distributed_certify.py")
    run = dict(capture_output=True, text=True, cwd=ROOT, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", script], **run)
    one = subprocess.run([sys.executable, script], **run)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.startswith("2 process(es)\n") and one.stdout.startswith("1 process(es)\n")
    assert two.stdout.count("300 samples, clean accuracy") == 1  # rank 0 prints, rank 1 not
    assert two.stdout.split("\n", 1)[1] == one.stdout.split("\n", 1)[1]
