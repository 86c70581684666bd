"""Activation checkpointing per block: keep only block inputs, recompute the rest in backward.

Trades about one extra forward for activation memory that no longer grows with depth. The
wrapper's `_checkpoint_wrapped_module.` prefix is removed from state-dict keys by
torch.distributed.checkpoint.state_dict, so checkpoints load with it on or off.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Wrap every block in place (after compile: see pretrain/model/parallelize.py); call before
    FSDP so each sharded unit is a wrapped block."""
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
