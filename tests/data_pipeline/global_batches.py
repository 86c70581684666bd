"""Reassemble the global batches of a dp_size job from its ranks' loaders (elastic-determinism checks)."""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def assemble_global_batches(make_loader: Callable[[int], object], dp_size: int, n: int,
                            state=None) -> list[torch.Tensor]:
    """Run ranks 0..dp_size-1 (`make_loader(rank)`) for n steps; place each rank's rows at its
    `global_rows` in the global batch."""
    per_rank = []
    for r in range(dp_size):
        loader = make_loader(r)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append((loader.global_rows, [b["tokens"] for b in itertools.islice(iter(loader), n)]))
    out = []
    for step in range(n):
        rows0, batches0 = per_rank[0]
        g = torch.empty(dp_size * len(rows0), *batches0[step].shape[1:], dtype=torch.long)
        for rows, batches in per_rank:
            g[rows] = batches[step]
        out.append(g)
    return out
