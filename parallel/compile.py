"""torch.compile per block: each block compiles once (identical blocks reuse the graph) and the
module tree, hence state-dict keys and checkpoints, stays unchanged (`nn.Module.compile`)."""
from __future__ import annotations

import torch
import torch.nn as nn


def compile_blocks(blocks: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of the container (ModuleList or ModuleDict) in place; apply before
    activation checkpointing (which then recomputes the compiled forward) and before FSDP."""
    set_lru_cache = getattr(torch._C._dynamo.eval_frame, "_set_lru_cache", None)
    if set_lru_cache is not None:
        # Blocks of different kinds share one code object, so its graphs sit in one cache. With LRU
        # reordering, the recompute in backward (activation checkpointing) may be served another
        # block kind's graph whose guards also pass, and checkpointing then refuses the mismatched
        # saved tensors (pytorch/pytorch#166926). A fixed order gives the forward's graph back.
        set_lru_cache(False)
    for block in blocks.children():
        block.compile(backend=backend, dynamic=False)
