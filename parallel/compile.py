"""torch.compile per block: each block compiles once (identical blocks reuse the graph) and the
module tree, hence state-dict keys and checkpoints, stays unchanged (`nn.Module.compile`)."""
from __future__ import annotations

import torch.nn as nn


def compile_blocks(blocks: nn.Module) -> None:
    """Compile every block of the container in place; apply after activation checkpointing, before FSDP."""
    for block in blocks.children():
        block.compile()
