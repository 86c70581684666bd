"""FSDP2 wrapping: each block is its own shard group, then the root (embedding, norm, head).

Per-block groups let the all-gather of block i+1 overlap the compute of block i and bound peak
memory to about one unsharded block.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def apply_fsdp(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    forward_methods: Iterable[str] = (),
) -> nn.Module:
    """Shard `blocks` individually and `model` as the root over `mesh` (1-D, or 2-D for HSDP).

    Parameters stay fp32 (the master copy); `param_dtype` is what forward computes in.
    `forward_methods` are entry points other than forward() (e.g. a fused `loss`) that must
    gather the root's parameters the way forward() does.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # The last block is gathered again by the root's backward anyway; keep it unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model

