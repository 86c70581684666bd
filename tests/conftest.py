"""Suite-wide settings: one intra-op thread per test process (pytest -n 2 on a 2-core CI box
would otherwise oversubscribe the cores and run many times slower)."""

import torch

torch.set_num_threads(1)
