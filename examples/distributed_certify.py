"""Certify a dataset with several processes: the same script runs alone or under torchrun.

    python examples/distributed_certify.py                            # one process
    torchrun --standalone --nproc-per-node 2 examples/distributed_certify.py

Under torchrun every rank builds the same model and loader; ``certify_dataset`` initialises the
process group from torchrun's environment (gloo), certifies every other batch on each rank and
gives every rank the whole certificate, so rank 0 prints what one process would print.
A small tanh network on synthetic data keeps the example quick (docs/distributed.md).
"""

from __future__ import annotations

import torch
from torch import nn

import curvbound
from curvbound.distributed import is_main_process, world

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
gen = torch.Generator().manual_seed(1)
x, y = torch.randn(300, 8, generator=gen), torch.randint(0, 4, (300,), generator=gen)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=25)

cert = curvbound.certify_dataset(model, loader)  # every rank: all 300 samples, loader order
if is_main_process():  # print (or write files) once
    rank, size = world()
    print(f"{size} process(es)")
    print(cert.summary([0.01, 0.05]))
