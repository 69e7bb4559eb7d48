"""Test-session settings: tiny tensors run fastest on one thread (and do not fight for the two cores
of a CI machine)."""

import torch

torch.set_num_threads(1)
