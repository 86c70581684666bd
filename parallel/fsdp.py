"""FSDP2 wrapping: each block is its own shard group, then the root (embedding, norm, head).

Per-block groups let the all-gather of block i+1 overlap the compute of block i and bound peak
memory to about one unsharded block. Modules that live on their own mesh (expert-parallel experts)
are shard groups of their own, over the data ranks their own mesh leaves.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard


def balanced_shard_placement(n_shards: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP shards dim 0 by default; a tensor with fewer rows than ranks (stacked experts
    [E, d, h] with E < ranks, or E/ep experts per expert-parallel rank) would then sit on a few
    ranks and leave the rest empty. Such a tensor is sharded on its largest dim that splits evenly
    instead. Tensor-parallel shards keep dim 0 (FSDP2 composes with TP only there); an
    expert-parallel shard on dim 0 (mesh dim "ep") may move to another dim."""
    def placement(param: nn.Parameter) -> Shard | None:
        rows, sharded = param.shape[0], set()
        if isinstance(param, DTensor):
            for name, size, p in zip(param.device_mesh.mesh_dim_names, param.device_mesh.shape, param.placements):
                if p.is_shard():
                    if name != "ep":
                        return None
                    sharded.add(p.dim)
                    rows //= size if p.dim == 0 else 1
        if rows >= n_shards:
            return None
        even = [d for d in range(1, param.ndim) if d not in sharded and param.shape[d] % n_shards == 0]
        return Shard(max(even, key=lambda d: param.shape[d])) if even else None
    return placement


def apply_fsdp(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    forward_methods: Iterable[str] = (),
    own_mesh: Iterable[tuple[nn.Module, DeviceMesh]] = (),
) -> nn.Module:
    """Shard `blocks` individually and `model` as the root over `mesh` (1-D, or 2-D for HSDP).

    Parameters stay fp32 (the master copy); `param_dtype` is what forward computes in.
    `forward_methods` are entry points other than forward() (e.g. a fused `loss`) that must
    gather the root's parameters the way forward() does. `own_mesh`: (submodule of a block, the
    mesh to shard it over) pairs, e.g. routed experts over efsdp (whose gradients FSDP averages
    over that mesh only: the module must account for the other ranks it served itself).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    placement = balanced_shard_placement(mesh.size())
    blocks = list(blocks)
    for module, sub_mesh in own_mesh:
        fully_shard(module, mesh=sub_mesh, mp_policy=mp, shard_placement_fn=balanced_shard_placement(sub_mesh.size()),
                    reshard_after_forward=reshard_after_forward)
    for i, block in enumerate(blocks):
        # The last block is gathered again by the root's backward anyway; keep it unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, shard_placement_fn=placement,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=placement,
                reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model

