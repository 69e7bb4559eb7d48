"""Test-session settings and shared fixtures.

Tiny tensors run fastest on one thread (and do not fight for the two cores of a CI machine).
"""

import datetime

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def single_process_group():
    """A one-process gloo group for tests of DistributedDataParallel-wrapped models.

    It rendezvouses through a TCP store on 127.0.0.1 (the loopback interface, a free port) with a
    60-second timeout, not through a ``file://`` store: a file store takes a file lock, which can
    block without end on some file systems, and CI machines differ in theirs.
    """
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
