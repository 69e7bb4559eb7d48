"""Certification and training across processes with ``torch.distributed`` (docs/distributed.md).

Certification (:func:`sharded`, applied to ``certify_dataset``): under a process group of W > 1
ranks every rank iterates the same loader, certifies the batches whose index i has
i mod W = rank (the bound is compiled on each rank, anchored quantities are computed only for
the local batches) and all ranks receive the whole :class:`~curvbound.Certificate`, in the
loader's order, equal to what one process computes: the batches are the same, so every per-sample
number comes from the same float64 arithmetic. The ranks also compare a fingerprint of every
batch, so a loader that yields different data on different ranks (a ``DistributedSampler``, an
unsynchronised shuffle) is an error instead of a silently wrong certificate; an error on one
rank is raised on every rank instead of leaving the others waiting in a collective.

Training: a compiled bound of ``ddp_model.module`` evaluates the same generated code on the same
(replicated) weights on every rank, and its power iterations start from a seeded vector and are
deterministic functions of the weights, so the penalty and the vectors agree across ranks;
:func:`in_sync` checks that, :func:`broadcast_bound` copies rank ``src``'s vectors where kernels
are not deterministic (some GPU convolutions).

Without a process group every function here is the single-process one: ``world()`` is (0, 1).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..compiler.errors import CurvboundError, InputError

__all__ = [
    "DistributedError",
    "world",
    "is_main_process",
    "ensure_process_group",
    "sharded",
    "gather_certificate",
    "mine",
    "gather_batches",
    "broadcast_bound",
    "in_sync",
]

# Certificate fields aligned with the attacked samples (attack_index), not with the samples
_BY_ATTACK = ("attack_index", "attack_points")


class DistributedError(CurvboundError):
    """A distributed run cannot proceed: another rank failed, or no process group is available."""


def world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` of ``group`` (the default process group); (0, 1) without one.

    >>> world()
    (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process(group=None) -> bool:
    """True on rank 0 (and without a process group): the rank that prints and writes outputs.

    >>> is_main_process()
    True
    """
    return world(group)[0] == 0


def _torchrun_world_size() -> int:
    """WORLD_SIZE set by torchrun (or another launcher using ``env://``), 1 when absent."""
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def ensure_process_group(backend: str = "gloo") -> bool:
    """Initialise the default process group from torchrun's environment (``env://``) when a
    launcher started several processes and nobody initialised it yet. Returns whether a group
    of more than one rank is now available.

    ``certify_dataset`` calls this, so a script (or ``curvbound certify``) run under
    ``torchrun --nproc-per-node N`` shards its certification without any change. gloo is enough:
    only the finished certificates travel between ranks.

    >>> ensure_process_group()  # a plain process: nothing to do
    False
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if _torchrun_world_size() <= 1:
            return False
        dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


# -- certification ------------------------------------------------------------------------------


def sharded(certify_fn: Callable) -> Callable:
    """Decorator giving ``certify_dataset(model, loader, ..., limit, progress)`` its
    ``distributed`` argument: ``None`` (default) shards when a process group of several ranks
    exists or torchrun started the process, ``True`` requires one, ``False`` certifies exactly
    what the local loader yields (for data already sharded with a ``DistributedSampler``; see
    :func:`gather_certificate`).

    Sharded certification is a collective: every rank must call it (to certify on one rank
    only, pass ``distributed=False`` there).

    The wrapped function is called with the local batches (``limit`` applied in the loader's
    order beforehand), ``distributed=False``, and ``progress`` on rank 0 only; it must return
    the concatenation of its batches' certificates (``Certificate.cat``).
    """

    @functools.wraps(certify_fn)
    def wrapper(model, loader, *args, distributed: bool | None = None, limit=None,
                progress: bool = True, **kwargs):
        if not _use_group(distributed):
            return certify_fn(model, loader, *args, distributed=False, limit=limit,
                              progress=progress, **kwargs)
        rank, size = world()
        share = _Share(loader, limit, rank, size)
        error: Exception | None = None
        try:
            cert = certify_fn(model, share, *args, distributed=False, limit=None,
                              progress=progress and rank == 0, **kwargs)
            share.device = cert.radius.device
            sent = ("ok", _moved(cert, torch.device("cpu")), share.owned, share.record)
        except Exception as exc:  # re-raised below, after telling the other ranks
            if share.finished and not share.owned and isinstance(exc, InputError):
                sent = ("empty", None, [], share.record)  # no local batch: not an error
            else:
                error = exc
                sent = ("error", f"{type(exc).__name__}: {exc}", [], share.record)
        received = _all_gather(sent)
        failed = [(r, msg) for r, (status, msg, *_) in enumerate(received) if status == "error"]
        if error is not None:
            raise error
        if failed:
            r, msg = failed[0]
            raise DistributedError(f"certification failed on rank {r} of {size}: {msg}")
        _check_same_batches([rec for *_, rec in received])
        pieces: dict[int, object] = {}
        for r, (status, cert, lengths, _) in enumerate(received):
            if status == "ok":
                for index, piece in zip(range(r, size * len(lengths), size), _split(cert, lengths)):
                    pieces[index] = piece
        if not pieces:
            raise InputError("the loader yielded no samples")
        first = next(iter(pieces.values()))
        whole = type(first).cat([pieces[i] for i in sorted(pieces)])
        return _moved(whole, share.device)

    return wrapper


def _use_group(distributed: bool | None) -> bool:
    if distributed is False:
        return False
    if ensure_process_group():
        return True
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "distributed=True, but no torch.distributed process group is initialised and the "
            "process was not started by torchrun: call torch.distributed.init_process_group(...) "
            "first, launch with torchrun, or pass distributed=None/False"
        )
    return False


class _Share:
    """The batches of ``loader`` this rank certifies (index mod size = rank), after applying
    ``limit`` in the loader's order; records every batch's fingerprint and the local sizes."""

    def __init__(self, loader: Iterable, limit: int | None, rank: int, size: int):
        self.loader, self.limit, self.rank, self.size = loader, limit, rank, size
        self.record: list[tuple] = []  # (size, fingerprint) of every batch, on every rank
        self.owned: list[int] = []  # sizes of the local batches
        self.finished = False
        self.device = torch.device("cpu")
        sizes = _batch_sizes(loader, limit)
        if sizes is not None:  # the local total, for the progress report (rank 0)
            self.dataset = range(sum(sizes[rank::size]))

    def __iter__(self) -> Iterator:
        done, limit = 0, self.limit
        for index, batch in enumerate(self.loader):
            pair = isinstance(batch, (tuple, list))
            x = batch[0] if pair and len(batch) else batch
            if not isinstance(x, Tensor) or x.dim() == 0:
                yield batch  # the certifier raises its usual error, on every rank
                continue
            y = batch[1] if pair and len(batch) > 1 else None
            if limit is not None:
                x = x[: limit - done]
                y = y[: limit - done] if isinstance(y, Tensor) else y
                batch = (x, y) if pair else x
            if len(x) == 0:
                break
            if index == 0:
                self.device = x.device
            self.record.append((len(x), _fingerprint(x, y)))
            if index % self.size == self.rank:
                self.owned.append(len(x))
                yield batch
            done += len(x)
            if limit is not None and done >= limit:
                break
        self.finished = True


def _batch_sizes(loader, limit: int | None) -> list[int] | None:
    """The batch sizes a ``DataLoader`` with a plain ``batch_size`` will yield, else None."""
    bs = getattr(loader, "batch_size", None)
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    if not isinstance(bs, int) or bs <= 0:
        return None
    sizes = [bs] * (n // bs)
    if n % bs and not getattr(loader, "drop_last", False):
        sizes.append(n % bs)
    if limit is not None:
        out, done = [], 0
        for m in sizes:
            if done >= limit:
                break
            out.append(min(m, limit - done))
            done += out[-1]
        sizes = out
    return sizes


def _fingerprint(x: Tensor, y) -> tuple[str, str]:
    """Position-weighted sums of a batch (float64, exact same bits for the same data)."""
    with torch.no_grad():
        w = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
        fx = float((x.detach().flatten(1).double().sum(dim=1) * w).sum())
        fy = ""
        if isinstance(y, Tensor) and y.dim() == 1 and len(y) == len(x):
            fy = float((y.detach().double() * w).sum()).hex()
    return fx.hex(), fy


def _check_same_batches(records: list[list[tuple]]) -> None:
    ref = records[0]
    for r, rec in enumerate(records[1:], start=1):
        if rec == ref:
            continue
        i = next((i for i, (a, b) in enumerate(zip(ref, rec)) if a != b), min(len(ref), len(rec)))
        what = (
            f"batch {i} differs" if i < min(len(ref), len(rec))
            else f"rank 0 saw {len(ref)} batches, rank {r} saw {len(rec)}"
        )
        raise InputError(
            f"the loader yields different data on rank {r} than on rank 0 ({what}): sharded "
            "certification needs every rank to iterate the same loader in the same order (no "
            "DistributedSampler, no shuffling with per-rank seeds). If you shard the data "
            "yourself, pass distributed=False (and gather_certificate() to combine the shares)"
        )


def _split(cert, lengths: list[int]) -> list:
    """Cut a concatenated certificate back into its batches (inverse of ``Certificate.cat``)."""
    n = len(cert)
    for f in fields(cert):
        v = getattr(cert, f.name)
        if isinstance(v, Tensor) and f.name not in _BY_ATTACK and v.dim() and len(v) != n:
            raise CurvboundError(
                f"Certificate.{f.name} has {len(v)} rows for {n} samples: a field aligned with "
                "something else than the samples must be listed in apps/distributed._BY_ATTACK"
            )
    out, start = [], 0
    for m in lengths:
        out.append(_rows(cert, start, start + m))
        start += m
    if start != n:
        raise CurvboundError(f"the local certificate has {n} samples, the batches {start}")
    return out


def _rows(cert, start: int, stop: int):
    idx = cert.attack_index
    keep = (idx >= start) & (idx < stop)
    vals = {}
    for f in fields(cert):
        v = getattr(cert, f.name)
        if f.name == "attack_index":
            v = idx[keep] - start
        elif f.name in _BY_ATTACK:
            v = v[keep]
        elif isinstance(v, Tensor) and v.dim():
            v = v[start:stop]
        elif isinstance(v, list):
            v = list(v)
        vals[f.name] = v
    return type(cert)(**vals)


def _moved(cert, device: torch.device):
    vals = {f.name: getattr(cert, f.name) for f in fields(cert)}
    for k, v in vals.items():
        if isinstance(v, Tensor):
            vals[k] = v.to(device)
    return type(cert)(**vals)


def _all_gather(obj, group=None) -> list:
    """``obj`` of every rank, in rank order (pickled; on the current CUDA device for NCCL)."""
    out = [None] * world(group)[1]
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_certificate(cert, group=None):
    """Concatenate the local certificates of every rank in rank order (all ranks receive it):
    for a loader sharded by the user (``DistributedSampler``; certify with
    ``distributed=False``). The order is the ranks' order, not the dataset's: a
    ``DistributedSampler`` interleaves the samples and pads the last share.

    >>> import torch, curvbound
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    >>> cert = curvbound.certify(net, torch.randn(5, 2))
    >>> len(gather_certificate(cert))  # without a process group: the certificate itself
    5
    """
    if world(group)[1] == 1:
        return cert
    device = cert.radius.device
    parts = _all_gather(_moved(cert, torch.device("cpu")), group)
    return _moved(type(cert).cat(parts), device)


def mine(index: int, group=None) -> bool:
    """Whether this rank handles item ``index`` of a sequence of batches (index mod W = rank,
    the sharding of ``certify_dataset``); always True without a process group. For loops that
    certify batches themselves; combine the results with :func:`gather_batches`.

    >>> [i for i in range(5) if mine(i)]  # one process: every batch
    [0, 1, 2, 3, 4]
    """
    rank, size = world(group)
    return index % size == rank


def gather_batches(parts: Sequence[tuple[int, object]], group=None):
    """``(index, Certificate)`` pairs certified on this rank → the certificates of every rank
    concatenated in index order (``Certificate.cat``), on every rank. Every rank must call it;
    a rank may contribute no pair.

    >>> import torch, curvbound
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    >>> x = torch.randn(6, 2)
    >>> parts = [(1, curvbound.certify(net, x[4:])), (0, curvbound.certify(net, x[:4]))]
    >>> len(gather_batches(parts)), int(gather_batches(parts).predicted[0] == net(x[:1]).argmax())
    (6, 1)
    """
    parts = list(parts)
    device = parts[0][1].radius.device if parts else torch.device("cpu")
    if world(group)[1] > 1:
        local = [(i, _moved(c, torch.device("cpu"))) for i, c in parts]
        parts = [p for received in _all_gather(local, group) for p in received]
    if not parts:
        raise InputError("no rank certified any batch")
    indices = [i for i, _ in parts]
    if len(set(indices)) != len(indices):
        raise InputError(f"batch indices must be distinct across ranks, got {sorted(indices)}")
    whole = type(parts[0][1]).cat([c for _, c in sorted(parts, key=lambda p: p[0])])
    return _moved(whole, device)


# -- training -----------------------------------------------------------------------------------


def _comm_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_bound(bound: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s buffers of a compiled bound (its power-iteration vectors) to every
    rank. Every rank must call it. Not needed where the kernels are deterministic (CPU: the
    vectors already agree bitwise, see :func:`in_sync`); a cheap guarantee elsewhere, e.g. after
    ``bf.refresh()`` on GPUs whose convolution kernels are not deterministic.
    No-op without a process group.
    """
    if world(group)[1] == 1:
        return
    device = _comm_device(group)
    for buf in bound.buffers():
        t = buf.detach().to(device)
        dist.broadcast(t, src, group=group)
        buf.copy_(t)


def _digest(items: Iterable) -> str:
    h = hashlib.sha256()
    for item in items:
        tensors = item.state_dict().items() if isinstance(item, nn.Module) else [("", item)]
        for name, t in tensors:
            t = t.detach().cpu().reshape(-1).contiguous()
            h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def in_sync(*items: nn.Module | Tensor, group=None) -> bool:
    """Whether every rank holds bitwise the same ``state_dict()`` of each module (parameters and
    buffers: a model, a compiled bound's power-iteration vectors) and the same tensors. Every
    rank must call it; all receive the same answer.

    >>> import torch
    >>> in_sync(torch.nn.Linear(2, 2), torch.zeros(3))  # one process agrees with itself
    True
    """
    if world(group)[1] == 1:
        return True
    digests = _all_gather(_digest(items), group)
    return all(d == digests[0] for d in digests)
