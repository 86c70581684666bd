"""torch.compile per block: each block compiles once (identical blocks reuse the graph) and the
module tree, hence state-dict keys and checkpoints, stays unchanged (`nn.Module.compile`)."""
from __future__ import annotations

import torch.nn as nn


def compile_blocks(blocks: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of the container (ModuleList or ModuleDict) in place; apply before
    activation checkpointing (which then recomputes the compiled forward) and before FSDP."""
    for block in blocks.children():
        block.compile(backend=backend)
