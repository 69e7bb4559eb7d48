"""``curvbound.distributed``: certification and training across processes (apps/distributed.py)."""

from .apps.distributed import (
    DistributedError,
    broadcast_bound,
    ensure_process_group,
    gather_batches,
    gather_certificate,
    in_sync,
    is_main_process,
    mine,
    sharded,
    world,
)

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
